// Softmax routing (gating::route with RouteMethod::SoftmaxGreedy, V2-Lite, and
// RouteMethod::GroupLimitedGreedy, V2), one warp per token; expert e in lane e % 32, slot
// e / 32. Every step follows the CPU reference: max of the row, e_i = exp(l_i - max) with the
// gating exp, their sum taken in expert order (lane 0 adds them up from shared memory),
// scores e_i / sum, no bias; group-limited: group score = max of the group, keep `topk_group`
// groups; top-k by score, ties to the lowest index; weights renormalised in output order when
// asked, times the scaling factor. Indices and weights are bit-exact with the CPU.
#include "dsv3/common.cuh"
#include "dsv3/params.h"
#include "dsv3/topk.cuh"

namespace {
constexpr int SLOTS = dsv3::ROUTE_SLOTS;
constexpr int WARPS = 4;
}  // namespace

extern "C" __global__ void __launch_bounds__(WARPS * 32) dsv3_route_softmax(const dsv3_route_softmax_params p) {
  __shared__ float ex[WARPS][32 * SLOTS];
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t t = blockIdx.x * WARPS + warp;
  if (t >= p.tokens) return;  // whole warps leave together
  const float* row = p.logits + (size_t)t * p.n_experts;

  float l[SLOTS];
  uint32_t bad = 0xFFFFFFFFu;
  float m = dsv3::NEG_INF;
#pragma unroll
  for (int i = 0; i < SLOTS; ++i) {
    const uint32_t e = lane + 32 * i;
    l[i] = dsv3::NEG_INF;
    if (e < p.n_experts) {
      l[i] = row[e];
      if (!(fabsf(l[i]) <= 3.40282347e38f) && bad == 0xFFFFFFFFu) bad = e;
      m = fmaxf(m, l[i]);
    }
  }
  bad = __reduce_min_sync(dsv3::FULL_MASK, bad);
  if (bad != 0xFFFFFFFFu) {
    if (lane == 0) dsv3::report(p.status, t * p.n_experts + bad);
    return;
  }
  m = dsv3::warp_max(m);  // every logit is finite here: the max is order-independent

  // e_i into shared memory, summed in expert order by lane 0.
#pragma unroll
  for (int i = 0; i < SLOTS; ++i) {
    const uint32_t e = lane + 32 * i;
    if (e < p.n_experts) ex[warp][e] = dsv3::exp_gating(dsv3::sub_rn(l[i], m));
  }
  __syncwarp();
  float sum = 0.0f;
  if (lane == 0)
    for (uint32_t e = 0; e < p.n_experts; ++e) sum = dsv3::add_rn(sum, ex[warp][e]);
  sum = __shfl_sync(dsv3::FULL_MASK, sum, 0);

  float score[SLOTS];
#pragma unroll
  for (int i = 0; i < SLOTS; ++i) {
    const uint32_t e = lane + 32 * i;
    score[i] = e < p.n_experts ? dsv3::div_rn(ex[warp][e], sum) : dsv3::NEG_INF;
  }

  // Group stage (group-limited only): group score = the group's largest score.
  uint32_t kept = 0xFFFFFFFFu, gs = p.n_experts;
  if (p.group_limited) {
    gs = p.n_experts / p.n_group;
    float gscore = dsv3::NEG_INF;
    for (uint32_t g = 0; g < p.n_group; ++g) {
      float mx = dsv3::NEG_INF;
#pragma unroll
      for (int i = 0; i < SLOTS; ++i) {
        const uint32_t e = lane + 32 * i;
        if (e < p.n_experts && e / gs == g) mx = fmaxf(mx, score[i]);
      }
      mx = dsv3::warp_max(mx);
      if (lane == g) gscore = mx;
    }
    kept = dsv3::keep_groups(gscore, p.n_group, p.topk_group, lane);
  }
  dsv3::topk_and_write(score, score, kept, gs, p.n_experts, p.top_k, p.norm_topk_prob != 0, p.routed_scaling_factor, lane,
                       p.indices + (size_t)t * p.top_k, p.weights + (size_t)t * p.top_k);
}
