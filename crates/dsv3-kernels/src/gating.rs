//! MoE top-k routing (docs/model.md §3.9): from the gate logits of each token to the `top_k`
//! experts it is sent to and their combine weights.
//!
//! Three methods, chosen by the config ([`RouteMethod`]):
//!
//! * [`RouteMethod::NoauxTc`] (V3, Moonlight): scores = σ(logits); selection uses
//!   scores + bias; group score = sum of the 2 largest biased scores of the group; keep
//!   `topk_group` groups; top-k of the biased scores inside them.
//! * [`RouteMethod::SoftmaxGreedy`] (V2-Lite): scores = softmax(logits); plain top-k, no
//!   groups (`n_group` / `topk_group` are checked for consistency but otherwise ignored).
//! * [`RouteMethod::GroupLimitedGreedy`] (V2): softmax; group score = max of the group.
//!
//! Conventions shared by [`route`] and [`reference::route`]:
//!
//! * **Ties** go to the lowest index: lowest group index in the group stage, lowest expert
//!   index in the expert stage (values are compared with IEEE `>`, so `-0.0 == 0.0`).
//! * **Output order** of a token's `top_k` entries: descending selection (biased) score, ties
//!   by ascending expert index.
//! * **Weights** are the *unbiased* scores of the chosen experts; with `norm_topk_prob` they are
//!   divided by (their sum, taken in output order, + 1e-20 as HF does); then multiplied by
//!   `routed_scaling_factor`.
//! * **Non-finite logits** (NaN or ±inf) are an error, [`KernelError::Invalid`] naming the
//!   lowest bad token and its first bad expert. An f32 gate GEMM only produces them when
//!   something upstream is broken, and a NaN must never turn into a plausible routing. On that
//!   error the rows of other tokens may have been written; the outputs must not be used.
//! * Both implementations compute σ and exp with the same scalar functions ([`sigmoid`],
//!   [`exp`]), so they select identically; the fast version evaluates them vectorised.

use crate::error::{KernelError, Result, check_len, checked_mul, invalid, shape_err};
use rayon::prelude::*;

/// How scores are computed and experts selected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteMethod {
    /// V3 `noaux_tc`: sigmoid scores, selection-only bias, group score = top-2 sum.
    NoauxTc,
    /// V2-Lite `greedy`: softmax scores, plain top-k, no groups, no bias.
    SoftmaxGreedy,
    /// V2 `group_limited_greedy`: softmax scores, group score = max in group, no bias.
    GroupLimitedGreedy,
}

/// Routing configuration (from the model's config.json).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouteCfg {
    /// Routed experts (`n_routed_experts`).
    pub n_experts: usize,
    /// Experts per token (`num_experts_per_tok`).
    pub top_k: usize,
    /// Expert groups; group `g` holds experts `g*E/n_group .. (g+1)*E/n_group`.
    pub n_group: usize,
    /// Groups kept per token.
    pub topk_group: usize,
    /// Score function and selection rule.
    pub method: RouteMethod,
    /// Renormalise the chosen weights to sum to 1 (before scaling).
    pub norm_topk_prob: bool,
    /// Final weight multiplier.
    pub routed_scaling_factor: f32,
}

const OP: &str = "gating::route";

impl RouteCfg {
    /// DeepSeek-V3 / R1: 256 experts, 8 groups keep 4, top-8, sigmoid, renormalised, × 2.5.
    pub fn deepseek_v3() -> RouteCfg {
        Self::of(256, 8, 8, 4, RouteMethod::NoauxTc, true, 2.5)
    }

    /// DeepSeek-V2-Lite: 64 experts, softmax greedy top-6, not renormalised, × 1.
    pub fn deepseek_v2_lite() -> RouteCfg {
        Self::of(64, 6, 1, 1, RouteMethod::SoftmaxGreedy, false, 1.0)
    }

    /// DeepSeek-V2 (236B): 160 experts, 8 groups keep 3, top-6, group-limited, × 16.
    pub fn deepseek_v2() -> RouteCfg {
        Self::of(160, 6, 8, 3, RouteMethod::GroupLimitedGreedy, false, 16.0)
    }

