//! Safe launch wrappers, one per kernel: check every length and size against the shape (the
//! same checks and error values as the CPU function of the family), then one `unsafe` launch
//! whose `// SAFETY:` comment says why every access of the kernel is in bounds.

use super::params::*;
use super::{CudaDevice, DeviceBuf, u32_of};
use crate::embed::EmbedShape;
use crate::error::{Result, check_len, checked_mul, invalid, shape_err};
use crate::fp8::{ActQuantShape, BLOCK, Fp8WeightRef, ScaleFmt, blocks};
use crate::gating::{RouteCfg, RouteMethod};
use crate::gemm::GemmShape;
use crate::norm::RowsShape;
use crate::permute::{DispatchPlan, PlanShape};
use crate::rope::{RopeLayout, RopeTable};

/// The generated entry point `Kernel::$v` (a placeholder without the feature, where no device
/// can exist to launch on).
#[cfg(feature = "cuda")]
macro_rules! kernel {
    ($v:ident) => {
        super::Kernel::$v
    };
}
#[cfg(not(feature = "cuda"))]
macro_rules! kernel {
    ($v:ident) => {
        super::stub::NoKernel
    };
}

/// Blocks of a grid-stride kernel: enough to fill the GPU, never more than the work.
fn stride_grid(items: usize, per_block: usize) -> u32 {
    items.div_ceil(per_block).clamp(1, 1 << 16) as u32
}

/// A RoPE cos/sin table in device memory ([`CudaDevice::rope_table`]).
#[derive(Debug)]
pub struct DeviceRope {
    cos: DeviceBuf<f32>,
    sin: DeviceBuf<f32>,
    rope_dim: usize,
    max_pos: usize,
}

/// A dispatch plan's slot maps in device memory ([`CudaDevice::upload_plan`]).
#[derive(Debug)]
pub struct DevicePlan {
    shape: PlanShape,
    token_of_slot: DeviceBuf<u32>,
    slot_of: DeviceBuf<u32>,
}

/// A validated block-scaled FP8 weight in device memory ([`CudaDevice::upload_fp8_weight`]).
#[derive(Debug)]
pub struct DeviceFp8Weight {
    rows: usize,
    cols: usize,
    data: DeviceBuf<u8>,
    scale_inv: DeviceBuf<f32>,
}

impl CudaDevice {
    /// Uploads the table of [`RopeTable`] (the same f32 values, so results are bit-exact).
    pub fn rope_table(&self, t: &RopeTable) -> Result<DeviceRope> {
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for p in 0..t.max_pos() {
            if let Some((c, s)) = t.cos_sin(p) {
                cos.extend_from_slice(c);
                sin.extend_from_slice(s);
            }
        }
        Ok(DeviceRope { cos: self.upload(&cos)?, sin: self.upload(&sin)?, rope_dim: t.rope_dim(), max_pos: t.max_pos() })
    }

    /// Uploads the slot maps of a plan built on the host ([`DispatchPlan::build`]).
    pub fn upload_plan(&self, plan: &DispatchPlan) -> Result<DevicePlan> {
        Ok(DevicePlan { shape: plan.shape(), token_of_slot: self.upload(plan.token_of_slot())?, slot_of: self.upload(plan.slot_of())? })
    }

    /// Uploads a validated FP8 weight (codes and `scale_inv`).
    pub fn upload_fp8_weight(&self, w: Fp8WeightRef<'_>) -> Result<DeviceFp8Weight> {
        Ok(DeviceFp8Weight { rows: w.rows(), cols: w.cols(), data: self.upload(w.data())?, scale_inv: self.upload(w.scale_inv())? })
    }

