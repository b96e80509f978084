//! Small ops (RMSNorm, SwiGLU, softmax, exp, embedding): every fast function against its
//! reference over edge and DeepSeek-V3 widths, hand-worked cases, extremes and bad input.
//!
//! Tolerances are derived, not guessed (u = 2⁻²⁴, the f32 unit roundoff):
//! * rms_norm: the fast sum of squares over 16 lanes has relative error ≤ (cols/16 + 5)·u
//!   against the f64 sum the reference rounds once; the output sees half of it through the
//!   rsqrt, plus ≤ 4 more roundings. Bound used: ((cols/16 + 5)/2 + 6)·u relative.
//! * silu·up: exp_fast error E plus ≤ 5 roundings against an f64 oracle rounded once.
//! * softmax: per element E + (|x_i − max| + 2)·u (f32 subtraction, then exp) plus the
//!   16-lane sum error (cols/16 + 5)·u plus 3 roundings.

mod common;

use common::*;
use dsv3_kernels::KernelError;
use dsv3_kernels::act::{self, EXP_FAST_MAX_REL_ERR, exp_fast};
use dsv3_kernels::embed::{self, EmbedShape};
use dsv3_kernels::fp8::calc_diff;
use dsv3_kernels::norm::{self, RowsShape};
use half::bf16;
use proptest::prelude::*;

const U: f32 = f32::EPSILON / 2.0;

/// A width: an edge size, a small random one, or a real V3 width.
fn width() -> impl Strategy<Value = usize> {
    prop_oneof![3 => small_dim(), 1 => proptest::sample::select(&[7168usize, 1536, 512][..])]
}

/// rows x cols with data in [-range, range] for `k` buffers of the matrix and one row vector.
fn mats(k: usize, range: f32) -> impl Strategy<Value = (RowsShape, Vec<Vec<f32>>, Vec<f32>)> {
    (0usize..=8, width()).prop_flat_map(move |(r, c)| {
        (Just(RowsShape { rows: r, cols: c }), proptest::collection::vec(vec_f32(r * c, range), k), vec_f32(c, 2.0))
    })
}

fn assert_rel(fast: &[f32], refr: &[f32], rel: f32, abs: f32) -> Result<(), TestCaseError> {
    for (i, (&a, &b)) in fast.iter().zip(refr).enumerate() {
        let tol = rel * b.abs() + abs;
        prop_assert!((a - b).abs() <= tol, "elem {i}: fast {a} ref {b} (tol {tol})");
    }
    Ok(())
}

