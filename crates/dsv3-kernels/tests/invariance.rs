//! Batch invariance of the kernels a model step runs: a row's result must not depend on how
//! many rows share the call, which other rows (sequences, experts) they are, or how a prompt
//! is cut into steps. Continuous batching relies on it: a request served in a batch must get
//! the bits it gets alone. Every check is bit for bit, on whichever ISA path the process runs
//! (`scripts/test.sh` runs this file at the AVX-512, AVX2 and portable levels).

mod common;

use common::{Rng, small_dim};
use dsv3_kernels::fp8::Fp8Weight;
use dsv3_kernels::gemm::{self, GemmPath, GemmShape};
use proptest::prelude::*;

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Row counts on both sides of every kernel switch (matrix-vector chunks of 4 and 8 rows, the
/// 16-row groups and 64-row tasks of the tile path).
fn rows() -> impl Strategy<Value = usize> {
    prop_oneof![2 => 1usize..=10, 2 => 11usize..=40, 1 => 60usize..=70]
}

/// K: whole 128-blocks (the fp8 path's requirement) or a ragged width.
fn k_dim() -> impl Strategy<Value = usize> {
    prop_oneof![(1usize..=3).prop_map(|b| b * 128), small_dim(), 129usize..=400]
}

fn path_for(k: usize, fp8: bool) -> GemmPath {
    if fp8 && k.is_multiple_of(128) { GemmPath::Fp8 } else { GemmPath::Reference }
}

/// `a[r]` (one `k`-wide row) times `w`, as a 1-row dense GEMM.
fn one_row(a: &[f32], w: &Fp8Weight, path: GemmPath) -> Vec<f32> {
    let (n, k) = (w.rows(), w.cols());
    let mut out = vec![f32::NAN; n];
    gemm::gemm(a, w.view(), GemmShape { m: 1, n, k }, path, &mut out).unwrap();
    out
}

fn weights(rng: &mut Rng, experts: usize, n: usize, k: usize) -> Vec<Fp8Weight> {
    (0..experts).map(|_| Fp8Weight::quantize(n, k, &rng.vec(n * k, 1.0)).unwrap()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Each row of an M-row dense GEMM equals the 1-row GEMM of that row, on both paths.
    #[test]
    fn gemm_rows_equal_one_row_gemms(m in rows(), n in small_dim(), k in k_dim(), fp8 in any::<bool>(), seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let path = path_for(k, fp8);
        let w = &weights(&mut rng, 1, n, k)[0];
        let a = rng.vec(m * k, 1.0);
        let mut out = vec![f32::NAN; m * n];
        gemm::gemm(&a, w.view(), GemmShape { m, n, k }, path, &mut out).unwrap();
        for r in 0..m {
            prop_assert!(same_bits(&out[r * n..(r + 1) * n], &one_row(&a[r * k..(r + 1) * k], w, path)), "row {} of {} ({:?})", r, m, path);
        }
    }

    /// Each row of a contiguous grouped GEMM equals the 1-row dense GEMM with its expert's
    /// weight, whatever the other experts' row counts (0, a few, many).
    #[test]
    fn grouped_contiguous_rows_equal_one_row_gemms(
        counts in proptest::collection::vec(prop_oneof![1 => Just(0usize), 2 => 1usize..=9, 1 => 10usize..=30], 1..=5),
        n in small_dim(), k in k_dim(), fp8 in any::<bool>(), seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let path = path_for(k, fp8);
        let ws = weights(&mut rng, counts.len(), n, k);
        let views: Vec<_> = ws.iter().map(|w| w.view()).collect();
        let mut offsets = vec![0u32];
        for &c in &counts {
            offsets.push(offsets[offsets.len() - 1] + c as u32);
        }
        let rows = offsets[counts.len()] as usize;
        let a = rng.vec(rows * k, 1.0);
        let mut out = vec![f32::NAN; rows * n];
        gemm::grouped_contiguous(&a, &offsets, &views, path, &mut out).unwrap();
        for e in 0..counts.len() {
            for r in offsets[e] as usize..offsets[e + 1] as usize {
                prop_assert!(same_bits(&out[r * n..(r + 1) * n], &one_row(&a[r * k..(r + 1) * k], &ws[e], path)), "expert {} row {} ({:?})", e, r, path);
            }
        }
    }

    /// The same for the masked layout.
    #[test]
    fn grouped_masked_rows_equal_one_row_gemms(
        counts in proptest::collection::vec(prop_oneof![1 => Just(0usize), 2 => 1usize..=9, 1 => 10usize..=20], 1..=5),
        n in small_dim(), k in k_dim(), fp8 in any::<bool>(), seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let path = path_for(k, fp8);
        let cap = counts.iter().copied().max().unwrap_or(0).max(1);
        let ws = weights(&mut rng, counts.len(), n, k);
        let views: Vec<_> = ws.iter().map(|w| w.view()).collect();
        let c32: Vec<u32> = counts.iter().map(|&c| c as u32).collect();
        let a = rng.vec(counts.len() * cap * k, 1.0);
        let mut out = vec![f32::NAN; counts.len() * cap * n];
        gemm::grouped_masked(&a, &c32, cap, &views, path, &mut out).unwrap();
        for (e, &c) in counts.iter().enumerate() {
            for r in e * cap..e * cap + c {
                prop_assert!(same_bits(&out[r * n..(r + 1) * n], &one_row(&a[r * k..(r + 1) * k], &ws[e], path)), "expert {} row {} ({:?})", e, r, path);
            }
        }
    }
}

/// At DeepSeek-V3 widths (K = 1536, 7168, 18432; a 64-row weight tile; a 70-row job split over
/// two row tasks), every row of the batch equals the row alone.
#[test]
fn gemm_rows_equal_one_row_gemms_at_v3_widths() {
    let mut rng = Rng::new(3);
    for k in [1536, 7168, 18432] {
        let w = &weights(&mut rng, 1, 80, k)[0];
        let a = rng.vec(70 * k, 1.0);
        for path in [GemmPath::Reference, GemmPath::Fp8] {
            let alone: Vec<Vec<f32>> = (0..70).map(|r| one_row(&a[r * k..(r + 1) * k], w, path)).collect();
            for m in [2, 5, 8, 9, 16, 17, 64, 70] {
                let mut out = vec![f32::NAN; m * 80];
                gemm::gemm(&a[..m * k], w.view(), GemmShape { m, n: 80, k }, path, &mut out).unwrap();
                for (r, want) in alone.iter().take(m).enumerate() {
                    assert!(same_bits(&out[r * 80..(r + 1) * 80], want), "K = {k} {path:?}: row {r} of {m}");
                }
            }
        }
    }
}
