//! The SIMT FP8 GEMM on the GPU against `gemm::reference::gemm_fp8`, bit for bit (products of
//! e4m3 values are exact, and the per-128 block sums run in k order on both), alone and after
//! the GPU's act_quant (= the CPU reference of the whole fp8 path).

mod common;
mod cuda_common;

use common::*;
use cuda_common::{gpu, runner, same_bits};
use dsv3_kernels::fp8::{self, ActQuantShape, Fp8Weight, ScaleFmt};
use dsv3_kernels::gemm::{self, GemmPath, GemmShape};
use proptest::prelude::*;

#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_gemm_fp8_simt_matches_cpu() {
    let Some(dev) = gpu("cuda_gemm_fp8_simt_matches_cpu") else { return };
    let strat = (
        proptest::sample::select(&[0usize, 1, 7, 64, 65, 130][..]),
        proptest::sample::select(&[1usize, 127, 128, 129, 576][..]),
        proptest::sample::select(&[128usize, 256, 1536][..]),
    )
        .prop_flat_map(|(m, n, k)| (Just(GemmShape { m, n, k }), vec_f32(m * k, 4.0), vec_f32(n * k, 0.5)));
    runner(24)
        .run(&strat, |(s, a, wf)| {
            let w = Fp8Weight::quantize(s.n, s.k, &wf).unwrap();
            let qs = ActQuantShape { rows: s.m, cols: s.k };
            let (mut aq, mut asc) = (vec![0u8; a.len()], vec![0f32; s.m * s.k / 128]);
            fp8::reference::act_quant(&a, qs, ScaleFmt::Float, &mut aq, &mut asc).unwrap();
            let mut cpu = vec![0f32; s.m * s.n];
            gemm::reference::gemm_fp8(&aq, &asc, w.view(), s, &mut cpu).unwrap();
            let wd = dev.upload_fp8_weight(w.view()).unwrap();
            let mut od = dev.zeros::<f32>(cpu.len()).unwrap();
            dev.gemm_fp8(&dev.upload(&aq).unwrap(), &dev.upload(&asc).unwrap(), &wd, s, &mut od).unwrap();
            same_bits("gemm_fp8", &dev.download(&od).unwrap(), &cpu)?;
            // The whole fp8 path on the GPU: act_quant then the GEMM, against the CPU reference.
            let (mut qd, mut sd) = (dev.zeros::<u8>(aq.len()).unwrap(), dev.zeros::<f32>(asc.len()).unwrap());
            dev.act_quant_1x128(&dev.upload(&a).unwrap(), qs, ScaleFmt::Float, &mut qd, &mut sd).unwrap();
            dev.gemm_fp8(&qd, &sd, &wd, s, &mut od).unwrap();
            gemm::reference::gemm(&a, w.view(), s, GemmPath::Fp8, &mut cpu).unwrap();
            same_bits("act_quant + gemm_fp8", &dev.download(&od).unwrap(), &cpu)
        })
        .unwrap();
}

#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_gemm_fp8_simt_v3_shape() {
    let Some(dev) = gpu("cuda_gemm_fp8_simt_v3_shape") else { return };
    // q_a_proj of V3 for 3 tokens: [3, 7168] · [1536, 7168]ᵀ.
    let s = GemmShape { m: 3, n: 1536, k: 7168 };
    let a: Vec<f32> = (0..s.m * s.k).map(|i| ((i * 2654435761) % 1000) as f32 / 250.0 - 2.0).collect();
    let wf: Vec<f32> = (0..s.n * s.k).map(|i| ((i * 40503) % 997) as f32 / 4000.0 - 0.125).collect();
    let w = Fp8Weight::quantize(s.n, s.k, &wf).unwrap();
    let mut cpu = vec![0f32; s.m * s.n];
    gemm::reference::gemm(&a, w.view(), s, GemmPath::Fp8, &mut cpu).unwrap();
    let qs = ActQuantShape { rows: s.m, cols: s.k };
    let (mut qd, mut sd) = (dev.zeros::<u8>(a.len()).unwrap(), dev.zeros::<f32>(s.m * 56).unwrap());
    dev.act_quant_1x128(&dev.upload(&a).unwrap(), qs, ScaleFmt::Float, &mut qd, &mut sd).unwrap();
    let mut od = dev.zeros::<f32>(cpu.len()).unwrap();
    dev.gemm_fp8(&qd, &sd, &dev.upload_fp8_weight(w.view()).unwrap(), s, &mut od).unwrap();
    same_bits("V3 q_a_proj", &dev.download(&od).unwrap(), &cpu).unwrap();
    // Shape errors before any launch.
    let bad = GemmShape { m: 3, n: 1536, k: 7040 };
    assert!(dev.gemm_fp8(&qd, &sd, &dev.upload_fp8_weight(w.view()).unwrap(), bad, &mut od).is_err());
}