fn rms_tol(cols: usize) -> f32 {
    ((cols as f32 / 16.0 + 5.0) / 2.0 + 6.0) * U
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn rms_norm_fast_matches_reference((s, xs, w) in mats(1, 10.0)) {
        let mut a = vec![0f32; xs[0].len()];
        let mut b = a.clone();
        norm::rms_norm(&xs[0], &w, s, 1e-6, &mut a).unwrap();
        norm::reference::rms_norm(&xs[0], &w, s, 1e-6, &mut b).unwrap();
        assert_rel(&a, &b, rms_tol(s.cols), 0.0)?;
    }

    #[test]
    fn rms_norm_exact_on_small_ints(r in 0usize..=6, c in width(), seed in any::<u64>()) {
        // Sums of squares of |v| <= 4 are exact in f32 here, so both must agree bit for bit.
        let s = RowsShape::new(r, c).unwrap();
        let mut rng = seed;
        let mut next = || { rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); ((rng >> 33) % 9) as f32 - 4.0 };
        let x: Vec<f32> = (0..r * c).map(|_| next()).collect();
        let w: Vec<f32> = (0..c).map(|_| next()).collect();
        let (mut a, mut b) = (vec![0f32; r * c], vec![0f32; r * c]);
        norm::rms_norm(&x, &w, s, 1e-6, &mut a).unwrap();
        norm::reference::rms_norm(&x, &w, s, 1e-6, &mut b).unwrap();
        prop_assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
    }

    #[test]
    fn add_rms_norm_fast_matches_reference((s, xs, w) in mats(2, 10.0)) {
        let (mut ra, mut rb) = (xs[1].clone(), xs[1].clone());
        let mut a = vec![0f32; xs[0].len()];
        let mut b = a.clone();
        norm::add_rms_norm(&xs[0], &mut ra, &w, s, 1e-6, &mut a).unwrap();
        norm::reference::add_rms_norm(&xs[0], &mut rb, &w, s, 1e-6, &mut b).unwrap();
        prop_assert_eq!(&ra, &rb);
        for (r, (&x, &r0)) in ra.iter().zip(xs[0].iter().zip(&xs[1])) {
            prop_assert_eq!(*r, r0 + x);
        }
        assert_rel(&a, &b, rms_tol(s.cols), 0.0)?;
    }

    #[test]
    fn silu_mul_fast_matches_reference((s, xs, _w) in mats(2, 30.0)) {
        let mut a = vec![0f32; xs[0].len()];
        let mut b = a.clone();
        act::silu_mul(&xs[0], &xs[1], s, &mut a).unwrap();
        act::reference::silu_mul(&xs[0], &xs[1], s, &mut b).unwrap();
        assert_rel(&a, &b, EXP_FAST_MAX_REL_ERR + 6.0 * U, 1e-37)?;
        // The packed [gate | up] layout computes the same values.
        let packed: Vec<f32> = (0..s.rows).flat_map(|r| {
            let c = s.cols;
            xs[0][r * c..(r + 1) * c].iter().chain(&xs[1][r * c..(r + 1) * c]).copied().collect::<Vec<_>>()
        }).collect();
        let mut p = vec![0f32; a.len()];
        act::silu_mul_packed(&packed, s, &mut p).unwrap();
        prop_assert!(p.iter().zip(&a).all(|(x, y)| x.to_bits() == y.to_bits()));
        let mut pr = vec![0f32; a.len()];
        act::reference::silu_mul_packed(&packed, s, &mut pr).unwrap();
        prop_assert!(pr.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    #[test]
    fn softmax_fast_matches_reference_and_sums_to_one((s, xs, _w) in mats(1, 30.0)) {
        let x = &xs[0];
        let mut a = vec![0f32; x.len()];
        let mut b = a.clone();
        act::softmax(x, s, &mut a).unwrap();
        act::reference::softmax(x, s, &mut b).unwrap();
        let c = s.cols;
        let sum_err = (c as f32 / 16.0 + 5.0) * U;
        for r in 0..s.rows {
            let row = &x[r * c..(r + 1) * c];
            let m = row.iter().fold(f32::NEG_INFINITY, |p, &q| p.max(q));
            for i in 0..c {
                let (fa, fb) = (a[r * c + i], b[r * c + i]);
                let tol = (EXP_FAST_MAX_REL_ERR + (row[i] - m).abs() * U + sum_err + 5.0 * U) * fb + 1e-38;
                prop_assert!((fa - fb).abs() <= tol, "row {r} elem {i}: fast {fa} ref {fb}");
            }
            let total: f64 = a[r * c..(r + 1) * c].iter().map(|&v| v as f64).sum();
            prop_assert!((total - 1.0).abs() <= (sum_err + EXP_FAST_MAX_REL_ERR + 70.0 * U) as f64, "row {r} sums to {total}");
        }
        let mut inplace = x.clone();
        act::softmax_inplace(&mut inplace, s).unwrap();
        prop_assert!(inplace.iter().zip(&a).all(|(p, q)| p.to_bits() == q.to_bits()));
    }

    #[test]
    fn embedding_fast_matches_reference(vocab in 1usize..200, dim in width(), n in 0usize..40, seed in any::<u32>()) {
        let s = EmbedShape::new(vocab, dim).unwrap();
        let table: Vec<f32> = (0..vocab * dim).map(|i| (i as f32 * 0.37 + seed as f32).sin()).collect();
        let table16: Vec<bf16> = table.iter().map(|&v| bf16::from_f32(v)).collect();
        let ids: Vec<u32> = (0..n).map(|t| (seed as usize).wrapping_add(t * 7919) as u32 % vocab as u32).collect();
        let (mut a, mut b) = (vec![0f32; n * dim], vec![1f32; n * dim]);
        embed::embedding(&table, s, &ids, &mut a).unwrap();
        embed::reference::embedding(&table, s, &ids, &mut b).unwrap();
        prop_assert_eq!(&a, &b);
        for (t, &id) in ids.iter().enumerate() {
            prop_assert_eq!(&a[t * dim..(t + 1) * dim], &table[id as usize * dim..(id as usize + 1) * dim]);
        }
        embed::embedding(&table16, s, &ids, &mut a).unwrap();
        embed::reference::embedding(&table16, s, &ids, &mut b).unwrap();
        prop_assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
        for (t, &id) in ids.iter().enumerate() {
            for j in 0..dim {
                prop_assert_eq!(a[t * dim + j].to_bits(), table16[id as usize * dim + j].to_f32().to_bits());
            }
        }
    }
}

#[test]
fn large_shapes_take_the_parallel_path_and_match() {
    let s = RowsShape::new(16, 7168).unwrap();
    let n = 16 * 7168;
    let x: Vec<f32> = (0..n).map(|i| ((i * 7 % 1000) as f32 - 500.0) / 37.0).collect();
    let y: Vec<f32> = (0..n).map(|i| ((i * 13 % 997) as f32 - 498.0) / 51.0).collect();
    let w: Vec<f32> = (0..7168).map(|i| 0.5 + (i % 17) as f32 / 16.0).collect();
    let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
    norm::rms_norm(&x, &w, s, 1e-6, &mut a).unwrap();
    norm::reference::rms_norm(&x, &w, s, 1e-6, &mut b).unwrap();
    assert!(max_abs_diff(&a, &b) <= rms_tol(7168) * 4.0 * 14.0, "rms_norm");
    act::silu_mul(&x, &y, s, &mut a).unwrap();
    act::reference::silu_mul(&x, &y, s, &mut b).unwrap();
    assert!(calc_diff(&a, &b) < 1e-12, "silu_mul");
    act::softmax(&x, s, &mut a).unwrap();
    act::reference::softmax(&x, s, &mut b).unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-6, "softmax");
}

