//! The real device layer (feature `cuda`): driver probe, context, the embedded modules, raw
//! buffers and the one raw launch, the step mode (deferred checks, the workspace), graph
//! capture and event timing. Everything here is crate-private; `ops.rs` and its siblings build
//! the safe API on top of it.
//!
//! # Buffers
//!
//! A [`Buf`] is device memory of its own (a driver allocation), or a part of a larger one: a
//! block of the step workspace, or one of several tables uploaded in one copy. Small buffers
//! uploaded from the host keep a host copy (their *shadow*, at most [`SHADOW_MAX`] bytes) until
//! anything may write them on the device: the wrappers validate index data (slots, block
//! tables, lengths, offsets) on the shadow instead of reading it back.
//!
//! # Steps
//!
//! Between [`Device::begin_step`] and [`Device::end_step`]: buffers are carved from the
//! workspace when one is reserved ([`Device::reserve_workspace`]; `crate::workspace`), and the
//! kernels' status words go to one word per kernel of the step, read back once at the end,
//! instead of being read after each launch. A read-back inside a step is counted
//! ([`DeviceStats::host_syncs`]) and refused while a graph is being captured.

use super::kernels::{Kernel, Module};
use crate::backend::DeviceStats;
use crate::error::{KernelError, Result};
use crate::workspace::ArenaBook;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, DeviceRepr, DriverError, LaunchConfig, PushKernelArg,
    SyncOnDrop, result, sys,
};
use cudarc::nvrtc::Ptx;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
mod sm90;

/// Largest upload that keeps a host copy (index tables; not weights).
pub(crate) const SHADOW_MAX: usize = 1 << 16;

fn drv(e: DriverError) -> KernelError {
    KernelError::Cuda(e.to_string())
}

fn unavailable(what: impl Into<String>) -> KernelError {
    KernelError::CudaUnavailable(what.into())
}

/// An allocation of `bytes` failed with `e`: [`KernelError::OutOfMemory`] (with the device's
/// free and total memory) when the driver ran out of memory, else [`KernelError::Cuda`].
fn alloc_err(e: DriverError, bytes: usize) -> KernelError {
    if e.0 == sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
        let (free, total) = result::mem_get_info().unwrap_or((0, 0));
        return KernelError::OutOfMemory { bytes, free, total };
    }
    KernelError::Cuda(format!("allocating {bytes} bytes: {e}"))
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

/// Counters of what the device did ([`DeviceStats`]).
#[derive(Debug, Default)]
struct Counters {
    launches: AtomicU64,
    allocations: AtomicU64,
    uploads: AtomicU64,
    host_syncs: AtomicU64,
    graph_replays: AtomicU64,
}

impl Counters {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// The step mode (module docs).
#[derive(Debug, Default)]
struct StepState {
    /// Nesting of begin_step / capture.
    depth: usize,
    capturing: bool,
    /// The workspace memory (None: no workspace reserved).
    arena: Option<Arc<CudaSlice<u8>>>,
    /// Measuring the peak of the workspace a step would need (no workspace memory meanwhile).
    measuring: bool,
}

/// One GPU: its context, its stream, every kernel's function, the status words, the step
/// mode and the workspace.
pub(crate) struct Device {
    stream: Arc<CudaStream>,
    funcs: Vec<CudaFunction>,
    /// The status word of a checked (out-of-step) launch.
    status: Mutex<CudaSlice<u32>>,
    /// One status word per kernel, for the launches of a step.
    step_status: CudaSlice<u32>,
    step: Mutex<StepState>,
    /// Whether a graph is being captured (read on every buffer access), and the allocations
    /// the graph being captured uses.
    capturing: AtomicBool,
    graph_keep: Mutex<Vec<Arc<CudaSlice<u8>>>>,
    book: Arc<Mutex<ArenaBook>>,
    counters: Counters,
    name: String,
    _ctx: Arc<CudaContext>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("name", &self.name).field("kernels", &self.funcs.len()).finish()
    }
}

