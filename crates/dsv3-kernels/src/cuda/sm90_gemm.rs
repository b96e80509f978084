//! `sm90_fp8_gemm`: the FP8 block-scaled GEMM at Hopper speed (TMA, wgmma, warp-specialised
//! persistent kernel; `cuda/include/dsv3/sm90_fp8_gemm.cuh`), dense and grouped, with the
//! simple kernel (`dsv3_gemm_fp8_simt`) as the fallback for every shape it was not built for.
//!
//! Math (model-spec §4.4, DeepGEMM's scheme): `out[r, n] = Σ_kb (Σ_{k∈kb} A[r,k]·B[n,k]) ·
//! a_s[r, kb] · b_s[n/128, kb]` on e4m3 codes, A quantised per 1x128 tile
//! ([`CudaDevice::act_quant_1x128`]), B a block-scaled weight; f32 totals, written as f32 or
//! bf16. It equals [`crate::gemm::reference::gemm_fp8`] up to the summation order inside each
//! 128-wide block and the FMA in the promotion (the fallback is bit-exact).
//!
//! Names match at every layer: kernels `dsv3_sm90_fp8_gemm_n{N}_k{K}_bm{BM}` (the generated
//! `Kernel::Sm90Fp8GemmN..K..Bm..`), parameters `dsv3_sm90_fp8_gemm_params` /
//! [`Sm90Fp8GemmParams`], wrapper [`CudaDevice::sm90_fp8_gemm`].
//!
//! Routing ([`plan`], deterministic, host only): the (N, K) pairs of DeepSeek-V3 have
//! shape-specialised instantiations ([`SM90_KERNELS`]); block M is 64 when no group has more
//! than 64 rows, else 128. Anything else — another (N, K), more than [`SM90_MAX_GROUPS`]
//! groups, rows past the TMA's 32-bit coordinates, a buffer address that is not 16-byte
//! aligned — takes the simple kernel instead (per group for grouped layouts), so every shape
//! that validates gets the right answer. The route taken is returned.
//!
//! Grouped layouts take their row counts as host slices (the same ones the CPU functions take)
//! and pass them to the kernel inside its parameter struct: no upload, no allocation per call.
//!
//! The backend ([`crate::Cuda`]) runs its fp8-path GEMMs here ([`gemm_route`] decides, on the
//! host): `Backend::gemm` and the grouped GEMMs quantise the activation per 1x128 tile and take
//! the TMA kernel when [`plan`] has one for the shape and the weights are one consecutive run
//! of entries of one [`DeviceFp8Stack`], and the simple kernels otherwise; the Reference path
//! always takes the simple dequantising kernel. A backend weight ([`super::DeviceFp8Weight`])
//! is an entry of a stack: a weight uploaded alone is a stack of one, a MoE layer's experts of
//! one projection are one stack ([`CudaDevice::upload_fp8_experts`], `Backend::upload_weights`),
//! so both kernel families read the same device memory and no weight is held twice.

use super::{CudaDevice, DeviceBuf, DeviceFp8Weight, u32_of};
use crate::backend::Elem;
use crate::error::{KernelError, Result, check_len, checked_mul, invalid, shape_err};
use crate::fp8::{BLOCK, Fp8WeightRef, blocks};
use crate::gemm::GemmPath;
use std::sync::Arc;

/// Most groups (experts) one grouped launch takes (`DSV3_SM90_MAX_GROUPS`); more fall back.
pub const SM90_MAX_GROUPS: usize = 256;

/// One compiled instantiation: tile `block_m x block_n x 128`, `stages` pipeline stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sm90Kernel {
    pub n: usize,
    pub k: usize,
    pub block_m: usize,
    pub block_n: usize,
    pub stages: usize,
}

impl Sm90Kernel {
    /// One producer warpgroup and `block_m / 64` consumer warpgroups.
    pub const fn threads(&self) -> usize {
        128 * (self.block_m / 64 + 1)
    }
    /// Dynamic shared memory the kernel needs: the stages' A and B tiles and their two
    /// mbarriers, plus up to 1 KiB to align the swizzled tiles (the kernel checks it).
    pub const fn smem_bytes(&self) -> usize {
        1024 + self.stages * ((self.block_m + self.block_n) * BLOCK + 16)
    }
    /// The kernel's symbol.
    pub fn symbol(&self) -> String {
        format!("dsv3_sm90_fp8_gemm_n{}_k{}_bm{}", self.n, self.k, self.block_m)
    }
    /// Column blocks of one group.
    pub const fn n_blocks(&self) -> usize {
        self.n.div_ceil(self.block_n)
    }
}

const fn kern(n: usize, k: usize, block_m: usize, block_n: usize, stages: usize) -> Sm90Kernel {
    Sm90Kernel { n, k, block_m, block_n, stages }
}

