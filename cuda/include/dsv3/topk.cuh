// Warp-level top-k selection shared by the routing kernels (gating/*.cu): one warp per token,
// expert e in lane e % 32, slot e / 32. Ties go to the lowest index everywhere, as in the CPU
// reference (gating::reference::route).
#pragma once
#include "dsv3/common.cuh"

namespace dsv3 {

constexpr int ROUTE_SLOTS = 8;  // n_experts <= 32 * ROUTE_SLOTS = 256

// A candidate: larger value wins, then the lower index.
struct Best {
  float v;
  uint32_t i;
  float s;  // payload (the unbiased score)
};
__device__ __forceinline__ bool better(const Best& a, const Best& b) { return a.v > b.v || (a.v == b.v && a.i < b.i); }
__device__ __forceinline__ Best warp_best(Best b) {
  for (int o = 16; o > 0; o >>= 1) {
    Best x{__shfl_xor_sync(FULL_MASK, b.v, o), __shfl_xor_sync(FULL_MASK, b.i, o), __shfl_xor_sync(FULL_MASK, b.s, o)};
    if (better(x, b)) b = x;
  }
  return b;
}

// Keeps the `topk_group` best of `n_group` groups whose score lane g holds in `gscore`
// (ties to the lowest group); returns the bit set of kept groups.
__device__ __forceinline__ uint32_t keep_groups(float gscore, uint32_t n_group, uint32_t topk_group, uint32_t lane) {
  uint32_t kept = 0;
  for (uint32_t j = 0; j < topk_group; ++j) {
    const bool cand = lane < n_group && !((kept >> lane) & 1u);
    const Best b = warp_best(Best{cand ? gscore : NEG_INF, cand ? lane : 0xFFFFFFFFu, 0.0f});
    kept |= 1u << b.i;
  }
  return kept;
}

// Top-k experts of the kept groups by `sel`, in output order (descending, ties to the lower
// expert); lane j < top_k gets the j-th expert and its payload `score`. Then the weights:
// the payloads renormalised over their sum taken in output order (+1e-20) when `norm`, times
// `scaling`; written to row t of indices/weights.
__device__ __forceinline__ void topk_and_write(const float (&sel)[ROUTE_SLOTS], const float (&score)[ROUTE_SLOTS], uint32_t kept,
                                               uint32_t gs, uint32_t n_experts, uint32_t top_k, bool norm, float scaling,
                                               uint32_t lane, uint32_t* indices, float* weights) {
  uint32_t taken = 0, my_e = 0;
  float my_s = 0.0f;
  for (uint32_t j = 0; j < top_k; ++j) {
    Best b{NEG_INF, 0xFFFFFFFFu, 0.0f};
#pragma unroll
    for (int i = 0; i < ROUTE_SLOTS; ++i) {
      const uint32_t e = lane + 32 * i;
      if (e < n_experts && ((kept >> (e / gs)) & 1u) && !((taken >> i) & 1u)) {
        const Best c{sel[i], e, score[i]};
        if (better(c, b)) b = c;
      }
    }
    b = warp_best(b);
    if (b.i % 32 == lane) taken |= 1u << (b.i / 32);
    if (lane == j) {
      my_e = b.i;
      my_s = b.s;
    }
  }
  float w = my_s;
  if (norm) {
    float sum = 0.0f;
    for (uint32_t j = 0; j < top_k; ++j) sum = add_rn(sum, __shfl_sync(FULL_MASK, my_s, j));
    w = div_rn(my_s, add_rn(sum, 1e-20f));
  }
  if (lane < top_k) {
    indices[lane] = my_e;
    weights[lane] = mul_rn(w, scaling);
  }
}

}  // namespace dsv3
