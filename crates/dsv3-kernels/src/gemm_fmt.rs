//! The fp8 GEMM path for weights whose activations take a non-default scale format
//! (`ScaleFmt::Ue8m0`, set on the weight by a `scale_fmt: "ue8m0"` checkpoint, V3.1 and
//! later): the activation is quantised per 1x128 tile with the weight's format, then
//! multiplied by [`gemm::gemm_fp8_quantized`]. The CPU backend routes such weights here; the
//! default-format fp8 path ([`gemm::gemm`]) is unchanged.

use crate::error::{Result, check_len, checked_mul, shape_err};
use crate::fp8::{self, ActQuantShape, BLOCK, Fp8Weight};
use crate::gemm::{self, GemmShape};

/// `out[m, n] = Σ_k q(a)[m, k] · w[n, k]` with `a` quantised in `w`'s activation scale format.
pub(crate) fn gemm(a: &[f32], w: &Fp8Weight, s: GemmShape, out: &mut [f32]) -> Result<()> {
    const OP: &str = "gemm (fp8 path, weight's activation scale format)";
    if !s.k.is_multiple_of(BLOCK) {
        return Err(shape_err(OP, format!("the fp8 path needs k % 128 == 0, got k = {}", s.k)));
    }
    check_len(OP, "a", a.len(), checked_mul(OP, "a", s.m, s.k)?)?;
    let qs = ActQuantShape { rows: s.m, cols: s.k };
    let (mut q, mut scales) = (vec![0u8; a.len()], vec![0f32; s.m * qs.tiles()]);
    fp8::act_quant(a, qs, w.act_scale_fmt(), &mut q, &mut scales)?;
    gemm::gemm_fp8_quantized(&q, &scales, w.view(), s, out)
}

/// `(n, k)` shared by every weight of a group.
fn group_shape(op: &'static str, w: &[&Fp8Weight]) -> Result<(usize, usize)> {
    let first = w.first().ok_or_else(|| shape_err(op, "no weights"))?;
    let (n, k) = (first.rows(), first.cols());
    if let Some(e) = w.iter().position(|w| (w.rows(), w.cols()) != (n, k)) {
        return Err(shape_err(op, format!("weight {e} is [{}, {}], weight 0 is [{n}, {k}]", w[e].rows(), w[e].cols())));
    }
    Ok((n, k))
}

/// Grouped, contiguous layout: expert `e` multiplies rows `offsets[e]..offsets[e+1]`.
pub(crate) fn grouped_contiguous(a: &[f32], offsets: &[u32], w: &[&Fp8Weight], out: &mut [f32]) -> Result<()> {
    const OP: &str = "grouped_contiguous (fp8 path, weight's activation scale format)";
    let (n, k) = group_shape(OP, w)?;
    check_len(OP, "offsets", offsets.len(), w.len() + 1)?;
    if offsets[0] != 0 || offsets.windows(2).any(|p| p[1] < p[0]) {
        return Err(shape_err(OP, "offsets must start at 0 and never decrease"));
    }
    let rows = offsets[w.len()] as usize;
    check_len(OP, "a", a.len(), checked_mul(OP, "a", rows, k)?)?;
    check_len(OP, "out", out.len(), checked_mul(OP, "out", rows, n)?)?;
    for (e, we) in w.iter().enumerate() {
        let (r0, r1) = (offsets[e] as usize, offsets[e + 1] as usize);
        gemm(&a[r0 * k..r1 * k], we, GemmShape { m: r1 - r0, n, k }, &mut out[r0 * n..r1 * n])?;
    }
    Ok(())
}

/// Grouped, masked layout: `a` is `[E, capacity, K]`; expert `e` multiplies its first
/// `counts[e]` rows, the rest of its output rows are zero.
pub(crate) fn grouped_masked(a: &[f32], counts: &[u32], capacity: usize, w: &[&Fp8Weight], out: &mut [f32]) -> Result<()> {
    const OP: &str = "grouped_masked (fp8 path, weight's activation scale format)";
    let (n, k) = group_shape(OP, w)?;
    check_len(OP, "counts", counts.len(), w.len())?;
    if let Some(e) = counts.iter().position(|&c| c as usize > capacity) {
        return Err(shape_err(OP, format!("expert {e} has {} rows, more than the capacity {capacity}", counts[e])));
    }
    let slots = checked_mul(OP, "a", w.len(), capacity)?;
    check_len(OP, "a", a.len(), checked_mul(OP, "a", slots, k)?)?;
    check_len(OP, "out", out.len(), checked_mul(OP, "out", slots, n)?)?;
    for (e, we) in w.iter().enumerate() {
        let rows = counts[e] as usize;
        let (a0, o0) = (e * capacity * k, e * capacity * n);
        gemm(&a[a0..a0 + rows * k], we, GemmShape { m: rows, n, k }, &mut out[o0..o0 + rows * n])?;
        out[o0 + rows * n..o0 + capacity * n].fill(0.0);
    }
    Ok(())
}
