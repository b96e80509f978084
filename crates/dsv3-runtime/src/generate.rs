//! Sampling and the generation loop: prefill the prompt, then decode one token per step on
//! the paged latent cache until EOS or the token budget.
//!
//! Sampling: temperature 0 is greedy (argmax, lowest id on ties). Otherwise the logits are
//! divided by the temperature, restricted to the `top_k` largest (if set) and to the smallest
//! set whose probability reaches `top_p` (if < 1), renormalised, and drawn with a seeded
//! generator, so the same seed gives the same tokens. Ids at or beyond `allowed` (the
//! tokenizer's size: the padding rows of the embedding) are never sampled.

use crate::error::{Result, RuntimeError};
use crate::model::Model;
use dsv3_kernels::Backend;
use std::time::{Duration, Instant};

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
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
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(RuntimeError::Request(format!("--temperature must be finite and >= 0, got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(RuntimeError::Request(format!("--top-p must be in (0, 1], got {}", self.top_p)));
        }
        Ok(())
    }
}

/// A seeded sampler (splitmix64: small, fast, reproducible everywhere).
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

    /// Picks a token from `logits[..allowed]`.
    pub fn sample(&mut self, logits: &[f32], allowed: usize) -> Result<u32> {
        let n = allowed.min(logits.len());
        let logits = &logits[..n];
        if let Some(i) = logits.iter().position(|v| v.is_nan()) {
            return Err(RuntimeError::Request(format!("the model produced a NaN logit (token {i})")));
        }
        let argmax =
            || logits.iter().enumerate().fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0;
        if n == 0 {
            return Err(RuntimeError::Request("no token can be sampled (empty vocabulary)".into()));
        }
        if self.params.temperature == 0.0 {
            return Ok(argmax() as u32);
        }
        let t = self.params.temperature;
        let mut cand: Vec<(usize, f32)> = logits.iter().map(|&v| v / t).enumerate().collect();
        // Descending by logit, ties by id: deterministic.
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.params.top_k > 0 {
            cand.truncate(self.params.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand.iter().map(|&(_, v)| ((v - max) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.params.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs.iter().position(|&p| {
                acc += p;
                acc >= self.params.top_p as f64
            });
            let keep = keep.map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        let mut u = self.uniform();
        for (i, p) in probs.iter().enumerate() {
            if u < *p {
                return Ok(cand[i].0 as u32);
            }
            u -= p;
        }
        Ok(cand[probs.len() - 1].0 as u32)
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

/// Generates up to `req.max_tokens` after `req.prompt`; `on_token` sees each id as it is
/// chosen.
pub fn generate<B: Backend>(b: &B, model: &Model<B>, req: &Request<'_>, mut on_token: impl FnMut(u32) -> Result<()>) -> Result<Generation> {
    let Request { prompt, max_tokens, sampling: params, eos, allowed } = *req;
    if prompt.is_empty() {
        return Err(RuntimeError::Request("the prompt is empty".into()));
    }
    let mut sampler = Sampler::new(params)?;
    let mut cache = model.new_cache(b, prompt.len() + max_tokens + 1)?;
    let seq = cache.add_sequence();
    let mut out = Generation { prompt_tokens: prompt.len(), ..Default::default() };
    if max_tokens == 0 {
        return Ok(out);
    }
    let start = Instant::now();
    let hidden = model.forward_hidden(b, &mut cache, &[(seq, prompt)])?;
    let logits = model.logits(b, &hidden, &[prompt.len() - 1])?;
    let mut next = sampler.sample(&logits, allowed)?;
    out.prefill_time = start.elapsed();
    let start = Instant::now();
    loop {
        out.ids.push(next);
        on_token(next)?;
        if eos.contains(&next) {
            out.stopped_at_eos = true;
            break;
        }
        if out.ids.len() >= max_tokens {
            break;
        }
        let hidden = model.forward_hidden(b, &mut cache, &[(seq, &[next][..])])?;
        let logits = model.logits(b, &hidden, &[0])?;
        next = sampler.sample(&logits, allowed)?;
    }
    out.decode_time = start.elapsed();
    Ok(out)
}
