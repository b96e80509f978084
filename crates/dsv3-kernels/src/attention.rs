//! Multi-head latent attention (model-spec §3.3 and §3.7) over a paged latent KV cache.
//!
//! # The paged latent cache
//!
//! MLA caches one row per token per layer, shared by all heads (spec §3.7 step 2):
//! `[c_kv | k_pe]` = `kv_lora` values of the latent **after** `kv_a_layernorm`, then `rope`
//! values of the rotary key **after** RoPE; 512 + 64 = 576 f32 for V3 (2304 bytes per token
//! per layer on the CPU backend).
//!
//! Each layer owns one **page pool**, a row-major f32 buffer `[num_pages, page_size, width]`
//! (`width = kv_lora + rope`; FlashMLA's `k_cache [num_blocks, page_block_size, 1, 576]`):
//!
//! ```text
//! element e of slot s of page p  is at  (p · page_size + s) · width + e      (× 4 bytes)
//! page p = [ token 0: c_kv[0..kv_lora] k_pe[0..rope] | token 1: ... | token page_size-1 ]
//! ```
//!
//! A page is one contiguous run of `page_size · width` values (64 · 576 · 4 = 147,456 bytes for
//! V3). The token of a sequence at absolute position `pos` lives in page
//! `block_table[pos / page_size]`, slot `pos % page_size`; its **slot index** (what
//! [`cache_write`] takes) is `page · page_size + pos % page_size`. Block tables are `u32`
//! row-major `[rows, max_blocks]`; only the first `ceil(len / page_size)` entries of a row are
//! read (and validated), the rest may hold anything. One block table serves every layer: the
//! model crate allocates the same page id in every layer's pool.
//!
//! # Ops
//!
//! | op | what |
//! |---|---|
//! | [`cache_write`] | RMSNorm the latent of each new `kv` row and scatter `[c_kv \| k_pe]` to its slot |
//! | [`gather`] | copy sequences' rows out of the pool into contiguous `c_kv [keys, kv_lora]` and `k_pe [keys, rope]` |
//! | [`absorb_q`] | `q̃[t,h] = W_UK[h]ᵀ q_nope[t,h]`, concatenated with `q_pe`: the `[T, H, kv_lora + rope]` decode query |
//! | [`decode`] | FlashMLA-style decode over the pool: scores against all `width` values, output = `Σ P c_kv` (`[B, H, kv_lora]`) |
//! | [`expand_v`] | `o[t,h] = W_UV[h] ō[t,h]`, written as the `[T, H·v]` input of `o_proj` |
//! | [`prefill`] | the expanded (naive) causal attention of §3.3, varlen, masked by absolute position |
//!
//! `W_UK` / `W_UV` are the dequantised halves of `kv_b_proj` held as bf16 (`[H·nope, kv_lora]`
//! and `[H·v, kv_lora]`, the row order of the checkpoint): bf16 like the official code, which
//! dequantises `kv_b_proj` to bf16, and half the bytes of f32 on the decode path.
//!
//! # Numerics
//!
//! The fast kernels accumulate in f32 with fused multiply-adds (`mul_add`: one instruction in
//! the AVX2+FMA build, a correctly rounded library call in the portable one) and run the
//! softmax online (flash-attention style) with [`crate::act::exp_fast`]; decode splits long
//! sequences into key ranges that are merged by their log-sum-exp at the end. The references
//! compute every dot product, softmax and weighted sum in f64 and round once. The tests bound
//! the difference relative to the largest output.
//!
//! A decode row with `kv_len == 0` attends to nothing and gets zeros (FlashMLA's convention);
//! every prefill query sees at least key 0 (its own position is validated to exist).

use rayon::prelude::*;

use crate::act::exp_fast;
use crate::cpu::dispatch;
use crate::dense::{self, Bf16WeightRef};
use crate::error::{KernelError, Result, check_len, checked_mul, invalid, shape_err};

/// Keys per block of the fast kernels (the scores of a block are one register-tiled pass).
const KB: usize = 64;
/// Query rows (heads in decode, tokens in prefill) per register tile.
const HB: usize = 4;
/// Keys per register tile of the score micro-kernel.
const JT: usize = 16;
/// Output columns per register tile of the `P·V` micro-kernel.
const CT: usize = 16;
/// Query tokens per prefill work item (a multiple of [`HB`]).
const QB: usize = 16;
/// Rows per task of the head-batched matmuls' row tiling (keeps the accumulators in L1/L2).
const ROW_TILE: usize = 32;

// ---------------------------------------------------------------------------------------------
// Shapes.
// ---------------------------------------------------------------------------------------------

/// One layer's page pool: `[num_pages, page_size, kv_lora + rope]` f32 (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatentPool {
    pub num_pages: usize,
    /// Tokens per page (64 in the model crate, as FlashMLA).
    pub page_size: usize,
    /// Latent values per token (`kv_lora_rank`, 512 for V3); also the decode output width.
    pub kv_lora: usize,
    /// Rotary key values per token (`qk_rope_head_dim`, 64 for V3).
    pub rope: usize,
}

impl LatentPool {
    /// Values per cached token, `kv_lora + rope` (saturating; [`LatentPool::check`] rejects overflow).
    pub fn width(&self) -> usize {
        self.kv_lora.saturating_add(self.rope)
    }

