// The Hopper FP8 block-scaled GEMM (DeepSeek-V3's fp8 path at tensor-core speed), as one
// template that cuda/gemm/sm90_fp8_gemm_*.cu instantiate per (N, K, BM, BN):
//
//   out[r, n] = sum_kb ( sum_{k in block kb} A[r, k] B[n, k] ) a_s[r, kb] b_s[n / 128, kb]
//
// A [rows, K] e4m3 activations with 1x128 f32 scales, B [N, K] e4m3 weights with 128x128 f32
// scales (scale_inv), K-major both, output f32 or bf16; dense, or grouped (MoE experts) in
// the contiguous or the masked layout (dsv3/sm90_fp8_gemm.h).
//
// Structure (one CTA per SM, persistent):
// * warpgroup BM/64 (the last one) is the producer: one thread walks the CTA's tiles and, for
//   every 128-wide K block, waits until a pipeline stage is free (`empty` mbarrier), then TMA-
//   loads the A tile [BM x 128] and the B tile [BN x 128] into it with 128-byte swizzle, both
//   completing on the stage's `full` mbarrier (expect-tx bytes).
// * warpgroups 0 .. BM/64-1 are consumers, 64 rows each: per K block they wait on `full`,
//   issue four wgmma m64nBNk32 (e4m3 x e4m3 -> f32, operands straight from shared memory by
//   descriptor, the first one overwriting the block accumulator), wait for them, free the stage,
//   and promote the block's partial sums into the f32 totals on CUDA cores, scaled by
//   a_s[row, kb] * b_s[col / 128, kb] (the DeepSeek-V3 report's fix for FP8 accumulation
//   precision: no tensor-core accumulation spans more than 128 of K). While one consumer
//   promotes, the other's wgmma keeps the tensor cores busy.
// * tiles are numbered group by group; within a group, GROUP_N column blocks form a band that
//   is walked row block by row block, so that the CTAs of one wave share A rows and B columns
//   in L2. CTA c takes tiles c, c + gridDim.x, ...; producer and consumers walk the same list.
// * the epilogue stores the totals straight from registers (8-byte f32 pairs or 4-byte bf16
//   pairs per thread and row; every row a thread writes is a run of whole 32-byte sectors
//   per warp for f32).
// Masked layout: tiles past a group's count hold no data; the producer skips them and the
// consumers store zeros there (as gemm::grouped_masked), so the output is fully defined.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

#include "dsv3/sm90_fp8_gemm.h"
// Generated at build time by build.rs from SM90_KERNELS (src/cuda/sm90_gemm/catalog.rs).
#include "dsv3/sm90_wgmma_fp8.cuh"

namespace dsv3 {
namespace sm90 {

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
// Waits until the phase with parity `parity` has completed (the phase before the current one
// counts as completed, which is how a fresh `empty` barrier reads as free).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

// 2-D TMA load of the box at (c0 = inner, c1 = outer) into shared memory, completing on `bar`.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const dsv3_tma_map* map, uint32_t bar, int32_t c0, int32_t c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}
__device__ __forceinline__ void tma_prefetch(const dsv3_tma_map* map) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }
// Keeps the compiler from moving accumulator reads or writes across the asynchronous wgmma.
__device__ __forceinline__ void fence_reg(float& r) { asm volatile("" : "+f"(r)::"memory"); }

template <uint32_t R>
__device__ __forceinline__ void regs_dealloc() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(R));
}
template <uint32_t R>
__device__ __forceinline__ void regs_alloc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(R));
}

// Shared-memory matrix descriptor of a K-major tile whose rows are 128 bytes (128 e4m3 of one
// K block), written by TMA with 128-byte swizzle: start address, leading byte offset unused by
// swizzled K-major layouts (1), stride byte offset 1024 (8 rows of 128 bytes), layout 1 =
// 128-byte swizzle. The tile must start on a 1024-byte boundary; the k-th 32-wide slice is the
// same descriptor with the start advanced by 32 k bytes (+2 k in 16-byte units).
__device__ __forceinline__ uint64_t desc_k_sw128(uint32_t addr) {
  return (uint64_t)((addr & 0x3FFFFu) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) | ((uint64_t)1 << 62);
}

