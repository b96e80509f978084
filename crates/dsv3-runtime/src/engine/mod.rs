//! The serving engine: one thread owns the model and its paged latent cache and runs steps
//! of continuous batching; clients talk to it through an [`EngineHandle`] (requests in, a
//! stream of [`Event`]s out, cancellation).
//!
//! Each step ([`Engine::step`]) runs
//! 1. every **decoding** sequence's next token, in the weight-absorbed form (one row each),
//!    together with the **replay** of sequences that were preempted (their already generated
//!    tokens re-enter the cache in the same absorbed form, row by row as decoding wrote them);
//! 2. **prefill chunks** of admitted prompts, in the expanded form, within what is left of the
//!    step's token budget ([`EngineConfig::max_step_tokens`]).
//!
//! Requests are admitted first come, first served while a running slot is free and the cache
//! has the pages for their prompt. When a decode step needs pages the cache does not have,
//! the newest admitted sequence is preempted: its pages are freed and it waits to be
//! recomputed (prompt prefilled again, generated tokens replayed; its sampler keeps its state,
//! so nothing it already sent changes). A client that goes away (its event sink refuses an
//! event), a cancel, or a passed deadline ends a sequence and frees its pages at the next step.
//!
//! Answers do not depend on the batch: every CPU kernel computes a row the same way whatever
//! else is in the call, decode rows always take the absorbed form and prompt rows the expanded
//! form, as [`crate::generate::generate`] does for one prompt alone.

mod core;
mod metrics;
mod text;

pub use self::core::{Engine, StepReport};
pub use metrics::{EngineMetrics, FinishReason, Histogram, LATENCY_BUCKETS, MetricsSnapshot};
pub use text::partial_suffix;

use crate::error::{Result, RuntimeError};
use crate::generate::{Sampler, SamplingParams};
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use dsv3_kernels::Backend;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Identifies a request for [`EngineHandle::cancel`].
pub type RequestId = u64;

/// The most `top_logprobs` a request may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Limits and sizes of an engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Sequences admitted at once (prefilling or decoding).
    pub max_running: usize,
    /// Tokens one step may run (decodes + replays + prefill chunks); at least `max_running`.
    pub max_step_tokens: usize,
    /// Most prompt tokens of one sequence per step (0: no limit but the step budget).
    pub prefill_chunk: usize,
    /// Most tokens (prompt + completion) of one sequence.
    pub max_context: usize,
    /// Tokens the paged cache holds in all (rounded up to whole pages).
    pub cache_tokens: usize,
    /// Requests that may wait for admission; more are refused ([`SubmitError::QueueFull`]).
    pub max_waiting: usize,
    /// How steps of decodes alone run ([`crate::decode::DecodeRunner`]): `Auto` replays CUDA
    /// graphs per batch bucket where the backend can capture; `Padded` runs the same padded
    /// steps eagerly (on the CPU: a check that pad rows change no answer).
    pub decode_graphs: crate::decode::Graphs,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_running: 64,
            max_step_tokens: 2048,
            prefill_chunk: 0,
            max_context: 4096,
            cache_tokens: 64 * 1024,
            max_waiting: 256,
            decode_graphs: crate::decode::Graphs::Auto,
        }
    }
}

impl EngineConfig {
    /// This config for `model`: `max_context` capped by the model's position limit. Errors
    /// name the field that cannot work (a cache too small for one full sequence, ...).
    pub fn resolve(mut self, max_position: usize) -> Result<EngineConfig> {
        let bad = |field: &str, detail: String| RuntimeError::Config { file: "engine options".into(), field: field.into(), detail };
        self.max_context = self.max_context.min(max_position);
        if self.max_running == 0 {
            return Err(bad("max_running", "must be >= 1".into()));
        }
        if self.max_step_tokens < self.max_running {
            return Err(bad(
                "max_step_tokens",
                format!(
                    "{} is below max_running = {}: every running sequence decodes in each step",
                    self.max_step_tokens, self.max_running
                ),
            ));
        }
        if self.max_context < 2 {
            return Err(bad("max_context", format!("{} leaves no room for a prompt and a token", self.max_context)));
        }
        let page = dsv3_mla::PAGE_SIZE;
        if self.cache_tokens < self.max_context + page {
            return Err(bad(
                "cache_tokens",
                format!("{} cannot hold one sequence of max_context = {} tokens (+ one page)", self.cache_tokens, self.max_context),
            ));
        }
        self.cache_tokens = self.cache_tokens.div_ceil(page) * page;
        Ok(self)
    }
}