    /// Moonlight: V3 routing with one group, 64 experts, top-6, renormalised, × 2.446.
    pub fn moonlight() -> RouteCfg {
        Self::of(64, 6, 1, 1, RouteMethod::NoauxTc, true, 2.446)
    }

    fn of(n_experts: usize, top_k: usize, n_group: usize, topk_group: usize, method: RouteMethod, norm: bool, scale: f32) -> RouteCfg {
        RouteCfg { n_experts, top_k, n_group, topk_group, method, norm_topk_prob: norm, routed_scaling_factor: scale }
    }

    /// The same rule with `n_experts` routed experts, `top_k` per token (a smaller model of the
    /// same family; check it with [`RouteCfg::validate`]).
    ///
    /// ```
    /// use dsv3_kernels::gating::RouteCfg;
    /// // V3 routing at test size: 16 experts in 4 groups keeping 2, top-4.
    /// let cfg = RouteCfg::deepseek_v3().with_experts(16, 4).with_groups(4, 2);
    /// assert!(cfg.validate().is_ok());
    /// assert_eq!((cfg.group_size(), cfg.available_experts()), (4, 8));
    /// ```
    pub fn with_experts(self, n_experts: usize, top_k: usize) -> RouteCfg {
        RouteCfg { n_experts, top_k, ..self }
    }

    /// The same rule with `n_group` groups of which `topk_group` are kept.
    pub fn with_groups(self, n_group: usize, topk_group: usize) -> RouteCfg {
        RouteCfg { n_group, topk_group, ..self }
    }

    /// The same rule with another renormalisation and final multiplier.
    pub fn with_scaling(self, norm_topk_prob: bool, routed_scaling_factor: f32) -> RouteCfg {
        RouteCfg { norm_topk_prob, routed_scaling_factor, ..self }
    }

    /// Experts per group.
    pub fn group_size(&self) -> usize {
        self.n_experts / self.n_group.max(1)
    }

    /// Whether the group stage runs (it does not for [`RouteMethod::SoftmaxGreedy`]).
    pub fn uses_groups(&self) -> bool {
        self.method != RouteMethod::SoftmaxGreedy
    }

    /// Experts a token can pick from after the group stage.
    pub fn available_experts(&self) -> usize {
        if self.uses_groups() { self.topk_group * self.group_size() } else { self.n_experts }
    }

    /// Checks every constraint listed in the module docs.
    pub fn validate(&self) -> Result<()> {
        if self.n_experts == 0 || self.n_experts > u32::MAX as usize {
            return Err(shape_err(OP, format!("n_experts = {} must be in 1..=u32::MAX", self.n_experts)));
        }
        if self.n_group == 0 || !self.n_experts.is_multiple_of(self.n_group) {
            return Err(shape_err(OP, format!("n_group = {} must be >= 1 and divide n_experts = {}", self.n_group, self.n_experts)));
        }
        if self.topk_group == 0 || self.topk_group > self.n_group {
            return Err(shape_err(OP, format!("topk_group = {} must be in 1..=n_group = {}", self.topk_group, self.n_group)));
        }
        if self.method == RouteMethod::NoauxTc && self.group_size() < 2 {
            return Err(shape_err(OP, format!("noaux_tc needs >= 2 experts per group (top-2 sum), got {}", self.group_size())));
        }
        if self.top_k == 0 || self.top_k > self.available_experts() {
            return Err(shape_err(
                OP,
                format!("top_k = {} must be in 1..={} (experts in the kept groups)", self.top_k, self.available_experts()),
            ));
        }
        let s = self.routed_scaling_factor;
        if !s.is_finite() || s <= 0.0 {
            return Err(invalid(OP, "routed_scaling_factor", format!("{s} is not finite and > 0")));
        }
        Ok(())
    }
}