/// Every instantiation in `cuda/gemm/sm90_fp8_gemm_n*_k*.cu`, as the sources spell them
/// (a test parses the sources and compares). Block N per shape minimises wave quantisation on
/// 132 SMs at M = 4096 for block M 128 (q_a+kv_a 2112: 112, 0.91 of the last wave used;
/// 24576 and 32768 and 4096: 128; 7168: 160), and for block M 64 (decode) spreads the weight
/// over as many SMs as possible (2112 and 4096: 32 → 66 and 128 CTAs; 7168: 56 → 128 CTAs).
pub const SM90_KERNELS: &[Sm90Kernel] = &[
    kern(2112, 7168, 64, 32, 10),
    kern(2112, 7168, 128, 112, 7),
    kern(24576, 1536, 64, 64, 10),
    kern(24576, 1536, 128, 128, 7),
    kern(32768, 512, 64, 128, 9),
    kern(32768, 512, 128, 128, 7),
    kern(7168, 16384, 64, 56, 10),
    kern(7168, 16384, 128, 160, 6),
    kern(4096, 7168, 64, 32, 10),
    kern(4096, 7168, 128, 128, 7),
    kern(7168, 2048, 64, 56, 10),
    kern(7168, 2048, 128, 160, 6),
    // The unfused projections as the checkpoint stores them (what the model multiplies by):
    kern(2048, 7168, 64, 32, 10),
    kern(2048, 7168, 128, 128, 7),
    kern(1536, 7168, 64, 32, 10),
    kern(1536, 7168, 128, 128, 7),
    kern(576, 7168, 64, 32, 10),
    kern(576, 7168, 128, 64, 7),
    kern(18432, 7168, 64, 64, 10),
    kern(18432, 7168, 128, 128, 7),
    kern(7168, 18432, 64, 56, 10),
    kern(7168, 18432, 128, 160, 6),
];

/// How the rows of A (and of `out`) are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sm90Layout<'a> {
    /// One `[m, K]` matrix.
    Dense { m: usize },
    /// Group `e` owns rows `offsets[e]..offsets[e+1]` ([`crate::gemm::grouped_contiguous`]).
    Contiguous { offsets: &'a [u32] },
    /// `[E, capacity, K]`; group `e` holds data in its first `counts[e]` rows, and the rest of
    /// its output rows are written as zeros ([`crate::gemm::grouped_masked`]).
    Masked { counts: &'a [u32], capacity: usize },
}

/// Why a call took the simple kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sm90Fallback {
    /// No instantiation for this (N, K).
    Shape,
    /// More than [`SM90_MAX_GROUPS`] groups.
    Groups,
    /// Rows of A past the TMA's signed 32-bit coordinates.
    Rows,
    /// A TMA base address that is not a multiple of 16 bytes.
    Alignment,
    /// The backend's grouped GEMM got expert weights that are not one consecutive run of
    /// entries of one stack (experts uploaded one by one, or repeated, or out of order).
    Weights,
}

/// The path one call takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sm90Route {
    Tma(Sm90Kernel),
    Fallback(Sm90Fallback),
}

/// A validated call: its route and what the kernel's parameters need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sm90Plan {
    pub route: Sm90Route,
    /// Rows of A, `a_s` and `out`.
    pub rows: usize,
    /// Output tiles of the TMA kernel (0 on the fallback).
    pub tiles: usize,
    groups: usize,
    /// Masked layout: the capacity of each group.
    capacity: Option<usize>,
    /// Per group: first row, rows with data, rows owned in `out` (masked: capacity).
    spans: Vec<(usize, usize, usize)>,
}

