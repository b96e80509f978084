// MLA attention, one warp per (query row, head), f32 with an online softmax over chunks of 32
// keys (lanes split the head dimensions; a chunk's scores end up one per lane, its softmax is
// one warp max and one warp sum; exp is exp_fast, the CPU kernels' exp). Against the f64
// references the outputs agree within f32 rounding of long sums, relative to the largest
// output, as the fast CPU kernels do. A plain SIMT version: correct, not Hopper-fast.
//
// dsv3_mla_decode (attention::decode, FlashMLA's contract): query row b, head h:
// s_j = (q[b, h, :] · K_j) · scale over the `width` values of each cached row K_j,
// j < kv_lens[b], read through block-table row b; out[b, h, :] = Σ_j softmax(s)_j K_j[0..kv_lora].
// kv_lens[b] == 0 gives zeros. Block = 8 heads of one row (they read the same cache rows).
//
// dsv3_mla_prefill (attention::prefill): query token t of sequence i (cu_q[i] <= t <
// cu_q[i + 1]), head h: keys j <= q_pos[t] of the sequence (rows cu_k[i] + j), k_j =
// [k_nope[j, h] | k_pe[j]], out[t, h·v..] = Σ_j softmax(s)_j v[j, h]. Block = 8 tokens of one
// head.
#include "dsv3/common.cuh"
#include "dsv3/params.h"

namespace {
constexpr int WARPS = 8;
constexpr int DEC_QM = 20, DEC_OM = 16;  // decode: width <= 640, kv_lora <= 512
constexpr int PRE_QM = 8, PRE_OM = 8;    // prefill: nope + rope <= 256, v <= 256

// The online-softmax state of one query row, held by its warp: output column lane + 32 i in o[i].
template <int OM>
struct Online {
  float m = dsv3::NEG_INF, l = 0.0f;
  float o[OM] = {};

  // Folds in a chunk of nk <= 32 keys whose scaled score lane j holds in `s` (lanes >= nk:
  // -inf); returns this lane's probability weight (0 for lanes >= nk).
  __device__ __forceinline__ float step(float s, uint32_t nk, uint32_t lane) {
    const float m_new = fmaxf(m, dsv3::warp_max(s));
    const float pj = lane < nk ? dsv3::exp_fast(s - m_new) : 0.0f;
    const float alpha = dsv3::exp_fast(m - m_new);
    l = l * alpha + dsv3::warp_sum(pj);
#pragma unroll
    for (int i = 0; i < OM; ++i) o[i] *= alpha;
    m = m_new;
    return pj;
  }
  // o += pj · value[c] for the columns c = lane + 32 i < cols.
  __device__ __forceinline__ void add(float pj, const float* value, uint32_t cols, uint32_t lane) {
#pragma unroll
    for (int i = 0; i < OM; ++i) {
      const uint32_t c = lane + 32 * i;
      if (c < cols) o[i] = fmaf(pj, value[c], o[i]);
    }
  }
  __device__ __forceinline__ void write(float* out, uint32_t cols, uint32_t lane) const {
    const float inv = 1.0f / l;
#pragma unroll
    for (int i = 0; i < OM; ++i) {
      const uint32_t c = lane + 32 * i;
      if (c < cols) out[c] = o[i] * inv;
    }
  }
};
}  // namespace

