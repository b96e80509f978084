//! The CUDA backend's device layer: a GPU ([`CudaDevice`]), its buffers ([`DeviceBuf`]) and
//! one safe launch wrapper per kernel of `cuda/` (methods of [`CudaDevice`], in `ops.rs`).
//!
//! Layers, as cudarc has them: the kernels (`cuda/<family>/*.cu`, one plain parameter struct
//! each in `cuda/include/dsv3/params.h`, mirrored in [`params`]) → the generated `Kernel`
//! enum and embedded cubins (build.rs, feature `cuda`) → one `unsafe` raw launch
//! (`driver.rs`) → safe wrappers that validate every shape first and state why the launch is
//! in bounds. Names match at every layer: kernel `dsv3_rms_norm`, struct `dsv3_rms_norm_params`
//! / [`params::RmsNormParams`], `Kernel::RmsNorm`, [`CudaDevice::rms_norm`].
//!
//! Without the `cuda` feature the same API exists, and [`CudaDevice::new`] returns
//! [`KernelError::CudaUnavailable`]; no other value of these types can then exist. With it, a
//! machine with no driver library or no Hopper GPU gets the same error, never a panic.
//!
//! Errors: shapes are checked before any launch, with the CPU functions' error values. Input
//! checks that need the data (non-finite values, ids and positions out of range) run on the
//! device and come back through a status word; the wrapper then waits for the kernel and
//! returns the same error as the CPU, but unlike the CPU, outputs (in-place ones included)
//! may have been partly written.

#[cfg(feature = "cuda")]
mod driver;
#[cfg(feature = "cuda")]
mod kernels;
mod ops;
pub mod params;
pub mod sm90_gemm;
#[cfg(not(feature = "cuda"))]
mod stub;

#[cfg(feature = "cuda")]
use driver as imp;
#[cfg(feature = "cuda")]
pub use kernels::{KERNEL_REPORT, Kernel, Module};
#[cfg(not(feature = "cuda"))]
use stub as imp;

pub use ops::{DeviceFp8Weight, DevicePlan, DeviceRope};

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
