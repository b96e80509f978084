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
