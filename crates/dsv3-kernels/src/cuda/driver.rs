//! The real device layer (feature `cuda`): driver probe, context, the embedded modules, raw
//! buffers and the one raw launch. Everything here is crate-private; `ops.rs` builds the safe
//! API on top of it.

use super::kernels::{Kernel, Module};
use crate::error::{KernelError, Result};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, DriverError, LaunchConfig, PushKernelArg,
    SyncOnDrop,
};
use cudarc::nvrtc::Ptx;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, MutexGuard};
mod sm90;

fn drv(e: DriverError) -> KernelError {
    KernelError::Cuda(e.to_string())
}

fn unavailable(what: impl Into<String>) -> KernelError {
    KernelError::CudaUnavailable(what.into())
}

/// Runs a driver call that cudarc may answer with a panic (a missing library or symbol).
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> std::result::Result<T, DriverError>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(|e| unavailable(format!("{what}: {e}"))),
        Err(_) => Err(unavailable(format!("{what}: the CUDA driver library is unusable (cudarc panicked)"))),
    }
}

/// Checks that the driver library can be loaded, before cudarc (which panics otherwise).
pub(crate) fn probe_libcuda() -> Result<()> {
    probe_library(&["libcuda.so.1", "libcuda.so"], "libcuda")
}

/// Checks that one of `names` (an NVIDIA library cudarc loads at run time) can be loaded.
pub(crate) fn probe_library(names: &[&str], what: &str) -> Result<()> {
    let mut errs = Vec::new();
    for &name in names {
        // SAFETY: loading an NVIDIA library (the driver, NCCL) runs only its own initialisers;
        // it is the library cudarc loads next, and the handle is closed again right away.
        match unsafe { libloading::Library::new(name) } {
            Ok(_) => return Ok(()),
            Err(e) => {
                let why = std::error::Error::source(&e).map_or(String::new(), |s| format!(": {s}"));
                errs.push(format!("{e}{why}"));
            }
        }
    }
    Err(unavailable(format!("no {what}: {}", errs.join("; "))))
}

/// One GPU: its context, the default stream, every kernel's function, and the status word.
pub(crate) struct Device {
    stream: Arc<CudaStream>,
    funcs: Vec<CudaFunction>,
    status: Mutex<CudaSlice<u32>>,
    name: String,
    _ctx: Arc<CudaContext>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("name", &self.name).field("kernels", &self.funcs.len()).finish()
    }
}

/// Device memory of a buffer (`None` when empty: the driver allocates no zero-byte blocks).
#[derive(Debug)]
pub(crate) struct Buf(Option<CudaSlice<u8>>);

/// Keeps cudarc's stream-ordering record of one buffer access alive until the launch.
pub(crate) type Access<'a> = Option<SyncOnDrop<'a>>;

impl Device {
    pub(crate) fn new(ordinal: usize) -> Result<Device> {
        probe_libcuda()?;
        let count = guarded("no GPU: cuInit/cuDeviceGetCount failed", CudaContext::device_count)?;
        if count <= 0 {
            return Err(unavailable("no GPU: the driver sees no device"));
        }
        if ordinal >= count as usize {
            return Err(unavailable(format!("no GPU {ordinal}: the driver sees {count}")));
        }
        let ctx = guarded("no usable GPU: creating the context failed", || CudaContext::new(ordinal))?;
        let name = ctx.name().map_err(drv)?;
        let cc = ctx.compute_capability().map_err(drv)?;
        if cc != (9, 0) {
            return Err(unavailable(format!("{name} is sm_{}{}; the kernels are built for sm_90a", cc.0, cc.1)));
        }
        let stream = ctx.default_stream();
        let mut modules = Vec::new();
        for m in Module::ALL {
            let module = ctx
                .load_module(Ptx::from_binary(m.cubin().to_vec()))
                .map_err(|e| KernelError::Cuda(format!("loading cuda/{}: {e}", m.source())))?;
            modules.push((*m, module));
        }
        let mut funcs = Vec::with_capacity(Kernel::ALL.len());
        for (i, k) in Kernel::ALL.iter().enumerate() {
            // `launch` indexes `funcs` by the enum's value: the generated order must match.
            if *k as usize != i {
                return Err(KernelError::Cuda(format!("kernel table out of order: {k:?} = {} at {i}", *k as usize)));
            }
            let module = modules
                .iter()
                .find(|(m, _)| *m == k.module())
                .map(|(_, m)| m)
                .ok_or_else(|| KernelError::Cuda(format!("no module for {k:?}")))?;
            let f = module
                .load_function(k.symbol())
                .map_err(|e| KernelError::Cuda(format!("kernel `{}` missing from cuda/{}: {e}", k.symbol(), k.module().source())))?;
            funcs.push(f);
        }
        let status = Mutex::new(stream.alloc_zeros::<u32>(1).map_err(drv)?);
        Ok(Device { stream, funcs, status, name, _ctx: ctx })
    }

    pub(crate) fn name(&self) -> String {
        self.name.clone()
    }

    pub(crate) fn zeros(&self, bytes: usize) -> Result<Buf> {
        if bytes == 0 {
            return Ok(Buf(None));
        }
        Ok(Buf(Some(self.stream.alloc_zeros::<u8>(bytes).map_err(drv)?)))
    }

    pub(crate) fn upload(&self, host: &[u8]) -> Result<Buf> {
        if host.is_empty() {
            return Ok(Buf(None));
        }
        Ok(Buf(Some(self.stream.clone_htod(host).map_err(drv)?)))
    }