/// The Reference path (`dsv3_gemm_dequant_simt`) and the bf16 GEMM (`dsv3_gemm_bf16_simt`)
/// against the plain-loop references, bit for bit (one product and one sum rounded per k, in
/// k order, on both sides), at any K, NaN activations propagating.
#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_gemm_dequant_and_bf16_match_references() {
    let Some(dev) = gpu("cuda_gemm_dequant_and_bf16_match_references") else { return };
    use dsv3_kernels::dense::{self, Bf16Weight};
    let strat = (
        proptest::sample::select(&[0usize, 1, 3, 64, 65, 130][..]),
        proptest::sample::select(&[1usize, 7, 127, 128, 129, 576][..]),
        proptest::sample::select(&[1usize, 7, 31, 33, 127, 128, 129, 576, 7168][..]),
        any::<bool>(),
    )
        .prop_flat_map(|(m, n, k, nan)| (Just(GemmShape { m, n, k }), vec_f32(m * k, 4.0), vec_f32(n * k, 0.5), Just(nan)));
    runner(32)
        .run(&strat, |(s, mut a, wf, nan)| {
            if nan && s.m > 1 {
                a[s.k + s.k / 2] = f32::NAN; // row 1
            }
            let ad = dev.upload(&a).unwrap();
            let w = Fp8Weight::quantize(s.n, s.k, &wf).unwrap();
            let wd = dev.upload_fp8_weight(w.view()).unwrap();
            let mut cpu = vec![0f32; s.m * s.n];
            gemm::reference::gemm_dequant(&a, w.view(), s, &mut cpu).unwrap();
            let mut od = dev.upload(&vec![f32::NAN; cpu.len()]).unwrap();
            dev.gemm_dequant(&ad, &wd, s, &mut od).unwrap();
            same_bits("gemm_dequant", &dev.download(&od).unwrap(), &cpu)?;
            dev.gemm(&ad, &wd, s, GemmPath::Reference, &mut od).unwrap();
            same_bits("gemm, Reference path", &dev.download(&od).unwrap(), &cpu)?;
            let wb = Bf16Weight::from_f32(s.n, s.k, &wf).unwrap();
            dense::reference::gemm_bf16(&a, wb.view(), s, &mut cpu).unwrap();
            dev.gemm_bf16(&ad, &dev.upload_bf16_weight(wb.view()).unwrap(), s, &mut od).unwrap();
            same_bits("gemm_bf16", &dev.download(&od).unwrap(), &cpu)
        })
        .unwrap();
}

/// `CudaDevice::gemm` on the fp8 path: bit-exact with the reference fp8 path, and the CPU's
/// errors for a non-finite activation and for K not a multiple of 128.
#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_gemm_fp8_path_matches_cpu() {
    let Some(dev) = gpu("cuda_gemm_fp8_path_matches_cpu") else { return };
    let s = GemmShape { m: 5, n: 300, k: 384 };
    let a: Vec<f32> = (0..s.m * s.k).map(|i| ((i * 7919) % 1001) as f32 / 200.0 - 2.5).collect();
    let wf: Vec<f32> = (0..s.n * s.k).map(|i| ((i * 104729) % 997) as f32 / 2000.0 - 0.25).collect();
    let w = Fp8Weight::quantize(s.n, s.k, &wf).unwrap();
    let wd = dev.upload_fp8_weight(w.view()).unwrap();
    let mut cpu = vec![0f32; s.m * s.n];
    gemm::reference::gemm(&a, w.view(), s, GemmPath::Fp8, &mut cpu).unwrap();
    let mut od = dev.zeros::<f32>(cpu.len()).unwrap();
    dev.gemm(&dev.upload(&a).unwrap(), &wd, s, GemmPath::Fp8, &mut od).unwrap();
    same_bits("gemm, fp8 path", &dev.download(&od).unwrap(), &cpu).unwrap();
    let mut bad = a.clone();
    bad[3 * s.k + 200] = f32::INFINITY;
    let cpu_e = gemm::gemm(&bad, w.view(), s, GemmPath::Fp8, &mut cpu).unwrap_err();
    assert_eq!(dev.gemm(&dev.upload(&bad).unwrap(), &wd, s, GemmPath::Fp8, &mut od).unwrap_err(), cpu_e);
    let s2 = GemmShape { m: 2, n: 3, k: 100 };
    let w2 = Fp8Weight::quantize(3, 100, &[0.25; 300]).unwrap();
    let cpu_e = gemm::gemm(&[0.5; 200], w2.view(), s2, GemmPath::Fp8, &mut [0.0; 6]).unwrap_err();
    let mut od = dev.zeros::<f32>(6).unwrap();
    let g = dev.gemm(&dev.upload(&[0.5f32; 200]).unwrap(), &dev.upload_fp8_weight(w2.view()).unwrap(), s2, GemmPath::Fp8, &mut od);
    assert_eq!(g.unwrap_err(), cpu_e);
}

