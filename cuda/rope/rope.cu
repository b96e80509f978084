// RoPE on interleaved pairs with a precomputed cos/sin table (rope::apply_rope): one thread
// per pair, in place. Bit-exact with the CPU (same table, same two products and one sum).
#include "dsv3/common.cuh"
#include "dsv3/params.h"

extern "C" __global__ void __launch_bounds__(256) dsv3_rope(const dsv3_rope_params p) {
  const size_t pairs = (size_t)p.tokens * p.heads * p.half;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < pairs; i += (size_t)gridDim.x * blockDim.x) {
    const uint32_t k = i % p.half;
    const size_t th = i / p.half;
    const uint32_t h = th % p.heads, t = th / p.heads;
    const uint32_t pos = p.positions[t];
    if (pos >= p.max_pos) {
      dsv3::report(p.status, t);
      continue;
    }
    const float c = p.cos[(size_t)pos * p.half + k], s = p.sin[(size_t)pos * p.half + k];
    float* v = p.x + (size_t)t * p.row_stride + p.offset + (size_t)h * p.head_stride + 2 * k;
    const float a = v[0], b = v[1];
    v[0] = dsv3::sub_rn(dsv3::mul_rn(a, c), dsv3::mul_rn(b, s));
    v[1] = dsv3::add_rn(dsv3::mul_rn(a, s), dsv3::mul_rn(b, c));
  }
}
