//! RMSNorm (docs/model.md §3.2): `y = w ⊙ x / sqrt(mean(x²) + eps)` per row, and the fused
//! residual-add form engines use between sublayers.
//!
//! Numerics (docs/model.md §3.2 and §7): the mean of squares and the reciprocal square
//! root are computed in f32, and the output is formed as `w * (x * inv_rms)` (normalise first,
//! then scale by the weight, the HF order). The fast version sums the squares in f32 over
//! [`LANES`] independent lanes; the [`reference`](mod@reference) sums them in f64 (the exact oracle) and
//! rounds the sum to f32 once, so the two differ only by the fast summation error: relative
//! error of the sum at most about `(cols / LANES + log2(LANES) + 1) · 2⁻²⁴`, of which the
//! output sees half (rsqrt), plus 3 roundings of the final products. On sums that are exact in
//! f32 (small integers) the two agree bit for bit.
//!
//! `eps` must be finite and ≥ 0. With `eps = 0`, an all-zero row gives non-finite output
//! (0/0, as `torch` does); the model always uses `eps > 0`.

use rayon::prelude::*;

use crate::cpu::dispatch;
use crate::error::{Result, check_len, checked_mul, invalid, shape_err};

/// Independent f32 accumulators of the fast sum of squares (two AVX2 registers).
pub const LANES: usize = 16;

/// Element count above which the fast kernels split rows over rayon's pool.
const PAR_MIN_ELEMS: usize = 32 * 1024;

/// A row-major `[rows, cols]` matrix of f32 activations, one row per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowsShape {
    /// Number of rows (tokens); 0 is allowed and means no work.
    pub rows: usize,
    /// Elements per row; must be > 0.
    pub cols: usize,
}

impl RowsShape {
    /// A shape, validated: `cols > 0` and `rows * cols` fits `usize`.
    pub fn new(rows: usize, cols: usize) -> Result<Self> {
        let s = RowsShape { rows, cols };
        s.len("RowsShape")?;
        Ok(s)
    }

    /// `rows * cols`, checking `cols > 0` and overflow; `op` names the caller in errors.
    pub fn len(self, op: &'static str) -> Result<usize> {
        if self.cols == 0 {
            return Err(shape_err(op, "cols must be > 0"));
        }
        checked_mul(op, "rows * cols", self.rows, self.cols)
    }

    /// Whether the fast kernels should use more than one thread for this shape.
    pub(crate) fn parallel(self) -> bool {
        self.rows > 1 && self.rows.saturating_mul(self.cols) > PAR_MIN_ELEMS
    }
}

fn check_eps(op: &'static str, eps: f32) -> Result<()> {
    if eps.is_finite() && eps >= 0.0 { Ok(()) } else { Err(invalid(op, "eps", format!("must be finite and >= 0, got {eps}"))) }
}

/// The checks of [`rms_norm`] (every implementation, CPU and GPU, runs the same ones): the
/// lengths of `x`, `w`, `out` and `eps`; returns `rows * cols`.
pub(crate) fn check_rms_norm(op: &'static str, shape: RowsShape, x: usize, w: usize, out: usize, eps: f32) -> Result<usize> {
    let n = shape.len(op)?;
    check_len(op, "x", x, n)?;
    check_len(op, "w", w, shape.cols)?;
    check_len(op, "out", out, n)?;
    check_eps(op, eps)?;
    Ok(n)
}

/// The checks of [`add_rms_norm`]: those of [`rms_norm`] plus the residual's length.
pub(crate) fn check_add_rms_norm(
    op: &'static str,
    shape: RowsShape,
    x: usize,
    residual: usize,
    w: usize,
    out: usize,
    eps: f32,
) -> Result<usize> {
    let n = check_rms_norm(op, shape, x, w, out, eps)?;
    check_len(op, "residual", residual, n)?;
    Ok(n)
}

/// `1 / sqrt(sum / n + eps)` in f32: the one place both versions form the scale.
#[inline(always)]
fn inv_rms(sum_sq: f32, n: usize, eps: f32) -> f32 {
    1.0 / (sum_sq / n as f32 + eps).sqrt()
}

/// Sum of squares over [`LANES`] independent f32 lanes, then a fixed pairwise reduction.
#[inline(always)]
fn sum_sq(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] += c[j] * c[j];
        }
    }
    for (a, &v) in acc.iter_mut().zip(tail) {
        *a += v * v;
    }
    reduce(acc)
}

/// Fixed-order pairwise reduction of the lanes (deterministic for a given row).
#[inline(always)]
fn reduce(mut acc: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for j in 0..w {
            acc[j] += acc[j + w];
        }
        w /= 2;
    }
    acc[0]
}

