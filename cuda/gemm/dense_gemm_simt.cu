// The f32-activation GEMMs, plain SIMT, bit-exact with the plain-loop references:
//
// * dsv3_gemm_dequant_simt (gemm::reference::gemm_dequant, the Reference path on an FP8
//   weight): w[n, k] = decode(code) * scale_inv[n/128, k/128] rounded to f32, as
//   Fp8WeightRef::dequantize forms it;
// * dsv3_gemm_dequant_simt_grouped: the same for MoE experts (tile list, experts table or
//   weight stack, optional device tile count: as the grouped FP8 GEMM);
// * dsv3_gemm_bf16_simt (dense::reference::gemm_bf16, router / lm_head / MLA up-projections):
//   w = the bf16 value widened to f32, exact.
//
// out[m, n] = Σ_k a[m, k] · w[n, k], one product and one sum rounded per k, in k order from
// +0: exactly the reference's `acc += a * w`. A 64x64 output tile per block of 256 threads
// (4x4 per thread), K in 32-wide chunks through shared memory; any K.
#include "dsv3/common.cuh"
#include "dsv3/params.h"

namespace {
constexpr int BM = 64, BN = 64, BK = 32, THREADS = 256;

// The weight side: an FP8 weight with its block scales, or a bf16 weight.
struct Fp8W {
  const uint8_t* w;
  const float* w_s;
  uint32_t kbn;  // ceil(k / 128)
  __device__ __forceinline__ float at(uint32_t n, uint32_t k, uint32_t kk) const {
    return dsv3::mul_rn(dsv3::decode_e4m3(w[(size_t)n * k + kk]), w_s[(size_t)(n / 128) * kbn + kk / 128]);
  }
};
struct Bf16W {
  const uint16_t* w;
  __device__ __forceinline__ float at(uint32_t n, uint32_t k, uint32_t kk) const {
    return dsv3::u2f((uint32_t)w[(size_t)n * k + kk] << 16);
  }
};

// One 64x64 tile: output rows m0..min(m0 + 64, m_end), columns n0..min(n0 + 64, n).
template <class W>
__device__ __forceinline__ void f32_tile(const float* a, const W w, float* out, uint32_t m0, uint32_t m_end, uint32_t n0, uint32_t n,
                                         uint32_t k) {
  __shared__ float as[BM][BK + 1], ws[BN][BK + 1];
  const uint32_t ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const uint32_t lr = threadIdx.x / 4, lc = (threadIdx.x % 4) * 8;
  float acc[4][4] = {};
  for (uint32_t k0 = 0; k0 < k; k0 += BK) {
#pragma unroll
    for (int b = 0; b < 8; ++b) {
      const uint32_t kk = k0 + lc + b;
      const bool in_k = kk < k;
      as[lr][lc + b] = in_k && m0 + lr < m_end ? a[(size_t)(m0 + lr) * k + kk] : 0.0f;
      ws[lr][lc + b] = in_k && n0 + lr < n ? w.at(n0 + lr, k, kk) : 0.0f;
    }
    __syncthreads();
    const uint32_t kn = min((uint32_t)BK, k - k0);
    for (uint32_t kk = 0; kk < kn; ++kk) {
      float av[4], wv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = as[ty + 16 * i][kk];
#pragma unroll
      for (int j = 0; j < 4; ++j) wv[j] = ws[tx + 16 * j][kk];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = dsv3::add_rn(acc[i][j], dsv3::mul_rn(av[i], wv[j]));
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t m = m0 + ty + 16 * i, nn = n0 + tx + 16 * j;
      if (m < m_end && nn < n) out[(size_t)m * n + nn] = acc[i][j];
    }
}
}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS) dsv3_gemm_dequant_simt(const dsv3_gemm_dequant_simt_params p) {
  f32_tile(p.a, Fp8W{p.w, p.w_s, (p.k + 127) / 128}, p.out, blockIdx.y * BM, p.m, blockIdx.x * BN, p.n, p.k);
}

extern "C" __global__ void __launch_bounds__(THREADS)
    dsv3_gemm_dequant_simt_grouped(const dsv3_gemm_dequant_simt_grouped_params p) {
  if (p.n_tiles != nullptr && blockIdx.y >= *p.n_tiles) return;  // the whole block: a device-built tile list
  const dsv3_gemm_tile t = p.tiles[blockIdx.y];
  const uint32_t kbn = (p.k + 127) / 128;
  Fp8W w;
  if (p.experts != nullptr) {
    w = Fp8W{p.experts[t.expert].w, p.experts[t.expert].w_s, kbn};
  } else {
    w = Fp8W{p.stack_w + (size_t)t.expert * p.n * p.k, p.stack_s + (size_t)t.expert * ((p.n + 127) / 128) * kbn, kbn};
  }
  f32_tile(p.a, w, p.out, t.row0, t.row0 + t.rows, blockIdx.x * BN, p.n, p.k);
}

extern "C" __global__ void __launch_bounds__(THREADS) dsv3_gemm_bf16_simt(const dsv3_gemm_bf16_simt_params p) {
  f32_tile(p.a, Bf16W{p.w}, p.out, blockIdx.y * BM, p.m, blockIdx.x * BN, p.n, p.k);
}
