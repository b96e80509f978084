//! # dsv3-server
//!
//! An OpenAI-compatible HTTP server over the serving engine of `dsv3-runtime`
//! ([`dsv3_runtime::engine`]): the engine thread owns the model and runs continuous batching;
//! HTTP handlers (tokio + axum) parse and check requests, tokenize them, submit them and
//! relay the engine's events, whole or as server-sent events.
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/chat/completions` | messages through the model's chat template; `stream`, `n`, `logprobs`/`top_logprobs`, `stop`, `seed`, `reasoning_content` for `<think>` blocks |
//! | `POST /v1/completions` | a text prompt (BOS first) or token ids |
//! | `GET /v1/models` | the one model served |
//! | `GET /health` | 200 while accepting requests, 503 while shutting down |
//! | `GET /metrics` | Prometheus text: requests by status, tokens, TTFT/TPOT histograms, running/waiting sequences, cache pages, preemptions |
//!
//! Errors are OpenAI-shaped (`{"error": {"message", "type", "param", "code"}}`) with a 4xx
//! status for anything the client can fix; a full queue is `503` with `Retry-After`.
//! [`run`] serves until SIGTERM or SIGINT, then stops admitting, lets running requests finish
//! (up to [`ServeOptions::shutdown_timeout`], then cancels them) and returns.
#![forbid(unsafe_code)]

pub mod client;
pub mod error;
pub mod metrics;
pub mod reasoning;
pub mod request;
pub mod respond;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use dsv3_runtime::Tokenizer;
use dsv3_runtime::engine::{EngineHandle, Event, FinishReason, GenRequest, RequestId};
use dsv3_runtime::generate::SamplingParams;
pub use error::ApiError;
use futures_util::StreamExt;
use metrics::HttpMetrics;
pub use reasoning::ReasoningMode;
use request::{Endpoint, ParsedRequest, Prompt};
use respond::{Choice, Meta};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The model name clients send (`model`) and `/v1/models` lists.
    pub model_name: String,
    /// A request still running after this long ends (504, or an error event in a stream).
    pub request_timeout: Duration,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Splitting `<think>` blocks into `reasoning_content` (chat only).
    pub reasoning: ReasoningMode,
    /// After SIGTERM, running requests may finish for this long; then they are cancelled.
    pub shutdown_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            model_name: "dsv3".into(),
            request_timeout: Duration::from_secs(600),
            max_body_bytes: 4 << 20,
            reasoning: ReasoningMode::Auto,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
}

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    engine: EngineHandle,
    tok: Option<Arc<Tokenizer>>,
    opts: ServeOptions,
    http: HttpMetrics,
    started: u64,
    next_id: AtomicU64,
}

impl AppState {
    pub fn new(engine: EngineHandle, opts: ServeOptions) -> Arc<AppState> {
        let started = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Arc::new(AppState { tok: engine.tokenizer(), engine, opts, http: HttpMetrics::default(), started, next_id: AtomicU64::new(0) })
    }
}

/// The routes (module docs), with OpenAI-shaped 404 and 405 answers.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics_route))
        .fallback(|req: Request| async move { ApiError::not_found(req.uri().path()) })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .with_state(state)
}

/// Serves on `listener` until `shutdown` resolves (then drains as [`run`] does).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let engine = state.engine.clone();
    let grace = state.opts.shutdown_timeout;
    let drain = async move {
        shutdown.await;
        eprintln!("dsv3 serve: shutting down: no new requests; running ones may finish for {}s", grace.as_secs());
        engine.shutdown(true);
        let e = engine.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            eprintln!("dsv3 serve: cancelling what still runs");
            e.shutdown(false);
        });
    };
    axum::serve(listener, router(state)).with_graceful_shutdown(drain).await
}

/// Resolves on SIGTERM or SIGINT.
async fn termination() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = ctrl_c => {}
                }
            }
            Err(_) => ctrl_c.await,
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await;
}

/// Serves `engine` on `addr` until SIGTERM/SIGINT (blocking; its own tokio runtime). Prints
/// `dsv3 serve: listening on http://ADDR` to stderr once the socket is bound.
pub fn run(engine: EngineHandle, addr: SocketAddr, opts: ServeOptions) -> Result<(), ServerError> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("dsv3-http").enable_all().build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| ServerError::Bind { addr, source })?;
        eprintln!("dsv3 serve: listening on http://{}", listener.local_addr()?);
        serve(listener, AppState::new(engine, opts), termination()).await?;
        Ok(())
    })
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn models(State(st): State<Arc<AppState>>) -> Response {
    st.http.count("models", 200);
    let max = st.engine.limits().max_context;
    axum::Json(json!({"object": "list", "data": [{"id": st.opts.model_name, "object": "model", "created": st.started, "owned_by": "dsv3", "max_model_len": max}]}))
        .into_response()
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    let (status, body) = if st.engine.accepting() { (StatusCode::OK, "ok") } else { (StatusCode::SERVICE_UNAVAILABLE, "shutting down") };
    st.http.count("health", status.as_u16());
    (status, axum::Json(json!({"status": body}))).into_response()
}