/// The memory of a buffer: `len` bytes at `ptr`, inside the driver allocation `keep` (a
/// buffer's own, or a workspace or a shared upload that several buffers are parts of). Every
/// part holds the allocation, so a captured graph that holds it too can never write freed
/// memory.
#[derive(Debug)]
enum Mem {
    /// No bytes (the driver allocates no zero-byte blocks).
    Empty,
    Part {
        keep: Arc<CudaSlice<u8>>,
        ptr: u64,
        len: usize,
    },
}

impl Mem {
    /// All of a fresh allocation.
    fn whole(stream: &CudaStream, s: CudaSlice<u8>) -> Mem {
        let len = s.len();
        let ptr = s.device_ptr(stream).0;
        Mem::Part { keep: Arc::new(s), ptr, len }
    }
}

/// A workspace block, released in the book when its buffer drops.
#[derive(Debug)]
struct Ticket {
    book: Arc<Mutex<ArenaBook>>,
    id: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.book.lock().unwrap_or_else(|p| p.into_inner()).free(self.id);
    }
}

/// Device memory of a buffer, with its host copy while it is known (module docs).
#[derive(Debug)]
pub(crate) struct Buf {
    mem: Mem,
    /// The host copy (module docs); None once the device may have written the buffer.
    shadow: Option<Arc<[u8]>>,
    /// Written by a captured graph: a replay may change it, so it keeps no shadow.
    graph_written: bool,
    /// The workspace block this memory is (shared by the parts of one upload).
    _ticket: Option<Arc<Ticket>>,
}

impl Buf {
    fn new(mem: Mem) -> Buf {
        Buf { mem, shadow: None, graph_written: false, _ticket: None }
    }

    fn empty() -> Buf {
        Buf::new(Mem::Empty)
    }

    /// Size in bytes.
    pub(crate) fn bytes(&self) -> usize {
        match &self.mem {
            Mem::Empty => 0,
            Mem::Part { len, .. } => *len,
        }
    }
}

/// Keeps cudarc's stream-ordering record of one buffer access alive until the launch.
pub(crate) type Access<'a> = Option<SyncOnDrop<'a>>;

/// A captured step ([`Device::capture`]), with every allocation it reads or writes (so a replay
/// never touches freed memory; they are freed after the graph, in stream order). cudarc's graph
/// handle is not `Send`; the mutex serialises every use of it, which is all the driver asks of
/// graph objects.
pub(crate) struct Graph {
    exec: Mutex<SendGraph>,
    /// The workspace it was captured in (its temporaries live at its base).
    arena: Option<Arc<CudaSlice<u8>>>,
    _keep: Vec<Arc<CudaSlice<u8>>>,
}

