//! The absorbed form's per-head products with the bf16 halves of `kv_b_proj`: the decode
//! query `W_UK[h]ᵀ q_nope` ([`absorb_q`]) and the value up-projection `W_UV[h] ō`
//! ([`expand_v`]), batched over rows and parallel over (row tile, head).

use super::checks::{check_absorb, check_expand};
use super::core::tile_rows;
use super::{CT, HB, MlaDims, ROW_TILE};
use crate::bf16_gemm::{self, Bf16WeightRef};
use crate::cpu::dispatch;
use crate::error::Result;
use rayon::prelude::*;

/// Rows per register tile of the head-batched matmuls (and padding of their row tiles).
const RB: usize = HB;

/// bf16 → f32, exact.
#[inline(always)]
fn widen1(x: half::bf16) -> f32 {
    f32::from_bits((x.to_bits() as u32) << 16)
}

/// bf16 → f32 of a fixed-size chunk, exact.
#[inline(always)]
fn widen<const N: usize>(src: &[half::bf16; N]) -> [f32; N] {
    std::array::from_fn(|i| widen1(src[i]))
}

/// One (head, [`RB`]-row tile) of [`absorb_q`]: `out[r, c] = Σ_e qt[e·RB + r] · w[e, c]` with
/// `qt` the tile's `[nope][RB]` transposed queries, `w` the head's `[nope, l]` bf16 block and
/// `out` `[RB, l]`. Register tile `RB × CT`; each bf16 weight strip is widened once per tile.
#[inline(always)]
fn absorb_tile_body(qt: &[f32], w: &[half::bf16], l: usize, out: &mut [f32]) {
    let mut c0 = 0;
    while c0 + CT <= l {
        let mut acc = [[0f32; CT]; RB];
        for (e, qe) in qt.chunks_exact(RB).enumerate() {
            let (Some(q), Some(wr)) = (qe.first_chunk::<RB>(), w.get(e * l + c0..).and_then(|x| x.first_chunk::<CT>())) else { break };
            let wf = widen(wr);
            for r in 0..RB {
                for c in 0..CT {
                    acc[r][c] = q[r].mul_add(wf[c], acc[r][c]);
                }
            }
        }
        if let Some(rows) = tile_rows(out, l, c0) {
            for r in 0..RB {
                for c in 0..CT {
                    rows[r][c] = acc[r][c];
                }
            }
        }
        c0 += CT;
    }
    for c in c0..l {
        for r in 0..RB {
            let mut a = 0f32;
            for (e, qe) in qt.chunks_exact(RB).enumerate() {
                a = qe[r].mul_add(widen1(w[e * l + c]), a);
            }
            out[r * l + c] = a;
        }
    }
}

/// `[x_r · w for r < RB]`: dot products of the `RB` rows of `x` (`[RB, l]`) with `w` (`[l]`),
/// each over 16 lanes (`RB × 16` accumulators in registers), reduced at the end.
#[inline(always)]
fn dots4(x: &[f32], l: usize, w: &[f32]) -> [f32; RB] {
    const L: usize = 16;
    let mut acc = [[0f32; L]; RB];
    let mut c = 0;
    while c + L <= l {
        let Some(wc) = w.get(c..).and_then(|s| s.first_chunk::<L>()) else { break };
        for r in 0..RB {
            let Some(xr) = x.get(r * l + c..).and_then(|s| s.first_chunk::<L>()) else { break };
            for i in 0..L {
                acc[r][i] = xr[i].mul_add(wc[i], acc[r][i]);
            }
        }
        c += L;
    }
    let mut out = [0f32; RB];
    for r in 0..RB {
        let mut s = 0f32;
        for i in 0..L {
            s += acc[r][i];
        }
        for cc in c..l {
            s = x[r * l + cc].mul_add(w[cc], s);
        }
        out[r] = s;
    }
    out
}

/// One (head, [`RB`]-row tile) of [`expand_v`]: `out[r, e] = Σ_c w[e, c] · x[r, c]` with `x`
/// the tile's `[RB, l]` latent outputs, `w` the head's `[v, l]` bf16 block and `out` `[RB, v]`.
/// Each weight row is widened once per tile into `wrow` (`[l]`, L1) and dotted with the rows.
#[inline(always)]
fn expand_tile_body(x: &[f32], w: &[half::bf16], l: usize, wrow: &mut [f32], out: &mut [f32]) {
    let v = w.len() / l;
    for (e, we) in w.chunks_exact(l).enumerate() {
        for (d, &b) in wrow.iter_mut().zip(we) {
            *d = widen1(b);
        }
        let dots = dots4(x, l, wrow);
        for r in 0..RB {
            out[r * v + e] = dots[r];
        }
    }
}

