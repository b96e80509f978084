//! Token sampling from logits rows: the one sampler of the project. The runtime's seeded
//! `dsv3_runtime::generate::Sampler` calls these functions (it only owns the random stream),
//! and the CUDA sampling kernels ([`crate::cuda::CudaDevice::sample`]) must follow the same
//! rule, which this page states exactly.
//!
//! # The rule
//!
//! * Only ids `< allowed` are candidates (the tokenizer's size; the padding rows of the
//!   embedding are never sampled): `n = min(allowed, vocab)` per row.
//! * A NaN among the candidates is an error naming the row and the first such id.
//! * **Greedy** (temperature 0): the argmax, lowest id on ties (strict `>` from `-inf`, so a
//!   row of `-inf` gives id 0).
//! * **Sampling** (temperature `T > 0`, finite):
//!   1. the candidates are sorted descending by **logit** in IEEE order (`-0 == +0`), ties by
//!      ascending id; the first `top_k` are kept (0: all). Candidate 0 is the greedy token.
//!   2. `w_i = exp((f64(l_i) - f64(l_0)) / f64(T))`, with `w_i = 1` when `l_i == l_0` (this
//!      covers tied infinities). The difference is `<= 0` or `-inf`, never NaN, and the
//!      division cannot overflow to NaN, so `w_i ∈ [0, 1]` and `w_0 = 1`: **every positive
//!      temperature gives a valid distribution**; `p_i = w_i / Σ w` (sums in candidate order).
//!   3. with `top_p < 1`, the list is cut after the first candidate whose cumulative
//!      probability reaches `top_p`, and renormalised.
//!   4. the draw with the row's uniform `u ∈ [0, 1)`: walk the list, return the id where
//!      `u < p`, else subtract `p`; the last candidate if rounding leaves none.
//!
//! Temperatures are neither clamped nor refused: the rule is computed so that none can
//! underflow. As `T → 0` the distribution tends to equal mass on the tied maxima (one token,
//! the greedy one, when the maximum is unique); a temperature so small that every other
//! `w_i` underflows to 0 gives exactly that. (Until issue 16 the rule was `v_i = l_i / T` in
//! f32 and `exp(v_i - v_0)`: `30 / 1e-38` overflowed, `inf - inf` made every probability
//! NaN, and the draw returned the *least* likely token. A GPU sampler that still divides in
//! f32 must move to this rule.)
//!
//! The random numbers stay with the caller (one uniform per row), so the runtime keeps its
//! seeded generator and a GPU draw is reproducible.
//!
//! ```
//! use dsv3_kernels::sample::{Dist, SampleParams};
//!
//! let logits = [1.0f32, 3.0, 2.0];
//! let d = Dist::new(&logits, &SampleParams { temperature: 1.0, top_k: 2, top_p: 1.0 })?;
//! assert_eq!(d.support().iter().map(|x| x.0).collect::<Vec<_>>(), [1, 2]); // top-2, most likely first
//! assert!((d.prob(1) - 1.0 / (1.0 + (-1f64).exp())).abs() < 1e-12);
//! assert_eq!(d.draw(0.0), 1);
//! // A vanishing temperature is greedy, not NaN.
//! let cold = Dist::new(&logits, &SampleParams { temperature: 1e-38, top_k: 0, top_p: 1.0 })?;
//! assert_eq!(cold.support(), &[(1, 1.0), (2, 0.0), (0, 0.0)]);
//! # Ok::<(), dsv3_kernels::KernelError>(())
//! ```

use crate::error::{Result, check_len, checked_mul, invalid, shape_err};
use std::cmp::Ordering;

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
    /// 0: greedy; otherwise finite and > 0 (any such value, see the module docs).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Nucleus threshold in (0, 1] (1: off).
    pub top_p: f32,
}

impl Default for SampleParams {
    /// Greedy.
    fn default() -> Self {
        SampleParams::GREEDY
    }
}

impl SampleParams {
    /// Temperature 0: the argmax.
    pub const GREEDY: SampleParams = SampleParams { temperature: 0.0, top_k: 0, top_p: 1.0 };

    /// Sampling at `temperature` over every candidate (no top-k, no top-p).
    pub fn with_temperature(temperature: f32) -> SampleParams {
        SampleParams { temperature, ..SampleParams::GREEDY }
    }

