//! Decode steps with no host work inside them: [`DecodeRunner`].
//!
//! A decode step appends one token to each of a batch of sequences and samples the token after
//! it. On a device backend everything between "the new ids go up" and "the sampled ids come
//! back" runs without the host waiting: the step's tables go up in one copy, temporaries come
//! from a workspace sized once ([`DecodeRunner::new`] measures one step of the largest batch),
//! kernels' checks are read back once at the end, the MoE dispatch stays on the device, and
//! the logits are sampled where they are ([`dsv3_kernels::Backend::sample_rows`]).
//!
//! On a backend that can capture ([`dsv3_kernels::Backend::can_capture`]: CUDA), the step is
//! also recorded once per shape as a graph and replayed: the batch is padded to a
//! **bucket** ([`BUCKETS`]: 1, 2, 4, ..., 128 rows; [`bucket_for`]) and the block tables to a
//! power-of-two width ([`table_width`]), so one graph serves every step of that shape. Pad rows
//! belong to no sequence: they write and read the cache's pad pages
//! ([`dsv3_mla::PagedLatentCache::plan_decode_padded`]) and are sampled greedily; their ids are
//! dropped. Because every kernel computes a row the same way whatever else is in the batch
//! (docs/architecture.md, "Row independence"), padding does not change the real rows.
//!
//! A graph reads the weights of the model and writes the pools of the cache it was captured
//! with; the runner recaptures when either changes ([`crate::model::Model::instance`],
//! [`dsv3_mla::PagedLatentCache::identity`]). On the CPU the runner runs the same step eagerly
//! (padded only with [`Graphs::Padded`], which tests use to check the pad rows on any machine).

use crate::error::{Result, RuntimeError};
use crate::model::{DecodeInputs, FiniteCheck, Model};
use dsv3_kernels::sample::SampleRow;
use dsv3_kernels::{Backend, DeviceStats, KernelError};
use dsv3_mla::{PAGE_SIZE, PagedLatentCache, PlanBufs, PlanTables, SeqId, StepPlan};
use std::collections::HashMap;
use std::collections::hash_map::Entry;

/// Batch sizes a decode graph is captured for; a batch runs padded to the smallest bucket that
/// holds it. Larger batches run eagerly.
pub const BUCKETS: [usize; 8] = [1, 2, 4, 8, 16, 32, 64, 128];

/// The bucket of a batch of `n` sequences (`None`: empty, or past the largest bucket).
pub fn bucket_for(n: usize) -> Option<usize> {
    BUCKETS.iter().copied().find(|&b| b >= n).filter(|_| n > 0)
}

/// The block-table width a step whose longest sequence needs `blocks` pages runs with: the
/// next power of two, so that a graph serves a sequence for as long as it stays in the width.
pub fn table_width(blocks: usize) -> usize {
    blocks.max(1).next_power_of_two()
}

/// A step of the backend ([`Backend::begin_step`]) that ends when dropped, if not ended
/// before with its result ([`StepScope::end`]).
#[derive(Debug)]
pub struct StepScope<'a, B: Backend> {
    b: &'a B,
    open: bool,
}

impl<'a, B: Backend> StepScope<'a, B> {
    pub fn begin(b: &'a B) -> Result<StepScope<'a, B>> {
        b.begin_step()?;
        Ok(StepScope { b, open: true })
    }

    /// Ends the step: the first failed device-side check of it, if any.
    pub fn end(mut self) -> Result<()> {
        self.open = false;
        Ok(self.b.end_step()?)
    }
}

impl<B: Backend> Drop for StepScope<'_, B> {
    fn drop(&mut self) {
        if self.open {
            // An error left the step early; that error is the one reported.
            let _ = self.b.end_step();
        }
    }
}

/// One sequence of a decode step: its next token, and how to sample the token after it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeRow {
    pub seq: SeqId,
    pub token: u32,
    pub sample: SampleRow,
}

