//! A model directory's weights: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json` (`weight_map`: tensor name → shard file), as HF writes them.
//!
//! [`Checkpoint::open`] validates every shard header ([`crate::tensor_file`]), refuses shard
//! names that escape the model directory (absolute paths, `..`, symlinks resolving outside),
//! and checks that the index and the shards agree. The typed accessors read one tensor each,
//! check its dtype and shape, and the values that must be sane (FP8 scales finite and > 0,
//! no NaN code, BF16 matrices and norms finite), with errors naming the file and the tensor.
//! [`Checkpoint::validate`] (in [`crate::plan`]) checks the whole name/shape set against a
//! config.
//!
//! **Zero-copy**: every shard is memory-mapped, and the large tensors — FP8 codes
//! ([`Checkpoint::fp8_weight`], [`Checkpoint::linear_weight`]) and BF16 matrices
//! ([`Checkpoint::bf16_weight`]) — come back as weights whose data is their range of the map
//! (see [`TensorFile::storage`] for when a copy is made instead: misaligned BF16, big-endian
//! hosts). The CPU backend keeps such a weight as it is when it is uploaded, so the loaded model
//! reads its weights straight from the file's page cache, and the map lives as long as any
//! weight of it does (the `Checkpoint` itself may be dropped). Scales, norms and biases (a few
//! KiB each) are copied.
//!
//! **Projection weights of BF16 checkpoints** (V2-Lite, Moonlight have no FP8): the model
//! layers (`dsv3-mla`, `dsv3-moe`) take [`Fp8Weight`]s, so [`Checkpoint::fp8_weight`] accepts a
//! BF16 tensor too and quantises it per 128x128 block exactly as the FP8 checkpoints were made
//! (scale = amax / 448). That is lossy (e4m3 keeps 3 mantissa bits); a caller that wants the
//! exact BF16 values uses [`Checkpoint::linear_weight`], which returns whichever form is stored.

use crate::error::{Result, format_err, io_err, tensor_err};
use crate::json::{Obj, read_json_bytes};
use crate::tensor_file::{Dtype, TensorFile, TensorInfo};
use dsv3_kernels::dense::Bf16Weight;
use dsv3_kernels::fp8::{Fp8Weight, blocks};
use dsv3_kernels::mmap::{LeElem, Storage};
use half::bf16;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Component, Path, PathBuf};

/// The single-file weights name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The shard index name.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// A projection weight as stored: FP8 with block scales, or BF16.
#[derive(Debug, Clone, PartialEq)]
pub enum LinearWeight {
    Fp8(Fp8Weight),
    Bf16(Bf16Weight),
}

/// Whether loading shows a progress bar on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Progress {
    /// Only when stderr is a terminal.
    #[default]
    Auto,
    Never,
}

/// An opened, header-validated model directory.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<TensorFile>,
    /// Tensor name → index into `files`.
    where_: BTreeMap<String, usize>,
    bar: ProgressBar,
}

