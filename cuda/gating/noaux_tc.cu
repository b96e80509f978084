// DeepSeek-V3 `noaux_tc` routing (gating::route with RouteMethod::NoauxTc), one warp per
// token; expert e lives in lane e % 32, slot e / 32. Every step follows the CPU reference:
// sigmoid scores (same exp), bias for selection only, group score = sum of the group's two
// largest biased scores, keep `topk_group` groups, top-k experts inside them, ties to the
// lowest index everywhere, weights = unbiased scores renormalised in output order, times the
// scaling factor. Indices and weights are therefore bit-exact with the CPU.
#include "dsv3/common.cuh"
#include "dsv3/params.h"
#include "dsv3/topk.cuh"

namespace {
constexpr int SLOTS = dsv3::ROUTE_SLOTS;
constexpr float NEG_INF = dsv3::NEG_INF;
}  // namespace

extern "C" __global__ void __launch_bounds__(128) dsv3_route_noaux_tc(const dsv3_route_noaux_tc_params p) {
  const uint32_t t = blockIdx.x * 4 + threadIdx.x / 32;
  const uint32_t lane = threadIdx.x % 32;
  if (t >= p.tokens) return;  // whole warps leave together
  const float* row = p.logits + (size_t)t * p.n_experts;
  const uint32_t gs = p.n_experts / p.n_group;

  float score[SLOTS], sel[SLOTS];
  uint32_t bad = 0xFFFFFFFFu;
#pragma unroll
  for (int i = 0; i < SLOTS; ++i) {
    const uint32_t e = lane + 32 * i;
    score[i] = 0.0f;
    sel[i] = NEG_INF;
    if (e < p.n_experts) {
      const float l = row[e];
      if (!(fabsf(l) <= 3.40282347e38f) && bad == 0xFFFFFFFFu) bad = e;
      score[i] = dsv3::sigmoid_gating(l);
      sel[i] = dsv3::add_rn(score[i], p.bias[e]);
    }
  }
  bad = __reduce_min_sync(dsv3::FULL_MASK, bad);
  if (bad != 0xFFFFFFFFu) {
    if (lane == 0) dsv3::report(p.status, t * p.n_experts + bad);
    return;
  }

  // Group scores: lane g ends up holding group g's top-2 sum.
  float gscore = NEG_INF;
  for (uint32_t g = 0; g < p.n_group; ++g) {
    float m1 = NEG_INF, m2 = NEG_INF;
#pragma unroll
    for (int i = 0; i < SLOTS; ++i) {
      const uint32_t e = lane + 32 * i;
      if (e < p.n_experts && e / gs == g) {
        if (sel[i] > m1) {
          m2 = m1;
          m1 = sel[i];
        } else if (sel[i] > m2) {
          m2 = sel[i];
        }
      }
    }
    for (int o = 16; o > 0; o >>= 1) {
      const float o1 = __shfl_xor_sync(dsv3::FULL_MASK, m1, o), o2 = __shfl_xor_sync(dsv3::FULL_MASK, m2, o);
      m2 = fmaxf(fminf(m1, o1), fmaxf(m2, o2));
      m1 = fmaxf(m1, o1);
    }
    if (lane == g) gscore = dsv3::add_rn(m1, m2);
  }

  // Keep the topk_group best groups, then the top-k experts inside them and their weights.
  const uint32_t kept = dsv3::keep_groups(gscore, p.n_group, p.topk_group, lane);
  dsv3::topk_and_write(sel, score, kept, gs, p.n_experts, p.top_k, p.norm_topk_prob != 0, p.routed_scaling_factor, lane,
                       p.indices + (size_t)t * p.top_k, p.weights + (size_t)t * p.top_k);
}