/// Whether a [`DecodeRunner`] pads steps to buckets and replays them as graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Graphs {
    /// Graphs where the backend can capture them (padded to buckets), plain eager steps
    /// elsewhere.
    #[default]
    Auto,
    /// Padded to buckets, but run eagerly: the very step a graph records, run op by op (tests
    /// compare the two; on the CPU it checks the pad rows).
    Padded,
    /// Plain eager steps of the batch as it is.
    Off,
}

/// What a [`DecodeRunner`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunnerStats {
    pub eager_steps: u64,
    pub graph_steps: u64,
    pub captures: u64,
    /// Bytes of the workspace reserved at creation (0: none, the CPU).
    pub workspace_bytes: usize,
    /// Why graphs were turned off, if a capture failed (the steps then run eagerly, padded).
    pub capture_error: Option<String>,
    /// With [`DecodeRunner::set_timing`]: the device time of the last step, seconds, between
    /// events around its device work (a replay, or the eager step's ops: the gaps where the
    /// device waits for the host to launch are inside it then). `None` on the CPU.
    pub last_device_s: Option<f64>,
}

/// The buffers of one step shape: the plan's tables, the ids, the sampling rows, the sampled
/// ids (all at fixed addresses, as a graph reads and writes them) and the graph.
struct Shape<B: Backend> {
    bufs: Option<PlanBufs<B>>,
    ids: B::Buf<u32>,
    samples: B::Buf<SampleRow>,
    out: B::Buf<u32>,
    graph: Option<B::Graph>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ShapeKey {
    rows: usize,
    width: usize,
    allowed: usize,
}

/// Runs decode steps (module docs): `step` takes each sequence's next token and returns the
/// sampled token after it, one per sequence.
pub struct DecodeRunner<B: Backend> {
    timing: bool,
    graphs: bool,
    pad: bool,
    max_rows: usize,
    /// The model and cache the shapes' graphs were captured with.
    bound: Option<(u64, (u64, u64))>,
    shapes: HashMap<ShapeKey, Shape<B>>,
    stats: RunnerStats,
}

impl<B: Backend> std::fmt::Debug for DecodeRunner<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodeRunner")
            .field("graphs", &self.graphs)
            .field("pad", &self.pad)
            .field("max_rows", &self.max_rows)
            .field("shapes", &self.shapes.len())
            .field("stats", &self.stats)
            .finish()
    }
}

impl<B: Backend> DecodeRunner<B> {
    /// A runner for batches of up to `max_batch` sequences (larger ones run eagerly, as they
    /// are). On a backend that can capture it first sizes and reserves the device workspace by
    /// measuring one padded step of that many rows on a scratch cache.
    pub fn new(b: &B, model: &Model<B>, max_batch: usize, mode: Graphs) -> Result<DecodeRunner<B>> {
        let rows = bucket_for(max_batch.max(1));
        let device = b.can_capture();
        let pad = match mode {
            Graphs::Auto => device && rows.is_some(),
            Graphs::Padded => rows.is_some(),
            Graphs::Off => false,
        };
        let max_rows = if pad { rows.unwrap_or(0) } else { 0 };
        let mut r = DecodeRunner {
            timing: false,
            graphs: pad && mode == Graphs::Auto,
            pad,
            max_rows,
            bound: None,
            shapes: HashMap::new(),
            stats: RunnerStats::default(),
        };
        if device {
            r.stats.workspace_bytes = reserve_workspace(b, model, rows.unwrap_or(max_batch.max(1)))?;
        }
        Ok(r)
    }

    /// Pad rows the cache must hold for this runner's steps: pass it to
    /// [`Model::new_cache_with`].
    pub fn pad_rows(&self) -> usize {
        self.max_rows
    }

    /// Whether steps are replayed as graphs.
    pub fn uses_graphs(&self) -> bool {
        self.graphs
    }

    pub fn stats(&self) -> &RunnerStats {
        &self.stats
    }

    /// Times the device work of each step with events ([`RunnerStats::last_device_s`]); each
    /// timed step waits for its events.
    pub fn set_timing(&mut self, on: bool) {
        self.timing = on;
    }

