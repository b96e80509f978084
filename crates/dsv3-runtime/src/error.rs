//! The one error type of the runtime. Every variant names the file, tensor or field at fault
//! and what was expected, so a malformed model directory is diagnosable from the message.

use dsv3_kernels::KernelError;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Every fallible entry point of this crate returns this.
#[derive(Debug, Error)]
pub enum RuntimeError {
    /// A `config.json` (or `tokenizer_config.json`) field is missing, mistyped, out of range or
    /// inconsistent with another field. `field` is the JSON path, e.g. `rope_scaling.factor`.
    #[error("{file}: config field `{field}`: {detail}")]
    Config { file: String, field: String, detail: String },

    /// Reading or writing a file failed.
    #[error("{}: {op}: {source}", path.display())]
    Io { path: PathBuf, op: &'static str, source: std::io::Error },

    /// A file is not in the format it should be (safetensors header, index JSON, ...).
    #[error("{}: {detail}", file.display())]
    Format { file: PathBuf, detail: String },

    /// One tensor is missing, extra, of the wrong dtype or shape, or holds bad values.
    #[error("{}: tensor `{tensor}`: {detail}", file.display())]
    Tensor { file: PathBuf, tensor: String, detail: String },

    /// The tokenizer files could not be loaded, or encoding / decoding failed.
    #[error("{}: tokenizer: {detail}", file.display())]
    Tokenizer { file: PathBuf, detail: String },

    /// The chat template failed to compile or render (syntax, fuel or size limit, raise_exception).
    #[error("chat template: {detail}")]
    Template { detail: String },

    /// An output path cannot be written as asked (exists and is not empty, ...).
    #[error("{}: {detail}", path.display())]
    Output { path: PathBuf, detail: String },

    /// A token id outside `0..vocab_size`.
    #[error("token id {id} is outside the vocabulary (vocab_size {vocab_size})")]
    TokenId { id: u64, vocab_size: usize },

    /// A kernel-layer constructor or op rejected its arguments.
    #[error(transparent)]
    Kernel(#[from] KernelError),

    /// The attention layer rejected its weights, cache or inputs.
    #[error("attention: {0}")]
    Mla(#[from] dsv3_mla::MlaError),

    /// The MoE / MLP layer rejected its weights or inputs.
    #[error("mlp: {0}")]
    Moe(#[from] dsv3_moe::MoeError),

    /// A NaN or an infinity in an activation (`at` names the layer and the tensor).
    #[error("non-finite activation {value} in {at}, token row {row}, channel {col}")]
    NonFinite { at: String, row: usize, col: usize, value: f32 },

    /// An error inside decoder layer `layer` (main layers `0..num_hidden_layers`, then MTP).
    #[error("layer {layer}: {source}")]
    Layer { layer: usize, source: Box<RuntimeError> },

    /// A request the model cannot serve (empty prompt, unknown sequence, ...).
    #[error("request: {0}")]
    Request(String),

    /// A multi-process run failed: rank `rank` reported `detail` (its own error, or a broken
    /// message or launch), and every rank of the job returns this same error.
    #[error("rank {rank}: {detail}")]
    Dist { rank: usize, detail: String },
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> RuntimeError {
    let path = path.to_path_buf();
    move |source| RuntimeError::Io { path, op, source }
}

pub(crate) fn format_err(file: &Path, detail: impl Into<String>) -> RuntimeError {
    RuntimeError::Format { file: file.to_path_buf(), detail: detail.into() }
}

pub(crate) fn tensor_err(file: &Path, tensor: &str, detail: impl Into<String>) -> RuntimeError {
    RuntimeError::Tensor { file: file.to_path_buf(), tensor: tensor.to_string(), detail: detail.into() }
}

pub(crate) fn output_err(path: &Path, detail: impl Into<String>) -> RuntimeError {
    RuntimeError::Output { path: path.to_path_buf(), detail: detail.into() }
}
