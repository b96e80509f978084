//! Without the `cuda` feature no [`CudaDevice`] can exist; these keep the private API of the
//! launches the same, so the public wrappers compile (and are never reached).

use super::Sm90Kernel;
use super::plan::Sm90Plan;
use super::stack::{Sm90Out, StackRange};
use crate::backend::Elem;
use crate::cuda::{CudaDevice, DeviceBuf};
use crate::error::{KernelError, Result};

fn no_cuda<T>() -> Result<T> {
    Err(KernelError::CudaUnavailable("dsv3-kernels was built without the `cuda` feature".into()))
}

// Without the feature no `CudaDevice` can exist; these only keep the API the same.
impl CudaDevice {
    pub(super) fn sm90_sms(&self) -> Result<u32> {
        no_cuda()
    }
    pub(super) fn sm90_time(&self, _f: &mut dyn FnMut() -> Result<()>) -> Result<f32> {
        no_cuda()
    }
    pub(super) fn sm90_zero_bytes<T: Elem>(&self, _b: &mut DeviceBuf<T>, _bytes: std::ops::Range<usize>) -> Result<()> {
        no_cuda()
    }
    pub(super) fn sm90_copy_bufs<T: Elem>(&self, _src: &DeviceBuf<T>, _dst: &mut DeviceBuf<T>) -> Result<()> {
        no_cuda()
    }
    pub(in crate::cuda) fn sm90_aligned(&self, _a_q: &DeviceBuf<u8>, _w: StackRange<'_>) -> bool {
        false
    }
    pub(in crate::cuda) fn sm90_launch_tma(
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
    pub(super) fn sm90_fallback(
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
