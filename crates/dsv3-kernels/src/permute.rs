//! MoE dispatch plan, permute (token order → expert order) and weighted un-permute (combine).
//!
//! A token `t` routed to `top_k` experts gives `top_k` *pairs* `(t, j)`, flat index
//! `p = t * top_k + j`. The [`DispatchPlan`] orders all pairs by expert; **within one expert,
//! rows are ordered by ascending pair index, i.e. by (token, j)**, so the plan is a stable,
//! deterministic counting sort. The *contiguous* layout stacks expert `e`'s rows at
//! `offsets[e] .. offsets[e+1]`; the *masked* layout (the grouped GEMM's) gives every expert
//! `capacity` rows, expert `e`'s `i`-th row at `e * capacity + i`, rows past `counts[e]` zero.
//!
//! Combine: `out[t] = Σ_j w[t, j] · y[row(t, j)]`, accumulated in f32 starting from 0 in
//! ascending `j`, the same order in the reference and the fast version, so they agree
//! bit for bit.

use crate::error::{Result, check_len, checked_mul, invalid, shape_err};
use rayon::prelude::*;

const OP: &str = "permute";

/// Sizes of one routed batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanShape {
    /// Tokens in the batch (may be 0).
    pub tokens: usize,
    /// Experts per token (>= 1).
    pub top_k: usize,
    /// Experts the ids index (>= 1).
    pub n_experts: usize,
}

impl PlanShape {
    /// Checks `top_k >= 1`, `n_experts >= 1`, and that pair and expert counts fit in u32.
    pub fn validate(&self) -> Result<()> {
        if self.top_k == 0 || self.n_experts == 0 {
            return Err(shape_err(OP, format!("top_k = {} and n_experts = {} must be >= 1", self.top_k, self.n_experts)));
        }
        let pairs = checked_mul(OP, "pairs", self.tokens, self.top_k)?;
        if pairs > u32::MAX as usize || self.n_experts > u32::MAX as usize {
            return Err(shape_err(OP, "tokens * top_k and n_experts must fit in u32"));
        }
        Ok(())
    }

    /// `tokens * top_k` (valid after [`PlanShape::validate`]).
    pub fn pairs(&self) -> usize {
        self.tokens * self.top_k
    }
}

/// Where every (token, j) pair goes in expert order. Built only by [`DispatchPlan::build`] or
/// [`reference::build_plan`], so its tables are always consistent with each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchPlan {
    shape: PlanShape,
    counts: Vec<u32>,
    offsets: Vec<u32>,
    slot_of: Vec<u32>,
    token_of_slot: Vec<u32>,
    pair_of_slot: Vec<u32>,
}

/// Checks the shape and that every id is `< n_experts`, naming the first bad token.
fn check_ids(shape: &PlanShape, ids: &[u32]) -> Result<()> {
    shape.validate()?;
    check_len(OP, "topk_ids", ids.len(), shape.pairs())?;
    match ids.iter().position(|&e| e as usize >= shape.n_experts) {
        Some(p) => Err(invalid(
            OP,
            "topk_ids",
            format!("token {}, slot {}: expert id {} >= n_experts = {}", p / shape.top_k, p % shape.top_k, ids[p], shape.n_experts),
        )),
        None => Ok(()),
    }
}

impl DispatchPlan {
    /// Builds the plan from `topk_ids` `[tokens, top_k]` by a counting sort (O(pairs +
    /// n_experts), one thread: it is small next to moving the rows). An id `>= n_experts` is
    /// an error naming the token.
    pub fn build(shape: PlanShape, topk_ids: &[u32]) -> Result<DispatchPlan> {
        check_ids(&shape, topk_ids)?;
        let mut counts = vec![0u32; shape.n_experts];
        for &e in topk_ids {
            counts[e as usize] += 1;
        }
        let offsets = prefix(&counts);
        let mut cursor = offsets.clone();
        let pairs = shape.pairs();
        let (mut slot_of, mut token_of_slot, mut pair_of_slot) = (vec![0u32; pairs], vec![0u32; pairs], vec![0u32; pairs]);
        for (p, &e) in topk_ids.iter().enumerate() {
            let s = cursor[e as usize];
            cursor[e as usize] += 1;
            slot_of[p] = s;
            token_of_slot[s as usize] = (p / shape.top_k) as u32;
            pair_of_slot[s as usize] = p as u32;
        }
        Ok(DispatchPlan { shape, counts, offsets, slot_of, token_of_slot, pair_of_slot })
    }

