// The always-available FP8 GEMM (gemm::reference::gemm_fp8): out[M, N] = a · wᵀ on e4m3
// codes with 1x128 activation scales and 128x128 weight scales. Plain SIMT: a 64x64 output
// tile per block of 256 threads, each thread 4x4 outputs; K in 32-wide chunks through shared
// memory, decoded to f32. Each 128-block partial sum is accumulated in k order (products of
// two e4m3 values are exact in f32, so the FMA rounds like the CPU's multiply-then-add) and
// promoted into the f32 total as total + (block * a_scale) * w_scale: bit-exact with the
// CPU reference. The Hopper-speed GEMM (wgmma, TMA) is its own kernel.
#include "dsv3/common.cuh"
#include "dsv3/params.h"

namespace {
constexpr int BM = 64, BN = 64, BK = 32, THREADS = 256;

// Decodes 8 codes of row `row` (cols c..c+8 of the chunk) into shared memory; rows past the
// matrix read as zeros.
__device__ __forceinline__ void load_chunk(float (*dst)[BK + 1], const uint8_t* src, uint32_t rows, uint32_t k,
                                           uint32_t row0, uint32_t k0) {
  const uint32_t r = threadIdx.x / 4, c = (threadIdx.x % 4) * 8;
  uint2 v = make_uint2(0, 0);
  if (row0 + r < rows) v = *reinterpret_cast<const uint2*>(src + (size_t)(row0 + r) * k + k0 + c);
#pragma unroll
  for (int b = 0; b < 8; ++b) dst[r][c + b] = dsv3::decode_e4m3((uint8_t)((b < 4 ? v.x : v.y) >> (8 * (b % 4))));
}
}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS) dsv3_gemm_fp8_simt(const dsv3_gemm_fp8_simt_params p) {
  __shared__ float as[BM][BK + 1], ws[BN][BK + 1];
  const uint32_t m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  const uint32_t ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const uint32_t kbn = p.k / 128;
  float total[4][4] = {};
  for (uint32_t kb = 0; kb < kbn; ++kb) {
    float block[4][4] = {};
    for (uint32_t k0 = kb * 128; k0 < (kb + 1) * 128; k0 += BK) {
      load_chunk(as, p.a, p.m, p.k, m0, k0);
      load_chunk(ws, p.w, p.n, p.k, n0, k0);
      __syncthreads();
#pragma unroll 4
      for (int kk = 0; kk < BK; ++kk) {
        float a[4], w[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = as[ty + 16 * i][kk];
#pragma unroll
        for (int j = 0; j < 4; ++j) w[j] = ws[tx + 16 * j][kk];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) block[i][j] = fmaf(a[i], w[j], block[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t m = m0 + ty + 16 * i;
      const float sa = m < p.m ? p.a_s[(size_t)m * kbn + kb] : 0.0f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t n = n0 + tx + 16 * j;
        const float sw = n < p.n ? p.w_s[(size_t)(n / 128) * kbn + kb] : 0.0f;
        total[i][j] = dsv3::add_rn(total[i][j], dsv3::mul_rn(dsv3::mul_rn(block[i][j], sa), sw));
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
      if (m < p.m && n < p.n) p.out[(size_t)m * p.n + n] = total[i][j];
    }
}
