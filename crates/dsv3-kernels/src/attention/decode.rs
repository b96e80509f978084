//! MLA decode over the paged latent cache (FlashMLA's contract), split over key ranges
//! (flash-decoding) and merged by log-sum-exp.

use super::checks::check_decode;
use super::core::{Block, State, attend_block, transpose_queries};
use super::{DecodeParams, HB, JT, KB};
use crate::act::exp_fast;
use crate::cpu::dispatch;
use crate::error::Result;
use rayon::prelude::*;

/// `acc[i] += a · x[i]`.
#[inline(always)]
fn axpy_body(acc: &mut [f32], a: f32, x: &[f32]) {
    for (o, &v) in acc.iter_mut().zip(x) {
        *o = a.mul_add(v, *o);
    }
}

dispatch!(fn axpy(acc: &mut [f32], a: f32, x: &[f32]) = axpy_body;);

/// One decode work item: query row `b`, keys `k0..k1` of its sequence.
#[derive(Debug, Clone, Copy)]
struct Split {
    b: usize,
    k0: usize,
    k1: usize,
}

/// Splits every row's keys into ranges so that the batch yields up to 4 items per thread
/// (flash-decoding), each of at least about 4 blocks; when there are at least as many items as
/// threads, their count is a multiple of the thread count, so the threads get equal shares
/// (one 1,025-key row on 2 threads: 4 ranges of <= 272 keys, not 4 of 256 and one of 1).
fn plan_splits(kv_lens: &[u32]) -> Vec<Split> {
    let total: usize = kv_lens.iter().map(|&l| l as usize).sum();
    let threads = crate::cpu::threads().max(1);
    let items = total.div_ceil(4 * KB).clamp(1, 4 * threads);
    let items = if items >= threads { items / threads * threads } else { items };
    let per = total.div_ceil(items).next_multiple_of(JT);
    let mut out = Vec::new();
    for (b, &len) in kv_lens.iter().enumerate() {
        let len = len as usize;
        let mut k0 = 0;
        while k0 < len {
            let k1 = (k0 + per).min(len);
            out.push(Split { b, k0, k1 });
            k0 = k1;
        }
    }
    out
}

/// Runs one split: all heads of query row `b` against keys `k0..k1`, leaving the unnormalised
/// output in `o [Hp, dv]` and `(m, l)` per head in `ml [Hp, 2]` (`Hp` = heads padded to a
/// multiple of [`HB`]).
fn decode_split(qt: &[f32], pool: &[f32], table: &[u32], p: &DecodeParams, sp: Split, o: &mut [f32], ml: &mut [f32]) {
    let (w, dv, ps, h_n) = (p.pool.width(), p.pool.kv_lora, p.pool.page_size, p.heads);
    let hp = h_n.next_multiple_of(HB);
    let row = &table[sp.b * p.max_blocks..(sp.b + 1) * p.max_blocks];
    let mut m = vec![f32::NEG_INFINITY; hp];
    let mut l = vec![0f32; hp];
    let mut s = vec![[[0f32; KB]; HB]; hp / HB];
    o.fill(0.0);
    let mut kt = vec![0f32; w * JT];
    let mut vis = vec![0usize; hp];
    let mut pos = sp.k0;
    while pos < sp.k1 {
        let off = pos % ps;
        let nk = KB.min(sp.k1 - pos).min(ps - off);
        let base = (row[pos / ps] as usize * ps + off) * w;
        let block = &pool[base..base + nk * w];
        vis[..h_n].fill(nk);
        let blk = Block {
            qt,
            k1: block,
            k1_stride: w,
            d1: w,
            k2: &[],
            k2_stride: 0,
            d: w,
            nk,
            v: block,
            v_stride: w,
            dv,
            vis: &vis,
            scale: p.scale,
        };
        attend_block(&blk, &mut State { m: &mut m, l: &mut l, o, s: &mut s }, &mut kt);
        pos += nk;
    }
    for h in 0..hp {
        ml[2 * h] = m[h];
        ml[2 * h + 1] = l[h];
    }
}

/// MLA decode over the paged latent cache (docs/model.md §3.7 item 3, FlashMLA's contract): for each
/// query row `b` and head `h`, `s_j = (q[b,h,:] · K_j) · scale` over the `width` values of each
/// cached row `K_j`, `j < kv_lens[b]` (read through block-table row `b`), softmax over `j`, and
/// `out[b,h,:] = Σ_j P_j K_j[0..kv_lora]` (`ō`, before `W_UV`). `q` is `[batch, H, width]` (from
/// [`absorb_q`](super::absorb_q)), `out` `[batch, H, kv_lora]`. A row with `kv_lens[b] == 0` gets zeros.
///
/// Parallel over (row, key range): every item reads its keys once for all heads, in blocks of
/// 64 that register-tiled micro-kernels multiply against 4 heads at a time; partial results
/// are merged by log-sum-exp.
///
/// Errors (before any write): a bad pool shape, `heads == 0`, a non-finite scale, a length
/// mismatch, a length that does not fit its block table, or a page id outside the pool.
pub fn decode(q: &[f32], pool: &[f32], table: &[u32], kv_lens: &[u32], p: &DecodeParams, out: &mut [f32]) -> Result<()> {
    const OP: &str = "attention::decode";
    check_decode(OP, q.len(), pool.len(), table, kv_lens, p, out.len())?;
    if p.batch == 0 {
        return Ok(());
    }
    let (h_n, dv) = (p.heads, p.pool.kv_lora);
    let hp = h_n.next_multiple_of(HB);
    let splits = plan_splits(kv_lens);
    // Each row's queries transposed once, for all of its key ranges.
    let w = p.pool.width();
    let qts: Vec<Vec<f32>> = q.par_chunks(h_n * w).map(|qb| transpose_queries(h_n, w, |h| &qb[h * w..(h + 1) * w])).collect();
    let mut o_part = vec![0f32; splits.len() * hp * dv];
    let mut ml = vec![0f32; splits.len() * hp * 2];
    splits.par_iter().zip(o_part.par_chunks_mut(hp * dv)).zip(ml.par_chunks_mut(hp * 2)).for_each(|((&sp, o), ml)| {
        decode_split(&qts[sp.b], pool, table, p, sp, o, ml);
    });
    let mut first = vec![0usize; p.batch + 1];
    for sp in &splits {
        first[sp.b + 1] += 1;
    }
    for b in 0..p.batch {
        first[b + 1] += first[b];
    }
    out.par_chunks_mut(h_n * dv).enumerate().for_each(|(b, ob)| {
        let items = first[b]..first[b + 1];
        if items.is_empty() {
            ob.fill(0.0);
            return;
        }
        for h in 0..h_n {
            let mx = items.clone().map(|i| ml[(i * hp + h) * 2]).fold(f32::NEG_INFINITY, f32::max);
            let o = &mut ob[h * dv..(h + 1) * dv];
            o.fill(0.0);
            let mut denom = 0f32;
            for i in items.clone() {
                let wgt = exp_fast(ml[(i * hp + h) * 2] - mx);
                denom += wgt * ml[(i * hp + h) * 2 + 1];
                axpy(o, wgt, &o_part[(i * hp + h) * dv..(i * hp + h + 1) * dv]);
            }
            let inv = 1.0 / denom;
            o.iter_mut().for_each(|x| *x *= inv);
        }
    });
    Ok(())
}
