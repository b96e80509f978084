//! GEMM wrappers: `out[M, N] = a[M, K] · W[N, K]ᵀ` against an FP8 block-scaled weight on both
//! numeric paths (dense and grouped for MoE experts) and against a bf16 weight. Plain SIMT
//! kernels, bit-exact with the plain-loop references (the Hopper-speed GEMM is separate):
//!
//! | path | kernel | equals |
//! |---|---|---|
//! | Reference | `dsv3_gemm_dequant_simt(_grouped)` | [`crate::gemm::reference::gemm_dequant`] |
//! | Fp8 | `dsv3_act_quant_1x128` + `dsv3_gemm_fp8_simt(_grouped)` | [`crate::gemm::reference::gemm`] (fp8 path) |
//! | bf16 weight | `dsv3_gemm_bf16_simt` | [`crate::dense::reference::gemm_bf16`] |
//!
//! The grouped forms take a tile list (expert, first row, rows ≤ 64) built on the host from
//! the offsets or counts, which are downloaded first (they are validated as the CPU does).

use super::ops::{Masked, non_finite_detail};
use super::params::*;
use super::{CudaDevice, DeviceBuf, grid_yz, imp, u32_of};
use crate::dense::Bf16WeightRef;
use crate::error::{Result, check_len, checked_mul, invalid, shape_err};
use crate::fp8::{ActQuantShape, BLOCK, Fp8WeightRef, ScaleFmt, blocks};
use crate::gemm::{GemmPath, GemmShape, GroupedShape};

/// Output tile edge of the SIMT GEMMs (rows and columns per block).
const TILE: usize = 64;

/// A validated block-scaled FP8 weight in device memory ([`CudaDevice::upload_fp8_weight`]).
#[derive(Debug)]
pub struct DeviceFp8Weight {
    rows: usize,
    cols: usize,
    data: DeviceBuf<u8>,
    scale_inv: DeviceBuf<f32>,
}

impl DeviceFp8Weight {
    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
}

/// A validated bf16 weight in device memory ([`CudaDevice::upload_bf16_weight`]).
#[derive(Debug)]
pub struct DeviceBf16Weight {
    rows: usize,
    cols: usize,
    data: DeviceBuf<half::bf16>,
}

impl DeviceBf16Weight {
    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
    pub(crate) fn data(&self) -> &DeviceBuf<half::bf16> {
        &self.data
    }
}

/// The grouped GEMMs' device tables: the tile list and the experts' weight addresses (with
/// the access records of those weights, kept until the launch).
struct Groups<'a> {
    tiles: imp::Buf,
    experts: imp::Buf,
    n_tiles: u32,
    _weights: Vec<imp::Access<'a>>,
}

impl CudaDevice {
    /// Uploads a validated FP8 weight (codes and `scale_inv`).
    pub fn upload_fp8_weight(&self, w: Fp8WeightRef<'_>) -> Result<DeviceFp8Weight> {
        Ok(DeviceFp8Weight { rows: w.rows(), cols: w.cols(), data: self.upload(w.data())?, scale_inv: self.upload(w.scale_inv())? })
    }

    /// Uploads a validated bf16 weight.
    pub fn upload_bf16_weight(&self, w: Bf16WeightRef<'_>) -> Result<DeviceBf16Weight> {
        Ok(DeviceBf16Weight { rows: w.rows(), cols: w.cols(), data: self.upload(w.data())? })
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
        check_len(OP, "a_q", a_q.len(), checked_mul(OP, "a_q", shape.m, shape.k)?)?;
        shape.check(OP, GemmPath::Fp8, a_q.len(), w.shape(), out.len())?;
        check_len(OP, "a_s", a_s.len(), shape.m * (shape.k / BLOCK))?;
        self.launch_fp8(a_q, a_s, w, shape, out)
    }

    /// `dsv3_gemm_fp8_simt` after the checks.
    fn launch_fp8(
        &self,
        a_q: &DeviceBuf<u8>,
        a_s: &DeviceBuf<f32>,
        w: &DeviceFp8Weight,
        s: GemmShape,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        const OP: &str = "gemm_fp8";
        let (m, n, k) = (u32_of(OP, "m", s.m)?, u32_of(OP, "n", s.n)?, u32_of(OP, "k", s.k)?);
        let gy = grid_yz(OP, "m", s.m, TILE)?;
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
        // was built), a_s is m·k/128, out m·n (checked by the caller); the kernel guards rows
        // >= m and columns >= n, and k is a multiple of 128, so every 8-byte chunk load is in
        // bounds and aligned (rows start at multiples of k bytes).
        unsafe { self.imp.launch(kernel!(GemmFp8Simt), (n.div_ceil(64), gy), 256, &p) }
    }

