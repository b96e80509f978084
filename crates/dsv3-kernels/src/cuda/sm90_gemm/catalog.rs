// The sm90 FP8 GEMM instantiations: **the one list of them** (`SM90_KERNELS`). Everything
// else is derived from it: `build.rs` includes this file and writes, at build time, the
// `.cu` source of every (N, K) (`cuda_source`) and the wgmma wrappers for the tile widths
// in use (`wgmma_header`), then compiles them with the hand-written kernels; the host
// router picks from the same list, and finds each entry point by its symbol. To add a shape,
// add its two lines (block M 64 and 128) and, for the comments of its source, a note.
//
// This file is plain Rust with no dependency (not even on the rest of this crate) and no
// inner attributes, so that the build script can `include!` it as it is; its module docs are
// on its declaration in `mod.rs`.

/// K per tile (one 128-wide scale block), as in `dsv3/sm90_fp8_gemm.cuh`.
const TILE_K: usize = 128;

/// One compiled instantiation: tile `block_m x block_n x 128`, `stages` pipeline stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sm90Kernel {
    pub n: usize,
    pub k: usize,
    pub block_m: usize,
    pub block_n: usize,
    pub stages: usize,
}

impl Sm90Kernel {
    /// One producer warpgroup and `block_m / 64` consumer warpgroups.
    pub const fn threads(&self) -> usize {
        128 * (self.block_m / 64 + 1)
    }
    /// Bytes of one pipeline stage: the A and B tiles and two mbarriers.
    pub const fn stage_bytes(&self) -> usize {
        (self.block_m + self.block_n) * TILE_K + 16
    }
    /// Dynamic shared memory the kernel needs: its stages, plus up to 1 KiB to align the
    /// swizzled tiles (the kernel checks it).
    pub const fn smem_bytes(&self) -> usize {
        1024 + self.stages * self.stage_bytes()
    }
    /// The kernel's symbol.
    pub fn symbol(&self) -> String {
        format!("dsv3_sm90_fp8_gemm_n{}_k{}_bm{}", self.n, self.k, self.block_m)
    }
    /// Column blocks of one group.
    pub const fn n_blocks(&self) -> usize {
        self.n.div_ceil(self.block_n)
    }
}

const fn kern(n: usize, k: usize, block_m: usize, block_n: usize, stages: usize) -> Sm90Kernel {
    Sm90Kernel { n, k, block_m, block_n, stages }
}

/// Every instantiation. Block N per shape minimises wave quantisation on 132 SMs at M = 4096
/// for block M 128 (q_a+kv_a 2112: 112, 0.91 of the last wave used; 24576 and 32768 and 4096:
/// 128; 7168: 160), and for block M 64 (decode) spreads the weight over as many SMs as
/// possible (2112 and 4096: 32 → 66 and 128 CTAs; 7168: 56 → 128 CTAs). Shared memory is at
/// most 227 KiB per block on H100/H200 (checked below, at compile time).
pub const SM90_KERNELS: &[Sm90Kernel] = &[
    kern(2112, 7168, 64, 32, 10),
    kern(2112, 7168, 128, 112, 7),
    kern(24576, 1536, 64, 64, 10),
    kern(24576, 1536, 128, 128, 7),
    kern(32768, 512, 64, 128, 9),
    kern(32768, 512, 128, 128, 7),
    kern(7168, 16384, 64, 56, 10),
    kern(7168, 16384, 128, 160, 6),
    kern(4096, 7168, 64, 32, 10),
    kern(4096, 7168, 128, 128, 7),
    kern(7168, 2048, 64, 56, 10),
    kern(7168, 2048, 128, 160, 6),
    // The unfused projections as the checkpoint stores them (what the model multiplies by):
    kern(2048, 7168, 64, 32, 10),
    kern(2048, 7168, 128, 128, 7),
    kern(1536, 7168, 64, 32, 10),
    kern(1536, 7168, 128, 128, 7),
    kern(576, 7168, 64, 32, 10),
    kern(576, 7168, 128, 64, 7),
    kern(18432, 7168, 64, 64, 10),
    kern(18432, 7168, 128, 128, 7),
    kern(7168, 18432, 64, 56, 10),
    kern(7168, 18432, 128, 160, 6),
];

/// What each (N, K) of [`SM90_KERNELS`] multiplies (the comment of its generated source).
pub const SM90_SHAPE_NOTES: &[(usize, usize, &str)] = &[
    (2112, 7168, "q_a_proj + kv_a_proj_with_mqa fused (1536 + 576 rows), K = hidden"),
    (24576, 1536, "q_b_proj: 128 heads x 192, K = q_lora_rank"),
    (32768, 512, "kv_b_proj: 128 heads x (128 + 128), K = kv_lora_rank"),
    (7168, 16384, "o_proj: K = 128 heads x 128"),
    (4096, 7168, "expert gate + up fused (2 x 2048), K = hidden"),
    (7168, 2048, "expert down_proj, K = moe_intermediate_size"),
    (2048, 7168, "expert and shared-expert gate / up as the checkpoint stores them (unfused), K = hidden"),
    (1536, 7168, "q_a_proj (unfused), K = hidden"),
    (576, 7168, "kv_a_proj_with_mqa (unfused), K = hidden"),
    (18432, 7168, "dense-layer gate / up (first_k_dense_replace layers), K = hidden"),
    (7168, 18432, "dense-layer down_proj, K = intermediate"),
];

/// Shared memory per block on H100 / H200 (227 KiB).
pub const SM90_MAX_SMEM: usize = 232_448;

