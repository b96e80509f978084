//! Helpers shared by the tests and benchmarks of the dsv3 crates, in one place so that they
//! cannot drift apart: a small deterministic generator, error measures, closeness assertions,
//! and proptest strategies for kernel shapes. A dev-dependency only (`publish = false`); it
//! depends on no dsv3 crate, so every crate can use it without a dependency cycle.
//!
//! ```
//! use dsv3_testutil::{Rng, assert_close, max_abs_diff};
//!
//! let a = Rng::new(7).vec(4, 1.0);
//! assert_eq!(a, Rng::new(7).vec(4, 1.0), "same seed, same values");
//! let b: Vec<f32> = a.iter().map(|x| x * (1.0 + 1e-7)).collect();
//! assert!(max_abs_diff(&a, &b) < 1e-6);
//! assert_close(&b, &a, 1e-6, "scaled copy");
//! ```

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// xorshift64 (13, 7, 17) with a scrambled, odd seed: test data that needs no dependency and
/// is the same on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1) (24 random bits).
    pub fn f32(&mut self) -> f32 {
        (self.u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    /// `n` values uniform in `[-scale, scale)`.
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| scale * self.f32()).collect()
    }
    /// Uniform in `0..n` (`n >= 1`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.u64() % n as u64) as usize
    }
    /// Uniform integer in `-m..=m`.
    pub fn int(&mut self, m: i32) -> i32 {
        (self.u64() % (2 * m as u64 + 1)) as i32 - m
    }
    /// Fisher–Yates.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// `n` values uniform in [-1, 1) from `seed` (`Rng::new(seed).vec(n, 1.0)`).
pub fn uniform_vec(seed: u64, n: usize) -> Vec<f32> {
    Rng::new(seed).vec(n, 1.0)
}

/// Max |v| (0 for an empty slice).
pub fn max_abs(a: &[f32]) -> f32 {
    a.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// Max |a - b| over two slices of the same length (panics on different lengths).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "max_abs_diff: lengths");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// `max |a - want| / max |want|`.
pub fn rel_max_diff(a: &[f32], want: &[f32]) -> f32 {
    max_abs_diff(a, want) / max_abs(want)
}

/// The argmax of each `width`-wide row (lowest index on ties).
pub fn argmax_rows(l: &[f32], width: usize) -> Vec<usize> {
    l.chunks(width).map(|r| r.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0).collect()
}

/// Why `got` is not within `rel · max |want|` of `want` (same length, every value finite,
/// `want` not all zero), or `None` when it is.
pub fn close_error(got: &[f32], want: &[f32], rel: f32, what: &str) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("{what}: {} values, expected {}", got.len(), want.len()));
    }
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        return Some(format!("{what}: value {i} is {}", got[i]));
    }
    let (err, scale) = (max_abs_diff(got, want), max_abs(want));
    if scale == 0.0 && err > 0.0 {
        return Some(format!("{what}: the expected values are all zero, max |got| = {err}"));
    }
    (err > rel * scale).then(|| format!("{what}: max |diff| {err} > {rel} · max |want| {scale}"))
}

/// Panics unless `got` is within `rel · max |want|` of `want` ([`close_error`]).
#[track_caller]
pub fn assert_close(got: &[f32], want: &[f32], rel: f32, what: &str) {
    if let Some(e) = close_error(got, want, rel, what) {
        panic!("{e}");
    }
}

/// [`assert_close`] for proptest bodies (a failing case shrinks instead of panicking).
pub fn prop_assert_close(got: &[f32], want: &[f32], rel: f32, what: &str) -> Result<(), TestCaseError> {
    match close_error(got, want, rel, what) {
        Some(e) => Err(TestCaseError::fail(e)),
        None => Ok(()),
    }
}

// ----- proptest strategies for kernel shapes and values -----

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

/// `len` values of [`f32_val`].
pub fn vec_f32(len: usize, range: f32) -> impl Strategy<Value = Vec<f32>> {
    proptest::collection::vec(f32_val(range), len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_error_catches_each_failure() {
        assert_eq!(close_error(&[1.0, 2.0], &[1.0, 2.0], 0.0, "x"), None);
        assert!(close_error(&[1.0], &[1.0, 2.0], 1.0, "x").is_some_and(|e| e.contains("1 values")));
        assert!(close_error(&[f32::NAN, 2.0], &[1.0, 2.0], 1.0, "x").is_some_and(|e| e.contains("value 0")));
        assert!(close_error(&[1.0, 2.1], &[1.0, 2.0], 0.01, "x").is_some_and(|e| e.contains("max |diff|")));
        assert_eq!(close_error(&[1.0, 2.01], &[1.0, 2.0], 0.01, "x"), None);
        assert!(close_error(&[0.5], &[0.0], 1.0, "x").is_some_and(|e| e.contains("all zero")));
    }

    #[test]
    fn rng_is_the_documented_xorshift() {
        let mut r = Rng::new(1);
        let mut x = 0x9E37_79B9_7F4A_7C15u64 | 1;
        for _ in 0..4 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            assert_eq!(r.u64(), x);
        }
        let v = Rng::new(5).vec(1000, 2.0);
        assert!(v.iter().all(|x| (-2.0..2.0).contains(x)) && max_abs(&v) > 1.9);
        let mut p: Vec<usize> = (0..10).collect();
        Rng::new(3).shuffle(&mut p);
        p.sort_unstable();
        assert_eq!(p, (0..10).collect::<Vec<_>>());
        assert_eq!(argmax_rows(&[1.0, 3.0, 3.0, 0.0, -1.0, -2.0], 3), [1, 0]);
    }
}

/// The example of `README.md`, run as a doctest so that it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
