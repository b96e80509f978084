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

impl SeqId {
    /// The pseudo-sequence of a padded step's pad rows ([`PagedLatentCache::plan_decode_padded`]);
    /// never a sequence of a cache.
    pub const PAD: SeqId = SeqId(u64::MAX);
}

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
    /// Pages after the `num_pages` usable ones that no sequence ever owns: the rows a decode
    /// step padded to a batch-size bucket writes and reads for its pad rows
    /// ([`PagedLatentCache::plan_decode_padded`]). 0 unless steps are padded.
    pub pad_pages: usize,
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
            pad_pages: 0,
        }
    }

    /// The same cache with room for the pad rows of decode steps of up to `rows` rows.
    pub fn with_pad_rows(self, rows: usize) -> CacheConfig {
        CacheConfig { pad_pages: rows.div_ceil(self.page_size.max(1)), ..self }
    }

    /// The pool shape the kernels take (the pad pages included).
    pub fn pool(&self) -> LatentPool {
        LatentPool {
            num_pages: self.num_pages.saturating_add(self.pad_pages),
            page_size: self.page_size,
            kv_lora: self.kv_lora_rank,
            rope: self.qk_rope_head_dim,
        }
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        let cfg = |field: &'static str, detail: String| MlaError::Config { field, detail };
        if self.layers == 0 {
            return Err(cfg("layers", "must be > 0".into()));
        }
        if self.num_pages == 0 || self.num_pages.checked_add(self.pad_pages).is_none_or(|n| n > u32::MAX as usize) {
            return Err(cfg(
                "num_pages",
                format!("num_pages + pad_pages must be in 1..=2^32-1, got {} + {}", self.num_pages, self.pad_pages),
            ));
        }
        if self.page_size == 0 {
            return Err(cfg("page_size", "must be > 0".into()));
        }
        if self.max_position == 0 || self.max_position as u64 > u64::from(u32::MAX) {
            return Err(cfg("max_position", format!("must be in 1..=2^32-1, got {}", self.max_position)));
        }
        if (self.num_pages + self.pad_pages).checked_mul(self.page_size).is_none_or(|s| s as u64 > u64::from(u32::MAX) + 1) {
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
    /// This cache among all caches of the process, and the times its pools were replaced
    /// ([`PagedLatentCache::identity`]).
    instance: u64,
    pools_replaced: u64,
}

/// Numbers the caches of a process ([`PagedLatentCache::identity`]).
static INSTANCES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

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

/// The host side of a step ([`PagedLatentCache::plan_tables`]): what a [`StepPlan`] holds on
/// the backend, as host arrays, committed to the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanTables {
    generation: u64,
    entries: Vec<PlanEntry>,
    tokens: usize,
    keys: usize,
    max_blocks: usize,
    /// `[T]` absolute position of each new token (sequence after sequence).
    pub positions: Vec<u32>,
    /// `[T]` slot index `page · page_size + pos % page_size` of each new token.
    pub slots: Vec<u32>,
    /// `[N, max_blocks]` block table per sequence (zero-padded rows).
    pub seq_table: Vec<u32>,
    /// `[N]` sequence lengths after the step.
    pub seq_lens: Vec<u32>,
    /// `[N + 1]` query row offsets.
    pub cu_q: Vec<u32>,
    /// `[N + 1]` key row offsets (of the gathered sequences).
    pub cu_k: Vec<u32>,
}

impl PlanTables {
    pub fn entries(&self) -> &[PlanEntry] {
        &self.entries
    }
    pub fn tokens(&self) -> usize {
        self.tokens
    }
    pub fn max_blocks(&self) -> usize {
        self.max_blocks
    }
    /// The tables in [`PlanBufs`] order.
    fn parts(&self) -> [&[u32]; 6] {
        [&self.positions, &self.slots, &self.seq_table, &self.seq_lens, &self.cu_q, &self.cu_k]
    }
}

/// A step's tables on the backend ([`PlanTables`] uploaded). A caller that runs many steps of
/// one shape (a decode step per batch-size bucket, replayed as a graph) keeps one set and
/// rewrites it each step ([`StepPlan::with_bufs`], [`StepPlan::into_bufs`]).
#[derive(Debug)]
pub struct PlanBufs<B: Backend> {
    pub(crate) positions: B::Buf<u32>,
    pub(crate) slots: B::Buf<u32>,
    pub(crate) seq_table: B::Buf<u32>,
    pub(crate) seq_lens: B::Buf<u32>,
    pub(crate) cu_q: B::Buf<u32>,
    pub(crate) cu_k: B::Buf<u32>,
}

impl<B: Backend> PlanBufs<B> {
    /// All tables of `t` in one [`Backend::upload_many`] (one allocation and one copy on a
    /// device backend).
    fn upload(b: &B, t: &PlanTables) -> Result<PlanBufs<B>> {
        let mut v = b.upload_many(&t.parts())?.into_iter();
        let mut next = || v.next().ok_or_else(|| invalid("plan", "upload_many returned too few buffers"));
        Ok(PlanBufs { positions: next()?, slots: next()?, seq_table: next()?, seq_lens: next()?, cu_q: next()?, cu_k: next()? })
    }

