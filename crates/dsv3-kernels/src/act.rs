//! Elementwise activations and row softmax: SwiGLU's `silu(gate) ⊙ up` (docs/model.md §3.8) and
//! the f32 softmax used by attention (docs/model.md §3.3 step 4) and softmax routing (V2-Lite).
//!
//! # Layouts
//!
//! * [`silu_mul`] takes `gate` and `up` as two separate `[rows, n]` buffers (what two GEMMs, or
//!   one GEMM whose output the caller splits by rows, produce) and writes `out [rows, n]`.
//! * [`silu_mul_packed`] takes one `[rows, 2n]` buffer whose row `r` is `[gate_r | up_r]`, the
//!   layout of a fused gate+up GEMM (a weight with the gate rows stacked above the up rows).
//!
//! # Numerics
//!
//! `silu(z) = z · σ(z) = z / (1 + e^(-z))`. The fast form never overflows: with
//! `e = exp(-|z|) ≤ 1` it computes `z / (1 + e)` for `z ≥ 0` and `z·e / (1 + e)` for `z < 0`,
//! so `silu(1e30) = 1e30`, `silu(-1e30) = -0`, and results stay accurate wherever they are
//! normal f32 (about z ≥ -87; below, they fade through subnormals to -0). `silu(-inf)` is defined as `-0` (the limit)
//! instead of `-inf · 0 = NaN`. NaN propagates.
//!
//! The fast kernels use [`exp_fast`], a branch-free, vectorisable `exp` (Cody–Waite range
//! reduction, Cephes degree-6 polynomial, exponent scaling in two halves so that overflow
//! to `+inf` and gradual underflow to subnormals and 0 come out right). Its accuracy is
//! measured against `f64::exp` over a sweep of the whole finite range in `tests/small_ops.rs`:
//! at most [`EXP_FAST_MAX_REL_ERR`] relative error wherever the result is a normal f32. The
//! references use `f64` arithmetic with `f64::exp` and round once, so they are the accurate
//! oracles.
//!
//! # Softmax of a row with no finite entry
//!
//! A row whose maximum is `-inf` (every entry masked) has no defined softmax. Both versions
//! return the **uniform** distribution `1/n` for such a row: the limit of softmax over a
//! constant row, NaN-free and still summing to 1, and the kernel never stops half way with an
//! error. Upstream masking (causal attention, group-limited routing) never masks a whole row;
//! a caller that must detect it checks its mask, not this output. A row containing NaN gives
//! NaN everywhere (also when its other entries are all `-inf`); a row containing `+inf` is
//! undefined (NaN where `inf - inf` appears).

use rayon::prelude::*;

use crate::cpu::dispatch;
use crate::error::{Result, check_len, checked_mul};
pub use crate::norm::RowsShape;

/// Bound on [`exp_fast`]'s relative error against the exact `exp` where the result is a
/// normal f32 (x in about [-87.3, 88.7]). An exhaustive sweep of every f32 in [-104, 88.8]
/// (`EXP_SWEEP_STRIDE=1` on the test in `tests/small_ops.rs`) measured 8.16e-8 (≈ 0.7 ulp);
/// against `f32::exp` the difference is at most 1.19e-7 (1 ulp). CI sweeps every 61st value.
pub const EXP_FAST_MAX_REL_ERR: f32 = 1.0e-7;

/// Independent f32 accumulators used by the fast row reductions (max, sum).
const LANES: usize = 16;

/// Vectorisable `exp(x)` in f32 (see the module docs for its method and accuracy).
///
/// `exp_fast(0) == 1` exactly; `+inf` and anything above ln(f32::MAX) give `+inf`; `-inf` and
/// anything below about -103.97 give `0`; results in the subnormal range are approximate in
/// relative terms (absolute error below 2⁻¹²⁶); NaN gives NaN. No branches, no table, no panic.
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // 355/512: n·LN2_HI is exact for |n| < 2^15
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to an integer
    // Clamped so that 2^n stays within two representable halves; outside, the result is
    // saturated by the final multiplications (to +inf or 0). `clamp` keeps NaN.
    let xc = x.clamp(-104.0, 88.8);
    let t = xc * LOG2E + ROUND;
    let n = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let nf = t - ROUND;
    let r = (xc - nf * LN2_HI) - nf * LN2_LO;
    let z = r * r;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // Cephes' 5.0000001201e-1 rounds to exactly 0.5 in f32
    let y = p * z + r + 1.0;
    // 2^n as 2^h · 2^(n-h) with h = n/2: both halves are normal for n in [-150, 129].
    let h = n >> 1;
    let s1 = f32::from_bits((h.wrapping_add(127) as u32).wrapping_shl(23));
    let s2 = f32::from_bits((n.wrapping_sub(h).wrapping_add(127) as u32).wrapping_shl(23));
    y * s1 * s2
}

