//! What the GPU benchmark (`benches/benches/sm90_gemm.rs`) times with.

use crate::backend::Elem;
use crate::cuda::{CudaDevice, DeviceBuf};
use crate::error::{Result, shape_err};

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
}
