//! Sampling and the generation loop: prefill the prompt, then decode one token per step on
//! the paged latent cache until EOS or the token budget.
//!
//! Sampling is `dsv3_kernels::sample` (the rule: temperature 0 is greedy; otherwise the
//! logits are scaled by the temperature without overflow, restricted to the `top_k` largest
//! and to the smallest prefix whose probability reaches `top_p`, renormalised, and drawn);
//! [`Sampler`] adds a seeded uniform stream, so the same seed gives the same tokens. Ids at
//! or beyond `allowed` (the tokenizer's size: the padding rows of the embedding) are never
//! sampled.

use crate::decode::{DecodeRow, DecodeRunner, Graphs};
use crate::error::{Result, RuntimeError};
use crate::model::{AttnForm, Model, select_rows};
use crate::mtp::Mtp;
use dsv3_kernels::sample::{self, SampleParams, SampleRow};
use dsv3_kernels::{Backend, KernelError};
use dsv3_mla::{PagedLatentCache, SeqId};
use std::time::{Duration, Instant};

pub use dsv3_kernels::sample::{Dist, Verdict};

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0: greedy; otherwise any finite value > 0 (see `dsv3_kernels::sample`).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Nucleus sampling threshold in (0, 1] (1: off).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

impl SamplingParams {
    /// Checks the parameters (`dsv3_kernels::sample::SampleParams::validate`); the error
    /// names the command-line flag (`--temperature`, `--top-p`).
    pub fn validate(&self) -> Result<()> {
        self.kernel().validate().map_err(|e| match e {
            KernelError::Invalid { what, detail, .. } => RuntimeError::Request(format!("--{} {detail}", what.replace('_', "-"))),
            other => RuntimeError::Kernel(other),
        })
    }

    /// The kernel-layer parameters (without the seed).
    pub fn kernel(&self) -> SampleParams {
        SampleParams { temperature: self.temperature, top_k: self.top_k, top_p: self.top_p }
    }
}

/// A seeded sampler: `dsv3_kernels::sample` with a splitmix64 uniform stream (small, fast,
/// reproducible everywhere).
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    state: u64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Sampler> {
        params.validate()?;
        Ok(Sampler { params, state: params.seed ^ 0x9E37_79B9_7F4A_7C15 })
    }

    fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The distribution a token is drawn from: `logits[..allowed]` after temperature, top-k
    /// and top-p ([`Dist::new`]). Temperature 0 gives all mass to the argmax.
    pub fn dist(&self, logits: &[f32], allowed: usize) -> Result<Dist> {
        let row = &logits[..allowed.min(logits.len())];
        if let Some(i) = row.iter().position(|v| v.is_nan()) {
            return Err(RuntimeError::Request(format!("the model produced a NaN logit (token {i})")));
        }
        if row.is_empty() {
            return Err(RuntimeError::Request("no token can be sampled (empty vocabulary)".into()));
        }
        Ok(Dist::new(row, &self.params.kernel())?)
    }

    /// Draws from `d` (one uniform when sampling; none when greedy).
    pub fn draw(&mut self, d: &Dist) -> u32 {
        if self.params.temperature == 0.0 {
            return d.top();
        }
        d.draw(self.uniform())
    }

    /// The parameters of the next draw, with its uniform when sampling (none is drawn when
    /// greedy): what [`crate::model::Model::sample`] and [`crate::decode::DecodeRunner`] take.
    /// The stream advances exactly as [`Sampler::sample`] advances it.
    pub fn next_row(&mut self) -> SampleRow {
        let u = if self.params.temperature == 0.0 { 0.0 } else { self.uniform() };
        SampleRow::new(&self.params.kernel(), u)
    }

    /// Picks a token from `logits[..allowed]`.
    pub fn sample(&mut self, logits: &[f32], allowed: usize) -> Result<u32> {
        let d = self.dist(logits, allowed)?;
        Ok(self.draw(&d))
    }

    /// Speculative sampling ([`dsv3_kernels::sample::verify`]): `draft` was drawn from `q`,
    /// the target distribution is `p`; the token that results (draft or replacement) is
    /// distributed exactly as `p`. Greedy: accepted iff the draft is the argmax of `p`, else
    /// the argmax replaces it.
    pub fn verify(&mut self, p: &Dist, q: &Dist, draft: u32) -> Verdict {
        sample::verify(p, q, draft, || self.uniform())
    }
}