/// `silu(z)` with [`exp_fast`], in the overflow-free form: with `e = exp(-|z|) ∈ [0, 1]`,
/// `z / (1 + e)` for `z ≥ 0` and `z·e / (1 + e)` for `z < 0`. Accurate wherever the result is
/// a normal f32; `silu(-inf) = -0`; NaN gives NaN.
#[inline(always)]
pub fn silu_fast(z: f32) -> f32 {
    let e = exp_fast(-z.abs());
    let num = if z >= 0.0 { z } else { z * e };
    let s = num / (1.0 + e);
    if z == f32::NEG_INFINITY { -0.0 } else { s }
}

#[inline(always)]
fn silu_mul_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu_fast(g) * u;
    }
}

#[inline(always)]
fn softmax_row_body(x: &mut [f32]) {
    let n = x.len();
    let mut mx = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            mx[j] = mx[j].max(c[j]);
        }
    }
    for (m, &v) in mx.iter_mut().zip(tail) {
        *m = m.max(v);
    }
    let m = mx.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    if m == f32::NEG_INFINITY {
        // No finite maximum: uniform, unless the row is made of NaNs (and -inf).
        let fill = if x.iter().any(|v| v.is_nan()) { f32::NAN } else { 1.0 / n as f32 };
        x.fill(fill);
        return;
    }
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            let e = exp_fast(c[j] - m);
            c[j] = e;
            acc[j] += e;
        }
    }
    for (a, v) in acc.iter_mut().zip(chunks.into_remainder()) {
        *v = exp_fast(*v - m);
        *a += *v;
    }
    let mut w = LANES / 2;
    while w > 0 {
        for j in 0..w {
            acc[j] += acc[j + w];
        }
        w /= 2;
    }
    let inv = 1.0 / acc[0];
    for v in x.iter_mut() {
        *v *= inv;
    }
}

dispatch!(fn silu_mul_row(gate: &[f32], up: &[f32], out: &mut [f32]) = silu_mul_body;);
dispatch!(fn softmax_row(x: &mut [f32]) = softmax_row_body;);

/// SwiGLU activation: `out = silu(gate) ⊙ up`, all three `[rows, n]` (`shape.cols = n`).
///
/// Errors: `n == 0` or any length mismatch.
pub fn silu_mul(gate: &[f32], up: &[f32], shape: RowsShape, out: &mut [f32]) -> Result<()> {
    const OP: &str = "silu_mul";
    let len = shape.len(OP)?;
    check_len(OP, "gate", gate.len(), len)?;
    check_len(OP, "up", up.len(), len)?;
    check_len(OP, "out", out.len(), len)?;
    let c = shape.cols;
    if shape.parallel() {
        out.par_chunks_mut(c).zip(gate.par_chunks(c).zip(up.par_chunks(c))).for_each(|(o, (g, u))| silu_mul_row(g, u, o));
    } else {
        out.chunks_mut(c).zip(gate.chunks(c).zip(up.chunks(c))).for_each(|(o, (g, u))| silu_mul_row(g, u, o));
    }
    Ok(())
}

/// SwiGLU on a fused gate+up output: `gate_up` is `[rows, 2n]` with row `r` = `[gate_r | up_r]`,
/// `out` is `[rows, n]` (`shape.cols = n`), `out_r = silu(gate_r) ⊙ up_r`.
///
/// Errors: `n == 0` or any length mismatch.
pub fn silu_mul_packed(gate_up: &[f32], shape: RowsShape, out: &mut [f32]) -> Result<()> {
    const OP: &str = "silu_mul_packed";
    let len = shape.len(OP)?;
    let c = shape.cols;
    let c2 = checked_mul(OP, "2 * cols", c, 2)?;
    check_len(OP, "gate_up", gate_up.len(), checked_mul(OP, "rows * 2 * cols", shape.rows, c2)?)?;
    check_len(OP, "out", out.len(), len)?;
    if shape.parallel() {
        out.par_chunks_mut(c).zip(gate_up.par_chunks(c2)).for_each(|(o, gu)| {
            let (g, u) = gu.split_at(c);
            silu_mul_row(g, u, o)
        });
    } else {
        out.chunks_mut(c).zip(gate_up.chunks(c2)).for_each(|(o, gu)| {
            let (g, u) = gu.split_at(c);
            silu_mul_row(g, u, o)
        });
    }
    Ok(())
}

