//! `dsv3 logits`: the logits of every position of a token sequence, to a new safetensors file.

use crate::args::{ModelArgs, OnDevice, WithMtp, load};
use dsv3_kernels::Backend;
use dsv3_runtime::tensor_file::{Dtype, TensorSpec, write_file};
use dsv3_runtime::{Result, RuntimeError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, value_delimiter = ',', required = true)]
    pub ids: Vec<u32>,
    /// A new file (never overwritten).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub parallel: crate::parallel::ParallelArgs,
}

impl OnDevice for LogitsArgs {
    fn run<B: Backend + 'static>(self, b: B) -> Result<()> {
        let a = self;
        if a.out.exists() {
            return Err(RuntimeError::Output {
                path: a.out.clone(),
                detail: "already exists; logits are only written to a new file".into(),
            });
        }
        if a.ids.is_empty() {
            return Err(RuntimeError::Request("--ids is empty".into()));
        }
        if a.parallel.wanted(1) {
            return crate::parallel::logits(&b, a);
        }
        let l = load(b, &a.model, WithMtp::No)?;
        let mut cache = l.model.new_cache(&l.b, a.ids.len())?;
        let seq = cache.add_sequence();
        let hidden = l.model.forward_hidden(&l.b, &mut cache, &[(seq, &a.ids[..])])?;
        let rows: Vec<usize> = (0..a.ids.len()).collect();
        let logits = l.model.logits(&l.b, &hidden, &rows)?;
        write_logits(&a.out, &logits, a.ids.len(), l.model.config().vocab_size)
    }
}

/// Writes `logits [t, vocab]` (f32) to a temporary name beside `out`, then renames it, so no
/// half-written file is ever left at `out`.
pub(crate) fn write_logits(out: &Path, logits: &[f32], t: usize, vocab: usize) -> Result<()> {
    let tmp = out.with_extension("partial");
    let spec = TensorSpec { name: "logits".into(), dtype: Dtype::F32, shape: vec![t, vocab] };
    let res = write_file(&tmp, &[spec], &BTreeMap::new(), |_, w| {
        w.write_all(bytemuck::cast_slice(logits)).map_err(|e| RuntimeError::Io { path: tmp.clone(), op: "write logits", source: e })
    })
    .and_then(|_| {
        std::fs::rename(&tmp, out).map_err(|e| RuntimeError::Io { path: out.to_path_buf(), op: "rename logits into place", source: e })
    });
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}
