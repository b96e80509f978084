// Token embedding gather from a bf16 table (embed::embedding): one block per token; bf16 is
// the top half of an f32, so the widening is exact. An id >= vocab is reported, its row is
// not written.
#include "dsv3/common.cuh"
#include "dsv3/params.h"

extern "C" __global__ void __launch_bounds__(256) dsv3_embedding_bf16(const dsv3_embedding_bf16_params p) {
  const uint32_t t = blockIdx.x;
  const uint32_t id = p.ids[t];
  if (id >= p.vocab) {
    if (threadIdx.x == 0) dsv3::report(p.status, t);
    return;
  }
  const uint16_t* src = p.table + (size_t)id * p.dim;
  float* dst = p.out + (size_t)t * p.dim;
  for (uint32_t i = threadIdx.x; i < p.dim; i += blockDim.x) dst[i] = dsv3::u2f((uint32_t)src[i] << 16);
}
