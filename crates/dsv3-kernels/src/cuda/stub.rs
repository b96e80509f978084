//! The device layer of a build without the `cuda` feature: the same crate-private interface
//! as `driver.rs`, but no value of [`Device`] can exist, so `Device::new` is the only entry
//! point that runs and it returns [`KernelError::CudaUnavailable`].

use crate::backend::DeviceStats;
use crate::error::{KernelError, Result};
use std::convert::Infallible;

/// Never constructed.
#[derive(Debug)]
pub(crate) struct Device(Infallible);

/// Never constructed.
#[derive(Debug)]
pub(crate) struct Buf(Infallible);

/// Never constructed.
#[derive(Debug)]
pub(crate) struct Graph(Infallible);

/// Stands in for cudarc's access record.
pub(crate) type Access<'a> = std::marker::PhantomData<&'a ()>;

/// Stands in for the generated kernel enum.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NoKernel;

impl Device {
    pub(crate) fn new(_ordinal: usize) -> Result<Device> {
        Err(KernelError::CudaUnavailable("dsv3-kernels was built without the `cuda` feature".into()))
    }
    pub(crate) fn name(&self) -> String {
        match self.0 {}
    }
    pub(crate) fn zeros(&self, _bytes: usize) -> Result<Buf> {
        match self.0 {}
    }
    pub(crate) fn upload(&self, _host: &[u8]) -> Result<Buf> {
        match self.0 {}
    }
    pub(crate) fn upload_parts(&self, _parts: &[&[u8]]) -> Result<Vec<Buf>> {
        match self.0 {}
    }
    pub(crate) fn download(&self, _b: &Buf, _range: std::ops::Range<usize>) -> Result<Vec<u8>> {
        match self.0 {}
    }
    pub(crate) fn write(&self, _b: &mut Buf, _offset: usize, _host: &[u8]) -> Result<()> {
        match self.0 {}
    }
    pub(crate) fn write_parts(&self, _bufs: &mut [&mut Buf], _hosts: &[&[u8]]) -> Result<()> {
        match self.0 {}
    }
    pub(crate) fn memset_zero(&self, _b: &mut Buf) -> Result<()> {
        match self.0 {}
    }
    pub(crate) fn copy(&self, _b: &Buf) -> Result<Buf> {
        match self.0 {}
    }
    pub(crate) fn synchronize(&self) -> Result<()> {
        match self.0 {}
    }
    pub(crate) fn addr<'a>(&'a self, _b: &'a Buf) -> (u64, Access<'a>) {
        match self.0 {}
    }
    pub(crate) fn addr_mut<'a>(&'a self, _b: &'a mut Buf) -> (u64, Access<'a>) {
        match self.0 {}
    }
    pub(crate) fn addr_opt<'a>(&'a self, _b: Option<&'a Buf>) -> (u64, Access<'a>) {
        match self.0 {}
    }
    pub(crate) fn addr_mut_opt<'a>(&'a self, _b: Option<&'a mut Buf>) -> (u64, Access<'a>) {
        match self.0 {}
    }
    pub(crate) fn shadow<'a>(&self, _b: &'a Buf) -> Option<&'a [u8]> {
        match self.0 {}
    }
    pub(crate) fn in_step(&self) -> bool {
        match self.0 {}
    }
    pub(crate) fn status(&self, _k: NoKernel) -> Result<Status<'_>> {
        match self.0 {}
    }
    pub(crate) fn begin_step(&self) -> Result<()> {
        match self.0 {}
    }
    pub(crate) fn end_step(&self) -> Result<()> {
        match self.0 {}
    }
    pub(crate) fn reserve_workspace(&self, _bytes: usize) -> Result<()> {
        match self.0 {}
    }
    pub(crate) fn measure_workspace(&self) -> Result<()> {
        match self.0 {}
    }
    pub(crate) fn measured_workspace(&self) -> usize {
        match self.0 {}
    }
    pub(crate) fn stats(&self) -> DeviceStats {
        match self.0 {}
    }
    pub(crate) fn capture(&self, _f: &mut dyn FnMut() -> Result<()>) -> Result<Graph> {
        match self.0 {}
    }
    pub(crate) fn replay(&self, _g: &Graph) -> Result<()> {
        match self.0 {}
    }
    pub(crate) fn timed<R, E: From<KernelError>>(
        &self,
        _f: impl FnOnce() -> std::result::Result<R, E>,
    ) -> std::result::Result<(R, f32), E> {
        match self.0 {}
    }
    pub(crate) fn copy_bandwidth(&self) -> Result<f64> {
        match self.0 {}
    }
    /// # Safety
    /// As the real one's; never callable.
    pub(crate) unsafe fn launch<P>(&self, _k: NoKernel, _grid: (u32, u32), _block: u32, _p: &P) -> Result<()> {
        match self.0 {}
    }
    /// # Safety
    /// As the real one's; never callable.
    pub(crate) unsafe fn launch3<P>(&self, _k: NoKernel, _grid: (u32, u32, u32), _block: u32, _p: &P) -> Result<()> {
        match self.0 {}
    }
}

/// Never constructed.
pub(crate) struct Status<'a> {
    never: Infallible,
    pub(crate) addr: u64,
    _dev: &'a Device,
}

impl Status<'_> {
    pub(crate) fn read(self) -> Result<Option<u32>> {
        match self.never {}
    }
}
