//! GEMM wrappers: `out[M, N] = a[M, K] · W[N, K]ᵀ` against an FP8 block-scaled weight on both
//! numeric paths (dense and grouped for MoE experts) and against a bf16 weight. The fp8 path
//! runs on the Hopper kernel of [`super::sm90_gemm`] where its router has the shape, and on
//! plain SIMT kernels, bit-exact with the plain-loop references, otherwise
//! ([`super::sm90_gemm::gemm_route`] decides on the host; the `*_routed` forms return the
//! route taken):
//!
//! | path | kernel | equals |
//! |---|---|---|
//! | Reference | `dsv3_gemm_dequant_simt(_grouped)` | [`crate::gemm::reference::gemm_dequant`] |
//! | Fp8, an sm90 (N, K), weights one run of a stack | `dsv3_act_quant_1x128` + `dsv3_sm90_fp8_gemm_*` | the CPU fp8 path up to the order of the sums inside each 128-wide block |
//! | Fp8, otherwise | `dsv3_act_quant_1x128` + `dsv3_gemm_fp8_simt(_grouped)` | [`crate::gemm::reference::gemm`] (fp8 path) |
//! | bf16 weight | `dsv3_gemm_bf16_simt` | [`crate::dense::reference::gemm_bf16`] |
//!
//! Every FP8 weight is an entry of a [`DeviceFp8Stack`] ([`DeviceFp8Weight`]), which both
//! kernel families read in place. The grouped SIMT forms take a tile list (expert, first row,
//! rows ≤ 64) built on the host from the offsets or counts, which are downloaded first (they
//! are validated as the CPU does); the sm90 kernel takes the offsets or counts themselves.

use super::ops::{Masked, non_finite_detail};
use super::params::*;
use super::sm90_gemm::{DeviceFp8Stack, Fp8Route, GemmRoute, Sm90Fallback, Sm90Layout, Sm90Out, StackRange, fp8_route};
use super::{CudaDevice, DeviceBuf, DevicePlan, grid_yz, imp, u32_of};
use crate::dense::Bf16WeightRef;
use crate::error::{Result, check_len, checked_mul, invalid, shape_err};
use crate::fp8::{ActQuantShape, BLOCK, Fp8WeightRef, ScaleFmt, blocks};
use crate::gemm::{GemmPath, GemmShape, GroupedShape};
use std::sync::Arc;

/// Output tile edge of the SIMT GEMMs (rows and columns per block).
const TILE: usize = 64;

/// Most rows (token-expert pairs) a planned grouped GEMM schedules on the device
/// ([`CudaDevice::grouped_planned`]): 128 tokens of top-8, the largest decode batch.
pub const DEVICE_TILES_MAX_ROWS: usize = 1024;

/// A validated block-scaled FP8 weight in device memory: entry `index` of a weight stack
/// ([`DeviceFp8Stack`]), whose device memory it shares with the stack's other entries. A weight
/// uploaded alone ([`CudaDevice::upload_fp8_weight`]) is a stack of one; the experts of one
/// projection uploaded together ([`CudaDevice::upload_fp8_experts`]) are entries `0..E` of one
/// stack, which the grouped GEMMs hand to the sm90 kernel as one `[E·N, K]` matrix. Every
/// kernel, simple or sm90, reads the weight where it is: no weight is held twice.
#[derive(Debug)]
pub struct DeviceFp8Weight {
    stack: Arc<DeviceFp8Stack>,
    /// `< stack.groups`.
    index: usize,
}