    /// Checks every dimension is > 0 and sizes fit `usize`; returns the pool length in values.
    pub fn check(&self, op: &'static str) -> Result<usize> {
        if self.num_pages == 0 || self.page_size == 0 || self.kv_lora == 0 || self.rope == 0 {
            return Err(shape_err(op, format!("every pool dimension must be > 0, got {self:?}")));
        }
        if self.num_pages > u32::MAX as usize {
            return Err(shape_err(op, format!("num_pages {} exceeds the u32 page-id range", self.num_pages)));
        }
        let w = self.kv_lora.checked_add(self.rope).ok_or(KernelError::Overflow { op, what: "kv_lora + rope" })?;
        let slots = checked_mul(op, "num_pages * page_size", self.num_pages, self.page_size)?;
        checked_mul(op, "pool", slots, w)
    }
}

/// The head dimensions of one MLA layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlaDims {
    /// Attention heads `H`.
    pub heads: usize,
    /// `qk_nope_head_dim` (128 for V3).
    pub qk_nope: usize,
    /// `qk_rope_head_dim` (64).
    pub qk_rope: usize,
    /// `kv_lora_rank` (512).
    pub kv_lora: usize,
    /// `v_head_dim` (128).
    pub v: usize,
}

impl MlaDims {
    /// Checks every dimension is > 0 and that `H · (nope + rope)`, `H · (kv_lora + rope)` and
    /// `H · v` fit `usize`.
    pub fn check(&self, op: &'static str) -> Result<()> {
        if self.heads == 0 || self.qk_nope == 0 || self.qk_rope == 0 || self.kv_lora == 0 || self.v == 0 {
            return Err(shape_err(op, format!("every head dimension must be > 0, got {self:?}")));
        }
        let add = |a: usize, b: usize| a.checked_add(b).ok_or(KernelError::Overflow { op, what: "head width" });
        checked_mul(op, "heads * qk_head_dim", self.heads, add(self.qk_nope, self.qk_rope)?)?;
        checked_mul(op, "heads * (kv_lora + rope)", self.heads, add(self.kv_lora, self.qk_rope)?)?;
        checked_mul(op, "heads * v", self.heads, self.v)?;
        checked_mul(op, "heads * qk_nope", self.heads, self.qk_nope)?;
        Ok(())
    }
    /// `qk_nope + qk_rope` (192 for V3).
    pub fn qk_head(&self) -> usize {
        self.qk_nope + self.qk_rope
    }
    /// `kv_lora + qk_rope` (576): the cached row and the absorbed query width.
    pub fn latent(&self) -> usize {
        self.kv_lora + self.qk_rope
    }
}

/// Shape of [`cache_write`]: `tokens` new `kv` rows into `pool`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheWriteShape {
    pub tokens: usize,
    pub pool: LatentPool,
}

/// Shape of [`gather`]: `seqs` sequences with `keys = Σ seq_lens` rows in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatherShape {
    pub seqs: usize,
    /// Block-table entries per sequence.
    pub max_blocks: usize,
    /// Total rows gathered (must equal the sum of `seq_lens`).
    pub keys: usize,
    pub pool: LatentPool,
}

/// Parameters of [`decode`] (FlashMLA's `q [B, H, 576]`, block table, sequence lengths, page
/// size and scale → `out [B, H, 512]`). Each query row has its own block-table row and key
/// count, so several rows may describe the same sequence (e.g. speculative tokens, each with
/// `kv_len = position + 1`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeParams {
    /// Query rows `B`; 0 means no work.
    pub batch: usize,
    /// Heads `H` per query row (> 0).
    pub heads: usize,
    /// Block-table entries per row.
    pub max_blocks: usize,
    /// The pool; `pool.width()` is the query/key width, `pool.kv_lora` the value width.
    pub pool: LatentPool,
    /// Softmax scale (spec §3.6), finite.
    pub scale: f32,
}

/// Parameters of [`prefill`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefillParams {
    pub dims: MlaDims,
    /// Sequences in the batch; `cu_q` and `cu_k` have `seqs + 1` entries.
    pub seqs: usize,
    /// Query tokens `T` in all sequences.
    pub tokens: usize,
    /// Key rows `S` in all sequences (each sequence's keys are its positions `0..S_i`).
    pub keys: usize,
    /// Softmax scale (spec §3.6), finite.
    pub scale: f32,
}

/// The inputs of [`prefill`], as slices (`F = [f32]`, `U = [u32]`) or as backend buffers.
#[derive(Debug)]
pub struct PrefillInputs<'a, F: ?Sized, U: ?Sized> {
    /// `[T, H, nope + rope]`: queries, RoPE already applied to the last `rope` of each head.
    pub q: &'a F,
    /// `[S, H, nope]`: `k_nope = W_UK c_kv` of every key.
    pub k_nope: &'a F,
    /// `[S, rope]`: the rotated `k_pe` of every key, shared by all heads.
    pub k_pe: &'a F,
    /// `[S, H, v]`: `v = W_UV c_kv` of every key.
    pub v: &'a F,
    /// `[T]`: absolute position of each query; query `t` of sequence `i` sees key `j` (the
    /// key at position `j`) iff `j <= q_pos[t]`, and needs `q_pos[t] < S_i`.
    pub q_pos: &'a U,
    /// `[seqs + 1]`: query rows of sequence `i` are `cu_q[i]..cu_q[i+1]`.
    pub cu_q: &'a U,
    /// `[seqs + 1]`: key rows of sequence `i` are `cu_k[i]..cu_k[i+1]`.
    pub cu_k: &'a U,
}