async fn metrics_route(State(st): State<Arc<AppState>>) -> Response {
    st.http.count("metrics", 200);
    let text = metrics::render(&st.engine.metrics(), &st.http, &st.opts.model_name);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

async fn chat(State(st): State<Arc<AppState>>, req: Request) -> Response {
    handle(st, Endpoint::Chat, req).await
}

async fn completions(State(st): State<Arc<AppState>>, req: Request) -> Response {
    handle(st, Endpoint::Completions, req).await
}

/// Parses, submits and answers one completion request; counts and logs the outcome.
async fn handle(st: Arc<AppState>, endpoint: Endpoint, req: Request) -> Response {
    let t0 = Instant::now();
    let name = match endpoint {
        Endpoint::Chat => "chat",
        Endpoint::Completions => "completions",
    };
    let path = req.uri().path().to_string();
    let resp = match answer(&st, endpoint, req).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dsv3 serve: {path}: {} {}: {}", e.status.as_u16(), e.kind, e.message);
            e.into_response()
        }
    };
    st.http.count(name, resp.status().as_u16());
    eprintln!("dsv3 serve: POST {path} {} in {:.1} ms", resp.status().as_u16(), t0.elapsed().as_secs_f64() * 1e3);
    resp
}

/// Reads the body, refusing more than `limit` bytes.
async fn read_body(req: Request, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    axum::body::to_bytes(req.into_body(), limit).await.map_err(|e| {
        if std::error::Error::source(&e).is_some_and(|s| s.to_string().contains("length limit")) || e.to_string().contains("length limit") {
            ApiError::too_large(limit)
        } else {
            ApiError::invalid(None, format!("cannot read the body: {e}"))
        }
    })
}

/// A request ready for the engine: its prompt ids and the rendered prompt's tail.
struct Prepared {
    ids: Vec<u32>,
    tail: String,
}

fn tokenizer<'a>(st: &'a AppState, param: &str, what: &str) -> Result<&'a Tokenizer, ApiError> {
    st.tok.as_deref().ok_or_else(|| ApiError::invalid(Some(param), format!("this model has no tokenizer.json: {what}")))
}

/// Tokenizes the prompt (through the chat template for chat).
fn prepare(st: &AppState, p: &ParsedRequest) -> Result<Prepared, ApiError> {
    match &p.prompt {
        Prompt::Chat(msgs) => {
            let tok = tokenizer(st, "messages", "use /v1/completions with token ids")?;
            let template = tok
                .chat_template()
                .ok_or_else(|| ApiError::invalid(Some("messages"), "this model has no chat template; use /v1/completions"))?;
            let list: Vec<Value> = msgs.iter().map(|(r, c)| json!({"role": r, "content": c})).collect();
            let text = template
                .render(&Value::Array(list), true, tok.bos_token().unwrap_or(""), tok.eos_token().unwrap_or(""))
                .map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))?;
            let ids = tok.encode(&text, false).map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))?;
            let tail: String = text.chars().rev().take(32).collect::<Vec<_>>().into_iter().rev().collect();
            Ok(Prepared { ids, tail })
        }
        Prompt::Text(text) => {
            let tok = tokenizer(st, "prompt", "send the prompt as token ids")?;
            let ids = tok.encode(text, tok.bos_id().is_some()).map_err(|e| ApiError::invalid(Some("prompt"), e.to_string()))?;
            Ok(Prepared { ids, tail: String::new() })
        }
        Prompt::Ids(ids) => Ok(Prepared { ids: ids.clone(), tail: String::new() }),
    }
}

/// A fresh seed for a choice whose request gave none.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}

/// Cancels a response's requests when it is dropped (the client went away, or the answer is
/// complete: then cancelling is a no-op).
struct CancelGuard {
    engine: EngineHandle,
    ids: Vec<RequestId>,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        for &id in &self.ids {
            self.engine.cancel(id);
        }
    }
}

