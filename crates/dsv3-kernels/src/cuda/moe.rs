//! MoE routing and token permutation on the device: `dsv3_route_noaux_tc` and
//! `dsv3_route_softmax` (every [`RouteMethod`]), `dsv3_dispatch_plan` (the plan built on the
//! device), `dsv3_permute` and `dsv3_unpermute`. All bit-exact with the CPU.

use super::params::*;
use super::{CudaDevice, DeviceBuf, stride_grid, u32_of};
use crate::error::{Result, check_len, checked_mul, invalid, shape_err};
use crate::gating::{self, RouteCfg, RouteMethod};
use crate::permute::{DispatchPlan, PlanShape};

/// A dispatch plan in device memory ([`CudaDevice::dispatch_plan`], or a host plan uploaded
/// with [`CudaDevice::upload_plan`]): the tables of [`DispatchPlan`], always consistent with
/// each other (every slot `< pairs`, every token `< tokens`).
#[derive(Debug)]
pub struct DevicePlan {
    shape: PlanShape,
    counts: DeviceBuf<u32>,
    offsets: DeviceBuf<u32>,
    slot_of: DeviceBuf<u32>,
    token_of_slot: DeviceBuf<u32>,
    pair_of_slot: DeviceBuf<u32>,
    /// The grouped GEMMs' row tiles (`dsv3_gemm_tile`, 4 words each, `max_tiles` of them) and
    /// how many are valid (`[1]`), built with the plan.
    pub(crate) tiles: DeviceBuf<u32>,
    pub(crate) n_tiles: DeviceBuf<u32>,
}

impl DevicePlan {
    /// The batch sizes.
    pub fn shape(&self) -> PlanShape {
        self.shape
    }
    /// Rows per expert, `[n_experts]`.
    pub fn counts(&self) -> &DeviceBuf<u32> {
        &self.counts
    }
    /// Exclusive prefix sum of the counts, `[n_experts + 1]`.
    pub fn offsets(&self) -> &DeviceBuf<u32> {
        &self.offsets
    }
    /// Row of each pair in the contiguous layout, `[pairs]`.
    pub fn slot_of(&self) -> &DeviceBuf<u32> {
        &self.slot_of
    }
    /// Source token of each row, `[pairs]`.
    pub fn token_of_slot(&self) -> &DeviceBuf<u32> {
        &self.token_of_slot
    }
    /// Pair index of each row, `[pairs]`.
    pub fn pair_of_slot(&self) -> &DeviceBuf<u32> {
        &self.pair_of_slot
    }
    /// Room in the tile list: a bound on the tiles of at most 64 rows any plan of this shape
    /// has (each bucket with rows adds at most one partial tile).
    pub fn max_tiles(&self) -> usize {
        max_tiles(self.shape)
    }
}

/// [`DevicePlan::max_tiles`] of a shape: `Σ ceil(c_b / 64) <= pairs / 64 + min(buckets, pairs)`.
fn max_tiles(shape: PlanShape) -> usize {
    (shape.pairs() / 64 + shape.n_experts.min(shape.pairs())).max(1)
}

/// The tile list of offsets, on the host (what `dsv3_grouped_tiles` writes), as words.
fn host_tiles(offsets: &[u32], max: usize) -> (Vec<u32>, u32) {
    let mut words = vec![0u32; 4 * max];
    let mut n = 0usize;
    for (b, r) in offsets.windows(2).enumerate() {
        for r0 in (r[0]..r[1]).step_by(64) {
            if n < max {
                words[4 * n..4 * n + 3].copy_from_slice(&[b as u32, r0, 64.min(r[1] - r0)]);
            }
            n += 1;
        }
    }
    (words, n.min(max) as u32)
}

/// Which map of a plan a row gather follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RowMap {
    /// `out[s] = x[token_of_slot[s]]` (token order → expert order; x has `tokens` rows).
    TokenOfSlot,
    /// `out[p] = y[slot_of[p]]` (expert order → pair order; y has `pairs` rows).
    SlotOf,
}

