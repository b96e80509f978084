//! Read-only memory maps of weight files, and the storage weights live in: an owned `Vec` or a
//! byte range of a shared map.
//!
//! A checkpoint shard is mapped once ([`MappedFile`]); each tensor handed to the model is a
//! [`Storage`] that borrows its range of the map, so loading a model copies nothing the kernels
//! can read in place. The file's page cache is the weights' memory: pages come in on first
//! touch (weight validation touches every page, so loading still pre-faults them) and stay as
//! long as a weight holds the range.
//!
//! This module is the safe wrapper: the one `unsafe` call that creates the map and the one
//! that releases pages are here, with their arguments; everything else sees `&[T]`.

use std::fmt;
use std::fs::File;
use std::marker::PhantomData;
use std::ops::{Deref, Range};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;

/// Mapping a file or handing out a range of it failed. Every variant names the file.
#[derive(Debug, Error)]
pub enum MapError {
    /// Opening, inspecting or mapping the file failed.
    #[error("{}: {op}: {source}", path.display())]
    Io { path: PathBuf, op: &'static str, source: std::io::Error },

    /// The file is shorter than when it was mapped: reading the lost pages would fault.
    #[error("{}: the file is {now} bytes but was {mapped} bytes when mapped (truncated while in use?)", path.display())]
    Shrunk { path: PathBuf, mapped: u64, now: u64 },

    /// A byte range outside the map, or not a whole number of elements.
    #[error("{}: {detail}", path.display())]
    Range { path: PathBuf, detail: String },
}

impl MapError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            MapError::Io { path, .. } | MapError::Shrunk { path, .. } | MapError::Range { path, .. } => path,
        }
    }
}

/// A whole file mapped read-only (`PROT_READ`, `MAP_SHARED` on unix).
///
/// # The one hazard
///
/// The bytes of a map are the file's bytes, now: if another process **truncates** the file
/// while it is mapped, touching a page past the new end kills this process with `SIGBUS`; if
/// it **writes** to the file, the weights change under the model, with no error. Rust's
/// guarantees assume neither happens, and nothing a reader can do in-process rules them out
/// (file locks are advisory). This is the same stance as llama.cpp's and the `safetensors`
/// crate's mmap loading: model files are treated as immutable while a model uses them.
/// What this type does to narrow it: the map is read-only (this process never writes
/// through it), and [`MappedFile::check_len`] (called before each tensor is handed out) turns
/// a file that has already shrunk into a typed [`MapError::Shrunk`] instead of a crash.
/// Replacing a file by renaming a new one over it (what downloaders do) is harmless: the
/// map keeps the old inode.
pub struct MappedFile {
    path: PathBuf,
    file: File,
    map: memmap2::Mmap,
}

impl fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MappedFile").field("path", &self.path).field("len", &self.map.len()).finish()
    }
}

impl MappedFile {
    /// Opens and maps `path`.
    pub fn open(path: &Path) -> Result<MappedFile, MapError> {
        let file = File::open(path).map_err(|source| MapError::Io { path: path.to_path_buf(), op: "open", source })?;
        Self::from_file(path, file)
    }