    /// Buffers shaped for `t` (zeros, one allocation on a device backend), to be rewritten by
    /// later steps of the same shape.
    pub fn zeros_like(b: &B, t: &PlanTables) -> Result<PlanBufs<B>> {
        let zeros: Vec<Vec<u32>> = t.parts().iter().map(|p| vec![0u32; p.len()]).collect();
        let parts: Vec<&[u32]> = zeros.iter().map(Vec::as_slice).collect();
        let mut v = b.upload_many(&parts)?.into_iter();
        let mut next = || v.next().ok_or_else(|| invalid("plan", "upload_many returned too few buffers"));
        Ok(PlanBufs { positions: next()?, slots: next()?, seq_table: next()?, seq_lens: next()?, cu_q: next()?, cu_k: next()? })
    }

    /// Overwrites every table with `t`'s (the lengths must match: same batch shape), in one
    /// copy on a device backend ([`Backend::write_many`]).
    fn write(&mut self, b: &B, t: &PlanTables) -> Result<()> {
        let hosts = t.parts();
        let mut bufs = [&mut self.positions, &mut self.slots, &mut self.seq_table, &mut self.seq_lens, &mut self.cu_q, &mut self.cu_k];
        for (buf, host) in bufs.iter().zip(hosts) {
            if b.len(buf) != host.len() {
                return Err(invalid("plan", format!("a table of {} entries for buffers of {}", host.len(), b.len(buf))));
            }
        }
        Ok(b.write_many(&mut bufs, &hosts)?)
    }
}

/// Everything the attention of one step reads, uploaded once for all layers (module docs).
pub struct StepPlan<B: Backend> {
    generation: u64,
    entries: Vec<PlanEntry>,
    tokens: usize,
    keys: usize,
    max_blocks: usize,
    pub(crate) bufs: PlanBufs<B>,
    /// The absorbed form's per-token rows when a sequence has several new tokens (built on
    /// first use, see [`StepPlan::decode_rows`]): `[T, max_blocks]` the block table of each
    /// token's sequence and `[T]` its key count `position + 1`.
    tok_rows: OnceLock<(B::Buf<u32>, B::Buf<u32>)>,
    /// `[N, max_blocks]` block table per sequence, host copy.
    host_seq_table: Vec<u32>,
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
    /// The plan of committed tables, uploaded in one copy.
    pub fn upload(b: &B, t: PlanTables) -> Result<StepPlan<B>> {
        let bufs = PlanBufs::upload(b, &t)?;
        Ok(StepPlan::assemble(t, bufs))
    }

    /// The plan of committed tables in buffers kept from an earlier step of the same shape,
    /// rewritten in place (their device addresses stay: what a replayed graph reads).
    pub fn with_bufs(b: &B, t: PlanTables, mut bufs: PlanBufs<B>) -> Result<StepPlan<B>> {
        bufs.write(b, &t)?;
        Ok(StepPlan::assemble(t, bufs))
    }

    /// The buffers back, for the next step of the same shape.
    pub fn into_bufs(self) -> PlanBufs<B> {
        self.bufs
    }

