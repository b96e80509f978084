//! `model.safetensors.index.json`: the shard map, then a real open of a model directory that
//! holds a few small shards, a subdirectory, and a symlink to a valid shard outside it.
//!
//! Invariants beyond "typed error or value": an accepted index names only plain relative
//! shard paths; an opened checkpoint reads only files inside its directory (the symlink out
//! is refused) and holds exactly the tensors of the weight map.

use dsv3_runtime::checkpoint::{Checkpoint, INDEX_FILE, Progress, parse_index};
use dsv3_runtime::tensor_file::{Dtype, TensorSpec, write_file};
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

/// One tensor of a fixture shard: name, dtype, shape.
type Tensor = (&'static str, Dtype, &'static [usize]);

/// The shard files of the fixture directory: name → tensors.
pub const SHARDS: &[(&str, &[Tensor])] = &[
    ("model-00001-of-00002.safetensors", &[("a", Dtype::F32, &[2]), ("b", Dtype::Bf16, &[2, 2])]),
    ("model-00002-of-00002.safetensors", &[("c", Dtype::F8E4M3, &[1, 1]), ("c_scale_inv", Dtype::F32, &[1, 1])]),
    ("sub/model-extra.safetensors", &[("d", Dtype::Bf16, &[1])]),
];

/// A symlink in the fixture directory that resolves to a valid shard outside it.
pub const ESCAPING_LINK: &str = "outside.safetensors";

/// The fixture directory (written once per process).
fn fixture() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = crate::scratch("index/model");
        for (name, tensors) in SHARDS {
            write_shard(&dir.join(name), tensors);
        }
        let outside = dir.parent().expect("scratch has a parent").join("outside.safetensors");
        write_shard(&outside, &[("e", Dtype::F32, &[1])]);
        #[cfg(unix)]
        std::os::unix::fs::symlink(&outside, dir.join(ESCAPING_LINK)).expect("symlink the outside shard");
        dir
    })
}

fn write_shard(path: &Path, tensors: &[Tensor]) {
    std::fs::create_dir_all(path.parent().expect("a shard has a parent")).expect("create the shard folder");
    let specs: Vec<TensorSpec> =
        tensors.iter().map(|&(n, dtype, shape)| TensorSpec { name: n.into(), dtype, shape: shape.to_vec() }).collect();
    // 0x38 is 1.0 in E4M3 and 1/64 in BF16 / F32 byte patterns: finite everywhere.
    write_file(path, &specs, &BTreeMap::new(), |i, w| {
        let n = specs[i].bytes().unwrap_or(0);
        w.write_all(&vec![0x38; n]).map_err(|e| dsv3_runtime::RuntimeError::Request(e.to_string()))
    })
    .expect("write a fixture shard");
}

pub fn run(data: &[u8]) {
    let origin = Path::new(INDEX_FILE);
    match parse_index(origin, data) {
        Err(e) => crate::typed_error(e),
        Ok(index) => {
            for (tensor, shard) in &index.weight_map {
                assert!(index.shards.contains(shard), "tensor `{tensor}`: shard {shard:?} missing from the shard list");
            }
            for shard in &index.shards {
                let plain = Path::new(shard).components().all(|c| matches!(c, Component::Normal(_)));
                assert!(plain && !shard.is_empty(), "accepted shard name {shard:?} is not a plain relative path");
            }
        }
    }
    let dir = fixture();
    std::fs::write(dir.join(INDEX_FILE), data).expect("write the index");
    match Checkpoint::open_with(dir, Progress::Never) {
        Err(e) => crate::typed_error(e),
        Ok(ck) => {
            let index = parse_index(origin, data).expect("an index that opens parses");
            let canon = dir.canonicalize().expect("canonical fixture dir");
            for f in ck.files() {
                assert!(f.starts_with(&canon), "opened a shard outside the model directory: {}", f.display());
            }
            assert_eq!(ck.len(), index.weight_map.len(), "the checkpoint holds other tensors than the weight map");
            for tensor in index.weight_map.keys() {
                ck.info(tensor).unwrap_or_else(|e| panic!("mapped tensor `{tensor}` is not readable: {e}"));
            }
        }
    }
}