    /// `dsv3_act_quant_1x128`: [`crate::fp8::act_quant`] on the GPU, bit for bit. A tile with
    /// NaN or ±inf gives the CPU's error (naming the first such tile).
    pub fn act_quant_1x128(
        &self,
        x: &DeviceBuf<f32>,
        shape: ActQuantShape,
        fmt: ScaleFmt,
        q: &mut DeviceBuf<u8>,
        scales: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        const OP: &str = "act_quant";
        if shape.cols == 0 || !shape.cols.is_multiple_of(BLOCK) {
            return Err(shape_err(OP, format!("cols = {} must be a positive multiple of {BLOCK}", shape.cols)));
        }
        let n = checked_mul(OP, "x", shape.rows, shape.cols)?;
        check_len(OP, "x", x.len(), n)?;
        check_len(OP, "q", q.len(), n)?;
        check_len(OP, "scales", scales.len(), shape.rows * shape.tiles())?;
        let tiles = u32_of(OP, "tiles", n / BLOCK)?;
        if tiles == 0 {
            return Ok(());
        }
        let st = self.imp.status()?;
        let (xa, _gx) = self.imp.addr(&x.imp);
        let (qa, _gq) = self.imp.addr_mut(&mut q.imp);
        let (sa, _gs) = self.imp.addr_mut(&mut scales.imp);
        let ue8m0 = u32::from(fmt == ScaleFmt::Ue8m0);
        let p = ActQuant1x128Params { x: xa, q: qa, scales: sa, status: st.addr, tiles, ue8m0 };
        // SAFETY: x and q hold tiles·128 elements, scales holds `tiles` (checked above); warp w
        // of block b touches only tile 8b + w, and only when it is < tiles. q and scales are
        // distinct buffers borrowed mutably, x is not written.
        unsafe { self.imp.launch(kernel!(ActQuant1x128), (tiles.div_ceil(8), 1), 256, &p)? };
        match st.read()? {
            None => Ok(()),
            Some(t) => {
                let (r, c) = (t as usize / shape.tiles(), t as usize % shape.tiles());
                Err(invalid(OP, "x", format!("non-finite value in row {r}, columns {}..{}", c * BLOCK, (c + 1) * BLOCK)))
            }
        }
    }

    /// `dsv3_rms_norm`: [`crate::norm::rms_norm`] on the GPU (f32 tree sum of squares; the
    /// same checks and errors).
    pub fn rms_norm(&self, x: &DeviceBuf<f32>, w: &DeviceBuf<f32>, shape: RowsShape, eps: f32, out: &mut DeviceBuf<f32>) -> Result<()> {
        const OP: &str = "rms_norm";
        crate::norm::check_rms_norm(OP, shape, x.len(), w.len(), out.len(), eps)?;
        let (rows, cols) = (u32_of(OP, "rows", shape.rows)?, u32_of(OP, "cols", shape.cols)?);
        if rows == 0 {
            return Ok(());
        }
        let (xa, _gx) = self.imp.addr(&x.imp);
        let (wa, _gw) = self.imp.addr(&w.imp);
        let (oa, _go) = self.imp.addr_mut(&mut out.imp);
        let p = RmsNormParams { x: xa, w: wa, out: oa, rows, cols, eps, pad: 0 };
        // SAFETY: x and out hold rows·cols elements and w holds cols (checked); block r reads
        // row r of x and all of w and writes row r of out; out is a distinct &mut buffer.
        unsafe { self.imp.launch(kernel!(RmsNorm), (rows, 1), 256, &p) }
    }

    /// `dsv3_add_rms_norm`: [`crate::norm::add_rms_norm`] on the GPU (`residual += x`, then
    /// `out = rms_norm(residual)`).
    pub fn add_rms_norm(
        &self,
        x: &DeviceBuf<f32>,
        residual: &mut DeviceBuf<f32>,
        w: &DeviceBuf<f32>,
        shape: RowsShape,
        eps: f32,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        const OP: &str = "add_rms_norm";
        crate::norm::check_add_rms_norm(OP, shape, x.len(), residual.len(), w.len(), out.len(), eps)?;
        let (rows, cols) = (u32_of(OP, "rows", shape.rows)?, u32_of(OP, "cols", shape.cols)?);
        if rows == 0 {
            return Ok(());
        }
        let (xa, _gx) = self.imp.addr(&x.imp);
        let (ra, _gr) = self.imp.addr_mut(&mut residual.imp);
        let (wa, _gw) = self.imp.addr(&w.imp);
        let (oa, _go) = self.imp.addr_mut(&mut out.imp);
        let p = AddRmsNormParams { x: xa, residual: ra, w: wa, out: oa, rows, cols, eps, pad: 0 };
        // SAFETY: as rms_norm, plus residual (rows·cols, checked), whose row r only block r
        // reads and writes; residual and out are distinct &mut buffers.
        unsafe { self.imp.launch(kernel!(AddRmsNorm), (rows, 1), 256, &p) }
    }