#[test]
fn rms_norm_hand_worked() {
    // mean([9, 16]) = 12.5, exact in f32.
    let s = RowsShape::new(1, 2).unwrap();
    let want = [3.0 / 12.5f64.sqrt(), 4.0 / 12.5f64.sqrt()];
    let mut out = [0f32; 2];
    for f in [norm::rms_norm, norm::reference::rms_norm] {
        f(&[3.0, 4.0], &[1.0, 1.0], s, 0.0, &mut out).unwrap();
        for (o, w) in out.iter().zip(want) {
            assert!((*o as f64 - w).abs() <= 3.0 * U as f64 * w, "{o} vs {w}");
        }
        f(&[3.0, 4.0], &[2.0, -0.5], s, 0.0, &mut out).unwrap();
        assert!((out[0] as f64 - 2.0 * want[0]).abs() < 1e-6 && (out[1] as f64 + 0.5 * want[1]).abs() < 1e-6);
    }
    // eps: [0, 0] with eps = 1 gives 0; a constant row c with eps = 0 gives w.
    norm::rms_norm(&[0.0, 0.0], &[1.0, 1.0], s, 1.0, &mut out).unwrap();
    assert_eq!(out, [0.0, 0.0]);
    norm::rms_norm(&[-2.5, -2.5], &[1.0, 3.0], s, 0.0, &mut out).unwrap();
    assert_eq!(out, [-1.0, -3.0]);
    // Fused form: residual [1, 1] + x [2, 3] = [3, 4], kept, and normalised.
    let mut res = [1.0f32, 1.0];
    norm::add_rms_norm(&[2.0, 3.0], &mut res, &[1.0, 1.0], s, 0.0, &mut out).unwrap();
    assert_eq!(res, [3.0, 4.0]);
    assert!((out[0] as f64 - want[0]).abs() < 1e-6);
}

