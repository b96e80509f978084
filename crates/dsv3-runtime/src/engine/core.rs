//! [`Engine`]: the scheduler and the step (see the module docs of [`super`]).

use super::text::TextState;
use super::{EngineConfig, Event, EventSink, FinishReason, GenRequest, Limits, RequestId, Shared, SubmitError, TokenLogprob, Usage};
use crate::decode::{DecodeRow, DecodeRunner};
use crate::error::{Result, RuntimeError};
use crate::generate::Sampler;
use crate::model::{AttnForm, Model};
use crate::tokenizer::Tokenizer;
use dsv3_kernels::Backend;
use dsv3_mla::{PAGE_SIZE, PagedLatentCache, SeqId};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

/// One request inside the engine.
struct Seq {
    id: RequestId,
    req: GenRequest,
    sink: EventSink,
    sampler: Sampler,
    /// The cache sequence while admitted.
    slot: Option<SeqId>,
    /// Tokens of `prompt ++ generated` in the cache.
    cached: usize,
    generated: Vec<u32>,
    text: TextState,
    arrived: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    preemptions: u32,
    /// Cancel at the next step (asked for, or the client is gone).
    cancel: bool,
    /// The sink refused an event: nobody listens.
    gone: bool,
    /// Ended (its last event sent): removed and its pages freed at the end of the step.
    done: bool,
}

/// Where an admitted sequence is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Prompt tokens still to cache.
    Prefill,
    /// Generated tokens to cache again after a preemption.
    Replay,
    /// Everything but the last generated token is cached: it decodes that token next.
    Decode,
}

impl Seq {
    fn prompt_len(&self) -> usize {
        self.req.prompt.len()
    }

    /// Tokens that must be cached before the next decode: the prompt and every generated
    /// token but the last (the next decode's input).
    fn fill_target(&self) -> usize {
        self.prompt_len() + self.generated.len().saturating_sub(1)
    }

    fn tokens(&self, range: std::ops::Range<usize>) -> Vec<u32> {
        let p = self.prompt_len();
        range.map(|i| if i < p { self.req.prompt[i] } else { self.generated[i - p] }).collect()
    }

    fn phase(&self) -> Phase {
        if self.cached < self.prompt_len() {
            Phase::Prefill
        } else if self.cached < self.fill_target() {
            Phase::Replay
        } else {
            Phase::Decode
        }
    }

    /// Pages this sequence will take beyond those it holds before it next decodes (one row
    /// past its fill target): what admission reserves for it.
    fn pages_to_fill(&self) -> usize {
        pages(self.fill_target() + 1).saturating_sub(pages(self.cached))
    }

    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_len(),
            completion_tokens: self.generated.len(),
            time_to_first_token: self.first_token.map(|t| t - self.arrived),
            total_time: self.arrived.elapsed(),
            preemptions: self.preemptions,
        }
    }

    /// Sends `ev`; a refused event marks the client gone (and the sequence cancelled).
    fn send(&mut self, ev: Event) {
        if !self.gone && !(self.sink)(ev) {
            self.gone = true;
            self.cancel = true;
        }
    }

    /// Sends the last event and marks the sequence ended.
    fn end(&mut self, reason: FinishReason, text: String, error: Option<String>, m: &super::EngineMetrics) {
        let usage = self.usage();
        self.send(Event::Finished { reason, text, usage, error });
        m.finished(reason);
        self.done = true;
    }
}