    /// Bytes `range` of a buffer, copied to the host (waits for the stream).
    pub(crate) fn download(&self, b: &Buf, range: std::ops::Range<usize>) -> Result<Vec<u8>> {
        match &b.0 {
            _ if range.is_empty() => Ok(Vec::new()),
            Some(s) => {
                let v = s.try_slice(range).ok_or_else(|| KernelError::Cuda("download range out of bounds".into()))?;
                self.stream.clone_dtoh(&v).map_err(drv)
            }
            None => Err(KernelError::Cuda("download range out of bounds".into())),
        }
    }

    /// Copies `host` into bytes `offset..offset + host.len()` of a buffer (in stream order).
    pub(crate) fn write(&self, b: &mut Buf, offset: usize, host: &[u8]) -> Result<()> {
        if host.is_empty() {
            return Ok(());
        }
        let oob = || KernelError::Cuda("write out of bounds".into());
        let end = offset.checked_add(host.len()).ok_or_else(oob)?;
        let s = b.0.as_mut().ok_or_else(oob)?;
        let mut v = s.try_slice_mut(offset..end).ok_or_else(oob)?;
        self.stream.memcpy_htod(host, &mut v).map_err(drv)
    }

    /// Sets every byte of a buffer to zero (in stream order).
    pub(crate) fn memset_zero(&self, b: &mut Buf) -> Result<()> {
        match &mut b.0 {
            Some(s) => self.stream.memset_zeros(s).map_err(drv),
            None => Ok(()),
        }
    }

    /// A device-side copy of a buffer (in stream order).
    pub(crate) fn copy(&self, b: &Buf) -> Result<Buf> {
        match &b.0 {
            Some(s) => Ok(Buf(Some(self.stream.clone_dtod(s).map_err(drv)?))),
            None => Ok(Buf(None)),
        }
    }

    pub(crate) fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(drv)
    }

    /// The device address of a buffer for reading (0 when empty).
    pub(crate) fn addr<'a>(&'a self, b: &'a Buf) -> (u64, Access<'a>) {
        match &b.0 {
            Some(s) => {
                let (p, g) = s.device_ptr(&self.stream);
                (p, Some(g))
            }
            None => (0, None),
        }
    }

    /// The device address of a buffer for writing (0 when empty).
    pub(crate) fn addr_mut<'a>(&'a self, b: &'a mut Buf) -> (u64, Access<'a>) {
        match &mut b.0 {
            Some(s) => {
                let (p, g) = s.device_ptr_mut(&self.stream);
                (p, Some(g))
            }
            None => (0, None),
        }
    }

    /// The address of an optional buffer for reading (0 when absent or empty).
    pub(crate) fn addr_opt<'a>(&'a self, b: Option<&'a Buf>) -> (u64, Access<'a>) {
        b.map_or((0, None), |b| self.addr(b))
    }

    /// The address of an optional buffer for writing (0 when absent or empty).
    pub(crate) fn addr_mut_opt<'a>(&'a self, b: Option<&'a mut Buf>) -> (u64, Access<'a>) {
        b.map_or((0, None), |b| self.addr_mut(b))
    }

    /// Takes the status word, zeroed, for one launch.
    pub(crate) fn status(&self) -> Result<Status<'_>> {
        let mut word = self.status.lock().unwrap_or_else(|p| p.into_inner());
        self.stream.memset_zeros(&mut *word).map_err(drv)?;
        let addr = word.device_ptr(&self.stream).0;
        Ok(Status { dev: self, word, addr })
    }

    /// Launches `k` with its parameter struct.
    ///
    /// # Safety
    /// `p` must be the parameter struct of `k`, every address in it must point to a live
    /// buffer of this device that is large enough for every access the kernel makes with
    /// these sizes and dimensions, and no buffer written by the kernel may be aliased by
    /// another address in `p` unless the kernel allows it.
    pub(crate) unsafe fn launch<P: DeviceRepr>(&self, k: Kernel, grid: (u32, u32), block: u32, p: &P) -> Result<()> {
        // SAFETY: the caller upholds this function's contract, which is launch3's.
        unsafe { self.launch3(k, (grid.0, grid.1, 1), block, p) }
    }

    /// [`Device::launch`] with a three-dimensional grid.
    ///
    /// # Safety
    /// As [`Device::launch`].
    pub(crate) unsafe fn launch3<P: DeviceRepr>(&self, k: Kernel, grid: (u32, u32, u32), block: u32, p: &P) -> Result<()> {
        let cfg = LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: 0 };
        let mut b = self.stream.launch_builder(&self.funcs[k as usize]);
        b.arg(p);
        // SAFETY: the caller upholds this function's contract, which is the kernel's.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| KernelError::Cuda(format!("launching `{}`: {e}", k.symbol())))
    }
}

/// The status word of one launch (see `params.h`), held until read.
pub(crate) struct Status<'a> {
    dev: &'a Device,
    word: MutexGuard<'a, CudaSlice<u32>>,
    pub(crate) addr: u64,
}

impl Status<'_> {
    /// Waits for the launch and returns the lowest bad index it reported, if any.
    pub(crate) fn read(self) -> Result<Option<u32>> {
        let v = self.dev.stream.clone_dtoh(&*self.word).map_err(drv)?;
        Ok(v.first().copied().filter(|&s| s != 0).map(|s| !s))
    }
}
