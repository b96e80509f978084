//! The CUDA backend: a GPU ([`CudaDevice`]), its buffers ([`DeviceBuf`]), one safe launch
//! wrapper per kernel of `cuda/` (methods of [`CudaDevice`]), and [`Cuda`], the
//! [`crate::Backend`] implementation that model code runs on.
//!
//! Layers, as cudarc has them: the kernels (`cuda/<family>/*.cu`, one plain parameter struct
//! each in `cuda/include/dsv3/params.h`, mirrored in [`params`]) → the generated `Kernel`
//! enum and embedded cubins (build.rs, feature `cuda`) → one `unsafe` raw launch
//! (`driver.rs`) → safe wrappers that validate every shape first and state why the launch is
//! in bounds → [`Cuda`]'s `Backend` methods. Names match at every layer: kernel
//! `dsv3_rms_norm`, struct `dsv3_rms_norm_params` / [`params::RmsNormParams`],
//! `Kernel::RmsNorm`, [`CudaDevice::rms_norm`], `Backend::rms_norm`.
//!
//! | file | wrappers |
//! |---|---|
//! | `ops.rs` | act_quant, RMSNorm, SiLU·up, softmax, add_assign, embedding, RoPE |
//! | `gemm.rs` | FP8 GEMM (both paths), bf16 GEMM, grouped GEMM contiguous and masked, routed to `sm90_gemm.rs` or the simple kernels |
//! | `sm90_gemm.rs` | the Hopper FP8 GEMM (TMA + wgmma), its router, the weight stacks every FP8 weight lives in |
//! | `moe.rs` | routing (every method), dispatch plan, permute, weighted un-permute |
//! | `attention.rs` | MLA cache write / gather, absorb / expand, paged decode, prefill |
//! | `sample.rs` | greedy and temperature / top-k / top-p sampling |
//! | `a2a.rs` | all-to-all packing for expert parallelism, on the device |
//! | `backend.rs` | [`Cuda`]: `impl Backend` |
//!
//! Without the `cuda` feature the same API exists, and [`CudaDevice::new`] (hence
//! [`Cuda::new`]) returns [`KernelError::CudaUnavailable`]; no other value of these types can
//! then exist. With it, a machine with no driver library or no Hopper GPU gets the same error,
//! never a panic.
//!
//! Errors: shapes are checked before any launch, with the CPU functions' checks and error
//! values (the same `check` functions where the CPU module has them). Checks that need index
//! data the caller keeps on the device (slots, block tables, offsets: a few hundred bytes)
//! download it first; checks of bulk data (non-finite values, ids and positions out of range)
//! run on the device and come back through a status word; the wrapper then waits for the
//! kernel and returns the same error as the CPU, but unlike the CPU, outputs (in-place ones
//! included) may have been partly written.

/// The generated entry point `Kernel::$v` (a placeholder without the feature, where no device
/// can exist to launch on).
#[cfg(feature = "cuda")]
macro_rules! kernel {
    ($v:ident) => {
        crate::cuda::Kernel::$v
    };
}
#[cfg(not(feature = "cuda"))]
macro_rules! kernel {
    ($v:ident) => {
        crate::cuda::stub::NoKernel
    };
}

mod a2a;
mod attention;
mod backend;
#[cfg(feature = "cuda")]
mod driver;
mod gemm;
#[cfg(feature = "cuda")]
mod kernels;
mod moe;
mod ops;
pub mod params;
mod sample;
pub mod sm90_gemm;
#[cfg(not(feature = "cuda"))]
mod stub;

#[cfg(feature = "cuda")]
use driver as imp;
#[cfg(feature = "cuda")]
pub use kernels::{KERNEL_REPORT, Kernel, Module};
#[cfg(not(feature = "cuda"))]
use stub as imp;

pub use a2a::{DeviceCombineBuf, DeviceDispatchBuf, DevicePacked, DeviceUnpacked};
pub use backend::Cuda;
pub use gemm::{DeviceBf16Weight, DeviceFp8Weight};
pub use moe::DevicePlan;
pub use ops::DeviceRope;

use crate::backend::Elem;
use crate::error::{KernelError, Result, checked_mul};
use std::marker::PhantomData;

/// One Hopper GPU with the kernels of `cuda/` loaded, and its default stream; every method
/// runs in stream order on it.
#[derive(Debug)]
pub struct CudaDevice {
    imp: imp::Device,
}

