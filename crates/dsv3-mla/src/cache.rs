//! The paged latent KV cache: one page pool per layer, a block allocator, per-sequence block
//! tables, and the per-step plan the attention kernels read.
//!
//! # Layout
//!
//! Every layer `ℓ` owns one pool, a backend buffer of f32 laid out `[num_pages, page_size,
//! width]` row-major, `width = kv_lora_rank + qk_rope_head_dim` (576 for V3), `page_size = 64`
//! ([`PAGE_SIZE`]). Each token row is `[c_kv | k_pe]`: the latent after `kv_a_layernorm`
//! (512 values), then the rotary key after RoPE (64 values). So, in bytes,
//!
//! ```text
//! pool ℓ:  page p at  p · 64 · 576 · 4  (147,456 bytes per page for V3)
//!          token slot s of page p at  (p · 64 + s) · 576 · 4
//!          c_kv at +0 (2048 bytes), k_pe at +512·4 (256 bytes)
//! ```
//!
//! (FlashMLA's `k_cache [num_blocks, 64, 1, 576]`, one tensor per layer.) A sequence owns an
//! ordered list of page ids, its **block table**; its token at position `pos` is in page
//! `table[pos / 64]`, slot `pos % 64`, in every layer's pool: one allocation serves all layers,
//! so a page costs `layers · 64 · width · 4` bytes in all.
//!
//! # Steps
//!
//! A forward step appends tokens to some sequences: [`PagedLatentCache::plan`] checks the whole
//! batch, allocates the pages it needs (all or nothing), advances the sequence lengths and
//! returns a [`StepPlan`]: positions, slot indices, block tables and lengths uploaded to the
//! backend once and read by every layer. Each layer's attention then writes the new tokens'
//! rows into its pool and attends over positions `0..len`. A plan is tied to the cache state it
//! was made in: any later change (another plan, [`PagedLatentCache::truncate`],
//! [`PagedLatentCache::free_sequence`]) makes it stale, and using it is an error.

use crate::config::MlaConfig;
use crate::error::{MlaError, Result, invalid};
use dsv3_kernels::Backend;
use dsv3_kernels::attention::LatentPool;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::OnceLock;

/// Tokens per page, as FlashMLA.
pub const PAGE_SIZE: usize = 64;

/// `(block tables, key counts)` of the absorbed form's rows, see [`StepPlan::decode_rows`].
pub(crate) type DecodeRows<'a, B> = (&'a <B as Backend>::Buf<u32>, &'a <B as Backend>::Buf<u32>);

/// A sequence in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeqId(u64);

impl fmt::Display for SeqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Sizes of a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// Layers (one pool each).
    pub layers: usize,
    /// Pages per pool (the same page ids exist in every layer).
    pub num_pages: usize,
    /// Tokens per page ([`PAGE_SIZE`] normally; other sizes are accepted for tests).
    pub page_size: usize,
    /// Latent values per token (`kv_lora_rank`).
    pub kv_lora_rank: usize,
    /// Rotary key values per token (`qk_rope_head_dim`).
    pub qk_rope_head_dim: usize,
    /// Positions `0..max_position` may be cached.
    pub max_position: usize,
}

impl CacheConfig {
    /// A cache for `layers` layers of `cfg` with `num_pages` pages of [`PAGE_SIZE`] tokens.
    pub fn for_model(cfg: &MlaConfig, layers: usize, num_pages: usize) -> CacheConfig {
        CacheConfig {
            layers,
            num_pages,
            page_size: PAGE_SIZE,
            kv_lora_rank: cfg.kv_lora_rank,
            qk_rope_head_dim: cfg.qk_rope_head_dim,
            max_position: cfg.max_position,
        }
    }