/// Checks config and all lengths (of `logits`, `indices`, `weights`; CPU and CUDA alike);
/// returns the bias to use for selection (NoauxTc only).
pub(crate) fn check_args<'b>(
    cfg: &RouteCfg,
    tokens: usize,
    logits: usize,
    bias: Option<&'b [f32]>,
    indices: usize,
    weights: usize,
) -> Result<Option<&'b [f32]>> {
    cfg.validate()?;
    check_len(OP, "logits", logits, checked_mul(OP, "logits", tokens, cfg.n_experts)?)?;
    let out = checked_mul(OP, "indices", tokens, cfg.top_k)?;
    check_len(OP, "indices", indices, out)?;
    check_len(OP, "weights", weights, out)?;
    match (cfg.method, bias) {
        (RouteMethod::NoauxTc, None) => Err(invalid(OP, "bias", "noaux_tc needs e_score_correction_bias")),
        (RouteMethod::NoauxTc, Some(b)) => {
            check_len(OP, "bias", b.len(), cfg.n_experts)?;
            match b.iter().position(|v| !v.is_finite()) {
                Some(e) => Err(invalid(OP, "bias", format!("expert {e} has non-finite bias {}", b[e]))),
                None => Ok(Some(b)),
            }
        }
        (_, Some(_)) => Err(invalid(OP, "bias", "only noaux_tc uses a bias; pass None")),
        (_, None) => Ok(None),
    }
}

fn non_finite(token: usize, expert: usize, v: f32) -> KernelError {
    invalid(OP, "logits", format!("token {token}, expert {expert}: non-finite logit {v}"))
}

/// e^x in f32 (Cephes `expf`: range reduction by ln 2, degree-7 polynomial; about 1 ulp).
/// `x` is clamped to [-87, 88], so the result is finite and > 0 for every non-NaN `x` (NaN
/// gives NaN). Branch-free, so loops over it vectorise; scalar and vector forms give the
/// same bits.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const SHIFT: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + SHIFT;
    let n = t - SHIFT;
    let r = x - n * C1;
    let r = r - n * C2;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let p = p * (r * r) + r + 1.0;
    // n is in [-126, 127]: the low bits of t hold it; build 2^n from its exponent field.
    let n_i = t.to_bits() as i32 - 0x4B40_0000;
    p * f32::from_bits(((n_i + 127) << 23) as u32)
}

/// The logistic function 1 / (1 + e^-x), with [`exp`].
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// Plain-loop routing that reads like docs/model.md §3.9; the oracle for [`route`].
pub mod reference {
    use super::*;
    use std::cmp::Ordering;

    /// Descending by value (IEEE equality for ties), then ascending index.
    fn desc(v: &[f32], a: usize, b: usize) -> Ordering {
        v[b].partial_cmp(&v[a]).unwrap_or(Ordering::Equal).then(a.cmp(&b))
    }

