//! Shared proptest strategies for the kernel property tests (nalgebra-sparse style): sizes
//! that include the edges and the real DeepSeek-V3 widths, exact small-integer values, and
//! finite floats.
#![allow(dead_code)]

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

/// DeepGEMM's calc_diff: 1 - 2<x,y>/(<x,x>+<y,y>), in f64. 0 means identical.
pub fn calc_diff(a: &[f32], b: &[f32]) -> f64 {
    let (mut xy, mut xx, mut yy) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        xy += x as f64 * y as f64;
        xx += x as f64 * x as f64;
        yy += y as f64 * y as f64;
    }
    if xx + yy == 0.0 { 0.0 } else { 1.0 - 2.0 * xy / (xx + yy) }
}
