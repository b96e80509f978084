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

/// Keys per decode work item (flash-decoding): a row's keys are cut at the absolute positions
/// `0, SPLIT_KEYS, 2·SPLIT_KEYS, ...`, so where a row is split, and so its result, depends on
/// its own length only, never on the other rows of the batch or on the thread count. 4 blocks
/// of [`KB`]: one 2,048-key row on 2 threads is 8 items, 4 per thread.
const SPLIT_KEYS: usize = 4 * KB;

/// Every row's key ranges, row after row, each row's in position order.
fn plan_splits(kv_lens: &[u32]) -> Vec<Split> {
    let mut out = Vec::new();
    for (b, &len) in kv_lens.iter().enumerate() {
        let len = len as usize;
        out.extend((0..len).step_by(SPLIT_KEYS).map(|k0| Split { b, k0, k1: (k0 + SPLIT_KEYS).min(len) }));
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
/// Parallel over (row, key range of 256 keys): every item reads its keys once for all
/// heads, in blocks of 64 that register-tiled micro-kernels multiply against 4 heads at a time;
/// each row merges its ranges by log-sum-exp in position order. A row's result depends only on
/// its own query, keys and length, not on the other rows of the batch.
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
    // The items run in waves whose partial outputs fit a fixed scratch budget (at least 4 per
    // thread); after each wave, every row merges its items into its running state in position
    // order, so the merge is the same however the waves fall.
    let wave = (DECODE_SCRATCH_BYTES / (hp * dv * 4)).max(4 * crate::cpu::threads()).min(splits.len()).max(1);
    let mut o_part = vec![0f32; wave * hp * dv];
    let mut ml = vec![0f32; wave * hp * 2];
    // Per row and head, the running max and sum of the merge (nothing merged yet: -inf, 0).
    let mut run: Vec<f32> = (0..p.batch * h_n).flat_map(|_| [f32::NEG_INFINITY, 0.0]).collect();
    out.fill(0.0);
    for items in splits.chunks(wave) {
        items.par_iter().zip(o_part.par_chunks_mut(hp * dv)).zip(ml.par_chunks_mut(hp * 2)).for_each(|((&sp, o), ml)| {
            decode_split(&qts[sp.b], pool, table, p, sp, o, ml);
        });
        let (b0, b1) = (items[0].b, items[items.len() - 1].b + 1);
        let rows = out[b0 * h_n * dv..b1 * h_n * dv].par_chunks_mut(h_n * dv).zip(run[b0 * h_n * 2..b1 * h_n * 2].par_chunks_mut(h_n * 2));
        rows.enumerate().for_each(|(i, (ob, rb))| {
            let b = b0 + i;
            let first = items.partition_point(|sp| sp.b < b);
            let last = items.partition_point(|sp| sp.b <= b);
            for it in first..last {
                merge_split(&o_part[it * hp * dv..], &ml[it * hp * 2..], h_n, dv, ob, rb);
            }
        });
    }
    out.par_chunks_mut(h_n * dv).zip(run.par_chunks(h_n * 2)).zip(kv_lens.par_iter()).for_each(|((ob, rb), &len)| {
        if len > 0 {
            for (o, l) in ob.chunks_exact_mut(dv).zip(rb.chunks_exact(2).map(|x| x[1])) {
                let inv = 1.0 / l;
                o.iter_mut().for_each(|x| *x *= inv);
            }
        }
    });
    Ok(())
}

/// Bytes of partial outputs one wave of [`decode`] items may hold (128 items of V3's 128 heads
/// x 512 values).
const DECODE_SCRATCH_BYTES: usize = 32 << 20;

/// Merges one split's result (`o [Hp, dv]` unnormalised outputs, `ml [Hp, 2]` max and sum per
/// head) into a row's running state (`ob [H, dv]`, `run [H, 2]`) by log-sum-exp: both sides
/// are rescaled to the larger max. The first merge (running max `-inf`) copies the split.
fn merge_split(o: &[f32], ml: &[f32], h_n: usize, dv: usize, ob: &mut [f32], run: &mut [f32]) {
    for h in 0..h_n {
        let (m_i, l_i) = (ml[2 * h], ml[2 * h + 1]);
        let m_old = run[2 * h];
        let m_new = m_old.max(m_i);
        let (a, b) = (exp_fast(m_old - m_new), exp_fast(m_i - m_new));
        run[2 * h] = m_new;
        run[2 * h + 1] = run[2 * h + 1] * a + l_i * b;
        let acc = &mut ob[h * dv..(h + 1) * dv];
        if a != 1.0 {
            acc.iter_mut().for_each(|x| *x *= a);
        }
        axpy(acc, b, &o[h * dv..(h + 1) * dv]);
    }
}