extern "C" __global__ void __launch_bounds__(WARPS * 32) dsv3_mla_decode(const dsv3_mla_decode_params p) {
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t b = blockIdx.y, h = blockIdx.x * WARPS + warp;
  if (h >= p.heads) return;  // whole warps; no barrier in this kernel
  const size_t bh = (size_t)b * p.heads + h;
  float* out = p.out + bh * p.kv_lora;
  const uint32_t len = p.kv_lens[b];
  if (len == 0) {
    for (uint32_t c = lane; c < p.kv_lora; c += 32) out[c] = 0.0f;
    return;
  }
  float q[DEC_QM];
#pragma unroll
  for (int i = 0; i < DEC_QM; ++i) {
    const uint32_t d = lane + 32 * i;
    q[i] = d < p.width ? p.q[bh * p.width + d] : 0.0f;
  }
  const uint32_t* table = p.table + (size_t)b * p.max_blocks;
  const uint32_t ps = p.page_size;
  Online<DEC_OM> st;
  for (uint32_t j0 = 0; j0 < len; j0 += 32) {
    const uint32_t nk = min(32u, len - j0);
    float s = dsv3::NEG_INF;
    for (uint32_t jj = 0; jj < nk; ++jj) {
      const uint32_t pos = j0 + jj;
      const float* row = p.pool + ((size_t)table[pos / ps] * ps + pos % ps) * p.width;
      float part = 0.0f;
#pragma unroll
      for (int i = 0; i < DEC_QM; ++i) {
        const uint32_t d = lane + 32 * i;
        if (d < p.width) part = fmaf(q[i], row[d], part);
      }
      part = dsv3::warp_sum(part);
      if (lane == jj) s = part * p.scale;
    }
    const float pj = st.step(s, nk, lane);
    for (uint32_t jj = 0; jj < nk; ++jj) {
      const uint32_t pos = j0 + jj;
      st.add(__shfl_sync(dsv3::FULL_MASK, pj, jj), p.pool + ((size_t)table[pos / ps] * ps + pos % ps) * p.width, p.kv_lora, lane);
    }
  }
  st.write(out, p.kv_lora, lane);
}

extern "C" __global__ void __launch_bounds__(WARPS * 32) dsv3_mla_prefill(const dsv3_mla_prefill_params p) {
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t h = blockIdx.x, t = blockIdx.y * WARPS + warp;
  if (t >= p.tokens) return;  // whole warps; no barrier in this kernel
  // The sequence of token t: the last i with cu_q[i] <= t.
  uint32_t lo = 0, hi = p.seqs;
  while (hi - lo > 1) {
    const uint32_t mid = (lo + hi) / 2;
    if (p.cu_q[mid] <= t) lo = mid; else hi = mid;
  }
  const uint32_t kb = p.cu_k[lo], last = p.q_pos[t];
  const uint32_t qh = p.nope + p.rope;
  const size_t th = (size_t)t * p.heads + h;
  float q[PRE_QM];
#pragma unroll
  for (int i = 0; i < PRE_QM; ++i) {
    const uint32_t d = lane + 32 * i;
    q[i] = d < qh ? p.q[th * qh + d] : 0.0f;
  }
  Online<PRE_OM> st;
  for (uint32_t j0 = 0; j0 <= last; j0 += 32) {
    const uint32_t nk = min(32u, last + 1 - j0);
    float s = dsv3::NEG_INF;
    for (uint32_t jj = 0; jj < nk; ++jj) {
      const size_t key = kb + j0 + jj;
      const float* kn = p.k_nope + (key * p.heads + h) * p.nope;
      const float* kp = p.k_pe + key * p.rope;
      float part = 0.0f;
#pragma unroll
      for (int i = 0; i < PRE_QM; ++i) {
        const uint32_t d = lane + 32 * i;
        if (d < p.nope) part = fmaf(q[i], kn[d], part);
        else if (d < qh) part = fmaf(q[i], kp[d - p.nope], part);
      }
      part = dsv3::warp_sum(part);
      if (lane == jj) s = part * p.scale;
    }
    const float pj = st.step(s, nk, lane);
    for (uint32_t jj = 0; jj < nk; ++jj) {
      const size_t key = kb + j0 + jj;
      st.add(__shfl_sync(dsv3::FULL_MASK, pj, jj), p.v + (key * p.heads + h) * p.v_dim, p.v_dim, lane);
    }
  }
  st.write(p.out + th * p.v_dim, p.v_dim, lane);
}