    /// Maps an open `file` (named `path` in errors) as long as it is now.
    pub fn from_file(path: &Path, file: File) -> Result<MappedFile, MapError> {
        // SAFETY: the map is read-only and private to this value: this process never writes
        // through it, and every `&[u8]` handed out borrows `self` (or an `Arc` of it), so the
        // map outlives the borrows. What remains is the hazard of the type docs (another
        // process truncating or writing the file), which no in-process check can rule out;
        // callers accept it as every mmap loader does, and `check_len` narrows it.
        let map = unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(|source| MapError::Io {
            path: path.to_path_buf(),
            op: "memory-map",
            source,
        })?;
        Ok(MappedFile { path: path.to_path_buf(), file, map })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The open file behind the map (for positioned reads that should not touch the map).
    pub fn file(&self) -> &File {
        &self.file
    }
    /// Bytes mapped (the file's length when it was mapped).
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    /// The whole mapped file.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Checks that the file is still at least as long as the map: a shrunk file gives
    /// [`MapError::Shrunk`] here rather than `SIGBUS` on the first touch of a lost page.
    /// (It cannot catch a truncation that happens after it returns; see the type docs.)
    pub fn check_len(&self) -> Result<(), MapError> {
        let now = self.file.metadata().map_err(|source| MapError::Io { path: self.path.clone(), op: "stat", source })?.len();
        let mapped = self.map.len() as u64;
        if now < mapped { Err(MapError::Shrunk { path: self.path.clone(), mapped, now }) } else { Ok(()) }
    }

    /// Asks the kernel to start reading `range` in (`MADV_WILLNEED`), so that first touches
    /// of a cold file find its pages already on their way. A hint: ignored where unsupported.
    pub fn prefetch(&self, range: Range<usize>) {
        #[cfg(unix)]
        if range.start < range.end && range.end <= self.map.len() {
            let _ = self.map.advise_range(memmap2::Advice::WillNeed, range.start, range.end - range.start);
        }
        #[cfg(not(unix))]
        let _ = range;
    }

    /// Drops this process's page-table entries for the whole [`RELEASE_GRAIN`]-aligned
    /// stretches inside `range` (`MADV_DONTNEED`): they leave the resident set, the page
    /// cache keeps them, and a later read faults the same bytes back in. Used when the last
    /// [`Storage`] of a range goes away, so weights that were copied out of the map (an
    /// embedding table, a BF16 matrix quantised to FP8) are not counted twice.
    fn release(&self, range: Range<usize>) {
        let start = range.start.next_multiple_of(RELEASE_GRAIN);
        let end = range.end.min(self.map.len()) / RELEASE_GRAIN * RELEASE_GRAIN;
        if start >= end {
            return;
        }
        #[cfg(unix)]
        {
            // SAFETY: `MADV_DONTNEED` is unsafe in general because on private or anonymous
            // memory it discards contents (later reads see zeros or the file's original bytes).
            // This map is a read-only *shared file* mapping that was never written: it holds no
            // private pages, so a later read refaults exactly the file's bytes, the bytes any
            // live borrow of this range already saw (the type docs' hazard aside, which this
            // call does not widen). The range lies inside the map (clamped above) and starts on
            // a multiple of `RELEASE_GRAIN`, which every supported page size divides.
            let _ = unsafe { self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
        }
    }
}

/// Granularity of [`MappedFile::release`]: 64 KiB is a multiple of every page size Linux and
/// macOS use (4, 16 and 64 KiB), so a released stretch never reaches into a neighbour's page.
const RELEASE_GRAIN: usize = 64 * 1024;

/// Element types stored little-endian in a file, readable in place on a little-endian host.
pub trait LeElem: bytemuck::Pod + Send + Sync + 'static {
    /// Converts a value read from the file's little-endian bytes to the host's order.
    fn le_to_host(self) -> Self;
}
impl LeElem for u8 {
    fn le_to_host(self) -> Self {
        self
    }
}
impl LeElem for u16 {
    fn le_to_host(self) -> Self {
        u16::from_le(self)
    }
}
impl LeElem for u32 {
    fn le_to_host(self) -> Self {
        u32::from_le(self)
    }
}
impl LeElem for i32 {
    fn le_to_host(self) -> Self {
        i32::from_le(self)
    }
}
impl LeElem for f32 {
    fn le_to_host(self) -> Self {
        f32::from_bits(u32::from_le(self.to_bits()))
    }
}
impl LeElem for half::bf16 {
    fn le_to_host(self) -> Self {
        half::bf16::from_bits(u16::from_le(self.to_bits()))
    }
}

/// A range of a map held by one or more [`Storage`] clones; releases its pages when the last
/// one goes.
struct MappedRange {
    file: Arc<MappedFile>,
    start: usize,
    len: usize,
}

impl Drop for MappedRange {
    fn drop(&mut self) {
        self.file.release(self.start..self.start + self.len);
    }
}

/// The elements of a weight: an owned `Vec`, or a range of a [`MappedFile`] read in place.
///
/// Cloning a mapped storage shares the range (no copy); cloning an owned one copies the `Vec`.
/// Equality compares elements. Dropping the last clone of a mapped range releases its pages
/// from this process ([`MappedFile`] keeps the map while any range of it lives).
pub struct Storage<T: LeElem> {
    repr: Repr<T>,
}

enum Repr<T> {
    Owned(Vec<T>),
    /// Invariant (checked in [`Storage::map_le`]): the range lies inside the map, its length is
    /// a whole number of `T`, and its first byte is aligned for `T`.
    Mapped(Arc<MappedRange>, PhantomData<T>),
}

impl<T: LeElem> Storage<T> {
    /// `len` bytes of `file` from byte `start`, holding little-endian `T`s. Shares the map
    /// when the host is little-endian and the range is aligned for `T` (always for bytes);
    /// otherwise copies it into an owned `Vec`, converting each element from little-endian.
    pub fn map_le(file: &Arc<MappedFile>, start: usize, len: usize) -> Result<Storage<T>, MapError> {
        let size = std::mem::size_of::<T>();
        let range_err = |detail: String| MapError::Range { path: file.path().to_path_buf(), detail };
        let end = start.checked_add(len).filter(|&e| e <= file.len());
        let Some(end) = end else {
            return Err(range_err(format!("bytes {start}..+{len} are outside the {}-byte map", file.len())));
        };
        if !len.is_multiple_of(size) {
            return Err(range_err(format!("bytes {start}..{end} are not a whole number of {size}-byte elements")));
        }
        let bytes = &file.bytes()[start..end];
        if len == 0 {
            return Ok(Storage { repr: Repr::Owned(Vec::new()) });
        }
        if cfg!(target_endian = "little") && bytemuck::try_cast_slice::<u8, T>(bytes).is_ok() {
            let range = MappedRange { file: Arc::clone(file), start, len };
            return Ok(Storage { repr: Repr::Mapped(Arc::new(range), PhantomData) });
        }
        // Misaligned (or a big-endian host): one copy, element by element from the bytes.
        let mut v = vec![T::zeroed(); len / size];
        bytemuck::cast_slice_mut::<T, u8>(&mut v).copy_from_slice(bytes);
        if cfg!(target_endian = "big") {
            v.iter_mut().for_each(|x| *x = x.le_to_host());
        }
        Ok(Storage { repr: Repr::Owned(v) })
    }

