// MoE permute (token order -> expert order) and weighted un-permute (permute::permute,
// permute::unpermute) on a dispatch plan built by the host. Bit-exact with the CPU: permute
// copies, and the combine accumulates from 0 in ascending j with separate roundings.
#include "dsv3/common.cuh"
#include "dsv3/params.h"

extern "C" __global__ void __launch_bounds__(256) dsv3_permute(const dsv3_permute_params p) {
  for (uint32_t s = blockIdx.x; s < p.rows; s += gridDim.x) {
    const float* src = p.x + (size_t)p.token_of_slot[s] * p.hidden;
    float* dst = p.out + (size_t)s * p.hidden;
    for (uint32_t c = threadIdx.x; c < p.hidden; c += blockDim.x) dst[c] = src[c];
  }
}

extern "C" __global__ void __launch_bounds__(256) dsv3_unpermute(const dsv3_unpermute_params p) {
  for (uint32_t t = blockIdx.x; t < p.tokens; t += gridDim.x) {
    const uint32_t* slots = p.slot_of + (size_t)t * p.top_k;
    const float* w = p.weights + (size_t)t * p.top_k;
    for (uint32_t c = threadIdx.x; c < p.hidden; c += blockDim.x) {
      float acc = 0.0f;
      for (uint32_t j = 0; j < p.top_k; ++j) acc = dsv3::add_rn(acc, dsv3::mul_rn(w[j], p.y[(size_t)slots[j] * p.hidden + c]));
      p.out[(size_t)t * p.hidden + c] = acc;
    }
  }
}