    /// `dsv3_silu_mul`: [`crate::act::silu_mul`] on the GPU, bit for bit.
    pub fn silu_mul(&self, gate: &DeviceBuf<f32>, up: &DeviceBuf<f32>, shape: RowsShape, out: &mut DeviceBuf<f32>) -> Result<()> {
        const OP: &str = "silu_mul";
        let n = shape.len(OP)?;
        check_len(OP, "gate", gate.len(), n)?;
        check_len(OP, "up", up.len(), n)?;
        check_len(OP, "out", out.len(), n)?;
        let (rows, cols) = (u32_of(OP, "rows", shape.rows)?, u32_of(OP, "cols", shape.cols)?);
        if rows == 0 {
            return Ok(());
        }
        let (ga, _gg) = self.imp.addr(&gate.imp);
        let (ua, _gu) = self.imp.addr(&up.imp);
        let (oa, _go) = self.imp.addr_mut(&mut out.imp);
        let p = SiluMulParams { gate: ga, up: ua, out: oa, rows, cols, in_stride: cols, pad: 0 };
        // SAFETY: gate, up and out hold rows·cols elements (checked); the grid-stride loop
        // touches index r·cols + c < rows·cols of each; out is a distinct &mut buffer.
        unsafe { self.imp.launch(kernel!(SiluMul), (stride_grid(n, 256), 1), 256, &p) }
    }

    /// `dsv3_silu_mul` on a fused `[rows, 2n]` gate|up buffer: [`crate::act::silu_mul_packed`].
    pub fn silu_mul_packed(&self, gate_up: &DeviceBuf<f32>, shape: RowsShape, out: &mut DeviceBuf<f32>) -> Result<()> {
        const OP: &str = "silu_mul_packed";
        let n = shape.len(OP)?;
        let c2 = checked_mul(OP, "2 * cols", shape.cols, 2)?;
        check_len(OP, "gate_up", gate_up.len(), checked_mul(OP, "rows * 2 * cols", shape.rows, c2)?)?;
        check_len(OP, "out", out.len(), n)?;
        let (rows, cols, stride) = (u32_of(OP, "rows", shape.rows)?, u32_of(OP, "cols", shape.cols)?, u32_of(OP, "2 * cols", c2)?);
        if rows == 0 {
            return Ok(());
        }
        let (ga, _gg) = self.imp.addr(&gate_up.imp);
        let (oa, _go) = self.imp.addr_mut(&mut out.imp);
        let p = SiluMulParams { gate: ga, up: ga + 4 * cols as u64, out: oa, rows, cols, in_stride: stride, pad: 0 };
        // SAFETY: gate_up holds rows·2·cols elements (checked): index r·2cols + c and
        // r·2cols + cols + c, c < cols, are inside it; out holds rows·cols, a distinct buffer.
        unsafe { self.imp.launch(kernel!(SiluMul), (stride_grid(n, 256), 1), 256, &p) }
    }

    /// `dsv3_embedding_bf16`: [`crate::embed::embedding`] of a bf16 table on the GPU, exact.
    /// An id `>= vocab` gives the CPU's error (first bad position).
    pub fn embedding(
        &self,
        table: &DeviceBuf<half::bf16>,
        shape: EmbedShape,
        ids: &DeviceBuf<u32>,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        const OP: &str = "embedding";
        check_len(OP, "table", table.len(), shape.table_len(OP)?)?;
        check_len(OP, "out", out.len(), checked_mul(OP, "ids.len() * dim", ids.len(), shape.dim)?)?;
        let (tokens, vocab, dim) = (u32_of(OP, "tokens", ids.len())?, u32_of(OP, "vocab", shape.vocab)?, u32_of(OP, "dim", shape.dim)?);
        if tokens == 0 {
            return Ok(());
        }
        let st = self.imp.status()?;
        let (ta, _gt) = self.imp.addr(&table.imp);
        let (ia, _gi) = self.imp.addr(&ids.imp);
        let (oa, _go) = self.imp.addr_mut(&mut out.imp);
        let p = EmbeddingBf16Params { table: ta, ids: ia, out: oa, status: st.addr, tokens, vocab, dim, pad: 0 };
        // SAFETY: block t reads ids[t] (t < tokens = ids.len()), and only for id < vocab reads
        // table row id (table is vocab·dim, checked) and writes out row t (out is tokens·dim).
        unsafe { self.imp.launch(kernel!(EmbeddingBf16), (tokens, 1), 256, &p)? };
        match st.read()? {
            None => Ok(()),
            Some(t) => {
                let id = self.download_range(ids, t as usize..t as usize + 1)?[0];
                Err(invalid(OP, "ids", format!("token id {id} at position {t} is >= vocab {}", shape.vocab)))
            }
        }
    }