    /// The batch sizes.
    pub fn shape(&self) -> PlanShape {
        self.shape
    }
    /// Rows of the contiguous permuted buffer (= pairs).
    pub fn rows(&self) -> usize {
        self.shape.pairs()
    }
    /// Rows per expert, `[n_experts]`.
    pub fn counts(&self) -> &[u32] {
        &self.counts
    }
    /// Exclusive prefix sum of `counts`, `[n_experts + 1]`; the last entry is `rows()`.
    pub fn offsets(&self) -> &[u32] {
        &self.offsets
    }
    /// Row of pair `p = t * top_k + j` in the contiguous layout, `[pairs]`.
    pub fn slot_of(&self) -> &[u32] {
        &self.slot_of
    }
    /// Source token of each contiguous row, `[pairs]`.
    pub fn token_of_slot(&self) -> &[u32] {
        &self.token_of_slot
    }
    /// Pair index `t * top_k + j` of each contiguous row, `[pairs]` (inverse of `slot_of`).
    pub fn pair_of_slot(&self) -> &[u32] {
        &self.pair_of_slot
    }
    /// The largest per-expert count (the least capacity the masked layout needs).
    pub fn max_count(&self) -> usize {
        self.counts.iter().copied().max().unwrap_or(0) as usize
    }

    /// Row of every pair in the masked layout with `capacity` rows per expert, `[pairs]`;
    /// an error names the first expert with more than `capacity` rows.
    pub fn masked_rows(&self, capacity: usize) -> Result<Vec<usize>> {
        check_capacity(self, capacity)?;
        let mut rows = vec![0usize; self.rows()];
        for (e, w) in self.offsets.windows(2).enumerate() {
            for s in w[0] as usize..w[1] as usize {
                rows[self.pair_of_slot[s] as usize] = e * capacity + (s - w[0] as usize);
            }
        }
        Ok(rows)
    }
}

fn prefix(counts: &[u32]) -> Vec<u32> {
    let mut offsets = Vec::with_capacity(counts.len() + 1);
    let mut acc = 0u32;
    offsets.push(0);
    for &c in counts {
        acc += c; // sum = pairs <= u32::MAX (validated)
        offsets.push(acc);
    }
    offsets
}

fn check_capacity(plan: &DispatchPlan, capacity: usize) -> Result<()> {
    checked_mul(OP, "masked rows", plan.shape.n_experts, capacity)?;
    match plan.counts.iter().position(|&c| c as usize > capacity) {
        Some(e) => Err(invalid(OP, "capacity", format!("expert {e} has {} rows > capacity {capacity}", plan.counts[e]))),
        None => Ok(()),
    }
}

fn check_hidden(hidden: usize) -> Result<()> {
    if hidden == 0 { Err(shape_err(OP, "hidden must be >= 1")) } else { Ok(()) }
}

/// Checks `x: [tokens, hidden]` → `out: [out_rows, hidden]`.
fn check_permute(plan: &DispatchPlan, hidden: usize, x: &[f32], out: &[f32], out_rows: usize) -> Result<()> {
    check_hidden(hidden)?;
    check_len(OP, "x", x.len(), checked_mul(OP, "x", plan.shape.tokens, hidden)?)?;
    check_len(OP, "out", out.len(), checked_mul(OP, "out", out_rows, hidden)?)
}

/// Checks `y: [y_rows, hidden]`, `weights: [pairs]` → `out: [tokens, hidden]`.
fn check_combine(plan: &DispatchPlan, hidden: usize, y: &[f32], y_rows: usize, weights: &[f32], out: &[f32]) -> Result<()> {
    check_hidden(hidden)?;
    check_len(OP, "y", y.len(), checked_mul(OP, "y", y_rows, hidden)?)?;
    check_len(OP, "weights", weights.len(), plan.rows())?;
    check_len(OP, "out", out.len(), checked_mul(OP, "out", plan.shape.tokens, hidden)?)
}

