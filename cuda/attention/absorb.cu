// The head-batched up-projections of absorbed MLA against bf16 weights (f32 accumulation;
// bf16 -> f32 is exact):
//
// dsv3_mla_absorb_q (attention::absorb_q): out[t, h, c] = Σ_e q[t, h, e] · W_UK[h·nope + e, c]
// for c < kv_lora, then out[t, h, kv_lora..] = q_pe[t, h] (the rope part of q). With
// `accumulate`, the product is added to out's latent columns instead and q_pe is not copied:
// a weight held as several parts (bf16 hi + lo) is W_UK = Σ parts, applied part by part as
// the CPU backend does. Block (column chunk of 256, head h, 8 tokens); the 8 query rows of the
// head in shared memory; each thread one column for 8 tokens.
//
// dsv3_mla_expand_v (attention::expand_v): out[t, h·v + e] = Σ_c W_UV[h·v + e, c] · o[t, h, c].
// Block (8 output rows e, head h, 8 tokens), one warp per e: lanes split c (coalesced weight
// reads), a warp sum per token.
#include "dsv3/common.cuh"
#include "dsv3/params.h"

namespace {
constexpr int THREADS = 256;
constexpr int RT = 8;              // tokens per block
constexpr int NOPE_MAX = 256;      // qk_nope limit of dsv3_mla_absorb_q
constexpr int KV_LORA_MAX = 1024;  // kv_lora limit of dsv3_mla_expand_v

__device__ __forceinline__ float widen(uint16_t b) { return dsv3::u2f((uint32_t)b << 16); }
}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS) dsv3_mla_absorb_q(const dsv3_mla_absorb_q_params p) {
  __shared__ float qs[RT][NOPE_MAX];
  const uint32_t h = blockIdx.y, t0 = blockIdx.z * RT;
  const uint32_t qh = p.nope + p.rope, oh = p.kv_lora + p.rope;
  const uint32_t nt = min((uint32_t)RT, p.rows - t0);
  for (uint32_t i = threadIdx.x; i < RT * p.nope; i += THREADS) {
    const uint32_t r = i / p.nope, e = i % p.nope;
    qs[r][e] = r < nt ? p.q[((size_t)(t0 + r) * p.heads + h) * qh + e] : 0.0f;
  }
  __syncthreads();
  const uint32_t c = blockIdx.x * THREADS + threadIdx.x;
  if (c < p.kv_lora) {
    float acc[RT] = {};
    const uint16_t* w = p.w + (size_t)h * p.nope * p.kv_lora + c;
    for (uint32_t e = 0; e < p.nope; ++e) {
      const float wv = widen(w[(size_t)e * p.kv_lora]);
#pragma unroll
      for (int r = 0; r < RT; ++r) acc[r] = fmaf(qs[r][e], wv, acc[r]);
    }
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      if ((uint32_t)r < nt) {
        float* o = p.out + ((size_t)(t0 + r) * p.heads + h) * oh + c;
        *o = p.accumulate ? dsv3::add_rn(*o, acc[r]) : acc[r];
      }
    }
  }
  if (blockIdx.x == 0 && !p.accumulate) {
    for (uint32_t i = threadIdx.x; i < nt * p.rope; i += THREADS) {
      const uint32_t r = i / p.rope, e = i % p.rope;
      const size_t th = (size_t)(t0 + r) * p.heads + h;
      p.out[th * oh + p.kv_lora + e] = p.q[th * qh + p.nope + e];
    }
  }
}

extern "C" __global__ void __launch_bounds__(THREADS) dsv3_mla_expand_v(const dsv3_mla_expand_v_params p) {
  __shared__ float os[RT][KV_LORA_MAX];
  const uint32_t h = blockIdx.y, t0 = blockIdx.z * RT;
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t nt = min((uint32_t)RT, p.rows - t0);
  for (uint32_t i = threadIdx.x; i < RT * p.kv_lora; i += THREADS) {
    const uint32_t r = i / p.kv_lora, c = i % p.kv_lora;
    os[r][c] = r < nt ? p.o_lat[((size_t)(t0 + r) * p.heads + h) * p.kv_lora + c] : 0.0f;
  }
  __syncthreads();
  const uint32_t e = blockIdx.x * (THREADS / 32) + warp;
  if (e >= p.v) return;  // whole warps; no barrier follows
  const uint16_t* w = p.w + ((size_t)h * p.v + e) * p.kv_lora;
  float acc[RT] = {};
  for (uint32_t c = lane; c < p.kv_lora; c += 32) {
    const float wv = widen(w[c]);
#pragma unroll
    for (int r = 0; r < RT; ++r) acc[r] = fmaf(wv, os[r][c], acc[r]);
  }
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    const float s = dsv3::warp_sum(acc[r]);
    if (lane == 0 && (uint32_t)r < nt) p.out[((size_t)(t0 + r) * p.heads + h) * p.v + e] = s;
  }
}