fn pages(tokens: usize) -> usize {
    tokens.div_ceil(PAGE_SIZE)
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepReport {
    /// Sequences that decoded a token.
    pub decoded: usize,
    /// Generated tokens re-cached after preemptions.
    pub replayed: usize,
    /// Prompt tokens prefilled.
    pub prefilled: usize,
    /// Sequences preempted to make room.
    pub preempted: usize,
    /// Sequences that ended.
    pub finished: usize,
}

/// A model, its cache and its requests (module docs of [`super`]). [`super::spawn`] runs one
/// on its own thread; tests drive it directly with [`Engine::submit`] and [`Engine::step`].
pub struct Engine<B: Backend> {
    b: B,
    model: Model<B>,
    tok: Option<Arc<Tokenizer>>,
    cache: PagedLatentCache<B>,
    /// Runs the steps that are decodes only (on a GPU: graphs, sampling on the device).
    runner: DecodeRunner<B>,
    cfg: EngineConfig,
    /// End-of-sequence ids (the config's and the tokenizer's).
    eos: Vec<u32>,
    /// Ids that may be sampled: below the tokenizer's size (the padding rows never).
    allowed: usize,
    /// Not admitted, by id (= arrival order; preempted sequences go back in their place).
    waiting: Vec<Seq>,
    /// Admitted, by id.
    admitted: Vec<Seq>,
    shared: Arc<Shared>,
}

impl<B: Backend> std::fmt::Debug for Engine<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("cfg", &self.cfg)
            .field("waiting", &self.waiting.len())
            .field("admitted", &self.admitted.len())
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> Engine<B> {
    /// An engine for `model` (its cache allocated now, `cfg` resolved against the model).
    pub fn new(b: B, model: Model<B>, tok: Option<Tokenizer>, cfg: EngineConfig) -> Result<Engine<B>> {
        let mcfg = model.config();
        let cfg = cfg.resolve(mcfg.max_position_embeddings)?;
        let mut eos = mcfg.eos_token_ids.clone();
        eos.extend(tok.as_ref().and_then(|t| t.eos_id()));
        let vocab = mcfg.vocab_size;
        let allowed = tok.as_ref().map_or(vocab, |t| t.token_count().min(vocab));
        let runner = DecodeRunner::new(&b, &model, cfg.max_running, cfg.decode_graphs)?;
        let cache = model.new_cache_with(&b, cfg.cache_tokens, runner.pad_rows())?;
        let tok = tok.map(Arc::new);
        let limits = Limits { max_context: cfg.max_context, vocab_size: vocab, has_tokenizer: tok.is_some(), max_waiting: cfg.max_waiting };
        let shared = Shared::new(limits, tok.clone());
        shared.metrics.pages_total.store(cache.total_pages() as u64, Relaxed);
        Ok(Engine { b, model, tok, cache, runner, cfg, eos, allowed, waiting: Vec::new(), admitted: Vec::new(), shared })
    }

    pub(crate) fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn limits(&self) -> Limits {
        self.shared.limits
    }

    pub fn model(&self) -> &Model<B> {
        &self.model
    }

    /// The engine's metrics.
    pub fn metrics(&self) -> super::MetricsSnapshot {
        self.shared.metrics.snapshot()
    }

    /// What the decode runner did (steps of decodes alone: eager or replayed graphs).
    pub fn decode_stats(&self) -> &crate::decode::RunnerStats {
        self.runner.stats()
    }

    /// Pages of the cache not held by any sequence.
    pub fn free_pages(&self) -> usize {
        self.cache.free_pages()
    }

    /// No request is waiting or running.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.admitted.is_empty()
    }

    /// Checks and queues a request (the synchronous form of [`super::EngineHandle::submit`]).
    pub fn submit(&mut self, req: GenRequest, sink: EventSink) -> Result<RequestId, SubmitError> {
        let id = self.shared.accept(&req)?;
        self.submit_accepted(id, req, sink);
        Ok(id)
    }

    /// Queues a request already checked by [`Shared::accept`].
    pub(crate) fn submit_accepted(&mut self, id: RequestId, req: GenRequest, sink: EventSink) {
        let dec = self.tok.as_ref().map(|t| t.stream_shared(self.model.config().vocab_size));
        let text = TextState::new(dec, req.stop.clone());
        // Checked by `Limits::check`, which builds the same sampler.
        let sampler = match Sampler::new(req.sampling) {
            Ok(s) => s,
            Err(e) => {
                self.shared.queued.fetch_sub(1, Relaxed);
                let mut sink = sink;
                sink(Event::Finished {
                    reason: FinishReason::Error,
                    text: String::new(),
                    usage: Usage::default(),
                    error: Some(e.to_string()),
                });
                return;
            }
        };
        let seq = Seq {
            id,
            req,
            sink,
            sampler,
            slot: None,
            cached: 0,
            generated: Vec::new(),
            text,
            arrived: Instant::now(),
            first_token: None,
            last_token: None,
            preemptions: 0,
            cancel: false,
            gone: false,
            done: false,
        };
        let at = self.waiting.partition_point(|s| s.id < id);
        self.waiting.insert(at, seq);
        self.publish();
    }

    /// Cancels request `id` at the next step (no-op if it is not here).
    pub fn cancel(&mut self, id: RequestId) {
        for s in self.waiting.iter_mut().chain(self.admitted.iter_mut()).filter(|s| s.id == id) {
            s.cancel = true;
        }
    }

    /// Cancels every request at the next step.
    pub fn cancel_all(&mut self) {
        for s in self.waiting.iter_mut().chain(self.admitted.iter_mut()) {
            s.cancel = true;
        }
    }

    /// One step of continuous batching (module docs of [`super`]). A failed forward pass ends
    /// the sequences it carried with [`FinishReason::Error`] and is returned after that.
    pub fn step(&mut self) -> Result<StepReport> {
        let mut report = StepReport::default();
        report.finished += self.reap();
        self.admit();
        report.preempted = self.make_room()?;

        // The step's batches: absorbed (decodes, then replays) and expanded (prompt chunks).
        let mut budget = self.cfg.max_step_tokens;
        let mut absorbed: Vec<(usize, Vec<u32>)> = Vec::new();
        let mut expanded: Vec<(usize, Vec<u32>)> = Vec::new();
        for (i, s) in self.admitted.iter().enumerate() {
            if s.phase() == Phase::Decode {
                absorbed.push((i, vec![s.generated[s.generated.len() - 1]]));
                budget -= 1;
            }
        }
        for (i, s) in self.admitted.iter().enumerate() {
            let n = match s.phase() {
                Phase::Replay => (s.fill_target() - s.cached).min(budget),
                // A one-token prompt is prefilled in the absorbed form, as a one-shot prefill
                // of it would be (`AttnForm::Auto`).
                Phase::Prefill if s.prompt_len() == 1 => 1.min(budget),
                _ => continue,
            };
            if n > 0 {
                absorbed.push((i, s.tokens(s.cached..s.cached + n)));
                budget -= n;
            }
        }
        for (i, s) in self.admitted.iter().enumerate() {
            if s.phase() == Phase::Prefill && s.prompt_len() > 1 {
                let chunk = if self.cfg.prefill_chunk == 0 { usize::MAX } else { self.cfg.prefill_chunk };
                let n = (s.prompt_len() - s.cached).min(budget).min(chunk);
                if n > 0 {
                    expanded.push((i, s.tokens(s.cached..s.cached + n)));
                    budget -= n;
                }
            }
        }
        report.decoded = absorbed.iter().filter(|(i, _)| self.admitted[*i].phase() == Phase::Decode).count();
        report.replayed = absorbed.iter().filter(|(i, _)| self.admitted[*i].phase() == Phase::Replay).map(|(_, t)| t.len()).sum();
        report.prefilled =
            absorbed.iter().chain(&expanded).filter(|(i, _)| self.admitted[*i].phase() == Phase::Prefill).map(|(_, t)| t.len()).sum();

        let mut failure = None;
        for (rows, form) in [(absorbed, AttnForm::Absorbed), (expanded, AttnForm::Expanded)] {
            if rows.is_empty() {
                continue;
            }
            // A step of decodes alone goes through the decode runner: only the new ids go to
            // the backend and only the sampled ids come back. Replays, one-token prompts and
            // requests for logprobs (which need the logits on the host) take the general path.
            let decodes_only = form == AttnForm::Absorbed
                && rows.iter().all(|(i, _)| self.admitted[*i].phase() == Phase::Decode && self.admitted[*i].req.logprobs.is_none());
            let ran = if decodes_only { self.run_decodes(&rows) } else { self.run(&rows, form) };
            if let Err(e) = ran {
                // The cache rows of these sequences are not trustworthy now: end them.
                let msg = e.to_string();
                for &(i, _) in &rows {
                    let s = &mut self.admitted[i];
                    if !s.done {
                        s.end(FinishReason::Error, String::new(), Some(msg.clone()), &self.shared.metrics);
                    }
                }
                failure = Some(e);
            }
        }
        report.finished += self.reap_done();
        self.shared.metrics.steps.fetch_add(1, Relaxed);
        self.publish();
        match failure {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    /// Runs `rows` (admitted index, tokens) through the model in `form`, advances the cached
    /// counts and samples every sequence that reaches its next token.
    fn run(&mut self, rows: &[(usize, Vec<u32>)], form: AttnForm) -> Result<()> {
        let mut batch: Vec<(SeqId, &[u32])> = Vec::with_capacity(rows.len());
        for (i, t) in rows {
            let slot =
                self.admitted[*i].slot.ok_or_else(|| RuntimeError::Request("engine: an admitted sequence has no cache slot".into()))?;
            batch.push((slot, &t[..]));
        }
        let hidden = self.model.forward_hidden_with(&self.b, &mut self.cache, &batch, form)?;
        // Sequences whose last row gives their next token: decodes, and prompts completed now
        // for the first time (a preempted sequence re-caching its prompt already drew the
        // token after it: it goes on to replay what it generated).
        let mut sample: Vec<(usize, usize)> = Vec::new();
        let mut row = 0;
        for (i, t) in rows {
            let s = &mut self.admitted[*i];
            let was = s.phase();
            s.cached += t.len();
            row += t.len();
            let first_token = was == Phase::Prefill && s.cached == s.prompt_len() && s.generated.is_empty();
            if was == Phase::Decode || first_token {
                sample.push((*i, row - 1));
            }
        }
        if sample.is_empty() {
            return Ok(());
        }
        let picked: Vec<usize> = sample.iter().map(|&(_, r)| r).collect();
        let logits = self.model.logits(&self.b, &hidden, &picked)?;
        let vocab = self.model.config().vocab_size;
        for (k, &(i, _)) in sample.iter().enumerate() {
            self.accept(i, &logits[k * vocab..(k + 1) * vocab])?;
        }
        Ok(())
    }

    /// One decode step of `rows` (admitted index, its last generated token) through the
    /// decode runner, which samples each row with its sequence's sampler parameters and the
    /// next uniform of its stream (the draw `Sampler::sample` would make).
    fn run_decodes(&mut self, rows: &[(usize, Vec<u32>)]) -> Result<()> {
        let mut step = Vec::with_capacity(rows.len());
        for (i, t) in rows {
            let s = &mut self.admitted[*i];
            let seq = s.slot.ok_or_else(|| RuntimeError::Request("engine: an admitted sequence has no cache slot".into()))?;
            let token = *t.first().ok_or_else(|| RuntimeError::Request("engine: a decode row without its token".into()))?;
            step.push(DecodeRow { seq, token, sample: s.sampler.next_row() });
        }
        let ids = self.runner.step(&self.b, &self.model, &mut self.cache, &step, self.allowed)?;
        for (&(i, _), id) in rows.iter().zip(ids) {
            self.admitted[i].cached += 1;
            self.emit(i, id, None)?;
        }
        Ok(())
    }

    /// Samples sequence `i`'s next token from its logits row and tells the client.
    fn accept(&mut self, i: usize, row: &[f32]) -> Result<()> {
        let s = &mut self.admitted[i];
        let id = s.sampler.sample(row, self.allowed)?;
        let logprob = s.req.logprobs.map(|k| logprobs(row, self.allowed, id, k));
        self.emit(i, id, logprob)
    }

    /// Records sequence `i`'s next token `id` and tells the client; ends the sequence at EOS,
    /// a stop string or its length.
    fn emit(&mut self, i: usize, id: u32, logprob: Option<TokenLogprob>) -> Result<()> {
        let now = Instant::now();
        let m = &self.shared.metrics;
        let s = &mut self.admitted[i];
        s.generated.push(id);
        m.generation_tokens.fetch_add(1, Relaxed);
        match s.last_token {
            Some(t) => m.observe_tpot(now - t),
            None => {
                s.first_token = Some(now);
                m.observe_ttft(now - s.arrived);
            }
        }
        s.last_token = Some(now);
        let eos = !s.req.ignore_eos && self.eos.contains(&id);
        let piece = if eos { Default::default() } else { s.text.push(id)? };
        s.send(Event::Token { id, text: piece.text, logprob });
        let reason = if eos || piece.stopped {
            Some(FinishReason::Stop)
        } else if s.generated.len() >= s.req.max_tokens || s.prompt_len() + s.generated.len() > self.cfg.max_context {
            Some(FinishReason::Length)
        } else {
            None
        };
        if let Some(r) = reason {
            let rest = if piece.stopped { String::new() } else { s.text.finish()?.text };
            s.end(r, rest, None, m);
        }
        Ok(())
    }

    /// Ends cancelled, disconnected and timed-out requests (waiting or admitted).
    fn reap(&mut self) -> usize {
        let now = Instant::now();
        for s in self.waiting.iter_mut().chain(self.admitted.iter_mut()) {
            let timed_out = s.req.deadline.is_some_and(|d| now >= d);
            if (s.cancel || timed_out) && !s.done {
                let reason = if s.cancel { FinishReason::Cancelled } else { FinishReason::Timeout };
                let rest = s.text.finish().map(|p| p.text).unwrap_or_default();
                s.end(reason, rest, None, &self.shared.metrics);
            }
        }
        self.reap_done()
    }

    /// Removes the sequences that ended and frees their pages.
    fn reap_done(&mut self) -> usize {
        let before = self.waiting.len() + self.admitted.len();
        let queued = self.waiting.iter().filter(|s| s.done).count();
        self.waiting.retain(|s| !s.done);
        self.shared.queued.fetch_sub(queued as u64, Relaxed);
        let cache = &mut self.cache;
        self.admitted.retain(|s| {
            if !s.done {
                return true;
            }
            if let Some(slot) = s.slot {
                // The slot was created by this engine and is freed once: cannot fail.
                let _ = cache.free_sequence(slot);
            }
            false
        });
        before - self.waiting.len() - self.admitted.len()
    }

    /// Pages the admitted sequences still have reserved for their prefill / replay.
    fn reserved(&self) -> usize {
        self.admitted.iter().filter(|s| s.phase() != Phase::Decode).map(Seq::pages_to_fill).sum()
    }

    /// Pages this step's decodes take: one for each decode that starts a page.
    fn decode_pages(&self) -> usize {
        self.admitted.iter().filter(|s| s.phase() == Phase::Decode && s.cached % PAGE_SIZE == 0).count()
    }

    /// Admits waiting requests in arrival order while a slot and their pages are free (after
    /// the reservations of those admitted and this step's decodes).
    fn admit(&mut self) {
        while self.admitted.len() < self.cfg.max_running && !self.waiting.is_empty() {
            let need = self.waiting[0].pages_to_fill();
            if self.cache.free_pages().saturating_sub(self.reserved() + self.decode_pages()) < need {
                break;
            }
            let mut s = self.waiting.remove(0);
            s.slot = Some(self.cache.add_sequence());
            if s.preemptions == 0 {
                self.shared.metrics.prompt_tokens.fetch_add(s.prompt_len() as u64, Relaxed);
            }
            self.shared.queued.fetch_sub(1, Relaxed);
            let at = self.admitted.partition_point(|x| x.id < s.id);
            self.admitted.insert(at, s);
        }
    }

    /// Preempts the newest admitted sequences until this step's decodes have the pages they
    /// need (one more page for each decode that starts a page).
    fn make_room(&mut self) -> Result<usize> {
        let mut preempted = 0;
        loop {
            if self.decode_pages() <= self.cache.free_pages().saturating_sub(self.reserved()) {
                return Ok(preempted);
            }
            let Some(mut s) = self.admitted.pop() else { return Ok(preempted) };
            if let Some(slot) = s.slot.take() {
                self.cache.free_sequence(slot)?;
            }
            s.cached = 0;
            s.preemptions += 1;
            preempted += 1;
            self.shared.metrics.preemptions.fetch_add(1, Relaxed);
            self.shared.queued.fetch_add(1, Relaxed);
            let at = self.waiting.partition_point(|x| x.id < s.id);
            self.waiting.insert(at, s);
        }
    }

    /// Publishes the gauges.
    fn publish(&self) {
        let m = &self.shared.metrics;
        m.running.store(self.admitted.len() as u64, Relaxed);
        m.waiting.store(self.waiting.len() as u64, Relaxed);
        let free = self.cache.free_pages() as u64;
        m.pages_used.store(self.cache.total_pages() as u64 - free, Relaxed);
    }
}

/// `log p(id)` and the `k` most likely tokens of `row[..allowed]` under the softmax of the raw
/// logits (ties by id).
fn logprobs(row: &[f32], allowed: usize, id: u32, k: usize) -> TokenLogprob {
    let row = &row[..allowed.min(row.len())];
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
    let lp = |i: usize| (row[i] as f64 - lse) as f32;
    let mut idx: Vec<usize> = (0..row.len()).collect();
    let by = |a: &usize, b: &usize| row[*b].total_cmp(&row[*a]).then(a.cmp(b));
    let k = k.min(idx.len());
    if k > 0 && k < idx.len() {
        idx.select_nth_unstable_by(k - 1, by);
    }
    idx.truncate(k);
    idx.sort_by(by);
    TokenLogprob { id, logprob: lp(id as usize), top: idx.into_iter().map(|i| (i as u32, lp(i))).collect() }
}

#[cfg(test)]
mod tests {
    use super::logprobs;

    #[test]
    fn logprobs_are_log_softmax_with_top_k_by_value_then_id() {
        let row = [1.0f32, 3.0, 3.0, -2.0, 0.5];
        let lp = logprobs(&row, 4, 2, 3);
        let z: f64 = row[..4].iter().map(|&v| (v as f64).exp()).sum();
        assert!((lp.logprob as f64 - (3.0 - z.ln())).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 2, 0]);
        let total: f64 = (0..4).map(|i| (logprobs(&row, 4, i, 0).logprob as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(logprobs(&row, 4, 0, 0).top.is_empty());
        assert_eq!(logprobs(&row, 4, 0, 10).top.len(), 4, "k is capped by the candidates");
    }
}
