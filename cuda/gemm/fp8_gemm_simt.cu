// The always-available FP8 GEMM (gemm::reference::gemm_fp8): out[M, N] = a · wᵀ on e4m3
// codes with 1x128 activation scales and 128x128 weight scales. Plain SIMT: a 64x64 output
// tile per block of 256 threads, each thread 4x4 outputs; K in 32-wide chunks through shared
// memory, decoded to f32. Each 128-block partial sum is accumulated in k order (products of
// two e4m3 values are exact in f32, so the FMA rounds like the CPU's multiply-then-add) and
// promoted into the f32 total as total + (block * a_scale) * w_scale: bit-exact with the
// CPU reference. The Hopper-speed GEMM (wgmma, TMA) is its own kernel.
//
// dsv3_gemm_fp8_simt_grouped is the same tile for MoE experts (gemm::grouped_contiguous and
// grouped_masked): block row y is tile `tiles[y]`, rows row0..row0+rows of `a` and `out`
// against the weight of expert `tiles[y].expert` (from the experts table, or entry `expert` of
// a weight stack); with `n_tiles` (a tile list built on the device) rows y >= *n_tiles exit.
#include "dsv3/common.cuh"
#include "dsv3/params.h"

namespace {
constexpr int BM = 64, BN = 64, BK = 32, THREADS = 256;

// Decodes 8 codes of row `row` (cols c..c+8 of the chunk) into shared memory; rows at or past
// `row_end` read as zeros.
__device__ __forceinline__ void load_chunk(float (*dst)[BK + 1], const uint8_t* src, uint32_t row_end, uint32_t k,
                                           uint32_t row0, uint32_t k0) {
  const uint32_t r = threadIdx.x / 4, c = (threadIdx.x % 4) * 8;
  uint2 v = make_uint2(0, 0);
  if (row0 + r < row_end) v = *reinterpret_cast<const uint2*>(src + (size_t)(row0 + r) * k + k0 + c);
#pragma unroll
  for (int b = 0; b < 8; ++b) dst[r][c + b] = dsv3::decode_e4m3((uint8_t)((b < 4 ? v.x : v.y) >> (8 * (b % 4))));
}

// One 64x64 tile: output rows m0..min(m0 + 64, m_end), columns n0..min(n0 + 64, n).
__device__ __forceinline__ void fp8_tile(const uint8_t* a, const float* a_s, const uint8_t* w, const float* w_s, float* out,
                                         uint32_t m0, uint32_t m_end, uint32_t n0, uint32_t n, uint32_t k) {
  __shared__ float as[BM][BK + 1], ws[BN][BK + 1];
  const uint32_t ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const uint32_t kbn = k / 128;
  float total[4][4] = {};
  for (uint32_t kb = 0; kb < kbn; ++kb) {
    float block[4][4] = {};
    for (uint32_t k0 = kb * 128; k0 < (kb + 1) * 128; k0 += BK) {
      load_chunk(as, a, m_end, k, m0, k0);
      load_chunk(ws, w, n, k, n0, k0);
      __syncthreads();
#pragma unroll 4
      for (int kk = 0; kk < BK; ++kk) {
        float av[4], wv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = as[ty + 16 * i][kk];
#pragma unroll
        for (int j = 0; j < 4; ++j) wv[j] = ws[tx + 16 * j][kk];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) block[i][j] = fmaf(av[i], wv[j], block[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t m = m0 + ty + 16 * i;
      const float sa = m < m_end ? a_s[(size_t)m * kbn + kb] : 0.0f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t nn = n0 + tx + 16 * j;
        const float sw = nn < n ? w_s[(size_t)(nn / 128) * kbn + kb] : 0.0f;
        total[i][j] = dsv3::add_rn(total[i][j], dsv3::mul_rn(dsv3::mul_rn(block[i][j], sa), sw));
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t m = m0 + ty + 16 * i, nn = n0 + tx + 16 * j;
      if (m < m_end && nn < n) out[(size_t)m * n + nn] = total[i][j];
    }
}
}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS) dsv3_gemm_fp8_simt(const dsv3_gemm_fp8_simt_params p) {
  fp8_tile(p.a, p.a_s, p.w, p.w_s, p.out, blockIdx.y * BM, p.m, blockIdx.x * BN, p.n, p.k);
}

extern "C" __global__ void __launch_bounds__(THREADS) dsv3_gemm_fp8_simt_grouped(const dsv3_gemm_fp8_simt_grouped_params p) {
  if (p.n_tiles != nullptr && blockIdx.y >= *p.n_tiles) return;  // the whole block: a device-built tile list
  const dsv3_gemm_tile t = p.tiles[blockIdx.y];
  const uint8_t* w;
  const float* w_s;
  if (p.experts != nullptr) {
    w = p.experts[t.expert].w;
    w_s = p.experts[t.expert].w_s;
  } else {
    w = p.stack_w + (size_t)t.expert * p.n * p.k;
    w_s = p.stack_s + (size_t)t.expert * ((p.n + 127) / 128) * ((p.k + 127) / 128);
  }
  fp8_tile(p.a, p.a_s, w, w_s, p.out, t.row0, t.row0 + t.rows, blockIdx.x * BN, p.n, p.k);
}