    /// Same contract as [`super::route`].
    pub fn route(
        cfg: &RouteCfg,
        tokens: usize,
        logits: &[f32],
        bias: Option<&[f32]>,
        indices: &mut [u32],
        weights: &mut [f32],
    ) -> Result<()> {
        let bias = check_args(cfg, tokens, logits.len(), bias, indices.len(), weights.len())?;
        let n = cfg.n_experts;
        let gs = cfg.group_size();
        for t in 0..tokens {
            let row = &logits[t * n..(t + 1) * n];
            if let Some(e) = row.iter().position(|v| !v.is_finite()) {
                return Err(non_finite(t, e, row[e]));
            }
            // Unbiased scores.
            let scores: Vec<f32> = if cfg.method == RouteMethod::NoauxTc {
                row.iter().map(|&l| sigmoid(l)).collect()
            } else {
                let mut m = f32::NEG_INFINITY;
                for &l in row {
                    m = m.max(l);
                }
                let e: Vec<f32> = row.iter().map(|&l| exp(l - m)).collect();
                let mut sum = 0.0f32;
                for &v in &e {
                    sum += v;
                }
                e.iter().map(|&v| v / sum).collect()
            };
            // Selection scores: bias only here.
            let sel: Vec<f32> = match bias {
                Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
                None => scores.clone(),
            };
            // Group stage.
            let mut allowed = vec![true; n];
            if cfg.uses_groups() {
                let mut gscore = Vec::with_capacity(cfg.n_group);
                for g in 0..cfg.n_group {
                    let mut v = sel[g * gs..(g + 1) * gs].to_vec();
                    v.sort_by(|a, b| b.partial_cmp(a).unwrap_or(Ordering::Equal));
                    gscore.push(if cfg.method == RouteMethod::NoauxTc { v[0] + v[1] } else { v[0] });
                }
                let mut order: Vec<usize> = (0..cfg.n_group).collect();
                order.sort_by(|&a, &b| desc(&gscore, a, b));
                allowed = vec![false; n];
                for &g in &order[..cfg.topk_group] {
                    for a in &mut allowed[g * gs..(g + 1) * gs] {
                        *a = true;
                    }
                }
            }
            // Expert stage: top-k of the selection scores among allowed experts.
            let mut cand: Vec<usize> = (0..n).filter(|&e| allowed[e]).collect();
            cand.sort_by(|&a, &b| desc(&sel, a, b));
            let chosen = &cand[..cfg.top_k];
            // Weights: unbiased scores, optionally renormalised, then scaled.
            let mut w: Vec<f32> = chosen.iter().map(|&e| scores[e]).collect();
            if cfg.norm_topk_prob {
                let mut sum = 0.0f32;
                for &v in &w {
                    sum += v;
                }
                let denom = sum + 1e-20;
                for v in &mut w {
                    *v /= denom;
                }
            }
            for (j, &e) in chosen.iter().enumerate() {
                indices[t * cfg.top_k + j] = e as u32;
                weights[t * cfg.top_k + j] = w[j] * cfg.routed_scaling_factor;
            }
        }
        Ok(())
    }
}

/// Routes `tokens` tokens: `logits` is `[tokens, n_experts]` (row-major, f32), `bias` is
/// `[n_experts]` (required for [`RouteMethod::NoauxTc`], must be `None` otherwise), and the
/// outputs `indices` / `weights` are `[tokens, top_k]`. See the module docs for ties, order,
/// weights and the error on non-finite logits. Multi-threaded over tokens for large batches.
pub fn route(cfg: &RouteCfg, tokens: usize, logits: &[f32], bias: Option<&[f32]>, indices: &mut [u32], weights: &mut [f32]) -> Result<()> {
    let bias = check_args(cfg, tokens, logits.len(), bias, indices.len(), weights.len())?;
    let (n, k) = (cfg.n_experts, cfg.top_k);
    // About 8K logits per task: enough work to amortise a rayon task.
    let per_task = (8192 / n).max(1);
    let bad = if tokens < 2 * per_task {
        route_chunk(cfg, 0, logits, bias, indices, weights).err()
    } else {
        logits
            .par_chunks(per_task * n)
            .zip(indices.par_chunks_mut(per_task * k))
            .zip(weights.par_chunks_mut(per_task * k))
            .enumerate()
            .filter_map(|(c, ((l, i), w))| route_chunk(cfg, c * per_task, l, bias, i, w).err())
            .min_by_key(|b| b.0)
    };
    match bad {
        Some((t, e, v)) => Err(non_finite(t, e, v)),
        None => Ok(()),
    }
}

/// Per-task buffers of the fast path.
struct Scratch {
    scores: Vec<f32>,
    sel: Vec<f32>,
    gscore: Vec<f32>,
    gtop: Vec<f32>,
    gid: Vec<u32>,
    top: Vec<f32>,
    tid: Vec<u32>,
}

/// (token, expert, value) of the first non-finite logit of a chunk.
type BadLogit = (usize, usize, f32);

crate::cpu::dispatch! {
    /// Routes the tokens of one chunk (`first` = index of its first token); on a non-finite
    /// logit returns (token, expert, value) of the first one and stops.
    fn route_chunk(
        cfg: &RouteCfg,
        first: usize,
        logits: &[f32],
        bias: Option<&[f32]>,
        indices: &mut [u32],
        weights: &mut [f32],
    ) -> std::result::Result<(), BadLogit> = route_chunk_body;
}