    /// `dsv3_gemm_dequant_simt`: [`crate::gemm::reference::gemm_dequant`] on the GPU, bit for
    /// bit: the Reference path, `a` f32 against the dequantised weight, any K.
    pub fn gemm_dequant(&self, a: &DeviceBuf<f32>, w: &DeviceFp8Weight, shape: GemmShape, out: &mut DeviceBuf<f32>) -> Result<()> {
        shape.check("gemm_dequant", GemmPath::Reference, a.len(), w.shape(), out.len())?;
        self.launch_dequant(a, w, shape, out)
    }

    /// `dsv3_gemm_dequant_simt` after the checks.
    fn launch_dequant(&self, a: &DeviceBuf<f32>, w: &DeviceFp8Weight, s: GemmShape, out: &mut DeviceBuf<f32>) -> Result<()> {
        const OP: &str = "gemm_dequant";
        let (m, n, k) = (u32_of(OP, "m", s.m)?, u32_of(OP, "n", s.n)?, u32_of(OP, "k", s.k)?);
        let gy = grid_yz(OP, "m", s.m, TILE)?;
        if m == 0 {
            return Ok(());
        }
        let (aa, _ga) = self.imp.addr(&a.imp);
        let (wa, _gw) = self.imp.addr(&w.data.imp);
        let (wsa, _gws) = self.imp.addr(&w.scale_inv.imp);
        let (oa, _go) = self.imp.addr_mut(&mut out.imp);
        let p = GemmDequantSimtParams { a: aa, w: wa, w_s: wsa, out: oa, m, n, k, pad: 0 };
        // SAFETY: a is m·k, the weight n·k codes with ceil(n/128)·ceil(k/128) scales (validated
        // when built), out m·n (checked by the caller); the kernel reads row r < m of a and
        // r < n of the weight, element kk < k only, and writes out[m', n'] for m' < m, n' < n.
        unsafe { self.imp.launch(kernel!(GemmDequantSimt), (n.div_ceil(64), gy), 256, &p) }
    }

    /// [`crate::gemm::gemm`] on the GPU: the Reference path through `dsv3_gemm_dequant_simt`,
    /// the Fp8 path through `dsv3_act_quant_1x128` and `dsv3_gemm_fp8_simt`; both bit-exact
    /// with [`crate::gemm::reference::gemm`]. Errors as the CPU's (a non-finite activation on
    /// the fp8 path names its row and columns).
    pub fn gemm(&self, a: &DeviceBuf<f32>, w: &DeviceFp8Weight, shape: GemmShape, path: GemmPath, out: &mut DeviceBuf<f32>) -> Result<()> {
        const OP: &str = "gemm";
        shape.check(OP, path, a.len(), w.shape(), out.len())?;
        match path {
            GemmPath::Reference => self.launch_dequant(a, w, shape, out),
            GemmPath::Fp8 => {
                if shape.m == 0 {
                    return Ok(());
                }
                let qs = ActQuantShape { rows: shape.m, cols: shape.k };
                let (mut q, mut sc) = (self.zeros::<u8>(a.len())?, self.zeros::<f32>(shape.m * qs.tiles())?);
                if let Some((r, t)) = self.act_quant_rows(a, qs, ScaleFmt::Float, None, &mut q, &mut sc)? {
                    return Err(invalid(OP, "a", non_finite_detail(r, t)));
                }
                self.launch_fp8(&q, &sc, w, shape, out)
            }
        }
    }

