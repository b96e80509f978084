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
//! ```no_run
//! # use dsv3_kernels::{Cpu, gemm::GemmPath};
//! # use dsv3_mla::*;
//! # fn main() -> Result<(), MlaError> {
//! let b = Cpu;
//! let cfg = MlaConfig::deepseek_v3();
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
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod attn;
pub mod cache;
mod config;
mod error;
mod weights;

pub use attn::MlaContext;
pub use cache::{CacheConfig, LayerCache, PAGE_SIZE, PagedLatentCache, PlanEntry, SeqId, StepPlan};
pub use config::MlaConfig;
pub use error::{MlaError, Result};
pub use weights::{HostQProj, MlaHostWeights, MlaWeights, quantize_par};
