//! dsv3-runtime: configuration, checkpoint loading, tokenizer and chat template, random
//! checkpoints, and (to come) the full model and generation.
//!
//! * [`config`]: HF `config.json` (V3 hub format, V2-Lite, Moonlight), validated.
//! * [`checkpoint`] / [`tensor_file`]: safetensors files and shard indexes, typed tensor reads.
//! * [`plan`]: every tensor a config implies; checkpoint validation against it.
//! * [`tokenizer`] / [`chat`]: `tokenizer.json`, the chat template, streaming detokenisation.
//! * [`init_random`](mod@init_random) / [`presets`] / [`writer`]: random models in the real checkpoint format.
#![forbid(unsafe_code)]

pub mod chat;
pub mod checkpoint;
pub mod config;
mod config_check;
pub mod engine;
pub mod error;
pub mod eval;
pub mod generate;
pub mod init_random;
mod json;
pub mod model;
pub mod mtp;
pub mod plan;
pub mod presets;
pub mod tensor_file;
pub mod tokenizer;
pub mod writer;

pub use checkpoint::{Checkpoint, LinearWeight, Progress};
pub use config::{LayerKind, ModelConfig, ModelType, QuantConfig, ScoringFunc, TopkMethod};
pub use error::{Result, RuntimeError};
pub use init_random::{InitOptions, InitReport, init_random, init_random_preset};
pub use plan::{PlannedTensor, TensorPlan, TensorRole, tensor_plan};
pub use presets::Preset;
pub use tokenizer::{StreamDecoder, Tokenizer};