/// One generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    /// Generated tokens at most (>= 1); prompt + max_tokens must fit `max_context`.
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends before the first of these appears in the text (needs a tokenizer).
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// `Some(k)`: each token's log-probability and the `k` most likely ones (k <= 20).
    pub logprobs: Option<usize>,
    /// The request ends with [`FinishReason::Timeout`] if it is not done by then.
    pub deadline: Option<Instant>,
}

impl GenRequest {
    /// A greedy request for `max_tokens` tokens after `prompt`.
    pub fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Self {
        GenRequest {
            prompt,
            max_tokens,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            deadline: None,
        }
    }
}

/// Log-probabilities of one generated token under the model (the raw logits, before
/// temperature, top-k and top-p).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    /// The most likely tokens, most likely first (ties by id).
    pub top: Vec<(u32, f32)>,
}

/// Token counts and timings of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Arrival to the first generated token.
    pub time_to_first_token: Option<Duration>,
    /// Arrival to the end.
    pub total_time: Duration,
    /// Times the sequence was preempted and recomputed.
    pub preemptions: u32,
}

/// What the engine tells a request's client.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// One generated token with the text it completes (possibly empty: text that could start
    /// a stop string is held back; end-of-sequence tokens have none).
    Token { id: u32, text: String, logprob: Option<TokenLogprob> },
    /// The end: the reason, the rest of the text, and the usage.
    Finished { reason: FinishReason, text: String, usage: Usage, error: Option<String> },
}

/// Receives a request's events on the engine thread; returns `false` once nobody listens
/// (the request is then cancelled).
pub type EventSink = Box<dyn FnMut(Event) -> bool + Send>;

/// Why a request was refused before it ran. [`SubmitError::param`] names the request field.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {prompt} tokens; this server's context is {max_context} tokens")]
    PromptTooLong { prompt: usize, max_context: usize },
    #[error("max_tokens must be >= 1")]
    NoTokens,
    #[error("prompt ({prompt} tokens) + max_tokens ({max_tokens}) exceeds this server's context of {max_context} tokens")]
    ContextExceeded { prompt: usize, max_tokens: usize, max_context: usize },
    #[error("token id {id} is outside the vocabulary (0..{vocab})")]
    TokenId { id: u32, vocab: usize },
    #[error("{param}: {detail}")]
    Invalid { param: &'static str, detail: String },
    #[error("{waiting} requests are already waiting; try again later")]
    QueueFull { waiting: usize },
    #[error("the server is shutting down")]
    ShuttingDown,
}

impl SubmitError {
    /// The request field at fault, if one is.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            SubmitError::EmptyPrompt | SubmitError::PromptTooLong { .. } | SubmitError::TokenId { .. } => Some("prompt"),
            SubmitError::NoTokens | SubmitError::ContextExceeded { .. } => Some("max_tokens"),
            SubmitError::Invalid { param, .. } => Some(param),
            SubmitError::QueueFull { .. } | SubmitError::ShuttingDown => None,
        }
    }
}

/// What requests are checked against, known before the engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_context: usize,
    pub vocab_size: usize,
    pub has_tokenizer: bool,
    pub max_waiting: usize,
}