impl DeviceFp8Weight {
    /// Entry `index` of `stack` (`index < stack.groups`, which the callers guarantee).
    pub(super) fn entry(stack: Arc<DeviceFp8Stack>, index: usize) -> DeviceFp8Weight {
        // The launches' SAFETY arguments rely on it (offsets inside the stack's buffers).
        assert!(index < stack.groups, "stack entry {index} of {}", stack.groups);
        DeviceFp8Weight { stack, index }
    }
    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.stack.n, self.stack.k)
    }
    /// The stack this weight is an entry of (what [`CudaDevice::sm90_fp8_gemm`] takes).
    pub fn stack(&self) -> &DeviceFp8Stack {
        &self.stack
    }
    /// Its entry in [`Self::stack`].
    pub fn index(&self) -> usize {
        self.index
    }
    /// Byte offsets of its codes and its scales from the starts of the stack's buffers.
    fn offsets(&self) -> (u64, u64) {
        let (n, k) = self.shape();
        ((self.index * n * k) as u64, (self.index * blocks(n) * blocks(k) * size_of::<f32>()) as u64)
    }
    /// Device addresses of its codes and scales, with the access records of the stack's buffers.
    fn addrs<'a>(&'a self, dev: &'a CudaDevice) -> ((u64, imp::Access<'a>), (u64, imp::Access<'a>)) {
        let (wo, so) = self.offsets();
        let (wa, gw) = dev.imp.addr(&self.stack.data.imp);
        let (sa, gs) = dev.imp.addr(&self.stack.scale_inv.imp);
        ((wa + wo, gw), (sa + so, gs))
    }
}

/// `w` as one range of a stack, when its weights are consecutive entries `i, i+1, ...` of one
/// stack (a MoE layer's experts uploaded together, or a run of them; any single weight).
fn stack_run<'a>(w: &[&'a DeviceFp8Weight]) -> Option<StackRange<'a>> {
    let first = w.first()?;
    if !is_run(w.iter().map(|x| (Arc::as_ptr(&x.stack), x.index))) {
        return None;
    }
    StackRange::new(&first.stack, first.index, w.len())
}

