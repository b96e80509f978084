//! All-to-all packing for expert parallelism on the device, in exactly the layout of
//! [`crate::a2a`] (read its module docs for the counts / displacements contract): rows,
//! experts, weights and source slots stay in device memory (what NCCL sends); the per-peer
//! counts and displacements are on the host, where NCCL takes them. Built from the device
//! dispatch plan (`dsv3_dispatch_plan` with the destination rank or the local expert as the
//! bucket), `dsv3_permute` / `dsv3_unpermute` for the rows and `dsv3_a2a_gather_meta` for the
//! per-row metadata: bit-exact with the CPU packing.

use super::moe::RowMap;
use super::params::*;
use super::{CudaDevice, DeviceBuf, DevicePlan, stride_grid, u32_of};
use crate::a2a::{BatchShape, CombineBuf, DispatchBuf, EpLayout, check_segments};
use crate::error::{Result, check_len, invalid};
use crate::permute::PlanShape;

const OP: &str = "a2a";

/// [`DispatchBuf`] in device memory (counts / displacements on the host).
#[derive(Debug)]
pub struct DeviceDispatchBuf {
    pub hidden: usize,
    /// `[len, hidden]` activations.
    pub rows: DeviceBuf<f32>,
    /// `[len]` global expert id of each row.
    pub expert: DeviceBuf<u32>,
    /// `[len]` routing weight of each row.
    pub weight: DeviceBuf<f32>,
    /// `[len]` pair index on the sending rank.
    pub src_slot: DeviceBuf<u32>,
    /// `[R]` rows per peer.
    pub counts: Vec<u32>,
    /// `[R]` exclusive prefix sum of `counts`.
    pub displs: Vec<u32>,
}

/// [`CombineBuf`] in device memory.
#[derive(Debug)]
pub struct DeviceCombineBuf {
    pub hidden: usize,
    /// `[len, hidden]` expert outputs.
    pub rows: DeviceBuf<f32>,
    pub counts: Vec<u32>,
    pub displs: Vec<u32>,
}

/// [`crate::a2a::Packed`] on the device: the send buffer and the plan over destination ranks.
#[derive(Debug)]
pub struct DevicePacked {
    pub send: DeviceDispatchBuf,
    pub plan: DevicePlan,
}

/// [`crate::a2a::Unpacked`] on the device.
#[derive(Debug)]
pub struct DeviceUnpacked {
    pub hidden: usize,
    /// Received rows → local-expert order; its offsets are the experts' row ranges.
    pub plan: DevicePlan,
    /// `[len, hidden]` expert inputs, grouped by local expert.
    pub input: DeviceBuf<f32>,
    pub expert: DeviceBuf<u32>,
    pub weight: DeviceBuf<f32>,
    pub recv_counts: Vec<u32>,
    pub recv_displs: Vec<u32>,
}

impl DeviceDispatchBuf {
    /// Rows in the buffer.
    pub fn len(&self) -> usize {
        self.expert.len()
    }
    /// Whether it has no row.
    pub fn is_empty(&self) -> bool {
        self.expert.is_empty()
    }
}

impl CudaDevice {
    /// Uploads a host dispatch buffer (e.g. what an in-process exchange received).
    pub fn upload_dispatch(&self, b: &DispatchBuf) -> Result<DeviceDispatchBuf> {
        Ok(DeviceDispatchBuf {
            hidden: b.hidden,
            rows: self.upload(&b.rows)?,
            expert: self.upload(&b.expert)?,
            weight: self.upload(&b.weight)?,
            src_slot: self.upload(&b.src_slot)?,
            counts: b.counts.clone(),
            displs: b.displs.clone(),
        })
    }

    /// Downloads a dispatch buffer.
    pub fn download_dispatch(&self, b: &DeviceDispatchBuf) -> Result<DispatchBuf> {
        Ok(DispatchBuf {
            hidden: b.hidden,
            rows: self.download(&b.rows)?,
            expert: self.download(&b.expert)?,
            weight: self.download(&b.weight)?,
            src_slot: self.download(&b.src_slot)?,
            counts: b.counts.clone(),
            displs: b.displs.clone(),
        })
    }

    /// Uploads a host combine buffer.
    pub fn upload_combine(&self, b: &CombineBuf) -> Result<DeviceCombineBuf> {
        Ok(DeviceCombineBuf { hidden: b.hidden, rows: self.upload(&b.rows)?, counts: b.counts.clone(), displs: b.displs.clone() })
    }

