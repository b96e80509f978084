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
//! comment.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_debug_implementations)]
// Kernels index several arrays in lock-step on purpose: it is the form that vectorises.
#![allow(clippy::needless_range_loop)]

pub mod cpu;
pub mod error;
pub mod machine;
pub mod mmap;
mod simd;

pub mod bf16_gemm;
pub mod fp8;
pub mod gemm;

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

/// The old name of [`bf16_gemm`], kept while branches written against it land; use
/// `bf16_gemm` ("dense" also named the non-MoE layers and the non-grouped GEMM).
#[doc(hidden)]
pub use bf16_gemm as dense;

pub use backend::{Backend, Cpu};
pub use cuda::Cuda;
pub use error::{KernelError, Result};
