//! The launch: [`CudaDevice::sm90_fp8_gemm`], the kernels' parameter structs (mirrors of
//! `cuda/include/dsv3/sm90_fp8_gemm.h`), and, with the `cuda` feature, the TMA launch and the
//! fallback to the simple kernel.

use super::SM90_MAX_GROUPS;
use super::plan::{Sm90Fallback, Sm90Layout, Sm90Route, plan};
use super::stack::{DeviceFp8Stack, Sm90Out, StackRange};
use crate::cuda::{CudaDevice, DeviceBuf};
use crate::error::{Result, check_len, checked_mul};
use crate::fp8::{BLOCK, blocks};
#[cfg(feature = "cuda")]
use {
    super::{Sm90Kernel, plan::Sm90Plan},
    crate::cuda::u32_of,
    crate::error::{KernelError, shape_err},
};

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

/// The generated entry point of an instantiation (found by its symbol).
#[cfg(feature = "cuda")]
fn sm90_kernel(c: Sm90Kernel) -> Option<crate::cuda::Kernel> {
    crate::cuda::Kernel::from_symbol(&c.symbol())
}

#[cfg(feature = "cuda")]
impl CudaDevice {
    /// TMA's rule: base addresses are multiples of 16 bytes (row strides are K bytes, a
    /// multiple of 128, so they always are; so are the offsets of stack entries, N·K bytes).
    pub(in crate::cuda) fn sm90_aligned(&self, a_q: &DeviceBuf<u8>, w: StackRange<'_>) -> bool {
        let (aa, _ga) = self.imp.addr(&a_q.imp);
        let (wa, _gw) = self.imp.addr(&w.stack.data.imp);
        aa.is_multiple_of(16) && (wa + w.offsets().0).is_multiple_of(16)
    }

    /// The TMA kernel `c` on a validated `plan` whose groups are the entries of `w`; the caller
    /// has checked a_q, a_s and out against `plan.rows` (as [`Self::sm90_fp8_gemm`] does).
    pub(in crate::cuda) fn sm90_launch_tma(
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

    pub(super) fn sm90_fallback(
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
                unsafe { self.imp.launch(crate::cuda::Kernel::Sm90Fp8GemmCastBf16, (len.div_ceil(256).min(1 << 16) as u32, 1), 256, &p) }
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
            let p = crate::cuda::params::GemmFp8SimtParams {
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
            unsafe { self.imp.launch(crate::cuda::Kernel::GemmFp8Simt, ((n as u32).div_ceil(64), (data as u32).div_ceil(64)), 256, &p)? };
        }
        Ok(())
    }
}