/// What one generation produced, with its timings.
#[derive(Debug, Clone, Default)]
pub struct Generation {
    /// The generated ids (EOS included if it was generated).
    pub ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
    /// Whether generation ended at an EOS token.
    pub stopped_at_eos: bool,
    /// Draft statistics when generated with MTP speculative decoding.
    pub mtp: Option<MtpStats>,
}

/// How many MTP drafts were verified and accepted, per draft position (one position: one
/// draft token per step).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MtpStats {
    /// `(drafted, accepted)` for draft position 1, 2, ...
    pub per_position: Vec<(u64, u64)>,
}

impl MtpStats {
    /// Verification steps of the main model after the prefill: each verifies one draft at
    /// position 1.
    pub fn main_steps(&self) -> u64 {
        self.per_position.first().map_or(0, |p| p.0)
    }
    pub fn drafted(&self) -> u64 {
        self.per_position.iter().map(|p| p.0).sum()
    }
    pub fn accepted(&self) -> u64 {
        self.per_position.iter().map(|p| p.1).sum()
    }
    /// Accepted / drafted (0 when nothing was drafted).
    pub fn acceptance(&self) -> f64 {
        ratio(self.accepted(), self.drafted())
    }
    pub fn acceptance_per_position(&self) -> Vec<f64> {
        self.per_position.iter().map(|&(d, a)| ratio(a, d)).collect()
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

impl Generation {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }
    /// Tokens per second of the decode steps (the first generated token comes from prefill).
    pub fn decode_tokens_per_s(&self) -> f64 {
        self.ids.len().saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// One generation request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub prompt: &'a [u32],
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops after any of these.
    pub eos: &'a [u32],
    /// Sampled ids are below this (the tokenizer's size, or the vocabulary).
    pub allowed: usize,
}

/// Collects the generated ids and decides when to stop.
struct Emitter<'r, F> {
    out: Generation,
    req: &'r Request<'r>,
    on_token: F,
}

impl<F: FnMut(u32) -> Result<()>> Emitter<'_, F> {
    /// Emits `id`; returns whether generation is over (EOS or the token budget).
    fn emit(&mut self, id: u32) -> Result<bool> {
        self.out.ids.push(id);
        (self.on_token)(id)?;
        if self.req.eos.contains(&id) {
            self.out.stopped_at_eos = true;
            return Ok(true);
        }
        Ok(self.out.ids.len() >= self.req.max_tokens)
    }
}

/// Checks the request and creates the main cache (with `pad_rows` pad rows) and sequence.
fn start<B: Backend>(b: &B, model: &Model<B>, req: &Request<'_>, pad_rows: usize) -> Result<(Sampler, PagedLatentCache<B>, SeqId)> {
    if req.prompt.is_empty() {
        return Err(RuntimeError::Request("the prompt is empty".into()));
    }
    let sampler = Sampler::new(req.sampling)?;
    // Room for the prompt, every generated token and one draft in flight.
    let mut cache = model.new_cache_with(b, req.prompt.len() + req.max_tokens + 2, pad_rows)?;
    let seq = cache.add_sequence();
    Ok((sampler, cache, seq))
}

/// Generates up to `req.max_tokens` after `req.prompt`; `on_token` sees each id as it is
/// chosen. The prompt is one prefill step; each next token is one decode step of a
/// [`DecodeRunner`] (on a GPU: a replayed graph, sampling on the device, only the id back).
pub fn generate<B: Backend>(b: &B, model: &Model<B>, req: &Request<'_>, on_token: impl FnMut(u32) -> Result<()>) -> Result<Generation> {
    let mut runner = DecodeRunner::new(b, model, 1, Graphs::Auto)?;
    generate_with(b, model, &mut runner, req, on_token)
}

