//! The MoE layer on a backend (docs/model.md §3.9):
//!
//! ```text
//! logits  = x · W_gateᵀ                  bf16 weight, f32 activations and accumulation
//! ids, w  = route(logits, bias)          noaux_tc / softmax greedy / group-limited greedy
//! plan    = dispatch_plan(ids)           pairs (t, j) ordered by expert, then (t, j)
//! xp      = permute(x)                   one row per pair, expert order
//! h       = silu(xp · W_gate,eᵀ) ⊙ (xp · W_up,eᵀ)      grouped GEMMs, contiguous or masked
//! yp      = h · W_down,eᵀ
//! y[t]    = Σ_j w[t, j] · yp[slot(t, j)]  ascending j, from 0 (unpermute)
//! y      += shared(x)                    fused shared experts, weight 1
//! ```
//!
//! Expert parallelism replaces the middle (from the plan to the combine) with a dispatch
//! all-to-all, the experts of this rank, and a combine all-to-all ([`crate::ep`]).

use crate::config::MoeConfig;
use crate::error::{Result, config, input, mul, weight};
use crate::mlp::DenseMlp;
use crate::stats::LoadStats;
use crate::weights::MoeWeights;
use dsv3_kernels::a2a::EpLayout;
use dsv3_kernels::backend::Backend;
use dsv3_kernels::gemm::GemmShape;
use dsv3_kernels::norm::RowsShape;
use dsv3_kernels::permute::PlanShape;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

/// The routing of one batch, resident on the backend: `ids` and `weights` are
/// `[tokens, top_k]` (global expert ids; combine weights).
#[derive(Debug)]
pub struct Routing<B: Backend> {
    pub tokens: usize,
    pub ids: B::Buf<u32>,
    pub weights: B::Buf<f32>,
}

/// A forward pass's result: `y` `[tokens, hidden]` and the batch's expert load.
#[derive(Debug)]
pub struct MoeOutput<B: Backend> {
    pub y: B::Buf<f32>,
    pub stats: LoadStats,
}

/// The routed experts one layer (or one expert-parallel rank) holds: global ids `range`,
/// each pointing (`slot`) at one of the `distinct` uploaded weight sets.
#[derive(Debug)]
struct ExpertSet<B: Backend> {
    range: Range<usize>,
    gate: Vec<B::Weight>,
    up: Vec<B::Weight>,
    down: Vec<B::Weight>,
    slot: Vec<usize>,
}

impl<B: Backend> ExpertSet<B> {
    /// Uploads experts `range` of `w`, each distinct `Arc` once, each projection's experts in
    /// one [`Backend::upload_weights`] call (on the GPU: one stack, so the grouped GEMMs over
    /// them can run as one launch of the sm90 kernel).
    fn upload(b: &B, cfg: &MoeConfig, w: &MoeWeights, range: Range<usize>) -> Result<ExpertSet<B>> {
        let mut distinct = Vec::new();
        let mut slot = Vec::with_capacity(range.len());
        let mut seen: HashMap<usize, usize> = HashMap::new();
        for e in range.clone() {
            let ew = w.expert(e).ok_or_else(|| weight(format!("mlp.experts.{e}"), "not held by these weights"))?;
            let s = *seen.entry(Arc::as_ptr(ew) as usize).or_insert_with(|| {
                distinct.push(ew);
                distinct.len() - 1
            });
            slot.push(s);
        }
        // At the inner width (zero-padded K on the fp8 path; see DenseMlpConfig::inner).
        let distinct = distinct.iter().map(|ew| ew.at_inner_width(&cfg.expert_mlp())).collect::<Result<Vec<_>>>()?;
        let gate: Vec<_> = distinct.iter().map(|ew| ew.gate().view()).collect();
        let up: Vec<_> = distinct.iter().map(|ew| ew.up().view()).collect();
        let down: Vec<_> = distinct.iter().map(|ew| ew.down().view()).collect();
        Ok(ExpertSet { range, gate: b.upload_weights(&gate)?, up: b.upload_weights(&up)?, down: b.upload_weights(&down)?, slot })
    }