    /// `dsv3_gemm_bf16_simt`: [`crate::dense::reference::gemm_bf16`] on the GPU, bit for bit
    /// (the router in f32, lm_head, the MLA up-projections).
    pub fn gemm_bf16(&self, a: &DeviceBuf<f32>, w: &DeviceBf16Weight, s: GemmShape, out: &mut DeviceBuf<f32>) -> Result<()> {
        const OP: &str = "gemm_bf16";
        // The bf16 GEMM's checks are the Reference path's (no K constraint), with its name.
        s.check(OP, GemmPath::Reference, a.len(), w.shape(), out.len())?;
        let (m, n, k) = (u32_of(OP, "m", s.m)?, u32_of(OP, "n", s.n)?, u32_of(OP, "k", s.k)?);
        let gy = grid_yz(OP, "m", s.m, TILE)?;
        if m == 0 {
            return Ok(());
        }
        let (aa, _ga) = self.imp.addr(&a.imp);
        let (wa, _gw) = self.imp.addr(&w.data.imp);
        let (oa, _go) = self.imp.addr_mut(&mut out.imp);
        let p = GemmBf16SimtParams { a: aa, w: wa, out: oa, m, n, k, pad: 0 };
        // SAFETY: a is m·k, w n·k (its shape was checked against s), out m·n; the kernel reads
        // rows < m / < n and elements < k only, and writes out[m', n'] with m' < m, n' < n.
        unsafe { self.imp.launch(kernel!(GemmBf16Simt), (n.div_ceil(64), gy), 256, &p) }
    }

    /// [`crate::gemm::grouped_contiguous`] on the GPU: expert `e` multiplies rows
    /// `offsets[e]..offsets[e+1]` of `a`; bit-exact with the reference per path. The offsets
    /// are downloaded and validated as the CPU does.
    pub fn grouped_contiguous(
        &self,
        a: &DeviceBuf<f32>,
        offsets: &DeviceBuf<u32>,
        w: &[&DeviceFp8Weight],
        path: GemmPath,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        const OP: &str = "grouped_contiguous";
        let host = self.download(offsets)?;
        let shapes: Vec<(usize, usize)> = w.iter().map(|x| x.shape()).collect();
        let g = GroupedShape::contiguous(OP, a.len(), &host, &shapes, out.len())?;
        check_fp8_k(OP, path, g.k)?;
        let rows = host[w.len()] as usize;
        let spans: Vec<(usize, usize)> = host.windows(2).map(|r| (r[0] as usize, (r[1] - r[0]) as usize)).collect();
        let Some(groups) = self.groups(OP, &spans, w)? else { return Ok(()) };
        let fp8 = match path {
            GemmPath::Reference => None,
            GemmPath::Fp8 => {
                let qs = ActQuantShape { rows, cols: g.k };
                let (mut q, mut sc) = (self.zeros::<u8>(a.len())?, self.zeros::<f32>(rows * qs.tiles())?);
                if let Some((r, t)) = self.act_quant_rows(a, qs, ScaleFmt::Float, None, &mut q, &mut sc)? {
                    return Err(invalid(OP, "a", non_finite_detail(r, t)));
                }
                Some((q, sc))
            }
        };
        self.launch_grouped(a, fp8.as_ref(), &groups, g, rows, out)
    }

    /// [`crate::gemm::grouped_masked`] on the GPU: `a` is `[E, capacity, K]`, expert `e`
    /// multiplies its first `counts[e]` rows, the other rows of `out` are zero; bit-exact with
    /// the reference per path. The counts are downloaded and validated as the CPU does; on the
    /// fp8 path only the live rows are quantised (and a non-finite one is named by its row
    /// among the live rows, as the CPU names it).
    pub fn grouped_masked(
        &self,
        a: &DeviceBuf<f32>,
        counts: &DeviceBuf<u32>,
        capacity: usize,
        w: &[&DeviceFp8Weight],
        path: GemmPath,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        const OP: &str = "grouped_masked";
        let host = self.download(counts)?;
        let shapes: Vec<(usize, usize)> = w.iter().map(|x| x.shape()).collect();
        let g = GroupedShape::masked(OP, a.len(), &host, capacity, &shapes, out.len())?;
        check_fp8_k(OP, path, g.k)?;
        self.fill_zero(out)?;
        let spans: Vec<(usize, usize)> = host.iter().enumerate().map(|(e, &c)| (e * capacity, c as usize)).collect();
        let Some(groups) = self.groups(OP, &spans, w)? else { return Ok(()) };
        let rows = w.len() * capacity;
        let fp8 = match path {
            GemmPath::Reference => None,
            GemmPath::Fp8 => {
                let qs = ActQuantShape { rows, cols: g.k };
                let (mut q, mut sc) = (self.zeros::<u8>(a.len())?, self.zeros::<f32>(rows * qs.tiles())?);
                let m = Masked { counts, capacity };
                if let Some((r, t)) = self.act_quant_rows(a, qs, ScaleFmt::Float, Some(m), &mut q, &mut sc)? {
                    // The CPU packs the live rows first (and quantises in grouped_contiguous).
                    let (e, i) = (r / capacity, r % capacity);
                    let packed = host[..e].iter().map(|&c| c as usize).sum::<usize>() + i;
                    return Err(invalid("grouped_contiguous", "a", non_finite_detail(packed, t)));
                }
                Some((q, sc))
            }
        };
        self.launch_grouped(a, fp8.as_ref(), &groups, g, rows, out)
    }