    /// The elements.
    pub fn as_slice(&self) -> &[T] {
        match &self.repr {
            Repr::Owned(v) => v,
            // The invariant of `Repr::Mapped` makes both the slice and the cast infallible.
            Repr::Mapped(r, _) => bytemuck::cast_slice(&r.file.bytes()[r.start..r.start + r.len]),
        }
    }

    /// Whether the elements are read in place from a map (rather than owned).
    pub fn is_mapped(&self) -> bool {
        matches!(self.repr, Repr::Mapped(..))
    }

    /// The mapped file and byte range, when mapped.
    pub fn mapped_range(&self) -> Option<(&Arc<MappedFile>, Range<usize>)> {
        match &self.repr {
            Repr::Owned(_) => None,
            Repr::Mapped(r, _) => Some((&r.file, r.start..r.start + r.len)),
        }
    }

    /// The elements as an owned `Vec` (a copy when mapped).
    pub fn into_vec(self) -> Vec<T> {
        match self.repr {
            Repr::Owned(v) => v,
            Repr::Mapped(r, _) => bytemuck::cast_slice(&r.file.bytes()[r.start..r.start + r.len]).to_vec(),
        }
    }
}

impl<T: LeElem> From<Vec<T>> for Storage<T> {
    fn from(v: Vec<T>) -> Self {
        Storage { repr: Repr::Owned(v) }
    }
}

impl<T: LeElem> Deref for Storage<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.as_slice()
    }
}

impl<T: LeElem> Clone for Storage<T> {
    fn clone(&self) -> Self {
        let repr = match &self.repr {
            Repr::Owned(v) => Repr::Owned(v.clone()),
            Repr::Mapped(r, _) => Repr::Mapped(Arc::clone(r), PhantomData),
        };
        Storage { repr }
    }
}

impl<T: LeElem + PartialEq> PartialEq for Storage<T> {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl<T: LeElem> fmt::Debug for Storage<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.repr {
            Repr::Owned(v) => write!(f, "Storage::Owned({} x {})", v.len(), std::any::type_name::<T>()),
            Repr::Mapped(r, _) => write!(f, "Storage::Mapped({}, bytes {}..{})", r.file.path().display(), r.start, r.start + r.len),
        }
    }
}
