//! Fast GEMM kernels against the plain-loop references: dense (both paths), grouped contiguous
//! and grouped masked, exact small-integer cases, real DeepSeek-V3 shapes, and bad shapes.

mod common;

use common::*;
use dsv3_kernels::KernelError;
use dsv3_kernels::backend::{Backend, Cpu};
use dsv3_kernels::fp8::{self, ActQuantShape, Fp8Weight, ScaleFmt, calc_diff};
use dsv3_kernels::gemm::{self, GemmPath, GemmShape, reference};
use proptest::prelude::*;

use common::Rng; // not proptest's `Rng` trait

fn random_weight(rng: &mut Rng, n: usize, k: usize) -> Fp8Weight {
    Fp8Weight::quantize(n, k, &rng.vec(n * k, 1.0)).unwrap()
}

/// A weight whose codes are small integers and whose scales are powers of two, so that with
/// small-integer activations every sum is exact and any summation order gives the same bits.
fn integer_weight(rng: &mut Rng, n: usize, k: usize) -> Fp8Weight {
    // Codes of 0, ±1, ±2, ±3: 0x00, 0x38/0xB8, 0x40/0xC0, 0x44/0xC4.
    const CODES: [u8; 7] = [0x00, 0x38, 0xB8, 0x40, 0xC0, 0x44, 0xC4];
    let data = (0..n * k).map(|_| CODES[((rng.f32() + 1.0) * 3.5) as usize % 7]).collect();
    let scales = (0..n.div_ceil(128) * k.div_ceil(128)).map(|i| [0.5f32, 1.0, 2.0, 4.0][i % 4]).collect();
    Fp8Weight::new(n, k, data, scales).unwrap()
}

fn both(a: &[f32], w: &Fp8Weight, s: GemmShape, path: GemmPath) -> (Vec<f32>, Vec<f32>) {
    let (mut fast, mut slow) = (vec![f32::NAN; s.m * s.n], vec![f32::NAN; s.m * s.n]);
    gemm::gemm(a, w.view(), s, path, &mut fast).unwrap();
    reference::gemm(a, w.view(), s, path, &mut slow).unwrap();
    (fast, slow)
}

/// `W` with every code's sign bit cleared: `|W|` (the scales are positive).
fn abs_weight(w: &Fp8Weight) -> Fp8Weight {
    let v = w.view();
    Fp8Weight::new(v.rows(), v.cols(), v.data().iter().map(|c| c & 0x7F).collect(), v.scale_inv().to_vec()).unwrap()
}

fn abs(a: &[f32]) -> Vec<f32> {
    a.iter().map(|v| v.abs()).collect()
}

/// `Σ_k |a[m,k]|·|w[n,k]|` per output: what bounds the error of summing in another order (the
/// output itself can cancel to near zero, so |out| cannot).
fn abs_bound(a: &[f32], w: &Fp8Weight, s: GemmShape) -> Vec<f32> {
    let mut out = vec![0f32; s.m * s.n];
    reference::gemm(&abs(a), abs_weight(w).view(), s, GemmPath::Reference, &mut out).unwrap();
    out
}

