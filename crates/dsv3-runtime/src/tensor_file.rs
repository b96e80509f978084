//! One safetensors file: header parsing with every check the format allows, tensor reads, and
//! a streaming writer.
//!
//! Layout: an 8-byte little-endian header length `N`, `N` bytes of JSON
//! `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then
//! the data section, tensors row-major little-endian at `8 + N + begin`.
//!
//! Checks at open (errors name the file and, where there is one, the tensor): the file holds
//! the 8-byte length; `N` is at most [`MAX_HEADER_BYTES`] and within the file; the header is a
//! JSON object; every entry has a supported dtype (F8_E4M3, BF16, F32), a shape, and offsets
//! with `begin <= end` inside the data section; `end - begin == numel × dtype size` (checked
//! arithmetic); and, as the reference `safetensors` library requires, the tensors tile the data
//! section exactly: no overlap, no gap, no trailing bytes.
//!
//! The file is memory-mapped read-only once its header is valid
//! ([`dsv3_kernels::mmap::MappedFile`], the safe wrapper: this crate forbids `unsafe`).
//! [`TensorFile::storage`] hands a tensor out **in place**, as a range of the map, when the
//! host is little-endian and the data is aligned for its element type (always for FP8 bytes;
//! BF16 needs an even offset), and as a converted copy otherwise. Before each tensor is handed
//! out the file is checked to be as long as when it was mapped, so a file truncated since
//! `open` is a typed error rather than a `SIGBUS`; the hazard that remains (a file truncated or
//! rewritten by another process *while* its pages are in use) is the one every mmap loader
//! has, documented on [`MappedFile`]. [`TensorFile::read`], [`TensorFile::read_into`] and
//! [`TensorFile::read_range`] still copy with positioned reads, which leave the map (and this
//! process's resident set) untouched: small tensors and whole-tensor comparisons use them.

use crate::error::{Result, RuntimeError, format_err, io_err, tensor_err};
use dsv3_kernels::mmap::{LeElem, MapError, MappedFile, Storage};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
#[cfg(not(unix))]
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Largest header accepted, as in the reference library (100 MB).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The tensor dtypes a DeepSeek checkpoint holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// `F8_E4M3` (torch float8_e4m3fn), 1 byte.
    F8E4M3,
    /// `BF16`, 2 bytes.
    Bf16,
    /// `F32`, 4 bytes.
    F32,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F8E4M3 => 1,
            Dtype::Bf16 => 2,
            Dtype::F32 => 4,
        }
    }
    /// The safetensors dtype string.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::Bf16 => "BF16",
            Dtype::F32 => "F32",
        }
    }
    fn parse(s: &str) -> Option<Dtype> {
        match s {
            "F8_E4M3" => Some(Dtype::F8E4M3),
            "BF16" => Some(Dtype::Bf16),
            "F32" => Some(Dtype::F32),
            _ => None,
        }
    }
}

/// Where one tensor lies and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Data length in bytes (= numel × dtype size).
    pub len: usize,
}

impl TensorInfo {
    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.len / self.dtype.size()
    }
}

/// An open, memory-mapped safetensors file with a validated header.
#[derive(Debug)]
pub struct TensorFile {
    path: PathBuf,
    /// The file mapped read-only; also the handle positioned reads use.
    map: Arc<MappedFile>,
    /// Serialises seek + read where positioned reads are not available.
    seek_lock: Mutex<()>,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
}