    /// One decode step: appends each row's token to its sequence and returns the sampled next
    /// token of each row, in order. Ids below `allowed` are sampled. All or nothing: on an
    /// error the cache is as it was.
    ///
    /// Refused before any work, as [`Model::forward_hidden`] refuses them (from the host
    /// tables, nothing read back): an id outside the vocabulary, a position past
    /// `max_position_embeddings`, bad sampling parameters. A non-finite final hidden state
    /// is [`RuntimeError::NonFinite`] (on a GPU found by the sampler among the step's
    /// deferred checks: `Model::decode_into`).
    pub fn step(
        &mut self,
        b: &B,
        model: &Model<B>,
        cache: &mut PagedLatentCache<B>,
        rows: &[DecodeRow],
        allowed: usize,
    ) -> Result<Vec<u32>> {
        if rows.is_empty() {
            return Err(RuntimeError::Request("a decode step needs at least one sequence".into()));
        }
        let ids: Vec<u32> = rows.iter().map(|r| r.token).collect();
        let sizes: Vec<(SeqId, usize)> = rows.iter().map(|r| (r.seq, 1)).collect();
        model.check_step(cache, &ids, &sizes)?;
        for (i, r) in rows.iter().enumerate() {
            r.sample.validate(i)?;
        }
        let lens: Vec<(SeqId, usize)> = rows.iter().map(|r| Ok((r.seq, cache.seq_len(r.seq)?))).collect::<Result<_>>()?;
        let bucket = bucket_for(rows.len()).filter(|&p| self.pad && p <= self.max_rows);
        let run = b.run_step(|| match bucket {
            Some(p) => self.padded(b, model, cache, rows, p, allowed),
            None => {
                let (timing, last) = (self.timing, &mut self.stats.last_device_s);
                eager(b, model, cache, rows, allowed, timing, last)
            }
        });
        if run.is_err() {
            // The step was committed to the cache before it ran: take it back.
            for &(seq, len) in &lens {
                if cache.seq_len(seq).is_ok_and(|l| l > len) {
                    let _ = cache.truncate(seq, len);
                }
            }
        }
        if bucket.is_none() {
            self.stats.eager_steps += 1;
        }
        run.map_err(|e| logits_check(e, allowed))
    }

    fn padded(
        &mut self,
        b: &B,
        model: &Model<B>,
        cache: &mut PagedLatentCache<B>,
        rows: &[DecodeRow],
        p: usize,
        allowed: usize,
    ) -> Result<Vec<u32>> {
        let identity = (model.instance(), cache.identity());
        if self.bound != Some(identity) {
            // Graphs of another model or cache would read and write their buffers.
            self.shapes.clear();
            self.bound = Some(identity);
        }
        let mut need = 1;
        for r in rows {
            need = need.max((cache.seq_len(r.seq)? + 1).div_ceil(PAGE_SIZE));
        }
        let seqs: Vec<SeqId> = rows.iter().map(|r| r.seq).collect();
        let t = cache.plan_decode_padded(&seqs, p, table_width(need))?;
        let key = ShapeKey { rows: p, width: t.max_blocks(), allowed };
        let shape = match self.shapes.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(Shape::new(b, &t, p)?),
        };
        let mut ids = vec![0u32; p];
        let mut samples = vec![SampleRow::GREEDY; p];
        for (i, r) in rows.iter().enumerate() {
            ids[i] = r.token;
            samples[i] = r.sample;
        }
        b.write(&mut shape.ids, &ids)?;
        b.write(&mut shape.samples, &samples)?;
        let bufs = match shape.bufs.take() {
            Some(bufs) => bufs,
            None => {
                // Lost with an error of an earlier step: new buffers, so no old graph.
                shape.graph = None;
                PlanBufs::zeros_like(b, &t)?
            }
        };
        let plan = StepPlan::with_bufs(b, t, bufs)?;
        // DSV3_CHECK_FINITE=layers reads every layer's output back: never in a graph.
        let graphs = self.graphs && model.finite_check() != FiniteCheck::Layers;
        if graphs && shape.graph.is_none() {
            let (ids_b, samples_b, out_b) = (&shape.ids, &shape.samples, &mut shape.out);
            let x = DecodeInputs { plan: &plan, ids: ids_b, rows: samples_b, allowed };
            match b.capture(|| model.decode_into(b, cache, x, out_b)) {
                Ok(Some(g)) => {
                    shape.graph = Some(g);
                    self.stats.captures += 1;
                }
                Ok(None) => self.graphs = false,
                Err(e) => {
                    self.graphs = false;
                    self.stats.capture_error = Some(e.to_string());
                }
            }
        }
        let timing = self.timing;
        let ran = match (&shape.graph, graphs) {
            (Some(g), true) => {
                let replay = || b.replay(g).map_err(RuntimeError::from);
                timed(b, timing, &mut self.stats.last_device_s, replay).map(|()| self.stats.graph_steps += 1)
            }
            _ => {
                let run = || -> Result<()> {
                    let step = StepScope::begin(b)?;
                    model.decode_into(
                        b,
                        cache,
                        DecodeInputs { plan: &plan, ids: &shape.ids, rows: &shape.samples, allowed },
                        &mut shape.out,
                    )?;
                    step.end()
                };
                timed(b, timing, &mut self.stats.last_device_s, run).map(|()| self.stats.eager_steps += 1)
            }
        };
        shape.bufs = Some(plan.into_bufs());
        ran?;
        let mut out = b.download(&shape.out)?;
        out.truncate(rows.len());
        Ok(out)
    }
}

