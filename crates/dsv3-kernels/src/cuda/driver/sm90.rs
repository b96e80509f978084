//! What the Hopper GEMM family needs from the driver beyond `Device::launch`: kernels with
//! more than 48 KiB of dynamic shared memory, TMA descriptors (`cuTensorMapEncodeTiled`, through
//! cudarc's dynamically loaded binding), the SM count for persistent grids, and the stream-
//! ordered zero fill, copy and event timing that the GPU benchmark uses. Crate-private, like
//! the rest of `driver`.

use super::{Buf, Counters, Device, drv};
use crate::cuda::kernels::Kernel;
use crate::error::{KernelError, Result};
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use cudarc::driver::{result, sys};
use std::panic::{AssertUnwindSafe, catch_unwind};

/// A 2-D tiled TMA descriptor of bytes (e4m3 codes): the 128 bytes `cuTensorMapEncodeTiled`
/// writes, as the kernel's parameter struct holds them.
pub(crate) type TmaMap = [u64; 16];

impl Device {
    /// Number of streaming multiprocessors (the persistent kernels' grid).
    pub(crate) fn sm90_sm_count(&self) -> Result<u32> {
        let n = self._ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).map_err(drv)?;
        u32::try_from(n).ok().filter(|&n| n > 0).ok_or_else(|| KernelError::Cuda(format!("the driver reports {n} SMs")))
    }

    /// Launches `k` with `smem` bytes of dynamic shared memory (raising the kernel's limit to
    /// it first) and its parameter struct.
    ///
    /// # Safety
    /// As [`Device::launch`]: `p` is `k`'s parameter struct and every address and TMA
    /// descriptor in it covers every access the kernel makes with these sizes.
    pub(crate) unsafe fn sm90_launch<P: DeviceRepr>(&self, k: Kernel, grid: u32, block: u32, smem: u32, p: &P) -> Result<()> {
        let f = &self.funcs[k as usize];
        let name = k.symbol();
        let attr = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        f.set_attribute(attr, smem as i32).map_err(|e| KernelError::Cuda(format!("`{name}`: {smem} bytes of shared memory: {e}")))?;
        let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: smem };
        let mut b = self.stream.launch_builder(f);
        b.arg(p);
        Counters::bump(&self.counters.launches);
        // SAFETY: the caller upholds this function's contract, which is the kernel's.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| KernelError::Cuda(format!("launching `{name}`: {e}")))
    }

    /// A TMA descriptor for the byte matrix `[rows, cols]` at device address `addr` (row
    /// stride `cols`), read in boxes of `box_cols x box_rows` with 128-byte swizzle; reads
    /// outside the matrix fill zeros. The caller has checked the driver's rules (address and
    /// stride multiples of 16, box_cols * 1 byte <= 128, box dims <= 256, dims < 2^32).
    pub(crate) fn sm90_tma_2d(&self, addr: u64, rows: u64, cols: u64, box_rows: u32, box_cols: u32) -> Result<TmaMap> {
        let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::uninit();
        let dims = [cols, rows];
        let strides = [cols];
        let boxes = [box_cols, box_rows];
        let elem = [1u32, 1];
        let r = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: `map` is a properly aligned CUtensorMap to write; the four arrays live
            // across the call and have rank (2) or rank-1 (strides) entries, as the driver
            // reads them. The address is only encoded, not dereferenced, here.
            unsafe {
                sys::cuTensorMapEncodeTiled(
                    map.as_mut_ptr(),
                    sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
                    2,
                    addr as *mut std::ffi::c_void,
                    dims.as_ptr(),
                    strides.as_ptr(),
                    boxes.as_ptr(),
                    elem.as_ptr(),
                    sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                    sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                    sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                    sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
                )
            }
        }));
        match r {
            Ok(res) => res
                .result()
                .map_err(|e| KernelError::Cuda(format!("cuTensorMapEncodeTiled [{rows}, {cols}] box {box_rows}x{box_cols}: {e}")))?,
            Err(_) => return Err(KernelError::CudaUnavailable("the driver has no cuTensorMapEncodeTiled".into())),
        }
        // SAFETY: the driver returned success, so it wrote all 128 bytes of the descriptor.
        let map = unsafe { map.assume_init() };
        Ok(map.opaque)
    }

    /// Zeroes bytes `range` of a buffer, in stream order.
    pub(crate) fn sm90_zero_range(&self, b: &mut Buf, range: std::ops::Range<usize>) -> Result<()> {
        if range.is_empty() {
            return Ok(());
        }
        if range.end > b.bytes() {
            return Err(KernelError::Cuda("zero fill out of bounds".into()));
        }
        let (p, _g) = self.addr_mut(b);
        // SAFETY: range lies inside the buffer (checked), live device memory of this stream.
        unsafe { result::memset_d8_async(p + range.start as u64, 0, range.len(), self.stream.cu_stream()) }.map_err(drv)
    }

    /// Copies all of `src` over the start of `dst` (device to device, in stream order).
    pub(crate) fn sm90_copy(&self, src: &Buf, dst: &mut Buf) -> Result<()> {
        let n = src.bytes();
        if n == 0 {
            return Ok(());
        }
        if dst.bytes() < n {
            return Err(KernelError::Cuda("copy destination is smaller than the source".into()));
        }
        let (s, _gs) = self.addr(src);
        let (d, _gd) = self.addr_mut(dst);
        // SAFETY: n bytes of src and the first n of dst (checked) are live device memory of
        // distinct buffers (one is borrowed mutably).
        unsafe { result::memcpy_dtod_async(d, s, n, self.stream.cu_stream()) }.map_err(drv)
    }

    /// Milliseconds of GPU time that the work `f` enqueues takes, between two events.
    pub(crate) fn sm90_time(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<f32> {
        self.timed(f).map(|((), ms)| ms)
    }
}