impl Limits {
    /// Checks a request (everything but the queue).
    pub fn check(&self, r: &GenRequest) -> Result<(), SubmitError> {
        let p = r.prompt.len();
        if p == 0 {
            return Err(SubmitError::EmptyPrompt);
        }
        if p >= self.max_context {
            return Err(SubmitError::PromptTooLong { prompt: p, max_context: self.max_context });
        }
        if r.max_tokens == 0 {
            return Err(SubmitError::NoTokens);
        }
        if p.saturating_add(r.max_tokens) > self.max_context {
            return Err(SubmitError::ContextExceeded { prompt: p, max_tokens: r.max_tokens, max_context: self.max_context });
        }
        if let Some(&id) = r.prompt.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(SubmitError::TokenId { id, vocab: self.vocab_size });
        }
        let s = &r.sampling;
        if !(s.temperature.is_finite() && s.temperature >= 0.0) {
            return Err(SubmitError::Invalid { param: "temperature", detail: format!("must be finite and >= 0, got {}", s.temperature) });
        }
        if !(s.top_p > 0.0 && s.top_p <= 1.0) {
            return Err(SubmitError::Invalid { param: "top_p", detail: format!("must be in (0, 1], got {}", s.top_p) });
        }
        // Whatever else the sampler refuses (it has the last word on its parameters).
        Sampler::new(*s).map_err(|e| SubmitError::Invalid { param: "temperature", detail: e.to_string() })?;
        if !r.stop.is_empty() && !self.has_tokenizer {
            return Err(SubmitError::Invalid { param: "stop", detail: "stop strings need a tokenizer in the model directory".into() });
        }
        if r.logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
            return Err(SubmitError::Invalid { param: "top_logprobs", detail: format!("at most {MAX_TOP_LOGPROBS}") });
        }
        Ok(())
    }
}

/// State shared by the handle(s) and the engine thread.
#[derive(Debug)]
pub(crate) struct Shared {
    pub metrics: EngineMetrics,
    pub limits: Limits,
    pub tokenizer: Option<Arc<Tokenizer>>,
    next_id: AtomicU64,
    /// Requests submitted and not yet admitted to the cache (in the channel or the queue).
    pub queued: AtomicU64,
    accepting: AtomicBool,
}

impl Shared {
    pub(crate) fn new(limits: Limits, tokenizer: Option<Arc<Tokenizer>>) -> Arc<Shared> {
        Arc::new(Shared {
            metrics: EngineMetrics::default(),
            limits,
            tokenizer,
            next_id: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            accepting: AtomicBool::new(true),
        })
    }

    /// Checks `r` and the queue; on success counts it as queued and returns its id.
    pub(crate) fn accept(&self, r: &GenRequest) -> Result<RequestId, SubmitError> {
        if !self.accepting.load(Relaxed) {
            return Err(SubmitError::ShuttingDown);
        }
        self.limits.check(r)?;
        let q = self.queued.fetch_add(1, Relaxed);
        if q >= self.limits.max_waiting as u64 {
            self.queued.fetch_sub(1, Relaxed);
            return Err(SubmitError::QueueFull { waiting: q as usize });
        }
        Ok(self.next_id.fetch_add(1, Relaxed))
    }
}

enum Command {
    Submit(RequestId, GenRequest, EventSink),
    Cancel(RequestId),
    /// Stop accepting; with `drain`, finish what is running, else cancel it all.
    Shutdown {
        drain: bool,
    },
}

/// A client's end of a running engine; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle").field("limits", &self.shared.limits).finish_non_exhaustive()
    }
}

impl EngineHandle {
    /// Queues a request; its events go to `sink` on the engine thread.
    pub fn submit(&self, req: GenRequest, sink: EventSink) -> Result<RequestId, SubmitError> {
        let id = self.shared.accept(&req)?;
        if self.tx.send(Command::Submit(id, req, sink)).is_err() {
            self.shared.queued.fetch_sub(1, Relaxed);
            return Err(SubmitError::ShuttingDown);
        }
        Ok(id)
    }