/// Grouped GEMM, contiguous and masked, both paths, against the plain-loop references bit for
/// bit: empty experts, one-row experts, experts past one 64-row tile; padding rows of the
/// masked layout hold NaN and must be neither read nor left unwritten (zeros). The experts are
/// uploaded one by one and, again, as one stack (`upload_fp8_experts`): these shapes have no
/// sm90 kernel, so both take the simple kernels, the stacked ones at their entries' offsets.
#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_grouped_gemm_matches_reference() {
    let Some(dev) = gpu("cuda_grouped_gemm_matches_reference") else { return };
    let strat = (
        proptest::sample::select(&[1usize, 3, 8][..]),
        proptest::sample::select(&[1usize, 129, 256][..]),
        proptest::sample::select(&[128usize, 256][..]),
        any::<bool>(),
    )
        .prop_flat_map(|(e, n, k, fp8)| {
            (Just((n, k, fp8)), proptest::collection::vec(prop_oneof![Just(0u32), Just(1u32), 2u32..=70], e), vec_f32(e * n * k, 0.5))
        });
    runner(24)
        .run(&strat, |((n, k, fp8), counts, wf)| {
            let path = if fp8 { GemmPath::Fp8 } else { GemmPath::Reference };
            let e = counts.len();
            let ws: Vec<Fp8Weight> = (0..e).map(|i| Fp8Weight::quantize(n, k, &wf[i * n * k..(i + 1) * n * k]).unwrap()).collect();
            let views: Vec<_> = ws.iter().map(|w| w.view()).collect();
            let wds: Vec<_> = ws.iter().map(|w| dev.upload_fp8_weight(w.view()).unwrap()).collect();
            let stacked = dev.upload_fp8_experts(&views).unwrap();
            let wrefs: Vec<_> = wds.iter().collect();
            let srefs: Vec<_> = stacked.iter().collect();
            // Contiguous.
            let mut offsets = vec![0u32];
            for &c in &counts {
                offsets.push(offsets.last().unwrap() + c);
            }
            let rows = *offsets.last().unwrap() as usize;
            let a: Vec<f32> = (0..rows * k).map(|i| ((i * 2654435761) % 4001) as f32 / 1000.0 - 2.0).collect();
            let mut cpu = vec![0f32; rows * n];
            gemm::reference::grouped_contiguous(&a, &offsets, &views, path, &mut cpu).unwrap();
            let mut od = dev.upload(&vec![f32::NAN; cpu.len()]).unwrap();
            dev.grouped_contiguous(&dev.upload(&a).unwrap(), &dev.upload(&offsets).unwrap(), &wrefs, path, &mut od).unwrap();
            same_bits("grouped_contiguous", &dev.download(&od).unwrap(), &cpu)?;
            let mut od = dev.upload(&vec![f32::NAN; cpu.len()]).unwrap();
            dev.grouped_contiguous(&dev.upload(&a).unwrap(), &dev.upload(&offsets).unwrap(), &srefs, path, &mut od).unwrap();
            same_bits("grouped_contiguous, stacked", &dev.download(&od).unwrap(), &cpu)?;
            // Masked, capacity = the largest count + 3, padding rows NaN.
            let cap = *counts.iter().max().unwrap() as usize + 3;
            let mut am = vec![f32::NAN; e * cap * k];
            for (i, w) in offsets.windows(2).enumerate() {
                let (r0, r1) = (w[0] as usize, w[1] as usize);
                am[i * cap * k..(i * cap + r1 - r0) * k].copy_from_slice(&a[r0 * k..r1 * k]);
            }
            let mut cpu = vec![0f32; e * cap * n];
            gemm::reference::grouped_masked(&am, &counts, cap, &views, path, &mut cpu).unwrap();
            let mut od = dev.upload(&vec![f32::NAN; cpu.len()]).unwrap();
            dev.grouped_masked(&dev.upload(&am).unwrap(), &dev.upload(&counts).unwrap(), cap, &wrefs, path, &mut od).unwrap();
            same_bits("grouped_masked", &dev.download(&od).unwrap(), &cpu)?;
            let mut od = dev.upload(&vec![f32::NAN; cpu.len()]).unwrap();
            dev.grouped_masked(&dev.upload(&am).unwrap(), &dev.upload(&counts).unwrap(), cap, &srefs, path, &mut od).unwrap();
            same_bits("grouped_masked, stacked", &dev.download(&od).unwrap(), &cpu)?;
            // A non-finite value in a live row on the fp8 path: the CPU's error, naming the row
            // among the live rows.
            if fp8 && rows > 0 {
                let last = (0..e).rev().find(|&i| counts[i] > 0).unwrap();
                let mut bad = am.clone();
                bad[(last * cap + counts[last] as usize - 1) * k + 5] = f32::NAN;
                let cpu_e = gemm::grouped_masked(&bad, &counts, cap, &views, path, &mut cpu).unwrap_err();
                let g = dev.grouped_masked(&dev.upload(&bad).unwrap(), &dev.upload(&counts).unwrap(), cap, &wrefs, path, &mut od);
                prop_assert_eq!(g.unwrap_err(), cpu_e);
            }
            Ok(())
        })
        .unwrap();
}