    /// Whether this is greedy decoding (temperature 0).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

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

/// The argmax of a NaN-free row, lowest id on ties (0 for a row of `-inf`).
fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0
}

/// Greedy choice per row: the argmax of `logits[r, ..allowed]`, lowest id on ties.
pub fn greedy(logits: &[f32], shape: SampleShape, out: &mut [u32]) -> Result<()> {
    let n = shape.check(OP, logits.len(), out.len())?;
    for (r, o) in out.iter_mut().enumerate() {
        let row = &logits[r * shape.vocab..r * shape.vocab + n];
        check_nan(r, row)?;
        *o = argmax(row) as u32;
    }
    Ok(())
}

/// The distribution a token is drawn from, `(id, probability)` most likely first, for one row
/// of candidates (NaN-free, non-empty; `params` valid), by the rule of the module docs.
/// Temperature 0 gives `[(argmax, 1.0)]`.
pub fn dist(row: &[f32], params: &SampleParams) -> Vec<(u32, f64)> {
    if params.is_greedy() || row.is_empty() {
        return vec![(argmax(row) as u32, 1.0)];
    }
    let mut cand: Vec<u32> = (0..row.len() as u32).collect();
    // Descending by logit in IEEE order (no NaN here; -0 == +0), ties by ascending id: the
    // first candidate is the greedy token.
    cand.sort_by(|&a, &b| row[b as usize].partial_cmp(&row[a as usize]).unwrap_or(Ordering::Equal).then(a.cmp(&b)));
    if params.top_k > 0 {
        cand.truncate(params.top_k);
    }
    let (top, t) = (row[cand[0] as usize], f64::from(params.temperature));
    let weight = |l: f32| if l == top { 1.0 } else { ((f64::from(l) - f64::from(top)) / t).exp() };
    let mut probs: Vec<f64> = cand.iter().map(|&i| weight(row[i as usize])).collect();
    normalise(&mut probs);
    if params.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs.iter().position(|&p| {
            acc += p;
            acc >= f64::from(params.top_p)
        });
        probs.truncate(keep.map_or(probs.len(), |i| i + 1));
        normalise(&mut probs);
    }
    cand.into_iter().zip(probs).collect()
}

/// Divides by the sum (>= 1 here: the first weight is 1).
fn normalise(p: &mut [f64]) {
    let total: f64 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= total);
}

/// Draws from a distribution with the uniform `u`: the id where `u < p`, walking the list and
/// subtracting; the last one if rounding leaves none (0 for an empty list).
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
    if params.is_greedy() {
        return greedy(logits, shape, out);
    }
    for (r, o) in out.iter_mut().enumerate() {
        let row = &logits[r * shape.vocab..r * shape.vocab + n];
        check_nan(r, row)?;
        *o = draw(&dist(row, params), uniforms[r]);
    }
    Ok(())
}

/// One row's sampling parameters and its uniform, as the backends' `sample_rows` take them (a
/// row per sequence, so every sequence of a batch samples with its own parameters and its own
/// seeded stream). `#[repr(C)]`: the CUDA kernel reads this layout (`dsv3_sample_row`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SampleRow {
    /// 0: greedy (the uniform is not used).
    pub temperature: f32,
    pub top_p: f32,
    /// 0: all (a `top_k` past `u32::MAX` is the same as all).
    pub top_k: u32,
    pub pad: u32,
    /// In [0, 1) when sampling.
    pub uniform: f64,
}

impl SampleRow {
    /// Greedy.
    pub const GREEDY: SampleRow = SampleRow { temperature: 0.0, top_p: 1.0, top_k: 0, pad: 0, uniform: 0.0 };

    pub fn new(params: &SampleParams, uniform: f64) -> SampleRow {
        let top_k = u32::try_from(params.top_k).unwrap_or(u32::MAX);
        SampleRow { temperature: params.temperature, top_p: params.top_p, top_k, pad: 0, uniform }
    }

    pub fn params(&self) -> SampleParams {
        SampleParams { temperature: self.temperature, top_k: self.top_k as usize, top_p: self.top_p }
    }

    /// Checks the parameters ([`SampleParams::validate`]) and, when sampling, the uniform;
    /// errors name the row.
    pub fn validate(&self, row: usize) -> Result<()> {
        self.params().validate().map_err(|e| match e {
            crate::KernelError::Invalid { op, what, detail } => invalid(op, what, format!("row {row}: {detail}")),
            other => other,
        })?;
        if !self.params().is_greedy() && !(0.0..1.0).contains(&self.uniform) {
            return Err(invalid(OP, "uniforms", format!("row {row}: {} is not in [0, 1)", self.uniform)));
        }
        Ok(())
    }
}