    /// The pool shape the kernels take.
    pub fn pool(&self) -> LatentPool {
        LatentPool { num_pages: self.num_pages, page_size: self.page_size, kv_lora: self.kv_lora_rank, rope: self.qk_rope_head_dim }
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        let cfg = |field: &'static str, detail: String| MlaError::Config { field, detail };
        if self.layers == 0 {
            return Err(cfg("layers", "must be > 0".into()));
        }
        if self.num_pages == 0 || self.num_pages > u32::MAX as usize {
            return Err(cfg("num_pages", format!("must be in 1..=2^32-1, got {}", self.num_pages)));
        }
        if self.page_size == 0 {
            return Err(cfg("page_size", "must be > 0".into()));
        }
        if self.max_position == 0 || self.max_position as u64 > u64::from(u32::MAX) {
            return Err(cfg("max_position", format!("must be in 1..=2^32-1, got {}", self.max_position)));
        }
        if self.num_pages.checked_mul(self.page_size).is_none_or(|s| s as u64 > u64::from(u32::MAX) + 1) {
            return Err(cfg("num_pages", "num_pages · page_size exceeds the u32 slot range".into()));
        }
        self.pool().check("CacheConfig").map_err(|e| cfg("kv_lora_rank", e.to_string()))?;
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct SeqState {
    pages: Vec<u32>,
    len: usize,
}

/// The paged latent cache of a whole model (see the module docs).
pub struct PagedLatentCache<B: Backend> {
    cfg: CacheConfig,
    pools: Vec<B::Buf<f32>>,
    /// Free page ids, a stack: the next allocation pops from the end.
    free: Vec<u32>,
    seqs: BTreeMap<SeqId, SeqState>,
    next_id: u64,
    generation: u64,
}

impl<B: Backend> fmt::Debug for PagedLatentCache<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PagedLatentCache")
            .field("cfg", &self.cfg)
            .field("free_pages", &self.free.len())
            .field("sequences", &self.seqs.len())
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanEntry {
    pub seq: SeqId,
    /// Position of the first new token (the sequence length before the step).
    pub start: usize,
    /// New tokens.
    pub tokens: usize,
}

/// Everything the attention of one step reads, uploaded once for all layers (module docs).
pub struct StepPlan<B: Backend> {
    generation: u64,
    entries: Vec<PlanEntry>,
    tokens: usize,
    keys: usize,
    max_blocks: usize,
    /// `[T]` absolute position of each new token (sequence after sequence).
    pub(crate) positions: B::Buf<u32>,
    /// `[T]` slot index `page · page_size + pos % page_size` of each new token.
    pub(crate) slots: B::Buf<u32>,
    /// The absorbed form's per-token rows when a sequence has several new tokens (built on
    /// first use, see [`StepPlan::decode_rows`]): `[T, max_blocks]` the block table of each
    /// token's sequence and `[T]` its key count `position + 1`.
    tok_rows: OnceLock<(B::Buf<u32>, B::Buf<u32>)>,
    /// `[N, max_blocks]` block table per sequence, host copy.
    host_seq_table: Vec<u32>,
    /// `[N, max_blocks]` block table per sequence (expanded form).
    pub(crate) seq_table: B::Buf<u32>,
    /// `[N]` sequence lengths after the step.
    pub(crate) seq_lens: B::Buf<u32>,
    /// `[N + 1]` query row offsets.
    pub(crate) cu_q: B::Buf<u32>,
    /// `[N + 1]` key row offsets (of the gathered sequences).
    pub(crate) cu_k: B::Buf<u32>,
}

impl<B: Backend> fmt::Debug for StepPlan<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepPlan")
            .field("generation", &self.generation)
            .field("entries", &self.entries)
            .field("tokens", &self.tokens)
            .field("keys", &self.keys)
            .field("max_blocks", &self.max_blocks)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> StepPlan<B> {
    /// The sequences of the step, in the order their tokens appear in the input rows.
    pub fn entries(&self) -> &[PlanEntry] {
        &self.entries
    }
    /// New tokens `T` (rows of the layer input).
    pub fn tokens(&self) -> usize {
        self.tokens
    }
    /// Keys of all sequences after the step (`Σ len`), the rows the expanded form gathers.
    pub fn keys(&self) -> usize {
        self.keys
    }
    /// Block-table entries per row.
    pub fn max_blocks(&self) -> usize {
        self.max_blocks
    }

    /// The decode rows of the absorbed form, one per new token: `([T, max_blocks]` block
    /// tables, `[T]` key counts `position + 1)`. With one new token per sequence (a decode
    /// step) these are the per-sequence table and lengths themselves; otherwise they are
    /// built and uploaded once, on first use (a prefill plan run in the expanded form never
    /// pays for them).
    pub(crate) fn decode_rows(&self, b: &B) -> Result<DecodeRows<'_, B>> {
        if self.tokens == self.entries.len() {
            return Ok((&self.seq_table, &self.seq_lens));
        }
        if self.tok_rows.get().is_none() {
            let mb = self.max_blocks;
            let mut table = Vec::with_capacity(self.tokens * mb);
            let mut lens = Vec::with_capacity(self.tokens);
            for (i, e) in self.entries.iter().enumerate() {
                for pos in e.start..e.start + e.tokens {
                    table.extend_from_slice(&self.host_seq_table[i * mb..(i + 1) * mb]);
                    lens.push(pos as u32 + 1);
                }
            }
            // A concurrent first use may have set it meanwhile: either value is the same.
            let _ = self.tok_rows.set((b.upload(&table)?, b.upload(&lens)?));
        }
        match self.tok_rows.get() {
            Some((t, l)) => Ok((t, l)),
            None => Err(invalid("plan", "decode rows were not built")),
        }
    }
}

/// One layer's pool together with the step that writes and reads it.
pub struct LayerCache<'a, B: Backend> {
    pub(crate) plan: &'a StepPlan<B>,
    pub(crate) pool: &'a mut B::Buf<f32>,
    pub(crate) shape: LatentPool,
}