impl<B: Backend> Shape<B> {
    fn new(b: &B, t: &PlanTables, rows: usize) -> Result<Shape<B>> {
        Ok(Shape {
            bufs: Some(PlanBufs::zeros_like(b, t)?),
            ids: b.zeros(rows)?,
            samples: b.zeros(rows)?,
            out: b.zeros(rows)?,
            graph: None,
        })
    }
}

/// The step of `rows` as it is, op by op (one upload of the tables, one of the ids and one of
/// the sampling rows; the sampled ids come back).
fn eager<B: Backend>(
    b: &B,
    model: &Model<B>,
    cache: &mut PagedLatentCache<B>,
    rows: &[DecodeRow],
    allowed: usize,
    timing: bool,
    last_device_s: &mut Option<f64>,
) -> Result<Vec<u32>> {
    let batch: Vec<(SeqId, usize)> = rows.iter().map(|r| (r.seq, 1)).collect();
    let ids: Vec<u32> = rows.iter().map(|r| r.token).collect();
    let samples: Vec<SampleRow> = rows.iter().map(|r| r.sample).collect();
    let run = || -> Result<B::Buf<u32>> {
        let step = StepScope::begin(b)?;
        let plan = cache.plan(b, &batch)?;
        let (ids, samples) = (b.upload(&ids)?, b.upload(&samples)?);
        let mut out = b.zeros::<u32>(rows.len())?;
        model.decode_into(b, cache, DecodeInputs { plan: &plan, ids: &ids, rows: &samples, allowed }, &mut out)?;
        step.end()?;
        Ok(out)
    };
    let out = timed(b, timing, last_device_s, run)?;
    Ok(b.download(&out)?)
}

/// A step's error, with the sampler's deferred NaN check (a device backend: the final hidden
/// state of row `index / allowed` was not finite, so its logits are NaN; [`Model::decode_into`])
/// named as the final-hidden-state check of the CPU names it.
fn logits_check(e: RuntimeError, allowed: usize) -> RuntimeError {
    match e {
        RuntimeError::Kernel(KernelError::DeviceCheck { kernel: "dsv3_sample" | "dsv3_sample_greedy", index }) => {
            let (index, allowed) = (index as usize, allowed.max(1));
            RuntimeError::NonFinite {
                at: "the logits of a decode step, from its final hidden state (DSV3_CHECK_FINITE=layers names the layer)".into(),
                row: index / allowed,
                col: index % allowed,
                value: f32::NAN,
            }
        }
        e => e,
    }
}