dispatch!(fn absorb_tile(qt: &[f32], w: &[half::bf16], l: usize, out: &mut [f32]) = absorb_tile_body;);
dispatch!(fn expand_tile(x: &[f32], w: &[half::bf16], l: usize, wrow: &mut [f32], out: &mut [f32]) = expand_tile_body;);

/// Runs `work(t0, nr, h, dst)` for every (row tile of up to [`ROW_TILE`] rows, head) in
/// parallel; `dst` is that pair's `[nr padded to RB, width]` block of a head-major scratch
/// buffer, which is returned (see [`head_major_at`]).
fn head_major(rows: usize, heads: usize, width: usize, work: impl Fn(usize, usize, usize, &mut [f32]) + Sync) -> Vec<f32> {
    let tiles = rows.div_ceil(ROW_TILE);
    let padded: usize = (0..tiles).map(|t| (rows - t * ROW_TILE).min(ROW_TILE).next_multiple_of(RB)).sum();
    let mut tmp = vec![0f32; padded * heads * width];
    let mut parts: Vec<(usize, usize, usize, &mut [f32])> = Vec::with_capacity(tiles * heads);
    let mut rest = tmp.as_mut_slice();
    for tile in 0..tiles {
        let nr = (rows - tile * ROW_TILE).min(ROW_TILE);
        for h in 0..heads {
            let (a, b) = rest.split_at_mut(nr.next_multiple_of(RB) * width);
            parts.push((tile * ROW_TILE, nr, h, a));
            rest = b;
        }
    }
    parts.into_par_iter().for_each(|(t0, nr, h, dst)| work(t0, nr, h, dst));
    tmp
}