/// Plain loops that read like the definitions; the oracle for the fast functions.
pub mod reference {
    use super::*;

    /// The plan by definition: for each expert, scan all pairs in (token, j) order.
    pub fn build_plan(shape: PlanShape, topk_ids: &[u32]) -> Result<DispatchPlan> {
        check_ids(&shape, topk_ids)?;
        let (n, k, pairs) = (shape.n_experts, shape.top_k, shape.pairs());
        let mut counts = vec![0u32; n];
        let mut offsets = vec![0u32; n + 1];
        let (mut slot_of, mut token_of_slot, mut pair_of_slot) = (vec![0u32; pairs], vec![0u32; pairs], vec![0u32; pairs]);
        let mut row = 0u32;
        for e in 0..n {
            offsets[e] = row;
            for t in 0..shape.tokens {
                for j in 0..k {
                    if topk_ids[t * k + j] as usize == e {
                        slot_of[t * k + j] = row;
                        token_of_slot[row as usize] = t as u32;
                        pair_of_slot[row as usize] = (t * k + j) as u32;
                        counts[e] += 1;
                        row += 1;
                    }
                }
            }
        }
        offsets[n] = row;
        Ok(DispatchPlan { shape, counts, offsets, slot_of, token_of_slot, pair_of_slot })
    }

    /// `out[slot_of[t, j]] = x[t]`.
    pub fn permute(plan: &DispatchPlan, hidden: usize, x: &[f32], out: &mut [f32]) -> Result<()> {
        check_permute(plan, hidden, x, out, plan.rows())?;
        let k = plan.shape.top_k;
        for t in 0..plan.shape.tokens {
            for j in 0..k {
                let r = plan.slot_of[t * k + j] as usize;
                for c in 0..hidden {
                    out[r * hidden + c] = x[t * hidden + c];
                }
            }
        }
        Ok(())
    }

    /// `out[t] = Σ_j w[t, j] · y[slot_of[t, j]]`.
    pub fn unpermute(plan: &DispatchPlan, hidden: usize, y: &[f32], weights: &[f32], out: &mut [f32]) -> Result<()> {
        check_combine(plan, hidden, y, plan.rows(), weights, out)?;
        let k = plan.shape.top_k;
        for t in 0..plan.shape.tokens {
            for c in 0..hidden {
                let mut acc = 0.0f32;
                for j in 0..k {
                    let r = plan.slot_of[t * k + j] as usize;
                    acc += weights[t * k + j] * y[r * hidden + c];
                }
                out[t * hidden + c] = acc;
            }
        }
        Ok(())
    }

    /// `out[p] = y[slot_of[p]]`: expert order back to pair order, unweighted.
    pub fn gather_pairs(plan: &DispatchPlan, hidden: usize, y: &[f32], out: &mut [f32]) -> Result<()> {
        check_hidden(hidden)?;
        let rows = checked_mul(OP, "y", plan.rows(), hidden)?;
        check_len(OP, "y", y.len(), rows)?;
        check_len(OP, "out", out.len(), rows)?;
        for p in 0..plan.rows() {
            let r = plan.slot_of[p] as usize;
            for c in 0..hidden {
                out[p * hidden + c] = y[r * hidden + c];
            }
        }
        Ok(())
    }

    /// Masked layout: expert `e`'s `i`-th row (by (token, j)) at `e * capacity + i`; the
    /// rest zero.
    pub fn permute_masked(plan: &DispatchPlan, hidden: usize, capacity: usize, x: &[f32], out: &mut [f32]) -> Result<()> {
        check_capacity(plan, capacity)?;
        check_permute(plan, hidden, x, out, plan.shape.n_experts * capacity)?;
        out.fill(0.0);
        let mut filled = vec![0usize; plan.shape.n_experts];
        let k = plan.shape.top_k;
        for t in 0..plan.shape.tokens {
            for j in 0..k {
                // The expert of pair (t, j) is the one whose range holds its slot.
                let s = plan.slot_of[t * k + j];
                let e = (0..plan.shape.n_experts).find(|&e| plan.offsets[e] <= s && s < plan.offsets[e + 1]).unwrap_or(0);
                let r = e * capacity + filled[e];
                filled[e] += 1;
                for c in 0..hidden {
                    out[r * hidden + c] = x[t * hidden + c];
                }
            }
        }
        Ok(())
    }