__device__ __forceinline__ float ldg_f32(const float* p) { return __ldg(p); }

// One output tile as the scheduler hands it out.
struct Tile {
  uint32_t group;
  uint32_t a_row;       // first row of the tile in A, a_s and out
  uint32_t b_row;       // first row of the tile in B (group * N + n0)
  uint32_t n0;          // first column within the group's N
  uint32_t store_rows;  // rows of the tile that belong to the group (written)
  uint32_t data_rows;   // of those, rows that hold data (the rest are written as zeros)
};

template <uint32_t N, uint32_t BM, uint32_t BN, uint32_t GROUP_N>
struct Scheduler {
  static constexpr uint32_t NBLK = (N + BN - 1) / BN;
  const dsv3_sm90_fp8_gemm_params& p;
  uint32_t g = 0;

  __device__ __forceinline__ explicit Scheduler(const dsv3_sm90_fp8_gemm_params& params) : p(params) {}

  // Tile t; calls must come in increasing t.
  __device__ __forceinline__ Tile get(uint32_t t) {
    while (t >= p.tile0[g + 1]) ++g;
    uint32_t row0, rows, data;
    if (p.masked) {
      row0 = g * p.capacity;
      rows = p.capacity;
      data = min(p.rows[g], p.capacity);
    } else {
      row0 = p.rows[g];
      rows = p.rows[g + 1] - row0;
      data = rows;
    }
    const uint32_t mblk = (rows + BM - 1) / BM;
    const uint32_t local = t - p.tile0[g];
    const uint32_t band_tiles = mblk * GROUP_N;
    const uint32_t band = local / band_tiles, in_band = local % band_tiles;
    const uint32_t first_n = band * GROUP_N;
    const uint32_t band_n = min(GROUP_N, NBLK - first_n);
    const uint32_t m_blk = in_band / band_n, n_blk = first_n + in_band % band_n;
    Tile tile;
    tile.group = g;
    tile.a_row = row0 + m_blk * BM;
    tile.n0 = n_blk * BN;
    tile.b_row = g * N + tile.n0;
    tile.store_rows = min(BM, rows - m_blk * BM);
    tile.data_rows = data > m_blk * BM ? min(BM, data - m_blk * BM) : 0;
    return tile;
  }
};

__device__ __forceinline__ void store_pair(const dsv3_sm90_fp8_gemm_params& p, uint32_t n, size_t row, uint32_t col, float x,
                                           float y) {
  if (p.out_bf16) {
    reinterpret_cast<__nv_bfloat162*>(p.out)[(row * n + col) / 2] = __floats2bfloat162_rn(x, y);
  } else {
    reinterpret_cast<float2*>(p.out)[(row * n + col) / 2] = make_float2(x, y);
  }
}