    /// Per local expert, its weight of one projection.
    fn refs<'a>(&'a self, proj: &'a [B::Weight]) -> Vec<&'a B::Weight> {
        self.slot.iter().map(|&s| &proj[s]).collect()
    }
}

/// One MoE layer resident on backend `B`: router, correction bias, shared experts, and the
/// routed experts it owns (all of them, or one expert-parallel rank's share).
#[derive(Debug)]
pub struct MoeLayer<B: Backend> {
    cfg: MoeConfig,
    ep: EpLayout,
    rank: usize,
    router: B::DenseWeight,
    bias: Option<B::Buf<f32>>,
    shared: Option<DenseMlp<B>>,
    experts: ExpertSet<B>,
}

impl<B: Backend> MoeLayer<B> {
    /// A single-rank layer holding every expert. `w` must hold all experts.
    pub fn new(b: &B, cfg: MoeConfig, w: &MoeWeights) -> Result<MoeLayer<B>> {
        Self::new_rank(b, cfg, w, EpLayout { n_ranks: 1, n_experts: cfg.n_routed_experts }, 0)
    }

    /// Rank `rank` of an expert-parallel group: uploads the router, bias and shared experts
    /// (replicated) and experts `layout.local_experts(rank)`, which `w` must hold (it may
    /// hold more).
    pub fn new_rank(b: &B, cfg: MoeConfig, w: &MoeWeights, layout: EpLayout, rank: usize) -> Result<MoeLayer<B>> {
        cfg.validate()?;
        if layout.n_experts != cfg.n_routed_experts {
            return Err(config(
                "n_routed_experts",
                format!("= {} but the EP layout has {} experts", cfg.n_routed_experts, layout.n_experts),
            ));
        }
        layout.validate().map_err(|e| config("n_ranks", e.to_string()))?;
        if rank >= layout.n_ranks {
            return Err(input("rank", format!("{rank} >= n_ranks = {}", layout.n_ranks)));
        }
        // The weights may have been built for another config.
        w.check(&cfg, "mlp")?;
        let range = layout.local_experts(rank);
        let have = w.expert_range();
        if range.start < have.start || range.end > have.end {
            return Err(weight("mlp.experts", format!("rank {rank} needs experts {range:?}, the weights hold {have:?}")));
        }
        Ok(MoeLayer {
            cfg,
            ep: layout,
            rank,
            router: b.upload_dense_weight(w.router().view())?,
            bias: w.bias().map(|v| b.upload(v)).transpose()?,
            shared: match (cfg.shared_mlp(), w.shared()) {
                (Some(c), Some(s)) => Some(DenseMlp::with_prefix(b, c, s, "mlp.shared_experts")?),
                _ => None,
            },
            experts: ExpertSet::upload(b, &cfg, w, range)?,
        })
    }

    pub fn config(&self) -> &MoeConfig {
        &self.cfg
    }
    pub fn ep_layout(&self) -> EpLayout {
        self.ep
    }
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// Global ids of the routed experts this layer runs.
    pub fn local_experts(&self) -> Range<usize> {
        self.experts.range.clone()
    }
    /// Distinct expert weight sets uploaded (fewer than the experts when weights share).
    pub fn distinct_experts(&self) -> usize {
        self.experts.gate.len()
    }

    pub(crate) fn check_x(&self, b: &B, x: &B::Buf<f32>, tokens: usize) -> Result<()> {
        let want = mul("x", tokens, self.cfg.hidden)?;
        if b.len(x) != want {
            return Err(input("x", format!("has {} elements, expected tokens {tokens} x hidden {} = {want}", b.len(x), self.cfg.hidden)));
        }
        // The permuted buffers: one row of max(hidden, moe_intermediate) per (token, j) pair.
        let pairs = mul("x", tokens, self.cfg.route.top_k)?;
        mul("x", pairs, self.cfg.hidden.max(self.cfg.expert_mlp().inner())).map(|_| ())
    }

