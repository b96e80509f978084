//! All-to-all packing for expert parallelism (EP): data movement only, no expert math.
//!
//! `R` ranks; rank `r` owns the contiguous experts `r * E/R .. (r+1) * E/R` ([`EpLayout`]).
//! One MoE layer is four steps per rank, with two all-to-alls between them:
//!
//! 1. [`pack`]: the local tokens' `(token, j)` pairs, ordered by **destination rank, then
//!    (token, j) ascending**, become a [`DispatchBuf`] (rows, global expert ids, weights,
//!    source slots `t * top_k + j`, `counts[R]`, `displs[R]`). The returned [`Packed`] also
//!    keeps the plan the combine needs. There is one row per pair: a token routed to two
//!    experts of one rank is sent twice (no per-rank de-duplication).
//! 2. Dispatch all-to-all ([`exchange_dispatch`] in process).
//! 3. [`unpack`]: received rows, in source-rank order, are permuted into local-expert order
//!    ([`Unpacked::input`], ranges [`Unpacked::plan`]`.offsets()`); the experts run; then
//!    [`Unpacked::pack_return`] puts their outputs back into received order as a
//!    [`CombineBuf`].
//! 4. Combine all-to-all ([`exchange_combine`]), then [`combine`] on the source rank:
//!    `out[t] = Σ_j w[t, j] · y(t, j)` in ascending `j`, exactly [`crate::permute::unpermute`],
//!    so an N-rank run equals a one-rank run bit for bit.
//!
//! # Counts and displacements (what an NCCL implementation must honour)
//!
//! All counts and displacements are in **rows**; multiply by the row size (`hidden`
//! elements for activations, 1 for each metadata array) for element counts or bytes.
//!
//! * Sender: `send.counts[d]` rows for rank `d` start at row `send.displs[d]`; `displs` is
//!   the exclusive prefix sum of `counts` over `d = 0..R` (segments are contiguous, in rank
//!   order, including the segment a rank sends to itself).
//! * Before the data moves, ranks swap counts (an all-to-all of one u32 per peer): on rank
//!   `d`, `recv.counts[s] = send.counts[d]` of rank `s`, and `recv.displs` is the exclusive
//!   prefix sum of `recv.counts` over `s = 0..R`.
//! * Data: within one `ncclGroupStart/End`, for every peer `p`:
//!   `ncclSend(rows + send.displs[p] * hidden, send.counts[p] * hidden, p)` and
//!   `ncclRecv(recv_rows + recv.displs[p] * hidden, recv.counts[p] * hidden, p)`; the same
//!   with element size 1 for `expert`, `weight` and `src_slot`. Rows from one source must land
//!   contiguous and **in the sender's order**.
//! * Return trip: rank `d` sends back segment `s` of its received layout (same counts, same
//!   displs, same row order) to rank `s`; rank `s` receives from `d` at its own
//!   `send.displs[d]`, so the returned buffer is the sender's packed layout row for row.

use crate::error::{Result, check_len, checked_mul, invalid, shape_err};
use crate::permute::{self, DispatchPlan, PlanShape};
use std::ops::Range;

const OP: &str = "a2a";

/// How experts are spread over ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpLayout {
    /// Expert-parallel ranks (>= 1).
    pub n_ranks: usize,
    /// Routed experts in all (a multiple of `n_ranks`).
    pub n_experts: usize,
}

impl EpLayout {
    /// Checks `n_ranks >= 1`, `n_experts >= 1`, `n_experts % n_ranks == 0`, and that both fit
    /// in u32.
    pub fn validate(&self) -> Result<()> {
        if self.n_ranks == 0 || self.n_experts == 0 || !self.n_experts.is_multiple_of(self.n_ranks) {
            return Err(shape_err(OP, format!("n_experts = {} must be a positive multiple of n_ranks = {}", self.n_experts, self.n_ranks)));
        }
        if self.n_experts > u32::MAX as usize {
            return Err(shape_err(OP, "n_experts must fit in u32"));
        }
        Ok(())
    }
    /// Experts per rank.
    pub fn experts_per_rank(&self) -> usize {
        self.n_experts / self.n_ranks.max(1)
    }
    /// The rank owning expert `e` (for `e < n_experts`).
    pub fn owner(&self, e: usize) -> usize {
        e / self.experts_per_rank().max(1)
    }
    /// The global expert ids rank `r` owns.
    pub fn local_experts(&self, r: usize) -> Range<usize> {
        let m = self.experts_per_rank();
        r * m..(r + 1) * m
    }
}

/// Sizes of one rank's local batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchShape {
    /// Tokens on this rank (may be 0).
    pub tokens: usize,
    /// Experts per token (>= 1).
    pub top_k: usize,
    /// Row width (>= 1).
    pub hidden: usize,
}

