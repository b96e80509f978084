//! The checks of every attention op. They take the lengths of the buffers (and the index
//! arrays the checks must read), so the CPU and the CUDA backend share them and return the same
//! errors; every op runs them before any work.

use super::{CacheWriteShape, DecodeParams, GatherShape, LatentPool, MlaDims, PrefillInputs, PrefillParams};
use crate::error::{Result, check_len, checked_mul, invalid, shape_err};

fn check_scale(op: &'static str, scale: f32) -> Result<()> {
    if scale.is_finite() { Ok(()) } else { Err(invalid(op, "scale", format!("must be finite, got {scale}"))) }
}

/// Every row's `lens[r]` fits its block table, and every page it reads is in the pool.
fn check_tables(op: &'static str, what: &'static str, table: &[u32], lens: &[u32], max_blocks: usize, pool: &LatentPool) -> Result<()> {
    for (r, &len) in lens.iter().enumerate() {
        let need = (len as usize).div_ceil(pool.page_size);
        if need > max_blocks {
            return Err(invalid(op, what, format!("row {r}: {len} tokens need {need} pages, the block table has {max_blocks}")));
        }
        let row = &table[r * max_blocks..r * max_blocks + need];
        if let Some((i, &p)) = row.iter().enumerate().find(|&(_, &p)| p as usize >= pool.num_pages) {
            return Err(invalid(op, "block_table", format!("row {r}, block {i}: page {p} >= num_pages {}", pool.num_pages)));
        }
    }
    Ok(())
}

/// Checks `cu` is a valid prefix-offset array of `n + 1` entries from 0 to `total`.
fn check_cu(op: &'static str, what: &'static str, cu: &[u32], n: usize, total: usize) -> Result<()> {
    check_len(op, what, cu.len(), n + 1)?;
    if cu[0] != 0 || cu[n] as usize != total {
        return Err(invalid(op, what, format!("must run from 0 to {total}, got {} .. {}", cu[0], cu[n])));
    }
    if let Some(i) = (0..n).find(|&i| cu[i + 1] < cu[i]) {
        return Err(invalid(op, what, format!("decreases at entry {i}: {} > {}", cu[i], cu[i + 1])));
    }
    Ok(())
}

// The checks of every op take the lengths of the f32 buffers (the CPU and the CUDA backend
// run the same checks; only index arrays are read).

pub(crate) fn check_cache_write(
    op: &'static str,
    kv: usize,
    norm_w: usize,
    eps: f32,
    slots: &[u32],
    s: CacheWriteShape,
    pool: usize,
) -> Result<()> {
    let plen = s.pool.check(op)?;
    check_len(op, "pool", pool, plen)?;
    check_len(op, "kv", kv, checked_mul(op, "tokens * width", s.tokens, s.pool.width())?)?;
    check_len(op, "norm_w", norm_w, s.pool.kv_lora)?;
    check_len(op, "slots", slots.len(), s.tokens)?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(invalid(op, "eps", format!("must be finite and >= 0, got {eps}")));
    }
    let n_slots = s.pool.num_pages * s.pool.page_size;
    if let Some((t, &sl)) = slots.iter().enumerate().find(|&(_, &sl)| sl as usize >= n_slots) {
        return Err(invalid(op, "slots", format!("token {t}: slot {sl} >= {n_slots} slots in the pool")));
    }
    let mut sorted = slots.to_vec();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(invalid(op, "slots", format!("slot {} is written twice", w[0])));
    }
    Ok(())
}

pub(crate) fn check_gather(
    op: &'static str,
    pool: usize,
    table: &[u32],
    lens: &[u32],
    s: GatherShape,
    c_kv: usize,
    k_pe: usize,
) -> Result<()> {
    let plen = s.pool.check(op)?;
    check_len(op, "pool", pool, plen)?;
    check_len(op, "block_table", table.len(), checked_mul(op, "seqs * max_blocks", s.seqs, s.max_blocks)?)?;
    check_len(op, "seq_lens", lens.len(), s.seqs)?;
    let total: u64 = lens.iter().map(|&l| u64::from(l)).sum();
    if total != s.keys as u64 {
        return Err(invalid(op, "seq_lens", format!("sum to {total}, shape says keys = {}", s.keys)));
    }
    check_len(op, "c_kv", c_kv, checked_mul(op, "keys * kv_lora", s.keys, s.pool.kv_lora)?)?;
    check_len(op, "k_pe", k_pe, checked_mul(op, "keys * rope", s.keys, s.pool.rope)?)?;
    check_tables(op, "seq_lens", table, lens, s.max_blocks, &s.pool)
}