    /// The router: f32 logits of the bf16 gate weight, then top-k routing.
    pub fn route(&self, b: &B, x: &B::Buf<f32>, tokens: usize) -> Result<Routing<B>> {
        self.check_x(b, x, tokens)?;
        let (n, k) = (self.cfg.n_routed_experts, self.cfg.route.top_k);
        let mut logits = b.zeros::<f32>(mul("logits", tokens, n)?)?;
        b.gemm_dense(x, &self.router, GemmShape { m: tokens, n, k: self.cfg.hidden }, &mut logits)?;
        let (mut ids, mut weights) = (b.zeros::<u32>(tokens * k)?, b.zeros::<f32>(tokens * k)?);
        b.route(&self.cfg.route, tokens, &logits, self.bias.as_ref(), &mut ids, &mut weights)?;
        Ok(Routing { tokens, ids, weights })
    }

    /// The whole layer on one rank (router, routed experts, shared experts): `x`
    /// `[tokens, hidden]` → `y` `[tokens, hidden]` and the batch's expert load.
    pub fn forward(&self, b: &B, x: &B::Buf<f32>, tokens: usize) -> Result<MoeOutput<B>> {
        let routing = self.route(b, x, tokens)?;
        self.forward_routed(b, x, &routing)
    }

    /// [`MoeLayer::forward`] without the load statistics, and nothing read back to the host:
    /// the dispatch plan stays on the backend and the grouped GEMMs take it as it is
    /// ([`Backend::grouped_gemm_planned`]). What a model step runs (a decode step can then be
    /// captured and replayed as a graph). The same values as [`MoeLayer::forward`]'s `y`.
    /// Single rank; the masked layout (re-laid out through the host) goes through
    /// [`MoeLayer::forward`].
    pub fn forward_y(&self, b: &B, x: &B::Buf<f32>, tokens: usize) -> Result<B::Buf<f32>> {
        if self.ep.n_ranks != 1 {
            return Err(input("rank", format!("this layer is rank {} of {}; use forward_ep", self.rank, self.ep.n_ranks)));
        }
        if self.cfg.layout.is_masked(tokens) {
            return Ok(self.forward(b, x, tokens)?.y);
        }
        let routing = self.route(b, x, tokens)?;
        let (n, k, h, inter, path) =
            (self.cfg.n_routed_experts, self.cfg.route.top_k, self.cfg.hidden, self.cfg.expert_mlp().inner(), self.cfg.gemm_path);
        let pairs = tokens * k;
        let mut y = b.zeros::<f32>(tokens * h)?;
        if pairs > 0 {
            let plan = b.dispatch_plan(PlanShape { tokens, top_k: k, n_experts: n }, &routing.ids)?;
            let mut xp = b.zeros::<f32>(pairs * h)?;
            b.permute(&plan, h, x, &mut xp)?;
            let (gate, up, down) =
                (self.experts.refs(&self.experts.gate), self.experts.refs(&self.experts.up), self.experts.refs(&self.experts.down));
            let (mut g, mut u, mut a) = (b.zeros::<f32>(pairs * inter)?, b.zeros::<f32>(pairs * inter)?, b.zeros::<f32>(pairs * inter)?);
            b.grouped_gemm_planned_pair(&xp, &plan, [&gate, &up], path, [&mut g, &mut u])?;
            b.silu_mul(&g, &u, RowsShape { rows: pairs, cols: inter }, &mut a)?;
            let mut yp = b.zeros::<f32>(pairs * h)?;
            b.grouped_gemm_planned(&a, &plan, &down, path, &mut yp)?;
            b.unpermute(&plan, h, &yp, &routing.weights, &mut y)?;
        }
        self.add_shared(b, x, tokens, &mut y)?;
        Ok(y)
    }

    /// [`MoeLayer::forward`] on host memory: uploads `x`, runs the layer and downloads `y`
    /// (on the CPU backend, two copies: small next to the layer's GEMMs).
    pub fn forward_host(&self, b: &B, x: &[f32], tokens: usize) -> Result<(Vec<f32>, LoadStats)> {
        let out = self.forward(b, &b.upload(x)?, tokens)?;
        Ok((b.download(&out.y)?, out.stats))
    }

