//! `sm90_fp8_gemm`: the FP8 block-scaled GEMM at Hopper speed (TMA, wgmma, warp-specialised
//! persistent kernel; `cuda/include/dsv3/sm90_fp8_gemm.cuh`), single and grouped, with the
//! simple kernel (`dsv3_gemm_fp8_simt`) as the fallback for every shape it was not built for.
//!
//! Math (`docs/model.md`, "FP8"; DeepGEMM's scheme): `out[r, n] = Σ_kb (Σ_{k∈kb} A[r,k]·B[n,k]) ·
//! a_s[r, kb] · b_s[n/128, kb]` on e4m3 codes, A quantised per 1x128 tile
//! ([`CudaDevice::act_quant_1x128`]), B a block-scaled weight; f32 totals, written as f32 or
//! bf16. It equals [`crate::gemm::reference::gemm_fp8`] up to the summation order inside each
//! 128-wide block and the FMA in the promotion (the fallback is bit-exact).
//!
//! Names match at every layer: kernels `dsv3_sm90_fp8_gemm_n{N}_k{K}_bm{BM}` (the generated
//! `Kernel::Sm90Fp8GemmN..K..Bm..`), parameters `dsv3_sm90_fp8_gemm_params` /
//! [`Sm90Fp8GemmParams`], wrapper [`CudaDevice::sm90_fp8_gemm`].
//!
//! Routing ([`plan`], deterministic, host only): the (N, K) pairs of DeepSeek-V3 have
//! shape-specialised instantiations ([`SM90_KERNELS`], the one list of them: build.rs
//! generates their CUDA sources from it); block M is 64 when no group has more
//! than 64 rows, else 128. Anything else — another (N, K), more than [`SM90_MAX_GROUPS`]
//! groups, rows past the TMA's 32-bit coordinates, a buffer address that is not 16-byte
//! aligned — takes the simple kernel instead (per group for grouped layouts), so every shape
//! that validates gets the right answer. The route taken is returned.
//!
//! Grouped layouts take their row counts as host slices (the same ones the CPU functions take)
//! and pass them to the kernel inside its parameter struct: no upload, no allocation per call.
//!
//! The backend ([`crate::Cuda`]) runs its fp8-path GEMMs here ([`gemm_route`] decides, on the
//! host): `Backend::gemm` and the grouped GEMMs quantise the activation per 1x128 tile and take
//! the TMA kernel when [`plan`] has one for the shape and the weights are one consecutive run
//! of entries of one [`DeviceFp8Stack`], and the simple kernels otherwise; the Reference path
//! always takes the simple dequantising kernel. A backend weight ([`super::DeviceFp8Weight`])
//! is an entry of a stack: a weight uploaded alone is a stack of one, a MoE layer's experts of
//! one projection are one stack ([`CudaDevice::upload_fp8_experts`], `Backend::upload_weights`),
//! so both kernel families read the same device memory and no weight is held twice.
//!
//! # Files
//!
//! | file | what |
//! |---|---|
//! | `catalog.rs` | [`SM90_KERNELS`] and the generators of their sources (shared with build.rs) |
//! | `plan.rs` | the router: layouts, validation, the route of a call ([`plan`], [`gemm_route`]) |
//! | `stack.rs` | [`DeviceFp8Stack`], the device memory of every FP8 weight |
//! | `launch.rs` | [`CudaDevice::sm90_fp8_gemm`], the kernel parameters, the TMA and fallback launches |
//! | `timing.rs` | what the GPU benchmark times with |
//! | `stub.rs` | the same private API without the `cuda` feature (no device can exist) |

/// The sm90 FP8 GEMM instantiations: **the one list of them** ([`SM90_KERNELS`]). `build.rs`
/// includes this file and generates from it, at build time, the `.cu` source of every (N, K)
/// ([`catalog::cuda_source`]) and the wgmma wrappers for the tile widths in use
/// ([`catalog::wgmma_header`]); the router picks from the same list and finds each kernel by
/// its symbol. To add a shape, add its two lines (block M 64 and 128) and a note.
pub mod catalog;
mod launch;
mod plan;
mod stack;
#[cfg(not(feature = "cuda"))]
mod stub;
mod timing;

pub use catalog::{SM90_KERNELS, Sm90Kernel};
pub use launch::{Sm90Fp8GemmCastBf16Params, Sm90Fp8GemmParams};
pub(super) use plan::{Fp8Route, fp8_route};
pub use plan::{GemmRoute, SM90_MAX_GROUPS, Sm90Fallback, Sm90Layout, Sm90Plan, Sm90Route, gemm_route, plan};
pub(super) use stack::StackRange;
pub use stack::{DeviceFp8Stack, Sm90Out};

// For the intra-doc links above.
#[allow(unused_imports)]
use super::CudaDevice;
