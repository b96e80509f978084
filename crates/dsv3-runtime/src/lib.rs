//! dsv3-runtime: configuration, checkpoint loading, tokenizer and chat template, random
//! checkpoints, the whole model, sampling and generation (with MTP speculative decoding), and
//! the serving engine (continuous batching; the `dsv3` program and the HTTP server are the
//! crates `dsv3-cli` and `dsv3-server`).
//!
//! * [`config`]: HF `config.json` (V3 hub format, V2-Lite, Moonlight), validated.
//! * [`checkpoint`] / [`tensor_file`]: safetensors files and shard indexes, typed tensor reads.
//! * [`plan`]: every tensor a config implies; checkpoint validation against it.
//! * [`tokenizer`] / [`chat`]: `tokenizer.json`, the chat template, streaming detokenisation.
//! * [`init_random`](mod@init_random) / [`presets`] / [`writer`]: random models in the real checkpoint format.
//! * [`model`] / [`mtp`] / [`generate`]: the model on a backend, its MTP module, sampling and
//!   the generation loops.
//! * [`engine`]: one thread owning model and cache, running continuous-batching steps for
//!   many requests.
//!
//! The [`prelude`] imports what generation needs (this crate, the backends, the GEMM path);
//! the layer crates are re-exported as [`kernels`], [`mla`] and [`moe`].
//!
//! ```
//! use dsv3_runtime::prelude::*;
//!
//! // A tiny random V3-architecture model in the real checkpoint format, then 8 greedy tokens.
//! let dir = std::env::temp_dir().join(format!("dsv3-doc-{}", std::process::id()));
//! init_random_preset(Preset::Tiny, &dir, &InitOptions { progress: Progress::Never, ..Default::default() })?;
//! let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
//! let model = Model::load(&Cpu, &Checkpoint::open(&dir)?, &cfg, GemmPath::Reference)?;
//! let req = Request { prompt: &[0, 17, 99], max_tokens: 8, sampling: SamplingParams::default(), eos: &[], allowed: cfg.vocab_size };
//! let out = generate(&Cpu, &model, &req, |_| Ok(()))?;
//! assert_eq!(out.ids.len(), 8);
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok::<(), RuntimeError>(())
//! ```
#![forbid(unsafe_code)]

pub mod chat;
pub mod checkpoint;
pub mod config;
mod config_check;
pub mod decode;
pub mod dist;
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
pub mod profile;
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

/// The crates this one is built on.
pub use dsv3_kernels as kernels;
pub use dsv3_mla as mla;
pub use dsv3_moe as moe;

/// What loading a model and generating from it needs, in one import.
pub mod prelude {
    pub use crate::generate::{Dist, Generation, MtpStats, Request, Sampler, SamplingParams, Verdict, generate, generate_mtp};
    pub use crate::model::Model;
    pub use crate::mtp::Mtp;
    pub use crate::{Checkpoint, InitOptions, ModelConfig, Preset, Progress, Result, RuntimeError, Tokenizer, init_random_preset};
    pub use dsv3_kernels::gemm::GemmPath;
    pub use dsv3_kernels::{Backend, Cpu, Cuda};
}

/// The example of `README.md`, run as a doctest so that it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