    /// The layer with a given routing (ids `< n_routed_experts`, else a typed error naming the
    /// token). Single rank only: the layer must hold every expert.
    pub fn forward_routed(&self, b: &B, x: &B::Buf<f32>, routing: &Routing<B>) -> Result<MoeOutput<B>> {
        if self.ep.n_ranks != 1 {
            return Err(input("rank", format!("this layer is rank {} of {}; use forward_ep", self.rank, self.ep.n_ranks)));
        }
        let tokens = routing.tokens;
        self.check_x(b, x, tokens)?;
        let (n, k, h) = (self.cfg.n_routed_experts, self.cfg.route.top_k, self.cfg.hidden);
        let pairs = tokens * k;
        if b.len(&routing.ids) != pairs || b.len(&routing.weights) != pairs {
            return Err(input(
                "routing",
                format!("ids / weights have {} / {} entries, expected {tokens} x top_k {k}", b.len(&routing.ids), b.len(&routing.weights)),
            ));
        }
        let plan = b.dispatch_plan(PlanShape { tokens, top_k: k, n_experts: n }, &routing.ids)?;
        let offsets = b.plan_offsets(&plan)?;
        let host_offsets = b.download(&offsets)?;
        let stats = stats_from_offsets(&host_offsets, tokens, k, 1)?;
        let mut xp = b.zeros::<f32>(pairs * h)?;
        b.permute(&plan, h, x, &mut xp)?;
        let yp = self.run_experts(b, &xp, &offsets, &host_offsets, tokens)?;
        let mut y = b.zeros::<f32>(tokens * h)?;
        b.unpermute(&plan, h, &yp, &routing.weights, &mut y)?;
        self.add_shared(b, x, tokens, &mut y)?;
        Ok(MoeOutput { y, stats })
    }

    /// `y += shared_experts(x)` (no-op without shared experts).
    pub(crate) fn add_shared(&self, b: &B, x: &B::Buf<f32>, tokens: usize, y: &mut B::Buf<f32>) -> Result<()> {
        if let Some(s) = &self.shared {
            let z = s.forward(b, x, tokens)?;
            b.add_assign(y, &z)?;
        }
        Ok(())
    }

    /// The local experts on rows in contiguous expert order: `xp` `[rows, hidden]` with local
    /// expert `i` at rows `offsets[i]..offsets[i+1]` (`offsets` on the backend, `host_offsets`
    /// the same on the host). Returns `[rows, hidden]` in the same order. `tokens` picks the
    /// layout ([`crate::GroupedLayout::is_masked`]).
    pub(crate) fn run_experts(
        &self,
        b: &B,
        xp: &B::Buf<f32>,
        offsets: &B::Buf<u32>,
        host_offsets: &[u32],
        tokens: usize,
    ) -> Result<B::Buf<f32>> {
        let (h, inter, path) = (self.cfg.hidden, self.cfg.expert_mlp().inner(), self.cfg.gemm_path);
        let local = self.experts.slot.len();
        if host_offsets.len() != local + 1 {
            return Err(input("offsets", format!("{} entries for {local} local experts", host_offsets.len())));
        }
        let rows = host_offsets[local] as usize;
        if rows == 0 {
            return Ok(b.zeros::<f32>(0)?);
        }
        let (gate, up, down) =
            (self.experts.refs(&self.experts.gate), self.experts.refs(&self.experts.up), self.experts.refs(&self.experts.down));
        if !self.cfg.layout.is_masked(tokens) {
            let (mut g, mut u, mut a) = (b.zeros::<f32>(rows * inter)?, b.zeros::<f32>(rows * inter)?, b.zeros::<f32>(rows * inter)?);
            b.grouped_gemm_contiguous(xp, offsets, &gate, path, &mut g)?;
            b.grouped_gemm_contiguous(xp, offsets, &up, path, &mut u)?;
            b.silu_mul(&g, &u, RowsShape { rows, cols: inter }, &mut a)?;
            let mut y = b.zeros::<f32>(rows * h)?;
            b.grouped_gemm_contiguous(&a, offsets, &down, path, &mut y)?;
            return Ok(y);
        }
        // Masked: every expert gets `cap` rows (the largest count); rows past an expert's
        // count are zero on input and written as zero by the GEMMs (silu(0)·0 = 0 between).
        let counts: Vec<u32> = host_offsets.windows(2).map(|w| w[1] - w[0]).collect();
        let cap = counts.iter().copied().max().unwrap_or(0) as usize;
        let mrows = mul("masked rows", local, cap)?;
        mul("masked rows", mrows, inter.max(h))?;
        let xm = to_masked(b, xp, host_offsets, cap, h)?;
        let counts_buf = b.upload(&counts)?;
        let (mut g, mut u, mut a) = (b.zeros::<f32>(mrows * inter)?, b.zeros::<f32>(mrows * inter)?, b.zeros::<f32>(mrows * inter)?);
        b.grouped_gemm_masked(&xm, &counts_buf, cap, &gate, path, &mut g)?;
        b.grouped_gemm_masked(&xm, &counts_buf, cap, &up, path, &mut u)?;
        b.silu_mul(&g, &u, RowsShape { rows: mrows, cols: inter }, &mut a)?;
        let mut ym = b.zeros::<f32>(mrows * h)?;
        b.grouped_gemm_masked(&a, &counts_buf, cap, &down, path, &mut ym)?;
        from_masked(b, &ym, host_offsets, cap, h)
    }
}