/// `w` is the `(rows, cols)` of `W_UK`.
pub(crate) fn check_absorb(op: &'static str, q: usize, w: (usize, usize), d: MlaDims, rows: usize, out: usize) -> Result<()> {
    d.check(op)?;
    if w.0 != d.heads * d.qk_nope || w.1 != d.kv_lora {
        return Err(shape_err(
            op,
            format!("w_uk is [{}, {}], expected [heads * qk_nope = {}, kv_lora = {}]", w.0, w.1, d.heads * d.qk_nope, d.kv_lora),
        ));
    }
    check_len(op, "q", q, checked_mul(op, "q", rows, d.heads * d.qk_head())?)?;
    check_len(op, "out", out, checked_mul(op, "out", rows, d.heads * d.latent())?)
}

/// `w` is the `(rows, cols)` of `W_UV`.
pub(crate) fn check_expand(op: &'static str, o_lat: usize, w: (usize, usize), d: MlaDims, rows: usize, out: usize) -> Result<()> {
    d.check(op)?;
    if w.0 != d.heads * d.v || w.1 != d.kv_lora {
        return Err(shape_err(
            op,
            format!("w_uv is [{}, {}], expected [heads * v = {}, kv_lora = {}]", w.0, w.1, d.heads * d.v, d.kv_lora),
        ));
    }
    check_len(op, "o_lat", o_lat, checked_mul(op, "o_lat", rows, d.heads * d.kv_lora)?)?;
    check_len(op, "out", out, checked_mul(op, "out", rows, d.heads * d.v)?)
}

pub(crate) fn check_decode(
    op: &'static str,
    q: usize,
    pool: usize,
    table: &[u32],
    kv_lens: &[u32],
    p: &DecodeParams,
    out: usize,
) -> Result<()> {
    let plen = p.pool.check(op)?;
    if p.heads == 0 {
        return Err(shape_err(op, "heads must be > 0"));
    }
    check_scale(op, p.scale)?;
    check_len(op, "pool", pool, plen)?;
    let bh = checked_mul(op, "batch * heads", p.batch, p.heads)?;
    check_len(op, "q", q, checked_mul(op, "q", bh, p.pool.width())?)?;
    check_len(op, "out", out, checked_mul(op, "out", bh, p.pool.kv_lora)?)?;
    check_len(op, "block_table", table.len(), checked_mul(op, "batch * max_blocks", p.batch, p.max_blocks)?)?;
    check_len(op, "kv_lens", kv_lens.len(), p.batch)?;
    check_tables(op, "kv_lens", table, kv_lens, p.max_blocks, &p.pool)
}

/// What the checks of [`prefill`] read: the lengths of the f32 inputs and the index arrays.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PrefillCheck<'a> {
    pub q: usize,
    pub k_nope: usize,
    pub k_pe: usize,
    pub v: usize,
    pub q_pos: &'a [u32],
    pub cu_q: &'a [u32],
    pub cu_k: &'a [u32],
}

impl<'a> PrefillCheck<'a> {
    pub(crate) fn of(x: &PrefillInputs<'a, [f32], [u32]>) -> Self {
        PrefillCheck { q: x.q.len(), k_nope: x.k_nope.len(), k_pe: x.k_pe.len(), v: x.v.len(), q_pos: x.q_pos, cu_q: x.cu_q, cu_k: x.cu_k }
    }
}

pub(crate) fn check_prefill(op: &'static str, x: &PrefillCheck<'_>, p: &PrefillParams, out: usize) -> Result<()> {
    let d = p.dims;
    d.check(op)?;
    check_scale(op, p.scale)?;
    let (t, s) = (p.tokens, p.keys);
    check_len(op, "q", x.q, checked_mul(op, "q", t, d.heads * d.qk_head())?)?;
    check_len(op, "k_nope", x.k_nope, checked_mul(op, "k_nope", s, d.heads * d.qk_nope)?)?;
    check_len(op, "k_pe", x.k_pe, checked_mul(op, "k_pe", s, d.qk_rope)?)?;
    check_len(op, "v", x.v, checked_mul(op, "v", s, d.heads * d.v)?)?;
    check_len(op, "q_pos", x.q_pos.len(), t)?;
    check_len(op, "out", out, checked_mul(op, "out", t, d.heads * d.v)?)?;
    check_cu(op, "cu_q", x.cu_q, p.seqs, t)?;
    check_cu(op, "cu_k", x.cu_k, p.seqs, s)?;
    for i in 0..p.seqs {
        let n_keys = x.cu_k[i + 1] - x.cu_k[i];
        for tok in x.cu_q[i] as usize..x.cu_q[i + 1] as usize {
            if x.q_pos[tok] >= n_keys {
                return Err(invalid(
                    op,
                    "q_pos",
                    format!("token {tok} of sequence {i} is at position {} but the sequence has {n_keys} keys", x.q_pos[tok]),
                ));
            }
        }
    }
    Ok(())
}

/// The slot index of position `pos` of a row whose block table is `row`.
#[inline(always)]
pub(super) fn slot_of(row: &[u32], page_size: usize, pos: usize) -> usize {
    row[pos / page_size] as usize * page_size + pos % page_size
}