    /// The tile list (tiles of at most 64 rows of each `(first row, rows)` span, expert = span
    /// index) and the experts' weight table, uploaded; `None` when there is no row.
    fn groups<'a>(&'a self, op: &'static str, spans: &[(usize, usize)], w: &[&'a DeviceFp8Weight]) -> Result<Option<Groups<'a>>> {
        let mut tiles = Vec::new();
        for (e, &(r0, n)) in spans.iter().enumerate() {
            for t0 in (0..n).step_by(TILE) {
                let row0 = u32_of(op, "rows", r0 + t0)?;
                tiles.push(GemmTile { expert: e as u32, row0, rows: TILE.min(n - t0) as u32, pad: 0 });
            }
        }
        if tiles.is_empty() {
            return Ok(None);
        }
        let n_tiles = grid_yz(op, "row tiles", tiles.len(), 1)?;
        let (mut experts, mut guards) = (Vec::with_capacity(w.len()), Vec::with_capacity(2 * w.len()));
        for x in w {
            let (wa, gw) = self.imp.addr(&x.data.imp);
            let (sa, gs) = self.imp.addr(&x.scale_inv.imp);
            experts.push(GemmExpert { w: wa, w_s: sa });
            guards.extend([gw, gs]);
        }
        Ok(Some(Groups { tiles: self.upload_pod(&tiles)?, experts: self.upload_pod(&experts)?, n_tiles, _weights: guards }))
    }

    /// `dsv3_gemm_dequant_simt_grouped` (Reference path: `fp8` is None) or
    /// `dsv3_gemm_fp8_simt_grouped` (the quantised activation and its scales).
    fn launch_grouped(
        &self,
        a: &DeviceBuf<f32>,
        fp8: Option<&(DeviceBuf<u8>, DeviceBuf<f32>)>,
        g: &Groups<'_>,
        shape: GroupedShape,
        rows: usize,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        const OP: &str = "grouped_gemm";
        let (n, k) = (u32_of(OP, "n", shape.n)?, u32_of(OP, "k", shape.k)?);
        u32_of(OP, "rows", rows)?;
        let (ta, _gt) = self.imp.addr(&g.tiles);
        let (ea, _ge) = self.imp.addr(&g.experts);
        let (oa, _go) = self.imp.addr_mut(&mut out.imp);
        let grid = (n.div_ceil(64), g.n_tiles);
        match fp8 {
            None => {
                let (aa, _ga) = self.imp.addr(&a.imp);
                let p = GemmDequantSimtGroupedParams { a: aa, experts: ea, tiles: ta, out: oa, n, k };
                // SAFETY: every tile covers rows row0..row0+rows (<= 64) inside the validated
                // `rows` of a ([rows, k]) and out ([rows, n]), with an expert index < the length
                // of the experts table, whose entries are live weights of shape [n, k] (checked
                // equal for all experts) kept borrowed by the caller for this call.
                unsafe { self.imp.launch(kernel!(GemmDequantSimtGrouped), grid, 256, &p) }
            }
            Some((q, sc)) => {
                let (qa, _gq) = self.imp.addr(&q.imp);
                let (sa, _gs) = self.imp.addr(&sc.imp);
                let p = GemmFp8SimtGroupedParams { a: qa, a_s: sa, experts: ea, tiles: ta, out: oa, n, k };
                // SAFETY: as the Reference path, with the codes [rows, k] and scales
                // [rows, k/128] of the activation; k % 128 == 0 (checked), so the 8-byte chunk
                // loads are in bounds and aligned.
                unsafe { self.imp.launch(kernel!(GemmFp8SimtGrouped), grid, 256, &p) }
            }
        }
    }
}

/// The fp8 path's constraint on K, with the CPU's message.
fn check_fp8_k(op: &'static str, path: GemmPath, k: usize) -> Result<()> {
    if path == GemmPath::Fp8 && !k.is_multiple_of(BLOCK) {
        return Err(shape_err(op, format!("the fp8 path needs k % 128 == 0, got k = {k}")));
    }
    Ok(())
}
