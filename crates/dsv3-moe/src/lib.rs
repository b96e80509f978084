//! dsv3-moe: the MoE layer (router, dispatch, grouped experts, combine, shared experts) and
//! expert parallelism, written against the op-level API of `dsv3-kernels`.
//!
//! * [`DenseMlp`]: the SwiGLU MLP of the dense layers (and of the shared experts).
//! * [`MoeLayer`]: one MoE layer on a backend ([`MoeLayer::forward`]), with the routed
//!   experts' grouped GEMMs in the contiguous or masked layout ([`GroupedLayout`]) and either
//!   GEMM path ([`dsv3_kernels::gemm::GemmPath`]); every pass returns the batch's
//!   [`LoadStats`].
//! * [`ep`]: expert parallelism over a [`Transport`] (all-to-all dispatch and combine, NCCL
//!   shaped), with an in-process transport that runs `R` ranks as threads.
//! * [`wire`]: the dispatch as it crosses between processes (one row per token and
//!   destination rank).
//! * [`MlpWeights`] / [`MoeWeights`]: host weights checked against the config (errors name
//!   the checkpoint tensor), and random FP8 weights for tests and benchmarks.
//!
//! All code is generic over [`dsv3_kernels::Backend`] and monomorphised. The kernel types the
//! API uses are re-exported here (and [`dsv3_kernels`] itself as [`kernels`], `half` as
//! [`half`]), so this crate is the one dependency a user of the MoE layer needs; the
//! [`prelude`] imports the usual set at once.
//!
//! ```
//! use dsv3_moe::prelude::*;
//!
//! let cfg = MoeConfig::new(256, 128, 1, RouteCfg::deepseek_v3().with_experts(16, 4).with_groups(4, 2));
//! let layer = MoeLayer::new(&Cpu, cfg, &MoeWeights::random(&cfg, 7)?)?;
//! let x = vec![0.5f32; 3 * 256]; // 3 tokens of width 256
//! let out = layer.forward(&Cpu, &x, 3)?;
//! assert_eq!(out.y.len(), 3 * 256);
//! assert_eq!(out.stats.per_expert().iter().sum::<u64>(), 3 * 4); // top-4 per token
//! # Ok::<(), MoeError>(())
//! ```
#![forbid(unsafe_code)]

pub mod config;
pub mod ep;
pub mod error;
pub mod layer;
pub mod mlp;
pub mod stats;
pub mod weights;
pub mod wire;

pub use config::{DenseMlpConfig, GroupedLayout, MoeConfig};
pub use ep::{InProcessTransport, Transport, forward_in_process, token_split};
pub use error::{MoeError, Result};
pub use layer::{MoeLayer, MoeOutput, Routing};
pub use mlp::DenseMlp;
pub use stats::LoadStats;
pub use weights::{MlpWeights, MoeWeights};

/// The kernel crate this one is written against.
pub use dsv3_kernels as kernels;
pub use dsv3_kernels::a2a::EpLayout;
pub use dsv3_kernels::bf16_gemm::Bf16Weight;
pub use dsv3_kernels::fp8::Fp8Weight;
pub use dsv3_kernels::gating::{RouteCfg, RouteMethod};
pub use dsv3_kernels::gemm::GemmPath;
pub use dsv3_kernels::{Backend, Cpu, Cuda, KernelError, half};

/// The types of a MoE or MLP forward pass, in one import.
pub mod prelude {
    pub use crate::{
        Backend, Cpu, Cuda, DenseMlp, DenseMlpConfig, GemmPath, GroupedLayout, LoadStats, MlpWeights, MoeConfig, MoeError, MoeLayer,
        MoeOutput, MoeWeights, RouteCfg, RouteMethod,
    };
}

/// The example of `README.md`, run as a doctest so that it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
