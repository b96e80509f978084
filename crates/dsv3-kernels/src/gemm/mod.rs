//! GEMM against block-scaled FP8 weights: `out[M, N] = a[M, K] · W[N, K]ᵀ` (docs/model.md §4),
//! on one weight or grouped (MoE experts, in the two layouts DeepGEMM uses).
//!
//! Two numeric paths, chosen at run time ([`GemmPath`]):
//! * **Reference**: the exact dequantised weight (fp8 × scale_inv) against f32 activations,
//!   f32 accumulation. The weight stays FP8 in memory; the fast kernel decodes it per 128-wide
//!   block into L1 and applies the block scale to each block's partial sum.
//! * **Fp8**: activations quantised per 1x128 tile (scale = amax/448), FP8 × FP8 products
//!   accumulated in f32 within each 128-wide block, the block sum scaled by
//!   `a_scale[m, kb] · w_scale[n/128, kb]` and promoted into an f32 total (DeepGEMM's scheme).
//!   `K` must be a multiple of 128.
//!
//! Grouped layouts: **contiguous** (prefill; expert `e` owns rows `offsets[e]..offsets[e+1]` of
//! one `[rows, K]` activation) and **masked** (decode; `[E, capacity, K]` with a row count per
//! expert; rows past the count are written as zeros).
//!
//! # Batch invariance
//!
//! Each output row of the fast kernels is a function of its own activation row and the weight
//! only: the same bits whatever the number of rows in the call, the other rows, or (grouped)
//! how many rows the other experts and the row's own expert have. Continuous batching relies
//! on it: a request decoded in a batch gets the bits it gets alone (`tests/invariance.rs`).
//! At a given ISA level (see [`crate::cpu::isa_level`]) the matrix-vector kernels, which jobs
//! of a few rows run, and the tile kernels, which larger jobs run, compute every output in
//! one order: per 128-block, one partial sum per K residue (16 at AVX-512, 8 at AVX2), each a
//! chain of fused multiply-adds in K order, promoted into its own total with the same factor
//! (`promotion`); then the totals are added in one fixed order. The matrix-vector kernels
//! and the AVX-512 row-tile kernel (jobs of 9 to 63 rows) keep the residues in the lanes of a
//! vector; the AVX-512 outer-product tile kernel (64 rows or more, and ragged K) keeps 16
//! activation rows in the lanes and takes the residues one after another (see `avx512.rs`).
//! The portable kernel has a single path. Different ISA levels may differ from each other in
//! the last bits.
//!
//! # Files
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | shapes, paths and the checks every GEMM runs (CPU and CUDA alike) |
//! | `reference.rs` | plain loops: the oracles |
//! | `cpu.rs` | the fast CPU drivers: activation preparation, jobs, tiles in parallel |
//! | `tile.rs` | one output tile over all of K (portable body, ISA dispatch) |
//! | `avx2.rs`, `avx512.rs` | the tile and matrix-vector kernels in intrinsics |

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod cpu;
pub mod reference;
mod tile;

pub use cpu::{gemm, gemm_fp8_quantized, grouped_contiguous, grouped_contiguous_pair, grouped_masked};

use crate::error::{Result, check_len, checked_mul, invalid, shape_err};
use crate::fp8::{BLOCK, Fp8WeightRef};

/// Every `(N, K)` of DeepSeek-V3's FP8 linears: DeepGEMM's six (q_a + kv_a and gate + up
/// fused), then the unfused projections as the checkpoint stores them and the model multiplies
/// by them (q_a, kv_a, expert and shared gate / up, the dense layers' gate / up and down).
/// Tests and benchmarks run over this list; the CUDA backend has an sm90 instantiation for each.
pub const V3_SHAPES: &[(usize, usize)] = &[
    (2112, 7168),
    (24576, 1536),
    (32768, 512),
    (7168, 16384),
    (4096, 7168),
    (7168, 2048),
    (1536, 7168),
    (576, 7168),
    (2048, 7168),
    (18432, 7168),
    (7168, 18432),
];

