//! Token sampling from logits rows, the kernel-layer op behind the runtime's sampler
//! (`dsv3_runtime::generate::Sampler`, whose semantics these functions restate exactly), and
//! the CPU reference of the CUDA sampling kernels ([`crate::cuda::CudaDevice::sample`]).
//!
//! * Only ids `< allowed` are candidates (the tokenizer's size; the padding rows of the
//!   embedding are never sampled): `n = min(allowed, vocab)` per row.
//! * A NaN among the candidates is an error naming the row and the first such id.
//! * **Greedy** (temperature 0): the argmax, lowest id on ties (strict `>` from `-inf`, so a
//!   row of `-inf` gives id 0).
//! * **Sampling**: `v = logit / temperature` (f32); candidates sorted descending by `v` in the
//!   total order of `f32::total_cmp`, ties by ascending id; the first `top_k` kept (0: all);
//!   `p_i = exp(f64(v_i - v_0)) / Σ` (sums in candidate order); with `top_p < 1`, cut after the
//!   first candidate whose cumulative probability reaches `top_p`, renormalised; then the draw
//!   with the row's uniform `u ∈ [0, 1)`: walk the list, return the id where `u < p`, else
//!   subtract `p`; the last candidate if rounding leaves none.
//!
//! The random numbers stay with the caller (one uniform per row), so the runtime keeps its
//! seeded generator and a GPU draw is reproducible.

use crate::error::{Result, check_len, checked_mul, invalid, shape_err};

const OP: &str = "sample";

/// `rows` rows of `vocab` logits, of which ids `< allowed` may be drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleShape {
    pub rows: usize,
    pub vocab: usize,
    pub allowed: usize,
}

impl SampleShape {
    /// The candidates per row, `min(allowed, vocab)`, which must be >= 1.
    pub fn candidates(&self) -> usize {
        self.allowed.min(self.vocab)
    }

    /// Checks the candidates and the lengths of `logits` (`rows · vocab`) and `out` (`rows`);
    /// returns the candidates per row.
    pub fn check(&self, op: &'static str, logits: usize, out: usize) -> Result<usize> {
        let n = self.candidates();
        if n == 0 {
            return Err(shape_err(op, format!("no token can be sampled (vocab {}, allowed {})", self.vocab, self.allowed)));
        }
        check_len(op, "logits", logits, checked_mul(op, "logits", self.rows, self.vocab)?)?;
        check_len(op, "out", out, self.rows)?;
        Ok(n)
    }
}

/// How a token is chosen (the runtime's `SamplingParams` without the seed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleParams {
    /// 0: greedy; otherwise finite and > 0.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Nucleus threshold in (0, 1] (1: off).
    pub top_p: f32,
}

impl SampleParams {
    /// Checks temperature (finite, >= 0) and top_p (in (0, 1]).
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(invalid(OP, "temperature", format!("must be finite and >= 0, got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(invalid(OP, "top_p", format!("must be in (0, 1], got {}", self.top_p)));
        }
        Ok(())
    }
}

/// The error for a NaN among the candidates of row `r`.
pub(crate) fn nan_error(r: usize, id: usize) -> crate::KernelError {
    invalid(OP, "logits", format!("row {r}: NaN logit at token {id}"))
}

fn check_nan(r: usize, row: &[f32]) -> Result<()> {
    match row.iter().position(|v| v.is_nan()) {
        Some(i) => Err(nan_error(r, i)),
        None => Ok(()),
    }
}

/// Greedy choice per row: the argmax of `logits[r, ..allowed]`, lowest id on ties.
pub fn greedy(logits: &[f32], shape: SampleShape, out: &mut [u32]) -> Result<()> {
    let n = shape.check(OP, logits.len(), out.len())?;
    for (r, o) in out.iter_mut().enumerate() {
        let row = &logits[r * shape.vocab..r * shape.vocab + n];
        check_nan(r, row)?;
        *o = row.iter().enumerate().fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0 as u32;
    }
    Ok(())
}

/// The distribution a token is drawn from, `(id, probability)` most likely first, for one row
/// of candidates (NaN-free; `params.temperature > 0`).
pub fn dist(row: &[f32], params: &SampleParams) -> Vec<(u32, f64)> {
    let t = params.temperature;
    let mut cand: Vec<(usize, f32)> = row.iter().map(|&v| v / t).enumerate().collect();
    // Descending by logit, ties by id: deterministic.
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if params.top_k > 0 {
        cand.truncate(params.top_k);
    }
    let max = cand[0].1;
    let mut probs: Vec<f64> = cand.iter().map(|&(_, v)| ((v - max) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if params.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs.iter().position(|&p| {
            acc += p;
            acc >= params.top_p as f64
        });
        probs.truncate(keep.map_or(probs.len(), |i| i + 1));
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    cand.iter().zip(probs).map(|(&(id, _), p)| (id as u32, p)).collect()
}

/// Draws from a distribution with the uniform `u`: the id where `u < p`, walking the list and
/// subtracting; the last one if rounding leaves none.
pub fn draw(d: &[(u32, f64)], u: f64) -> u32 {
    let mut u = u;
    for &(id, p) in d {
        if u < p {
            return id;
        }
        u -= p;
    }
    d.last().map_or(0, |x| x.0)
}

/// Samples one token per row: greedy at temperature 0 (no uniform used), otherwise [`dist`]
/// then [`draw`] with `uniforms[r]` (each in [0, 1)).
pub fn sample(logits: &[f32], shape: SampleShape, params: &SampleParams, uniforms: &[f64], out: &mut [u32]) -> Result<()> {
    params.validate()?;
    let n = shape.check(OP, logits.len(), out.len())?;
    check_uniforms(uniforms, shape.rows)?;
    if params.temperature == 0.0 {
        return greedy(logits, shape, out);
    }
    for (r, o) in out.iter_mut().enumerate() {
        let row = &logits[r * shape.vocab..r * shape.vocab + n];
        check_nan(r, row)?;
        *o = draw(&dist(row, params), uniforms[r]);
    }
    Ok(())
}

/// One uniform per row, each in [0, 1).
pub(crate) fn check_uniforms(uniforms: &[f64], rows: usize) -> Result<()> {
    check_len(OP, "uniforms", uniforms.len(), rows)?;
    match uniforms.iter().position(|u| !(0.0..1.0).contains(u)) {
        Some(r) => Err(invalid(OP, "uniforms", format!("row {r}: {} is not in [0, 1)", uniforms[r]))),
        None => Ok(()),
    }
}
