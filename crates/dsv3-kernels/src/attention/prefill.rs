//! The expanded causal attention of a batch of sequences (varlen, absolute positions).

use super::checks::{PrefillCheck, check_prefill};
use super::core::{Block, State, attend_block, transpose_queries};
use super::{HB, JT, KB, PrefillInputs, PrefillParams, QB};
use crate::error::Result;
use rayon::prelude::*;

/// One prefill work item: sequence `seq`, head `h`, query rows `t0..t1` (at most [`QB`]).
#[derive(Debug, Clone, Copy)]
struct PrefillItem {
    seq: usize,
    h: usize,
    t0: usize,
    t1: usize,
}

/// One prefill item; `o` is `[rows padded to a multiple of HB, dv]`.
fn prefill_item(x: &PrefillInputs<'_, [f32], [u32]>, p: &PrefillParams, it: PrefillItem, o: &mut [f32]) {
    let d = p.dims;
    let (qh, h_n, dn, dr, dv) = (d.qk_head(), d.heads, d.qk_nope, d.qk_rope, d.v);
    let rows = it.t1 - it.t0;
    let kb = x.cu_k[it.seq] as usize;
    let qt = transpose_queries(rows, qh, |r| &x.q[((it.t0 + r) * h_n + it.h) * qh..][..qh]);
    let pos: Vec<usize> = (it.t0..it.t1).map(|t| x.q_pos[t] as usize).collect();
    let max_pos = pos.iter().copied().max().unwrap_or(0);
    let rp = rows.next_multiple_of(HB);
    let mut m = vec![f32::NEG_INFINITY; rp];
    let mut l = vec![0f32; rp];
    let mut s = vec![[[0f32; KB]; HB]; rp / HB];
    o.fill(0.0);
    let mut kt = vec![0f32; qh * JT];
    let mut vis = vec![0usize; rp];
    let mut k0 = 0;
    while k0 <= max_pos {
        let nk = KB.min(max_pos + 1 - k0);
        for (v, &p) in vis.iter_mut().zip(&pos) {
            *v = (p + 1).saturating_sub(k0).min(nk);
        }
        let v = &x.v[((kb + k0) * h_n + it.h) * dv..];
        let blk = Block {
            qt: &qt,
            k1: &x.k_nope[((kb + k0) * h_n + it.h) * dn..],
            k1_stride: h_n * dn,
            d1: dn,
            k2: &x.k_pe[(kb + k0) * dr..],
            k2_stride: dr,
            d: qh,
            nk,
            v,
            v_stride: h_n * dv,
            dv,
            vis: &vis,
            scale: p.scale,
        };
        attend_block(&blk, &mut State { m: &mut m, l: &mut l, o, s: &mut s }, &mut kt);
        k0 += nk;
    }
    for r in 0..rows {
        let inv = 1.0 / l[r];
        o[r * dv..(r + 1) * dv].iter_mut().for_each(|x| *x *= inv);
    }
}

/// The expanded (naive) causal attention of docs/model.md §3.3 steps 4–5 for a batch of sequences:
/// for query `t` of sequence `i` and head `h`, `k_j = [k_nope[j,h] | k_pe_j]` (the shared
/// `k_pe`), `s_j = (q[t,h] · k_j) · scale` for keys `j <= q_pos[t]`
/// (absolute positions: a chunk at positions `p0..p1` sees the cached keys `0..p1`), softmax
/// in f32, `out[t, h·v..(h+1)·v] = Σ_j P_j v[j,h]`. `out` is `[T, H·v]`, `o_proj`'s input.
///
/// Parallel over (sequence, head, block of 16 queries); each item streams the visible keys in
/// blocks of 64 with an online softmax.
///
/// Errors (before any write): bad dims, a non-finite scale, a length mismatch, `cu_q`/`cu_k`
/// not running from 0 to `tokens`/`keys` without decreasing, or a query position with no key.
pub fn prefill(x: PrefillInputs<'_, [f32], [u32]>, p: &PrefillParams, out: &mut [f32]) -> Result<()> {
    const OP: &str = "attention::prefill";
    check_prefill(OP, &PrefillCheck::of(&x), p, out.len())?;
    let (h_n, dv) = (p.dims.heads, p.dims.v);
    let mut items = Vec::new();
    for seq in 0..p.seqs {
        let (a, b) = (x.cu_q[seq] as usize, x.cu_q[seq + 1] as usize);
        for t0 in (a..b).step_by(QB) {
            for h in 0..h_n {
                items.push(PrefillItem { seq, h, t0, t1: (t0 + QB).min(b) });
            }
        }
    }
    let mut tmp = vec![0f32; items.len() * QB * dv];
    items
        .par_iter()
        .zip(tmp.par_chunks_mut(QB * dv))
        .for_each(|(&it, o)| prefill_item(&x, p, it, &mut o[..(it.t1 - it.t0).next_multiple_of(HB) * dv]));
    for (it, o) in items.iter().zip(tmp.chunks(QB * dv)) {
        for t in it.t0..it.t1 {
            let r = t - it.t0;
            out[(t * h_n + it.h) * dv..(t * h_n + it.h + 1) * dv].copy_from_slice(&o[r * dv..(r + 1) * dv]);
        }
    }
    Ok(())
}