/// [`head_major`] over the sum of `parts` products: `work(p, t0, nr, h, dst)` writes part
/// `p`'s block, and the parts' blocks are added in order (`dst = part 0 + part 1 + ...`, one
/// f32 add each) inside the same task.
fn head_major_parts(
    rows: usize,
    heads: usize,
    width: usize,
    parts: usize,
    work: impl Fn(usize, usize, usize, usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    head_major(rows, heads, width, |t0, nr, h, dst| {
        work(0, t0, nr, h, dst);
        if parts > 1 {
            let mut part = vec![0f32; dst.len()];
            for p in 1..parts {
                work(p, t0, nr, h, &mut part);
                dst.iter_mut().zip(&part).for_each(|(a, b)| *a += b);
            }
        }
    })
}

/// `f(t, row t of out)` for the `width`-wide rows of `out`: in parallel only for a batch (a
/// decode step of one sequence copies a few KiB: not worth waking the pool).
fn par_rows(out: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if out.len() <= 4 * width {
        out.chunks_mut(width).enumerate().for_each(|(t, o)| f(t, o));
    } else {
        out.par_chunks_mut(width).enumerate().for_each(|(t, o)| f(t, o));
    }
}

/// Offset of row `t`, head `h` in [`head_major`]'s buffer.
#[inline]
fn head_major_at(rows: usize, heads: usize, width: usize, t: usize, h: usize) -> usize {
    let (t0, r) = (t - t % ROW_TILE, t % ROW_TILE);
    let nr = (rows - t0).min(ROW_TILE).next_multiple_of(RB);
    (t0 * heads + h * nr + r) * width
}

/// The absorbed decode query: for each row `t` and head `h`,
/// `out[t,h,0..kv_lora] = W_UK[h]ᵀ q[t,h,0..nope]` (`W_UK[h]` = rows `h·nope..(h+1)·nope` of
/// `w_uk`, docs/model.md §3.7 item 2) and `out[t,h,kv_lora..] = q[t,h,nope..]` (`q_pe`, already rotated).
/// `q` is `[rows, H, nope + rope]`, `out` `[rows, H, kv_lora + rope]` ([`decode`](fn@super::decode)'s query).
///
/// Parallel over (row tile, head): each head's weight block is read once per 32 rows.
///
/// Errors (before any write): bad dims, `w_uk` not `[H·nope, kv_lora]`, a length mismatch.
pub fn absorb_q(q: &[f32], w_uk: Bf16WeightRef<'_>, d: MlaDims, rows: usize, out: &mut [f32]) -> Result<()> {
    absorb_q_parts(q, &[w_uk], d, rows, out)
}

/// [`absorb_q`] with `W_UK` the sum of `parts` (a bf16 pair `hi + lo`): the latent columns are
/// `Σ_p W_UK,p[h]ᵀ q` summed in the order of the parts, each part's product as
/// [`absorb_q`]'s, all in one pass over the heads.
pub fn absorb_q_parts(q: &[f32], parts: &[Bf16WeightRef<'_>], d: MlaDims, rows: usize, out: &mut [f32]) -> Result<()> {
    const OP: &str = "attention::absorb_q";
    if parts.is_empty() {
        return Err(crate::error::shape_err(OP, "w_uk needs at least one part"));
    }
    for w_uk in parts {
        check_absorb(OP, q.len(), (w_uk.rows(), w_uk.cols()), d, rows, out.len())?;
    }
    if rows == 0 {
        return Ok(());
    }
    let (qh, oh, l, n, h_n) = (d.qk_head(), d.latent(), d.kv_lora, d.qk_nope, d.heads);
    let stride = h_n * qh;
    let tmp = head_major_parts(rows, h_n, l, parts.len(), |p, t0, nr, h, dst| {
        let wh = &parts[p].data()[h * n * l..(h + 1) * n * l];
        let qs: Vec<&[f32]> = (t0..t0 + nr).map(|t| &q[t * stride + h * qh..t * stride + h * qh + n]).collect();
        if bf16_gemm::rows::vecmat(&qs, wh, l, &mut dst.chunks_exact_mut(l).take(nr).collect::<Vec<_>>()) {
            return;
        }
        let mut qt = vec![0f32; n * RB];
        for (r0, o) in (0..nr).step_by(RB).zip(dst.chunks_exact_mut(RB * l)) {
            for r in 0..RB {
                let t = t0 + (r0 + r).min(nr - 1);
                for (e, &v) in q[t * stride + h * qh..t * stride + h * qh + n].iter().enumerate() {
                    qt[e * RB + r] = v;
                }
            }
            absorb_tile(&qt, wh, l, o);
        }
    });
    par_rows(out, h_n * oh, |t, o| {
        for h in 0..h_n {
            let at = head_major_at(rows, h_n, l, t, h);
            o[h * oh..h * oh + l].copy_from_slice(&tmp[at..at + l]);
            o[h * oh + l..(h + 1) * oh].copy_from_slice(&q[t * stride + h * qh + n..t * stride + (h + 1) * qh]);
        }
    });
    Ok(())
}

/// The value up-projection of the absorbed form (docs/model.md §3.7 item 4): for each row `t` and head
/// `h`, `out[t, h·v..(h+1)·v] = W_UV[h] o_lat[t,h]` with `W_UV[h]` = rows `h·v..(h+1)·v` of
/// `w_uv` (`[H·v, kv_lora]`). `o_lat` is `[rows, H, kv_lora]` ([`decode`](fn@super::decode)'s output), `out`
/// `[rows, H·v]`, the input layout of `o_proj` (column `h·v + e`, docs/model.md §2).
///
/// Errors (before any write): bad dims, `w_uv` not `[H·v, kv_lora]`, a length mismatch.
pub fn expand_v(o_lat: &[f32], w_uv: Bf16WeightRef<'_>, d: MlaDims, rows: usize, out: &mut [f32]) -> Result<()> {
    expand_v_parts(o_lat, &[w_uv], d, rows, out)
}

/// [`expand_v`] with `W_UV` the sum of `parts` (a bf16 pair `hi + lo`): each part's product as
/// [`expand_v`]'s, summed in the order of the parts, all in one pass over the heads.
pub fn expand_v_parts(o_lat: &[f32], parts: &[Bf16WeightRef<'_>], d: MlaDims, rows: usize, out: &mut [f32]) -> Result<()> {
    const OP: &str = "attention::expand_v";
    if parts.is_empty() {
        return Err(crate::error::shape_err(OP, "w_uv needs at least one part"));
    }
    for w_uv in parts {
        check_expand(OP, o_lat.len(), (w_uv.rows(), w_uv.cols()), d, rows, out.len())?;
    }
    if rows == 0 {
        return Ok(());
    }
    let (l, v, h_n) = (d.kv_lora, d.v, d.heads);
    let stride = h_n * l;
    let tmp = head_major_parts(rows, h_n, v, parts.len(), |p, t0, nr, h, dst| {
        let wh = &parts[p].data()[h * v * l..(h + 1) * v * l];
        let xs: Vec<&[f32]> = (t0..t0 + nr).map(|t| &o_lat[t * stride + h * l..t * stride + (h + 1) * l]).collect();
        if bf16_gemm::rows::dots(&xs, wh, l, &mut dst[..nr * v]) {
            return;
        }
        let (mut x, mut wrow) = (vec![0f32; RB * l], vec![0f32; l]);
        for (r0, o) in (0..nr).step_by(RB).zip(dst.chunks_exact_mut(RB * v)) {
            for (r, xr) in x.chunks_exact_mut(l).enumerate() {
                let t = t0 + (r0 + r).min(nr - 1);
                xr.copy_from_slice(&o_lat[t * stride + h * l..t * stride + (h + 1) * l]);
            }
            expand_tile(&x, wh, l, &mut wrow, o);
        }
    });
    par_rows(out, h_n * v, |t, o| {
        for h in 0..h_n {
            let at = head_major_at(rows, h_n, v, t, h);
            o[h * v..(h + 1) * v].copy_from_slice(&tmp[at..at + v]);
        }
    });
    Ok(())
}