/// [`generate`] with a runner the caller keeps (its workspace and graphs serve many
/// generations; a graph is recaptured for each new cache).
pub fn generate_with<B: Backend>(
    b: &B,
    model: &Model<B>,
    runner: &mut DecodeRunner<B>,
    req: &Request<'_>,
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    let (mut sampler, mut cache, seq) = start(b, model, req, runner.pad_rows())?;
    let mut em = Emitter { out: Generation { prompt_tokens: req.prompt.len(), ..Default::default() }, req, on_token };
    if req.max_tokens == 0 {
        return Ok(em.out);
    }
    let t0 = Instant::now();
    let mut next = {
        let hidden = model.forward_hidden(b, &mut cache, &[(seq, req.prompt)])?;
        model.sample(b, &hidden, &[req.prompt.len() - 1], &[sampler.next_row()], req.allowed)?[0]
    };
    em.out.prefill_time = t0.elapsed();
    let t0 = Instant::now();
    while !em.emit(next)? {
        let row = DecodeRow { seq, token: next, sample: sampler.next_row() };
        next = runner.step(b, model, &mut cache, &[row], req.allowed)?[0];
    }
    em.out.decode_time = t0.elapsed();
    Ok(em.out)
}

/// [`generate`] with MTP speculative decoding (docs/model.md §3.10): each step the MTP module
/// drafts the token after next from the main model's last hidden state, and the main model
/// runs `[next, draft]` in one absorbed step. The draft is accepted by [`Sampler::verify`];
/// if it is rejected, the main cache drops the draft's position (the MTP cache only ever
/// sees accepted tokens). Greedy output is identical, token for token, to [`generate`]
/// (the two-token step is bit-identical to two one-token steps); sampled output has the
/// same distribution.
pub fn generate_mtp<B: Backend>(
    b: &B,
    model: &Model<B>,
    mtp: &Mtp<B>,
    req: &Request<'_>,
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    let (mut sampler, mut cache, seq) = start(b, model, req, 0)?;
    let stats = MtpStats { per_position: vec![(0, 0)] };
    let mut em = Emitter { out: Generation { prompt_tokens: req.prompt.len(), mtp: Some(stats), ..Default::default() }, req, on_token };
    if req.max_tokens == 0 {
        return Ok(em.out);
    }
    let (n, h, vocab) = (req.prompt.len(), model.config().hidden_size, model.config().vocab_size);
    let mut mcache = mtp.new_cache(b, model, n + req.max_tokens + 2)?;
    let mseq = mcache.add_sequence();
    let t0 = Instant::now();
    let hidden = model.forward_hidden(b, &mut cache, &[(seq, req.prompt)])?;
    let mut next = sampler.sample(&model.logits(b, &hidden, &[n - 1])?, req.allowed)?;
    // The MTP module sees every prompt position i with the token after it.
    let shifted: Vec<u32> = req.prompt[1..].iter().copied().chain([next]).collect();
    let states = mtp.forward(b, model, &mut mcache, mseq, &hidden, &shifted)?;
    let mut q = sampler.dist(&mtp.logits(b, &states, &[n - 1])?, req.allowed)?;
    let mut draft = sampler.draw(&q);
    em.out.prefill_time = t0.elapsed();
    let t0 = Instant::now();
    while !em.emit(next)? {
        let hidden = model.forward_hidden_with(b, &mut cache, &[(seq, &[next, draft][..])], AttnForm::Absorbed)?;
        let logits = model.logits(b, &hidden, &[0, 1])?;
        let p = sampler.dist(&logits[..vocab], req.allowed)?;
        let verdict = sampler.verify(&p, &q, draft);
        if let Some(s) = em.out.mtp.as_mut() {
            s.per_position[0].0 += 1;
            s.per_position[0].1 += u64::from(verdict == Verdict::Accepted);
        }
        let states = match verdict {
            Verdict::Accepted => {
                if em.emit(draft)? {
                    break;
                }
                let bonus = sampler.sample(&logits[vocab..], req.allowed)?;
                let states = mtp.forward(b, model, &mut mcache, mseq, &hidden, &[draft, bonus])?;
                next = bonus;
                (states, 1)
            }
            Verdict::Rejected(token) => {
                let len = cache.seq_len(seq)?;
                cache.truncate(seq, len - 1)?;
                let states = mtp.forward(b, model, &mut mcache, mseq, &select_rows(b, &hidden, h, &[0])?, &[token])?;
                next = token;
                (states, 0)
            }
        };
        q = sampler.dist(&mtp.logits(b, &states.0, &[states.1])?, req.allowed)?;
        draft = sampler.draw(&q);
    }
    em.out.decode_time = t0.elapsed();
    Ok(em.out)
}