/// Whether `(stack, index)` pairs name consecutive entries of one stack (none: no).
fn is_run<S: PartialEq>(mut ids: impl Iterator<Item = (S, usize)>) -> bool {
    let Some((s0, i0)) = ids.next() else { return false };
    ids.enumerate().all(|(j, (s, i))| s == s0 && i0.checked_add(j + 1) == Some(i))
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
    /// Uploads a validated FP8 weight (codes and `scale_inv`): a stack of one.
    pub fn upload_fp8_weight(&self, w: Fp8WeightRef<'_>) -> Result<DeviceFp8Weight> {
        Ok(DeviceFp8Weight::entry(Arc::new(self.upload_fp8_stack(&[w])?), 0))
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
        let ((wa, _gw), (wsa, _gws)) = w.addrs(self);
        let (oa, _go) = self.imp.addr_mut(&mut out.imp);
        if w.stack.scale_inv.len() != w.stack.groups * blocks(s.n) * blocks(s.k) {
            return Err(crate::error::shape_err(OP, "the weight's scales do not match its stack"));
        }
        let p = GemmFp8SimtParams { a: aa, a_s: asa, w: wa, w_s: wsa, out: oa, m, n, k, pad: 0 };
        // SAFETY: a_q is m·k, the weight n·k codes with ceil(n/128)·k/128 scales (validated
        // when it was built; entry `index` < groups of its stack, so they lie at its offsets
        // inside the stack's buffers), a_s is m·k/128, out m·n (checked by the caller); the
        // kernel guards rows >= m and columns >= n, and k is a multiple of 128, so every 8-byte
        // chunk load is in bounds and aligned (rows and entries start at multiples of k bytes).
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
        let ((wa, _gw), (wsa, _gws)) = w.addrs(self);
        let (oa, _go) = self.imp.addr_mut(&mut out.imp);
        let p = GemmDequantSimtParams { a: aa, w: wa, w_s: wsa, out: oa, m, n, k, pad: 0 };
        // SAFETY: a is m·k, the weight n·k codes with ceil(n/128)·ceil(k/128) scales (validated
        // when built, at its entry's offsets inside its stack's buffers), out m·n (checked by
        // the caller); the kernel reads row r < m of a and r < n of the weight, element kk < k
        // only, and writes out[m', n'] for m' < m, n' < n.
        unsafe { self.imp.launch(kernel!(GemmDequantSimt), (n.div_ceil(64), gy), 256, &p) }
    }

    /// [`crate::gemm::gemm`] on the GPU (what `Backend::gemm` runs): the Reference path
    /// through `dsv3_gemm_dequant_simt`, bit-exact with [`crate::gemm::reference::gemm`]; the
    /// Fp8 path through `dsv3_act_quant_1x128`, then the sm90 kernel where
    /// [`super::sm90_gemm::gemm_route`] gives it (DeepSeek-V3's (N, K): the CPU fp8 path up to
    /// the order of the sums inside each 128-wide block) and `dsv3_gemm_fp8_simt` otherwise
    /// (bit-exact with the reference). Errors as the CPU's (a non-finite activation on the
    /// fp8 path names its row and columns).
    pub fn gemm(&self, a: &DeviceBuf<f32>, w: &DeviceFp8Weight, shape: GemmShape, path: GemmPath, out: &mut DeviceBuf<f32>) -> Result<()> {
        self.gemm_routed(a, w, shape, path, out).map(|_| ())
    }

    /// [`Self::gemm`], returning the route it took.
    pub fn gemm_routed(
        &self,
        a: &DeviceBuf<f32>,
        w: &DeviceFp8Weight,
        shape: GemmShape,
        path: GemmPath,
        out: &mut DeviceBuf<f32>,
    ) -> Result<GemmRoute> {
        const OP: &str = "gemm";
        shape.check(OP, path, a.len(), w.shape(), out.len())?;
        if path == GemmPath::Reference {
            self.launch_dequant(a, w, shape, out)?;
            return Ok(GemmRoute::Dequant);
        }
        let run = stack_run(&[w]);
        let fp8 = fp8_route(shape.n, shape.k, 1, Sm90Layout::Dense { m: shape.m }, run.is_some())?;
        if shape.m == 0 {
            return Ok(fp8.route());
        }
        let qs = ActQuantShape { rows: shape.m, cols: shape.k };
        let (mut q, mut sc) = (self.zeros::<u8>(a.len())?, self.zeros::<f32>(shape.m * qs.tiles())?);
        if let Some((r, t)) = self.act_quant_rows(a, qs, ScaleFmt::Float, None, &mut q, &mut sc)? {
            return Err(invalid(OP, "a", non_finite_detail(r, t)));
        }
        let route = self.try_sm90(&fp8, run, &q, &sc, out)?;
        if let GemmRoute::Fp8Simt(_) = route {
            self.launch_fp8(&q, &sc, w, shape, out)?;
        }
        Ok(route)
    }

    /// Runs the sm90 kernel when `fp8` routes there, `run` holds the weights and the buffers
    /// are aligned for TMA; returns the route taken, and on [`GemmRoute::Fp8Simt`] the caller
    /// runs the simple kernel (nothing was launched).
    fn try_sm90(
        &self,
        fp8: &Fp8Route,
        run: Option<StackRange<'_>>,
        q: &DeviceBuf<u8>,
        sc: &DeviceBuf<f32>,
        out: &mut DeviceBuf<f32>,
    ) -> Result<GemmRoute> {
        const OP: &str = "sm90_fp8_gemm";
        let (Fp8Route::Sm90(c, plan), Some(run)) = (fp8, run) else {
            return Ok(match fp8 {
                Fp8Route::Sm90(..) => GemmRoute::Fp8Simt(Sm90Fallback::Weights),
                Fp8Route::Simt(why) => GemmRoute::Fp8Simt(*why),
            });
        };
        if !self.sm90_aligned(q, run) {
            return Ok(GemmRoute::Fp8Simt(Sm90Fallback::Alignment));
        }
        check_len(OP, "a_q", q.len(), checked_mul(OP, "a_q", plan.rows, c.k)?)?;
        check_len(OP, "a_s", sc.len(), plan.rows * (c.k / BLOCK))?;
        check_len(OP, "out", out.len(), checked_mul(OP, "out", plan.rows, c.n)?)?;
        self.sm90_launch_tma(plan, *c, q, sc, run, &mut Sm90Out::F32(out))?;
        Ok(GemmRoute::Sm90(*c))
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

    /// [`crate::gemm::grouped_contiguous`] on the GPU (what `Backend::grouped_gemm_contiguous`
    /// runs): expert `e` multiplies rows `offsets[e]..offsets[e+1]` of `a`. The Reference path
    /// and the Fp8 path on the simple kernel are bit-exact with the reference; the Fp8 path
    /// takes the sm90 kernel (one launch for all experts) where
    /// [`super::sm90_gemm::gemm_route`] gives it: an sm90 (N, K), at most 256 experts, and
    /// weights that are consecutive entries of one stack ([`CudaDevice::upload_fp8_experts`]).
    /// The offsets are downloaded and validated as the CPU does.
    pub fn grouped_contiguous(
        &self,
        a: &DeviceBuf<f32>,
        offsets: &DeviceBuf<u32>,
        w: &[&DeviceFp8Weight],
        path: GemmPath,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        self.grouped_contiguous_routed(a, offsets, w, path, out).map(|_| ())
    }

    /// [`Self::grouped_contiguous`], returning the route it took.
    pub fn grouped_contiguous_routed(
        &self,
        a: &DeviceBuf<f32>,
        offsets: &DeviceBuf<u32>,
        w: &[&DeviceFp8Weight],
        path: GemmPath,
        out: &mut DeviceBuf<f32>,
    ) -> Result<GemmRoute> {
        const OP: &str = "grouped_contiguous";
        let host = self.host_copy(offsets)?;
        let shapes: Vec<(usize, usize)> = w.iter().map(|x| x.shape()).collect();
        let g = GroupedShape::contiguous(OP, a.len(), &host, &shapes, out.len())?;
        check_fp8_k(OP, path, g.k)?;
        let rows = host[w.len()] as usize;
        let spans: Vec<(usize, usize)> = host.windows(2).map(|r| (r[0] as usize, (r[1] - r[0]) as usize)).collect();
        if path == GemmPath::Reference {
            if let Some(groups) = self.groups(OP, &spans, w)? {
                self.launch_grouped(a, None, &groups, g, rows, out)?;
            }
            return Ok(GemmRoute::Dequant);
        }
        let run = stack_run(w);
        let fp8 = fp8_route(g.n, g.k, w.len(), Sm90Layout::Contiguous { offsets: &host }, run.is_some())?;
        if rows == 0 {
            return Ok(fp8.route());
        }
        let qs = ActQuantShape { rows, cols: g.k };
        let (mut q, mut sc) = (self.zeros::<u8>(a.len())?, self.zeros::<f32>(rows * qs.tiles())?);
        if let Some((r, t)) = self.act_quant_rows(a, qs, ScaleFmt::Float, None, &mut q, &mut sc)? {
            return Err(invalid(OP, "a", non_finite_detail(r, t)));
        }
        let route = self.try_sm90(&fp8, run, &q, &sc, out)?;
        if let GemmRoute::Fp8Simt(_) = route
            && let Some(groups) = self.groups(OP, &spans, w)?
        {
            self.launch_grouped(a, Some(&(q, sc)), &groups, g, rows, out)?;
        }
        Ok(route)
    }

    /// [`crate::gemm::grouped_masked`] on the GPU (what `Backend::grouped_gemm_masked` runs):
    /// `a` is `[E, capacity, K]`, expert `e` multiplies its first `counts[e]` rows, the other
    /// rows of `out` are zero. Routed as [`Self::grouped_contiguous`] (the sm90 kernel writes
    /// the zero rows itself). The counts are downloaded and validated as the CPU does; on the
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
        self.grouped_masked_routed(a, counts, capacity, w, path, out).map(|_| ())
    }

    /// [`Self::grouped_masked`], returning the route it took.
    pub fn grouped_masked_routed(
        &self,
        a: &DeviceBuf<f32>,
        counts: &DeviceBuf<u32>,
        capacity: usize,
        w: &[&DeviceFp8Weight],
        path: GemmPath,
        out: &mut DeviceBuf<f32>,
    ) -> Result<GemmRoute> {
        const OP: &str = "grouped_masked";
        let host = self.host_copy(counts)?;
        let shapes: Vec<(usize, usize)> = w.iter().map(|x| x.shape()).collect();
        let g = GroupedShape::masked(OP, a.len(), &host, capacity, &shapes, out.len())?;
        check_fp8_k(OP, path, g.k)?;
        let spans: Vec<(usize, usize)> = host.iter().enumerate().map(|(e, &c)| (e * capacity, c as usize)).collect();
        let rows = w.len() * capacity;
        if path == GemmPath::Reference {
            self.fill_zero(out)?;
            if let Some(groups) = self.groups(OP, &spans, w)? {
                self.launch_grouped(a, None, &groups, g, rows, out)?;
            }
            return Ok(GemmRoute::Dequant);
        }
        let run = stack_run(w);
        let fp8 = fp8_route(g.n, g.k, w.len(), Sm90Layout::Masked { counts: &host, capacity }, run.is_some())?;
        if host.iter().all(|&c| c == 0) {
            self.fill_zero(out)?;
            return Ok(fp8.route());
        }
        let qs = ActQuantShape { rows, cols: g.k };
        let (mut q, mut sc) = (self.zeros::<u8>(a.len())?, self.zeros::<f32>(rows * qs.tiles())?);
        let m = Masked { counts, capacity };
        if let Some((r, t)) = self.act_quant_rows(a, qs, ScaleFmt::Float, Some(m), &mut q, &mut sc)? {
            // The CPU packs the live rows first (and quantises in grouped_contiguous).
            let (e, i) = (r / capacity, r % capacity);
            let packed = host[..e].iter().map(|&c| c as usize).sum::<usize>() + i;
            return Err(invalid("grouped_contiguous", "a", non_finite_detail(packed, t)));
        }
        // The sm90 kernel writes every row of `out` (zeros past each count); the simple one
        // only the live rows.
        let route = self.try_sm90(&fp8, run, &q, &sc, out)?;
        if let GemmRoute::Fp8Simt(_) = route {
            self.fill_zero(out)?;
            if let Some(groups) = self.groups(OP, &spans, w)? {
                self.launch_grouped(a, Some(&(q, sc)), &groups, g, rows, out)?;
            }
        }
        Ok(route)
    }

    /// [`crate::Backend::grouped_gemm_planned`]: the grouped contiguous GEMM with a plan's
    /// offsets. At decode sizes (at most `DEVICE_TILES_MAX_ROWS` = 1024 rows) and with the experts
    /// one run of a weight stack, the rows are scheduled on the device from the plan's tile
    /// list (built with the plan, `dsv3_grouped_tiles`): nothing is read back, so the call can
    /// be part of a captured step; the simple kernels run it (bit-exact with the reference).
    /// Otherwise (prefill sizes, or experts uploaded one by one) it is
    /// [`Self::grouped_contiguous`] on the plan's offsets, which reads them back to route the
    /// call (the sm90 kernel where it has the shape).
    pub fn grouped_planned(
        &self,
        a: &DeviceBuf<f32>,
        plan: &DevicePlan,
        w: &[&DeviceFp8Weight],
        path: GemmPath,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        const OP: &str = "grouped_contiguous";
        let shape = plan.shape();
        let rows = shape.pairs();
        let run = stack_run(w);
        let (Some(run), true) = (run, rows <= DEVICE_TILES_MAX_ROWS) else {
            return self.grouped_contiguous(a, plan.offsets(), w, path, out);
        };
        if w.len() != shape.n_experts {
            return Err(shape_err(OP, format!("{} expert weights for a plan of {} experts", w.len(), shape.n_experts)));
        }
        let (n, k) = w[0].shape();
        check_len(OP, "a", a.len(), checked_mul(OP, "a", rows, k)?)?;
        check_len(OP, "out", out.len(), checked_mul(OP, "out", rows, n)?)?;
        check_fp8_k(OP, path, k)?;
        let (n32, k32) = (u32_of(OP, "n", n)?, u32_of(OP, "k", k)?);
        let max_tiles = grid_yz(OP, "row tiles", plan.max_tiles(), 1)?;
        if rows == 0 || n == 0 {
            return Ok(());
        }
        let (wo, so) = run.offsets();
        let fp8 = if path == GemmPath::Fp8 {
            let qs = ActQuantShape { rows, cols: k };
            let (mut q, mut sc) = (self.zeros::<u8>(a.len())?, self.zeros::<f32>(rows * qs.tiles())?);
            if let Some((r, t)) = self.act_quant_rows(a, qs, ScaleFmt::Float, None, &mut q, &mut sc)? {
                return Err(invalid(OP, "a", non_finite_detail(r, t)));
            }
            Some((q, sc))
        } else {
            None
        };
        let (ta, _gt) = self.imp.addr(&plan.tiles.imp);
        let (ca, _gc) = self.imp.addr(&plan.n_tiles.imp);
        let (wa, _gw) = self.imp.addr(&run.stack.data.imp);
        let (wsa, _gws) = self.imp.addr(&run.stack.scale_inv.imp);
        let (oa, _go) = self.imp.addr_mut(&mut out.imp);
        let grid = (n32.div_ceil(64), max_tiles);
        match &fp8 {
            None => {
                let (aa, _ga) = self.imp.addr(&a.imp);
                let p = GemmDequantSimtGroupedParams {
                    a: aa,
                    experts: 0,
                    tiles: ta,
                    out: oa,
                    n_tiles: ca,
                    stack_w: wa + wo,
                    stack_s: wsa + so,
                    n: n32,
                    k: k32,
                };
                // SAFETY: the plan's tile list (max_tiles entries, *n_tiles <= max_tiles of
                // them valid; the kernel reads only those) was built on the device from its
                // offsets, which run from 0 to `rows` without decreasing (a DevicePlan's tables
                // are consistent by construction), so every tile's rows lie inside a ([rows,
                // k], checked) and out ([rows, n], checked) and its expert is < n_experts =
                // w.len(); the weights are entries first..first + n_experts of one stack
                // (StackRange's invariant: n·k codes and ceil(n/128)·ceil(k/128) scales each,
                // shape checked equal for all by the run). out is the only &mut buffer.
                unsafe { self.imp.launch(kernel!(GemmDequantSimtGrouped), grid, 256, &p) }
            }
            Some((q, sc)) => {
                let (qa, _gq) = self.imp.addr(&q.imp);
                let (sa, _gs) = self.imp.addr(&sc.imp);
                let p = GemmFp8SimtGroupedParams {
                    a: qa,
                    a_s: sa,
                    experts: 0,
                    tiles: ta,
                    out: oa,
                    n_tiles: ca,
                    stack_w: wa + wo,
                    stack_s: wsa + so,
                    n: n32,
                    k: k32,
                };
                // SAFETY: as the Reference path, with the quantised activation [rows, k] and
                // its scales [rows, k/128]; k % 128 == 0 (checked), so the kernel's 8-byte chunk
                // loads are in bounds and aligned.
                unsafe { self.imp.launch(kernel!(GemmFp8SimtGrouped), grid, 256, &p) }
            }
        }
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
            let ((wa, gw), (sa, gs)) = x.addrs(self);
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
                let p = GemmDequantSimtGroupedParams { a: aa, experts: ea, tiles: ta, out: oa, n, k, ..Default::default() };
                // SAFETY: every tile covers rows row0..row0+rows (<= 64) inside the validated
                // `rows` of a ([rows, k]) and out ([rows, n]), with an expert index < the length
                // of the experts table, whose entries are the addresses of live weights of shape
                // [n, k] (checked equal for all experts; each its entry of a live stack) kept
                // borrowed by the caller for this call.
                unsafe { self.imp.launch(kernel!(GemmDequantSimtGrouped), grid, 256, &p) }
            }
            Some((q, sc)) => {
                let (qa, _gq) = self.imp.addr(&q.imp);
                let (sa, _gs) = self.imp.addr(&sc.imp);
                let p = GemmFp8SimtGroupedParams { a: qa, a_s: sa, experts: ea, tiles: ta, out: oa, n, k, ..Default::default() };
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

#[cfg(test)]
mod tests {
    use super::is_run;

    /// The grouped GEMMs hand experts to the sm90 kernel as one matrix only when they are
    /// consecutive entries of one stack.
    #[test]
    fn runs_are_consecutive_entries_of_one_stack() {
        assert!(is_run([('a', 0)].into_iter()));
        assert!(is_run([('a', 3), ('a', 4), ('a', 5)].into_iter()));
        assert!(!is_run(std::iter::empty::<(char, usize)>()));
        assert!(!is_run([('a', 0), ('b', 1)].into_iter()), "two stacks");
        assert!(!is_run([('a', 0), ('a', 2)].into_iter()), "a gap");
        assert!(!is_run([('a', 1), ('a', 0)].into_iter()), "out of order");
        assert!(!is_run([('a', 0), ('a', 0)].into_iter()), "repeated (a shared expert)");
        assert!(!is_run([('a', usize::MAX), ('a', 0)].into_iter()), "no wrap-around");
    }
}