impl BatchShape {
    /// Checks `top_k >= 1`, `hidden >= 1`, and that the buffer sizes do not overflow.
    pub fn validate(&self) -> Result<()> {
        if self.top_k == 0 || self.hidden == 0 {
            return Err(shape_err(OP, "top_k and hidden must be >= 1"));
        }
        let pairs = checked_mul(OP, "pairs", self.tokens, self.top_k)?;
        checked_mul(OP, "rows", pairs, self.hidden)?;
        Ok(())
    }
}

/// Rows on the dispatch path: what a rank sends (ordered by destination) or receives
/// (ordered by source). `counts` / `displs` are per peer rank, in rows.
#[derive(Debug, Clone, PartialEq)]
pub struct DispatchBuf {
    /// Row width.
    pub hidden: usize,
    /// `[len, hidden]` activations.
    pub rows: Vec<f32>,
    /// `[len]` global expert id of each row.
    pub expert: Vec<u32>,
    /// `[len]` routing weight of each row (carried for receivers that combine themselves; the
    /// in-process [`combine`] applies weights on the source rank).
    pub weight: Vec<f32>,
    /// `[len]` pair index `t * top_k + j` on the rank that sent the row.
    pub src_slot: Vec<u32>,
    /// `[R]` rows to (send) or from (receive) each rank.
    pub counts: Vec<u32>,
    /// `[R]` first row of each rank's segment: exclusive prefix sum of `counts`.
    pub displs: Vec<u32>,
}

/// Rows on the combine path (expert outputs), same count/displacement rules.
#[derive(Debug, Clone, PartialEq)]
pub struct CombineBuf {
    /// Row width.
    pub hidden: usize,
    /// `[len, hidden]` expert outputs.
    pub rows: Vec<f32>,
    /// `[R]` rows to / from each rank.
    pub counts: Vec<u32>,
    /// `[R]` exclusive prefix sum of `counts`.
    pub displs: Vec<u32>,
}

/// Checks counts/displs of a buffer of `len` rows with `n_ranks` peers and `hidden` width
/// (the CPU and the CUDA packing alike); returns the number of rows.
pub(crate) fn check_segments(
    what: &'static str,
    n_ranks: usize,
    hidden: usize,
    rows: usize,
    counts: &[u32],
    displs: &[u32],
) -> Result<usize> {
    if hidden == 0 {
        return Err(shape_err(OP, format!("{what}: hidden must be >= 1")));
    }
    check_len(OP, "counts", counts.len(), n_ranks)?;
    check_len(OP, "displs", displs.len(), n_ranks)?;
    let mut acc = 0usize;
    for (r, (&c, &d)) in counts.iter().zip(displs).enumerate() {
        if d as usize != acc {
            return Err(invalid(OP, "displs", format!("{what}: displs[{r}] = {d}, expected the prefix sum {acc}")));
        }
        acc += c as usize;
    }
    check_len(OP, "rows", rows, checked_mul(OP, "rows", acc, hidden)?)?;
    Ok(acc)
}

impl DispatchBuf {
    /// Rows in the buffer.
    pub fn len(&self) -> usize {
        self.expert.len()
    }
    /// Whether the buffer has no rows.
    pub fn is_empty(&self) -> bool {
        self.expert.is_empty()
    }
    /// Checks that counts/displs describe `n_ranks` contiguous segments covering every row and
    /// that all arrays have matching lengths.
    pub fn validate(&self, n_ranks: usize) -> Result<()> {
        let n = check_segments("dispatch", n_ranks, self.hidden, self.rows.len(), &self.counts, &self.displs)?;
        check_len(OP, "expert", self.expert.len(), n)?;
        check_len(OP, "weight", self.weight.len(), n)?;
        check_len(OP, "src_slot", self.src_slot.len(), n)
    }
}

impl CombineBuf {
    /// Checks counts/displs against the rows, as [`DispatchBuf::validate`].
    pub fn validate(&self, n_ranks: usize) -> Result<()> {
        check_segments("combine", n_ranks, self.hidden, self.rows.len(), &self.counts, &self.displs).map(|_| ())
    }
}

/// The sending rank's side of one layer: what to send, and how to combine what comes back.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    /// The send buffer (ordered by destination rank, then (token, j)).
    pub send: DispatchBuf,
    /// Pairs → send rows: a [`DispatchPlan`] whose "experts" are the destination ranks.
    pub plan: DispatchPlan,
}

