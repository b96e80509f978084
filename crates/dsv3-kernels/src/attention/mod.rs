//! Multi-head latent attention (docs/model.md §3.3 and §3.7) over a paged latent KV cache.
//!
//! # The paged latent cache
//!
//! MLA caches one row per token per layer, shared by all heads (docs/model.md §3.7 item 1):
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
//! | [`prefill`] | the expanded (naive) causal attention of docs/model.md §3.3, varlen, masked by absolute position |
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
//! sequences into key ranges that are merged by their log-sum-exp. The references
//! compute every dot product, softmax and weighted sum in f64 and round once. The tests bound
//! the difference relative to the largest output.
//!
//! A decode row with `kv_len == 0` attends to nothing and gets zeros (FlashMLA's convention);
//! every prefill query sees at least key 0 (its own position is validated to exist).
//!
//! # Batch invariance
//!
//! A query row's result depends only on its own query, keys and length, never on the other
//! rows, sequences or heads of the call, nor (prefill) on how its sequence's prompt is cut into
//! steps: every score and output element is one FMA chain per row, the register tiles only
//! group rows; key blocks start at absolute positions `0, 64, 128, ...` of the sequence (a
//! block past a query's position leaves its state as it was: its probabilities are exact
//! zeros); and decode cuts each row's keys into ranges at absolute multiples of `SPLIT_KEYS`
//! (256), merged in position order. Continuous batching relies on this (`tests/invariance.rs`).
//!
//! # Files
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | the shapes and parameters every op takes |
//! | `checks.rs` | the validation of every op (shared with the CUDA backend) |
//! | `reference.rs` | plain loops in f64: the oracles |
//! | `cache.rs` | [`cache_write`], [`gather`] |
//! | `absorb.rs` | [`absorb_q`], [`expand_v`] (the per-head products with `W_UK` / `W_UV`) |
//! | `core.rs` | the flash-attention core shared by decode and prefill (register tiles, online softmax) |
//! | `avx512.rs` | the core's two products at 16 lanes |
//! | `decode.rs` | [`decode`] (split over key ranges, merged by log-sum-exp) |
//! | `prefill.rs` | [`prefill`] |

mod absorb;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod cache;
mod checks;
mod core;
mod decode;
mod prefill;
pub mod reference;

pub use absorb::{absorb_q, absorb_q_parts, expand_v, expand_v_parts};
pub use cache::{cache_write, gather};
pub(crate) use checks::{PrefillCheck, check_absorb, check_cache_write, check_decode, check_expand, check_gather, check_prefill};
pub use decode::decode;
pub use prefill::prefill;

use crate::error::{KernelError, Result, checked_mul, shape_err};

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
    /// Softmax scale (docs/model.md §3.6), finite.
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
    /// Softmax scale (docs/model.md §3.6), finite.
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