    /// Downloads a combine buffer.
    pub fn download_combine(&self, b: &DeviceCombineBuf) -> Result<CombineBuf> {
        Ok(CombineBuf { hidden: b.hidden, rows: self.download(&b.rows)?, counts: b.counts.clone(), displs: b.displs.clone() })
    }

    /// [`crate::a2a::pack`] on the device: the local pairs ordered by destination rank, then
    /// (token, j); the same checks and errors.
    pub fn a2a_pack(
        &self,
        layout: &EpLayout,
        shape: BatchShape,
        x: &DeviceBuf<f32>,
        topk_ids: &DeviceBuf<u32>,
        topk_weights: &DeviceBuf<f32>,
    ) -> Result<DevicePacked> {
        layout.validate()?;
        shape.validate()?;
        let pairs = shape.tokens * shape.top_k;
        check_len(OP, "x", x.len(), shape.tokens * shape.hidden)?;
        check_len(OP, "topk_ids", topk_ids.len(), pairs)?;
        check_len(OP, "topk_weights", topk_weights.len(), pairs)?;
        let ps = PlanShape { tokens: shape.tokens, top_k: shape.top_k, n_experts: layout.n_ranks };
        ps.validate()?;
        let epr = u32_of(OP, "experts per rank", layout.experts_per_rank())?;
        let plan = match self.plan_of(OP, ps, topk_ids, 0, epr)? {
            Ok(p) => p,
            Err(p) => {
                let id = self.element(topk_ids, p)?;
                return Err(invalid(
                    OP,
                    "topk_ids",
                    format!("token {}: expert id {id} >= n_experts = {}", p / shape.top_k, layout.n_experts),
                ));
            }
        };
        let mut rows = self.zeros::<f32>(pairs * shape.hidden)?;
        self.gather_rows(&plan, RowMap::TokenOfSlot, shape.hidden, x, &mut rows)?;
        let (mut expert, mut weight, mut src_slot) = (self.zeros::<u32>(pairs)?, self.zeros::<f32>(pairs)?, self.zeros::<u32>(pairs)?);
        self.gather_meta(plan.pair_of_slot(), topk_ids, topk_weights, &mut expert, &mut weight, Some(&mut src_slot))?;
        let counts = self.download(plan.counts())?;
        let displs = self.download_range(plan.offsets(), 0..layout.n_ranks)?;
        Ok(DevicePacked { send: DeviceDispatchBuf { hidden: shape.hidden, rows, expert, weight, src_slot, counts, displs }, plan })
    }

    /// [`crate::a2a::unpack`] on the device: received rows into local-expert order (stable in
    /// received order); a row whose expert this rank does not own is the CPU's error.
    pub fn a2a_unpack(&self, layout: &EpLayout, rank: usize, recv: &DeviceDispatchBuf) -> Result<DeviceUnpacked> {
        layout.validate()?;
        if rank >= layout.n_ranks {
            return Err(invalid(OP, "rank", format!("{rank} >= n_ranks = {}", layout.n_ranks)));
        }
        let n = check_segments("dispatch", layout.n_ranks, recv.hidden, recv.rows.len(), &recv.counts, &recv.displs)?;
        check_len(OP, "expert", recv.expert.len(), n)?;
        check_len(OP, "weight", recv.weight.len(), n)?;
        check_len(OP, "src_slot", recv.src_slot.len(), n)?;
        let local = layout.local_experts(rank);
        let ps = PlanShape { tokens: n, top_k: 1, n_experts: local.len() };
        ps.validate()?;
        let plan = match self.plan_of(OP, ps, &recv.expert, u32_of(OP, "first local expert", local.start)?, 1)? {
            Ok(p) => p,
            Err(i) => {
                let src = recv.displs.iter().rposition(|&d| d as usize <= i).unwrap_or(0);
                let (slot, e) = (self.element(&recv.src_slot, i)?, self.element(&recv.expert, i)?);
                return Err(invalid(
                    OP,
                    "expert",
                    format!("row {i} (from rank {src}, slot {slot}): expert {e} is not on rank {rank} (owns {local:?})"),
                ));
            }
        };
        let mut input = self.zeros::<f32>(recv.rows.len())?;
        self.gather_rows(&plan, RowMap::TokenOfSlot, recv.hidden, &recv.rows, &mut input)?;
        let (mut expert, mut weight) = (self.zeros::<u32>(n)?, self.zeros::<f32>(n)?);
        self.gather_meta(plan.pair_of_slot(), &recv.expert, &recv.weight, &mut expert, &mut weight, None)?;
        Ok(DeviceUnpacked {
            hidden: recv.hidden,
            plan,
            input,
            expert,
            weight,
            recv_counts: recv.counts.clone(),
            recv_displs: recv.displs.clone(),
        })
    }

