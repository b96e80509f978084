//! Shared proptest strategies for the kernel property tests (nalgebra-sparse style): sizes
//! that include the edges and the real DeepSeek-V3 widths, exact small-integer values, and
//! finite floats.
#![allow(dead_code)]

use dsv3_kernels::attention::LatentPool;
use proptest::prelude::*;

/// Edge sizes every kernel must handle around the 128-wide blocks.
pub const EDGE_SIZES: &[usize] = &[1, 7, 127, 128, 129];

/// The DeepSeek-V3 widths that reach the kernels (hidden, q LoRA, kv LoRA, latent+rope,
/// expert width, o_proj input, dense width).
pub const V3_SIZES: &[usize] = &[7168, 1536, 512, 576, 2048, 16384, 18432];

/// An edge size or a small random size.
pub fn small_dim() -> impl Strategy<Value = usize> {
    prop_oneof![proptest::sample::select(EDGE_SIZES), 1usize..300]
}

/// Floats in [-range, range] with a 1/16 chance of exact zero.
pub fn f32_val(range: f32) -> impl Strategy<Value = f32> {
    prop_oneof![1 => Just(0.0f32), 15 => -range..range]
}

/// Small integers as f32: sums and products of these are exact, so results must match the
/// reference bit for bit.
pub fn small_int() -> impl Strategy<Value = f32> {
    (-4i32..=4).prop_map(|v| v as f32)
}

pub fn vec_f32(len: usize, range: f32) -> impl Strategy<Value = Vec<f32>> {
    proptest::collection::vec(f32_val(range), len)
}

/// Max |a - b| over two slices of the same length.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

// ----- MLA attention tests (CPU and GPU) -----

/// xorshift64 test data.
pub struct Rng(pub u64);
impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        (self.u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| scale * self.f32()).collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.u64() % n as u64) as usize
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// Max |v|.
pub fn max_abs(a: &[f32]) -> f32 {
    a.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// `max |got - ref| <= rel · max |ref|`, same length, all finite.
pub fn assert_close(got: &[f32], refr: &[f32], rel: f32, what: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), refr.len(), "{}: lengths", what);
    prop_assert!(got.iter().all(|v| v.is_finite()), "{}: non-finite output", what);
    let (err, scale) = (max_abs_diff(got, refr), max_abs(refr));
    prop_assert!(err <= rel * scale + 1e-30, "{}: max |diff| {} > {} · max |ref| {}", what, err, rel, scale);
    Ok(())
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