    /// `dsv3_rope`: [`crate::rope::apply_rope`] on the GPU, in place, bit for bit. A position
    /// `>= max_pos` gives the CPU's error (first bad token).
    pub fn apply_rope(&self, x: &mut DeviceBuf<f32>, layout: RopeLayout, positions: &DeviceBuf<u32>, table: &DeviceRope) -> Result<()> {
        const OP: &str = "apply_rope";
        let len = layout.check(OP, table.rope_dim)?;
        check_len(OP, "x", x.len(), len)?;
        check_len(OP, "positions", positions.len(), layout.tokens)?;
        let u = |what, v| u32_of(OP, what, v);
        let (tokens, heads, row_stride) = (u("tokens", layout.tokens)?, u("heads", layout.heads)?, u("row_stride", layout.row_stride)?);
        let (head_stride, offset, max_pos) =
            (u("head_stride", layout.head_stride)?, u("offset", layout.offset)?, u("max_pos", table.max_pos)?);
        let pairs = checked_mul(OP, "pairs", layout.tokens, layout.heads.saturating_mul(table.rope_dim / 2))?;
        if tokens == 0 {
            return Ok(());
        }
        let st = self.imp.status()?;
        let (xa, _gx) = self.imp.addr_mut(&mut x.imp);
        let (pa, _gp) = self.imp.addr(&positions.imp);
        let (ca, _gc) = self.imp.addr(&table.cos.imp);
        let (sa, _gs) = self.imp.addr(&table.sin.imp);
        let half = (table.rope_dim / 2) as u32;
        let p = RopeParams {
            x: xa,
            positions: pa,
            cos: ca,
            sin: sa,
            status: st.addr,
            tokens,
            heads,
            row_stride,
            head_stride,
            offset,
            half,
            max_pos,
            pad: 0,
        };
        // SAFETY: `layout.check` proved offset + (heads-1)·head_stride + rope_dim <= row_stride
        // and x is tokens·row_stride long, so every pair lies inside its token's row; distinct
        // (head, pair) never overlap (head_stride >= rope_dim). Table rows are read only for
        // pos < max_pos, and cos/sin are max_pos·half long.
        unsafe { self.imp.launch(kernel!(Rope), (stride_grid(pairs, 256), 1), 256, &p)? };
        match st.read()? {
            None => Ok(()),
            Some(t) => {
                let pos = self.download_range(positions, t as usize..t as usize + 1)?[0];
                Err(invalid(OP, "positions", format!("position {pos} of token {t} is >= {}", table.max_pos)))
            }
        }
    }