/// Validates a call's shape (the CPU functions' checks and errors) and picks its route; the
/// buffer lengths are checked by [`CudaDevice::sm90_fp8_gemm`]. Host only, deterministic.
pub fn plan(n: usize, k: usize, groups: usize, layout: Sm90Layout<'_>) -> Result<Sm90Plan> {
    const OP: &str = "sm90_fp8_gemm";
    if n == 0 || k == 0 || !k.is_multiple_of(BLOCK) {
        return Err(shape_err(OP, format!("needs n >= 1 and k a positive multiple of 128, got n = {n}, k = {k}")));
    }
    if groups == 0 {
        return Err(shape_err(OP, "no experts"));
    }
    let (spans, capacity): (Vec<(usize, usize, usize)>, Option<usize>) = match layout {
        Sm90Layout::Dense { m } => {
            if groups != 1 {
                return Err(shape_err(OP, format!("a dense GEMM takes one weight, got {groups}")));
            }
            (vec![(0, m, m)], None)
        }
        Sm90Layout::Contiguous { offsets } => {
            check_len(OP, "offsets", offsets.len(), groups + 1)?;
            if offsets[0] != 0 || offsets.windows(2).any(|p| p[1] < p[0]) {
                return Err(invalid(OP, "offsets", "must start at 0 and never decrease"));
            }
            let rows = |p: &[u32]| (p[1] - p[0]) as usize;
            (offsets.windows(2).map(|p| (p[0] as usize, rows(p), rows(p))).collect(), None)
        }
        Sm90Layout::Masked { counts, capacity } => {
            check_len(OP, "counts", counts.len(), groups)?;
            if let Some(e) = counts.iter().position(|&c| c as usize > capacity) {
                return Err(invalid(OP, "counts", format!("expert {e} has {} rows, capacity is {capacity}", counts[e])));
            }
            checked_mul(OP, "rows", groups, capacity)?;
            (counts.iter().enumerate().map(|(e, &c)| (e * capacity, c as usize, capacity)).collect(), Some(capacity))
        }
    };
    let rows: usize = spans.iter().map(|s| s.2).sum();
    u32_of(OP, "rows", rows)?;
    u32_of(OP, "groups * n", checked_mul(OP, "groups * n", groups, n)?)?;
    let max_rows = spans.iter().map(|s| s.1).max().unwrap_or(0);
    let bm = if max_rows <= 64 { 64 } else { 128 };
    let route = match SM90_KERNELS.iter().find(|c| c.n == n && c.k == k && c.block_m == bm) {
        None => Sm90Route::Fallback(Sm90Fallback::Shape),
        Some(_) if groups > SM90_MAX_GROUPS => Sm90Route::Fallback(Sm90Fallback::Groups),
        Some(_) if rows >= 1 << 31 || groups * n >= 1 << 31 => Sm90Route::Fallback(Sm90Fallback::Rows),
        Some(c) => Sm90Route::Tma(*c),
    };
    let tiles = match route {
        Sm90Route::Tma(c) => spans.iter().map(|s| s.2.div_ceil(c.block_m) * c.n_blocks()).sum(),
        Sm90Route::Fallback(_) => 0,
    };
    u32_of(OP, "tiles", tiles)?;
    Ok(Sm90Plan { route, rows, tiles, groups, capacity, spans })
}

/// The kernel one GEMM of the CUDA backend runs on ([`CudaDevice::gemm_routed`],
/// [`CudaDevice::grouped_contiguous_routed`], [`CudaDevice::grouped_masked_routed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GemmRoute {
    /// Reference path: `dsv3_gemm_dequant_simt(_grouped)`, f32 activations against the exact
    /// dequantised weight (wgmma has no f32 x e4m3 form); bit-exact with the CPU reference.
    Dequant,
    /// Fp8 path: `dsv3_act_quant_1x128`, then this TMA/wgmma instantiation (equal to the CPU
    /// fp8 path up to the summation order inside each 128-wide block).
    Sm90(Sm90Kernel),
    /// Fp8 path: `dsv3_act_quant_1x128`, then the simple `dsv3_gemm_fp8_simt(_grouped)`
    /// (bit-exact with the CPU reference), for this reason.
    Fp8Simt(Sm90Fallback),
}

/// The route of a backend GEMM of `groups` weights `[n, k]` in `layout` (dense: one weight),
/// host only and deterministic: [`GemmRoute::Dequant`] on the Reference path; on the Fp8 path
/// [`GemmRoute::Sm90`] when [`plan`] picks a TMA kernel and the weights are one consecutive
/// run of entries of one stack (`one_stack`; always so for one weight), else
/// [`GemmRoute::Fp8Simt`] with the reason. On the device, a TMA base address that is not a
/// multiple of 16 bytes also takes the simple kernel ([`Sm90Fallback::Alignment`]; never so
/// for buffers this crate allocates). Errors: [`plan`]'s, on the Fp8 path.
pub fn gemm_route(path: GemmPath, n: usize, k: usize, groups: usize, layout: Sm90Layout<'_>, one_stack: bool) -> Result<GemmRoute> {
    match path {
        GemmPath::Reference => Ok(GemmRoute::Dequant),
        GemmPath::Fp8 => fp8_route(n, k, groups, layout, one_stack).map(|r| r.route()),
    }
}

/// The Fp8 path's route, with the plan the TMA kernel launches from.
#[derive(Debug)]
pub(super) enum Fp8Route {
    Sm90(Sm90Kernel, Sm90Plan),
    Simt(Sm90Fallback),
}

impl Fp8Route {
    pub(super) fn route(&self) -> GemmRoute {
        match self {
            Fp8Route::Sm90(c, _) => GemmRoute::Sm90(*c),
            Fp8Route::Simt(why) => GemmRoute::Fp8Simt(*why),
        }
    }
}

/// [`gemm_route`] on the Fp8 path (an empty N has no instantiation: the simple kernel, which
/// has nothing to do).
pub(super) fn fp8_route(n: usize, k: usize, groups: usize, layout: Sm90Layout<'_>, one_stack: bool) -> Result<Fp8Route> {
    if n == 0 {
        return Ok(Fp8Route::Simt(Sm90Fallback::Shape));
    }
    let p = plan(n, k, groups, layout)?;
    Ok(match p.route {
        Sm90Route::Fallback(why) => Fp8Route::Simt(why),
        Sm90Route::Tma(_) if !one_stack => Fp8Route::Simt(Sm90Fallback::Weights),
        Sm90Route::Tma(c) => Fp8Route::Sm90(c, p),
    })
}