/// Samples one token per row, each row with its own parameters and uniform ([`SampleRow`]):
/// greedy rows take the argmax, the others [`dist`] then [`draw`]; the same token as
/// [`sample`] gives a row with those parameters and uniform.
pub fn sample_rows(logits: &[f32], shape: SampleShape, rows: &[SampleRow], out: &mut [u32]) -> Result<()> {
    let n = shape.check(OP, logits.len(), out.len())?;
    check_len(OP, "rows", rows.len(), shape.rows)?;
    for (r, p) in rows.iter().enumerate() {
        p.validate(r)?;
    }
    for (r, (o, p)) in out.iter_mut().zip(rows).enumerate() {
        let row = &logits[r * shape.vocab..r * shape.vocab + n];
        check_nan(r, row)?;
        *o = if p.params().is_greedy() { argmax(row) as u32 } else { draw(&dist(row, &p.params()), p.uniform) };
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

/// A token distribution: `(id, probability)`, most likely first, probabilities summing to 1
/// (the validated, owned form of [`dist`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Dist(Vec<(u32, f64)>);

impl Dist {
    /// The distribution of one row of candidate logits (every entry a candidate): checks
    /// `params`, that the row is not empty and has no NaN (the error names the first NaN id).
    pub fn new(row: &[f32], params: &SampleParams) -> Result<Dist> {
        params.validate()?;
        if row.is_empty() {
            return Err(shape_err(OP, "no token can be sampled (no candidates)"));
        }
        check_nan(0, row)?;
        Ok(Dist(dist(row, params)))
    }

    /// All mass on `id`.
    pub fn point(id: u32) -> Dist {
        Dist(vec![(id, 1.0)])
    }

    /// The probability of `id` (0 when outside the support).
    pub fn prob(&self, id: u32) -> f64 {
        self.0.iter().find(|x| x.0 == id).map_or(0.0, |x| x.1)
    }

    /// `(id, probability)` pairs, most likely first.
    pub fn support(&self) -> &[(u32, f64)] {
        &self.0
    }

    /// The most likely token (the greedy one).
    pub fn top(&self) -> u32 {
        self.0.first().map_or(0, |x| x.0)
    }

    /// The token for the uniform `u ∈ [0, 1)` ([`draw`]).
    pub fn draw(&self, u: f64) -> u32 {
        draw(&self.0, u)
    }
}

/// The outcome of [`verify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    /// Rejected, with the token that replaces the draft.
    Rejected(u32),
}

/// Speculative sampling (Leviathan et al. 2023, Chen et al. 2023): `draft` was drawn from `q`,
/// the target distribution is `p`. Accepts with probability `min(1, p(d) / q(d))` (one
/// uniform from `uniform`); otherwise returns a replacement drawn (one more uniform) from
/// `max(0, p - q)` renormalised, or from `p` when that is empty up to rounding. The token that
/// results (draft or replacement) is distributed exactly as `p`. When `p` is one point (greedy,
/// or top-k 1) no uniform is used: accepted iff the draft is that point, else it replaces it,
/// which is what the general rule gives.
pub fn verify(p: &Dist, q: &Dist, draft: u32, mut uniform: impl FnMut() -> f64) -> Verdict {
    if let [(only, _)] = p.support() {
        return if *only == draft { Verdict::Accepted } else { Verdict::Rejected(*only) };
    }
    let (pd, qd) = (p.prob(draft), q.prob(draft));
    if qd > 0.0 && uniform() < pd / qd {
        return Verdict::Accepted;
    }
    let residual: Vec<(u32, f64)> = p.0.iter().map(|&(id, pi)| (id, (pi - q.prob(id)).max(0.0))).filter(|x| x.1 > 0.0).collect();
    let total: f64 = residual.iter().map(|x| x.1).sum();
    if total <= 0.0 {
        // p == q up to rounding: the rejection had probability ~0; draw from p.
        return Verdict::Rejected(p.draw(uniform()));
    }
    Verdict::Rejected(draw(&residual.into_iter().map(|(id, x)| (id, x / total)).collect::<Vec<_>>(), uniform()))
}