struct SendGraph(CudaGraph);
// SAFETY: CUDA graph and graph-exec handles may be used from any thread as long as no two
// threads use one at the same time (driver API, "Graph object thread safety"); every use goes
// through the mutex of `Graph`.
unsafe impl Send for SendGraph {}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Graph")
    }
}

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
        super::check_compute_capability(&name, cc)?;
        // SAFETY: every buffer of this device is used on the one stream below, in order, so
        // cudarc's per-buffer events (two created per allocation) have nothing to order.
        unsafe { ctx.disable_event_tracking() };
        // A stream of its own: the legacy default stream cannot be captured into a graph.
        let stream = ctx.new_stream().map_err(drv)?;
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
        let status = Mutex::new(stream.alloc_zeros::<u32>(1).map_err(|e| alloc_err(e, 4))?);
        let step_status = stream.alloc_zeros::<u32>(Kernel::ALL.len()).map_err(|e| alloc_err(e, 4 * Kernel::ALL.len()))?;
        Ok(Device {
            stream,
            funcs,
            status,
            step_status,
            step: Mutex::new(StepState::default()),
            capturing: AtomicBool::new(false),
            graph_keep: Mutex::new(Vec::new()),
            book: Arc::new(Mutex::new(ArenaBook::new(0))),
            counters: Counters::default(),
            name,
            _ctx: ctx,
        })
    }

    pub(crate) fn name(&self) -> String {
        self.name.clone()
    }

    fn state(&self) -> MutexGuard<'_, StepState> {
        self.step.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn book(&self) -> MutexGuard<'_, ArenaBook> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A driver allocation of `bytes` (not zeroed).
    fn alloc_owned(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        Counters::bump(&self.counters.allocations);
        // SAFETY: the bytes are uninitialised device memory; every caller writes all of them
        // (a zero fill or a copy) before anything reads them.
        unsafe { self.stream.alloc::<u8>(bytes) }.map_err(|e| alloc_err(e, bytes))
    }

    /// Memory for `bytes` (> 0), from the workspace inside a step when it has room, else a
    /// driver allocation; not yet written.
    fn raw(&self, bytes: usize) -> Result<Buf> {
        let st = self.state();
        if st.depth > 0 {
            if let Some(arena) = &st.arena {
                if let Some((id, offset)) = self.book().alloc(bytes) {
                    let base = arena.device_ptr(&self.stream).0;
                    let mem = Mem::Part { keep: arena.clone(), ptr: base + offset as u64, len: bytes };
                    return Ok(Buf {
                        mem,
                        shadow: None,
                        graph_written: false,
                        _ticket: Some(Arc::new(Ticket { book: self.book.clone(), id })),
                    });
                }
            } else if st.measuring
                && let Some((id, _)) = self.book().alloc(bytes)
            {
                if st.capturing {
                    return Err(KernelError::Cuda("no workspace to capture a graph in (measure and reserve one first)".into()));
                }
                drop(st);
                let mem = Mem::whole(&self.stream, self.alloc_owned(bytes)?);
                return Ok(Buf {
                    mem,
                    shadow: None,
                    graph_written: false,
                    _ticket: Some(Arc::new(Ticket { book: self.book.clone(), id })),
                });
            }
        }
        if st.capturing {
            // An allocation inside a graph would be the graph's own, never freed between
            // replays (which the driver refuses): everything must come from the workspace.
            return Err(KernelError::Cuda(format!("the workspace has no room for {bytes} more bytes while capturing a graph")));
        }
        drop(st);
        Ok(Buf::new(Mem::whole(&self.stream, self.alloc_owned(bytes)?)))
    }

    pub(crate) fn zeros(&self, bytes: usize) -> Result<Buf> {
        if bytes == 0 {
            return Ok(Buf::empty());
        }
        let mut b = self.raw(bytes)?;
        self.memset_zero(&mut b)?;
        Ok(b)
    }

    pub(crate) fn upload(&self, host: &[u8]) -> Result<Buf> {
        if host.is_empty() {
            return Ok(Buf::empty());
        }
        let mut b = self.raw(host.len())?;
        self.write(&mut b, 0, host)?;
        Ok(b)
    }

    /// Several host arrays in one allocation and one copy: one buffer per part, each starting
    /// at a multiple of 256 bytes, each with its shadow when small.
    pub(crate) fn upload_parts(&self, parts: &[&[u8]]) -> Result<Vec<Buf>> {
        let mut offsets = Vec::with_capacity(parts.len());
        let mut total = 0usize;
        for p in parts {
            offsets.push(total);
            total = total
                .checked_add(p.len())
                .and_then(crate::workspace::aligned)
                .ok_or(KernelError::Overflow { op: "upload_parts", what: "bytes" })?;
        }
        if total == 0 {
            return Ok(parts.iter().map(|_| Buf::empty()).collect());
        }
        let mut packed = vec![0u8; total];
        for (p, &o) in parts.iter().zip(&offsets) {
            packed[o..o + p.len()].copy_from_slice(p);
        }
        let whole = self.upload(&packed)?;
        let ticket = whole._ticket.clone();
        let (keep, base) = match whole.mem {
            Mem::Part { keep, ptr, .. } => (keep, ptr),
            Mem::Empty => return Err(KernelError::Cuda("upload_parts: empty upload".into())),
        };
        let mut out = Vec::with_capacity(parts.len());
        for (p, &o) in parts.iter().zip(&offsets) {
            if p.is_empty() {
                out.push(Buf::empty());
                continue;
            }
            let mem = Mem::Part { keep: keep.clone(), ptr: base + o as u64, len: p.len() };
            let shadow = (p.len() <= SHADOW_MAX).then(|| Arc::<[u8]>::from(*p));
            // Every part keeps the workspace block (if any): it is released with the last one.
            out.push(Buf { mem, shadow, graph_written: false, _ticket: ticket.clone() });
        }
        Ok(out)
    }

    /// Bytes `range` of a buffer, copied to the host (waits for the stream).
    pub(crate) fn download(&self, b: &Buf, range: std::ops::Range<usize>) -> Result<Vec<u8>> {
        if range.is_empty() {
            return Ok(Vec::new());
        }
        if range.end > b.bytes() {
            return Err(KernelError::Cuda("download range out of bounds".into()));
        }
        self.sync_point("a read-back")?;
        let mut out = vec![0u8; range.len()];
        match &b.mem {
            Mem::Part { ptr, .. } => {
                // SAFETY: ptr + range lies inside the part (range.end <= len, checked above),
                // which lies inside the live allocation `keep`; `out` has range.len() bytes. The
                // copy to pageable memory returns when it is done.
                unsafe { result::memcpy_dtoh_async(&mut out, ptr + range.start as u64, self.stream.cu_stream()) }.map_err(drv)?;
                self.stream.synchronize().map_err(drv)?;
            }
            Mem::Empty => return Err(KernelError::Cuda("download range out of bounds".into())),
        }
        Ok(out)
    }

    /// Counts a host synchronisation; refused while a graph is being captured.
    fn sync_point(&self, what: &str) -> Result<()> {
        if self.state().capturing {
            return Err(KernelError::Cuda(format!("{what} inside a CUDA graph capture (a decode step must not wait for the device)")));
        }
        Counters::bump(&self.counters.host_syncs);
        Ok(())
    }

    /// Copies `host` into bytes `offset..offset + host.len()` of a buffer (in stream order).
    /// A write of the whole buffer keeps it as the shadow (when small); any other drops it.
    pub(crate) fn write(&self, b: &mut Buf, offset: usize, host: &[u8]) -> Result<()> {
        if host.is_empty() {
            return Ok(());
        }
        let oob = || KernelError::Cuda("write out of bounds".into());
        let end = offset.checked_add(host.len()).ok_or_else(oob)?;
        if end > b.bytes() {
            return Err(oob());
        }
        if self.state().capturing {
            return Err(KernelError::Cuda("a host-to-device copy inside a CUDA graph capture".into()));
        }
        match &mut b.mem {
            Mem::Part { ptr, .. } => {
                // SAFETY: ptr + offset .. ptr + end lies inside the part (end <= len, checked),
                // inside the live allocation `keep`; the driver stages pageable host memory
                // before this returns, so `host` may go right after.
                unsafe { result::memcpy_htod_async(*ptr + offset as u64, host, self.stream.cu_stream()) }.map_err(drv)?;
            }
            Mem::Empty => return Err(oob()),
        }
        Counters::bump(&self.counters.uploads);
        b.shadow = (!b.graph_written && offset == 0 && end == b.bytes() && end <= SHADOW_MAX).then(|| Arc::<[u8]>::from(host));
        Ok(())
    }

    /// `bufs[i] = hosts[i]` (same byte lengths, checked by the caller): one copy when the
    /// buffers are parts of one allocation at ascending addresses (what `upload_parts` makes;
    /// the bytes between parts belong to no buffer), else one copy each. Shadows as `write`.
    pub(crate) fn write_parts(&self, bufs: &mut [&mut Buf], hosts: &[&[u8]]) -> Result<()> {
        let spans: Option<Vec<(u64, usize)>> = bufs
            .iter()
            .map(|b| match &b.mem {
                Mem::Part { ptr, len, .. } => Some((*ptr, *len)),
                Mem::Empty => None,
            })
            .collect();
        let one = |i: usize| match (&bufs[0].mem, &bufs[i].mem) {
            (Mem::Part { keep: a, .. }, Mem::Part { keep: b, .. }) => Arc::ptr_eq(a, b),
            _ => false,
        };
        let contiguous =
            spans.as_ref().is_some_and(|s| s.len() > 1 && s.windows(2).all(|w| w[0].0 + w[0].1 as u64 <= w[1].0) && (1..s.len()).all(one));
        if !contiguous || self.state().capturing {
            for (b, h) in bufs.iter_mut().zip(hosts) {
                self.write(b, 0, h)?;
            }
            return Ok(());
        }
        let spans = spans.unwrap_or_default();
        let (base, last) = (spans[0].0, spans[spans.len() - 1]);
        let total = (last.0 - base) as usize + last.1;
        let mut packed = vec![0u8; total];
        for (&(ptr, len), h) in spans.iter().zip(hosts) {
            let at = (ptr - base) as usize;
            packed[at..at + len.min(h.len())].copy_from_slice(&h[..len.min(h.len())]);
        }
        // SAFETY: base .. base + total runs from the first part's start to the last part's end,
        // all inside the one live allocation the parts share (checked: same `keep`, ascending,
        // not overlapping); the bytes between parts belong to no buffer. The driver stages the
        // pageable source before returning.
        unsafe { result::memcpy_htod_async(base, &packed, self.stream.cu_stream()) }.map_err(drv)?;
        Counters::bump(&self.counters.uploads);
        for (b, h) in bufs.iter_mut().zip(hosts) {
            b.shadow = (!b.graph_written && h.len() == b.bytes() && h.len() <= SHADOW_MAX).then(|| Arc::<[u8]>::from(*h));
        }
        Ok(())
    }

    /// Sets every byte of a buffer to zero (in stream order).
    pub(crate) fn memset_zero(&self, b: &mut Buf) -> Result<()> {
        let len = b.bytes();
        if len == 0 {
            return Ok(());
        }
        {
            let (ptr, _g) = self.addr_mut(b);
            // SAFETY: ptr .. ptr + len is the buffer's memory (its own allocation or a part of
            // a live one), written on this stream in order.
            unsafe { result::memset_d8_async(ptr, 0, len, self.stream.cu_stream()) }.map_err(drv)?;
        }
        b.shadow = (!b.graph_written && len <= SHADOW_MAX).then(|| Arc::<[u8]>::from(vec![0u8; len]));
        Ok(())
    }

    /// A device-side copy of a buffer (in stream order), with its shadow.
    pub(crate) fn copy(&self, b: &Buf) -> Result<Buf> {
        let len = b.bytes();
        if len == 0 {
            return Ok(Buf::empty());
        }
        let mut out = self.raw(len)?;
        {
            let (src, _gs) = self.addr(b);
            let (dst, _gd) = self.addr_mut(&mut out);
            // SAFETY: both ranges are `len` bytes of live device memory, distinct buffers.
            unsafe { result::memcpy_dtod_async(dst, src, len, self.stream.cu_stream()) }.map_err(drv)?;
        }
        out.shadow = b.shadow.clone();
        Ok(out)
    }

    pub(crate) fn synchronize(&self) -> Result<()> {
        self.sync_point("a synchronisation")?;
        self.stream.synchronize().map_err(drv)
    }

    /// The device address of a buffer for reading (0 when empty). While a graph is being
    /// captured the buffer's allocation is also kept for the graph (see [`Mem`]).
    pub(crate) fn addr<'a>(&'a self, b: &'a Buf) -> (u64, Access<'a>) {
        match &b.mem {
            Mem::Part { keep, ptr, .. } => {
                self.keep_for_graph(keep);
                (*ptr, None)
            }
            Mem::Empty => (0, None),
        }
    }

    /// The device address of a buffer for writing (0 when empty). The shadow is dropped,
    /// since the device may now change the contents; while a graph is being captured the
    /// buffer is marked as written by graphs (it never keeps a shadow again: a replay may
    /// change it) and its allocation is kept for the graph.
    pub(crate) fn addr_mut<'a>(&'a self, b: &'a mut Buf) -> (u64, Access<'a>) {
        b.shadow = None;
        match &b.mem {
            Mem::Part { keep, ptr, .. } => {
                if self.keep_for_graph(keep) {
                    b.graph_written = true;
                }
                (*ptr, None)
            }
            Mem::Empty => (0, None),
        }
    }

    /// While capturing: keeps `keep` alive as long as the graph (once per allocation); returns
    /// whether a capture is under way.
    fn keep_for_graph(&self, keep: &Arc<CudaSlice<u8>>) -> bool {
        if !self.capturing.load(Ordering::Relaxed) {
            return false;
        }
        let mut list = self.graph_keep.lock().unwrap_or_else(|p| p.into_inner());
        if !list.iter().any(|k| Arc::ptr_eq(k, keep)) {
            list.push(keep.clone());
        }
        true
    }

    /// The address of an optional buffer for reading (0 when absent or empty).
    pub(crate) fn addr_opt<'a>(&'a self, b: Option<&'a Buf>) -> (u64, Access<'a>) {
        b.map_or((0, None), |b| self.addr(b))
    }

    /// The address of an optional buffer for writing (0 when absent or empty).
    pub(crate) fn addr_mut_opt<'a>(&'a self, b: Option<&'a mut Buf>) -> (u64, Access<'a>) {
        b.map_or((0, None), |b| self.addr_mut(b))
    }

    /// The host copy of the whole buffer, when it is known (module docs).
    pub(crate) fn shadow<'a>(&self, b: &'a Buf) -> Option<&'a [u8]> {
        b.shadow.as_deref()
    }

    /// Whether the launches now are a step's (their checks deferred to [`Device::end_step`]).
    pub(crate) fn in_step(&self) -> bool {
        self.state().depth > 0
    }

    /// The status word for one launch of `k`: a fresh zeroed word outside a step (read right
    /// after the launch), the step's word of `k` inside one (read at the end of the step).
    pub(crate) fn status(&self, k: Kernel) -> Result<Status<'_>> {
        if self.in_step() {
            let (base, _g) = self.step_status.device_ptr(&self.stream);
            return Ok(Status { dev: self, word: None, addr: base + 4 * k as u64 });
        }
        let mut word = self.status.lock().unwrap_or_else(|p| p.into_inner());
        self.stream.memset_zeros(&mut *word).map_err(drv)?;
        let addr = word.device_ptr(&self.stream).0;
        Ok(Status { dev: self, word: Some(word), addr })
    }

    /// Enters a step (nested steps join the outer one): deferred checks, the workspace.
    pub(crate) fn begin_step(&self) -> Result<()> {
        let mut st = self.state();
        st.depth += 1;
        if st.depth == 1 {
            drop(st);
            self.zero_step_status()?;
        }
        Ok(())
    }

    fn zero_step_status(&self) -> Result<()> {
        let (p, _g) = self.step_status.device_ptr(&self.stream);
        // SAFETY: the step status array is Kernel::ALL.len() words of live device memory.
        unsafe { result::memset_d8_async(p, 0, 4 * Kernel::ALL.len(), self.stream.cu_stream()) }.map_err(drv)
    }

    /// Leaves a step; at the outermost one, reads the step's status words back (one copy)
    /// and returns the first failed check as [`KernelError::DeviceCheck`].
    pub(crate) fn end_step(&self) -> Result<()> {
        let mut st = self.state();
        if st.depth == 0 {
            return Err(KernelError::Cuda("end_step without begin_step".into()));
        }
        st.depth -= 1;
        if st.depth > 0 {
            return Ok(());
        }
        drop(st);
        self.read_step_status()
    }

    fn read_step_status(&self) -> Result<()> {
        self.sync_point("the step's read-back")?;
        let words = self.stream.clone_dtoh(&self.step_status).map_err(drv)?;
        match words.iter().position(|&w| w != 0) {
            None => Ok(()),
            Some(k) => Err(KernelError::DeviceCheck { kernel: Kernel::ALL[k].symbol(), index: !words[k] }),
        }
    }

    /// Reserves a workspace of `bytes` (replacing any previous one, which must be unused).
    pub(crate) fn reserve_workspace(&self, bytes: usize) -> Result<()> {
        let mut st = self.state();
        let mut book = self.book();
        if book.live() > 0 || st.depth > 0 {
            return Err(KernelError::Cuda("reserve_workspace while workspace buffers are in use".into()));
        }
        st.arena = None;
        *book = ArenaBook::new(0);
        if bytes > 0 {
            let mem = self.alloc_owned(bytes)?;
            st.arena = Some(Arc::new(mem));
            *book = ArenaBook::new(bytes);
        }
        Ok(())
    }

    /// Starts measuring the workspace a step needs (steps meanwhile allocate on their own).
    pub(crate) fn measure_workspace(&self) -> Result<()> {
        let mut st = self.state();
        let mut book = self.book();
        if book.live() > 0 || st.depth > 0 {
            return Err(KernelError::Cuda("measure_workspace while workspace buffers are in use".into()));
        }
        st.arena = None;
        st.measuring = true;
        *book = ArenaBook::new(usize::MAX);
        Ok(())
    }

    /// Ends a measurement: the peak bytes of the steps since [`Device::measure_workspace`].
    pub(crate) fn measured_workspace(&self) -> usize {
        let mut st = self.state();
        st.measuring = false;
        let mut book = self.book();
        let peak = book.peak();
        if book.live() == 0 {
            *book = ArenaBook::new(0);
        }
        peak
    }

    /// What the device did so far.
    pub(crate) fn stats(&self) -> DeviceStats {
        let c = &self.counters;
        let has_arena = self.state().arena.is_some();
        let book = self.book();
        let ws = if has_arena { book.capacity() } else { 0 };
        DeviceStats {
            launches: c.launches.load(Ordering::Relaxed),
            allocations: c.allocations.load(Ordering::Relaxed),
            uploads: c.uploads.load(Ordering::Relaxed),
            host_syncs: c.host_syncs.load(Ordering::Relaxed),
            graph_replays: c.graph_replays.load(Ordering::Relaxed),
            workspace_bytes: ws,
            workspace_peak: book.peak(),
            workspace_allocations: book.allocs(),
            workspace_overflows: book.overflows(),
        }
    }

    /// Captures what `f` enqueues into a graph, as one step (deferred checks, the workspace);
    /// nothing runs. The workspace must be free (so that the graph's temporaries start at its
    /// base, where every replay puts them) and every buffer `f` allocates must be gone when it
    /// returns.
    pub(crate) fn capture(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<Graph> {
        let arena = {
            let mut st = self.state();
            if st.depth > 0 || self.book().live() > 0 {
                return Err(KernelError::Cuda("a graph capture must start outside a step, with the workspace free".into()));
            }
            st.depth = 1;
            st.capturing = true;
            st.arena.clone()
        };
        self.graph_keep.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.capturing.store(true, Ordering::Relaxed);
        let begun = self.stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED).map_err(drv);
        let body = begun.and_then(|()| self.zero_step_status()).and_then(|()| f());
        // End the capture whatever happened (the stream must leave capture mode).
        let ended = self.stream.end_capture(sys::CUgraphInstantiate_flags(0)).map_err(drv);
        self.capturing.store(false, Ordering::Relaxed);
        let keep = std::mem::take(&mut *self.graph_keep.lock().unwrap_or_else(|p| p.into_inner()));
        let leaked = self.book().live();
        {
            let mut st = self.state();
            st.depth = 0;
            st.capturing = false;
        }
        body?;
        let graph = ended?.ok_or_else(|| KernelError::Cuda("the capture recorded no work".into()))?;
        if leaked > 0 {
            return Err(KernelError::Cuda(format!("{leaked} workspace buffers allocated during the capture outlived it")));
        }
        Ok(Graph { exec: Mutex::new(SendGraph(graph)), arena, _keep: keep })
    }

    /// Replays a graph and reads its step's status words back (one synchronisation). When the
    /// graph was captured in the current workspace, the workspace must be free (the graph's
    /// temporaries live at its base).
    pub(crate) fn replay(&self, g: &Graph) -> Result<()> {
        let current = {
            let st = self.state();
            if st.depth > 0 {
                return Err(KernelError::Cuda("a graph replay must run outside a step".into()));
            }
            matches!((&st.arena, &g.arena), (Some(a), Some(b)) if Arc::ptr_eq(a, b))
        };
        if current && self.book().live() > 0 {
            return Err(KernelError::Cuda("a graph replay needs the workspace free (a buffer from it is still alive)".into()));
        }
        g.exec.lock().unwrap_or_else(|p| p.into_inner()).0.launch().map_err(drv)?;
        Counters::bump(&self.counters.graph_replays);
        self.read_step_status()
    }

    /// Runs `f` and returns, with its result, the milliseconds of device time between two
    /// events around the work it enqueued (waits for that work).
    pub(crate) fn timed<R, E: From<KernelError>>(&self, f: impl FnOnce() -> std::result::Result<R, E>) -> std::result::Result<(R, f32), E> {
        let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.stream.record_event(flags).map_err(drv)?;
        let r = f()?;
        let end = self.stream.record_event(flags).map_err(drv)?;
        self.sync_point("event timing")?;
        Ok((r, start.elapsed_ms(&end).map_err(drv)?))
    }

    /// Device-to-device copy bandwidth in bytes/s (read + write), the median of 7 copies of
    /// 256 MiB timed with events.
    pub(crate) fn copy_bandwidth(&self) -> Result<f64> {
        const BYTES: usize = 256 << 20;
        let src = self.alloc_owned(BYTES)?;
        let mut dst = self.alloc_owned(BYTES)?;
        let mut times = Vec::new();
        for _ in 0..8 {
            let ((), ms) = self.timed(|| self.stream.memcpy_dtod(&src, &mut dst).map_err(drv))?;
            times.push(ms);
        }
        times.remove(0); // warm-up
        times.sort_by(f32::total_cmp);
        let ms = f64::from(times[times.len() / 2]).max(1e-6);
        Ok(2.0 * BYTES as f64 / (ms / 1e3))
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
        Counters::bump(&self.counters.launches);
        // SAFETY: the caller upholds this function's contract, which is the kernel's.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| KernelError::Cuda(format!("launching `{}`: {e}", k.symbol())))
    }
}

/// The status word of one launch (see `params.h`), held until read.
pub(crate) struct Status<'a> {
    dev: &'a Device,
    /// The checked launch's own word (None inside a step: the step's word, read at its end).
    word: Option<MutexGuard<'a, CudaSlice<u32>>>,
    pub(crate) addr: u64,
}

impl Status<'_> {
    /// Outside a step: waits for the launch and returns the lowest bad index it reported, if
    /// any. Inside a step: `None` without waiting (the step's end reads it).
    pub(crate) fn read(self) -> Result<Option<u32>> {
        let Some(word) = self.word else { return Ok(None) };
        self.dev.sync_point("a status read-back")?;
        let v = self.dev.stream.clone_dtoh(&*word).map_err(drv)?;
        Ok(v.first().copied().filter(|&s| s != 0).map(|s| !s))
    }
}
