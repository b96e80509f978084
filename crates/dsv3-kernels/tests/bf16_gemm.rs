//! bf16 GEMM (router, lm_head, eh_proj) against its reference.

mod common;

use common::*;
use dsv3_kernels::KernelError;
use dsv3_kernels::bf16_gemm::{self, Bf16Weight};
use dsv3_kernels::gemm::GemmShape;
use proptest::prelude::*;

fn data(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn fast_matches_reference(m in small_dim(), n in small_dim(), k in small_dim(), seed in any::<u64>()) {
        let w = Bf16Weight::from_f32(n, k, &data(seed, n * k)).unwrap();
        let a = data(seed ^ 0xABCD, m * k);
        let s = GemmShape { m, n, k };
        let (mut fast, mut slow) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
        bf16_gemm::gemm_bf16(&a, w.view(), s, &mut fast).unwrap();
        bf16_gemm::reference::gemm_bf16(&a, w.view(), s, &mut slow).unwrap();
        // Reassociation error is bounded by the sum of |a·w| terms, not by |out| (a single
        // output can cancel to near zero: m = n = 1, k = 277 did).
        let mut abs = vec![0f32; m * n];
        let (aa, wa): (Vec<f32>, Vec<f32>) = (a.iter().map(|v| v.abs()).collect(), w.view().data().iter().map(|v| v.to_f32().abs()).collect());
        bf16_gemm::reference::gemm_bf16(&aa, Bf16Weight::new(n, k, wa.iter().map(|&v| half::bf16::from_f32(v)).collect()).unwrap().view(), s, &mut abs).unwrap();
        for (i, ((f, r), b)) in fast.iter().zip(&slow).zip(&abs).enumerate() {
            prop_assert!((f - r).abs() <= 1e-5 * b.max(1e-30), "out[{i}]: fast {f}, reference {r}, sum |a·w| {b}");
        }
    }

    #[test]
    fn small_integers_are_exact(m in 1usize..9, n in small_dim(), k in small_dim(), seed in any::<u64>()) {
        let w = Bf16Weight::from_f32(n, k, &data(seed, n * k).iter().map(|v| (v * 4.0).round()).collect::<Vec<_>>()).unwrap();
        let a: Vec<f32> = data(seed ^ 1, m * k).iter().map(|v| (v * 4.0).round()).collect();
        let s = GemmShape { m, n, k };
        let (mut fast, mut slow) = (vec![0f32; m * n], vec![0f32; m * n]);
        bf16_gemm::gemm_bf16(&a, w.view(), s, &mut fast).unwrap();
        bf16_gemm::reference::gemm_bf16(&a, w.view(), s, &mut slow).unwrap();
        prop_assert_eq!(fast, slow);
    }
}

#[test]
fn router_shape_and_errors() {
    // The V3 router: 256 experts x 7168.
    let w = Bf16Weight::from_f32(256, 7168, &data(3, 256 * 7168)).unwrap();
    let a = data(4, 2 * 7168);
    let (mut fast, mut slow) = (vec![0f32; 512], vec![0f32; 512]);
    bf16_gemm::gemm_bf16(&a, w.view(), GemmShape { m: 2, n: 256, k: 7168 }, &mut fast).unwrap();
    bf16_gemm::reference::gemm_bf16(&a, w.view(), GemmShape { m: 2, n: 256, k: 7168 }, &mut slow).unwrap();
    let scale = slow.iter().fold(0f32, |x, v| x.max(v.abs()));
    assert!(max_abs_diff(&fast, &slow) <= 2e-5 * scale, "{} vs {scale}", max_abs_diff(&fast, &slow));
    let r = bf16_gemm::gemm_bf16(&a, w.view(), GemmShape { m: 2, n: 255, k: 7168 }, &mut fast);
    assert!(matches!(r, Err(KernelError::Shape { .. })), "{r:?}");
    let r = bf16_gemm::gemm_bf16(&a[1..], w.view(), GemmShape { m: 2, n: 256, k: 7168 }, &mut fast);
    assert!(matches!(r, Err(KernelError::Length { what: "a", .. })), "{r:?}");
    assert!(Bf16Weight::new(2, 2, vec![half::bf16::ZERO; 3]).is_err());
}

/// Each row's result does not depend on the other rows of the batch: M = 2..=9 rows give the
/// bits of the rows computed one at a time (MTP verification and expert-parallel ranks, which
/// route a share of the tokens each, rely on it), on V3's lm_head and router widths and on an
/// odd width.
#[test]
fn rows_are_computed_independently_of_the_batch() {
    for (n, k) in [(1000, 7168), (256, 7168), (77, 1024), (33, 100)] {
        let w = Bf16Weight::from_f32(n, k, &data(n as u64, n * k)).unwrap();
        let a = data(9, 9 * k);
        let mut single = Vec::new();
        for r in 0..9 {
            let mut o = vec![0f32; n];
            bf16_gemm::gemm_bf16(&a[r * k..(r + 1) * k], w.view(), GemmShape { m: 1, n, k }, &mut o).unwrap();
            single.push(o);
        }
        for m in 2..=9 {
            let mut o = vec![0f32; m * n];
            bf16_gemm::gemm_bf16(&a[..m * k], w.view(), GemmShape { m, n, k }, &mut o).unwrap();
            for r in 0..m {
                assert!(o[r * n..(r + 1) * n] == single[r][..], "n {n} k {k}: row {r} of a batch of {m} differs from it alone");
            }
        }
    }
}
