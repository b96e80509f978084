// Row softmax (act::softmax), bit-exact with the fast CPU version: one block per row; max
// over the row (NaN-ignoring, as f32::max; order-independent), e_i = exp_fast(x_i - max)
// written to out, then 16 threads each sum the elements i ≡ lane (mod 16) in ascending i, a
// tree folds the 16 partial sums (8, 4, 2, 1), inv = 1 / sum, out_i *= inv: the CPU's 16
// lanes, in the CPU's order. A row with no finite maximum gets 1/n, or NaN if it has a NaN.
#include "dsv3/common.cuh"
#include "dsv3/params.h"

namespace {
constexpr int THREADS = 256;
constexpr int LANES = 16;
}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS) dsv3_softmax(const dsv3_softmax_params p) {
  __shared__ float part[THREADS / 32];
  __shared__ float shared_m, shared_inv;
  const size_t base = (size_t)blockIdx.x * p.cols;
  const float* x = p.x + base;
  float* out = p.out + base;

  float m = dsv3::NEG_INF;
  int nan = 0;
  for (uint32_t i = threadIdx.x; i < p.cols; i += THREADS) {
    m = fmaxf(m, x[i]);
    nan |= isnan(x[i]);
  }
  m = dsv3::warp_max(m);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = m;
  nan = __syncthreads_or(nan);
  if (threadIdx.x == 0) {
    float t = part[0];
    for (int w = 1; w < THREADS / 32; ++w) t = fmaxf(t, part[w]);
    shared_m = t;
  }
  __syncthreads();
  m = shared_m;
  if (m == dsv3::NEG_INF) {
    const float fill = nan ? __int_as_float(0x7fc00000) : dsv3::div_rn(1.0f, (float)p.cols);
    for (uint32_t i = threadIdx.x; i < p.cols; i += THREADS) out[i] = fill;
    return;
  }
  for (uint32_t i = threadIdx.x; i < p.cols; i += THREADS) out[i] = dsv3::exp_fast(dsv3::sub_rn(x[i], m));
  __syncthreads();  // out is visible to the whole block
  if (threadIdx.x < 32) {
    float acc = 0.0f;
    if (threadIdx.x < LANES)
      for (uint32_t i = threadIdx.x; i < p.cols; i += LANES) acc = dsv3::add_rn(acc, out[i]);
    for (int w = LANES / 2; w > 0; w >>= 1) {
      const float o = __shfl_down_sync(dsv3::FULL_MASK, acc, w);
      if ((int)threadIdx.x < w) acc = dsv3::add_rn(acc, o);
    }
    if (threadIdx.x == 0) shared_inv = dsv3::div_rn(1.0f, acc);
  }
  __syncthreads();
  const float inv = shared_inv;
  for (uint32_t i = threadIdx.x; i < p.cols; i += THREADS) out[i] = dsv3::mul_rn(out[i], inv);
}