impl CudaDevice {
    /// Uploads the tables of a plan built on the host ([`DispatchPlan::build`]).
    pub fn upload_plan(&self, plan: &DispatchPlan) -> Result<DevicePlan> {
        let (tiles, n_tiles) = host_tiles(plan.offsets(), max_tiles(plan.shape()));
        Ok(DevicePlan {
            tiles: self.upload(&tiles)?,
            n_tiles: self.upload(&[n_tiles])?,
            shape: plan.shape(),
            counts: self.upload(plan.counts())?,
            offsets: self.upload(plan.offsets())?,
            slot_of: self.upload(plan.slot_of())?,
            token_of_slot: self.upload(plan.token_of_slot())?,
            pair_of_slot: self.upload(plan.pair_of_slot())?,
        })
    }

    /// `dsv3_dispatch_plan`: [`DispatchPlan::build`] on the device from `topk_ids` in device
    /// memory, the same tables (a stable counting sort: rows of one expert in ascending pair
    /// order). An id `>= n_experts` gives the CPU's error (first bad pair).
    pub fn dispatch_plan(&self, shape: PlanShape, topk_ids: &DeviceBuf<u32>) -> Result<DevicePlan> {
        const OP: &str = "permute";
        shape.validate()?;
        check_len(OP, "topk_ids", topk_ids.len(), shape.pairs())?;
        match self.plan_of(OP, shape, topk_ids, 0, 1)? {
            Ok(plan) => Ok(plan),
            Err(p) => {
                let id = self.element(topk_ids, p)?;
                Err(invalid(
                    OP,
                    "topk_ids",
                    format!("token {}, slot {}: expert id {id} >= n_experts = {}", p / shape.top_k, p % shape.top_k, shape.n_experts),
                ))
            }
        }
    }

    /// `dsv3_dispatch_plan` with bucket `(id - id_base) / id_div` (`shape.n_experts` buckets);
    /// `Err(p)` names the first pair whose id falls outside. `shape` must be validated and
    /// `ids` be `shape.pairs()` long; `id_div >= 1`.
    pub(crate) fn plan_of(
        &self,
        op: &'static str,
        shape: PlanShape,
        ids: &DeviceBuf<u32>,
        id_base: u32,
        id_div: u32,
    ) -> Result<std::result::Result<DevicePlan, usize>> {
        let pairs = u32_of(op, "pairs", shape.pairs())?;
        let buckets = u32_of(op, "n_experts", shape.n_experts)?;
        let top_k = u32_of(op, "top_k", shape.top_k)?;
        if id_div == 0 || ids.len() != pairs as usize {
            return Err(crate::error::shape_err(op, format!("{} ids for {pairs} pairs, id_div {id_div}", ids.len())));
        }
        let mut counts = self.zeros::<u32>(shape.n_experts)?;
        let mut offsets = self.zeros::<u32>(shape.n_experts + 1)?;
        let mut cursor = self.zeros::<u32>(shape.n_experts)?;
        let (mut slot_of, mut token_of_slot, mut pair_of_slot) =
            (self.zeros::<u32>(shape.pairs())?, self.zeros::<u32>(shape.pairs())?, self.zeros::<u32>(shape.pairs())?);
        let st = self.imp.status(kernel!(DispatchPlan))?;
        {
            let (ia, _gi) = self.imp.addr(&ids.imp);
            let (ca, _gc) = self.imp.addr_mut(&mut counts.imp);
            let (oa, _go) = self.imp.addr_mut(&mut offsets.imp);
            let (sa, _gs) = self.imp.addr_mut(&mut slot_of.imp);
            let (ta, _gt) = self.imp.addr_mut(&mut token_of_slot.imp);
            let (pa, _gp) = self.imp.addr_mut(&mut pair_of_slot.imp);
            let (ua, _gu) = self.imp.addr_mut(&mut cursor.imp);
            let p = DispatchPlanParams {
                ids: ia,
                counts: ca,
                offsets: oa,
                slot_of: sa,
                token_of_slot: ta,
                pair_of_slot: pa,
                cursor: ua,
                status: st.addr,
                pairs,
                top_k,
                buckets,
                id_base,
                id_div: id_div.max(1),
                pad: 0,
            };
            // SAFETY: ids, slot_of, token_of_slot and pair_of_slot hold `pairs` entries; counts
            // and cursor `buckets`, offsets `buckets + 1` (all allocated above). The kernel
            // writes counts[b] / cursor[b] only for b < buckets, slots only after every id was
            // found inside the buckets, and then each slot is offsets[b] + rank < pairs (the
            // counts sum to pairs). All outputs are distinct fresh buffers.
            unsafe { self.imp.launch(kernel!(DispatchPlan), (1, 1), 1024, &p)? };
        }
        if let Some(p) = st.read()? {
            return Ok(Err(p as usize));
        }
        let max = max_tiles(shape);
        let (mut tiles, mut n_tiles) = (self.zeros::<u32>(4 * max)?, self.zeros::<u32>(1)?);
        {
            let (oa, _go) = self.imp.addr(&offsets.imp);
            let (ta, _gt) = self.imp.addr_mut(&mut tiles.imp);
            let (na, _gn) = self.imp.addr_mut(&mut n_tiles.imp);
            let p = GroupedTilesParams { offsets: oa, tiles: ta, n_tiles: na, buckets, max_tiles: u32_of(op, "tiles", max)? };
            // SAFETY: offsets holds buckets + 1 entries (allocated above), tiles 4·max words
            // (max tiles of 16 bytes) and n_tiles one; the kernel writes tiles[i] only for
            // i < max_tiles and one word of n_tiles; all three are distinct buffers.
            unsafe { self.imp.launch(kernel!(GroupedTiles), (1, 1), 32, &p)? };
        }
        Ok(Ok(DevicePlan { shape, counts, offsets, slot_of, token_of_slot, pair_of_slot, tiles, n_tiles }))
    }