    /// [`crate::a2a::Unpacked::pack_return`] on the device: the experts' outputs (rows in the
    /// order of `input`) back into received order.
    pub fn a2a_pack_return(&self, u: &DeviceUnpacked, expert_output: &DeviceBuf<f32>) -> Result<DeviceCombineBuf> {
        if u.hidden == 0 {
            return Err(crate::error::shape_err("permute", "hidden must be >= 1"));
        }
        let rows = u.plan.shape().pairs() * u.hidden;
        check_len("permute", "y", expert_output.len(), rows)?;
        let mut out = self.zeros::<f32>(rows)?;
        self.gather_rows(&u.plan, RowMap::SlotOf, u.hidden, expert_output, &mut out)?;
        Ok(DeviceCombineBuf { hidden: u.hidden, rows: out, counts: u.recv_counts.clone(), displs: u.recv_displs.clone() })
    }

    /// [`crate::a2a::combine`] on the device: `out[t] = Σ_j topk_weights[t, j] · returned(t, j)`,
    /// bit-exact with the CPU (and with a one-rank run).
    pub fn a2a_combine(
        &self,
        packed: &DevicePacked,
        returned: &DeviceCombineBuf,
        topk_weights: &DeviceBuf<f32>,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        check_segments("combine", packed.send.counts.len(), returned.hidden, returned.rows.len(), &returned.counts, &returned.displs)?;
        if returned.hidden != packed.send.hidden || returned.counts != packed.send.counts {
            return Err(invalid(OP, "returned", "the returned layout differs from what this rank sent"));
        }
        self.unpermute(&packed.plan, returned.hidden, &returned.rows, topk_weights, out)
    }

    /// `dsv3_a2a_gather_meta`: `out_expert[s] = expert[order[s]]`, the same for the weights,
    /// and `out_src_slot[s] = order[s]` when given. `order` is a plan's `pair_of_slot` (each
    /// entry < its pairs = the sources' length, checked here).
    fn gather_meta(
        &self,
        order: &DeviceBuf<u32>,
        expert: &DeviceBuf<u32>,
        weight: &DeviceBuf<f32>,
        out_expert: &mut DeviceBuf<u32>,
        out_weight: &mut DeviceBuf<f32>,
        out_src_slot: Option<&mut DeviceBuf<u32>>,
    ) -> Result<()> {
        let rows = order.len();
        check_len(OP, "expert", expert.len(), rows)?;
        check_len(OP, "weight", weight.len(), rows)?;
        check_len(OP, "out expert", out_expert.len(), rows)?;
        check_len(OP, "out weight", out_weight.len(), rows)?;
        let rows32 = u32_of(OP, "rows", rows)?;
        if rows == 0 {
            return Ok(());
        }
        let (oa, _go) = self.imp.addr(&order.imp);
        let (ea, _ge) = self.imp.addr(&expert.imp);
        let (wa, _gw) = self.imp.addr(&weight.imp);
        let (xa, _gx) = self.imp.addr_mut(&mut out_expert.imp);
        let (ya, _gy) = self.imp.addr_mut(&mut out_weight.imp);
        if let Some(s) = &out_src_slot {
            check_len(OP, "out src_slot", s.len(), rows)?;
        }
        let (sa, _gs) = self.imp.addr_mut_opt(out_src_slot.map(|s| &mut s.imp));
        let p = A2aGatherMetaParams {
            order: oa,
            expert: ea,
            weight: wa,
            out_expert: xa,
            out_weight: ya,
            out_src_slot: sa,
            rows: rows32,
            pad: 0,
        };
        // SAFETY: order is a DevicePlan's pair_of_slot, a permutation of 0..rows (by the plan's
        // construction), and expert / weight have `rows` entries (checked), so every read is in
        // bounds; the outputs are rows long (checked), distinct &mut buffers.
        unsafe { self.imp.launch(kernel!(A2aGatherMeta), (stride_grid(rows, 256), 1), 256, &p) }
    }
}