impl TensorFile {
    /// Opens `path` and validates its header (see the module docs).
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(io_err(path, "open"))?;
        let file_len = file.metadata().map_err(io_err(path, "stat"))?.len();
        if file_len < 8 {
            return Err(format_err(path, format!("file is {file_len} bytes, too short for the 8-byte safetensors header length")));
        }
        let mut len8 = [0u8; 8];
        file.read_exact(&mut len8).map_err(io_err(path, "read header length"))?;
        let n = header_len(path, len8, file_len)?;
        // `n` is at most MAX_HEADER_BYTES and within the file: a bounded allocation.
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header).map_err(io_err(path, "read header"))?;
        let (tensors, metadata) = parse_header(path, &header, file_len - 8 - n)?;
        let map = MappedFile::from_file(path, file).map_err(map_err)?;
        if map.len() as u64 != file_len {
            return Err(format_err(path, format!("file changed size while being opened ({file_len} -> {} bytes)", map.len())));
        }
        Ok(TensorFile { path: path.to_path_buf(), map: Arc::new(map), seek_lock: Mutex::new(()), tensors, metadata })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The map of the whole file.
    pub fn map(&self) -> &Arc<MappedFile> {
        &self.map
    }

    /// Tensor `name` as `T`s (its byte length must be a whole number of `T`; the caller checks
    /// the dtype): in place in the map where the host and the alignment allow, else a copy
    /// converted from little-endian (module docs). Asks the kernel to read the range ahead.
    pub fn storage<T: LeElem>(&self, name: &str) -> Result<Storage<T>> {
        let info = self.tensors.get(name).ok_or_else(|| tensor_err(&self.path, name, "not in this file"))?;
        let start = usize::try_from(info.offset).map_err(|_| tensor_err(&self.path, name, "offset does not fit this host's usize"))?;
        let in_file = |e: MapError| tensor_err(&self.path, name, map_detail(e));
        self.map.check_len().map_err(in_file)?;
        self.map.prefetch(start..start.saturating_add(info.len));
        Storage::map_le(&self.map, start, info.len).map_err(in_file)
    }

    /// The raw little-endian bytes of tensor `name`, copied with a positioned read.
    pub fn read(&self, name: &str) -> Result<Vec<u8>> {
        let len = self.tensors.get(name).map_or(0, |i| i.len);
        let mut buf = vec![0u8; len];
        self.read_into(name, &mut buf)?;
        Ok(buf)
    }

    /// Reads tensor `name` into `out`, which must be exactly its length (callers pass a typed
    /// buffer viewed as bytes, so the data is copied once).
    pub fn read_into(&self, name: &str, out: &mut [u8]) -> Result<()> {
        let info = self.tensors.get(name).ok_or_else(|| tensor_err(&self.path, name, "not in this file"))?;
        if out.len() != info.len {
            return Err(tensor_err(&self.path, name, format!("read into {} bytes, tensor has {}", out.len(), info.len)));
        }
        read_at(self.map.file(), &self.seek_lock, info.offset, out)
            .map_err(|e| tensor_err(&self.path, name, format!("reading {} bytes failed: {e}", info.len)))
    }
}

impl TensorFile {
    /// Reads `out.len()` bytes of tensor `name` starting `at` bytes into its data.
    pub fn read_range(&self, name: &str, at: usize, out: &mut [u8]) -> Result<()> {
        let info = self.tensors.get(name).ok_or_else(|| tensor_err(&self.path, name, "not in this file"))?;
        if at.checked_add(out.len()).is_none_or(|end| end > info.len) {
            return Err(tensor_err(&self.path, name, format!("range {at}+{} is outside its {} bytes", out.len(), info.len)));
        }
        read_at(self.map.file(), &self.seek_lock, info.offset + at as u64, out)
            .map_err(|e| tensor_err(&self.path, name, format!("reading {} bytes at {at} failed: {e}", out.len())))
    }
}

/// Positioned read: on unix, concurrent readers of one file do not serialise.
#[cfg(unix)]
fn read_at(file: &File, _lock: &Mutex<()>, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(out, offset)
}

#[cfg(not(unix))]
fn read_at(mut file: &File, lock: &Mutex<()>, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
    let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(out)
}

/// A map error as this crate's error (the I/O kind keeps its source).
fn map_err(e: MapError) -> RuntimeError {
    match e {
        MapError::Io { path, op, source } => RuntimeError::Io { path, op, source },
        other => {
            let path = other.path().to_path_buf();
            format_err(&path, map_detail(other))
        }
    }
}

/// The message of a map error without its path (the caller's error names the file).
fn map_detail(e: MapError) -> String {
    match e {
        MapError::Io { op, source, .. } => format!("{op}: {source}"),
        MapError::Shrunk { mapped, now, .. } => {
            format!("the file is {now} bytes but was {mapped} bytes when opened (truncated while in use?)")
        }
        MapError::Range { detail, .. } => detail,
    }
}