    /// `dsv3_route_noaux_tc`: [`crate::gating::route`] for [`RouteMethod::NoauxTc`] on the GPU;
    /// indices and weights are bit-exact. Limits of this kernel: n_experts <= 256,
    /// n_group <= 32, top_k <= 32. Non-finite logits or bias give the CPU's errors.
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
        cfg.validate()?;
        if cfg.method != RouteMethod::NoauxTc || cfg.n_experts > 256 || cfg.n_group > 32 || cfg.top_k > 32 {
            return Err(shape_err(
                OP,
                format!("the CUDA router takes noaux_tc with <= 256 experts, <= 32 groups, top_k <= 32; got {cfg:?}"),
            ));
        }
        let n = checked_mul(OP, "logits", tokens, cfg.n_experts)?;
        check_len(OP, "logits", logits.len(), n)?;
        let out = checked_mul(OP, "indices", tokens, cfg.top_k)?;
        check_len(OP, "indices", indices.len(), out)?;
        check_len(OP, "weights", weights.len(), out)?;
        let bias = bias.ok_or_else(|| invalid(OP, "bias", "noaux_tc needs e_score_correction_bias"))?;
        check_len(OP, "bias", bias.len(), cfg.n_experts)?;
        if let Some((e, b)) = self.download(bias)?.into_iter().enumerate().find(|(_, b)| !b.is_finite()) {
            return Err(invalid(OP, "bias", format!("expert {e} has non-finite bias {b}")));
        }
        u32_of(OP, "tokens * n_experts", n)?;
        if tokens == 0 {
            return Ok(());
        }
        let st = self.imp.status()?;
        let (la, _gl) = self.imp.addr(&logits.imp);
        let (ba, _gb) = self.imp.addr(&bias.imp);
        let (ia, _gi) = self.imp.addr_mut(&mut indices.imp);
        let (wa, _gw) = self.imp.addr_mut(&mut weights.imp);
        let p = RouteNoauxTcParams {
            logits: la,
            bias: ba,
            indices: ia,
            weights: wa,
            status: st.addr,
            tokens: tokens as u32,
            n_experts: cfg.n_experts as u32,
            n_group: cfg.n_group as u32,
            topk_group: cfg.topk_group as u32,
            top_k: cfg.top_k as u32,
            norm_topk_prob: u32::from(cfg.norm_topk_prob),
            routed_scaling_factor: cfg.routed_scaling_factor,
            pad: 0,
        };
        // SAFETY: warp t < tokens reads row t of logits (tokens·n_experts, checked) and the
        // n_experts biases, and writes top_k entries of row t of indices and weights (both
        // tokens·top_k, distinct &mut buffers). The limits above keep every expert in the
        // warp's 8 slots, every group in a lane, every output in a lane and `kept` in 32 bits;
        // `cfg.validate` guarantees gs >= 2, topk_group <= n_group and enough experts for top_k.
        unsafe { self.imp.launch(kernel!(RouteNoauxTc), ((tokens as u32).div_ceil(4), 1), 128, &p)? };
        match st.read()? {
            None => Ok(()),
            Some(i) => {
                let v = self.download_range(logits, i as usize..i as usize + 1)?[0];
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
        let rows = plan.shape.pairs();
        check_len(OP, "out", out.len(), checked_mul(OP, "out", rows, hidden)?)?;
        let (rows32, hidden32) = (u32_of(OP, "rows", rows)?, u32_of(OP, "hidden", hidden)?);
        if rows == 0 {
            return Ok(());
        }
        let (xa, _gx) = self.imp.addr(&x.imp);
        let (ta, _gt) = self.imp.addr(&plan.token_of_slot.imp);
        let (oa, _go) = self.imp.addr_mut(&mut out.imp);
        let p = PermuteParams { x: xa, token_of_slot: ta, out: oa, rows: rows32, hidden: hidden32 };
        // SAFETY: the plan was built and validated on the host: token_of_slot has `rows`
        // entries, each < tokens, so x row reads stay in tokens·hidden; out is rows·hidden.
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

    /// `dsv3_gemm_fp8_simt`: [`crate::gemm::reference::gemm_fp8`] on the GPU, bit for bit:
    /// `out[m, n] = Σ_kb (Σ_k a·w) · a_s[m, kb] · w_s[n/128, kb]` on an activation quantised by
    /// [`CudaDevice::act_quant_1x128`]. The simple, always-available FP8 path.
    pub fn gemm_fp8(
        &self,
        a_q: &DeviceBuf<u8>,
        a_s: &DeviceBuf<f32>,
        w: &DeviceFp8Weight,
        shape: GemmShape,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        const OP: &str = "gemm_fp8";
        if w.rows != shape.n || w.cols != shape.k {
            return Err(shape_err(OP, format!("weight is [{}, {}], shape wants [n={}, k={}]", w.rows, w.cols, shape.n, shape.k)));
        }
        if !shape.k.is_multiple_of(BLOCK) {
            return Err(shape_err(OP, format!("the fp8 path needs k % 128 == 0, got k = {}", shape.k)));
        }
        check_len(OP, "a_q", a_q.len(), checked_mul(OP, "a_q", shape.m, shape.k)?)?;
        check_len(OP, "a_s", a_s.len(), shape.m * (shape.k / BLOCK))?;
        check_len(OP, "out", out.len(), checked_mul(OP, "out", shape.m, shape.n)?)?;
        let (m, n, k) = (u32_of(OP, "m", shape.m)?, u32_of(OP, "n", shape.n)?, u32_of(OP, "k", shape.k)?);
        if m.div_ceil(64) > 65_535 {
            return Err(shape_err(OP, format!("m = {m} exceeds the grid (at most 65535·64 rows)")));
        }
        if m == 0 {
            return Ok(());
        }
        let (aa, _ga) = self.imp.addr(&a_q.imp);
        let (asa, _gas) = self.imp.addr(&a_s.imp);
        let (wa, _gw) = self.imp.addr(&w.data.imp);
        let (wsa, _gws) = self.imp.addr(&w.scale_inv.imp);
        let (oa, _go) = self.imp.addr_mut(&mut out.imp);
        debug_assert_eq!(w.scale_inv.len(), blocks(w.rows) * blocks(w.cols));
        let p = GemmFp8SimtParams { a: aa, a_s: asa, w: wa, w_s: wsa, out: oa, m, n, k, pad: 0 };
        // SAFETY: a_q is m·k, the weight n·k with ceil(n/128)·k/128 scales (validated when it
        // was built), a_s is m·k/128, out m·n (checked); the kernel guards rows >= m and
        // columns >= n, and k is a multiple of 128, so every 8-byte chunk load is in bounds
        // and aligned (rows start at multiples of k bytes).
        unsafe { self.imp.launch(kernel!(GemmFp8Simt), (n.div_ceil(64), m.div_ceil(64)), 256, &p) }
    }
}

fn check_hidden(hidden: usize) -> Result<()> {
    if hidden == 0 { Err(shape_err("permute", "hidden must be >= 1")) } else { Ok(()) }
}
