//! The fp8 GEMM path with a weight's activation scale format (`ScaleFmt::Ue8m0`, V3.1's
//! `scale_fmt: "ue8m0"`), on the CPU backend: plain, grouped contiguous and grouped masked
//! GEMMs against the plain-loop oracle (reference ue8m0 quantiser + reference fp8 GEMM); and
//! the numerical hazard of an all-zero activation tile, which quantises to exact zeros.

mod common;

use common::{Rng, max_abs, max_abs_diff};
use dsv3_kernels::backend::{Backend, Cpu};
use dsv3_kernels::fp8::{self, ActQuantShape, Fp8Weight, ScaleFmt};
use dsv3_kernels::gemm::{self, GemmPath, GemmShape};

/// The oracle: rows quantised by the reference quantiser in `fmt`, then the reference GEMM.
fn oracle(a: &[f32], w: &Fp8Weight, s: GemmShape, fmt: ScaleFmt) -> Vec<f32> {
    let qs = ActQuantShape { rows: s.m, cols: s.k };
    let (mut q, mut sc) = (vec![0u8; a.len()], vec![0f32; s.m * qs.tiles()]);
    fp8::reference::act_quant(a, qs, fmt, &mut q, &mut sc).unwrap();
    let mut out = vec![0f32; s.m * s.n];
    gemm::reference::gemm_fp8(&q, &sc, w.view(), s, &mut out).unwrap();
    out
}

fn weight(rng: &mut Rng, n: usize, k: usize, fmt: ScaleFmt) -> Fp8Weight {
    Fp8Weight::quantize(n, k, &rng.vec(n * k, 1.0)).unwrap().with_act_scale_fmt(fmt)
}

#[test]
fn ue8m0_weights_quantise_activations_with_power_of_two_scales() {
    let mut rng = Rng::new(1);
    let s = GemmShape { m: 5, n: 200, k: 384 };
    // Activations of mixed magnitudes, so float and ue8m0 scales differ in most tiles.
    let a: Vec<f32> = rng.vec(s.m * s.k, 1.0).iter().enumerate().map(|(i, v)| v * (1.0 + (i % 7) as f32 * 0.37)).collect();
    let w = weight(&mut rng, s.n, s.k, ScaleFmt::Ue8m0);
    let mut got = vec![0f32; s.m * s.n];
    Cpu.gemm(&a, &w, s, GemmPath::Fp8, &mut got).unwrap();
    let want = oracle(&a, &w, s, ScaleFmt::Ue8m0);
    let err = max_abs_diff(&got, &want) / max_abs(&want);
    assert!(err <= 1e-5, "ue8m0 GEMM vs oracle: {err:e}");
    // The format is used: the default-format result differs.
    let float = oracle(&a, &w, s, ScaleFmt::Float);
    assert!(max_abs_diff(&float, &want) / max_abs(&want) > 1e-4, "ue8m0 and float quantisation should differ here");
    // The reference path ignores the activation format (no activation quantisation).
    let (mut r1, mut r2) = (vec![0f32; s.m * s.n], vec![0f32; s.m * s.n]);
    Cpu.gemm(&a, &w, s, GemmPath::Reference, &mut r1).unwrap();
    Cpu.gemm(&a, &w.clone().with_act_scale_fmt(ScaleFmt::Float), s, GemmPath::Reference, &mut r2).unwrap();
    assert_eq!(r1, r2);
    assert!(Cpu.supports_act_scale_fmt(ScaleFmt::Ue8m0));
}

#[test]
fn ue8m0_grouped_gemms_match_per_expert_oracle() {
    let mut rng = Rng::new(2);
    let (n, k) = (130, 256);
    let ws: Vec<Fp8Weight> = (0..3).map(|_| weight(&mut rng, n, k, ScaleFmt::Ue8m0)).collect();
    let refs: Vec<&Fp8Weight> = ws.iter().collect();
    let counts = [3u32, 0, 5];
    // Contiguous.
    let offsets = [0u32, 3, 3, 8];
    let a = rng.vec(8 * k, 2.0);
    let mut got = vec![0f32; 8 * n];
    Cpu.grouped_gemm_contiguous(&a, &offsets.to_vec(), &refs, GemmPath::Fp8, &mut got).unwrap();
    for e in 0..3 {
        let (r0, r1) = (offsets[e] as usize, offsets[e + 1] as usize);
        let want = oracle(&a[r0 * k..r1 * k], &ws[e], GemmShape { m: r1 - r0, n, k }, ScaleFmt::Ue8m0);
        assert!(max_abs_diff(&got[r0 * n..r1 * n], &want) <= 1e-5 * max_abs(&want).max(1.0), "contiguous expert {e}");
    }
    // Masked: capacity 5, rows past an expert's count are zero.
    let cap = 5;
    let am = rng.vec(3 * cap * k, 2.0);
    let mut gm = vec![7f32; 3 * cap * n];
    Cpu.grouped_gemm_masked(&am, &counts.to_vec(), cap, &refs, GemmPath::Fp8, &mut gm).unwrap();
    for e in 0..3 {
        let rows = counts[e] as usize;
        let want = oracle(&am[e * cap * k..e * cap * k + rows * k], &ws[e], GemmShape { m: rows, n, k }, ScaleFmt::Ue8m0);
        let o = &gm[e * cap * n..(e + 1) * cap * n];
        assert!(max_abs_diff(&o[..rows * n], &want) <= 1e-5 * max_abs(&want).max(1.0), "masked expert {e}");
        assert!(o[rows * n..].iter().all(|&v| v == 0.0), "masked expert {e}: rows past the count are zero");
    }
}

/// An all-zero activation tile gets the floor scale (finite, > 0) and codes 0, in both scale
/// formats, on the reference and fast quantisers; the fp8 GEMM of an all-zero row is exactly
/// zero, not NaN.
#[test]
fn all_zero_activation_tiles_quantise_to_zero_not_nan() {
    let (rows, cols) = (3, 384);
    let mut a = Rng::new(3).vec(rows * cols, 1.0);
    a[cols..2 * cols].fill(0.0); // row 1 all zero
    a[128..256].fill(0.0); // one zero tile in row 0
    let qs = ActQuantShape { rows, cols };
    for fmt in [ScaleFmt::Float, ScaleFmt::Ue8m0] {
        for fast in [false, true] {
            let (mut q, mut sc) = (vec![0xFFu8; a.len()], vec![f32::NAN; rows * 3]);
            if fast {
                fp8::act_quant(&a, qs, fmt, &mut q, &mut sc).unwrap();
            } else {
                fp8::reference::act_quant(&a, qs, fmt, &mut q, &mut sc).unwrap();
            }
            assert!(sc.iter().all(|s| s.is_finite() && *s > 0.0), "{fmt:?}: scales {sc:?}");
            assert!(q[cols..2 * cols].iter().chain(&q[128..256]).all(|&c| c == 0), "{fmt:?}: zero tiles encode to code 0");
        }
        let w = weight(&mut Rng::new(4), 64, cols, fmt);
        let mut out = vec![f32::NAN; rows * 64];
        Cpu.gemm(&a, &w, GemmShape { m: rows, n: 64, k: cols }, GemmPath::Fp8, &mut out).unwrap();
        assert!(out.iter().all(|v| v.is_finite()), "{fmt:?}: finite output");
        assert!(out[64..128].iter().all(|&v| v == 0.0), "{fmt:?}: an all-zero row gives exact zeros");
    }
}