/// The header length `N` from the file's first 8 bytes, checked against the limit and the
/// `file_len`-byte file before anything is allocated for it.
fn header_len(path: &Path, len8: [u8; 8], file_len: u64) -> Result<u64> {
    let n = u64::from_le_bytes(len8);
    if n > MAX_HEADER_BYTES {
        return Err(format_err(path, format!("header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")));
    }
    if n < 2 || 8 + n > file_len {
        return Err(format_err(path, format!("header length {n} does not fit the {file_len}-byte file (truncated?)")));
    }
    Ok(n)
}

/// The tensor table (name → entry, offsets absolute) and the `__metadata__` of a header.
pub type Parsed = (BTreeMap<String, TensorInfo>, BTreeMap<String, String>);

/// Validates a whole safetensors file held in memory — the checks [`TensorFile::open`] makes,
/// on bytes instead of a file (`path` only names it in errors). On success every tensor's
/// `offset..offset + len` lies inside `bytes`.
pub fn parse_bytes(path: &Path, bytes: &[u8]) -> Result<Parsed> {
    let file_len = bytes.len() as u64;
    let Some(len8) = bytes.first_chunk::<8>() else {
        return Err(format_err(path, format!("file is {file_len} bytes, too short for the 8-byte safetensors header length")));
    };
    let n = header_len(path, *len8, file_len)?;
    parse_header(path, &bytes[8..8 + n as usize], file_len - 8 - n)
}

/// Parses and validates a header; `data_len` is the size of the data section.
pub fn parse_header(path: &Path, header: &[u8], data_len: u64) -> Result<Parsed> {
    if header.first() != Some(&b'{') {
        return Err(format_err(path, "header does not start with '{' (not a safetensors file?)"));
    }
    // JSON leaves duplicate keys to the reader (first wins, last wins, or an error): a header
    // with one would mean different tensors to different tools, so any is refused.
    let v = crate::json::from_slice_unique_keys(header).map_err(|e| format_err(path, format!("header is not valid JSON: {e}")))?;
    let Value::Object(map) = v else { return Err(format_err(path, "header is not a JSON object")) };
    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    let mut ranges: Vec<(u64, u64, &str)> = Vec::with_capacity(map.len());
    for (name, entry) in &map {
        if name == "__metadata__" {
            metadata = parse_metadata(path, entry)?;
            continue;
        }
        let Value::Object(e) = entry else { return Err(tensor_err(path, name, "header entry is not an object")) };
        let info = parse_entry(path, name, e, data_len)?;
        ranges.push((info.offset, info.offset + info.len as u64, name));
        tensors.insert(name.clone(), info);
    }
    ranges.sort_unstable();
    let mut pos = 0u64;
    let mut prev = "";
    for &(b, e, name) in &ranges {
        if b < pos {
            return Err(tensor_err(path, name, format!("data_offsets [{b}, {e}] overlap tensor `{prev}` (ends at {pos})")));
        }
        if b > pos {
            return Err(tensor_err(
                path,
                name,
                format!("data_offsets begin {b} leaves a gap after byte {pos}; tensors must be contiguous"),
            ));
        }
        (pos, prev) = (e, name);
    }
    if pos != data_len {
        return Err(format_err(path, format!("data section is {data_len} bytes but the tensors cover {pos}")));
    }
    // Offsets were relative to the data section; make them absolute.
    let base = 8 + header.len() as u64;
    for info in tensors.values_mut() {
        info.offset += base;
    }
    Ok((tensors, metadata))
}

fn parse_metadata(path: &Path, v: &Value) -> Result<BTreeMap<String, String>> {
    let Value::Object(m) = v else { return Err(format_err(path, "`__metadata__` is not an object")) };
    m.iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k.clone(), s.clone())),
            _ => Err(format_err(path, format!("`__metadata__.{k}` is not a string"))),
        })
        .collect()
}

