//! The CUDA device layer without a GPU (these run in CI) and its memory round trip with one.

mod cuda_common;

use cuda_common::gpu;
use dsv3_kernels::KernelError;
use dsv3_kernels::cuda::CudaDevice;

/// Without the feature the API exists and says why it cannot run.
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_unavailable_without_feature() {
    match CudaDevice::new(0) {
        Err(KernelError::CudaUnavailable(m)) => assert!(m.contains("`cuda` feature"), "{m}"),
        other => panic!("expected CudaUnavailable, got {other:?}"),
    }
}

/// With or without the feature, a machine with no driver or no GPU gets a typed error, never
/// a panic; an ordinal past the last GPU too.
#[test]
fn cuda_device_new_reports_instead_of_panicking() {
    for ordinal in [0, 99] {
        match CudaDevice::new(ordinal) {
            Ok(d) => assert_eq!(ordinal, 0, "GPU {ordinal} opened: {}", d.name()),
            Err(KernelError::CudaUnavailable(m)) => {
                assert!(!m.is_empty());
                println!("GPU {ordinal}: unavailable: {m}");
            }
            Err(e) => panic!("GPU {ordinal}: expected CudaUnavailable, got {e}"),
        }
    }
}

/// The generated kernel table: every entry point is a `dsv3_*` symbol of an embedded ELF
/// cubin, and ptxas' report lists each one (build.rs failed the build otherwise).
#[cfg(feature = "cuda")]
#[test]
fn cuda_kernel_table_is_complete() {
    use dsv3_kernels::cuda::{KERNEL_REPORT, Kernel, Module};
    assert!(Kernel::ALL.len() >= 10, "{:?}", Kernel::ALL);
    for m in Module::ALL {
        assert_eq!(&m.cubin()[..4], b"\x7fELF", "{}", m.source());
    }
    for k in Kernel::ALL {
        assert!(k.symbol().starts_with("dsv3_"));
        let bin = k.module().cubin();
        assert!(bin.windows(k.symbol().len() + 1).any(|w| &w[..w.len() - 1] == k.symbol().as_bytes() && w[w.len() - 1] == 0));
        assert!(KERNEL_REPORT.lines().any(|l| l.split_whitespace().next() == Some(k.symbol())), "{k:?} not in\n{KERNEL_REPORT}");
    }
    println!("{KERNEL_REPORT}");
}

#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_memory_round_trip() {
    let Some(dev) = gpu("cuda_memory_round_trip") else { return };
    println!("device: {}", dev.name());
    let host: Vec<u32> = (0..100_003).collect();
    let buf = dev.upload(&host).unwrap();
    assert_eq!(buf.len(), host.len());
    assert_eq!(dev.download(&buf).unwrap(), host);
    assert_eq!(dev.download_range(&buf, 7..10).unwrap(), vec![7, 8, 9]);
    assert!(dev.download_range(&buf, 5..100_004).is_err());
    let z = dev.zeros::<f32>(0).unwrap();
    assert!(z.is_empty() && dev.download(&z).unwrap().is_empty());
    assert_eq!(dev.download(&dev.zeros::<f32>(5).unwrap()).unwrap(), vec![0.0; 5]);
    dev.synchronize().unwrap();
}

/// The step mode (issue 11), on a GPU: inside a step nothing is read back until its end, the
/// kernels' checks come back once (`DeviceCheck`), index tables uploaded together keep their
/// host copies (no read-back to validate them), temporaries come from the reserved workspace
/// at the same addresses step after step, and a captured graph replays the step.
#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_steps_workspace_and_graphs() {
    use dsv3_kernels::Backend;
    use dsv3_kernels::norm::RowsShape;
    let Some(b) = dsv3_kernels::Cuda::for_test("cuda_steps_workspace_and_graphs").unwrap() else { return };
    // upload_many: one copy, each part its own buffer with its contents.
    let (a, c) = (vec![1u32, 2, 3], vec![7u32; 1000]);
    let parts = b.upload_many(&[&a[..], &c[..]]).unwrap();
    assert_eq!((b.download(&parts[0]).unwrap(), b.download(&parts[1]).unwrap()), (a.clone(), c.clone()));
    // Inside a step: a NaN reaches a checked kernel; the op returns Ok, the step's end reports it.
    let before = b.stats();
    b.begin_step().unwrap();
    let x = b.upload(&[1f32, f32::NAN, 3.0, 4.0]).unwrap();
    let mut out = b.zeros::<u32>(1).unwrap();
    let shape = dsv3_kernels::sample::SampleShape { rows: 1, vocab: 4, allowed: 4 };
    b.sample_rows(&x, shape, &b.upload(&[dsv3_kernels::sample::SampleRow::GREEDY]).unwrap(), &mut out).unwrap();
    let e = b.end_step().unwrap_err();
    assert!(matches!(e, KernelError::DeviceCheck { kernel: "dsv3_sample", index: 1 }), "{e}");
    assert_eq!(b.stats().since(&before).host_syncs, 1, "one read-back for the whole step");
    // Workspace: measure a step, reserve it, and the same step gets the same addresses.
    let rows = RowsShape { rows: 64, cols: 1024 };
    let w = b.upload(&vec![1f32; 1024]).unwrap();
    let x = b.upload(&vec![0.5f32; 64 * 1024]).unwrap();
    let step = |b: &dsv3_kernels::Cuda| -> dsv3_kernels::Result<Vec<f32>> {
        b.begin_step()?;
        let mut y = b.zeros::<f32>(64 * 1024)?;
        b.rms_norm(&x, &w, rows, 1e-6, &mut y)?;
        let (mut residual, mut z) = (b.zeros::<f32>(64 * 1024)?, b.zeros::<f32>(64 * 1024)?);
        b.add_rms_norm(&y, &mut residual, &w, rows, 1e-6, &mut z)?;
        b.end_step()?;
        b.download(&z)
    };
    b.measure_workspace().unwrap();
    let first = step(&b).unwrap();
    let peak = b.measured_workspace();
    assert!(peak >= 2 * 64 * 1024 * 4, "measured {peak} bytes");
    b.reserve_workspace(peak).unwrap();
    let s0 = b.stats();
    assert_eq!(step(&b).unwrap(), first);
    let d = b.stats().since(&s0);
    assert_eq!((d.allocations, d.workspace_overflows), (0, 0), "{d:?}");
    assert!(d.workspace_allocations >= 2);
    // A graph of a step: nothing runs at capture; each replay runs it on the inputs of the moment.
    let mut src = b.upload(&vec![2f32; 64 * 1024]).unwrap();
    let mut dst = b.zeros::<f32>(64 * 1024).unwrap();
    let g = b.capture(|| b.rms_norm(&src, &w, rows, 1e-6, &mut dst)).unwrap().expect("the CUDA backend captures");
    assert!(b.download(&dst).unwrap().iter().all(|&v| v == 0.0), "capture ran the kernel");
    b.replay(&g).unwrap();
    let once = b.download(&dst).unwrap();
    assert!(once.iter().all(|&v| (v - 1.0).abs() < 1e-6), "{}", once[0]);
    b.write(&mut src, &vec![-3f32; 64 * 1024]).unwrap();
    b.replay(&g).unwrap();
    assert!(b.download(&dst).unwrap().iter().all(|&v| (v + 1.0).abs() < 1e-6));
    // A read-back cannot be captured.
    assert!(b.capture(|| b.download(&src).map(|_| ())).is_err());
    println!("{:?}", b.stats());
}
