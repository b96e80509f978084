//! Expert and rank load of one routed batch.

use crate::error::{Result, input, mul};
use std::fmt;

/// How one batch loaded the experts: rows (`(token, j)` pairs; a token's `top_k` experts are
/// distinct, so also tokens) per expert and per expert-parallel rank (rank `r` owns experts
/// `r*E/R..(r+1)*E/R`), with max/mean imbalance. Returned by every forward pass; per-rank
/// statistics of one expert-parallel rank cover the tokens that rank routed, and
/// [`LoadStats::merge`] sums them into the whole batch's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadStats {
    tokens: usize,
    top_k: usize,
    per_expert: Vec<u64>,
    per_rank: Vec<u64>,
}

impl LoadStats {
    /// From per-expert row counts; `n_ranks` must divide the number of experts, and the counts
    /// must add up to `tokens * top_k`.
    pub fn from_counts(tokens: usize, top_k: usize, per_expert: Vec<u64>, n_ranks: usize) -> Result<LoadStats> {
        let n = per_expert.len();
        if n == 0 || n_ranks == 0 || !n.is_multiple_of(n_ranks) {
            return Err(input("n_ranks", format!("{n_ranks} ranks cannot own equal shares of {n} experts")));
        }
        let pairs = mul("tokens", tokens, top_k)? as u64;
        let sum: u64 = per_expert.iter().sum();
        if sum != pairs {
            return Err(input("per_expert", format!("counts add up to {sum}, expected tokens {tokens} x top_k {top_k} = {pairs}")));
        }
        let per = n / n_ranks;
        let per_rank = per_expert.chunks(per).map(|c| c.iter().sum()).collect();
        Ok(LoadStats { tokens, top_k, per_expert, per_rank })
    }

    /// From routed ids `[tokens, top_k]`; an id `>= n_experts` is an error naming the token.
    pub fn from_topk_ids(ids: &[u32], tokens: usize, top_k: usize, n_experts: usize, n_ranks: usize) -> Result<LoadStats> {
        let pairs = mul("topk_ids", tokens, top_k)?;
        if ids.len() != pairs {
            return Err(input("topk_ids", format!("has {} entries, expected tokens {tokens} x top_k {top_k} = {pairs}", ids.len())));
        }
        let mut counts = vec![0u64; n_experts];
        for (p, &e) in ids.iter().enumerate() {
            match counts.get_mut(e as usize) {
                Some(c) => *c += 1,
                None => return Err(input("topk_ids", format!("token {}: expert id {e} >= n_experts = {n_experts}", p / top_k.max(1)))),
            }
        }
        Self::from_counts(tokens, top_k, counts, n_ranks)
    }

    /// The statistics of the union of disjoint batches (e.g. the batches of all expert-parallel
    /// ranks): counts and tokens add. All parts must agree on experts, ranks and `top_k`.
    pub fn merge(parts: &[LoadStats]) -> Result<LoadStats> {
        let first = parts.first().ok_or_else(|| input("parts", "nothing to merge"))?;
        let mut per_expert = vec![0u64; first.per_expert.len()];
        let mut tokens = 0usize;
        for p in parts {
            if p.per_expert.len() != per_expert.len() || p.per_rank.len() != first.per_rank.len() || p.top_k != first.top_k {
                return Err(input("parts", "statistics of different layers cannot be merged"));
            }
            tokens = tokens.checked_add(p.tokens).ok_or_else(|| input("parts", "token count overflows"))?;
            per_expert.iter_mut().zip(&p.per_expert).for_each(|(a, b)| *a += b);
        }
        Self::from_counts(tokens, first.top_k, per_expert, first.per_rank.len())
    }

    /// The same batch seen by `n_ranks` expert-parallel ranks.
    pub fn with_ranks(&self, n_ranks: usize) -> Result<LoadStats> {
        Self::from_counts(self.tokens, self.top_k, self.per_expert.clone(), n_ranks)
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }
    pub fn top_k(&self) -> usize {
        self.top_k
    }
    /// `tokens * top_k`: the rows the routed experts process.
    pub fn pairs(&self) -> u64 {
        self.per_expert.iter().sum()
    }
    /// Rows per expert.
    pub fn per_expert(&self) -> &[u64] {
        &self.per_expert
    }
    /// Rows per expert-parallel rank.
    pub fn per_rank(&self) -> &[u64] {
        &self.per_rank
    }
    /// Experts that received at least one row (the expert weights a batch must read).
    pub fn active_experts(&self) -> usize {
        self.per_expert.iter().filter(|&&c| c > 0).count()
    }
    /// The most rows any expert got.
    pub fn max_expert_load(&self) -> u64 {
        self.per_expert.iter().copied().max().unwrap_or(0)
    }
    /// max / mean rows per expert: 1.0 is perfect balance, `n_experts / top_k`-ish means all
    /// tokens chose the same experts. 1.0 for an empty batch.
    pub fn expert_imbalance(&self) -> f64 {
        imbalance(&self.per_expert)
    }
    /// max / mean rows per rank (1.0 for an empty batch or a single rank).
    pub fn rank_imbalance(&self) -> f64 {
        imbalance(&self.per_rank)
    }
}

fn imbalance(v: &[u64]) -> f64 {
    let sum: u64 = v.iter().sum();
    if sum == 0 || v.is_empty() {
        return 1.0;
    }
    let max = v.iter().copied().max().unwrap_or(0) as f64;
    max / (sum as f64 / v.len() as f64)
}

impl fmt::Display for LoadStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} tokens x top-{}: {}/{} experts active, max {} rows/expert, imbalance {:.2} (experts), {:.2} over {} ranks",
            self.tokens,
            self.top_k,
            self.active_experts(),
            self.per_expert.len(),
            self.max_expert_load(),
            self.expert_imbalance(),
            self.rank_imbalance(),
            self.per_rank.len()
        )
    }
}