fn parse_entry(path: &Path, name: &str, e: &Map<String, Value>, data_len: u64) -> Result<TensorInfo> {
    let dtype_s = e.get("dtype").and_then(Value::as_str).ok_or_else(|| tensor_err(path, name, "missing string `dtype`"))?;
    let dtype = Dtype::parse(dtype_s)
        .ok_or_else(|| tensor_err(path, name, format!("dtype \"{dtype_s}\" is not supported (expected F8_E4M3, BF16 or F32)")))?;
    let shape = match e.get("shape") {
        Some(Value::Array(dims)) => dims
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| tensor_err(path, name, "`shape` holds a value that is not a non-negative integer"))?,
        _ => return Err(tensor_err(path, name, "missing list `shape`")),
    };
    let offs = match e.get("data_offsets") {
        Some(Value::Array(o)) if o.len() == 2 => (o[0].as_u64(), o[1].as_u64()),
        _ => return Err(tensor_err(path, name, "`data_offsets` is not a list of two integers")),
    };
    let (Some(begin), Some(end)) = offs else { return Err(tensor_err(path, name, "`data_offsets` holds a non-integer")) };
    if begin > end {
        return Err(tensor_err(path, name, format!("data_offsets [{begin}, {end}]: begin is after end")));
    }
    if end > data_len {
        return Err(tensor_err(path, name, format!("data_offsets end {end} is past the {data_len}-byte data section (truncated file?)")));
    }
    let need = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .and_then(|n| n.checked_mul(dtype.size()))
        .ok_or_else(|| tensor_err(path, name, format!("shape {shape:?} overflows")))?;
    if end - begin != need as u64 {
        return Err(tensor_err(
            path,
            name,
            format!("data_offsets [{begin}, {end}] hold {} bytes, but shape {shape:?} of {dtype_s} needs {need}", end - begin),
        ));
    }
    Ok(TensorInfo { dtype, shape, offset: begin, len: need })
}

/// One tensor to write: name, dtype, shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Data bytes of this tensor (checked).
    pub fn bytes(&self) -> Option<usize> {
        self.shape.iter().try_fold(self.dtype.size(), |a, &d| a.checked_mul(d))
    }
}

/// Writes a safetensors file at `path` (which must not exist): the header for `specs` in
/// order, then each tensor's bytes as `fill(i, writer)` produces them (checked to be exactly
/// the size the spec implies). The header is padded with spaces to a multiple of 8 bytes.
pub fn write_file(
    path: &Path,
    specs: &[TensorSpec],
    metadata: &BTreeMap<String, String>,
    mut fill: impl FnMut(usize, &mut dyn Write) -> Result<()>,
) -> Result<u64> {
    let mut header = Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata).unwrap_or_default());
    }
    let mut off = 0u64;
    for s in specs {
        let n = s.bytes().ok_or_else(|| tensor_err(path, &s.name, "size overflows"))? as u64;
        header.insert(s.name.clone(), serde_json::json!({ "dtype": s.dtype.as_str(), "shape": s.shape, "data_offsets": [off, off + n] }));
        off += n;
    }
    let mut h = serde_json::to_vec(&Value::Object(header)).map_err(|e| format_err(path, format!("header: {e}")))?;
    h.resize(h.len().next_multiple_of(8), b' ');
    let file = File::create_new(path).map_err(io_err(path, "create"))?;
    let mut w = std::io::BufWriter::with_capacity(8 << 20, file);
    w.write_all(&(h.len() as u64).to_le_bytes()).and_then(|_| w.write_all(&h)).map_err(io_err(path, "write header"))?;
    for (i, s) in specs.iter().enumerate() {
        let mut cw = Counting { inner: &mut w, n: 0 };
        fill(i, &mut cw)?;
        let want = s.bytes().unwrap_or(0) as u64;
        if cw.n != want {
            return Err(tensor_err(path, &s.name, format!("writer produced {} bytes, expected {want}", cw.n)));
        }
    }
    let file = w.into_inner().map_err(|e| io_err(path, "flush")(e.into_error()))?;
    file.sync_all().map_err(io_err(path, "sync"))?;
    Ok(8 + h.len() as u64 + off)
}

struct Counting<'a, W: Write> {
    inner: &'a mut W,
    n: u64,
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