impl<B: Backend> fmt::Debug for LayerCache<'_, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayerCache").field("plan", self.plan).field("shape", &self.shape).finish_non_exhaustive()
    }
}

impl<B: Backend> PagedLatentCache<B> {
    /// An empty cache with zeroed pools.
    pub fn new(b: &B, cfg: CacheConfig) -> Result<Self> {
        cfg.validate()?;
        let len = cfg.pool().check("PagedLatentCache::new")?;
        let pools = (0..cfg.layers).map(|_| b.zeros::<f32>(len)).collect::<Result<Vec<_>, _>>()?;
        Ok(PagedLatentCache {
            cfg,
            pools,
            free: (0..cfg.num_pages as u32).rev().collect(),
            seqs: BTreeMap::new(),
            next_id: 0,
            generation: 0,
        })
    }

    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }
    /// Pages not owned by any sequence.
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }
    /// Pages in each pool.
    pub fn total_pages(&self) -> usize {
        self.cfg.num_pages
    }
    /// Bumps on every change of the page mapping.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// A new, empty sequence.
    pub fn add_sequence(&mut self) -> SeqId {
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.insert(id, SeqState { pages: Vec::new(), len: 0 });
        id
    }

    /// The sequences held, in id order.
    pub fn sequences(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.seqs.keys().copied()
    }

    fn seq(&self, id: SeqId) -> Result<&SeqState> {
        self.seqs.get(&id).ok_or(MlaError::UnknownSequence(id))
    }

    /// Tokens cached for `id`.
    pub fn seq_len(&self, id: SeqId) -> Result<usize> {
        Ok(self.seq(id)?.len)
    }

    /// The block table (page ids in position order) of `id`.
    pub fn block_table(&self, id: SeqId) -> Result<&[u32]> {
        Ok(&self.seq(id)?.pages)
    }

    /// Drops `id` and returns its pages to the free list.
    pub fn free_sequence(&mut self, id: SeqId) -> Result<()> {
        let st = self.seqs.remove(&id).ok_or(MlaError::UnknownSequence(id))?;
        self.free.extend(st.pages.iter().rev());
        self.generation += 1;
        Ok(())
    }

    /// Rolls `id` back to its first `len` tokens (speculative decoding rejects a draft this
    /// way); pages past `ceil(len / page_size)` return to the free list. The cached rows of
    /// positions `< len` are untouched. Errors: unknown `id`, or `len` greater than its length.
    pub fn truncate(&mut self, id: SeqId, len: usize) -> Result<()> {
        let ps = self.cfg.page_size;
        let st = self.seqs.get_mut(&id).ok_or(MlaError::UnknownSequence(id))?;
        if len > st.len {
            return Err(invalid("truncate", format!("sequence {id} has {} tokens, cannot truncate to {len}", st.len)));
        }
        let keep = len.div_ceil(ps);
        let dropped = st.pages.split_off(keep);
        st.len = len;
        self.free.extend(dropped.iter().rev());
        self.generation += 1;
        Ok(())
    }

    /// Appends `n` tokens to each `(sequence, n)` of `batch` (in that order: the layer input's
    /// rows are the sequences' new tokens, sequence after sequence), allocating the pages
    /// needed, and uploads the step's positions, slots and block tables.
    ///
    /// All or nothing: on any error (unknown or repeated sequence, `n == 0`, empty batch, a
    /// sequence past `max_position`, [`MlaError::OutOfPages`]) no sequence and no page changes.
    pub fn plan(&mut self, b: &B, batch: &[(SeqId, usize)]) -> Result<StepPlan<B>> {
        if batch.is_empty() {
            return Err(invalid("plan", "the batch is empty"));
        }
        let ps = self.cfg.page_size;
        let mut needed = 0usize;
        let mut entries = Vec::with_capacity(batch.len());
        for (i, &(seq, n)) in batch.iter().enumerate() {
            let st = self.seq(seq)?;
            if n == 0 {
                return Err(invalid("plan", format!("sequence {seq} appends 0 tokens")));
            }
            if batch[..i].iter().any(|&(s, _)| s == seq) {
                return Err(invalid("plan", format!("sequence {seq} appears twice in the batch")));
            }
            let end = st.len.checked_add(n).filter(|&e| e <= self.cfg.max_position);
            let Some(end) = end else {
                return Err(MlaError::PositionLimit { seq, len: st.len, add: n, max: self.cfg.max_position });
            };
            needed += end.div_ceil(ps) - st.pages.len();
            entries.push(PlanEntry { seq, start: st.len, tokens: n });
        }
        if needed > self.free.len() {
            return Err(MlaError::OutOfPages { needed, free: self.free.len() });
        }

        // New page tables, taking pages from the top of the free stack (not yet committed).
        let mut next_free = self.free.len();
        let mut tables: Vec<Vec<u32>> = Vec::with_capacity(entries.len());
        for e in &entries {
            let mut pages = self.seq(e.seq)?.pages.clone();
            while pages.len() < (e.start + e.tokens).div_ceil(ps) {
                next_free -= 1;
                pages.push(self.free[next_free]);
            }
            tables.push(pages);
        }
        let max_blocks = tables.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let tokens: usize = entries.iter().map(|e| e.tokens).sum();
        let keys: usize = entries.iter().map(|e| e.start + e.tokens).sum();
        let (mut positions, mut slots) = (Vec::with_capacity(tokens), Vec::with_capacity(tokens));
        let (mut seq_table, mut seq_lens, mut cu_q, mut cu_k) = (Vec::new(), Vec::new(), vec![0u32], vec![0u32]);
        let padded = |t: &[u32]| t.iter().copied().chain(std::iter::repeat(0)).take(max_blocks).collect::<Vec<u32>>();
        for (e, table) in entries.iter().zip(&tables) {
            let row = padded(table);
            for pos in e.start..e.start + e.tokens {
                positions.push(pos as u32);
                slots.push(table[pos / ps] * ps as u32 + (pos % ps) as u32);
            }
            seq_table.extend_from_slice(&row);
            seq_lens.push((e.start + e.tokens) as u32);
            cu_q.push(cu_q[cu_q.len() - 1] + e.tokens as u32);
            cu_k.push(cu_k[cu_k.len() - 1] + (e.start + e.tokens) as u32);
        }
        let mut plan = StepPlan {
            generation: 0,
            entries: entries.clone(),
            tokens,
            keys,
            max_blocks,
            positions: b.upload(&positions)?,
            slots: b.upload(&slots)?,
            tok_rows: OnceLock::new(),
            seq_table: b.upload(&seq_table)?,
            seq_lens: b.upload(&seq_lens)?,
            cu_q: b.upload(&cu_q)?,
            cu_k: b.upload(&cu_k)?,
            host_seq_table: seq_table,
        };

        // Commit.
        self.free.truncate(next_free);
        for (e, table) in entries.iter().zip(tables) {
            if let Some(st) = self.seqs.get_mut(&e.seq) {
                st.pages = table;
                st.len = e.start + e.tokens;
            }
        }
        self.generation += 1;
        plan.generation = self.generation;
        Ok(plan)
    }

    /// Layer `layer`'s pool, for a step planned on the current cache state.
    /// Errors: a stale plan, or `layer` out of range.
    pub fn layer<'a>(&'a mut self, plan: &'a StepPlan<B>, layer: usize) -> Result<LayerCache<'a, B>> {
        if plan.generation != self.generation {
            return Err(MlaError::StalePlan { plan: plan.generation, cache: self.generation });
        }
        let shape = self.cfg.pool();
        let n = self.pools.len();
        let pool = self.pools.get_mut(layer).ok_or_else(|| invalid("layer", format!("layer {layer} out of range (the cache has {n})")))?;
        Ok(LayerCache { plan, pool, shape })
    }

    /// A host copy of layer `layer`'s whole pool.
    pub fn download_pool(&self, b: &B, layer: usize) -> Result<Vec<f32>> {
        let pool = self.pools.get(layer).ok_or_else(|| invalid("layer", format!("layer {layer} out of range")))?;
        Ok(b.download(pool)?)
    }

    /// Replaces layer `layer`'s whole pool (`num_pages · page_size · width` values), e.g. to
    /// fill a benchmark's cache without running a prefill. The page mapping is unchanged.
    pub fn upload_pool(&mut self, b: &B, layer: usize, data: &[f32]) -> Result<()> {
        let len = self.cfg.pool().check("upload_pool")?;
        if data.len() != len {
            return Err(invalid("upload_pool", format!("data has {} values, the pool {len}", data.len())));
        }
        let n = self.pools.len();
        let pool = self.pools.get_mut(layer).ok_or_else(|| invalid("layer", format!("layer {layer} out of range (the cache has {n})")))?;
        *pool = b.upload(data)?;
        Ok(())
    }

    /// The cached rows `[len, width]` of `id` in layer `layer`, in position order (a host copy:
    /// for tests and debugging).
    pub fn read_rows(&self, b: &B, layer: usize, id: SeqId) -> Result<Vec<f32>> {
        let st = self.seq(id)?;
        let pool = self.download_pool(b, layer)?;
        let (ps, w) = (self.cfg.page_size, self.cfg.pool().width());
        let mut out = Vec::with_capacity(st.len * w);
        for pos in 0..st.len {
            let at = (st.pages[pos / ps] as usize * ps + pos % ps) * w;
            out.extend_from_slice(&pool[at..at + w]);
        }
        Ok(out)
    }
}