    fn assemble(t: PlanTables, bufs: PlanBufs<B>) -> StepPlan<B> {
        StepPlan {
            generation: t.generation,
            entries: t.entries,
            tokens: t.tokens,
            keys: t.keys,
            max_blocks: t.max_blocks,
            bufs,
            tok_rows: OnceLock::new(),
            host_seq_table: t.seq_table,
        }
    }

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
    /// built and uploaded once (one copy), on first use (a prefill plan run in the expanded
    /// form never pays for them).
    pub(crate) fn decode_rows(&self, b: &B) -> Result<DecodeRows<'_, B>> {
        if self.tokens == self.entries.len() {
            return Ok((&self.bufs.seq_table, &self.bufs.seq_lens));
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
            let mut v = b.upload_many(&[&table, &lens])?.into_iter();
            if let (Some(t), Some(l)) = (v.next(), v.next()) {
                // A concurrent first use may have set it meanwhile: either value is the same.
                let _ = self.tok_rows.set((t, l));
            }
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
            // The pad pages (after num_pages) are never handed out.
            free: (0..cfg.num_pages as u32).rev().collect(),
            seqs: BTreeMap::new(),
            next_id: 0,
            generation: 0,
            instance: INSTANCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            pools_replaced: 0,
        })
    }

    /// Which pools this is: this cache among the process's caches, and how many times its
    /// pools were replaced ([`PagedLatentCache::upload_pool`]). A captured step writes the
    /// pools it was captured with; a caller replaying one checks this first.
    pub fn identity(&self) -> (u64, u64) {
        (self.instance, self.pools_replaced)
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
        // SeqId::PAD is u64::MAX: never reached by counting from 0.
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
    /// needed, and uploads the step's positions, slots and block tables (in one copy).
    ///
    /// All or nothing: on any error (unknown or repeated sequence, `n == 0`, empty batch, a
    /// sequence past `max_position`, [`MlaError::OutOfPages`]) no sequence and no page changes.
    pub fn plan(&mut self, b: &B, batch: &[(SeqId, usize)]) -> Result<StepPlan<B>> {
        let t = self.plan_tables(batch)?;
        StepPlan::upload(b, t)
    }

    /// [`PagedLatentCache::plan`] without the upload: commits the step and returns its tables.
    pub fn plan_tables(&mut self, batch: &[(SeqId, usize)]) -> Result<PlanTables> {
        self.plan_rows(batch, 0, None)
    }

    /// A decode step (one new token for each of `seqs`) padded to `rows` rows, with block
    /// tables `width` entries wide (at least what the longest sequence needs): the tables a
    /// step of a fixed shape reads, so that one captured graph serves every step of that
    /// shape. Pad row `j` (after the real ones) is a one-token step of no sequence at position
    /// 0 that writes slot `j` of the pad pages and attends to the pad page it wrote; the
    /// cache needs `pad_pages` for it ([`CacheConfig::with_pad_rows`]). Commits the real
    /// sequences as [`PagedLatentCache::plan`] does (all or nothing).
    pub fn plan_decode_padded(&mut self, seqs: &[SeqId], rows: usize, width: usize) -> Result<PlanTables> {
        let pads = rows.checked_sub(seqs.len()).ok_or_else(|| invalid("plan", format!("{} sequences in {rows} rows", seqs.len())))?;
        if pads > self.cfg.pad_pages * self.cfg.page_size {
            return Err(invalid(
                "plan",
                format!("{pads} pad rows but the cache has {} pad pages of {}", self.cfg.pad_pages, self.cfg.page_size),
            ));
        }
        let batch: Vec<(SeqId, usize)> = seqs.iter().map(|&s| (s, 1)).collect();
        self.plan_rows(&batch, pads, Some(width))
    }

    /// [`PagedLatentCache::plan_tables`] with `pads` pad rows after the batch and tables at
    /// least `width` wide.
    fn plan_rows(&mut self, batch: &[(SeqId, usize)], pads: usize, width: Option<usize>) -> Result<PlanTables> {
        if batch.is_empty() && pads == 0 {
            return Err(invalid("plan", "the batch is empty"));
        }
        let ps = self.cfg.page_size;
        let mut needed = 0usize;
        let mut entries = Vec::with_capacity(batch.len() + pads);
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
        let mut tables: Vec<Vec<u32>> = Vec::with_capacity(entries.len() + pads);
        for e in &entries {
            let mut pages = self.seq(e.seq)?.pages.clone();
            while pages.len() < (e.start + e.tokens).div_ceil(ps) {
                next_free -= 1;
                pages.push(self.free[next_free]);
            }
            tables.push(pages);
        }
        // Pad rows: no sequence, position 0, slot j of the pad pages (after the usable ones).
        let pad_base = self.cfg.num_pages * ps;
        for j in 0..pads {
            entries.push(PlanEntry { seq: SeqId::PAD, start: 0, tokens: 1 });
            tables.push(vec![((pad_base + j) / ps) as u32]);
        }
        let need = tables.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let max_blocks = match width {
            Some(w) if w < need => return Err(invalid("plan", format!("block tables {w} wide, the step needs {need}"))),
            Some(w) => w,
            None => need,
        };
        let tokens: usize = entries.iter().map(|e| e.tokens).sum();
        let keys: usize = entries.iter().map(|e| e.start + e.tokens).sum();
        let (mut positions, mut slots) = (Vec::with_capacity(tokens), Vec::with_capacity(tokens));
        let (mut seq_table, mut seq_lens, mut cu_q, mut cu_k) = (Vec::new(), Vec::new(), vec![0u32], vec![0u32]);
        let padded = |t: &[u32]| t.iter().copied().chain(std::iter::repeat(0)).take(max_blocks).collect::<Vec<u32>>();
        for (j, (e, table)) in entries.iter().zip(&tables).enumerate() {
            let row = padded(table);
            for pos in e.start..e.start + e.tokens {
                positions.push(pos as u32);
                let slot = if e.seq == SeqId::PAD { pad_base + j - batch.len() } else { table[pos / ps] as usize * ps + pos % ps };
                slots.push(slot as u32);
            }
            seq_table.extend_from_slice(&row);
            seq_lens.push((e.start + e.tokens) as u32);
            cu_q.push(cu_q[cu_q.len() - 1] + e.tokens as u32);
            cu_k.push(cu_k[cu_k.len() - 1] + (e.start + e.tokens) as u32);
        }

        // Commit.
        self.free.truncate(next_free);
        for (e, table) in entries.iter().zip(tables) {
            if let Some(st) = self.seqs.get_mut(&e.seq) {
                st.pages = table;
                st.len = e.start + e.tokens;
            }
        }
        self.generation += 1;
        Ok(PlanTables { generation: self.generation, entries, tokens, keys, max_blocks, positions, slots, seq_table, seq_lens, cu_q, cu_k })
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
        self.pools_replaced += 1;
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