/// Softmax of each row of `x` (`[rows, cols]`) in place, in f32 with max subtraction. A row
/// with no finite entry becomes uniform (module docs).
///
/// Errors: `cols == 0` or a length mismatch (then `x` is untouched).
pub fn softmax_inplace(x: &mut [f32], shape: RowsShape) -> Result<()> {
    const OP: &str = "softmax_inplace";
    let len = shape.len(OP)?;
    check_len(OP, "x", x.len(), len)?;
    if shape.parallel() {
        x.par_chunks_mut(shape.cols).for_each(softmax_row);
    } else {
        x.chunks_mut(shape.cols).for_each(softmax_row);
    }
    Ok(())
}

/// Softmax of each row of `x` into `out` (both `[rows, cols]`); see [`softmax_inplace`].
///
/// Errors: `cols == 0` or a length mismatch (then `out` is untouched).
pub fn softmax(x: &[f32], shape: RowsShape, out: &mut [f32]) -> Result<()> {
    const OP: &str = "softmax";
    let len = shape.len(OP)?;
    check_len(OP, "x", x.len(), len)?;
    check_len(OP, "out", out.len(), len)?;
    let c = shape.cols;
    let row = |(o, xr): (&mut [f32], &[f32])| {
        o.copy_from_slice(xr);
        softmax_row(o);
    };
    if shape.parallel() {
        out.par_chunks_mut(c).zip(x.par_chunks(c)).for_each(row);
    } else {
        out.chunks_mut(c).zip(x.chunks(c)).for_each(row);
    }
    Ok(())
}

/// Naive activations in f64 with `f64::exp`, rounded to f32 once: the oracles of the fast
/// functions (same contracts, same special cases).
pub mod reference {
    use super::RowsShape;
    use crate::error::{Result, check_len, checked_mul};

    /// `silu(z) = z · σ(z) = z / (1 + e^(-z))` in f64, rounded to f32; `silu(-inf) = -0`.
    pub fn silu(z: f32) -> f32 {
        if z == f32::NEG_INFINITY {
            return -0.0;
        }
        let z = z as f64;
        (z / (1.0 + (-z).exp())) as f32
    }

    /// Reference of [`super::silu_mul`]: `out[i] = silu(gate[i]) · up[i]` (product in f64).
    pub fn silu_mul(gate: &[f32], up: &[f32], shape: RowsShape, out: &mut [f32]) -> Result<()> {
        const OP: &str = "reference::silu_mul";
        let len = shape.len(OP)?;
        check_len(OP, "gate", gate.len(), len)?;
        check_len(OP, "up", up.len(), len)?;
        check_len(OP, "out", out.len(), len)?;
        for i in 0..len {
            out[i] = (silu(gate[i]) as f64 * up[i] as f64) as f32;
        }
        Ok(())
    }

    /// Reference of [`super::silu_mul_packed`].
    pub fn silu_mul_packed(gate_up: &[f32], shape: RowsShape, out: &mut [f32]) -> Result<()> {
        const OP: &str = "reference::silu_mul_packed";
        let len = shape.len(OP)?;
        let n = shape.cols;
        let total = checked_mul(OP, "rows * 2 * cols", shape.rows, checked_mul(OP, "2 * cols", n, 2)?)?;
        check_len(OP, "gate_up", gate_up.len(), total)?;
        check_len(OP, "out", out.len(), len)?;
        for r in 0..shape.rows {
            for i in 0..n {
                let g = gate_up[r * 2 * n + i];
                let u = gate_up[r * 2 * n + n + i];
                out[r * n + i] = (silu(g) as f64 * u as f64) as f32;
            }
        }
        Ok(())
    }

    /// Reference of [`super::softmax`]: `p_i = e^(x_i - max) / Σ_j e^(x_j - max)` in f64; a row
    /// whose max is `-inf` gives `1/n` everywhere (NaN if it holds a NaN).
    pub fn softmax(x: &[f32], shape: RowsShape, out: &mut [f32]) -> Result<()> {
        const OP: &str = "reference::softmax";
        let len = shape.len(OP)?;
        check_len(OP, "x", x.len(), len)?;
        check_len(OP, "out", out.len(), len)?;
        let n = shape.cols;
        for r in 0..shape.rows {
            let row = &x[r * n..(r + 1) * n];
            let mut m = f32::NEG_INFINITY;
            for &v in row {
                m = m.max(v);
            }
            if m == f32::NEG_INFINITY {
                let nan = row.iter().any(|v| v.is_nan());
                for i in 0..n {
                    out[r * n + i] = if nan { f32::NAN } else { 1.0 / n as f32 };
                }
                continue;
            }
            let mut sum = 0f64;
            for &v in row {
                sum += (v as f64 - m as f64).exp();
            }
            for i in 0..n {
                out[r * n + i] = ((row[i] as f64 - m as f64).exp() / sum) as f32;
            }
        }
        Ok(())
    }
}