impl Checkpoint {
    /// Opens `dir` (progress bar on a terminal).
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, Progress::Auto)
    }

    /// Opens `dir`: `model.safetensors` if present (as HF prefers), else the index and its shards.
    pub fn open_with(dir: &Path, progress: Progress) -> Result<Self> {
        let meta = std::fs::metadata(dir).map_err(io_err(dir, "open model directory"))?;
        if !meta.is_dir() {
            return Err(format_err(dir, "is not a directory"));
        }
        let (single, index) = (dir.join(SINGLE_FILE), dir.join(INDEX_FILE));
        let (files, where_) = if single.exists() {
            let f = TensorFile::open(&safe_join(dir, SINGLE_FILE, &single)?)?;
            let where_ = f.tensors().keys().map(|k| (k.clone(), 0)).collect();
            (vec![f], where_)
        } else if index.exists() {
            open_sharded(dir, &index)?
        } else {
            return Err(format_err(dir, format!("no {SINGLE_FILE} or {INDEX_FILE} in the model directory")));
        };
        let total: u64 = files.iter().flat_map(|f| f.tensors().values()).map(|t| t.len as u64).sum();
        let bar = if progress == Progress::Auto && std::io::stderr().is_terminal() {
            let b = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template("loading {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}") {
                b.set_style(style);
            }
            b
        } else {
            ProgressBar::hidden()
        };
        Ok(Checkpoint { dir: dir.to_path_buf(), files, where_, bar })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// Number of tensors (scales included).
    pub fn len(&self) -> usize {
        self.where_.len()
    }
    pub fn is_empty(&self) -> bool {
        self.where_.is_empty()
    }
    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.where_.keys().map(String::as_str)
    }
    pub fn contains(&self, name: &str) -> bool {
        self.where_.contains_key(name)
    }
    /// The shard files, in the order of first appearance in the index.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(TensorFile::path)
    }

    /// The file holding `name` and its header entry; the error names the tensor if missing.
    pub fn info(&self, name: &str) -> Result<(&Path, &TensorInfo)> {
        match self.where_.get(name).map(|&i| &self.files[i]) {
            Some(f) => Ok((f.path(), &f.tensors()[name])),
            None => Err(tensor_err(&self.dir, name, "missing from the checkpoint")),
        }
    }

    /// Checks that `name` has one of `dtypes` and shape `shape`; returns its file and dtype.
    fn check(&self, name: &str, dtypes: &[Dtype], shape: &[usize]) -> Result<(&Path, Dtype)> {
        let (path, info) = self.info(name)?;
        if !dtypes.contains(&info.dtype) {
            let want: Vec<_> = dtypes.iter().map(|d| d.as_str()).collect();
            return Err(tensor_err(path, name, format!("dtype {}, expected {}", info.dtype.as_str(), want.join(" or "))));
        }
        if info.shape != shape {
            return Err(tensor_err(path, name, format!("shape {:?}, expected {shape:?}", info.shape)));
        }
        Ok((path, info.dtype))
    }

    /// Reads `name` into a typed buffer of `numel` elements (one copy, straight from the file).
    fn read_typed<T: bytemuck::Pod + Default>(&self, name: &str, numel: usize) -> Result<Vec<T>> {
        let mut v = vec![T::default(); numel];
        self.files[self.where_[name]].read_into(name, bytemuck::cast_slice_mut(&mut v))?;
        self.bar.inc(std::mem::size_of_val(v.as_slice()) as u64);
        Ok(v)
    }

    /// Tensor `name` in place in its shard's map where possible (see [`TensorFile::storage`]).
    fn storage<T: LeElem>(&self, name: &str) -> Result<Storage<T>> {
        let data = self.files[self.where_[name]].storage::<T>(name)?;
        self.bar.inc(std::mem::size_of_val(data.as_slice()) as u64);
        Ok(data)
    }

    /// BF16 values of `name` (checked shape), little-endian on any host.
    fn read_bf16(&self, name: &str, shape: &[usize]) -> Result<(&Path, Vec<bf16>)> {
        let (path, _) = self.check(name, &[Dtype::Bf16], shape)?;
        let mut v = self.read_typed::<bf16>(name, self.info(name)?.1.numel())?;
        v.iter_mut().for_each(|x| *x = bf16::from_bits(u16::from_le(x.to_bits())));
        Ok((path, v))
    }

    /// F32 values of `name` (dtype already checked), little-endian on any host.
    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let mut v = self.read_typed::<f32>(name, self.info(name)?.1.numel())?;
        v.iter_mut().for_each(|x| *x = f32::from_bits(u32::from_le(x.to_bits())));
        Ok(v)
    }

    /// An FP8 weight `[rows, cols]`: `name` (F8_E4M3) with `{name}_scale_inv` (F32,
    /// `[ceil(rows/128), ceil(cols/128)]`, every value finite and > 0), or a BF16 `name`
    /// quantised per block (see the module docs).
    pub fn fp8_weight(&self, name: &str, rows: usize, cols: usize) -> Result<Fp8Weight> {
        match self.linear_weight(name, rows, cols)? {
            LinearWeight::Fp8(w) => Ok(w),
            LinearWeight::Bf16(b) => {
                let path = self.info(name)?.0;
                let w: Vec<f32> = b.view().data().iter().map(|v| v.to_f32()).collect();
                check_finite(path, name, &w, cols)?;
                Fp8Weight::quantize(rows, cols, &w).map_err(|e| tensor_err(path, name, e.to_string()))
            }
        }
    }

    /// A projection weight in its stored form: FP8 + scales, or BF16.
    pub fn linear_weight(&self, name: &str, rows: usize, cols: usize) -> Result<LinearWeight> {
        let (path, dtype) = self.check(name, &[Dtype::F8E4M3, Dtype::Bf16], &[rows, cols])?;
        if dtype == Dtype::Bf16 {
            return Ok(LinearWeight::Bf16(self.bf16_weight(name, rows, cols)?));
        }
        let bytes = self.storage::<u8>(name)?;
        let scale_name = format!("{name}_scale_inv");
        if !self.contains(&scale_name) {
            return Err(tensor_err(path, &scale_name, format!("missing: the F8_E4M3 weight `{name}` needs its F32 scale tensor")));
        }
        let (br, bc) = (blocks(rows), blocks(cols));
        let (spath, _) = self.check(&scale_name, &[Dtype::F32], &[br, bc])?;
        let scale = self.read_f32(&scale_name)?;
        if let Some(i) = scale.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(tensor_err(spath, &scale_name, format!("block [{}, {}] is {}, expected finite and > 0", i / bc, i % bc, scale[i])));
        }
        let w = Fp8Weight::from_storage(rows, cols, bytes, scale).map_err(|e| tensor_err(path, name, e.to_string()))?;
        Ok(LinearWeight::Fp8(w))
    }

    /// A BF16 matrix `[rows, cols]` (embeddings, lm_head, router, eh_proj).
    pub fn bf16_weight(&self, name: &str, rows: usize, cols: usize) -> Result<Bf16Weight> {
        let (path, _) = self.check(name, &[Dtype::Bf16], &[rows, cols])?;
        let data = self.storage::<bf16>(name)?;
        if let Some(i) = first_non_finite_bf16(&data) {
            return Err(tensor_err(path, name, format!("non-finite value {} at [{}, {}]", data[i], i / cols, i % cols)));
        }
        Bf16Weight::from_storage(rows, cols, data).map_err(|e| tensor_err(path, name, e.to_string()))
    }

    /// An RMSNorm weight of `len` values, BF16 (V3) or F32 (V3.2), upcast to f32; finite.
    pub fn norm_weight(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let (path, dtype) = self.check(name, &[Dtype::Bf16, Dtype::F32], &[len])?;
        let v =
            if dtype == Dtype::Bf16 { self.read_bf16(name, &[len])?.1.iter().map(|x| x.to_f32()).collect() } else { self.read_f32(name)? };
        check_finite(path, name, &v, len)?;
        Ok(v)
    }

    /// An F32 vector of `len` values (the router's `e_score_correction_bias`); finite.
    pub fn f32_vec(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let (path, _) = self.check(name, &[Dtype::F32], &[len])?;
        let v = self.read_f32(name)?;
        check_finite(path, name, &v, len)?;
        Ok(v)
    }

    /// Whether tensors `a` and `b` have the same dtype, shape and bytes (read in 16 MiB
    /// chunks, so a 1.85 GB embedding costs no more memory than a chunk pair).
    pub fn same_data(&self, a: &str, b: &str) -> Result<bool> {
        let ((_, ia), (_, ib)) = (self.info(a)?, self.info(b)?);
        if ia.dtype != ib.dtype || ia.shape != ib.shape || ia.len != ib.len {
            return Ok(false);
        }
        const CHUNK: usize = 16 << 20;
        let (fa, fb) = (&self.files[self.where_[a]], &self.files[self.where_[b]]);
        let (mut ba, mut bb) = (vec![0u8; CHUNK.min(ia.len)], vec![0u8; CHUNK.min(ia.len)]);
        let mut at = 0;
        while at < ia.len {
            let n = CHUNK.min(ia.len - at);
            fa.read_range(a, at, &mut ba[..n])?;
            fb.read_range(b, at, &mut bb[..n])?;
            if ba[..n] != bb[..n] {
                return Ok(false);
            }
            at += n;
        }
        Ok(true)
    }

    /// Ends the progress bar (call when the model is built).
    pub fn finish_progress(&self) {
        self.bar.finish_and_clear();
    }
}

