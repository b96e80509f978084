//! The router: how the rows of a call are laid out, the validation every call runs (the CPU
//! functions' checks and errors), and the route it takes, all on the host and deterministic.

use super::Sm90Kernel;
use super::catalog::SM90_KERNELS;
use crate::cuda::u32_of;
use crate::error::{Result, check_len, checked_mul, invalid, shape_err};
use crate::fp8::BLOCK;
use crate::gemm::GemmPath;

/// Most groups (experts) one grouped launch takes (`DSV3_SM90_MAX_GROUPS`); more fall back.
pub const SM90_MAX_GROUPS: usize = 256;

/// How the rows of A (and of `out`) are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sm90Layout<'a> {
    /// One `[m, K]` matrix against one weight: a single, non-grouped GEMM. (The name predates
    /// the rule that "dense" means the non-MoE layers only; the CUDA backend's callers still
    /// use it.)
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
    pub(super) groups: usize,
    /// Masked layout: the capacity of each group.
    pub(super) capacity: Option<usize>,
    /// Per group: first row, rows with data, rows owned in `out` (masked: capacity).
    pub(super) spans: Vec<(usize, usize, usize)>,
}

/// Validates a call's shape (the CPU functions' checks and errors) and picks its route; the
/// buffer lengths are checked by [`crate::cuda::CudaDevice::sm90_fp8_gemm`]. Host only, deterministic.
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
                return Err(shape_err(OP, format!("a single (Sm90Layout::Dense) GEMM takes one weight, got {groups}")));
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

/// The kernel one GEMM of the CUDA backend runs on ([`crate::cuda::CudaDevice::gemm_routed`],
/// [`crate::cuda::CudaDevice::grouped_contiguous_routed`], [`crate::cuda::CudaDevice::grouped_masked_routed`]).
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

/// The route of a backend GEMM of `groups` weights `[n, k]` in `layout` (`Dense`: one weight),
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
pub(in crate::cuda) enum Fp8Route {
    Sm90(Sm90Kernel, Sm90Plan),
    Simt(Sm90Fallback),
}

impl Fp8Route {
    pub(in crate::cuda) fn route(&self) -> GemmRoute {
        match self {
            Fp8Route::Sm90(c, _) => GemmRoute::Sm90(*c),
            Fp8Route::Simt(why) => GemmRoute::Fp8Simt(*why),
        }
    }
}

/// [`gemm_route`] on the Fp8 path (an empty N has no instantiation: the simple kernel, which
/// has nothing to do).
pub(in crate::cuda) fn fp8_route(n: usize, k: usize, groups: usize, layout: Sm90Layout<'_>, one_stack: bool) -> Result<Fp8Route> {
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