/// Load statistics from a plan's offsets (`n_experts + 1` entries).
pub(crate) fn stats_from_offsets(offsets: &[u32], tokens: usize, top_k: usize, n_ranks: usize) -> Result<LoadStats> {
    let counts = offsets.windows(2).map(|w| u64::from(w[1].saturating_sub(w[0]))).collect();
    LoadStats::from_counts(tokens, top_k, counts, n_ranks)
}

// The Backend trait has no masked permute / un-permute yet, so the re-layout between the
// contiguous rows the plan gives and the masked `[experts, cap, width]` layout is staged
// through the host (download, block copies, upload). On the CPU backend that is two copies;
// a `permute_masked` / `unpermute_masked` op would do it on the device.

/// Contiguous `[rows, width]` → masked `[experts, cap, width]` (padding rows zero).
fn to_masked<B: Backend>(b: &B, xs: &B::Buf<f32>, offsets: &[u32], cap: usize, width: usize) -> Result<B::Buf<f32>> {
    let host = b.download(xs)?;
    check_rows("xp", &host, offsets, width)?;
    let experts = offsets.len().saturating_sub(1);
    let mut m = vec![0f32; mul("masked rows", experts * cap, width)?];
    for (e, w) in offsets.windows(2).enumerate() {
        let (r0, r1) = (w[0] as usize, w[1] as usize);
        m[e * cap * width..(e * cap + r1 - r0) * width].copy_from_slice(&host[r0 * width..r1 * width]);
    }
    Ok(b.upload(&m)?)
}

/// Masked `[experts, cap, width]` → contiguous `[rows, width]` (the live rows, in order).
fn from_masked<B: Backend>(b: &B, ym: &B::Buf<f32>, offsets: &[u32], cap: usize, width: usize) -> Result<B::Buf<f32>> {
    let host = b.download(ym)?;
    let rows = offsets.last().copied().unwrap_or(0) as usize;
    if host.len() != (offsets.len().saturating_sub(1)) * cap * width {
        return Err(input(
            "masked rows",
            format!("{} values, expected {} experts x {cap} x {width}", host.len(), offsets.len().saturating_sub(1)),
        ));
    }
    let mut y = vec![0f32; rows * width];
    for (e, w) in offsets.windows(2).enumerate() {
        let (r0, r1) = (w[0] as usize, w[1] as usize);
        y[r0 * width..r1 * width].copy_from_slice(&host[e * cap * width..(e * cap + r1 - r0) * width]);
    }
    Ok(b.upload(&y)?)
}

/// Checks that `host` holds the `offsets.last()` rows of `width` the offsets describe and
/// that the offsets start at 0 and never decrease.
fn check_rows(what: &'static str, host: &[f32], offsets: &[u32], width: usize) -> Result<()> {
    let rows = offsets.last().copied().unwrap_or(0) as usize;
    if offsets.first() != Some(&0) || offsets.windows(2).any(|w| w[1] < w[0]) || host.len() != rows * width {
        return Err(input(what, format!("{} values do not match offsets ending at {rows} rows of {width}", host.len())));
    }
    Ok(())
}
