//! Safe launch wrappers of the small ops, one per kernel: check every length and size against
//! the shape (the same checks and error values as the CPU function of the family), then one
//! `unsafe` launch whose `// SAFETY:` comment says why every access of the kernel is in bounds.

use super::params::*;
use super::{CudaDevice, DeviceBuf, stride_grid, u32_of};
use crate::embed::EmbedShape;
use crate::error::{Result, check_len, checked_mul, invalid, shape_err};
use crate::fp8::{ActQuantShape, BLOCK, ScaleFmt};
use crate::norm::RowsShape;
use crate::rope::{RopeLayout, RopeTable};

/// A RoPE cos/sin table in device memory ([`CudaDevice::rope_table`]).
#[derive(Debug)]
pub struct DeviceRope {
    cos: DeviceBuf<f32>,
    sin: DeviceBuf<f32>,
    rope_dim: usize,
    max_pos: usize,
}

/// The masked layout of an activation (gemm::grouped_masked): `capacity` rows per expert, the
/// first `counts[e]` of expert `e` live.
pub(crate) struct Masked<'a> {
    pub counts: &'a DeviceBuf<u32>,
    pub capacity: usize,
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
        match self.act_quant_rows(x, shape, fmt, None, q, scales)? {
            None => Ok(()),
            Some((r, c)) => Err(invalid("act_quant", "x", non_finite_detail(r, c))),
        }
    }

    /// `dsv3_act_quant_1x128` on all rows, or only the live rows of a masked layout; returns
    /// the (row, tile) of the first non-finite tile instead of an error, for callers that name
    /// it in their own terms.
    pub(crate) fn act_quant_rows(
        &self,
        x: &DeviceBuf<f32>,
        shape: ActQuantShape,
        fmt: ScaleFmt,
        masked: Option<Masked<'_>>,
        q: &mut DeviceBuf<u8>,
        scales: &mut DeviceBuf<f32>,
    ) -> Result<Option<(usize, usize)>> {
        const OP: &str = "act_quant";
        if shape.cols == 0 || !shape.cols.is_multiple_of(BLOCK) {
            return Err(shape_err(OP, format!("cols = {} must be a positive multiple of {BLOCK}", shape.cols)));
        }
        let n = checked_mul(OP, "x", shape.rows, shape.cols)?;
        check_len(OP, "x", x.len(), n)?;
        check_len(OP, "q", q.len(), n)?;
        check_len(OP, "scales", scales.len(), shape.rows * shape.tiles())?;
        let tiles = u32_of(OP, "tiles", n / BLOCK)?;
        let (counts, capacity) = match &masked {
            Some(m) => {
                if m.capacity == 0 || !shape.rows.is_multiple_of(m.capacity) || m.counts.len() != shape.rows / m.capacity {
                    return Err(shape_err(
                        OP,
                        format!("{} rows are not {} experts of capacity {}", shape.rows, m.counts.len(), m.capacity),
                    ));
                }
                (Some(m.counts), u32_of(OP, "capacity", m.capacity)?)
            }
            None => (None, 0),
        };
        if tiles == 0 {
            return Ok(None);
        }
        let st = self.imp.status(kernel!(ActQuant1x128))?;
        let (xa, _gx) = self.imp.addr(&x.imp);
        let (qa, _gq) = self.imp.addr_mut(&mut q.imp);
        let (sa, _gs) = self.imp.addr_mut(&mut scales.imp);
        let (ca, _gc) = self.imp.addr_opt(counts.map(|c| &c.imp));
        let ue8m0 = u32::from(fmt == ScaleFmt::Ue8m0);
        let tiles_per_row = (shape.cols / BLOCK) as u32;
        let p = ActQuant1x128Params { x: xa, q: qa, scales: sa, status: st.addr, counts: ca, tiles, ue8m0, tiles_per_row, capacity };
        // SAFETY: x and q hold tiles·128 elements, scales holds `tiles` (checked above); warp w
        // of block b touches only tile 8b + w, and only when it is < tiles. With counts, it is
        // `rows / capacity` entries long and the kernel reads entry row / capacity < that.
        // q and scales are distinct buffers borrowed mutably, x and counts are not written.
        unsafe { self.imp.launch(kernel!(ActQuant1x128), (tiles.div_ceil(8), 1), 256, &p)? };
        Ok(st.read()?.map(|t| (t as usize / shape.tiles(), t as usize % shape.tiles())))
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
        let st = self.imp.status(kernel!(EmbeddingBf16))?;
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
        let st = self.imp.status(kernel!(Rope))?;
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

    /// `dsv3_add_assign`: `acc += x` element-wise (the Backend's `add_assign`), bit for bit.
    pub fn add_assign(&self, acc: &mut DeviceBuf<f32>, x: &DeviceBuf<f32>) -> Result<()> {
        const OP: &str = "add_assign";
        check_len(OP, "x", x.len(), acc.len())?;
        let n = u32_of(OP, "len", acc.len())?;
        if n == 0 {
            return Ok(());
        }
        let (aa, _ga) = self.imp.addr_mut(&mut acc.imp);
        let (xa, _gx) = self.imp.addr(&x.imp);
        let p = AddAssignParams { acc: aa, x: xa, n, pad: 0 };
        // SAFETY: acc and x hold n elements (checked); the grid-stride loop touches i < n of
        // each; acc is a &mut buffer, so x (a shared borrow) cannot alias it.
        unsafe { self.imp.launch(kernel!(AddAssign), (stride_grid(n as usize, 256), 1), 256, &p) }
    }

    /// `dsv3_softmax`: [`crate::act::softmax`] on the GPU, bit for bit (the fast CPU version's
    /// 16-lane sums in its order; a row with no finite maximum gives 1/n, or NaN with a NaN).
    pub fn softmax(&self, x: &DeviceBuf<f32>, shape: RowsShape, out: &mut DeviceBuf<f32>) -> Result<()> {
        const OP: &str = "softmax";
        let len = shape.len(OP)?;
        check_len(OP, "x", x.len(), len)?;
        check_len(OP, "out", out.len(), len)?;
        let (rows, cols) = (u32_of(OP, "rows", shape.rows)?, u32_of(OP, "cols", shape.cols)?);
        u32_of(OP, "rows * cols", len)?;
        if rows == 0 {
            return Ok(());
        }
        let (xa, _gx) = self.imp.addr(&x.imp);
        let (oa, _go) = self.imp.addr_mut(&mut out.imp);
        let p = SoftmaxParams { x: xa, out: oa, rows, cols };
        // SAFETY: x and out hold rows·cols elements (checked); block r reads row r of x and
        // reads and writes row r of out only; out is a distinct &mut buffer.
        unsafe { self.imp.launch(kernel!(Softmax), (rows, 1), 256, &p) }
    }
}

/// The CPU's message for a non-finite activation tile.
pub(crate) fn non_finite_detail(row: usize, tile: usize) -> String {
    format!("non-finite value in row {row}, columns {}..{}", tile * BLOCK, (tile + 1) * BLOCK)
}