#[test]
fn exp_fast_accuracy_sweep() {
    // Every 61st f32 in [-104, 88.8] (about 37M values; EXP_SWEEP_STRIDE=1 checks all 2.2e9)
    // against the exact exp (f64) and f32::exp. Normal results: relative error <=
    // EXP_FAST_MAX_REL_ERR; subnormal results: absolute error below the smallest normal.
    let stride: u32 = std::env::var("EXP_SWEEP_STRIDE").ok().and_then(|v| v.parse().ok()).unwrap_or(61).max(1);
    let (mut worst, mut worst_libm, mut at) = (0f64, 0f64, 0f32);
    let ranges = [(0u32, (-104.0f32).to_bits(), true), (0u32, 88.8f32.to_bits(), false)];
    for (lo, hi, neg) in ranges {
        let hi = if neg { hi - 0x8000_0000 } else { hi };
        let mut bits = lo;
        while bits <= hi {
            let x = f32::from_bits(if neg { bits | 0x8000_0000 } else { bits });
            let got = exp_fast(x) as f64;
            let exact = (x as f64).exp();
            if exact > f32::MAX as f64 {
                assert!(got.is_infinite() || got >= f32::MAX as f64 * (1.0 - 1e-6), "exp_fast({x}) = {got}");
            } else if exact >= f32::MIN_POSITIVE as f64 {
                let rel = (got - exact).abs() / exact;
                if rel > worst {
                    (worst, at) = (rel, x);
                }
                worst_libm = worst_libm.max((got - x.exp() as f64).abs() / x.exp() as f64);
            } else {
                assert!((got - exact).abs() < f32::MIN_POSITIVE as f64, "exp_fast({x}) = {got}, exact {exact}");
            }
            bits = bits.saturating_add(stride);
            if bits == u32::MAX {
                break;
            }
        }
    }
    println!("exp_fast: max rel err {worst:.3e} at x = {at} (vs f64 exp); {worst_libm:.3e} vs f32::exp");
    assert!(worst <= EXP_FAST_MAX_REL_ERR as f64, "max rel err {worst:e} at {at}");
    assert!(worst_libm <= EXP_FAST_MAX_REL_ERR as f64 + U as f64, "vs f32::exp {worst_libm:e}");
    // Special values.
    assert_eq!(exp_fast(0.0), 1.0);
    assert_eq!(exp_fast(-0.0), 1.0);
    assert_eq!(exp_fast(f32::INFINITY), f32::INFINITY);
    assert_eq!(exp_fast(1e30), f32::INFINITY);
    assert_eq!(exp_fast(89.0), f32::INFINITY);
    assert!(exp_fast(88.72).is_finite());
    assert_eq!(exp_fast(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp_fast(-1e30), 0.0);
    assert_eq!(exp_fast(-200.0), 0.0);
    assert!(exp_fast(f32::NAN).is_nan());
    assert!((exp_fast(1.0) - std::f32::consts::E).abs() <= std::f32::consts::E * EXP_FAST_MAX_REL_ERR);
}

#[test]
fn silu_extremes_are_finite_and_correct() {
    let z = [100.0f32, -100.0, 1e30, -1e30, 0.0, -0.0, 1.0, -1.0, 20.0, -20.0, 88.0, -88.0, 1e38, -1e38, f32::MAX, f32::MIN];
    let up = vec![1.0f32; z.len()];
    let s = RowsShape::new(1, z.len()).unwrap();
    let (mut a, mut b) = (vec![0f32; z.len()], vec![0f32; z.len()]);
    act::silu_mul(&z, &up, s, &mut a).unwrap();
    act::reference::silu_mul(&z, &up, s, &mut b).unwrap();
    for (i, &zi) in z.iter().enumerate() {
        assert!(a[i].is_finite() && b[i].is_finite(), "silu({zi}) = {} / {}", a[i], b[i]);
        let exact = zi as f64 / (1.0 + (-(zi as f64)).exp());
        assert!((a[i] as f64 - exact).abs() <= exact.abs() * 1e-6 + 1e-40, "fast silu({zi}) = {}", a[i]);
        assert!((b[i] as f64 - exact).abs() <= exact.abs() * 1e-7 + 1e-44, "ref silu({zi}) = {}", b[i]);
    }
    assert_eq!(a[0], 100.0);
    assert_eq!(a[2], 1e30);
    assert_eq!(a[3], 0.0);
    assert_eq!(a[4], 0.0);
    assert_eq!(a[12], 1e38);
    assert_eq!(act::silu_fast(f32::INFINITY), f32::INFINITY);
    assert_eq!(act::silu_fast(f32::NEG_INFINITY), 0.0);
    assert_eq!(act::reference::silu(f32::NEG_INFINITY), 0.0);
    assert!(act::silu_fast(f32::NAN).is_nan());
    // NaN-free over the whole finite range, both signs, every power of 2.
    for e in -149..128 {
        for sign in [1.0f32, -1.0] {
            let v = sign * 2f32.powi(e);
            assert!(!act::silu_fast(v).is_nan() && !act::reference::silu(v).is_nan(), "silu({v})");
        }
    }
}

#[test]
fn softmax_special_rows() {
    let ninf = f32::NEG_INFINITY;
    let s = RowsShape::new(4, 4).unwrap();
    let x = [ninf, ninf, ninf, ninf, 0.0, ninf, 0.0, ninf, 5.0, 5.0, 5.0, 5.0, f32::NAN, ninf, ninf, ninf];
    for f in [act::softmax, act::reference::softmax] {
        let mut out = [9f32; 16];
        f(&x, s, &mut out).unwrap();
        assert_eq!(&out[0..4], &[0.25; 4], "all -inf row is uniform");
        assert_eq!(&out[4..8], &[0.5, 0.0, 0.5, 0.0], "masked entries are exactly 0");
        assert_eq!(&out[8..12], &[0.25; 4]);
        assert!(out[12..16].iter().all(|v| v.is_nan()), "NaN propagates");
    }
    let mut one = [123.0f32];
    act::softmax_inplace(&mut one, RowsShape::new(1, 1).unwrap()).unwrap();
    assert_eq!(one, [1.0]);
    // Hand-worked: softmax([0, ln 3]) = [1/4, 3/4].
    let mut out = [0f32; 2];
    act::softmax(&[0.0, 3f32.ln()], RowsShape::new(1, 2).unwrap(), &mut out).unwrap();
    assert!((out[0] - 0.25).abs() < 1e-7 && (out[1] - 0.75).abs() < 1e-7, "{out:?}");
}

#[test]
fn embedding_bad_ids_and_lengths_are_errors() {
    let s = EmbedShape::new(4, 3).unwrap();
    let table = vec![1f32; 12];
    let mut out = vec![7f32; 9];
    let err = embed::embedding(&table, s, &[0, 3, 4], &mut out).unwrap_err();
    match &err {
        KernelError::Invalid { what: "ids", detail, .. } => {
            assert!(detail.contains("position 2") && detail.contains("id 4"), "{detail}")
        }
        e => panic!("wrong error {e:?}"),
    }
    assert_eq!(out, vec![7f32; 9], "nothing written before the check");
    assert!(embed::reference::embedding(&table, s, &[9, 0, 0], &mut out).is_err());
    assert!(embed::embedding(&table, s, &[u32::MAX, 0, 0], &mut out).is_err());
    assert!(matches!(embed::embedding(&table[..11], s, &[0, 1, 2], &mut out), Err(KernelError::Length { .. })));
    assert!(matches!(embed::embedding(&table, s, &[0, 1], &mut out), Err(KernelError::Length { .. })));
    assert!(EmbedShape::new(0, 3).is_err() && EmbedShape::new(3, 0).is_err());
    assert!(matches!(EmbedShape::new(usize::MAX, 2), Err(KernelError::Overflow { .. })));
    let t16 = vec![bf16::ONE; 12];
    assert!(embed::embedding(&t16, s, &[0, 1, 5], &mut out).is_err());
    embed::embedding(&t16, s, &[], &mut []).unwrap();
}

#[test]
fn norm_and_act_bad_shapes_are_errors() {
    let s = RowsShape { rows: 2, cols: 3 };
    let (x, w) = (vec![1f32; 6], vec![1f32; 3]);
    let mut out = vec![0f32; 6];
    let mut res = vec![0f32; 6];
    assert!(matches!(norm::rms_norm(&x[..5], &w, s, 1e-6, &mut out), Err(KernelError::Length { what: "x", .. })));
    assert!(matches!(norm::rms_norm(&x, &w[..2], s, 1e-6, &mut out), Err(KernelError::Length { what: "w", .. })));
    assert!(matches!(norm::rms_norm(&x, &w, s, 1e-6, &mut out[..4]), Err(KernelError::Length { what: "out", .. })));
    assert!(matches!(norm::rms_norm(&x, &w, s, f32::NAN, &mut out), Err(KernelError::Invalid { .. })));
    assert!(matches!(norm::rms_norm(&x, &w, s, -1.0, &mut out), Err(KernelError::Invalid { .. })));
    assert!(norm::reference::rms_norm(&x, &w, s, -1.0, &mut out).is_err());
    assert!(norm::rms_norm(&[], &[], RowsShape { rows: 2, cols: 0 }, 1e-6, &mut []).is_err());
    assert!(matches!(RowsShape::new(usize::MAX, 2), Err(KernelError::Overflow { .. })));
    assert!(norm::add_rms_norm(&x, &mut res[..5], &w, s, 1e-6, &mut out).is_err());
    assert_eq!(res, vec![0f32; 6], "residual untouched on error");
    assert!(norm::reference::add_rms_norm(&x[..5], &mut res, &w, s, 1e-6, &mut out).is_err());
    assert!(act::silu_mul(&x, &x[..5], s, &mut out).is_err());
    assert!(act::silu_mul(&x, &x, s, &mut out[..5]).is_err());
    assert!(act::silu_mul_packed(&x, s, &mut out).is_err(), "packed needs rows * 2 * cols");
    assert!(act::silu_mul_packed(&[0f32; 12], s, &mut out[..3]).is_err());
    assert!(act::reference::silu_mul(&x[..1], &x, s, &mut out).is_err());
    assert!(act::softmax(&x[..5], s, &mut out).is_err());
    assert!(act::softmax_inplace(&mut out[..5], s).is_err());
    assert!(act::reference::softmax(&x, s, &mut out[..1]).is_err());
    assert!(act::softmax(&[], RowsShape { rows: 0, cols: 0 }, &mut []).is_err());
    // Zero rows is valid and does nothing.
    act::softmax(&[], RowsShape::new(0, 5).unwrap(), &mut []).unwrap();
    norm::rms_norm(&[], &w, RowsShape::new(0, 3).unwrap(), 1e-6, &mut []).unwrap();
}