/// The weights of one dense GEMM (one group) or of E experts, stacked: codes `[E·N, K]` and
/// `scale_inv` `[E·ceil(N/128), ceil(K/128)]` ([`CudaDevice::upload_fp8_stack`]). The device
/// memory of every FP8 weight: a backend weight ([`DeviceFp8Weight`]) is one entry of a stack.
#[derive(Debug)]
pub struct DeviceFp8Stack {
    pub(super) groups: usize,
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) data: DeviceBuf<u8>,
    pub(super) scale_inv: DeviceBuf<f32>,
}

/// Entries `first .. first + groups` of a stack (`first + groups <= stack.groups`, which every
/// constructor guarantees): what one launch reads (a whole stack for
/// [`CudaDevice::sm90_fp8_gemm`]; one weight, or a consecutive run of experts, for the
/// backend's GEMMs).
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // read by the launches only
pub(super) struct StackRange<'a> {
    stack: &'a DeviceFp8Stack,
    first: usize,
    groups: usize,
}

impl<'a> StackRange<'a> {
    /// All of a stack.
    pub(super) fn all(stack: &'a DeviceFp8Stack) -> StackRange<'a> {
        StackRange { stack, first: 0, groups: stack.groups }
    }
    /// Entries `first .. first + groups`, when the stack has them.
    pub(super) fn new(stack: &'a DeviceFp8Stack, first: usize, groups: usize) -> Option<StackRange<'a>> {
        (groups >= 1 && first.checked_add(groups)? <= stack.groups).then_some(StackRange { stack, first, groups })
    }
    /// Byte offsets of entry `first`'s codes and scales from the starts of the stack's buffers.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn offsets(&self) -> (u64, u64) {
        let s = self.stack;
        ((self.first * s.n * s.k) as u64, (self.first * blocks(s.n) * blocks(s.k) * size_of::<f32>()) as u64)
    }
}

impl DeviceFp8Stack {
    /// Number of weights (experts).
    pub fn groups(&self) -> usize {
        self.groups
    }
    /// Rows (N) of each weight.
    pub fn n(&self) -> usize {
        self.n
    }
    /// Columns (K) of each weight.
    pub fn k(&self) -> usize {
        self.k
    }
}

/// Where a GEMM writes: f32 (what the backend's gemm produces) or bf16 (round to nearest even).
#[derive(Debug)]
pub enum Sm90Out<'a> {
    F32(&'a mut DeviceBuf<f32>),
    Bf16(&'a mut DeviceBuf<half::bf16>),
}

impl Sm90Out<'_> {
    fn len(&self) -> usize {
        match self {
            Sm90Out::F32(b) => b.len(),
            Sm90Out::Bf16(b) => b.len(),
        }
    }
}

/// `dsv3_sm90_fp8_gemm_params` (cuda/include/dsv3/sm90_fp8_gemm.h), field for field.
#[repr(C, align(128))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sm90Fp8GemmParams {
    pub tma_a: [u64; 16],
    pub tma_b: [u64; 16],
    pub a_s: u64,
    pub b_s: u64,
    pub out: u64,
    pub a_rows: u32,
    pub groups: u32,
    pub masked: u32,
    pub capacity: u32,
    pub out_bf16: u32,
    pub tiles: u32,
    pub rows: [u32; SM90_MAX_GROUPS + 1],
    pub tile0: [u32; SM90_MAX_GROUPS + 1],
    pub pad: [u32; 18],
}
impl Sm90Fp8GemmParams {
    /// All fields zero.
    pub const ZERO: Sm90Fp8GemmParams = Sm90Fp8GemmParams {
        tma_a: [0; 16],
        tma_b: [0; 16],
        a_s: 0,
        b_s: 0,
        out: 0,
        a_rows: 0,
        groups: 0,
        masked: 0,
        capacity: 0,
        out_bf16: 0,
        tiles: 0,
        rows: [0; SM90_MAX_GROUPS + 1],
        tile0: [0; SM90_MAX_GROUPS + 1],
        pad: [0; 18],
    };
}
const _: () = assert!(size_of::<Sm90Fp8GemmParams>() == 2432, "must equal sizeof in sm90_fp8_gemm.h");
const _: () = assert!(std::mem::offset_of!(Sm90Fp8GemmParams, a_s) == 256 && std::mem::offset_of!(Sm90Fp8GemmParams, rows) == 304);
// SAFETY: `repr(C)` with the C struct's fields, alignment and size (asserted above), and no
// padding: every byte is a field, so the kernel reads exactly what was written.
#[cfg(feature = "cuda")]
unsafe impl cudarc::driver::DeviceRepr for Sm90Fp8GemmParams {}