    /// Combine from the masked layout: `out[t] = Σ_j w[t, j] · y[masked row of (t, j)]`.
    pub fn unpermute_masked(
        plan: &DispatchPlan,
        hidden: usize,
        capacity: usize,
        y: &[f32],
        weights: &[f32],
        out: &mut [f32],
    ) -> Result<()> {
        check_capacity(plan, capacity)?;
        check_combine(plan, hidden, y, plan.shape.n_experts * capacity, weights, out)?;
        let k = plan.shape.top_k;
        for t in 0..plan.shape.tokens {
            // Masked row of each pair: its expert's block, at its rank within the expert.
            let mut rows = vec![0usize; k];
            for (j, r) in rows.iter_mut().enumerate() {
                let s = plan.slot_of[t * k + j];
                let e = (0..plan.shape.n_experts).find(|&e| plan.offsets[e] <= s && s < plan.offsets[e + 1]).unwrap_or(0);
                *r = e * capacity + (s - plan.offsets[e]) as usize;
            }
            for c in 0..hidden {
                let mut acc = 0.0f32;
                for j in 0..k {
                    acc += weights[t * k + j] * y[rows[j] * hidden + c];
                }
                out[t * hidden + c] = acc;
            }
        }
        Ok(())
    }
}

/// Rows per rayon task: about 64 KiB of f32 each; below one task of work, no threads.
fn rows_per_task(hidden: usize) -> usize {
    (16384 / hidden).max(1)
}

/// Copies `x[src_row[r]]` into row `r` of `out` for every row (rows of `hidden` floats).
fn gather_rows(x: &[f32], hidden: usize, src_row: &[u32], out: &mut [f32]) {
    let copy = |(o, &t): (&mut [f32], &u32)| {
        let t = t as usize;
        o.copy_from_slice(&x[t * hidden..(t + 1) * hidden]);
    };
    let per = rows_per_task(hidden);
    if src_row.len() <= per {
        out.chunks_exact_mut(hidden).zip(src_row).for_each(copy);
    } else {
        out.par_chunks_exact_mut(hidden).zip(src_row.par_iter()).with_min_len(per).for_each(copy);
    }
}

/// Permutes `x` `[tokens, hidden]` into expert order, `out` `[pairs, hidden]`: row `s` of
/// `out` is `x[token_of_slot[s]]`. Parallel over rows; each row is one memcpy.
pub fn permute(plan: &DispatchPlan, hidden: usize, x: &[f32], out: &mut [f32]) -> Result<()> {
    check_permute(plan, hidden, x, out, plan.rows())?;
    gather_rows(x, hidden, &plan.token_of_slot, out);
    Ok(())
}

/// Expert order back to pair order without weights: `out[p] = y[slot_of[p]]`, both
/// `[pairs, hidden]` (the return trip of expert parallelism, see [`crate::a2a`]).
pub fn gather_pairs(plan: &DispatchPlan, hidden: usize, y: &[f32], out: &mut [f32]) -> Result<()> {
    check_hidden(hidden)?;
    let rows = checked_mul(OP, "y", plan.rows(), hidden)?;
    check_len(OP, "y", y.len(), rows)?;
    check_len(OP, "out", out.len(), rows)?;
    gather_rows(y, hidden, &plan.slot_of, out);
    Ok(())
}

crate::cpu::dispatch! { fn axpy(o: &mut [f32], w: f32, y: &[f32]) = axpy_body; }

#[inline(always)]
fn axpy_body(o: &mut [f32], w: f32, y: &[f32]) {
    for (o, &v) in o.iter_mut().zip(y) {
        *o += w * v;
    }
}