/// `len` values of `T` in device memory.
#[derive(Debug)]
pub struct DeviceBuf<T: Elem> {
    imp: imp::Buf,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Elem> DeviceBuf<T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl CudaDevice {
    /// Opens GPU `ordinal`. Returns [`KernelError::CudaUnavailable`] when this build has no
    /// `cuda` feature, the driver library cannot be loaded ("no libcuda: ..."), there is no
    /// such GPU ("no GPU ...") or it is not an sm_90 part; [`KernelError::Cuda`] when a module
    /// or a kernel symbol fails to load.
    pub fn new(ordinal: usize) -> Result<CudaDevice> {
        imp::Device::new(ordinal).map(|imp| CudaDevice { imp })
    }

    /// The device's name as the driver reports it.
    pub fn name(&self) -> String {
        self.imp.name()
    }

    /// A zero-filled buffer of `len` elements.
    pub fn zeros<T: Elem>(&self, len: usize) -> Result<DeviceBuf<T>> {
        let bytes = checked_mul("CudaDevice::zeros", "len", len, size_of::<T>())?;
        Ok(DeviceBuf { imp: self.imp.zeros(bytes)?, len, _t: PhantomData })
    }

    /// A copy of `host` in device memory.
    pub fn upload<T: Elem>(&self, host: &[T]) -> Result<DeviceBuf<T>> {
        Ok(DeviceBuf { imp: self.imp.upload(bytemuck::cast_slice(host))?, len: host.len(), _t: PhantomData })
    }

    /// A device-side copy of a buffer.
    pub fn copy<T: Elem>(&self, buf: &DeviceBuf<T>) -> Result<DeviceBuf<T>> {
        Ok(DeviceBuf { imp: self.imp.copy(&buf.imp)?, len: buf.len, _t: PhantomData })
    }

    /// Sets every element of a buffer to zero.
    pub fn fill_zero<T: Elem>(&self, buf: &mut DeviceBuf<T>) -> Result<()> {
        self.imp.memset_zero(&mut buf.imp)
    }

    /// Copies `host` over elements `at..at + host.len()` of a buffer (in stream order).
    fn write<T: Elem>(&self, buf: &mut DeviceBuf<T>, at: usize, host: &[T]) -> Result<()> {
        if at.checked_add(host.len()).is_none_or(|end| end > buf.len) {
            return Err(crate::error::shape_err("CudaDevice::write", format!("{at}..+{} is outside 0..{}", host.len(), buf.len)));
        }
        self.imp.write(&mut buf.imp, at * size_of::<T>(), bytemuck::cast_slice(host))
    }

    /// The buffer's contents (waits for every launch before it).
    pub fn download<T: Elem>(&self, buf: &DeviceBuf<T>) -> Result<Vec<T>> {
        self.download_range(buf, 0..buf.len)
    }

    /// Elements `range` of a buffer (waits for every launch before it).
    pub fn download_range<T: Elem>(&self, buf: &DeviceBuf<T>, range: std::ops::Range<usize>) -> Result<Vec<T>> {
        if range.start > range.end || range.end > buf.len {
            return Err(crate::error::shape_err("CudaDevice::download_range", format!("{range:?} is outside 0..{}", buf.len)));
        }
        let sz = size_of::<T>();
        let bytes = self.imp.download(&buf.imp, range.start * sz..range.end * sz)?;
        let mut out = vec![T::default(); range.len()];
        bytemuck::cast_slice_mut::<T, u8>(&mut out).copy_from_slice(&bytes);
        Ok(out)
    }

    /// One element of a buffer (waits); for error messages that name a bad value.
    fn element<T: Elem>(&self, buf: &DeviceBuf<T>, i: usize) -> Result<T> {
        Ok(self.download_range(buf, i..i + 1)?[0])
    }

    /// Plain-old-data arrays the kernels read (tile lists, pointer tables, f64 scratch) that
    /// are no [`Elem`].
    fn upload_pod<T: bytemuck::Pod>(&self, host: &[T]) -> Result<imp::Buf> {
        self.imp.upload(bytemuck::cast_slice(host))
    }

    /// Waits until every launch so far has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.imp.synchronize()
    }
}

/// A [`KernelError::Shape`] for a size the kernels take as 32 bits.
fn u32_of(op: &'static str, what: &'static str, v: usize) -> Result<u32> {
    u32::try_from(v)
        .ok()
        .filter(|&x| x < u32::MAX)
        .ok_or_else(|| KernelError::Shape { op, detail: format!("{what} = {v} does not fit the kernel's 32-bit sizes") })
}

/// Blocks of a grid-stride kernel: enough to fill the GPU, never more than the work.
fn stride_grid(items: usize, per_block: usize) -> u32 {
    items.div_ceil(per_block).clamp(1, 1 << 16) as u32
}

/// A grid dimension `y`/`z` (at most 65535 blocks) for `items` in blocks of `per_block`.
fn grid_yz(op: &'static str, what: &'static str, items: usize, per_block: usize) -> Result<u32> {
    let b = items.div_ceil(per_block);
    if b > 65_535 {
        return Err(KernelError::Shape { op, detail: format!("{what} = {items} exceeds the grid (at most 65535 blocks of {per_block})") });
    }
    Ok(b as u32)
}