// Manual impls: a derive would require `F: Copy`, which `[f32]` is not.
impl<F: ?Sized, U: ?Sized> Clone for PrefillInputs<'_, F, U> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<F: ?Sized, U: ?Sized> Copy for PrefillInputs<'_, F, U> {}

// ---------------------------------------------------------------------------------------------
// Validation shared by both versions.
// ---------------------------------------------------------------------------------------------

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
    fn of(x: &PrefillInputs<'a, [f32], [u32]>) -> Self {
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
fn slot_of(row: &[u32], page_size: usize, pos: usize) -> usize {
    row[pos / page_size] as usize * page_size + pos % page_size
}

// ---------------------------------------------------------------------------------------------
// References: plain loops, f64 accumulation, one rounding.
// ---------------------------------------------------------------------------------------------

/// Plain-loop references of every op (the spec's formulas in f64): the oracles of the fast
/// kernels. Same contracts and errors.
pub mod reference {
    use super::*;

    /// Reference of [`super::cache_write`]: RMSNorm of the latent with an f64 sum of squares
    /// (as [`crate::norm::reference::rms_norm`]), `k_pe` copied.
    pub fn cache_write(kv: &[f32], norm_w: &[f32], eps: f32, slots: &[u32], s: CacheWriteShape, pool: &mut [f32]) -> Result<()> {
        const OP: &str = "reference::attention::cache_write";
        check_cache_write(OP, kv.len(), norm_w.len(), eps, slots, s, pool.len())?;
        let (w, l) = (s.pool.width(), s.pool.kv_lora);
        for t in 0..s.tokens {
            let row = &kv[t * w..(t + 1) * w];
            let mut sum = 0f64;
            for &v in &row[..l] {
                sum += v as f64 * v as f64;
            }
            let inv = 1.0 / (sum as f32 / l as f32 + eps).sqrt();
            let dst = slots[t] as usize * w;
            for i in 0..l {
                pool[dst + i] = norm_w[i] * (row[i] * inv);
            }
            pool[dst + l..dst + w].copy_from_slice(&row[l..]);
        }
        Ok(())
    }

    /// Reference of [`super::gather`].
    pub fn gather(pool: &[f32], table: &[u32], lens: &[u32], s: GatherShape, c_kv: &mut [f32], k_pe: &mut [f32]) -> Result<()> {
        const OP: &str = "reference::attention::gather";
        check_gather(OP, pool.len(), table, lens, s, c_kv.len(), k_pe.len())?;
        let (w, l, r) = (s.pool.width(), s.pool.kv_lora, s.pool.rope);
        let mut k = 0;
        for i in 0..s.seqs {
            let row = &table[i * s.max_blocks..(i + 1) * s.max_blocks];
            for pos in 0..lens[i] as usize {
                let src = slot_of(row, s.pool.page_size, pos) * w;
                c_kv[k * l..(k + 1) * l].copy_from_slice(&pool[src..src + l]);
                k_pe[k * r..(k + 1) * r].copy_from_slice(&pool[src + l..src + w]);
                k += 1;
            }
        }
        Ok(())
    }

    /// Reference of [`super::absorb_q`]: `out[t,h,c] = Σ_d q[t,h,d] · W_UK[h·nope + d, c]` for
    /// `c < kv_lora`, then `q_pe` copied.
    pub fn absorb_q(q: &[f32], w_uk: Bf16WeightRef<'_>, d: MlaDims, rows: usize, out: &mut [f32]) -> Result<()> {
        const OP: &str = "reference::attention::absorb_q";
        check_absorb(OP, q.len(), (w_uk.rows(), w_uk.cols()), d, rows, out.len())?;
        let (qh, oh, l) = (d.qk_head(), d.latent(), d.kv_lora);
        let w = w_uk.data();
        for t in 0..rows {
            for h in 0..d.heads {
                let qb = (t * d.heads + h) * qh;
                let ob = (t * d.heads + h) * oh;
                for c in 0..l {
                    let mut acc = 0f64;
                    for e in 0..d.qk_nope {
                        acc += q[qb + e] as f64 * w[(h * d.qk_nope + e) * l + c].to_f64();
                    }
                    out[ob + c] = acc as f32;
                }
                out[ob + l..ob + oh].copy_from_slice(&q[qb + d.qk_nope..qb + qh]);
            }
        }
        Ok(())
    }

    /// Reference of [`super::expand_v`]: `out[t, h·v + e] = Σ_c W_UV[h·v + e, c] · o_lat[t,h,c]`.
    pub fn expand_v(o_lat: &[f32], w_uv: Bf16WeightRef<'_>, d: MlaDims, rows: usize, out: &mut [f32]) -> Result<()> {
        const OP: &str = "reference::attention::expand_v";
        check_expand(OP, o_lat.len(), (w_uv.rows(), w_uv.cols()), d, rows, out.len())?;
        let l = d.kv_lora;
        let w = w_uv.data();
        for t in 0..rows {
            for h in 0..d.heads {
                for e in 0..d.v {
                    let mut acc = 0f64;
                    for c in 0..l {
                        acc += w[(h * d.v + e) * l + c].to_f64() * o_lat[(t * d.heads + h) * l + c] as f64;
                    }
                    out[(t * d.heads + h) * d.v + e] = acc as f32;
                }
            }
        }
        Ok(())
    }

    /// Softmax-weighted sum in f64: `Σ_j softmax(scores)_j · value(j)[c]` for `c < width`.
    fn attend(scores: &[f64], width: usize, value: impl Fn(usize, usize) -> f64, out: &mut [f32]) {
        let m = scores.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        let p: Vec<f64> = scores.iter().map(|&s| (s - m).exp()).collect();
        let sum: f64 = p.iter().sum();
        for (c, o) in out.iter_mut().enumerate().take(width) {
            let mut acc = 0f64;
            for (j, &pj) in p.iter().enumerate() {
                acc += pj * value(j, c);
            }
            *o = (acc / sum) as f32;
        }
    }

    /// Reference of [`super::decode`].
    pub fn decode(q: &[f32], pool: &[f32], table: &[u32], kv_lens: &[u32], p: &DecodeParams, out: &mut [f32]) -> Result<()> {
        const OP: &str = "reference::attention::decode";
        check_decode(OP, q.len(), pool.len(), table, kv_lens, p, out.len())?;
        let (w, l, ps) = (p.pool.width(), p.pool.kv_lora, p.pool.page_size);
        for b in 0..p.batch {
            let row = &table[b * p.max_blocks..(b + 1) * p.max_blocks];
            let len = kv_lens[b] as usize;
            let key = |j: usize| slot_of(row, ps, j) * w;
            for h in 0..p.heads {
                let qv = &q[(b * p.heads + h) * w..(b * p.heads + h + 1) * w];
                let o = &mut out[(b * p.heads + h) * l..(b * p.heads + h + 1) * l];
                if len == 0 {
                    o.fill(0.0);
                    continue;
                }
                let scores: Vec<f64> = (0..len)
                    .map(|j| {
                        let k = &pool[key(j)..key(j) + w];
                        qv.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * p.scale as f64
                    })
                    .collect();
                attend(&scores, l, |j, c| pool[key(j) + c] as f64, o);
            }
        }
        Ok(())
    }

    /// Reference of [`super::prefill`]: §3.3 steps 4–6 per query, head and visible key.
    pub fn prefill(x: PrefillInputs<'_, [f32], [u32]>, p: &PrefillParams, out: &mut [f32]) -> Result<()> {
        const OP: &str = "reference::attention::prefill";
        check_prefill(OP, &PrefillCheck::of(&x), p, out.len())?;
        let d = p.dims;
        let (qh, h_n) = (d.qk_head(), d.heads);
        for i in 0..p.seqs {
            let kb = x.cu_k[i] as usize;
            for t in x.cu_q[i] as usize..x.cu_q[i + 1] as usize {
                let pos = x.q_pos[t] as usize;
                for h in 0..h_n {
                    let qv = &x.q[(t * h_n + h) * qh..(t * h_n + h + 1) * qh];
                    let scores: Vec<f64> = (0..=pos)
                        .map(|j| {
                            let kn = &x.k_nope[((kb + j) * h_n + h) * d.qk_nope..][..d.qk_nope];
                            let kp = &x.k_pe[(kb + j) * d.qk_rope..][..d.qk_rope];
                            let mut acc = 0f64;
                            for e in 0..d.qk_nope {
                                acc += qv[e] as f64 * kn[e] as f64;
                            }
                            for e in 0..d.qk_rope {
                                acc += qv[d.qk_nope + e] as f64 * kp[e] as f64;
                            }
                            acc * p.scale as f64
                        })
                        .collect();
                    let o = &mut out[(t * h_n + h) * d.v..(t * h_n + h + 1) * d.v];
                    attend(&scores, d.v, |j, c| x.v[((kb + j) * h_n + h) * d.v + c] as f64, o);
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Fast kernels.
// ---------------------------------------------------------------------------------------------

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

/// `acc[i] += a · x[i]`.
#[inline(always)]
fn axpy_body(acc: &mut [f32], a: f32, x: &[f32]) {
    for (o, &v) in acc.iter_mut().zip(x) {
        *o = a.mul_add(v, *o);
    }
}

dispatch!(fn axpy(acc: &mut [f32], a: f32, x: &[f32]) = axpy_body;);

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

/// Offset of row `t`, head `h` in [`head_major`]'s buffer.
#[inline]
fn head_major_at(rows: usize, heads: usize, width: usize, t: usize, h: usize) -> usize {
    let (t0, r) = (t - t % ROW_TILE, t % ROW_TILE);
    let nr = (rows - t0).min(ROW_TILE).next_multiple_of(RB);
    (t0 * heads + h * nr + r) * width
}

/// The absorbed decode query: for each row `t` and head `h`,
/// `out[t,h,0..kv_lora] = W_UK[h]ᵀ q[t,h,0..nope]` (`W_UK[h]` = rows `h·nope..(h+1)·nope` of
/// `w_uk`, spec §3.7 step 3) and `out[t,h,kv_lora..] = q[t,h,nope..]` (`q_pe`, already rotated).
/// `q` is `[rows, H, nope + rope]`, `out` `[rows, H, kv_lora + rope]` ([`decode`]'s query).
///
/// Parallel over (row tile, head): each head's weight block is read once per 32 rows.
///
/// Errors (before any write): bad dims, `w_uk` not `[H·nope, kv_lora]`, a length mismatch.
pub fn absorb_q(q: &[f32], w_uk: Bf16WeightRef<'_>, d: MlaDims, rows: usize, out: &mut [f32]) -> Result<()> {
    const OP: &str = "attention::absorb_q";
    check_absorb(OP, q.len(), (w_uk.rows(), w_uk.cols()), d, rows, out.len())?;
    if rows == 0 {
        return Ok(());
    }
    let (qh, oh, l, n, h_n) = (d.qk_head(), d.latent(), d.kv_lora, d.qk_nope, d.heads);
    let stride = h_n * qh;
    let w = w_uk.data();
    let tmp = head_major(rows, h_n, l, |t0, nr, h, dst| {
        let wh = &w[h * n * l..(h + 1) * n * l];
        let qs: Vec<&[f32]> = (t0..t0 + nr).map(|t| &q[t * stride + h * qh..t * stride + h * qh + n]).collect();
        if dense::rows::vecmat(&qs, wh, l, &mut dst.chunks_exact_mut(l).take(nr).collect::<Vec<_>>()) {
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
    out.par_chunks_mut(h_n * oh).enumerate().for_each(|(t, o)| {
        for h in 0..h_n {
            let at = head_major_at(rows, h_n, l, t, h);
            o[h * oh..h * oh + l].copy_from_slice(&tmp[at..at + l]);
            o[h * oh + l..(h + 1) * oh].copy_from_slice(&q[t * stride + h * qh + n..t * stride + (h + 1) * qh]);
        }
    });
    Ok(())
}

/// The value up-projection of the absorbed form (spec §3.7 step 5): for each row `t` and head
/// `h`, `out[t, h·v..(h+1)·v] = W_UV[h] o_lat[t,h]` with `W_UV[h]` = rows `h·v..(h+1)·v` of
/// `w_uv` (`[H·v, kv_lora]`). `o_lat` is `[rows, H, kv_lora]` ([`decode`]'s output), `out`
/// `[rows, H·v]`, the input layout of `o_proj` (column `h·v + e`, spec §2.3).
///
/// Errors (before any write): bad dims, `w_uv` not `[H·v, kv_lora]`, a length mismatch.
pub fn expand_v(o_lat: &[f32], w_uv: Bf16WeightRef<'_>, d: MlaDims, rows: usize, out: &mut [f32]) -> Result<()> {
    const OP: &str = "attention::expand_v";
    check_expand(OP, o_lat.len(), (w_uv.rows(), w_uv.cols()), d, rows, out.len())?;
    if rows == 0 {
        return Ok(());
    }
    let (l, v, h_n) = (d.kv_lora, d.v, d.heads);
    let stride = h_n * l;
    let w = w_uv.data();
    let tmp = head_major(rows, h_n, v, |t0, nr, h, dst| {
        let wh = &w[h * v * l..(h + 1) * v * l];
        let xs: Vec<&[f32]> = (t0..t0 + nr).map(|t| &o_lat[t * stride + h * l..t * stride + (h + 1) * l]).collect();
        if dense::rows::dots(&xs, wh, l, &mut dst[..nr * v]) {
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
    out.par_chunks_mut(h_n * v).enumerate().for_each(|(t, o)| {
        for h in 0..h_n {
            let at = head_major_at(rows, h_n, v, t, h);
            o[h * v..(h + 1) * v].copy_from_slice(&tmp[at..at + v]);
        }
    });
    Ok(())
}

// --- the attention core shared by decode and prefill ------------------------------------------
//
// Query rows are padded to a multiple of `HB` (padding rows see no key and are never read), so
// every register tile has `HB` real rows. The tiles read their inputs through fixed-size array
// references and write their accumulators element by element: the form LLVM's SLP vectoriser
// turns into packed FMAs (with `copy_from_slice` stores, or the three phases fused into one
// function, it falls back to scalar code).

const _: () = assert!(HB == 4 && QB.is_multiple_of(HB) && KB.is_multiple_of(JT));

/// One key block of the attention core: up to [`KB`] keys against the query rows (the heads
/// of one token in decode, up to [`QB`] tokens of one head in prefill).
struct Block<'a> {
    /// Queries transposed per tile of [`HB`] rows: `[tiles][d][HB]`.
    qt: &'a [f32],
    /// Key `j` is `k1[j·k1_stride ..][..d1]` followed by `k2[j·k2_stride ..][..d - d1]` (decode:
    /// the whole cached row in `k1`; prefill: `k_nope` of the head, then the shared `k_pe`).
    k1: &'a [f32],
    k1_stride: usize,
    d1: usize,
    k2: &'a [f32],
    k2_stride: usize,
    /// Query/key width.
    d: usize,
    /// Keys in the block.
    nk: usize,
    /// Value row `j` is `v[j·v_stride ..][..dv]`.
    v: &'a [f32],
    v_stride: usize,
    dv: usize,
    /// Per (padded) query row: keys `j < vis[r]` of the block are visible (`vis[r] <= nk`;
    /// 0 for padding rows). Its length is the padded row count.
    vis: &'a [usize],
    scale: f32,
}

/// Online-softmax state of the (padded) query rows: running max `m`, sum `l`, unnormalised
/// output `o [rows, dv]`, and the block's scores, one `HB × KB` array per tile.
struct State<'a> {
    m: &'a mut [f32],
    l: &'a mut [f32],
    o: &'a mut [f32],
    s: &'a mut [[[f32; KB]; HB]],
}

/// Whether any row of tile `g` sees a key of the block.
#[inline(always)]
fn tile_live(vis: &[usize], g: usize) -> bool {
    vis[g * HB..(g + 1) * HB].iter().any(|&n| n > 0)
}

/// Scores of one register tile: `s[r][jt·JT + j] = Σ_c qt[c·HB + r] · kt[c·JT + j]` (`qt` is
/// one tile's `[d][HB]` queries, `kt` the panel's `[d][JT]` keys): one broadcast query value
/// times 16 consecutive keys per FMA, `HB × JT` accumulators in registers.
#[inline(always)]
#[allow(clippy::manual_memcpy)] // element stores, not a memcpy: see the section comment
fn qk_tile(qt: &[f32], kt: &[f32], jt: usize, s: &mut [[f32; KB]; HB]) {
    let mut acc = [[0f32; JT]; HB];
    for (qc, krow) in qt.chunks_exact(HB).zip(kt.chunks_exact(JT)) {
        let (Some(q), Some(k)) = (qc.first_chunk::<HB>(), krow.first_chunk::<JT>()) else { return };
        for r in 0..HB {
            for j in 0..JT {
                acc[r][j] = q[r].mul_add(k[j], acc[r][j]);
            }
        }
    }
    for r in 0..HB {
        if let Some(dst) = s[r][jt * JT..].first_chunk_mut::<JT>() {
            for j in 0..JT {
                dst[j] = acc[r][j];
            }
        }
    }
}

/// The `[CT]` columns at `c0` of the `HB` rows of `o` (`[HB, dv]`).
#[inline(always)]
fn tile_rows(o: &mut [f32], dv: usize, c0: usize) -> Option<[&mut [f32; CT]; HB]> {
    let mut it = o.chunks_exact_mut(dv).map(|r| r.get_mut(c0..).and_then(|x| x.first_chunk_mut::<CT>()));
    Some([it.next()??, it.next()??, it.next()??, it.next()??])
}

/// `o[r, c0..c0+CT] += Σ_{j < nk} p[r][j] · V_j[c0..c0+CT]` for one tile (`o` is its
/// `[HB, dv]` rows): `HB × CT` accumulators in registers.
#[inline(always)]
fn pv_tile(b: &Block<'_>, p: &[[f32; KB]; HB], c0: usize, o: &mut [f32]) {
    let Some(rows) = tile_rows(o, b.dv, c0) else { return };
    let mut acc = [[0f32; CT]; HB];
    for r in 0..HB {
        for c in 0..CT {
            acc[r][c] = rows[r][c];
        }
    }
    for j in 0..b.nk.min(KB) {
        let Some(vj) = b.v.get(j * b.v_stride + c0..).and_then(|x| x.first_chunk::<CT>()) else { break };
        for r in 0..HB {
            let pr = p[r][j];
            for c in 0..CT {
                acc[r][c] = pr.mul_add(vj[c], acc[r][c]);
            }
        }
    }
    for r in 0..HB {
        for c in 0..CT {
            rows[r][c] = acc[r][c];
        }
    }
}

/// Online-softmax step of one query row: scale, mask keys `j >= n`, `exp(s - m_new)`, update
/// `(m, l)`, rescale the row's output by `exp(m_old - m_new)`. A row that has seen no key yet
/// gets `p = 0` and keeps its state.
/// Max and sum run over [`JT`] independent lanes so that they vectorise.
#[inline(always)]
fn softmax_row(sr: &mut [f32; KB], n: usize, scale: f32, m: &mut f32, l: &mut f32, o: &mut [f32]) {
    let mut mx = [f32::NEG_INFINITY; JT];
    for (jc, c) in sr.chunks_exact_mut(JT).enumerate() {
        for (i, v) in c.iter_mut().enumerate() {
            *v = if jc * JT + i < n { *v * scale } else { f32::NEG_INFINITY };
            mx[i] = mx[i].max(*v);
        }
    }
    let m_new = mx.iter().fold(*m, |a, &b| a.max(b));
    if m_new == f32::NEG_INFINITY {
        sr.fill(0.0);
        return;
    }
    let alpha = exp_fast(*m - m_new);
    let mut sums = [0f32; JT];
    for c in sr.chunks_exact_mut(JT) {
        for (i, v) in c.iter_mut().enumerate() {
            *v = exp_fast(*v - m_new);
            sums[i] += *v;
        }
    }
    let sum: f32 = sums.iter().sum();
    *l = *l * alpha + sum;
    *m = m_new;
    if alpha != 1.0 {
        for x in o.iter_mut() {
            *x *= alpha;
        }
    }
}

/// Phase 1 of a block: key panel `jt` ([`JT`] keys) transposed into `kt [d][JT]` (`d · 64`
/// bytes, written and then read from L1), and its scores against every live tile.
#[inline(always)]
fn qk_panel_body(b: &Block<'_>, jt: usize, kt: &mut [f32], s: &mut [[[f32; KB]; HB]]) {
    let (j0, d2) = (jt * JT, b.d - b.d1);
    for j in 0..JT.min(b.nk.saturating_sub(j0)) {
        let r1 = &b.k1[(j0 + j) * b.k1_stride..(j0 + j) * b.k1_stride + b.d1];
        for (c, &x) in r1.iter().enumerate() {
            kt[c * JT + j] = x;
        }
        let r2 = &b.k2[(j0 + j) * b.k2_stride..(j0 + j) * b.k2_stride + d2];
        for (c, &x) in r2.iter().enumerate() {
            kt[(b.d1 + c) * JT + j] = x;
        }
    }
    for (g, sg) in s.iter_mut().enumerate() {
        if tile_live(b.vis, g) {
            qk_tile(&b.qt[g * b.d * HB..(g + 1) * b.d * HB], &kt[..b.d * JT], jt, sg);
        }
    }
}

/// Phase 2: the online-softmax step of every row.
#[inline(always)]
fn softmax_rows_body(b: &Block<'_>, st: &mut State<'_>) {
    let (nk, dv) = (b.nk.min(KB), b.dv);
    for (r, &vis) in b.vis.iter().enumerate() {
        softmax_row(&mut st.s[r / HB][r % HB], vis.min(nk), b.scale, &mut st.m[r], &mut st.l[r], &mut st.o[r * dv..(r + 1) * dv]);
    }
}

/// Phase 3: `o += P·V` for the [`CT`]-column strip at `c0` (`nk · 64` bytes of `V`, kept in
/// L1) and every live tile.
#[inline(always)]
fn pv_strip_body(b: &Block<'_>, c0: usize, s: &[[[f32; KB]; HB]], o: &mut [f32]) {
    for ((g, p), og) in s.iter().enumerate().zip(o.chunks_exact_mut(HB * b.dv)) {
        if tile_live(b.vis, g) {
            pv_tile(b, p, c0, og);
        }
    }
}

dispatch!(fn qk_panel(b: &Block<'_>, jt: usize, kt: &mut [f32], s: &mut [[[f32; KB]; HB]]) = qk_panel_body;);
dispatch!(fn softmax_rows(b: &Block<'_>, st: &mut State<'_>) = softmax_rows_body;);
dispatch!(fn pv_strip(b: &Block<'_>, c0: usize, s: &[[[f32; KB]; HB]], o: &mut [f32]) = pv_strip_body;);

/// One key block for all query rows (a flash-attention step), ordered for cache reuse: scores
/// panel by panel ([`qk_panel`]), the online softmax ([`softmax_rows`]), then `o += P·V` strip
/// by strip ([`pv_strip`]); leftover columns (`dv % CT`) in scalar code. `kt` is a `[d][JT]`
/// scratch. With AVX-512 the scores and `P·V` run on wider register tiles ([`avx512`]).
fn attend_block(b: &Block<'_>, st: &mut State<'_>, kt: &mut [f32]) {
    let (rows, nk, dv) = (b.vis.len(), b.nk.min(KB), b.dv);
    let tiles = rows / HB;
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::isa_level() == crate::cpu::IsaLevel::Avx512 {
        for jt in 0..nk.div_ceil(JT) {
            // SAFETY: the CPU was checked at run time to have avx512f, avx512bw, avx2 and fma.
            unsafe { avx512::qk_panel(b, jt, kt, &mut st.s[..tiles]) };
        }
        softmax_rows(b, st);
        let c1 = dv - dv % avx512::PV_COLS;
        // SAFETY: as above.
        unsafe { avx512::pv(b, c1, &st.s[..tiles], st.o) };
        attend_rest(b, st, c1);
        return;
    }
    for jt in 0..nk.div_ceil(JT) {
        qk_panel(b, jt, kt, &mut st.s[..tiles]);
    }
    softmax_rows(b, st);
    let mut c0 = 0;
    while c0 + CT <= dv {
        pv_strip(b, c0, &st.s[..tiles], st.o);
        c0 += CT;
    }
    attend_rest(b, st, c0);
}

/// `o += P·V` for the columns `c0..dv` in scalar code.
fn attend_rest(b: &Block<'_>, st: &mut State<'_>, c0: usize) {
    let (rows, nk, dv) = (b.vis.len(), b.nk.min(KB), b.dv);
    for c in c0..dv {
        for r in 0..rows {
            let p = &st.s[r / HB][r % HB];
            let mut a = st.o[r * dv + c];
            for j in 0..nk {
                a = p[j].mul_add(b.v[j * b.v_stride + c], a);
            }
            st.o[r * dv + c] = a;
        }
    }
}

/// The attention core's two products at 16 lanes, on the layouts of the portable phases:
/// scores for four tiles (16 query rows) x one key panel of [`JT`] keys at a time (16
/// accumulators, one broadcast query value per FMA), and `P·V` for one tile x 64 value
/// columns (16 accumulators, four value loads and four broadcast probabilities per 16 FMAs).
/// Every score and output element is one FMA chain in the order of the portable code's.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Block, HB, JT, KB, qk_tile, tile_live};
    use crate::simd::avx512::{load16, store16, transpose16};
    use std::arch::x86_64::*;

    /// Value columns per `P·V` register tile.
    pub(super) const PV_COLS: usize = 64;

    /// [`super::qk_panel_body`] with the tiles taken four at a time.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    pub(super) fn qk_panel(b: &Block<'_>, jt: usize, kt: &mut [f32], s: &mut [[[f32; KB]; HB]]) {
        let (j0, d2) = (jt * JT, b.d - b.d1);
        let nj = JT.min(b.nk.saturating_sub(j0));
        for (src, stride, width, c_off) in [(b.k1, b.k1_stride, b.d1, 0), (b.k2, b.k2_stride, d2, b.d1)] {
            if width.is_multiple_of(16) {
                // 16 x 16 blocks transposed in registers (keys past `nj` repeat key 0; their
                // scores are masked by the softmax).
                let rows: [&[f32]; JT] = std::array::from_fn(|j| {
                    let j = if j < nj { j } else { 0 };
                    &src[(j0 + j) * stride..(j0 + j) * stride + width]
                });
                for c0 in (0..width).step_by(16) {
                    let t = transpose16(std::array::from_fn(|j| load16(&rows[j][c0..])));
                    for (e, v) in t.iter().enumerate() {
                        store16(&mut kt[(c_off + c0 + e) * JT..], *v);
                    }
                }
            } else {
                for j in 0..nj {
                    let r = &src[(j0 + j) * stride..(j0 + j) * stride + width];
                    for (c, &x) in r.iter().enumerate() {
                        kt[(c_off + c) * JT + j] = x;
                    }
                }
            }
        }
        let kt = &kt[..b.d * JT];
        let tiles = s.len();
        let mut g = 0;
        while g + 4 <= tiles {
            if (g..g + 4).any(|t| tile_live(b.vis, t)) {
                let q = &b.qt[g * b.d * HB..(g + 4) * b.d * HB];
                let acc = scores4(q, kt, b.d);
                for (t, st) in s[g..g + 4].iter_mut().enumerate() {
                    for r in 0..HB {
                        store16(&mut st[r][jt * JT..jt * JT + JT], acc[t * HB + r]);
                    }
                }
            }
            g += 4;
        }
        for (t, st) in s.iter_mut().enumerate().skip(g) {
            if tile_live(b.vis, t) {
                qk_tile(&b.qt[t * b.d * HB..(t + 1) * b.d * HB], kt, jt, st);
            }
        }
    }

    /// `acc[t·4 + r][j] = Σ_c q[(t·d + c)·4 + r] · kt[c·16 + j]` for four tiles `t`.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    fn scores4(q: &[f32], kt: &[f32], d: usize) -> [__m512; 16] {
        let mut acc = [_mm512_setzero_ps(); 16];
        let qs = |t: usize| q[t * d * HB..(t + 1) * d * HB].chunks_exact(HB);
        let rows = kt.chunks_exact(JT).zip(qs(0)).zip(qs(1)).zip(qs(2)).zip(qs(3));
        for ((((k, q0), q1), q2), q3) in rows {
            let kv = load16(k);
            for (t, qc) in [q0, q1, q2, q3].into_iter().enumerate() {
                for r in 0..HB {
                    acc[t * HB + r] = _mm512_fmadd_ps(_mm512_set1_ps(qc[r]), kv, acc[t * HB + r]);
                }
            }
        }
        acc
    }

    /// `o += P·V` over the columns `0..c1` (`c1 % 64 == 0`) of every live tile.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    pub(super) fn pv(b: &Block<'_>, c1: usize, s: &[[[f32; KB]; HB]], o: &mut [f32]) {
        let nk = b.nk.min(KB);
        for c0 in (0..c1).step_by(PV_COLS) {
            for ((g, p), og) in s.iter().enumerate().zip(o.chunks_exact_mut(HB * b.dv)) {
                if !tile_live(b.vis, g) {
                    continue;
                }
                let mut acc = [[_mm512_setzero_ps(); 4]; HB];
                for r in 0..HB {
                    for v in 0..4 {
                        acc[r][v] = load16(&og[r * b.dv + c0 + 16 * v..]);
                    }
                }
                for j in 0..nk {
                    let Some(vj) = b.v.get(j * b.v_stride + c0..j * b.v_stride + c0 + PV_COLS) else { break };
                    let x: [__m512; 4] = std::array::from_fn(|v| load16(&vj[16 * v..]));
                    for r in 0..HB {
                        let pr = _mm512_set1_ps(p[r][j]);
                        for v in 0..4 {
                            acc[r][v] = _mm512_fmadd_ps(pr, x[v], acc[r][v]);
                        }
                    }
                }
                for r in 0..HB {
                    for v in 0..4 {
                        store16(&mut og[r * b.dv + c0 + 16 * v..], acc[r][v]);
                    }
                }
            }
        }
    }
}

/// Query rows `row(r)` (`r < rows`, padded to a multiple of [`HB`] by repeating the last) into
/// the per-tile transposed layout `[tiles][d][HB]`.
fn transpose_queries<'a>(rows: usize, d: usize, row: impl Fn(usize) -> &'a [f32]) -> Vec<f32> {
    let tiles = rows.div_ceil(HB);
    let mut qt = vec![0f32; tiles * d * HB];
    for g in 0..tiles {
        for r in 0..HB {
            let src = row((g * HB + r).min(rows - 1));
            for c in 0..d {
                qt[(g * d + c) * HB + r] = src[c];
            }
        }
    }
    qt
}

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

/// MLA decode over the paged latent cache (spec §3.7 steps 4–5, FlashMLA's contract): for each
/// query row `b` and head `h`, `s_j = (q[b,h,:] · K_j) · scale` over the `width` values of each
/// cached row `K_j`, `j < kv_lens[b]` (read through block-table row `b`), softmax over `j`, and
/// `out[b,h,:] = Σ_j P_j K_j[0..kv_lora]` (`ō`, before `W_UV`). `q` is `[batch, H, width]` (from
/// [`absorb_q`]), `out` `[batch, H, kv_lora]`. A row with `kv_lens[b] == 0` gets zeros.
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

/// The expanded (naive) causal attention of spec §3.3 steps 4–6 for a batch of sequences:
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