fn check_finite(path: &Path, name: &str, v: &[f32], cols: usize) -> Result<()> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(i) if cols > 0 => Err(tensor_err(path, name, format!("non-finite value {} at [{}, {}]", v[i], i / cols, i % cols))),
        _ => Ok(()),
    }
}

/// Index of the first NaN or infinity (exponent bits all ones), scanned in parallel.
fn first_non_finite_bf16(v: &[bf16]) -> Option<usize> {
    const CH: usize = 1 << 16;
    let bad = |c: &[bf16]| c.iter().fold(false, |acc, x| acc | (x.to_bits() & 0x7F80 == 0x7F80));
    let chunk = v.par_chunks(CH).position_first(bad)?;
    let start = chunk * CH;
    v[start..].iter().position(|x| !x.is_finite()).map(|i| start + i)
}

/// Why shard `name` (as written in the index) is not a plain relative path inside the model
/// directory, if it is not: absolute, `..`, `.`-only or empty.
fn unsafe_shard_name(name: &str) -> Option<&'static str> {
    let rel = Path::new(name);
    let plain = !name.is_empty() && rel.components().next().is_some() && rel.components().all(|c| matches!(c, Component::Normal(_)));
    (!plain).then_some("is not a plain relative path inside the model directory")
}

/// Resolves shard `name` (as written in the index) inside `dir`, refusing anything that could
/// leave it: absolute paths, `..`, `.`-only or empty names, and symlinks resolving outside.
pub(crate) fn safe_join(dir: &Path, name: &str, origin: &Path) -> Result<PathBuf> {
    let escape = |why: &str| format_err(origin, format!("shard name \"{name}\" {why}; refusing it"));
    if let Some(why) = unsafe_shard_name(name) {
        return Err(escape(why));
    }
    let joined = dir.join(name);
    let canon = joined.canonicalize().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format_err(origin, format!("shard file \"{name}\" is missing from {}", dir.display()))
        } else {
            io_err(&joined, "resolve shard path")(e)
        }
    })?;
    let canon_dir = dir.canonicalize().map_err(io_err(dir, "resolve model directory"))?;
    if !canon.starts_with(&canon_dir) {
        return Err(escape(&format!("resolves to {} outside the model directory", canon.display())));
    }
    if !canon.is_file() {
        return Err(format_err(origin, format!("shard \"{name}\" is not a regular file")));
    }
    Ok(canon)
}

