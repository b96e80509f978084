// Block-wide reductions and the RMSNorm row scaling shared by norm/rms_norm.cu and
// attention/cache.cu (the kv_a_layernorm of the MLA cache write), so both normalise alike.
#pragma once
#include "dsv3/common.cuh"

namespace dsv3 {

// Sum of `v` over a block of THREADS threads (a multiple of 32); every thread gets the total.
// Contains __syncthreads: every thread of the block must call it.
template <int THREADS>
__device__ float block_sum(float v) {
  __shared__ float part[THREADS / 32];
  __shared__ float total;
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
  __syncthreads();
  float t = threadIdx.x < THREADS / 32 ? part[threadIdx.x] : 0.0f;
  if (threadIdx.x < 32) t = warp_sum(t);
  if (threadIdx.x == 0) total = t;
  __syncthreads();
  return total;
}

// out = w * (v * inv) with inv = 1 / sqrt(sum / cols + eps), as the CPU's RMSNorm forms it.
template <int THREADS>
__device__ void rms_scale_row(const float* v, const float* w, float* out, uint32_t cols, float sum, float eps) {
  const float inv = div_rn(1.0f, sqrt_rn(add_rn(div_rn(sum, (float)cols), eps)));
  for (uint32_t i = threadIdx.x; i < cols; i += THREADS) out[i] = mul_rn(w[i], mul_rn(v[i], inv));
}

// Sum of squares of v[0..cols) over the block (each thread sums its stride in order).
template <int THREADS>
__device__ float block_sum_squares(const float* v, uint32_t cols) {
  float acc = 0.0f;
  for (uint32_t i = threadIdx.x; i < cols; i += THREADS) acc = add_rn(acc, mul_rn(v[i], v[i]));
  return block_sum<THREADS>(acc);
}

}  // namespace dsv3
