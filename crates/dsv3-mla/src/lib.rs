//! dsv3-mla: Multi-head Latent Attention (docs/model.md §3.3–3.7) over a paged latent KV cache,
//! written once against the op-level [`dsv3_kernels::Backend`] trait.
//!
//! * [`MlaConfig`]: the layer's dimensions, RoPE/YaRN and norm epsilon, validated.
//! * [`MlaHostWeights`] / [`MlaWeights`]: one layer's tensors as the checkpoint stores them
//!   (FP8 projections, f32 norms), and resident on a backend with `kv_b_proj` split once into
//!   bf16 pairs (hi + lo, 16 significant bits) of `W_UK` / `W_UV` for the absorbed form.
//! * [`PagedLatentCache`]: pages of 64 tokens × `[c_kv | k_pe]` (576 f32 for V3) per layer, a
//!   block allocator with per-sequence block tables, truncation, and [`StepPlan`]s (the
//!   cache module documents the byte layout).
//! * [`MlaWeights::prefill`] (expanded form, chunked prefill by absolute position) and
//!   [`MlaWeights::decode`] (weight-absorbed form, batched over sequences of different
//!   lengths), sharing an [`MlaContext`] (RoPE table, softmax scale, GEMM path).
//!
//! The kernel types the API uses are re-exported here ([`dsv3_kernels`] itself as
//! [`kernels`]), so this crate is the one dependency a user of the attention layer needs; the
//! [`prelude`] imports the usual set at once.
//!
//! ```
//! use dsv3_mla::prelude::*;
//! # fn main() -> Result<(), MlaError> {
//! let b = Cpu;
//! // V3's head shape (q LoRA, 512 + 64 latent, YaRN) with 2 heads, hidden 512, 4096 positions.
//! let cfg = MlaConfig::deepseek_v3().with_hidden(512).with_heads(2).with_max_position(4096);
//! let ctx = MlaContext::new(&b, cfg, GemmPath::Reference)?;
//! let layer = MlaWeights::random(&b, &cfg, 1)?;
//! let mut cache = PagedLatentCache::new(&b, CacheConfig::for_model(&cfg, 1, 64))?;
//! let seq = cache.add_sequence();
//! let plan = cache.plan(&b, &[(seq, 5)])?; // a 5-token prompt
//! let x = vec![0.1f32; 5 * cfg.hidden];
//! let mut out = vec![0f32; 5 * cfg.hidden];
//! layer.prefill(&b, &ctx, &mut cache.layer(&plan, 0)?, &x, &mut out)?;
//! let plan = cache.plan(&b, &[(seq, 1)])?; // one decode step
//! let (x, mut out) = (vec![0.1f32; cfg.hidden], vec![0f32; cfg.hidden]);
//! layer.decode(&b, &ctx, &mut cache.layer(&plan, 0)?, &x, &mut out)?;
//! assert_eq!(cache.seq_len(seq)?, 6);
//! assert!(out.iter().all(|v| v.is_finite()) && out.iter().any(|&v| v != 0.0));
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod attn;
pub mod cache;
mod config;
mod error;
mod weights;

pub use attn::MlaContext;
pub use cache::{CacheConfig, LayerCache, PAGE_SIZE, PagedLatentCache, PlanBufs, PlanEntry, PlanTables, SeqId, StepPlan};
pub use config::MlaConfig;
pub use error::{MlaError, Result};
pub use weights::{HostQProj, MlaHostWeights, MlaWeights, quantize_par};

/// The kernel crate this one is written against.
pub use dsv3_kernels as kernels;
pub use dsv3_kernels::fp8::Fp8Weight;
pub use dsv3_kernels::gemm::GemmPath;
pub use dsv3_kernels::rope::{RopeCfg, Yarn};
pub use dsv3_kernels::{Backend, Cpu, Cuda, KernelError, half};

/// The types of an MLA forward pass on the paged cache, in one import.
pub mod prelude {
    pub use crate::{
        Backend, CacheConfig, Cpu, Cuda, GemmPath, HostQProj, MlaConfig, MlaContext, MlaError, MlaHostWeights, MlaWeights,
        PagedLatentCache, RopeCfg, SeqId, StepPlan, Yarn,
    };
}

/// The example of `README.md`, run as a doctest so that it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