template <uint32_t N, uint32_t K, uint32_t BM, uint32_t BN, uint32_t STAGES>
__device__ __forceinline__ void fp8_gemm(const dsv3_sm90_fp8_gemm_params& p) {
  constexpr uint32_t BK = 128, KB = K / BK, NB128 = (N + 127) / 128;
  constexpr uint32_t CONSUMERS = BM / 64;
  constexpr uint32_t A_BYTES = BM * BK, B_BYTES = BN * BK;
  constexpr uint32_t GROUP_N = K >= 8192 ? 8 : 16;
  // Every tile's columns lie in at most two 128-wide scale blocks: n0 % 128 is a multiple of
  // gcd(BN, 128), at most 128 - gcd, and that plus BN must not pass 256.
  constexpr uint32_t GCD = (BN & 127) == 0 ? 128 : ((BN & 63) == 0 ? 64 : ((BN & 31) == 0 ? 32 : ((BN & 15) == 0 ? 16 : 8)));
  constexpr bool ONE_SCALE_BLOCK = 128 % BN == 0;  // every tile inside one block
  static_assert(K % BK == 0 && N % 8 == 0 && BN % 8 == 0 && BN <= 256, "shape");
  static_assert(BM == 64 || BM == 128, "block M");
  static_assert(128 - GCD + BN <= 256, "a tile would span three scale blocks");
  static_assert(A_BYTES % 1024 == 0 && B_BYTES % 1024 == 0, "swizzled tiles must stay 1024-byte aligned");
  using Mma = Wgmma<BN>;
  constexpr int ACC = Mma::kAcc;

  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  const uint32_t sa = base, sb = base + STAGES * A_BYTES, bars = sb + STAGES * B_BYTES;
  uint32_t dyn_smem;
  asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn_smem));
  if (bars + 16 * STAGES - raw > dyn_smem) __trap();  // the host's smem size is out of step
  auto full = [&](uint32_t s) { return bars + 8 * s; };
  auto empty = [&](uint32_t s) { return bars + 8 * (STAGES + s); };

  if (threadIdx.x == 0) {
    for (uint32_t s = 0; s < STAGES; ++s) {
      mbar_init(full(s), 1);
      mbar_init(empty(s), CONSUMERS * 4);  // lane 0 of every consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  }
  __syncthreads();

  Scheduler<N, BM, BN, GROUP_N> sched(p);
  const uint32_t wg = threadIdx.x / 128;
  if (wg == CONSUMERS) {
    // Producer warpgroup: one thread issues every TMA load.
    if constexpr (CONSUMERS == 2) regs_dealloc<40>();
    if (threadIdx.x != CONSUMERS * 128) return;
    tma_prefetch(&p.tma_a);
    tma_prefetch(&p.tma_b);
    uint32_t stage = 0, phase = 0;
    for (uint32_t t = blockIdx.x; t < p.tiles; t += gridDim.x) {
      const Tile tile = sched.get(t);
      if (tile.data_rows == 0) continue;
      for (uint32_t kb = 0; kb < KB; ++kb) {
        mbar_wait(empty(stage), phase ^ 1);
        mbar_arrive_expect_tx(full(stage), A_BYTES + B_BYTES);
        tma_load_2d(sa + stage * A_BYTES, &p.tma_a, full(stage), (int32_t)(kb * BK), (int32_t)tile.a_row);
        tma_load_2d(sb + stage * B_BYTES, &p.tma_b, full(stage), (int32_t)(kb * BK), (int32_t)tile.b_row);
        if (++stage == STAGES) {
          stage = 0;
          phase ^= 1;
        }
      }
    }
    return;
  }

  // Consumer warpgroups.
  if constexpr (CONSUMERS == 2) regs_alloc<232>();
  const uint32_t lane = threadIdx.x % 32, warp = (threadIdx.x % 128) / 32;
  const uint32_t r0 = wg * 64 + warp * 16 + lane / 4, r1 = r0 + 8;  // rows of the tile
  const uint32_t c_lane = 2 * (lane % 4);                            // + 8 j: columns of the tile
  float acc[ACC], total[ACC];
#pragma unroll
  for (int i = 0; i < ACC; ++i) acc[i] = 0.0f;
  uint32_t stage = 0, phase = 0;

  for (uint32_t t = blockIdx.x; t < p.tiles; t += gridDim.x) {
    const Tile tile = sched.get(t);
#pragma unroll
    for (int i = 0; i < ACC; ++i) total[i] = 0.0f;
    if (tile.data_rows > 0) {
      // Scale sources: this thread's two rows (rows without data use 0), and the tile's one
      // or two weight scale blocks (a block past N, never stored, is clamped into range).
      const bool v0 = r0 < tile.data_rows, v1 = r1 < tile.data_rows;
      const float* as0 = p.a_s + (size_t)(tile.a_row + (v0 ? r0 : 0)) * KB;
      const float* as1 = p.a_s + (size_t)(tile.a_row + (v1 ? r1 : 0)) * KB;
      const uint32_t blk = tile.n0 / 128;
      const float* bs_lo = p.b_s + (size_t)(tile.group * NB128 + blk) * KB;
      const float* bs_hi = p.b_s + (size_t)(tile.group * NB128 + min(blk + 1, NB128 - 1)) * KB;
      const uint32_t boundary = 128 - tile.n0 % 128;  // first tile column in the second block
      float na0 = v0 ? ldg_f32(as0) : 0.0f, na1 = v1 ? ldg_f32(as1) : 0.0f;
      float nb_lo = ldg_f32(bs_lo), nb_hi = ONE_SCALE_BLOCK ? 0.0f : ldg_f32(bs_hi);

      for (uint32_t kb = 0; kb < KB; ++kb) {
        const float a0 = na0, a1 = na1, b_lo = nb_lo, b_hi = nb_hi;
        if (kb + 1 < KB) {  // the next block's scales load while this block's wgmma runs
          na0 = v0 ? ldg_f32(as0 + kb + 1) : 0.0f;
          na1 = v1 ? ldg_f32(as1 + kb + 1) : 0.0f;
          nb_lo = ldg_f32(bs_lo + kb + 1);
          if (!ONE_SCALE_BLOCK) nb_hi = ldg_f32(bs_hi + kb + 1);
        }
        mbar_wait(full(stage), phase);
#pragma unroll
        for (int i = 0; i < ACC; ++i) fence_reg(acc[i]);
        wgmma_fence();
        const uint64_t da = desc_k_sw128(sa + stage * A_BYTES + wg * 64 * BK);
        const uint64_t db = desc_k_sw128(sb + stage * B_BYTES);
#pragma unroll
        for (uint32_t k = 0; k < BK / 32; ++k) Mma::mma(acc, da + 2 * k, db + 2 * k, k);
        wgmma_commit();
        wgmma_wait_all();
#pragma unroll
        for (int i = 0; i < ACC; ++i) fence_reg(acc[i]);
        if (lane == 0) mbar_arrive(empty(stage));
        if (++stage == STAGES) {
          stage = 0;
          phase ^= 1;
        }
        // Promotion: total += block * a_s[row, kb] * b_s[col / 128, kb].
        const float s0_lo = a0 * b_lo, s1_lo = a1 * b_lo;
        const float s0_hi = a0 * b_hi, s1_hi = a1 * b_hi;
#pragma unroll
        for (int j = 0; j < ACC / 4; ++j) {
          const bool hi = !ONE_SCALE_BLOCK && 8u * j >= boundary;
          const float s0 = hi ? s0_hi : s0_lo, s1 = hi ? s1_hi : s1_lo;
          total[4 * j + 0] = fmaf(acc[4 * j + 0], s0, total[4 * j + 0]);
          total[4 * j + 1] = fmaf(acc[4 * j + 1], s0, total[4 * j + 1]);
          total[4 * j + 2] = fmaf(acc[4 * j + 2], s1, total[4 * j + 2]);
          total[4 * j + 3] = fmaf(acc[4 * j + 3], s1, total[4 * j + 3]);
        }
      }
    }
    // Epilogue: rows of the group get their totals, or zeros where the group has no data.
    const bool w0 = r0 < tile.store_rows, w1 = r1 < tile.store_rows;
    const bool d0 = r0 < tile.data_rows, d1 = r1 < tile.data_rows;
#pragma unroll
    for (int j = 0; j < ACC / 4; ++j) {
      const uint32_t col = tile.n0 + 8 * j + c_lane;
      if (col < N) {
        if (w0) store_pair(p, N, tile.a_row + r0, col, d0 ? total[4 * j] : 0.0f, d0 ? total[4 * j + 1] : 0.0f);
        if (w1) store_pair(p, N, tile.a_row + r1, col, d1 ? total[4 * j + 2] : 0.0f, d1 ? total[4 * j + 3] : 0.0f);
      }
    }
  }
}

}  // namespace sm90
}  // namespace dsv3
