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
//! * [`MlpWeights`] / [`MoeWeights`]: host weights checked against the config (errors name
//!   the checkpoint tensor), and random FP8 weights for tests and benchmarks.
//!
//! All code is generic over [`dsv3_kernels::Backend`] and monomorphised.
#![forbid(unsafe_code)]

pub mod config;
pub mod ep;
pub mod error;
pub mod layer;
pub mod mlp;
pub mod stats;
pub mod weights;

pub use config::{DenseMlpConfig, GroupedLayout, MoeConfig};
pub use ep::{InProcessTransport, Transport, forward_in_process, token_split};
pub use error::{MoeError, Result};
pub use layer::{MoeLayer, MoeOutput, Routing};
pub use mlp::DenseMlp;
pub use stats::LoadStats;
pub use weights::{MlpWeights, MoeWeights};