/// Packs one rank's tokens for the dispatch all-to-all: `x` `[tokens, hidden]`, `topk_ids` /
/// `topk_weights` `[tokens, top_k]` (global expert ids). An id `>= n_experts` is an error
/// naming the token.
pub fn pack(layout: &EpLayout, shape: BatchShape, x: &[f32], topk_ids: &[u32], topk_weights: &[f32]) -> Result<Packed> {
    layout.validate()?;
    shape.validate()?;
    let pairs = shape.tokens * shape.top_k;
    check_len(OP, "x", x.len(), shape.tokens * shape.hidden)?;
    check_len(OP, "topk_ids", topk_ids.len(), pairs)?;
    check_len(OP, "topk_weights", topk_weights.len(), pairs)?;
    if let Some(p) = topk_ids.iter().position(|&e| e as usize >= layout.n_experts) {
        return Err(invalid(
            OP,
            "topk_ids",
            format!("token {}: expert id {} >= n_experts = {}", p / shape.top_k, topk_ids[p], layout.n_experts),
        ));
    }
    let dest: Vec<u32> = topk_ids.iter().map(|&e| layout.owner(e as usize) as u32).collect();
    let plan = DispatchPlan::build(PlanShape { tokens: shape.tokens, top_k: shape.top_k, n_experts: layout.n_ranks }, &dest)?;
    let mut rows = vec![0.0; pairs * shape.hidden];
    permute::permute(&plan, shape.hidden, x, &mut rows)?;
    let src_slot = plan.pair_of_slot().to_vec();
    let send = DispatchBuf {
        hidden: shape.hidden,
        rows,
        expert: src_slot.iter().map(|&p| topk_ids[p as usize]).collect(),
        weight: src_slot.iter().map(|&p| topk_weights[p as usize]).collect(),
        src_slot,
        counts: plan.counts().to_vec(),
        displs: plan.offsets()[..layout.n_ranks].to_vec(),
    };
    Ok(Packed { send, plan })
}

/// For each destination `d`, where its segment from each source `s` lies: the transpose
/// `recv[d].segment(s) = send[s].segment(d)` shared by both directions. Returns, per
/// destination, `(counts, displs, [(source, first row, rows)])`.
/// The segments must already be validated (`R` entries each).
#[allow(clippy::type_complexity)]
fn transpose(segs: &[(&[u32], &[u32])]) -> Result<Vec<(Vec<u32>, Vec<u32>, Vec<(usize, usize, usize)>)>> {
    let n = segs.len();
    (0..n)
        .map(|d| {
            let counts: Vec<u32> = segs.iter().map(|(c, _)| c[d]).collect();
            let mut displs = Vec::with_capacity(n);
            let mut acc = 0u32;
            for &c in &counts {
                displs.push(acc);
                acc = acc.checked_add(c).ok_or_else(|| shape_err(OP, format!("rank {d} would receive more than u32::MAX rows")))?;
            }
            let parts = segs.iter().enumerate().map(|(s, (c, dp))| (s, dp[d] as usize, c[d] as usize)).collect();
            Ok((counts, displs, parts))
        })
        .collect()
}

/// Checks that all ranks agree on the row width and returns it.
fn common_hidden(hidden: impl Iterator<Item = usize>) -> Result<usize> {
    let mut all = hidden;
    let h = all.next().ok_or_else(|| shape_err(OP, "exchange needs at least one rank"))?;
    if all.any(|x| x != h) {
        return Err(shape_err(OP, "ranks disagree on hidden"));
    }
    Ok(h)
}

/// The in-process dispatch all-to-all: `send[s]` is rank `s`'s [`Packed::send`]; returns
/// each rank's received buffer (segments in source-rank order, counts/displs per source).
/// Follows the count/displacement rules in the module docs.
pub fn exchange_dispatch(send: &[DispatchBuf]) -> Result<Vec<DispatchBuf>> {
    let h = common_hidden(send.iter().map(|b| b.hidden))?;
    for b in send {
        b.validate(send.len())?;
    }
    let segs: Vec<(&[u32], &[u32])> = send.iter().map(|b| (&b.counts[..], &b.displs[..])).collect();
    let recv = transpose(&segs)?
        .into_iter()
        .map(|(counts, displs, parts)| {
            let mut b = DispatchBuf { hidden: h, rows: vec![], expert: vec![], weight: vec![], src_slot: vec![], counts, displs };
            for (s, lo, n) in parts {
                let src = &send[s];
                b.rows.extend_from_slice(&src.rows[lo * h..(lo + n) * h]);
                b.expert.extend_from_slice(&src.expert[lo..lo + n]);
                b.weight.extend_from_slice(&src.weight[lo..lo + n]);
                b.src_slot.extend_from_slice(&src.src_slot[lo..lo + n]);
            }
            b
        })
        .collect();
    Ok(recv)
}