/// Max over outputs of |fast - ref| / bound (f32 sums of up to 16K terms in another order).
fn rel_err(fast: &[f32], slow: &[f32], bound: &[f32]) -> f32 {
    fast.iter().zip(slow).zip(bound).fold(0f32, |m, ((f, s), b)| m.max((f - s).abs() / b.max(1e-30)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn integer_cases_are_bit_exact(m in small_dim(), n in small_dim(), k in small_dim(), seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let w = integer_weight(&mut rng, n, k);
        let a: Vec<f32> = (0..m * k).map(|_| (rng.f32() * 4.0).round()).collect();
        let (fast, slow) = both(&a, &w, GemmShape { m, n, k }, GemmPath::Reference);
        prop_assert_eq!(fast, slow);
    }

    #[test]
    fn reference_path_matches(m in small_dim(), n in small_dim(), k in small_dim(), seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let w = random_weight(&mut rng, n, k);
        let a = rng.vec(m * k, 1.0);
        let s = GemmShape { m, n, k };
        let (fast, slow) = both(&a, &w, s, GemmPath::Reference);
        prop_assert!(fast.iter().all(|v| v.is_finite()));
        let e = rel_err(&fast, &slow, &abs_bound(&a, &w, s));
        prop_assert!(e < 1e-5, "rel err {e}");
    }

    #[test]
    fn fp8_path_matches(m in small_dim(), n in small_dim(), kb in 1usize..5, seed in any::<u64>()) {
        let k = kb * 128;
        let mut rng = Rng::new(seed);
        let w = random_weight(&mut rng, n, k);
        let a = rng.vec(m * k, 1.0);
        let s = GemmShape { m, n, k };
        let (fast, slow) = both(&a, &w, s, GemmPath::Fp8);
        // The quantised activation is within 1/16 of a (plus the amax floor): 2 x the bound.
        let e = rel_err(&fast, &slow, &abs_bound(&a, &w, s));
        prop_assert!(e < 2e-5, "rel err {e}");
        // Against the reference path the only difference is the activation's quantisation,
        // whose error per element is at most max(|a|/16, scale/1024) (half an ulp of E4M3):
        // each output must lie within the sum of those bounds times |w|.
        let (exact, _) = both(&a, &w, s, GemmPath::Reference);
        let wd = w.view().dequantize();
        for r in 0..m {
            let row = &a[r * k..(r + 1) * k];
            let tile_scale: Vec<f32> = row.chunks(128).map(|t| t.iter().fold(0f32, |x, v| x.max(v.abs())).max(1e-4) / 448.0).collect();
            for c in 0..n {
                let bound: f32 = (0..k).map(|i| (row[i].abs() / 16.0).max(tile_scale[i / 128] / 1024.0) * wd[c * k + i].abs()).sum();
                let err = (fast[r * n + c] - exact[r * n + c]).abs();
                prop_assert!(err <= bound * 1.001 + 1e-6, "row {r} col {c}: err {err} > bound {bound}");
            }
        }
    }
}

#[test]
fn real_v3_shapes_small_m() {
    let mut rng = Rng::new(7);
    // Every (N, K) of DeepSeek-V3 that the model multiplies by, at M = 1 (decode), 5 (both on
    // the matrix-vector path with AVX-512) and 20 (the tile path: one full and one partial
    // group of 16 rows). The full reference is too slow for CI at these sizes, so every row
    // of the output is checked on a sample of columns against the docs/model.md §4.2 / §4.4 formula
    // evaluated in f64.
    for (n, k) in [(2112, 7168), (576, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)] {
        let w = random_weight(&mut rng, n, k);
        let v = w.view();
        for m in [1, 5, 20] {
            let a = rng.vec(m * k, 1.0);
            let mut outs = Vec::new();
            for path in [GemmPath::Reference, GemmPath::Fp8] {
                let mut fast = vec![f32::NAN; m * n];
                gemm::gemm(&a, v, GemmShape { m, n, k }, path, &mut fast).unwrap();
                // The activation as the path sees it: itself, or quantised and dequantised.
                let a_used: Vec<f32> = match path {
                    GemmPath::Reference => a.clone(),
                    GemmPath::Fp8 => {
                        let shape = dsv3_kernels::fp8::ActQuantShape { rows: m, cols: k };
                        let (mut q, mut s) = (vec![0u8; m * k], vec![0f32; m * k / 128]);
                        dsv3_kernels::fp8::reference::act_quant(&a, shape, Default::default(), &mut q, &mut s).unwrap();
                        (0..m * k).map(|i| dsv3_kernels::fp8::decode_e4m3(q[i]) * s[i / 128]).collect()
                    }
                };
                let mut max_err = 0f64;
                let mut max_ref = 1e-30f64;
                for col in (0..n).step_by(n / 61) {
                    for r in 0..m {
                        let want: f64 = (0..k)
                            .map(|c| {
                                a_used[r * k + c] as f64
                                    * dsv3_kernels::fp8::decode_e4m3(v.data()[col * k + c]) as f64
                                    * v.scale_at(col, c) as f64
                            })
                            .sum();
                        max_err = max_err.max((fast[r * n + col] as f64 - want).abs());
                        max_ref = max_ref.max(want.abs());
                    }
                }
                assert!(max_err / max_ref < 1e-5, "{n}x{k} m={m} {path:?}: rel err {}", max_err / max_ref);
                assert!(fast.iter().all(|x| x.is_finite()));
                outs.push(fast);
            }
            // The fp8 path against the reference path over the whole output: DeepGEMM's bound.
            let d = calc_diff(&outs[1], &outs[0]);
            assert!(d < 1e-3, "{n}x{k} m={m}: calc_diff(fp8, reference) = {d}");
        }
    }
}

fn random_offsets(rng: &mut Rng, experts: usize, max_rows: usize) -> Vec<u32> {
    let mut off = vec![0u32];
    for e in 0..experts {
        // A third of the experts get no rows; the rest up to max_rows.
        let rows = if e % 3 == 1 { 0 } else { ((rng.f32() + 1.0) * 0.5 * max_rows as f32) as u32 };
        off.push(off[e] + rows);
    }
    off
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn grouped_contiguous_matches(experts in 1usize..9, max_rows in 0usize..40, n in small_dim(), kb in 1usize..3, fp8 in any::<bool>(), seed in any::<u64>()) {
        let (k, path) = (kb * 128, if fp8 { GemmPath::Fp8 } else { GemmPath::Reference });
        let mut rng = Rng::new(seed);
        let ws: Vec<Fp8Weight> = (0..experts).map(|_| random_weight(&mut rng, n, k)).collect();
        let views: Vec<_> = ws.iter().map(|w| w.view()).collect();
        let off = random_offsets(&mut rng, experts, max_rows);
        let rows = off[experts] as usize;
        let a = rng.vec(rows * k, 1.0);
        let (mut fast, mut slow) = (vec![f32::NAN; rows * n], vec![f32::NAN; rows * n]);
        gemm::grouped_contiguous(&a, &off, &views, path, &mut fast).unwrap();
        reference::grouped_contiguous(&a, &off, &views, path, &mut slow).unwrap();
        let abs_ws: Vec<Fp8Weight> = ws.iter().map(abs_weight).collect();
        let mut bound = vec![0f32; rows * n];
        reference::grouped_contiguous(&abs(&a), &off, &abs_ws.iter().map(|w| w.view()).collect::<Vec<_>>(), GemmPath::Reference, &mut bound).unwrap();
        prop_assert!(rel_err(&fast, &slow, &bound) < 2e-5);
    }

    /// The paired grouped GEMM (gate and up in one pass) gives each set the bits of its own
    /// grouped GEMM.
    #[test]
    fn grouped_contiguous_pair_is_two_grouped_gemms(experts in 1usize..9, max_rows in 0usize..20, n in small_dim(), fp8 in any::<bool>(), seed in any::<u64>()) {
        let (k, path) = (128, if fp8 { GemmPath::Fp8 } else { GemmPath::Reference });
        let mut rng = Rng::new(seed);
        let ws: Vec<Vec<Fp8Weight>> = (0..2).map(|_| (0..experts).map(|_| random_weight(&mut rng, n, k)).collect()).collect();
        let views: Vec<Vec<_>> = ws.iter().map(|set| set.iter().map(|w| w.view()).collect()).collect();
        let off = random_offsets(&mut rng, experts, max_rows);
        let rows = off[experts] as usize;
        let a = rng.vec(rows * k, 1.0);
        let (mut p0, mut p1) = (vec![f32::NAN; rows * n], vec![f32::NAN; rows * n]);
        gemm::grouped_contiguous_pair(&a, &off, [&views[0], &views[1]], path, [&mut p0, &mut p1]).unwrap();
        for (set, got) in views.iter().zip([&p0, &p1]) {
            let mut want = vec![f32::NAN; rows * n];
            gemm::grouped_contiguous(&a, &off, set, path, &mut want).unwrap();
            prop_assert_eq!(got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        }
    }

    #[test]
    fn grouped_masked_matches(experts in 1usize..9, cap in 1usize..24, n in small_dim(), fp8 in any::<bool>(), seed in any::<u64>()) {
        let (k, path) = (256, if fp8 { GemmPath::Fp8 } else { GemmPath::Reference });
        let mut rng = Rng::new(seed);
        let ws: Vec<Fp8Weight> = (0..experts).map(|_| random_weight(&mut rng, n, k)).collect();
        let views: Vec<_> = ws.iter().map(|w| w.view()).collect();
        let counts: Vec<u32> = (0..experts).map(|e| if e % 4 == 2 { 0 } else { ((rng.f32() + 1.0) * 0.5 * cap as f32) as u32 }).collect();
        // Rows past each count hold garbage that must not leak into the result.
        let a: Vec<f32> = rng.vec(experts * cap * k, 1.0).iter().map(|v| v * 1e6).collect();
        let (mut fast, mut slow) = (vec![f32::NAN; experts * cap * n], vec![f32::NAN; experts * cap * n]);
        gemm::grouped_masked(&a, &counts, cap, &views, path, &mut fast).unwrap();
        reference::grouped_masked(&a, &counts, cap, &views, path, &mut slow).unwrap();
        prop_assert!(fast.iter().all(|v| v.is_finite()));
        let abs_ws: Vec<Fp8Weight> = ws.iter().map(abs_weight).collect();
        let mut bound = vec![0f32; experts * cap * n];
        reference::grouped_masked(&abs(&a), &counts, cap, &abs_ws.iter().map(|w| w.view()).collect::<Vec<_>>(), GemmPath::Reference, &mut bound).unwrap();
        prop_assert!(rel_err(&fast, &slow, &bound) < 2e-5);
        for e in 0..experts {
            let dead = &fast[(e * cap + counts[e] as usize) * n..(e + 1) * cap * n];
            prop_assert!(dead.iter().all(|&v| v == 0.0), "rows past the count are zero");
        }
    }
}

#[test]
fn grouped_rows_go_to_their_own_expert() {
    // Expert e's weight is (e+1) * identity-like: output row r is (e+1) * a[r] (exact).
    let (n, k, experts) = (128, 128, 4);
    let ws: Vec<Fp8Weight> = (0..experts)
        .map(|e| {
            let mut codes = vec![0u8; n * k];
            (0..n).for_each(|i| codes[i * k + i] = 0x38); // 1.0, times the block scale e+1
            Fp8Weight::new(n, k, codes, vec![(e + 1) as f32]).unwrap()
        })
        .collect();
    let views: Vec<_> = ws.iter().map(|w| w.view()).collect();
    let off = [0u32, 2, 2, 5, 6];
    let a: Vec<f32> = (0..6 * k).map(|i| (i % 5) as f32).collect();
    let mut out = vec![0f32; 6 * n];
    gemm::grouped_contiguous(&a, &off, &views, GemmPath::Reference, &mut out).unwrap();
    for (r, e) in [(0, 0), (1, 0), (2, 2), (3, 2), (4, 2), (5, 3)] {
        for c in 0..n {
            assert_eq!(out[r * n + c], (e + 1) as f32 * a[r * k + c], "row {r} col {c}");
        }
    }
}

#[test]
fn bad_shapes_are_typed_errors() {
    let w = Fp8Weight::quantize(16, 129, &vec![0.5; 16 * 129]).unwrap();
    let mut out = vec![0f32; 2 * 16];
    let s = GemmShape { m: 2, n: 16, k: 129 };
    assert!(matches!(gemm::gemm(&[0.0; 2 * 129], w.view(), s, GemmPath::Fp8, &mut out), Err(KernelError::Shape { .. })));
    assert!(matches!(gemm::gemm(&[0.0; 2 * 128], w.view(), s, GemmPath::Reference, &mut out), Err(KernelError::Length { what: "a", .. })));
    assert!(matches!(
        gemm::gemm(&[0.0; 2 * 129], w.view(), GemmShape { n: 17, ..s }, GemmPath::Reference, &mut out),
        Err(KernelError::Shape { .. })
    ));
    assert!(matches!(
        gemm::gemm(&[0.0; 2 * 129], w.view(), s, GemmPath::Reference, &mut out[1..]),
        Err(KernelError::Length { what: "out", .. })
    ));
    let views = [w.view(), w.view()];
    let mut out = vec![0f32; 3 * 16];
    assert!(matches!(
        gemm::grouped_contiguous(&[0.0; 3 * 129], &[0, 2, 1], &views, GemmPath::Reference, &mut out),
        Err(KernelError::Invalid { what: "offsets", .. })
    ));
    assert!(matches!(
        gemm::grouped_contiguous(&[0.0; 3 * 129], &[0, 3], &views, GemmPath::Reference, &mut out),
        Err(KernelError::Length { what: "offsets", .. })
    ));
    assert!(matches!(
        gemm::grouped_masked(&[0.0; 2 * 2 * 129], &[1, 3], 2, &views, GemmPath::Reference, &mut vec![0.0; 4 * 16]),
        Err(KernelError::Invalid { what: "counts", .. })
    ));
    assert!(matches!(gemm::grouped_contiguous(&[], &[0], &[], GemmPath::Reference, &mut []), Err(KernelError::Shape { .. })));
    // A NaN activation on the fp8 path is detected by the quantiser and named.
    let mut a = vec![0.5f32; 2 * 128];
    a[130] = f32::NAN;
    let w = Fp8Weight::quantize(16, 128, &vec![0.5; 16 * 128]).unwrap();
    let r = gemm::gemm(&a, w.view(), GemmShape { m: 2, n: 16, k: 128 }, GemmPath::Fp8, &mut [0.0; 32]);
    assert!(matches!(&r, Err(KernelError::Invalid { op: "gemm", what: "a", detail }) if detail.contains("row 1")), "{r:?}");
}

/// `Backend::gemm_pair` on the CPU (one pass) gives each weight the bits of its own GEMM, on
/// the matrix-vector path (m <= 8) and the tile path, both numeric paths.
#[test]
fn gemm_pair_is_two_gemms() {
    let mut rng = Rng::new(5);
    let (n, k) = (96, 256);
    let (w0, w1) = (random_weight(&mut rng, n, k), random_weight(&mut rng, n, k));
    for m in [1, 3, 9, 40] {
        for path in [GemmPath::Reference, GemmPath::Fp8] {
            let a = rng.vec(m * k, 1.0);
            let s = GemmShape { m, n, k };
            let (mut p0, mut p1) = (vec![0f32; m * n], vec![0f32; m * n]);
            Cpu.gemm_pair(&a, [&w0, &w1], s, path, [&mut p0, &mut p1]).unwrap();
            for (w, got) in [(&w0, &p0), (&w1, &p1)] {
                let mut want = vec![0f32; m * n];
                Cpu.gemm(&a, w, s, path, &mut want).unwrap();
                assert_eq!(
                    got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    "m {m} {path:?}"
                );
            }
        }
    }
    let mut short = vec![0f32; 5];
    let e = Cpu.gemm_pair(&rng.vec(k, 1.0), [&w0, &w1], GemmShape { m: 1, n, k }, GemmPath::Reference, [&mut vec![0f32; n], &mut short]);
    assert!(matches!(e, Err(KernelError::Length { .. })), "{e:?}");
}

#[test]
fn paired_grouped_gemm_refuses_sets_of_different_widths() {
    let mut rng = Rng::new(3);
    let (w0, w1) = (random_weight(&mut rng, 16, 128), random_weight(&mut rng, 32, 128));
    let (a, off) = (rng.vec(2 * 128, 1.0), [0u32, 2]);
    let (mut o0, mut o1) = (vec![0f32; 2 * 16], vec![0f32; 2 * 16]);
    let e = gemm::grouped_contiguous_pair(&a, &off, [&[w0.view()], &[w1.view()]], GemmPath::Reference, [&mut o0, &mut o1]).unwrap_err();
    assert!(matches!(e, KernelError::Length { .. } | KernelError::Shape { .. }), "{e}");
}

#[test]
fn empty_m_is_fine() {
    let w = Fp8Weight::quantize(16, 128, &vec![0.5; 16 * 128]).unwrap();
    for path in [GemmPath::Reference, GemmPath::Fp8] {
        gemm::gemm(&[], w.view(), GemmShape { m: 0, n: 16, k: 128 }, path, &mut []).unwrap();
    }
}

fn quantized(a: &[f32], m: usize, k: usize, fmt: ScaleFmt) -> (Vec<u8>, Vec<f32>) {
    let shape = ActQuantShape { rows: m, cols: k };
    let (mut q, mut sc) = (vec![0u8; m * k], vec![0f32; m * shape.tiles()]);
    fp8::act_quant(a, shape, fmt, &mut q, &mut sc).unwrap();
    (q, sc)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// A pre-quantised activation (either scale format) through the fast kernel equals the
    /// reference formula on the same codes and scales, and on `Float` scales it is exactly
    /// what the fp8 path of `Backend::gemm` computes (which quantises the same way).
    #[test]
    fn quantized_activations_match_the_reference(m in small_dim(), n in small_dim(), kb in 1usize..4, ue8m0 in any::<bool>(), seed in any::<u64>()) {
        let k = kb * 128;
        let mut rng = Rng::new(seed);
        let w = random_weight(&mut rng, n, k);
        let a = rng.vec(m * k, 1.0);
        let s = GemmShape { m, n, k };
        let fmt = if ue8m0 { ScaleFmt::Ue8m0 } else { ScaleFmt::Float };
        let (q, sc) = quantized(&a, m, k, fmt);
        let (mut fast, mut slow) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
        Cpu.gemm_quantized(&q, &sc, &w, s, &mut fast).unwrap();
        reference::gemm_fp8(&q, &sc, w.view(), s, &mut slow).unwrap();
        let dq: Vec<f32> = q.iter().enumerate().map(|(i, &c)| fp8::decode_e4m3(c) * sc[(i / k) * kb + (i % k) / 128]).collect();
        let e = rel_err(&fast, &slow, &abs_bound(&dq, &w, s));
        prop_assert!(e < 2e-5, "rel err {e}");
        if !ue8m0 {
            let mut via_gemm = vec![f32::NAN; m * n];
            Cpu.gemm(&a.clone(), &w, s, GemmPath::Fp8, &mut via_gemm).unwrap();
            prop_assert_eq!(fast.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), via_gemm.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        }
    }
}

#[test]
fn quantized_activations_are_checked() {
    let (m, n, k) = (2, 3, 128);
    let w = Fp8Weight::new(n, k, vec![0x38; n * k], vec![1.0]).unwrap();
    let s = GemmShape { m, n, k };
    let (q, sc) = quantized(&vec![1.0; m * k], m, k, ScaleFmt::Ue8m0);
    let mut out = vec![0f32; m * n];
    gemm::gemm_fp8_quantized(&q, &sc, w.view(), s, &mut out).unwrap();
    assert!(out.iter().all(|&v| v == 128.0), "{out:?}");
    let mut bad = q.clone();
    bad[k + 5] = 0xFF;
    let e = gemm::gemm_fp8_quantized(&bad, &sc, w.view(), s, &mut out).unwrap_err();
    assert!(matches!(&e, KernelError::Invalid { what: "a_q", detail, .. } if detail.contains("row 1, column 5")), "{e}");
    for v in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let mut bad = sc.clone();
        bad[1] = v;
        let e = gemm::gemm_fp8_quantized(&q, &bad, w.view(), s, &mut out).unwrap_err();
        assert!(matches!(&e, KernelError::Invalid { what: "a_s", detail, .. } if detail.contains("row 1, tile 0")), "{e}");
    }
    assert!(matches!(gemm::gemm_fp8_quantized(&q, &sc[..1], w.view(), s, &mut out), Err(KernelError::Length { what: "a_s", .. })));
    let w100 = Fp8Weight::new(n, 100, vec![0x38; n * 100], vec![1.0]).unwrap();
    let r = gemm::gemm_fp8_quantized(&q[..m * 100], &sc, w100.view(), GemmShape { m, n, k: 100 }, &mut out);
    assert!(matches!(r, Err(KernelError::Shape { .. })), "k % 128 != 0: {r:?}");
}