async fn answer(st: &Arc<AppState>, endpoint: Endpoint, req: Request) -> Result<Response, ApiError> {
    let body = read_body(req, st.opts.max_body_bytes).await?;
    let p = request::parse(endpoint, &body)?;
    if let Some(m) = p.model.as_deref().filter(|m| *m != st.opts.model_name) {
        return Err(ApiError::model_not_found(m, &st.opts.model_name));
    }
    let prep = prepare(st, &p)?;
    let limits = st.engine.limits();
    let max_tokens = p.max_tokens.unwrap_or_else(|| limits.max_context.saturating_sub(prep.ids.len()).max(1));
    let deadline = Instant::now() + st.opts.request_timeout;
    let (tx, rx) = mpsc::unbounded_channel::<(usize, Event)>();
    let mut guard = CancelGuard { engine: st.engine.clone(), ids: Vec::with_capacity(p.n) };
    for i in 0..p.n {
        let seed = p.seed.map_or_else(random_seed, |s| s.wrapping_add(i as u64));
        let request = GenRequest {
            prompt: prep.ids.clone(),
            max_tokens,
            sampling: SamplingParams { temperature: p.temperature, top_k: p.top_k, top_p: p.top_p, seed },
            stop: p.stop.clone(),
            ignore_eos: p.ignore_eos,
            logprobs: p.logprobs,
            deadline: Some(deadline),
        };
        let tx = tx.clone();
        // On an error, the guard cancels the choices already queued.
        guard.ids.push(st.engine.submit(request, Box::new(move |ev| tx.send((i, ev)).is_ok()))?);
    }
    drop(tx);
    let n = st.next_id.fetch_add(1, Relaxed);
    let prefix = if endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" };
    let meta = Meta {
        endpoint,
        id: format!("{prefix}-{:x}{n:06x}", st.started),
        created: now_secs(),
        model: st.opts.model_name.clone(),
        tok: st.tok.clone(),
        prompt_tokens: prep.ids.len(),
    };
    let choices: Vec<Choice> = (0..p.n).map(|i| Choice::new(i, endpoint, st.opts.reasoning, &prep.tail)).collect();
    if p.stream {
        Ok(stream(meta, choices, rx, guard, p.include_usage).into_response())
    } else {
        whole(meta, choices, rx, guard, p.logprobs.is_some()).await
    }
}

/// Collects every choice, then answers once.
async fn whole(
    meta: Meta,
    mut choices: Vec<Choice>,
    mut rx: mpsc::UnboundedReceiver<(usize, Event)>,
    guard: CancelGuard,
    with_logprobs: bool,
) -> Result<Response, ApiError> {
    while let Some((i, ev)) = rx.recv().await {
        apply(&meta, &mut choices[i], ev);
    }
    drop(guard);
    for c in &choices {
        match &c.finish {
            Some((FinishReason::Timeout, ..)) => return Err(ApiError::timeout()),
            Some((FinishReason::Error, _, e)) => return Err(ApiError::server(e.clone().unwrap_or_else(|| "the engine failed".into()))),
            Some((FinishReason::Cancelled, ..)) | None => {
                return Err(ApiError::from(dsv3_runtime::engine::SubmitError::ShuttingDown));
            }
            _ => {}
        }
    }
    Ok(axum::Json(respond::whole_response(&meta, &choices, with_logprobs)).into_response())
}

/// Applies one engine event to its choice; returns the stream chunk's choice entry.
fn apply(meta: &Meta, c: &mut Choice, ev: Event) -> Option<Value> {
    match ev {
        Event::Token { id, text, logprob } => c.token(meta, id, &text, logprob),
        Event::Finished { reason, text, usage, error } => Some(c.finished(meta, &text, reason, usage, error)),
    }
}

fn sse_json(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

/// Streams chunks as events arrive: `data: {chunk}` … (usage) … `data: [DONE]`. A choice that
/// times out or fails sends an error object before `[DONE]`.
fn stream(
    meta: Meta,
    choices: Vec<Choice>,
    rx: mpsc::UnboundedReceiver<(usize, Event)>,
    guard: CancelGuard,
    include_usage: bool,
) -> Response {
    struct S {
        meta: Meta,
        choices: Vec<Choice>,
        rx: mpsc::UnboundedReceiver<(usize, Event)>,
        _guard: CancelGuard,
        include_usage: bool,
        done: bool,
    }
    let state = S { meta, choices, rx, _guard: guard, include_usage, done: false };
    let events = futures_util::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let mut out = Vec::new();
        match s.rx.recv().await {
            Some((i, ev)) => {
                let failed = match &ev {
                    Event::Finished { reason: FinishReason::Timeout, .. } => Some(ApiError::timeout()),
                    Event::Finished { reason: FinishReason::Error, error, .. } => {
                        Some(ApiError::server(error.clone().unwrap_or_else(|| "the engine failed".into())))
                    }
                    _ => None,
                };
                if let Some(entry) = apply(&s.meta, &mut s.choices[i], ev) {
                    out.push(sse_json(&s.meta.chunk(vec![entry])));
                }
                if let Some(e) = failed {
                    out.push(sse_json(&e.body()));
                }
            }
            None => {
                if s.include_usage {
                    let tokens = s.choices.iter().map(|c| c.tokens).sum();
                    out.push(sse_json(&s.meta.usage_chunk(tokens)));
                }
                out.push(SseEvent::default().data("[DONE]"));
                s.done = true;
            }
        }
        Some((futures_util::stream::iter(out.into_iter().map(Ok::<_, std::convert::Infallible>)), s))
    })
    .flatten();
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(5))).into_response()
}

/// The example of `README.md`, compiled as a doctest so that it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