    /// A copy of a plan's offsets (`n_experts + 1` entries), as the grouped GEMM takes them.
    pub fn plan_offsets(&self, plan: &DevicePlan) -> Result<DeviceBuf<u32>> {
        self.copy(&plan.offsets)
    }

    /// [`crate::gating::route`] on the GPU, every method: `dsv3_route_noaux_tc` (V3, Moonlight)
    /// or `dsv3_route_softmax` (V2-Lite's softmax greedy, V2's group-limited greedy); indices
    /// and weights are bit-exact with the CPU. The CPU's checks and errors (the bias is
    /// downloaded to check it), then the kernels' limits: n_experts <= 256, top_k <= 32 and,
    /// with groups, n_group <= 32. Non-finite logits give the CPU's error.
    pub fn route(
        &self,
        cfg: &RouteCfg,
        tokens: usize,
        logits: &DeviceBuf<f32>,
        bias: Option<&DeviceBuf<f32>>,
        indices: &mut DeviceBuf<u32>,
        weights: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        const OP: &str = "gating::route";
        let host_bias = bias.map(|b| self.host_copy(b)).transpose()?;
        gating::check_args(cfg, tokens, logits.len(), host_bias.as_deref(), indices.len(), weights.len())?;
        if cfg.n_experts > 256 || cfg.top_k > 32 || (cfg.uses_groups() && cfg.n_group > 32) {
            return Err(shape_err(OP, format!("the CUDA router takes <= 256 experts, top_k <= 32, <= 32 groups; got {cfg:?}")));
        }
        let n = checked_mul(OP, "logits", tokens, cfg.n_experts)?;
        u32_of(OP, "tokens * n_experts", n)?;
        if tokens == 0 {
            return Ok(());
        }
        let noaux = matches!((cfg.method, bias), (RouteMethod::NoauxTc, Some(_)));
        let st = self.imp.status([kernel!(RouteSoftmax), kernel!(RouteNoauxTc)][usize::from(noaux)])?;
        {
            let (la, _gl) = self.imp.addr(&logits.imp);
            let (ia, _gi) = self.imp.addr_mut(&mut indices.imp);
            let (wa, _gw) = self.imp.addr_mut(&mut weights.imp);
            let blocks = ((tokens as u32).div_ceil(4), 1);
            let (t, e, g, tg, k) = (tokens as u32, cfg.n_experts as u32, cfg.n_group as u32, cfg.topk_group as u32, cfg.top_k as u32);
            let norm = u32::from(cfg.norm_topk_prob);
            match (cfg.method, bias) {
                (RouteMethod::NoauxTc, Some(bias)) => {
                    let (ba, _gb) = self.imp.addr(&bias.imp);
                    let p = RouteNoauxTcParams {
                        logits: la,
                        bias: ba,
                        indices: ia,
                        weights: wa,
                        status: st.addr,
                        tokens: t,
                        n_experts: e,
                        n_group: g,
                        topk_group: tg,
                        top_k: k,
                        norm_topk_prob: norm,
                        routed_scaling_factor: cfg.routed_scaling_factor,
                        pad: 0,
                    };
                    // SAFETY: warp t < tokens reads row t of logits (tokens·n_experts, checked)
                    // and the n_experts biases (checked), and writes top_k entries of row t of
                    // indices and weights (both tokens·top_k, distinct &mut buffers). The limits
                    // above keep every expert in the warp's 8 slots, every group in a lane,
                    // every output in a lane and `kept` in 32 bits; `cfg.validate` guarantees
                    // gs >= 2, topk_group <= n_group and enough experts for top_k.
                    unsafe { self.imp.launch(kernel!(RouteNoauxTc), blocks, 128, &p)? };
                }
                (RouteMethod::NoauxTc, None) => return Err(invalid(OP, "bias", "noaux_tc needs e_score_correction_bias")),
                (method, _) => {
                    let group_limited = method == RouteMethod::GroupLimitedGreedy;
                    let p = RouteSoftmaxParams {
                        logits: la,
                        indices: ia,
                        weights: wa,
                        status: st.addr,
                        tokens: t,
                        n_experts: e,
                        n_group: if group_limited { g } else { 1 },
                        topk_group: if group_limited { tg } else { 1 },
                        top_k: k,
                        norm_topk_prob: norm,
                        group_limited: u32::from(group_limited),
                        routed_scaling_factor: cfg.routed_scaling_factor,
                    };
                    // SAFETY: as for noaux_tc (no bias): warp t reads row t of logits and writes
                    // row t of indices and weights; the limits keep experts in 8 slots, groups
                    // in lanes (group-limited only) and outputs in lanes; `cfg.validate`
                    // guarantees n_group divides n_experts and enough experts for top_k.
                    unsafe { self.imp.launch(kernel!(RouteSoftmax), blocks, 128, &p)? };
                }
            }
        }
        match st.read()? {
            None => Ok(()),
            Some(i) => {
                let v = self.element(logits, i as usize)?;
                let (t, e) = (i as usize / cfg.n_experts, i as usize % cfg.n_experts);
                Err(invalid(OP, "logits", format!("token {t}, expert {e}: non-finite logit {v}")))
            }
        }
    }