#[inline(always)]
fn route_chunk_body(
    cfg: &RouteCfg,
    first: usize,
    logits: &[f32],
    bias: Option<&[f32]>,
    indices: &mut [u32],
    weights: &mut [f32],
) -> std::result::Result<(), BadLogit> {
    let (n, k) = (cfg.n_experts, cfg.top_k);
    let mut s = Scratch {
        scores: vec![0.0; n],
        sel: vec![0.0; n],
        gscore: vec![0.0; cfg.n_group],
        gtop: vec![0.0; cfg.topk_group],
        gid: vec![0; cfg.topk_group],
        top: vec![0.0; k],
        tid: vec![0; k],
    };
    for (t, ((row, idx), w)) in logits.chunks_exact(n).zip(indices.chunks_exact_mut(k)).zip(weights.chunks_exact_mut(k)).enumerate() {
        if !all_finite(row) {
            let e = row.iter().position(|v| !v.is_finite()).unwrap_or(0);
            return Err((first + t, e, row[e]));
        }
        route_token(cfg, row, bias, &mut s, idx, w);
    }
    Ok(())
}

/// Whether every value is finite (exponent field not all ones), without early exit so it
/// vectorises.
#[inline(always)]
fn all_finite(row: &[f32]) -> bool {
    row.iter().fold(0u32, |acc, v| acc | ((v.to_bits() & 0x7f80_0000) == 0x7f80_0000) as u32) == 0
}

/// Sum of the two largest values (`g.len() >= 2`): eight lanes each keep their top 2
/// (branch-free compare-selects, so it vectorises), then a tree merges the lanes. Selecting is
/// exact, so the result equals sorting and adding the first two. (Plain compares instead of
/// `f32::max`: no NaN can reach here, and they compile to single max/min instructions.)
#[inline(always)]
fn top2_sum(g: &[f32]) -> f32 {
    const L: usize = 8;
    let max = |a: f32, b: f32| if a > b { a } else { b };
    let min = |a: f32, b: f32| if a > b { b } else { a };
    let (mut hi, mut lo) = ([f32::NEG_INFINITY; L], [f32::NEG_INFINITY; L]);
    let mut chunks = g.chunks_exact(L);
    for c in &mut chunks {
        for l in 0..L {
            lo[l] = max(lo[l], min(hi[l], c[l]));
            hi[l] = max(hi[l], c[l]);
        }
    }
    for (l, &v) in chunks.remainder().iter().enumerate() {
        lo[l] = max(lo[l], min(hi[l], v));
        hi[l] = max(hi[l], v);
    }
    // Top 2 of two top-2 pairs: (max of highs, max of the lower high and both lows).
    let mut w = L;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            let (h1, l1, h2, l2) = (hi[l], lo[l], hi[l + w], lo[l + w]);
            hi[l] = max(h1, h2);
            lo[l] = max(min(h1, h2), max(l1, l2));
        }
    }
    hi[0] + lo[0]
}

/// Offers `vals` (ids `base..`, ascending) to a top-`k` list, `k <= 8`, kept in fixed arrays
/// (empty places hold -inf, lanes `>= k` stay -inf), with a branch-free insertion.
#[inline(always)]
fn offer_all8(top: &mut [f32; 8], tid: &mut [u32; 8], k: usize, vals: &[f32], base: usize) {
    let last = k - 1; // k in 1..=8 (validated)
    for (b, blk) in vals.chunks(8).enumerate() {
        let th = top[last];
        // Lanes that beat the k-th at block start, visited in ascending order: one
        // data-dependent branch per candidate that can enter, not per value.
        let mut mask = blk.iter().enumerate().fold(0u32, |m, (i, &v)| m | (((v > th) as u32) << i));
        while mask != 0 {
            let i = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            let v = blk[i];
            if v > top[last] {
                // Place after every entry >= v: equal entries came earlier (lower ids).
                let pos = top.iter().fold(0usize, |n, &x| n + (x >= v) as usize);
                let id = (base + b * 8 + i) as u32;
                let (ov, oi) = (*top, *tid);
                // Lane-wise selects (no scalar store into the array, so no store-forwarding
                // stall on the next load): keep, place v, or take the lane above.
                for l in 0..8usize {
                    let up = l.saturating_sub(1);
                    let (nv, ni) = if l == pos {
                        (v, id)
                    } else if l > pos && l <= last {
                        (ov[up], oi[up])
                    } else {
                        (ov[l], oi[l])
                    };
                    top[l] = nv;
                    tid[l] = ni;
                }
            }
        }
    }
}