/// `f`, timed on the device when `on` (into `last`).
fn timed<B: Backend, R>(b: &B, on: bool, last: &mut Option<f64>, f: impl FnOnce() -> Result<R>) -> Result<R> {
    if !on {
        return f();
    }
    let (r, secs) = b.timed(f)?;
    *last = secs;
    Ok(r)
}

/// Sizes the device workspace by running one padded step of `rows` rows (all pad rows, on a
/// scratch cache) while measuring, and reserves that much (plus an eighth and 1 MiB);
/// returns the bytes reserved.
fn reserve_workspace<B: Backend>(b: &B, model: &Model<B>, rows: usize) -> Result<usize> {
    let vocab = model.config().vocab_size;
    let mut cache = model.new_cache_with(b, 1, rows)?;
    let t = cache.plan_decode_padded(&[], rows, 1)?;
    let plan = StepPlan::upload(b, t)?;
    let ids = b.zeros::<u32>(rows)?;
    let samples = b.upload(&vec![SampleRow::GREEDY; rows])?;
    let mut out = b.zeros::<u32>(rows)?;
    b.measure_workspace()?;
    let run = (|| -> Result<()> {
        let step = StepScope::begin(b)?;
        model.decode_into(b, &mut cache, DecodeInputs { plan: &plan, ids: &ids, rows: &samples, allowed: vocab }, &mut out)?;
        step.end()
    })();
    let peak = b.measured_workspace();
    run?;
    let bytes = peak + peak / 8 + (1 << 20);
    b.reserve_workspace(bytes)?;
    Ok(bytes)
}

/// Counters of the device across `f` (what a benchmark reports per step).
pub fn device_stats_of<B: Backend, R>(b: &B, f: impl FnOnce() -> Result<R>) -> Result<(R, DeviceStats)> {
    let before = b.stats();
    let r = f()?;
    Ok((r, b.stats().since(&before)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_their_batches() {
        assert_eq!(bucket_for(0), None);
        assert_eq!(bucket_for(1), Some(1));
        assert_eq!(bucket_for(2), Some(2));
        assert_eq!(bucket_for(3), Some(4));
        assert_eq!(bucket_for(5), Some(8));
        assert_eq!(bucket_for(64), Some(64));
        assert_eq!(bucket_for(65), Some(128));
        assert_eq!(bucket_for(128), Some(128));
        assert_eq!(bucket_for(129), None);
        for n in 1..=128 {
            let b = bucket_for(n).unwrap();
            assert!(b >= n && b < 2 * n.max(1) + 1, "{n} -> {b}: at most twice the batch");
            assert!(BUCKETS.contains(&b));
        }
    }

    /// On a GPU a non-finite final hidden state reaches the host as the sampler's deferred
    /// NaN check (every logit of its row is NaN); the runner names it as the CPU's check does.
    #[test]
    fn the_samplers_device_check_is_named_as_the_final_hidden_state_check() {
        for kernel in ["dsv3_sample", "dsv3_sample_greedy"] {
            let e = logits_check(RuntimeError::Kernel(KernelError::DeviceCheck { kernel, index: 2 * 100 + 7 }), 100);
            assert!(matches!(e, RuntimeError::NonFinite { row: 2, col: 7, .. }), "{e}");
            assert!(e.to_string().contains("final hidden state"), "{e}");
        }
        let other = logits_check(RuntimeError::Kernel(KernelError::DeviceCheck { kernel: "dsv3_embedding_bf16", index: 3 }), 100);
        assert!(matches!(other, RuntimeError::Kernel(KernelError::DeviceCheck { index: 3, .. })), "{other}");
    }

    #[test]
    fn table_widths_are_powers_of_two() {
        assert_eq!(table_width(0), 1);
        assert_eq!(table_width(1), 1);
        assert_eq!(table_width(3), 4);
        assert_eq!(table_width(64), 64);
        assert_eq!(table_width(65), 128);
    }
}
