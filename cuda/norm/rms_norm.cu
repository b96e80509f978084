// RMSNorm and fused residual-add RMSNorm (norm::rms_norm, norm::add_rms_norm): one block of
// 256 threads per row. The sum of squares is an f32 tree over the block (the CPU sums over
// 16 lanes, the reference in f64: results agree within the summation error, exactly on
// sums that are exact in f32); the scale and the output use the CPU's operation order.
#include "dsv3/common.cuh"
#include "dsv3/params.h"
#include "dsv3/reduce.cuh"

namespace {
constexpr int THREADS = 256;
}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS) dsv3_rms_norm(const dsv3_rms_norm_params p) {
  const size_t row = (size_t)blockIdx.x * p.cols;
  const float* x = p.x + row;
  dsv3::rms_scale_row<THREADS>(x, p.w, p.out + row, p.cols, dsv3::block_sum_squares<THREADS>(x, p.cols), p.eps);
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
  dsv3::rms_scale_row<THREADS>(r, p.w, p.out + row, p.cols, dsv3::block_sum<THREADS>(acc), p.eps);
}