const _: () = {
    let mut i = 0;
    while i < SM90_KERNELS.len() {
        let c = SM90_KERNELS[i];
        assert!(c.smem_bytes() <= SM90_MAX_SMEM, "an instantiation needs more than 227 KiB of shared memory");
        assert!(c.k.is_multiple_of(TILE_K) && (c.block_m == 64 || c.block_m == 128) && c.block_n.is_multiple_of(8) && c.block_n <= 256);
        i += 1;
    }
};

/// The distinct (N, K) of [`SM90_KERNELS`], in table order.
pub fn sm90_shapes() -> Vec<(usize, usize)> {
    let mut v: Vec<(usize, usize)> = Vec::new();
    for c in SM90_KERNELS {
        if !v.contains(&(c.n, c.k)) {
            v.push((c.n, c.k));
        }
    }
    v
}

/// The file name of the generated source of (N, K).
pub fn source_name(n: usize, k: usize) -> String {
    format!("sm90_fp8_gemm_n{n}_k{k}.cu")
}

/// The CUDA source that instantiates every kernel of (N, K) in [`SM90_KERNELS`]: one
/// `extern "C" __global__` entry point per kernel, named [`Sm90Kernel::symbol`], with
/// `__launch_bounds__(threads, 1)`, calling `dsv3::sm90::fp8_gemm<N, K, BM, BN, STAGES>`.
pub fn cuda_source(n: usize, k: usize) -> String {
    let note = SM90_SHAPE_NOTES.iter().find(|s| (s.0, s.1) == (n, k)).map_or("", |s| s.2);
    let mut s = format!(
        "// Generated at build time from SM90_KERNELS (crates/dsv3-kernels/src/cuda/sm90_gemm/catalog.rs);\n\
         // do not edit. sm90 FP8 GEMM for (N, K) = ({n}, {k}): {note}.\n\
         // The host picks block M 64 (one consumer warpgroup) for groups of <= 64 rows, else 128.\n\
         #include \"dsv3/sm90_fp8_gemm.cuh\"\n"
    );
    for c in SM90_KERNELS.iter().filter(|c| (c.n, c.k) == (n, k)) {
        s += &format!(
            "\n// block {} x {} x {TILE_K}, {} stages of {} bytes.\n\
             extern \"C\" __global__ void __launch_bounds__({}, 1)\n    \
             {}(const __grid_constant__ dsv3_sm90_fp8_gemm_params p) {{\n  \
             dsv3::sm90::fp8_gemm<{}, {}, {}, {}, {}>(p);\n}}\n",
            c.block_m,
            c.block_n,
            c.stages,
            c.stage_bytes(),
            c.threads(),
            c.symbol(),
            c.n,
            c.k,
            c.block_m,
            c.block_n,
            c.stages
        );
    }
    s
}

/// The tile widths (block N) of [`SM90_KERNELS`], ascending.
pub fn wgmma_widths() -> Vec<usize> {
    let mut w: Vec<usize> = SM90_KERNELS.iter().map(|c| c.block_n).collect();
    w.sort_unstable();
    w.dedup();
    w
}

/// `dsv3/sm90_wgmma_fp8.cuh`: one `wgmma.mma_async ... m64nNk32.f32.e4m3.e4m3` wrapper per
/// tile width N of [`SM90_KERNELS`]. The accumulator operand list of an N-wide wgmma has N/2
/// registers, numbered in the PTX string, so it is spelled out here rather than by hand.
pub fn wgmma_header() -> String {
    let mut s = String::from(
        "// Generated at build time from SM90_KERNELS (crates/dsv3-kernels/src/cuda/sm90_gemm/catalog.rs);\n\
         // do not edit.\n\
         //\n\
         // wgmma.mma_async m64nNk32, f32 accumulators += e4m3 (A, K-major in shared memory) x e4m3\n\
         // (B, K-major in shared memory), both operands through matrix descriptors. `accumulate` = 0\n\
         // overwrites d (scale-d false). Thread t of the warpgroup holds d[4j + {0,1,2,3}] =\n\
         // D[16 (t/32) + (t%32)/4 + {0,0,8,8}][8j + 2 (t%4) + {0,1,0,1}].\n\
         #pragma once\n\
         #include <stdint.h>\n\n\
         namespace dsv3 {\nnamespace sm90 {\n\ntemplate <int N>\nstruct Wgmma;\n",
    );
    for n in wgmma_widths() {
        let acc = n / 2;
        let regs: Vec<String> = (0..acc).map(|i| format!("%{i}")).collect();
        let outs: Vec<String> = (0..acc)
            .collect::<Vec<_>>()
            .chunks(8)
            .map(|r| r.iter().map(|i| format!("\"+f\"(d[{i}])")).collect::<Vec<_>>().join(", "))
            .collect();
        s += &format!(
            "\ntemplate <>\nstruct Wgmma<{n}> {{\n  static constexpr int kAcc = {acc};\n  \
             __device__ __forceinline__ static void mma(float* d, uint64_t a, uint64_t b, uint32_t accumulate) {{\n    \
             asm volatile(\n        \
             \"{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{p}, 0;\\n\"\n        \
             \"wgmma.mma_async.sync.aligned.m64n{n}k32.f32.e4m3.e4m3 {{{regs}}}, %{acc}, %{b}, p, 1, 1;\\n}}\\n\"\n        \
             : {outs}\n        \
             : \"l\"(a), \"l\"(b), \"r\"(accumulate));\n  }}\n}};\n",
            p = acc + 2,
            b = acc + 1,
            regs = regs.join(", "),
            outs = outs.join(",\n        "),
        );
    }
    s + "\n}  // namespace sm90\n}  // namespace dsv3\n"
}