/// `dsv3_sm90_fp8_gemm_cast_bf16_params`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sm90Fp8GemmCastBf16Params {
    pub x: u64,
    pub out: u64,
    pub n: u64,
}
const _: () = assert!(size_of::<Sm90Fp8GemmCastBf16Params>() == 24, "must equal sizeof in sm90_fp8_gemm.h");
// SAFETY: `repr(C)`, three u64 fields, no padding (size asserted against the C declaration).
#[cfg(feature = "cuda")]
unsafe impl cudarc::driver::DeviceRepr for Sm90Fp8GemmCastBf16Params {}

impl CudaDevice {
    /// Uploads E validated FP8 weights of one shape, stacked (one weight for a dense GEMM),
    /// each copied straight into its place (no host-side concatenation).
    pub fn upload_fp8_stack(&self, w: &[Fp8WeightRef<'_>]) -> Result<DeviceFp8Stack> {
        const OP: &str = "upload_fp8_stack";
        let first = w.first().ok_or_else(|| shape_err(OP, "no weights"))?;
        let (n, k) = (first.rows(), first.cols());
        if let Some(e) = w.iter().position(|x| x.rows() != n || x.cols() != k) {
            return Err(shape_err(OP, format!("weight {e} is [{}, {}], weight 0 is [{n}, {k}]", w[e].rows(), w[e].cols())));
        }
        let (codes, scales) = (checked_mul(OP, "data", n, k)?, blocks(n) * blocks(k));
        let mut data = self.zeros::<u8>(checked_mul(OP, "data", w.len(), codes)?)?;
        let mut scale_inv = self.zeros::<f32>(checked_mul(OP, "scale_inv", w.len(), scales)?)?;
        for (g, x) in w.iter().enumerate() {
            self.write(&mut data, g * codes, x.data())?;
            self.write(&mut scale_inv, g * scales, x.scale_inv())?;
        }
        Ok(DeviceFp8Stack { groups: w.len(), n, k, data, scale_inv })
    }

    /// Uploads E validated FP8 weights of one shape (a MoE layer's experts of one projection)
    /// as one stack and returns them as backend weights, entries `0..E` of it in order: a
    /// grouped GEMM over them (or over a consecutive run of them) takes the sm90 kernel where
    /// it has the shape, and each one still works alone. Errors as [`Self::upload_fp8_stack`].
    pub fn upload_fp8_experts(&self, w: &[Fp8WeightRef<'_>]) -> Result<Vec<DeviceFp8Weight>> {
        let stack = Arc::new(self.upload_fp8_stack(w)?);
        Ok((0..w.len()).map(|index| DeviceFp8Weight::entry(Arc::clone(&stack), index)).collect())
    }

    /// `sm90_fp8_gemm`: `out = a · wᵀ` per group on an activation quantised per 1x128 tile
    /// (`a_q` codes, `a_s` scales `[rows, K/128]`), through the TMA/wgmma kernel when the shape
    /// has one and the simple kernel otherwise (see the module docs); returns the route taken.
    /// Shapes and lengths are checked first, with the CPU functions' errors.
    pub fn sm90_fp8_gemm(
        &self,
        a_q: &DeviceBuf<u8>,
        a_s: &DeviceBuf<f32>,
        w: &DeviceFp8Stack,
        layout: Sm90Layout<'_>,
        mut out: Sm90Out<'_>,
    ) -> Result<Sm90Route> {
        const OP: &str = "sm90_fp8_gemm";
        let mut plan = plan(w.n, w.k, w.groups, layout)?;
        check_len(OP, "a_q", a_q.len(), checked_mul(OP, "a_q", plan.rows, w.k)?)?;
        check_len(OP, "a_s", a_s.len(), plan.rows * (w.k / BLOCK))?;
        check_len(OP, "out", out.len(), checked_mul(OP, "out", plan.rows, w.n)?)?;
        // The launch's SAFETY argument relies on the stack's sizes (upload_fp8_stack makes them).
        check_len(OP, "stack data", w.data.len(), checked_mul(OP, "stack data", w.groups * w.n, w.k)?)?;
        check_len(OP, "stack scale_inv", w.scale_inv.len(), w.groups * blocks(w.n) * blocks(w.k))?;
        let w = StackRange::all(w);
        if plan.rows == 0 {
            return Ok(plan.route);
        }
        if let Sm90Route::Tma(_) = plan.route
            && !self.sm90_aligned(a_q, w)
        {
            plan.route = Sm90Route::Fallback(Sm90Fallback::Alignment);
        }
        match plan.route {
            Sm90Route::Tma(c) => self.sm90_launch_tma(&plan, c, a_q, a_s, w, &mut out)?,
            Sm90Route::Fallback(_) => self.sm90_fallback(&plan, a_q, a_s, w, &mut out)?,
        }
        Ok(plan.route)
    }
}

/// Benchmark support: what the GPU benchmark (`benches/benches/sm90_gemm.rs`) times with.
impl CudaDevice {
    /// Number of streaming multiprocessors (the persistent kernels launch one CTA per SM).
    pub fn sm90_sm_count(&self) -> Result<usize> {
        self.sm90_sms().map(|n| n as usize)
    }

    /// GPU milliseconds of the work that `f` enqueues, between two CUDA events.
    pub fn sm90_time_ms(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<f32> {
        self.sm90_time(f)
    }

    /// Zeroes a whole buffer, in stream order (writing a buffer larger than L2 flushes it).
    pub fn sm90_zero<T: Elem>(&self, b: &mut DeviceBuf<T>) -> Result<()> {
        let bytes = b.len() * size_of::<T>();
        self.sm90_zero_bytes(b, 0..bytes)
    }

    /// Copies `src` over the start of `dst` (device to device, in stream order).
    pub fn sm90_copy<T: Elem>(&self, src: &DeviceBuf<T>, dst: &mut DeviceBuf<T>) -> Result<()> {
        if dst.len() < src.len() {
            return Err(shape_err("sm90_copy", format!("dst has {} elements, src {}", dst.len(), src.len())));
        }
        self.sm90_copy_bufs(src, dst)
    }
}

/// The generated entry point of an instantiation.
#[cfg(feature = "cuda")]
fn sm90_kernel(c: Sm90Kernel) -> Option<super::Kernel> {
    use super::Kernel as K;
    Some(match (c.n, c.k, c.block_m) {
        (2112, 7168, 64) => K::Sm90Fp8GemmN2112K7168Bm64,
        (2112, 7168, 128) => K::Sm90Fp8GemmN2112K7168Bm128,
        (24576, 1536, 64) => K::Sm90Fp8GemmN24576K1536Bm64,
        (24576, 1536, 128) => K::Sm90Fp8GemmN24576K1536Bm128,
        (32768, 512, 64) => K::Sm90Fp8GemmN32768K512Bm64,
        (32768, 512, 128) => K::Sm90Fp8GemmN32768K512Bm128,
        (7168, 16384, 64) => K::Sm90Fp8GemmN7168K16384Bm64,
        (7168, 16384, 128) => K::Sm90Fp8GemmN7168K16384Bm128,
        (4096, 7168, 64) => K::Sm90Fp8GemmN4096K7168Bm64,
        (4096, 7168, 128) => K::Sm90Fp8GemmN4096K7168Bm128,
        (7168, 2048, 64) => K::Sm90Fp8GemmN7168K2048Bm64,
        (7168, 2048, 128) => K::Sm90Fp8GemmN7168K2048Bm128,
        (2048, 7168, 64) => K::Sm90Fp8GemmN2048K7168Bm64,
        (2048, 7168, 128) => K::Sm90Fp8GemmN2048K7168Bm128,
        (1536, 7168, 64) => K::Sm90Fp8GemmN1536K7168Bm64,
        (1536, 7168, 128) => K::Sm90Fp8GemmN1536K7168Bm128,
        (576, 7168, 64) => K::Sm90Fp8GemmN576K7168Bm64,
        (576, 7168, 128) => K::Sm90Fp8GemmN576K7168Bm128,
        (18432, 7168, 64) => K::Sm90Fp8GemmN18432K7168Bm64,
        (18432, 7168, 128) => K::Sm90Fp8GemmN18432K7168Bm128,
        (7168, 18432, 64) => K::Sm90Fp8GemmN7168K18432Bm64,
        (7168, 18432, 128) => K::Sm90Fp8GemmN7168K18432Bm128,
        _ => return None,
    })
}

#[cfg(feature = "cuda")]
impl CudaDevice {
    fn sm90_sms(&self) -> Result<u32> {
        self.imp.sm90_sm_count()
    }

    fn sm90_time(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<f32> {
        self.imp.sm90_time(f)
    }

    fn sm90_zero_bytes<T: Elem>(&self, b: &mut DeviceBuf<T>, bytes: std::ops::Range<usize>) -> Result<()> {
        self.imp.sm90_zero_range(&mut b.imp, bytes)
    }

    fn sm90_copy_bufs<T: Elem>(&self, src: &DeviceBuf<T>, dst: &mut DeviceBuf<T>) -> Result<()> {
        self.imp.sm90_copy(&src.imp, &mut dst.imp)
    }

    /// TMA's rule: base addresses are multiples of 16 bytes (row strides are K bytes, a
    /// multiple of 128, so they always are; so are the offsets of stack entries, N·K bytes).
    pub(super) fn sm90_aligned(&self, a_q: &DeviceBuf<u8>, w: StackRange<'_>) -> bool {
        let (aa, _ga) = self.imp.addr(&a_q.imp);
        let (wa, _gw) = self.imp.addr(&w.stack.data.imp);
        aa.is_multiple_of(16) && (wa + w.offsets().0).is_multiple_of(16)
    }

    /// The TMA kernel `c` on a validated `plan` whose groups are the entries of `w`; the caller
    /// has checked a_q, a_s and out against `plan.rows` (as [`Self::sm90_fp8_gemm`] does).
    pub(super) fn sm90_launch_tma(
        &self,
        plan: &Sm90Plan,
        c: Sm90Kernel,
        a_q: &DeviceBuf<u8>,
        a_s: &DeviceBuf<f32>,
        w: StackRange<'_>,
        out: &mut Sm90Out<'_>,
    ) -> Result<()> {
        const OP: &str = "sm90_fp8_gemm";
        let (n, k) = (w.stack.n, w.stack.k);
        if w.groups != plan.groups || (n, k) != (c.n, c.k) {
            return Err(shape_err(OP, format!("{} weights [{n}, {k}] for a plan of {} groups on {}", w.groups, plan.groups, c.symbol())));
        }
        let kernel = sm90_kernel(c).ok_or_else(|| KernelError::Cuda(format!("{} is in SM90_KERNELS but not built", c.symbol())))?;
        if plan.tiles == 0 {
            return Ok(());
        }
        let mut p = Sm90Fp8GemmParams::ZERO;
        for (g, &(row0, data, _)) in plan.spans.iter().enumerate() {
            p.rows[g] = (if plan.capacity.is_some() { data } else { row0 }) as u32;
            let tiles = p.tile0[g] as usize + plan.spans[g].2.div_ceil(c.block_m) * c.n_blocks();
            p.tile0[g + 1] = u32_of(OP, "tiles", tiles)?;
        }
        if plan.capacity.is_none() {
            p.rows[plan.groups] = plan.rows as u32;
        }
        p.a_rows = plan.rows as u32;
        p.groups = plan.groups as u32;
        p.masked = u32::from(plan.capacity.is_some());
        p.capacity = plan.capacity.unwrap_or(0) as u32;
        p.tiles = plan.tiles as u32;
        let (aa, _ga) = self.imp.addr(&a_q.imp);
        let (asa, _gas) = self.imp.addr(&a_s.imp);
        let (wa, _gw) = self.imp.addr(&w.stack.data.imp);
        let (wsa, _gws) = self.imp.addr(&w.stack.scale_inv.imp);
        let (wo, so) = w.offsets();
        let (wa, wsa) = (wa + wo, wsa + so);
        let (oa, _go) = match out {
            Sm90Out::F32(b) => self.imp.addr_mut(&mut b.imp),
            Sm90Out::Bf16(b) => {
                p.out_bf16 = 1;
                self.imp.addr_mut(&mut b.imp)
            }
        };
        p.tma_a = self.imp.sm90_tma_2d(aa, plan.rows as u64, k as u64, c.block_m as u32, BLOCK as u32)?;
        p.tma_b = self.imp.sm90_tma_2d(wa, (w.groups * n) as u64, k as u64, c.block_n as u32, BLOCK as u32)?;
        (p.a_s, p.b_s, p.out) = (asa, wsa, oa);
        let grid = self.imp.sm90_sm_count()?.min(p.tiles);
        // SAFETY: `plan` validated the layout (offsets non-decreasing from 0 / counts <=
        // capacity, < 2^31 rows, <= 256 groups) and the caller checked the lengths: a_q is
        // rows·K, a_s rows·K/128, out rows·N. The weights are entries first..first+groups of a
        // stack that has them (StackRange's invariant; groups = plan.groups and (N, K) = the
        // kernel's, checked above): from wa (first·N·K bytes into the codes) lie groups·N·K
        // codes, from wsa (first·ceil(N/128)·K/128 scales in) groups·ceil(N/128)·K/128 scales.
        // The TMA maps cover exactly a_q [rows, K] and those entries [groups·N, K] (reads
        // outside fill zeros); the kernel reads a_s only for rows with data, b_s for blocks
        // < ceil(N/128) of the tile's group, and writes out only at rows of the tile's group
        // (r < rows) and columns < N, the tile list being the host's prefix sums in `tile0`.
        // The kernel instantiation is `c` (same N, K, block sizes and stages as compiled) and
        // gets c.smem_bytes() of shared memory, which it checks. out is a distinct &mut buffer.
        unsafe { self.imp.sm90_launch(kernel, grid, c.threads() as u32, c.smem_bytes() as u32, &p) }
    }

    fn sm90_fallback(
        &self,
        plan: &Sm90Plan,
        a_q: &DeviceBuf<u8>,
        a_s: &DeviceBuf<f32>,
        w: StackRange<'_>,
        out: &mut Sm90Out<'_>,
    ) -> Result<()> {
        const OP: &str = "sm90_fp8_gemm";
        for &(_, data, _) in &plan.spans {
            if data.div_ceil(64) > 65_535 {
                return Err(shape_err(OP, format!("a group of {data} rows exceeds the simple kernel's grid (65535·64 rows)")));
            }
        }
        match out {
            Sm90Out::F32(b) => {
                if plan.capacity.is_some() {
                    self.sm90_zero(b)?; // the rows past each count
                }
                self.sm90_simt_groups(plan, a_q, a_s, w, b)
            }
            Sm90Out::Bf16(b) => {
                let len = plan.rows * w.stack.n;
                let mut f = self.zeros::<f32>(len)?;
                self.sm90_simt_groups(plan, a_q, a_s, w, &mut f)?;
                let (xa, _gx) = self.imp.addr(&f.imp);
                let (ba, _gb) = self.imp.addr_mut(&mut b.imp);
                let p = Sm90Fp8GemmCastBf16Params { x: xa, out: ba, n: len as u64 };
                // SAFETY: x (the f32 result) and out both hold rows·N elements (checked), the
                // grid-stride loop touches indices < rows·N only, and they are distinct buffers.
                unsafe { self.imp.launch(super::Kernel::Sm90Fp8GemmCastBf16, (len.div_ceil(256).min(1 << 16) as u32, 1), 256, &p) }
            }
        }
    }

    /// The simple kernel on every group with data, f32 out (rows without data untouched).
    fn sm90_simt_groups(
        &self,
        plan: &Sm90Plan,
        a_q: &DeviceBuf<u8>,
        a_s: &DeviceBuf<f32>,
        w: StackRange<'_>,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        let (n, k) = (w.stack.n, w.stack.k);
        let (kb, nb) = (k / BLOCK, blocks(n));
        let (aa, _ga) = self.imp.addr(&a_q.imp);
        let (asa, _gas) = self.imp.addr(&a_s.imp);
        let (wa, _gw) = self.imp.addr(&w.stack.data.imp);
        let (wsa, _gws) = self.imp.addr(&w.stack.scale_inv.imp);
        let (wo, so) = w.offsets();
        let (wa, wsa) = (wa + wo, wsa + so);
        let (oa, _go) = self.imp.addr_mut(&mut out.imp);
        for (g, &(row0, data, _)) in plan.spans.iter().enumerate() {
            if data == 0 {
                continue;
            }
            let p = super::params::GemmFp8SimtParams {
                a: aa + (row0 * k) as u64,
                a_s: asa + (row0 * kb * 4) as u64,
                w: wa + (g * n * k) as u64,
                w_s: wsa + (g * nb * kb * 4) as u64,
                out: oa + (row0 * n * 4) as u64,
                m: data as u32,
                n: n as u32,
                k: k as u32,
                pad: 0,
            };
            // SAFETY: group g's rows row0..row0+data lie inside a_q (rows·K), a_s (rows·K/128)
            // and out (rows·N), and its weight is entry first + g of the stack (N·K codes,
            // ceil(N/128)·K/128 scales, inside the stack by StackRange's invariant), all checked
            // against `plan`, whose groups have < 65536·64 rows (checked by
            // the caller) so the grid fits; the kernel guards rows >= m and columns >= n, and
            // K % 128 == 0 keeps its 8-byte loads in bounds and aligned. out is a distinct &mut.
            unsafe { self.imp.launch(super::Kernel::GemmFp8Simt, ((n as u32).div_ceil(64), (data as u32).div_ceil(64)), 256, &p)? };
        }
        Ok(())
    }
}

#[cfg(not(feature = "cuda"))]
fn no_cuda<T>() -> Result<T> {
    Err(KernelError::CudaUnavailable("dsv3-kernels was built without the `cuda` feature".into()))
}

// Without the feature no `CudaDevice` can exist; these only keep the API the same.
#[cfg(not(feature = "cuda"))]
impl CudaDevice {
    fn sm90_sms(&self) -> Result<u32> {
        no_cuda()
    }
    fn sm90_time(&self, _f: &mut dyn FnMut() -> Result<()>) -> Result<f32> {
        no_cuda()
    }
    fn sm90_zero_bytes<T: Elem>(&self, _b: &mut DeviceBuf<T>, _bytes: std::ops::Range<usize>) -> Result<()> {
        no_cuda()
    }
    fn sm90_copy_bufs<T: Elem>(&self, _src: &DeviceBuf<T>, _dst: &mut DeviceBuf<T>) -> Result<()> {
        no_cuda()
    }
    pub(super) fn sm90_aligned(&self, _a_q: &DeviceBuf<u8>, _w: StackRange<'_>) -> bool {
        false
    }
    pub(super) fn sm90_launch_tma(
        &self,
        _plan: &Sm90Plan,
        _c: Sm90Kernel,
        _a_q: &DeviceBuf<u8>,
        _a_s: &DeviceBuf<f32>,
        _w: StackRange<'_>,
        _out: &mut Sm90Out<'_>,
    ) -> Result<()> {
        no_cuda()
    }
    fn sm90_fallback(
        &self,
        _plan: &Sm90Plan,
        _a_q: &DeviceBuf<u8>,
        _a_s: &DeviceBuf<f32>,
        _w: StackRange<'_>,
        _out: &mut Sm90Out<'_>,
    ) -> Result<()> {
        no_cuda()
    }
}
