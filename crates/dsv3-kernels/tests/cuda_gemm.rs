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
