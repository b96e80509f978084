//! The kernel tests' own helpers (paged MLA pools, varlen prefill layouts); the generic ones
//! (generator, strategies, closeness) come from `dsv3-testutil`, re-exported here.
#![allow(dead_code, unused_imports)] // each test crate uses a part of these

use dsv3_kernels::attention::LatentPool;
use proptest::prelude::*;

pub use dsv3_testutil::prop_assert_close as assert_close;
pub use dsv3_testutil::{EDGE_SIZES, Rng, V3_SIZES, f32_val, max_abs, max_abs_diff, small_dim, small_int, vec_f32};

/// `(kv_lora, rope)` pairs for the MLA tests: small, tile-edge and the V3 widths.
pub fn latent_dims() -> impl Strategy<Value = (usize, usize)> {
    prop_oneof![
        3 => (proptest::sample::select(&[8usize, 16, 20, 64, 192][..]), proptest::sample::select(&[2usize, 8, 16][..])),
        1 => Just((512usize, 64usize)),
    ]
}

/// A pool holding `lens.len()` sequences on shuffled pages; returns (pool data, block table,
/// max_blocks, pool shape). Unused pages hold garbage, so a wrong page read shows.
pub fn paged(rng: &mut Rng, lens: &[u32], page_size: usize, kv_lora: usize, rope: usize) -> (Vec<f32>, Vec<u32>, usize, LatentPool) {
    let need: Vec<usize> = lens.iter().map(|&l| (l as usize).div_ceil(page_size)).collect();
    let max_blocks = need.iter().copied().max().unwrap_or(0).max(1);
    let num_pages = need.iter().sum::<usize>() + 3;
    let mut ids: Vec<u32> = (0..num_pages as u32).collect();
    rng.shuffle(&mut ids);
    let mut table = vec![u32::MAX; lens.len() * max_blocks];
    let mut next = 0;
    for (b, &n) in need.iter().enumerate() {
        for i in 0..n {
            table[b * max_blocks + i] = ids[next];
            next += 1;
        }
    }
    let pool = LatentPool { num_pages, page_size, kv_lora, rope };
    (rng.vec(pool.check("test").unwrap(), 1.0), table, max_blocks, pool)
}

/// A varlen prefill layout from `(keys S, queries n, chunk)` per sequence: the queries are the
/// chunk at the last `n` positions (chunked prefill) or `n` random positions in any order.
/// Returns `(cu_q, cu_k, q_pos)`.
pub fn varlen_layout(rng: &mut Rng, seqs: &[(u32, u32, bool)]) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let (mut cu_q, mut cu_k, mut q_pos) = (vec![0u32], vec![0u32], Vec::new());
    for &(s, n, chunk) in seqs {
        let n = n.min(s);
        for i in 0..n {
            q_pos.push(if chunk { s - n + i } else { rng.below(s as usize) as u32 });
        }
        cu_q.push(cu_q[cu_q.len() - 1] + n);
        cu_k.push(cu_k[cu_k.len() - 1] + s);
    }
    (cu_q, cu_k, q_pos)
}