/// `out = w * (x * inv)` elementwise.
#[inline(always)]
fn scale_row(x: &[f32], w: &[f32], inv: f32, out: &mut [f32]) {
    for ((o, &xv), &wv) in out.iter_mut().zip(x).zip(w) {
        *o = wv * (xv * inv);
    }
}

#[inline(always)]
fn rms_row_body(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let inv = inv_rms(sum_sq(x), x.len(), eps);
    scale_row(x, w, inv, out);
}

#[inline(always)]
fn add_rms_row_body(x: &[f32], res: &mut [f32], w: &[f32], eps: f32, out: &mut [f32]) {
    for (r, &xv) in res.iter_mut().zip(x) {
        *r += xv;
    }
    let inv = inv_rms(sum_sq(res), res.len(), eps);
    scale_row(res, w, inv, out);
}

dispatch!(fn rms_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) = rms_row_body;);
dispatch!(fn add_rms_row(x: &[f32], res: &mut [f32], w: &[f32], eps: f32, out: &mut [f32]) = add_rms_row_body;);

/// RMSNorm of each row of `x` (`[rows, cols]`) with weight `w` (`[cols]`) into `out`
/// (`[rows, cols]`): `out = w ⊙ x / sqrt(mean(x²) + eps)`, f32 throughout.
///
/// Errors: `cols == 0`, any length mismatch, or `eps` not finite and ≥ 0.
pub fn rms_norm(x: &[f32], w: &[f32], shape: RowsShape, eps: f32, out: &mut [f32]) -> Result<()> {
    check_rms_norm("rms_norm", shape, x.len(), w.len(), out.len(), eps)?;
    let c = shape.cols;
    if shape.parallel() {
        out.par_chunks_mut(c).zip(x.par_chunks(c)).for_each(|(o, xr)| rms_row(xr, w, eps, o));
    } else {
        out.chunks_mut(c).zip(x.chunks(c)).for_each(|(o, xr)| rms_row(xr, w, eps, o));
    }
    Ok(())
}

/// Fused residual add + RMSNorm: `residual += x`, then `out = rms_norm(residual)`. The updated
/// residual stream stays in `residual` for the next sublayer (all buffers `[rows, cols]`,
/// `w` is `[cols]`).
///
/// Errors: as [`rms_norm`]; nothing is written when one is returned.
pub fn add_rms_norm(x: &[f32], residual: &mut [f32], w: &[f32], shape: RowsShape, eps: f32, out: &mut [f32]) -> Result<()> {
    check_add_rms_norm("add_rms_norm", shape, x.len(), residual.len(), w.len(), out.len(), eps)?;
    let c = shape.cols;
    if shape.parallel() {
        out.par_chunks_mut(c).zip(residual.par_chunks_mut(c)).zip(x.par_chunks(c)).for_each(|((o, r), xr)| add_rms_row(xr, r, w, eps, o));
    } else {
        out.chunks_mut(c).zip(residual.chunks_mut(c)).zip(x.chunks(c)).for_each(|((o, r), xr)| add_rms_row(xr, r, w, eps, o));
    }
    Ok(())
}

/// Naive RMSNorm, written like docs/model.md §3.2: the oracle for the fast functions.
///
/// The sum of squares is accumulated in f64 (exact for any realistic row) and rounded to f32
/// once; the mean, `+ eps`, the square root and the reciprocal are then f32, as the spec asks.
pub mod reference {
    use super::{RowsShape, check_add_rms_norm, check_rms_norm};
    use crate::error::Result;

    /// Reference of [`super::rms_norm`]; same contract.
    pub fn rms_norm(x: &[f32], w: &[f32], shape: RowsShape, eps: f32, out: &mut [f32]) -> Result<()> {
        check_rms_norm("reference::rms_norm", shape, x.len(), w.len(), out.len(), eps)?;
        for r in 0..shape.rows {
            let row = &x[r * shape.cols..(r + 1) * shape.cols];
            let mut sum = 0f64;
            for &v in row {
                sum += v as f64 * v as f64;
            }
            let mean = sum as f32 / shape.cols as f32;
            let inv = 1.0 / (mean + eps).sqrt();
            for i in 0..shape.cols {
                out[r * shape.cols + i] = w[i] * (row[i] * inv);
            }
        }
        Ok(())
    }

    /// Reference of [`super::add_rms_norm`]; same contract.
    pub fn add_rms_norm(x: &[f32], residual: &mut [f32], w: &[f32], shape: RowsShape, eps: f32, out: &mut [f32]) -> Result<()> {
        let n = check_add_rms_norm("reference::add_rms_norm", shape, x.len(), residual.len(), w.len(), out.len(), eps)?;
        for i in 0..n {
            residual[i] += x[i];
        }
        rms_norm(residual, w, shape, eps, out)
    }
}