    /// `dsv3_permute`: [`crate::permute::permute`] on the GPU (`out[s] = x[token_of_slot[s]]`).
    pub fn permute(&self, plan: &DevicePlan, hidden: usize, x: &DeviceBuf<f32>, out: &mut DeviceBuf<f32>) -> Result<()> {
        const OP: &str = "permute";
        check_hidden(hidden)?;
        check_len(OP, "x", x.len(), checked_mul(OP, "x", plan.shape.tokens, hidden)?)?;
        check_len(OP, "out", out.len(), checked_mul(OP, "out", plan.shape.pairs(), hidden)?)?;
        self.gather_rows(plan, RowMap::TokenOfSlot, hidden, x, out)
    }

    /// `dsv3_permute` along one map of a plan; the lengths must be checked by the caller:
    /// `x` has `tokens` (TokenOfSlot) or `pairs` (SlotOf) rows of `hidden`, `out` `pairs`.
    pub(crate) fn gather_rows(
        &self,
        plan: &DevicePlan,
        map: RowMap,
        hidden: usize,
        x: &DeviceBuf<f32>,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        const OP: &str = "permute";
        let rows = plan.shape.pairs();
        let x_rows = if map == RowMap::TokenOfSlot { plan.shape.tokens } else { rows };
        if hidden == 0 || x.len() != x_rows * hidden || out.len() != rows * hidden {
            return Err(shape_err(OP, format!("row gather of {rows} rows of {hidden} from {} values into {}", x.len(), out.len())));
        }
        let (rows32, hidden32) = (u32_of(OP, "rows", rows)?, u32_of(OP, "hidden", hidden)?);
        u32_of(OP, "rows * hidden", out.len())?;
        if rows == 0 {
            return Ok(());
        }
        let idx = if map == RowMap::TokenOfSlot { &plan.token_of_slot } else { &plan.slot_of };
        let (xa, _gx) = self.imp.addr(&x.imp);
        let (ta, _gt) = self.imp.addr(&idx.imp);
        let (oa, _go) = self.imp.addr_mut(&mut out.imp);
        let p = PermuteParams { x: xa, token_of_slot: ta, out: oa, rows: rows32, hidden: hidden32 };
        // SAFETY: a DevicePlan's maps are consistent by construction: token_of_slot has `rows`
        // entries each < tokens, slot_of `rows` entries each < pairs = rows; so every x row
        // read is inside x (x_rows·hidden, checked) and out is rows·hidden (checked).
        unsafe { self.imp.launch(kernel!(Permute), (stride_grid(rows, 1), 1), 256, &p) }
    }

