//! Writing new rows into the paged latent cache, and copying sequences' rows out of it.

use super::checks::{check_cache_write, check_gather, slot_of};
use super::{CacheWriteShape, GatherShape};
use crate::error::Result;
use rayon::prelude::*;

/// Normalises the latent of each `kv` row (`[tokens, kv_lora + rope]`, RoPE already applied to
/// the last `rope` values) with `norm_w` (`kv_a_layernorm`, `[kv_lora]`) and writes
/// `[c_kv | k_pe]` to `pool` at `slots[t]` (module docs). Rows of the pool not named in `slots`
/// are untouched.
///
/// Errors (before any write): a bad pool shape, a length mismatch, `eps` not finite and ≥ 0,
/// a slot outside the pool, or a slot named twice.
pub fn cache_write(kv: &[f32], norm_w: &[f32], eps: f32, slots: &[u32], s: CacheWriteShape, pool: &mut [f32]) -> Result<()> {
    const OP: &str = "attention::cache_write";
    check_cache_write(OP, kv.len(), norm_w.len(), eps, slots, s, pool.len())?;
    let (w, l) = (s.pool.width(), s.pool.kv_lora);
    let shape = crate::norm::RowsShape { rows: 1, cols: l };
    for (t, &slot) in slots.iter().enumerate() {
        let row = &kv[t * w..(t + 1) * w];
        let dst = &mut pool[slot as usize * w..(slot as usize + 1) * w];
        let (lat, pe) = dst.split_at_mut(l);
        crate::norm::rms_norm(&row[..l], norm_w, shape, eps, lat)?;
        pe.copy_from_slice(&row[l..]);
    }
    Ok(())
}

/// Copies the first `seq_lens[i]` cached rows of each sequence `i` (block-table row `i`) out
/// of the pool, sequence after sequence in position order, split into `c_kv [keys, kv_lora]`
/// (the input of the `W_UK`/`W_UV` up-projections) and `k_pe [keys, rope]`.
///
/// Errors (before any write): a bad pool shape, a length mismatch, `Σ seq_lens != keys`, a
/// length that does not fit its block table, or a page id outside the pool.
pub fn gather(pool: &[f32], table: &[u32], lens: &[u32], s: GatherShape, c_kv: &mut [f32], k_pe: &mut [f32]) -> Result<()> {
    const OP: &str = "attention::gather";
    check_gather(OP, pool.len(), table, lens, s, c_kv.len(), k_pe.len())?;
    let (w, l, r, ps) = (s.pool.width(), s.pool.kv_lora, s.pool.rope, s.pool.page_size);
    let mut parts: Vec<(usize, &mut [f32], &mut [f32])> = Vec::with_capacity(s.seqs);
    let (mut rest_c, mut rest_p) = (c_kv, k_pe);
    for (i, &len) in lens.iter().enumerate() {
        let (hc, tc) = rest_c.split_at_mut(len as usize * l);
        let (hp, tp) = rest_p.split_at_mut(len as usize * r);
        parts.push((i, hc, hp));
        (rest_c, rest_p) = (tc, tp);
    }
    parts.into_par_iter().for_each(|(i, dc, dp)| {
        let row = &table[i * s.max_blocks..(i + 1) * s.max_blocks];
        for (pos, (c, p)) in dc.chunks_exact_mut(l).zip(dp.chunks_exact_mut(r)).enumerate() {
            let src = slot_of(row, ps, pos) * w;
            c.copy_from_slice(&pool[src..src + l]);
            p.copy_from_slice(&pool[src + l..src + w]);
        }
    });
    Ok(())
}
