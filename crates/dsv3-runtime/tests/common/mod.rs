//! Helpers shared by the integration tests: writing random models and rewriting safetensors
//! files tensor by tensor.
#![allow(dead_code, unused_imports)] // each test crate uses a part of these

use dsv3_runtime::tensor_file::{Dtype, TensorFile, TensorSpec, write_file};
use dsv3_runtime::{InitOptions, InitReport, Preset, Progress, init_random_preset};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Writes `preset` into `parent/name` with a fixed seed; single file unless `shard_max_bytes`.
pub fn write_preset(parent: &Path, name: &str, preset: Preset, shard_max_bytes: Option<u64>) -> InitReport {
    let mut opts = InitOptions { seed: 7, progress: Progress::Never, ..InitOptions::default() };
    if let Some(s) = shard_max_bytes {
        opts.shard_max_bytes = s;
    }
    init_random_preset(preset, &parent.join(name), &opts).expect("writing a preset succeeds")
}

/// One tensor of a file, owned.
#[derive(Clone, Debug)]
pub struct Owned {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads every tensor of a safetensors file (in offset order).
pub fn read_all(path: &Path) -> Vec<Owned> {
    let f = TensorFile::open(path).expect("open");
    let mut v: Vec<_> = f.tensors().iter().map(|(n, i)| (i.offset, n.clone(), i.clone())).collect();
    v.sort_by_key(|x| x.0);
    v.into_iter().map(|(_, name, i)| Owned { data: f.read(&name).unwrap(), name, dtype: i.dtype, shape: i.shape }).collect()
}

/// Rewrites `path` after `edit` changed its tensors (a valid file again, contiguous).
pub fn rewrite(path: &Path, edit: impl FnOnce(&mut Vec<Owned>)) {
    let mut t = read_all(path);
    edit(&mut t);
    std::fs::remove_file(path).unwrap();
    let specs: Vec<TensorSpec> = t.iter().map(|o| TensorSpec { name: o.name.clone(), dtype: o.dtype, shape: o.shape.clone() }).collect();
    write_file(path, &specs, &BTreeMap::new(), |i, w| w.write_all(&t[i].data).map_err(|e| panic!("{e}"))).unwrap();
}

/// Splits a safetensors file into (header JSON, data section).
pub fn split_raw(path: &Path) -> (serde_json::Value, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&bytes[8..8 + n]).unwrap(), bytes[8 + n..].to_vec())
}

/// Writes a safetensors file from a header JSON (serialised as is) and a data section.
pub fn join_raw(path: &Path, header: &serde_json::Value, data: &[u8]) {
    let h = serde_json::to_vec(header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    std::fs::write(path, out).unwrap();
}

/// A copy of `src` (a model directory) under `parent/name`.
pub fn copy_dir(src: &Path, parent: &Path, name: &str) -> PathBuf {
    let dst = parent.join(name);
    std::fs::create_dir(&dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

// ----- the whole model -----

use dsv3_kernels::Cpu;
use dsv3_kernels::gemm::GemmPath;
use dsv3_runtime::model::Model;
use dsv3_runtime::{Checkpoint, ModelConfig};

/// Loads the model directory `dir` (config + checkpoint, validated) on the CPU backend.
pub fn load_model(dir: &Path, path: GemmPath) -> Model<Cpu> {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let ck = Checkpoint::open(dir).unwrap();
    ck.validate(&cfg).unwrap();
    Model::load(&Cpu, &ck, &cfg, path).unwrap()
}

/// Loads `dir` with its MTP module.
pub fn load_model_mtp(dir: &Path, path: GemmPath) -> (Model<Cpu>, dsv3_runtime::mtp::Mtp<Cpu>) {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let ck = Checkpoint::open(dir).unwrap();
    ck.validate(&cfg).unwrap();
    let m = Model::load(&Cpu, &ck, &cfg, path).unwrap();
    let mtp = dsv3_runtime::mtp::Mtp::load(&Cpu, &ck, &cfg, &m).unwrap();
    (m, mtp)
}

/// Logits of every position of `ids`, fed as the given chunks (one sequence).
pub fn logits_in_chunks(m: &Model<Cpu>, ids: &[u32], chunks: &[usize]) -> Vec<f32> {
    let mut cache = m.new_cache(&Cpu, ids.len()).unwrap();
    let seq = cache.add_sequence();
    let mut out = Vec::new();
    let mut at = 0;
    for &c in chunks {
        let h = m.forward_hidden(&Cpu, &mut cache, &[(seq, &ids[at..at + c])]).unwrap();
        out.extend(m.logits(&Cpu, &h, &(0..c).collect::<Vec<_>>()).unwrap());
        at += c;
    }
    assert_eq!(at, ids.len());
    out
}

pub use dsv3_testutil::{argmax_rows, rel_max_diff};
