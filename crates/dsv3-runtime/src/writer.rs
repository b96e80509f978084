//! Writing a model directory safely: a new directory built under a temporary name beside the
//! target and renamed into place at the end ([`OutputDir`]), and the weights as one
//! `model.safetensors` or as shards plus `model.safetensors.index.json` ([`write_weights`]).

use crate::checkpoint::{INDEX_FILE, SINGLE_FILE};
use crate::error::{Result, format_err, io_err, output_err};
use crate::tensor_file::{TensorSpec, write_file};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A directory being written under a temporary name; removed on drop unless committed.
#[derive(Debug)]
pub struct OutputDir {
    target: PathBuf,
    tmp: PathBuf,
    committed: bool,
}

impl OutputDir {
    /// Prepares to write `target`, which must not exist or be an empty directory (nothing a
    /// user has is overwritten). The work happens in a hidden sibling directory.
    pub fn create(target: &Path) -> Result<Self> {
        check_target(target)?;
        let name = target.file_name().ok_or_else(|| output_err(target, "has no final path component"))?;
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.is_dir() {
            return Err(output_err(target, format!("parent directory {} does not exist", parent.display())));
        }
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let tmp = parent.join(format!(".{}.partial-{}-{nanos}", name.to_string_lossy(), std::process::id()));
        std::fs::create_dir(&tmp).map_err(io_err(&tmp, "create temporary directory"))?;
        Ok(OutputDir { target: target.to_path_buf(), tmp, committed: false })
    }

    /// Where to write files now.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Moves the finished directory to its target name.
    pub fn commit(mut self) -> Result<PathBuf> {
        check_target(&self.target)?;
        if self.target.is_dir() {
            std::fs::remove_dir(&self.target).map_err(io_err(&self.target, "remove empty target directory"))?;
        }
        std::fs::rename(&self.tmp, &self.target).map_err(io_err(&self.target, "rename the finished directory into place"))?;
        self.committed = true;
        Ok(self.target.clone())
    }
}

impl Drop for OutputDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

fn check_target(target: &Path) -> Result<()> {
    match std::fs::symlink_metadata(target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(target, "inspect output path")(e)),
        Ok(m) if m.is_dir() => {
            let mut it = std::fs::read_dir(target).map_err(io_err(target, "list output directory"))?;
            if it.next().is_some() { Err(output_err(target, "exists and is not empty; refusing to overwrite it")) } else { Ok(()) }
        }
        Ok(_) => Err(output_err(target, "exists and is not a directory; refusing to overwrite it")),
    }
}

/// Writes `specs` into `dir`: one `model.safetensors` if their data fits `shard_max_bytes`,
/// else shards `model-0000k-of-0000n.safetensors` (each at most `shard_max_bytes` of data
/// unless one tensor alone is larger) plus `model.safetensors.index.json`. `fill(i, w)` writes
/// the bytes of `specs[i]`. Returns the files written.
pub fn write_weights(
    dir: &Path,
    specs: &[TensorSpec],
    shard_max_bytes: u64,
    mut fill: impl FnMut(usize, &mut dyn Write) -> Result<()>,
) -> Result<Vec<PathBuf>> {
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut cur = 0u64;
    let mut total = 0u64;
    for (i, s) in specs.iter().enumerate() {
        let n = s.bytes().ok_or_else(|| format_err(dir, format!("tensor `{}` size overflows", s.name)))? as u64;
        let last = shards.len() - 1;
        if cur + n > shard_max_bytes && !shards[last].is_empty() {
            shards.push(vec![]);
            cur = 0;
        }
        let last = shards.len() - 1;
        shards[last].push(i);
        cur += n;
        total += n;
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    if shards.len() == 1 {
        let path = dir.join(SINGLE_FILE);
        write_file(&path, specs, &meta, &mut fill)?;
        return Ok(vec![path]);
    }
    let count = shards.len();
    let mut files = Vec::with_capacity(count + 1);
    let mut weight_map = serde_json::Map::new();
    for (k, members) in shards.iter().enumerate() {
        let fname = format!("model-{:05}-of-{count:05}.safetensors", k + 1);
        let path = dir.join(&fname);
        let sub: Vec<TensorSpec> = members.iter().map(|&i| specs[i].clone()).collect();
        write_file(&path, &sub, &meta, |j, w| fill(members[j], w))?;
        for s in &sub {
            weight_map.insert(s.name.clone(), json!(fname));
        }
        files.push(path);
    }
    let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    let path = dir.join(INDEX_FILE);
    write_json(&path, &index)?;
    files.push(path);
    Ok(files)
}

/// Writes pretty JSON to a new file.
pub fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| format_err(path, e.to_string()))?;
    let mut f = std::fs::File::create_new(path).map_err(io_err(path, "create"))?;
    f.write_all(text.as_bytes()).and_then(|_| f.write_all(b"\n")).map_err(io_err(path, "write"))
}
