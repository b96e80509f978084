//! Plain-loop references (`docs/model.md`, "FP8"): the oracles of the fast kernels.

use super::{GemmPath, GemmShape, GroupedShape, shapes};
use crate::error::{Result, check_len, checked_mul};
use crate::fp8::{self, ActQuantShape, BLOCK, Fp8WeightRef, ScaleFmt};

/// `out[m, n] = Σ_k a[m, k] · b[n, k]` in f32, in order of k.
pub fn gemm_f32(a: &[f32], b: &[f32], s: GemmShape, out: &mut [f32]) -> Result<()> {
    const OP: &str = "gemm_f32 (reference)";
    check_len(OP, "a", a.len(), checked_mul(OP, "a", s.m, s.k)?)?;
    check_len(OP, "b", b.len(), checked_mul(OP, "b", s.n, s.k)?)?;
    check_len(OP, "out", out.len(), checked_mul(OP, "out", s.m, s.n)?)?;
    for m in 0..s.m {
        for n in 0..s.n {
            let mut acc = 0f32;
            for k in 0..s.k {
                acc += a[m * s.k + k] * b[n * s.k + k];
            }
            out[m * s.n + n] = acc;
        }
    }
    Ok(())
}

/// Reference path: dequantise the weight (docs/model.md §4.2), then an f32 GEMM.
pub fn gemm_dequant(a: &[f32], w: Fp8WeightRef<'_>, s: GemmShape, out: &mut [f32]) -> Result<()> {
    s.validate("gemm_dequant (reference)", GemmPath::Reference, a.len(), &w, out.len())?;
    gemm_f32(a, &w.dequantize(), s, out)
}

/// docs/model.md §4.4 on an already quantised activation: per 128-block exact FP8 products summed in
/// f32, the block sum times both scales, summed over blocks in f32.
pub fn gemm_fp8(a_q: &[u8], a_s: &[f32], w: Fp8WeightRef<'_>, s: GemmShape, out: &mut [f32]) -> Result<()> {
    const OP: &str = "gemm_fp8 (reference)";
    check_len(OP, "a_q", a_q.len(), checked_mul(OP, "a_q", s.m, s.k)?)?;
    s.validate(OP, GemmPath::Fp8, a_q.len(), &w, out.len())?;
    let kb_n = s.k / BLOCK;
    check_len(OP, "a_s", a_s.len(), s.m * kb_n)?;
    for m in 0..s.m {
        for n in 0..s.n {
            let mut total = 0f32;
            for kb in 0..kb_n {
                let mut block = 0f32;
                for k in kb * BLOCK..(kb + 1) * BLOCK {
                    block += fp8::decode_e4m3(a_q[m * s.k + k]) * fp8::decode_e4m3(w.data()[n * s.k + k]);
                }
                total += block * a_s[m * kb_n + kb] * w.scale_at(n, kb * BLOCK);
            }
            out[m * s.n + n] = total;
        }
    }
    Ok(())
}

/// Either path on an f32 activation (the fp8 path quantises it with the reference quantiser).
pub fn gemm(a: &[f32], w: Fp8WeightRef<'_>, s: GemmShape, path: GemmPath, out: &mut [f32]) -> Result<()> {
    match path {
        GemmPath::Reference => gemm_dequant(a, w, s, out),
        GemmPath::Fp8 => {
            s.validate("gemm (reference)", path, a.len(), &w, out.len())?;
            let qs = ActQuantShape { rows: s.m, cols: s.k };
            let (mut q, mut sc) = (vec![0u8; a.len()], vec![0f32; s.m * qs.tiles()]);
            fp8::reference::act_quant(a, qs, ScaleFmt::Float, &mut q, &mut sc)?;
            gemm_fp8(&q, &sc, w, s, out)
        }
    }
}

/// Grouped, contiguous layout: expert `e` multiplies rows `offsets[e]..offsets[e+1]`.
pub fn grouped_contiguous(a: &[f32], offsets: &[u32], w: &[Fp8WeightRef<'_>], path: GemmPath, out: &mut [f32]) -> Result<()> {
    let g = GroupedShape::contiguous("grouped_contiguous (reference)", a.len(), offsets, &shapes(w), out.len())?;
    for e in 0..w.len() {
        let (r0, r1) = (offsets[e] as usize, offsets[e + 1] as usize);
        let s = GemmShape { m: r1 - r0, n: g.n, k: g.k };
        gemm(&a[r0 * g.k..r1 * g.k], w[e], s, path, &mut out[r0 * g.n..r1 * g.n])?;
    }
    Ok(())
}

/// Grouped, masked layout: `a` is `[E, capacity, K]`, expert `e` multiplies its first
/// `counts[e]` rows; the other rows of `out` are zero.
pub fn grouped_masked(a: &[f32], counts: &[u32], capacity: usize, w: &[Fp8WeightRef<'_>], path: GemmPath, out: &mut [f32]) -> Result<()> {
    let g = GroupedShape::masked("grouped_masked (reference)", a.len(), counts, capacity, &shapes(w), out.len())?;
    out.fill(0.0);
    for e in 0..w.len() {
        let rows = counts[e] as usize;
        let (a0, o0) = (e * capacity * g.k, e * capacity * g.n);
        let s = GemmShape { m: rows, n: g.n, k: g.k };
        gemm(&a[a0..a0 + rows * g.k], w[e], s, path, &mut out[o0..o0 + rows * g.n])?;
    }
    Ok(())
}