/// The in-process combine all-to-all: `ret[d]` is rank `d`'s [`Unpacked::pack_return`];
/// returns, for each source rank, its rows back in its own packed layout.
pub fn exchange_combine(ret: &[CombineBuf]) -> Result<Vec<CombineBuf>> {
    let h = common_hidden(ret.iter().map(|b| b.hidden))?;
    for b in ret {
        b.validate(ret.len())?;
    }
    let segs: Vec<(&[u32], &[u32])> = ret.iter().map(|b| (&b.counts[..], &b.displs[..])).collect();
    Ok(transpose(&segs)?
        .into_iter()
        .map(|(counts, displs, parts)| {
            let mut rows = Vec::new();
            for (d, lo, n) in parts {
                rows.extend_from_slice(&ret[d].rows[lo * h..(lo + n) * h]);
            }
            CombineBuf { hidden: h, rows, counts, displs }
        })
        .collect())
}

/// The receiving rank's side: the experts' input and what the return trip needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Unpacked {
    /// Row width.
    pub hidden: usize,
    /// Received rows → local-expert order (a `top_k = 1` plan over the local experts);
    /// `plan.offsets()` gives each local expert's row range in [`Unpacked::input`].
    pub plan: DispatchPlan,
    /// `[len, hidden]` expert inputs, grouped by local expert, stable in received order.
    pub input: Vec<f32>,
    /// `[len]` global expert id of each row of `input`.
    pub expert: Vec<u32>,
    /// `[len]` routing weight of each row of `input`.
    pub weight: Vec<f32>,
    /// Per-source counts of the received buffer (the return trip's send counts).
    pub recv_counts: Vec<u32>,
    /// Per-source displacements of the received buffer.
    pub recv_displs: Vec<u32>,
}

/// Unpacks rank `rank`'s received buffer into local-expert order. A row whose expert this
/// rank does not own is an error naming its source rank and slot.
pub fn unpack(layout: &EpLayout, rank: usize, recv: &DispatchBuf) -> Result<Unpacked> {
    layout.validate()?;
    if rank >= layout.n_ranks {
        return Err(invalid(OP, "rank", format!("{rank} >= n_ranks = {}", layout.n_ranks)));
    }
    recv.validate(layout.n_ranks)?;
    let local = layout.local_experts(rank);
    if let Some(i) = recv.expert.iter().position(|&e| !local.contains(&(e as usize))) {
        let src = recv.displs.iter().rposition(|&d| d as usize <= i).unwrap_or(0);
        return Err(invalid(
            OP,
            "expert",
            format!(
                "row {i} (from rank {src}, slot {}): expert {} is not on rank {rank} (owns {local:?})",
                recv.src_slot[i], recv.expert[i]
            ),
        ));
    }
    let ids: Vec<u32> = recv.expert.iter().map(|&e| e - local.start as u32).collect();
    let plan = DispatchPlan::build(PlanShape { tokens: recv.len(), top_k: 1, n_experts: local.len() }, &ids)?;
    let mut input = vec![0.0; recv.rows.len()];
    permute::permute(&plan, recv.hidden, &recv.rows, &mut input)?;
    let order = plan.pair_of_slot();
    Ok(Unpacked {
        hidden: recv.hidden,
        expert: order.iter().map(|&p| recv.expert[p as usize]).collect(),
        weight: order.iter().map(|&p| recv.weight[p as usize]).collect(),
        plan,
        input,
        recv_counts: recv.counts.clone(),
        recv_displs: recv.displs.clone(),
    })
}

impl Unpacked {
    /// Puts the experts' outputs (`[len, hidden]`, rows in the order of [`Unpacked::input`])
    /// back into received order, ready for the combine all-to-all.
    pub fn pack_return(&self, expert_output: &[f32]) -> Result<CombineBuf> {
        let mut rows = vec![0.0; self.input.len()];
        permute::gather_pairs(&self.plan, self.hidden, expert_output, &mut rows)?;
        Ok(CombineBuf { hidden: self.hidden, rows, counts: self.recv_counts.clone(), displs: self.recv_displs.clone() })
    }
}

/// Combines the returned expert outputs into token order on the source rank:
/// `out[t] = Σ_j topk_weights[t, j] · returned(t, j)`, `out` `[tokens, hidden]`. `returned`
/// must have exactly the layout of `packed.send`.
pub fn combine(packed: &Packed, returned: &CombineBuf, topk_weights: &[f32], out: &mut [f32]) -> Result<()> {
    returned.validate(packed.send.counts.len())?;
    if returned.hidden != packed.send.hidden || returned.counts != packed.send.counts {
        return Err(invalid(OP, "returned", "the returned layout differs from what this rank sent"));
    }
    permute::unpermute(&packed.plan, returned.hidden, &returned.rows, topk_weights, out)
}