    /// Cancels a request (a no-op if it already ended); it ends with [`FinishReason::Cancelled`].
    pub fn cancel(&self, id: RequestId) {
        let _ = self.tx.send(Command::Cancel(id));
    }

    /// Stops accepting requests; running ones finish (`drain`) or are cancelled.
    pub fn shutdown(&self, drain: bool) {
        self.shared.accepting.store(false, Relaxed);
        let _ = self.tx.send(Command::Shutdown { drain });
    }

    pub fn metrics(&self) -> MetricsSnapshot {
        self.shared.metrics.snapshot()
    }

    pub fn limits(&self) -> Limits {
        self.shared.limits
    }

    /// The model's tokenizer (shared with the engine), if it has one.
    pub fn tokenizer(&self) -> Option<Arc<Tokenizer>> {
        self.shared.tokenizer.clone()
    }

    /// Whether new requests are accepted.
    pub fn accepting(&self) -> bool {
        self.shared.accepting.load(Relaxed)
    }
}

/// Starts the engine thread: `load` runs on it (so a GPU context is created where it is used)
/// and returns the backend, the model and the tokenizer. Returns once loading is done, with
/// its error if it failed; the join handle yields the engine loop's end (after
/// [`EngineHandle::shutdown`], or when every handle is dropped).
pub fn spawn<B, F>(cfg: EngineConfig, load: F) -> Result<(EngineHandle, JoinHandle<()>)>
where
    B: Backend + 'static,
    F: FnOnce() -> Result<(B, Model<B>, Option<Tokenizer>)> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Command>();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<Arc<Shared>>>();
    let thread = std::thread::Builder::new()
        .name("dsv3-engine".into())
        .spawn(move || {
            // Loading and the loop run on a worker of the engine's own thread pool (as many
            // threads as the global one), so each parallel kernel of a step forks and joins
            // among the pool's threads instead of handing its work over and sleeping until it
            // is done (see the `dsv3` binary's `main`). Its own pool, because the loop holds
            // its worker while it waits for requests: in the global pool that could starve
            // other callers of the kernels. This thread only waits.
            let run = move || {
                let engine = load().and_then(|(b, model, tok)| Engine::new(b, model, tok, cfg));
                match engine {
                    Ok(engine) => {
                        if ready_tx.send(Ok(engine.shared())).is_ok() {
                            run_loop(engine, rx);
                        }
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            };
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(rayon::current_num_threads())
                .stack_size(8 << 20)
                .thread_name(|i| format!("dsv3-engine-{i}"))
                .build();
            match pool {
                Ok(pool) => pool.install(run),
                // No pool (no threads to be had): the loop runs here, kernels hand work to the
                // global pool as before.
                Err(_) => run(),
            }
        })
        .map_err(|e| RuntimeError::Request(format!("cannot start the engine thread: {e}")))?;
    match ready_rx.recv() {
        Ok(Ok(shared)) => Ok((EngineHandle { tx, shared }, thread)),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(RuntimeError::Request("the engine thread ended while loading the model".into()))
        }
    }
}

/// The engine thread: takes commands between steps (blocking while there is no work) and
/// steps until shut down and idle.
fn run_loop<B: Backend>(mut engine: Engine<B>, rx: mpsc::Receiver<Command>) {
    let mut shutting_down = false;
    loop {
        let first = if engine.is_idle() {
            if shutting_down {
                return;
            }
            match rx.recv() {
                Ok(c) => Some(c),
                Err(_) => return,
            }
        } else {
            None
        };
        for cmd in first.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            match cmd {
                Command::Submit(id, req, sink) => engine.submit_accepted(id, req, sink),
                Command::Cancel(id) => engine.cancel(id),
                Command::Shutdown { drain } => {
                    shutting_down = true;
                    if !drain {
                        engine.cancel_all();
                    }
                }
            }
        }
        if let Err(e) = engine.step() {
            eprintln!("dsv3 engine: step failed: {e}");
        }
    }
}