/// Inserts `(v, id)` into the descending list `vals[..*len]` (capacity `vals.len()`). A new
/// value only passes an equal one if strictly greater, so when callers scan ids in ascending
/// order, ties keep the lowest id first.
#[inline(always)]
fn insert_top(vals: &mut [f32], ids: &mut [u32], len: &mut usize, v: f32, id: u32) {
    let cap = vals.len();
    let mut pos = if *len < cap {
        *len += 1;
        *len - 1
    } else if v > vals[cap - 1] {
        cap - 1
    } else {
        return;
    };
    while pos > 0 && v > vals[pos - 1] {
        vals[pos] = vals[pos - 1];
        ids[pos] = ids[pos - 1];
        pos -= 1;
    }
    vals[pos] = v;
    ids[pos] = id;
}

/// Routes one token whose logits are all finite.
#[inline(always)]
fn route_token(cfg: &RouteCfg, row: &[f32], bias: Option<&[f32]>, s: &mut Scratch, idx: &mut [u32], w: &mut [f32]) {
    let gs = cfg.group_size();
    if cfg.method == RouteMethod::NoauxTc {
        for (o, &v) in s.scores.iter_mut().zip(row) {
            *o = sigmoid(v);
        }
    } else {
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        for (o, &v) in s.scores.iter_mut().zip(row) {
            *o = exp(v - m);
        }
        let mut sum = 0.0f32;
        for &v in &s.scores {
            sum += v;
        }
        for v in &mut s.scores {
            *v /= sum;
        }
    }
    match bias {
        Some(b) => {
            for ((o, &sc), &bi) in s.sel.iter_mut().zip(&s.scores).zip(b) {
                *o = sc + bi;
            }
        }
        None => s.sel.copy_from_slice(&s.scores),
    }
    // Candidate ranges: the kept groups in ascending order (so expert ids arrive ascending),
    // or everything when there is no group stage or every group is kept.
    let all = !(cfg.uses_groups() && cfg.topk_group < cfg.n_group);
    if !all {
        for (g, grp) in s.sel.chunks_exact(gs).enumerate() {
            s.gscore[g] =
                if cfg.method == RouteMethod::NoauxTc { top2_sum(grp) } else { grp.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) };
        }
        let mut glen = 0;
        for (g, &v) in s.gscore.iter().enumerate() {
            insert_top(&mut s.gtop, &mut s.gid, &mut glen, v, g as u32);
        }
        s.gid.sort_unstable();
    }
    let (groups, width): (&[u32], usize) = if all { (&[0], cfg.n_experts) } else { (&s.gid, gs) };
    let k = cfg.top_k;
    if k <= 8 {
        // Selection scores are always finite (scores in [0, 1] plus a finite bias), so -inf
        // marks an empty place.
        let (mut tv, mut ti) = ([f32::NEG_INFINITY; 8], [0u32; 8]);
        for &g in groups {
            let base = g as usize * width;
            offer_all8(&mut tv, &mut ti, k, &s.sel[base..base + width], base);
        }
        s.tid.copy_from_slice(&ti[..k]);
    } else {
        let mut len = 0;
        for &g in groups {
            let base = g as usize * width;
            for (e, &v) in s.sel[base..base + width].iter().enumerate() {
                insert_top(&mut s.top, &mut s.tid, &mut len, v, (base + e) as u32);
            }
        }
    }
    for (o, &e) in w.iter_mut().zip(&s.tid) {
        *o = s.scores[e as usize];
    }
    if cfg.norm_topk_prob {
        let mut sum = 0.0f32;
        for &v in w.iter() {
            sum += v;
        }
        let denom = sum + 1e-20;
        for v in w.iter_mut() {
            *v /= denom;
        }
    }
    for v in w.iter_mut() {
        *v *= cfg.routed_scaling_factor;
    }
    idx.copy_from_slice(&s.tid);
}