/// `out[t] = Σ_j weights[t, j] · y[row_of(t * k + j)]`, starting from 0, ascending j.
fn weighted_combine(y: &[f32], hidden: usize, k: usize, weights: &[f32], row_of: &(impl Fn(usize) -> usize + Sync), out: &mut [f32]) {
    // Column blocks of 1 KiB: the accumulator stays in L1 while the k source rows stream in
    // together (k concurrent streams keep more memory requests in flight). Per element the
    // order is still 0, then j = 0, 1, ..., k-1.
    const BLOCK: usize = 256;
    let one = |(t, o): (usize, &mut [f32])| {
        for (b, ob) in o.chunks_mut(BLOCK).enumerate() {
            ob.fill(0.0);
            let c0 = b * BLOCK;
            for j in 0..k {
                let r = row_of(t * k + j);
                axpy(ob, weights[t * k + j], &y[r * hidden + c0..r * hidden + c0 + ob.len()]);
            }
        }
    };
    let per = (rows_per_task(hidden) / k).max(1);
    if out.len() <= per * hidden {
        out.chunks_exact_mut(hidden).enumerate().for_each(one);
    } else {
        out.par_chunks_exact_mut(hidden).enumerate().with_min_len(per).for_each(one);
    }
}

/// Weighted un-permute (combine): `y` `[pairs, hidden]` in expert order, `weights`
/// `[tokens, top_k]`, `out` `[tokens, hidden]` = Σ_j w[t, j] · y[slot_of[t, j]].
/// Parallel over tokens.
pub fn unpermute(plan: &DispatchPlan, hidden: usize, y: &[f32], weights: &[f32], out: &mut [f32]) -> Result<()> {
    check_combine(plan, hidden, y, plan.rows(), weights, out)?;
    let slot_of = &plan.slot_of;
    weighted_combine(y, hidden, plan.shape.top_k, weights, &|p| slot_of[p] as usize, out);
    Ok(())
}

/// Permutes into the masked layout, `out` `[n_experts * capacity, hidden]` (see the module
/// docs; rows past an expert's count are zeroed). The per-expert counts to pass with it are
/// [`DispatchPlan::counts`]. An expert with more than `capacity` rows is an error (no
/// silent dropping).
pub fn permute_masked(plan: &DispatchPlan, hidden: usize, capacity: usize, x: &[f32], out: &mut [f32]) -> Result<()> {
    check_capacity(plan, capacity)?;
    check_permute(plan, hidden, x, out, plan.shape.n_experts * capacity)?;
    if capacity == 0 {
        return Ok(()); // no rows at all (every count is 0)
    }
    let one = |(e, o): (usize, &mut [f32])| {
        let (lo, hi) = (plan.offsets[e] as usize, plan.offsets[e + 1] as usize);
        let (used, rest) = o.split_at_mut((hi - lo) * hidden);
        for (row, &t) in used.chunks_exact_mut(hidden).zip(&plan.token_of_slot[lo..hi]) {
            let t = t as usize;
            row.copy_from_slice(&x[t * hidden..(t + 1) * hidden]);
        }
        rest.fill(0.0);
    };
    if out.len() <= 16384 {
        out.chunks_exact_mut(capacity * hidden).enumerate().for_each(one);
    } else {
        out.par_chunks_exact_mut(capacity * hidden).enumerate().for_each(one);
    }
    Ok(())
}

/// Combine from the masked layout: `y` `[n_experts * capacity, hidden]`, `weights`
/// `[tokens, top_k]`, `out` `[tokens, hidden]`. Same accumulation order as [`unpermute`].
pub fn unpermute_masked(plan: &DispatchPlan, hidden: usize, capacity: usize, y: &[f32], weights: &[f32], out: &mut [f32]) -> Result<()> {
    check_capacity(plan, capacity)?;
    check_combine(plan, hidden, y, plan.shape.n_experts * capacity, weights, out)?;
    let rows = plan.masked_rows(capacity)?;
    weighted_combine(y, hidden, plan.shape.top_k, weights, &|p| rows[p], out);
    Ok(())
}
