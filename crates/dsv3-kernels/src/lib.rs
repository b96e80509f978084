//! # dsv3-kernels
//!
//! Every kernel family of the DeepSeek-V3 engine, each in its own module with
//!
//! * a **reference** (`reference` submodule): plain loops that read like the model spec, no
//!   performance intent; the oracle for every other implementation;
//! * a **fast** CPU implementation (the module's top-level functions): multi-threaded
//!   (rayon), cache-blocked, written so the compiler vectorises it, with run-time dispatch to
//!   AVX2/FMA where the CPU has them ([`cpu`]).
//!
//! Shapes travel in small `Copy` structs that are validated before any work starts; a wrong
//! length gives a [`KernelError`], never a panic. The op-level [`backend::Backend`] trait is
//! what model crates call; [`backend::Cpu`] implements it with the fast functions.
//!
//! This is the only crate of the workspace with `unsafe` code, each block with a `// SAFETY:`
//! comment. `docs/model.md` (in the repository) states every formula the kernels compute;
//! `README.md` has a complete example and `examples/` runnable programs.
//!
//! ```
//! use dsv3_kernels::prelude::*;
//!
//! // An FP8 weight [n, k] (128x128 block scales) times an activation [m, k], on both paths.
//! let (m, n, k) = (2, 4, 256);
//! let w = Fp8Weight::quantize(n, k, &(0..n * k).map(|i| ((i % 13) as f32 - 6.0) / 8.0).collect::<Vec<_>>())?;
//! let a: Vec<f32> = (0..m * k).map(|i| ((i % 5) as f32 - 2.0) / 4.0).collect();
//! let (mut exact, mut fp8) = (vec![0f32; m * n], vec![0f32; m * n]);
//! gemm(&a, w.view(), GemmShape { m, n, k }, GemmPath::Reference, &mut exact)?;
//! gemm(&a, w.view(), GemmShape { m, n, k }, GemmPath::Fp8, &mut fp8)?;
//! assert!(calc_diff(&exact, &fp8) < 1e-3);
//! # Ok::<(), KernelError>(())
//! ```

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_debug_implementations)]
// Kernels index several arrays in lock-step on purpose: it is the form that vectorises.
#![allow(clippy::needless_range_loop)]

pub mod cpu;
pub mod error;
pub mod machine;
pub mod mmap;
mod simd;

#[cfg(feature = "mimalloc")]
pub mod alloc;
pub mod bf16_gemm;
pub mod fp8;
pub mod gemm;
mod gemm_fmt;

pub mod act;
pub mod embed;
pub mod norm;
pub mod rope;

pub mod attention;
pub mod backend;

pub mod a2a;
pub mod cuda;
pub mod gating;
pub mod permute;
pub mod sample;
pub mod workspace;

/// The old name of [`bf16_gemm`], kept while branches written against it land; use
/// `bf16_gemm` ("dense" also named the non-MoE layers and the non-grouped GEMM).
#[doc(hidden)]
pub use bf16_gemm as dense;

/// The `half` crate, whose `bf16` the bf16 weights and buffers use.
pub use half;

pub use backend::{Backend, Cpu, DeviceStats};
pub use cuda::Cuda;
pub use error::{KernelError, Result};

/// What most users of the kernels need, in one import: the backends, the error type, the
/// weight types and shapes, and the free functions of the main families (on slices, CPU).
pub mod prelude {
    pub use crate::attention::{DecodeParams, LatentPool, MlaDims, PrefillInputs, PrefillParams};
    pub use crate::backend::{Backend, Cpu, Elem};
    pub use crate::bf16_gemm::{Bf16Weight, Bf16WeightRef, gemm_bf16};
    pub use crate::cuda::Cuda;
    pub use crate::error::{KernelError, Result};
    pub use crate::fp8::{ActQuantShape, Fp8Weight, Fp8WeightRef, ScaleFmt, act_quant, calc_diff};
    pub use crate::gating::{RouteCfg, RouteMethod, route};
    pub use crate::gemm::{GemmPath, GemmShape, gemm, gemm_fp8_quantized};
    pub use crate::norm::{RowsShape, rms_norm};
    pub use crate::rope::{RopeCfg, Yarn};
    pub use crate::sample::{Dist, SampleParams, SampleShape};
    pub use half::bf16;
}

/// The example of `README.md`, run as a doctest so that it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
