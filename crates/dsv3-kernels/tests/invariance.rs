//! Batch invariance of the kernels a model step runs: a row's result must not depend on how
//! many rows share the call, which other rows (sequences, experts) they are, or how a prompt
//! is cut into steps. Continuous batching relies on it: a request served in a batch must get
//! the bits it gets alone. Every check is bit for bit, on whichever ISA path the process runs
//! (`scripts/test.sh` runs this file at the AVX-512, AVX2 and portable levels).

mod common;

use common::{Rng, latent_dims, paged, small_dim};
use dsv3_kernels::attention::{self, DecodeParams, MlaDims, PrefillInputs, PrefillParams};
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

/// K: whole 128-blocks (the fp8 path's requirement; up to 9, across the row-tile path's
/// chunks of 4 blocks) or a ragged width.
fn k_dim() -> impl Strategy<Value = usize> {
    prop_oneof![2 => (1usize..=3).prop_map(|b| b * 128), 1 => (4usize..=9).prop_map(|b| b * 128), 1 => small_dim(), 1 => 129usize..=400]
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Each decode row (its own block table and length) gets the same bits alone as in a batch
    /// of rows of other lengths, short and long (long rows are split into key ranges).
    #[test]
    fn decode_rows_are_batch_invariant(
        seed in any::<u64>(),
        heads in 1usize..=6,
        (kv_lora, rope) in latent_dims(),
        page_size in proptest::sample::select(&[16usize, 64][..]),
        lens in proptest::collection::vec(prop_oneof![1 => 1u32..64, 2 => 200u32..1500], 2..=6),
    ) {
        let mut rng = Rng::new(seed);
        let (pool_data, table, max_blocks, pool) = paged(&mut rng, &lens, page_size, kv_lora, rope);
        let (w, b_n) = (pool.width(), lens.len());
        let q = rng.vec(b_n * heads * w, 1.0);
        let p = DecodeParams { batch: b_n, heads, max_blocks, pool, scale: 0.3 };
        let mut all = vec![f32::NAN; b_n * heads * kv_lora];
        attention::decode(&q, &pool_data, &table, &lens, &p, &mut all).unwrap();
        for b in 0..b_n {
            let mut one = vec![f32::NAN; heads * kv_lora];
            let q1 = &q[b * heads * w..(b + 1) * heads * w];
            let t1 = &table[b * max_blocks..(b + 1) * max_blocks];
            attention::decode(q1, &pool_data, t1, &lens[b..b + 1], &DecodeParams { batch: 1, ..p }, &mut one).unwrap();
            prop_assert!(same_bits(&all[b * heads * kv_lora..(b + 1) * heads * kv_lora], &one), "row {} (len {}) of {:?}", b, lens[b], lens);
        }
    }

    /// Prefill of one sequence's prompt: the rows of a one-shot call equal those of the same
    /// prompt cut into chunks (each chunk attending to the keys of positions 0..its end), with
    /// another sequence in the same calls.
    #[test]
    fn prefill_rows_are_chunk_and_batch_invariant(
        seed in any::<u64>(),
        heads in 1usize..=3,
        nope in proptest::sample::select(&[16usize, 32][..]),
        rope in proptest::sample::select(&[8usize, 16][..]),
        v in proptest::sample::select(&[8usize, 32][..]),
        len in 2u32..200,
        cuts in proptest::collection::vec(1u32..199, 1..=3),
        other in 1u32..100,
    ) {
        let mut rng = Rng::new(seed);
        let d = MlaDims { heads, qk_nope: nope, qk_rope: rope, kv_lora: 64, v };
        // Per-position data of both sequences (keys and queries are per absolute position).
        let key_data = |rng: &mut Rng, s: usize| (rng.vec(s * heads * nope, 1.0), rng.vec(s * rope, 1.0), rng.vec(s * heads * v, 1.0));
        let (ln, lp) = (len as usize, other as usize);
        let (kn_a, kp_a, v_a) = key_data(&mut rng, ln);
        let q_a = rng.vec(ln * heads * d.qk_head(), 1.0);
        let (kn_b, kp_b, v_b) = key_data(&mut rng, lp);
        let q_b = rng.vec(lp * heads * d.qk_head(), 1.0);
        // One call: sequence B (all of it), then sequence A's positions p0..p1 over keys 0..p1.
        let run = |p0: usize, p1: usize| -> Vec<f32> {
            let qw = heads * d.qk_head();
            let mut q = q_b.clone();
            q.extend_from_slice(&q_a[p0 * qw..p1 * qw]);
            let cat = |b: &[f32], a: &[f32], w: usize| [b, &a[..p1 * w]].concat();
            let (k_nope, k_pe, vv) = (cat(&kn_b, &kn_a, heads * nope), cat(&kp_b, &kp_a, rope), cat(&v_b, &v_a, heads * v));
            let q_pos: Vec<u32> = (0..lp as u32).chain(p0 as u32..p1 as u32).collect();
            let (t, s) = (lp + p1 - p0, lp + p1);
            let cu_q = [0, lp as u32, t as u32];
            let cu_k = [0, lp as u32, s as u32];
            let x = PrefillInputs { q: &q[..], k_nope: &k_nope[..], k_pe: &k_pe[..], v: &vv[..], q_pos: &q_pos[..], cu_q: &cu_q[..], cu_k: &cu_k[..] };
            let p = PrefillParams { dims: d, seqs: 2, tokens: t, keys: s, scale: 0.25 };
            let mut out = vec![f32::NAN; t * heads * v];
            attention::prefill(x, &p, &mut out).unwrap();
            out[lp * heads * v..].to_vec()
        };
        let whole = run(0, ln);
        let mut bounds: Vec<usize> = cuts.iter().map(|&c| c as usize).filter(|&c| c < ln).collect();
        bounds.extend([0, ln]);
        bounds.sort_unstable();
        bounds.dedup();
        let mut chunked = Vec::new();
        for c in bounds.windows(2) {
            chunked.extend(run(c[0], c[1]));
        }
        prop_assert!(same_bits(&whole, &chunked), "chunks at {:?} of {}", bounds, ln);
        // Alone (no other sequence) as well.
        let x_pos: Vec<u32> = (0..len).collect();
        let cu = [0, len];
        let x = PrefillInputs { q: &q_a[..], k_nope: &kn_a[..], k_pe: &kp_a[..], v: &v_a[..], q_pos: &x_pos[..], cu_q: &cu[..], cu_k: &cu[..] };
        let mut alone = vec![f32::NAN; ln * heads * v];
        attention::prefill(x, &PrefillParams { dims: d, seqs: 1, tokens: ln, keys: ln, scale: 0.25 }, &mut alone).unwrap();
        prop_assert!(same_bits(&whole, &alone), "with another sequence vs alone");
    }
}