/// `out[m, n] = Σ_k a[m, k] · w[n, k]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// Which numeric path a GEMM takes (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GemmPath {
    #[default]
    Reference,
    Fp8,
}

impl std::str::FromStr for GemmPath {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "reference" => Ok(GemmPath::Reference),
            "fp8" => Ok(GemmPath::Fp8),
            _ => Err(format!("unknown GEMM path `{s}` (expected `reference` or `fp8`)")),
        }
    }
}

impl GemmShape {
    pub(crate) fn validate(&self, op: &'static str, path: GemmPath, a: usize, w: &Fp8WeightRef<'_>, out: usize) -> Result<()> {
        self.check(op, path, a, (w.rows(), w.cols()), out)
    }

    /// The checks of every GEMM on a weight of shape `w = (rows, cols)` (CPU and CUDA alike).
    pub(crate) fn check(&self, op: &'static str, path: GemmPath, a: usize, w: (usize, usize), out: usize) -> Result<()> {
        if w.0 != self.n || w.1 != self.k {
            return Err(shape_err(op, format!("weight is [{}, {}], shape wants [n={}, k={}]", w.0, w.1, self.n, self.k)));
        }
        if path == GemmPath::Fp8 && !self.k.is_multiple_of(BLOCK) {
            return Err(shape_err(op, format!("the fp8 path needs k % 128 == 0, got k = {}", self.k)));
        }
        check_len(op, "a", a, checked_mul(op, "a", self.m, self.k)?)?;
        check_len(op, "out", out, checked_mul(op, "out", self.m, self.n)?)
    }
}

/// The common (n, k) of a grouped GEMM, validated (CPU and CUDA alike: the checks take the
/// experts' weight shapes `(rows, cols)`).
pub(crate) struct GroupedShape {
    pub n: usize,
    pub k: usize,
}

/// `(rows, cols)` of each weight.
pub(super) fn shapes(w: &[Fp8WeightRef<'_>]) -> Vec<(usize, usize)> {
    w.iter().map(|x| (x.rows(), x.cols())).collect()
}

impl GroupedShape {
    fn common(op: &'static str, w: &[(usize, usize)]) -> Result<GroupedShape> {
        let &(n, k) = w.first().ok_or_else(|| shape_err(op, "no experts"))?;
        if let Some(e) = w.iter().position(|x| x.0 != n || x.1 != k) {
            return Err(shape_err(op, format!("expert {e} weight is [{}, {}], expert 0 is [{n}, {k}]", w[e].0, w[e].1)));
        }
        Ok(GroupedShape { n, k })
    }

    pub(crate) fn contiguous(op: &'static str, a: usize, offsets: &[u32], w: &[(usize, usize)], out: usize) -> Result<GroupedShape> {
        let g = Self::common(op, w)?;
        check_len(op, "offsets", offsets.len(), w.len() + 1)?;
        if offsets[0] != 0 || offsets.windows(2).any(|p| p[1] < p[0]) {
            return Err(invalid(op, "offsets", "must start at 0 and never decrease"));
        }
        let rows = offsets[w.len()] as usize;
        check_len(op, "a", a, checked_mul(op, "a", rows, g.k)?)?;
        check_len(op, "out", out, checked_mul(op, "out", rows, g.n)?)?;
        Ok(g)
    }

    pub(crate) fn masked(op: &'static str, a: usize, counts: &[u32], cap: usize, w: &[(usize, usize)], out: usize) -> Result<GroupedShape> {
        let g = Self::common(op, w)?;
        check_len(op, "counts", counts.len(), w.len())?;
        if let Some(e) = counts.iter().position(|&c| c as usize > cap) {
            return Err(invalid(op, "counts", format!("expert {e} has {} rows, capacity is {cap}", counts[e])));
        }
        let rows = checked_mul(op, "a", w.len(), cap)?;
        check_len(op, "a", a, checked_mul(op, "a", rows, g.k)?)?;
        check_len(op, "out", out, checked_mul(op, "out", rows, g.n)?)?;
        Ok(g)
    }
}