/// Bad grouped-GEMM input: the CPU's errors (offsets, counts, expert shapes).
#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_grouped_gemm_bad_input_matches_cpu() {
    let Some(dev) = gpu("cuda_grouped_gemm_bad_input_matches_cpu") else { return };
    let w = Fp8Weight::quantize(4, 128, &[0.5; 512]).unwrap();
    let w2 = Fp8Weight::quantize(5, 128, &[0.5; 640]).unwrap();
    let (wd, wd2) = (dev.upload_fp8_weight(w.view()).unwrap(), dev.upload_fp8_weight(w2.view()).unwrap());
    let a = vec![0.25f32; 3 * 128];
    for offsets in [vec![0u32, 2, 1], vec![1, 2, 3], vec![0, 1, 3, 3]] {
        let cpu = gemm::grouped_contiguous(&a, &offsets, &[w.view(), w.view()], GemmPath::Reference, &mut [0.0; 12]).unwrap_err();
        let mut od = dev.zeros::<f32>(12).unwrap();
        let g = dev.grouped_contiguous(&dev.upload(&a).unwrap(), &dev.upload(&offsets).unwrap(), &[&wd, &wd], GemmPath::Reference, &mut od);
        assert_eq!(g.unwrap_err(), cpu, "offsets {offsets:?}");
    }
    let cpu = gemm::grouped_contiguous(&a, &[0, 1, 3], &[w.view(), w2.view()], GemmPath::Reference, &mut [0.0; 12]).unwrap_err();
    let mut od = dev.zeros::<f32>(12).unwrap();
    let g =
        dev.grouped_contiguous(&dev.upload(&a).unwrap(), &dev.upload(&[0u32, 1, 3]).unwrap(), &[&wd, &wd2], GemmPath::Reference, &mut od);
    assert_eq!(g.unwrap_err(), cpu);
    let cpu = gemm::grouped_masked(&[0.0; 4 * 128], &[1, 3], 2, &[w.view(), w.view()], GemmPath::Fp8, &mut [0.0; 16]).unwrap_err();
    let mut od = dev.zeros::<f32>(16).unwrap();
    let g =
        dev.grouped_masked(&dev.zeros::<f32>(4 * 128).unwrap(), &dev.upload(&[1u32, 3]).unwrap(), 2, &[&wd, &wd], GemmPath::Fp8, &mut od);
    assert_eq!(g.unwrap_err(), cpu);
}