/// A parsed `model.safetensors.index.json`: which shard holds each tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardIndex {
    /// Tensor name → shard file name (as written in the index).
    pub weight_map: BTreeMap<String, String>,
    /// The distinct shard names, in order of first appearance in the file.
    pub shards: Vec<String>,
}

/// Parses an index file's bytes (at most the JSON size limit): a JSON object whose
/// `weight_map` is a non-empty object of tensor name → shard file name, every shard name a
/// plain relative path (checked here, before any file is touched). `origin` names the file in
/// errors. [`Checkpoint::open`] then opens the shards and checks them against the map.
pub fn parse_index(origin: &Path, bytes: &[u8]) -> Result<ShardIndex> {
    let v = crate::json::parse_json_bytes(origin, bytes)?;
    let file = origin.display().to_string();
    let o = Obj::root(&v, &file)?;
    let Some(serde_json::Value::Object(map)) = o.get("weight_map") else {
        return Err(o.err("weight_map", "missing or not an object of tensor name -> shard file"));
    };
    if map.is_empty() {
        return Err(o.err("weight_map", "is empty"));
    }
    let mut index = ShardIndex { weight_map: BTreeMap::new(), shards: Vec::new() };
    for (tensor, shard) in map {
        let shard = shard.as_str().ok_or_else(|| o.err(&format!("weight_map.{tensor}"), "is not a string file name"))?;
        if let Some(why) = unsafe_shard_name(shard) {
            return Err(format_err(origin, format!("shard name \"{shard}\" {why}; refusing it")));
        }
        if !index.shards.iter().any(|s| s == shard) {
            index.shards.push(shard.to_string());
        }
        index.weight_map.insert(tensor.clone(), shard.to_string());
    }
    Ok(index)
}

type Sharded = (Vec<TensorFile>, BTreeMap<String, usize>);

fn open_sharded(dir: &Path, index: &Path) -> Result<Sharded> {
    let parsed = parse_index(index, &read_json_bytes(index)?)?;
    let mut files: Vec<TensorFile> = Vec::with_capacity(parsed.shards.len());
    for shard in &parsed.shards {
        files.push(TensorFile::open(&safe_join(dir, shard, index)?)?);
    }
    let shard_idx: BTreeMap<&str, usize> = parsed.shards.iter().enumerate().map(|(i, s)| (s.as_str(), i)).collect();
    let mut where_ = BTreeMap::new();
    for (tensor, shard) in &parsed.weight_map {
        let idx = shard_idx[shard.as_str()];
        if !files[idx].tensors().contains_key(tensor) {
            return Err(tensor_err(index, tensor, format!("the index maps it to \"{shard}\", which has no such tensor")));
        }
        where_.insert(tensor.clone(), idx);
    }
    for f in &files {
        for name in f.tensors().keys() {
            match where_.get(name) {
                Some(&i) if files[i].path() == f.path() => {}
                Some(&i) => {
                    return Err(tensor_err(f.path(), name, format!("also stored in {}, which the index names", files[i].path().display())));
                }
                None => return Err(tensor_err(f.path(), name, format!("not listed in {INDEX_FILE}"))),
            }
        }
    }
    Ok((files, where_))
}
