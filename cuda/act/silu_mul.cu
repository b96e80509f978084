// SwiGLU activation (act::silu_mul, act::silu_mul_packed): out = silu(gate) * up, one thread
// per element. Bit-exact with the fast CPU version (same exp_fast, same roundings).
#include "dsv3/common.cuh"
#include "dsv3/params.h"

extern "C" __global__ void __launch_bounds__(256) dsv3_silu_mul(const dsv3_silu_mul_params p) {
  const size_t n = (size_t)p.rows * p.cols;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const size_t r = i / p.cols, c = i % p.cols;
    const size_t src = r * p.in_stride + c;
    p.out[i] = dsv3::mul_rn(dsv3::silu_fast(p.gate[src]), p.up[src]);
  }
}
