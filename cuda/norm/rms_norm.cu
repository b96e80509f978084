// RMSNorm and fused residual-add RMSNorm (norm::rms_norm, norm::add_rms_norm): one block of
// 256 threads per row. The sum of squares is an f32 tree over the block (the CPU sums over
// 16 lanes, the reference in f64: results agree within the summation error, exactly on
// sums that are exact in f32); the scale and the output use the CPU's operation order.
#include "dsv3/common.cuh"
#include "dsv3/params.h"

namespace {
constexpr int THREADS = 256;

// Sum of `v` over the block; every thread gets the total.
__device__ float block_sum(float v) {
  __shared__ float part[THREADS / 32];
  v = dsv3::warp_sum(v);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
  __syncthreads();
  float t = threadIdx.x < THREADS / 32 ? part[threadIdx.x] : 0.0f;
  if (threadIdx.x < 32) t = dsv3::warp_sum(t);
  __shared__ float total;
  if (threadIdx.x == 0) total = t;
  __syncthreads();
  return total;
}

// out = w * (v * inv) with inv = 1 / sqrt(sum / cols + eps), as the CPU forms it.
__device__ void scale_row(const float* v, const float* w, float* out, uint32_t cols, float sum, float eps) {
  const float inv = dsv3::div_rn(1.0f, dsv3::sqrt_rn(dsv3::add_rn(dsv3::div_rn(sum, (float)cols), eps)));
  for (uint32_t i = threadIdx.x; i < cols; i += THREADS) out[i] = dsv3::mul_rn(w[i], dsv3::mul_rn(v[i], inv));
}
}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS) dsv3_rms_norm(const dsv3_rms_norm_params p) {
  const size_t row = (size_t)blockIdx.x * p.cols;
  const float* x = p.x + row;
  float acc = 0.0f;
  for (uint32_t i = threadIdx.x; i < p.cols; i += THREADS) acc = dsv3::add_rn(acc, dsv3::mul_rn(x[i], x[i]));
  scale_row(x, p.w, p.out + row, p.cols, block_sum(acc), p.eps);
}

extern "C" __global__ void __launch_bounds__(THREADS) dsv3_add_rms_norm(const dsv3_add_rms_norm_params p) {
  const size_t row = (size_t)blockIdx.x * p.cols;
  float* r = p.residual + row;
  float acc = 0.0f;
  for (uint32_t i = threadIdx.x; i < p.cols; i += THREADS) {
    const float v = dsv3::add_rn(r[i], p.x[row + i]);
    r[i] = v;  // each thread re-reads only what it wrote itself below
    acc = dsv3::add_rn(acc, dsv3::mul_rn(v, v));
  }
  scale_row(r, p.w, p.out + row, p.cols, block_sum(acc), p.eps);
}