    /// `dsv3_unpermute`: [`crate::permute::unpermute`] on the GPU, bit for bit
    /// (`out[t] = Σ_j weights[t, j] · y[slot_of[t, j]]`, ascending j).
    pub fn unpermute(
        &self,
        plan: &DevicePlan,
        hidden: usize,
        y: &DeviceBuf<f32>,
        weights: &DeviceBuf<f32>,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        const OP: &str = "permute";
        check_hidden(hidden)?;
        let rows = plan.shape.pairs();
        check_len(OP, "y", y.len(), checked_mul(OP, "y", rows, hidden)?)?;
        check_len(OP, "weights", weights.len(), rows)?;
        check_len(OP, "out", out.len(), checked_mul(OP, "out", plan.shape.tokens, hidden)?)?;
        let (tokens, top_k, hidden32) =
            (u32_of(OP, "tokens", plan.shape.tokens)?, u32_of(OP, "top_k", plan.shape.top_k)?, u32_of(OP, "hidden", hidden)?);
        u32_of(OP, "rows * hidden", y.len())?;
        if tokens == 0 {
            return Ok(());
        }
        let (ya, _gy) = self.imp.addr(&y.imp);
        let (sa, _gs) = self.imp.addr(&plan.slot_of.imp);
        let (wa, _gw) = self.imp.addr(&weights.imp);
        let (oa, _go) = self.imp.addr_mut(&mut out.imp);
        let p = UnpermuteParams { y: ya, slot_of: sa, weights: wa, out: oa, tokens, top_k, hidden: hidden32, pad: 0 };
        // SAFETY: slot_of and weights have tokens·top_k entries (plan and check above), every
        // slot < rows, so y reads stay in rows·hidden; out is tokens·hidden, a distinct buffer.
        unsafe { self.imp.launch(kernel!(Unpermute), (stride_grid(plan.shape.tokens, 1), 1), 256, &p) }
    }
}

fn check_hidden(hidden: usize) -> Result<()> {
    if hidden == 0 { Err(shape_err("permute", "hidden must be >= 1")) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::{host_tiles, max_tiles};
    use crate::permute::PlanShape;

    /// The device tile list's bound holds for every way of spreading the pairs over the
    /// buckets, and the tiles cover each bucket's rows exactly, in order (what the grouped
    /// GEMMs read on the device; `dsv3_grouped_tiles` is this loop).
    #[test]
    fn tile_list_fits_its_bound_and_covers_the_rows() {
        let mut seed = 7u64;
        for tokens in [1usize, 2, 8, 64, 128] {
            for n_experts in [4usize, 16, 256] {
                for top_k in [1usize, 2, 8] {
                    if top_k > n_experts {
                        continue;
                    }
                    let shape = PlanShape { tokens, top_k, n_experts };
                    for _ in 0..20 {
                        let mut counts = vec![0u32; n_experts];
                        for _ in 0..shape.pairs() {
                            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                            // Skewed: half the pairs to expert 0, the rest spread.
                            let e = if seed >> 63 == 0 { 0 } else { (seed >> 33) as usize % n_experts };
                            counts[e] += 1;
                        }
                        let mut offsets = vec![0u32];
                        for c in &counts {
                            offsets.push(offsets.last().unwrap() + c);
                        }
                        let max = max_tiles(shape);
                        let (words, n) = host_tiles(&offsets, max);
                        let exact: usize = counts.iter().map(|&c| (c as usize).div_ceil(64)).sum();
                        assert_eq!(n as usize, exact, "{shape:?} {counts:?}");
                        assert!(exact <= max, "{shape:?}: {exact} tiles > bound {max}");
                        let mut covered = vec![0u32; shape.pairs()];
                        for t in words.chunks_exact(4).take(n as usize) {
                            let (e, r0, rows) = (t[0] as usize, t[1], t[2]);
                            assert!((1..=64).contains(&rows));
                            assert!(offsets[e] <= r0 && r0 + rows <= offsets[e + 1]);
                            (r0..r0 + rows).for_each(|r| covered[r as usize] += 1);
                        }
                        assert!(covered.iter().all(|&c| c == 1));
                    }
                }
            }
        }
    }
}
