// Token sampling from logits rows (sample::greedy, sample::sample; the semantics of the
// runtime's Sampler): only ids < `allowed` are candidates.
//
// dsv3_sample_greedy: one block per row; the argmax, lowest id on ties (strict >, from -inf:
// a row of -inf gives id 0); a NaN is reported (lowest row * allowed + id) and its row is not
// written.
//
// dsv3_sample_top_k_top_p: one block per row. v = logit / temperature (f32); the candidates
// sorted descending by v (total order), ties by ascending id: a bitonic sort of 64-bit keys
// (ordered value bits << 32 | ~id) in the row's workspace; the first top_k kept (0: all);
// e_i = exp(f64(v_i - v_0)), p_i = e_i / Σ e; with top_p < 1 the list is cut after the first
// i whose cumulative probability reaches top_p and renormalised; then the draw: the first i
// with u < Σ_{j<=i} p_j for the row's uniform u (the last one if rounding leaves none). Sums
// and cumulative sums are f64 block scans in candidate order (the CPU sums one by one: the
// two agree to f64 rounding, so a draw can differ only for u within ~1e-15 of a boundary).
#include "dsv3/common.cuh"
#include "dsv3/params.h"

namespace {
constexpr int THREADS = 1024;
constexpr int WARPS = THREADS / 32;

// A candidate of the argmax: larger value wins, then the lower id.
struct Arg {
  float v;
  uint32_t i;
};
__device__ __forceinline__ bool better(const Arg& a, const Arg& b) { return a.v > b.v || (a.v == b.v && a.i < b.i); }

// Inclusive scan of one value per thread over the block; `carry` (the sum of the earlier
// chunks) is added, and updated to include this chunk. Contains barriers.
__device__ double block_scan(double v, double& carry) {
  __shared__ double warp_tot[WARPS];
  __shared__ double chunk_tot;
  const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int o = 1; o < 32; o <<= 1) {
    const double x = __shfl_up_sync(dsv3::FULL_MASK, v, o);
    if ((int)lane >= o) v += x;
  }
  if (lane == 31) warp_tot[warp] = v;
  __syncthreads();
  if (warp == 0) {
    double t = warp_tot[lane];
    for (int o = 1; o < 32; o <<= 1) {
      const double x = __shfl_up_sync(dsv3::FULL_MASK, t, o);
      if ((int)lane >= o) t += x;
    }
    warp_tot[lane] = t;  // inclusive over warps
    if (lane == 31) chunk_tot = t;
  }
  __syncthreads();
  if (warp > 0) v += warp_tot[warp - 1];
  const double out = carry + v;
  const double tot = chunk_tot;
  __syncthreads();  // warp_tot / chunk_tot are reused by the next call
  carry += tot;
  return out;
}

// The first i < n whose inclusive prefix sum c_i of p satisfies `c_i >= thr` (reach) or
// `thr < c_i` (!reach); returns n if none. `total` gets Σ p over 0..=i (or all n).
__device__ uint32_t scan_find(const double* p, uint32_t n, double thr, bool reach, double& total) {
  __shared__ uint32_t found;
  __shared__ double found_c;
  if (threadIdx.x == 0) found = 0xFFFFFFFFu;
  __syncthreads();
  double carry = 0.0;
  for (uint32_t c0 = 0; c0 < n; c0 += THREADS) {
    const uint32_t i = c0 + threadIdx.x;
    const double c = block_scan(i < n ? p[i] : 0.0, carry);
    const bool hit = i < n && (reach ? c >= thr : thr < c);
    if (hit) atomicMin(&found, i);
    __syncthreads();
    if (found != 0xFFFFFFFFu) {
      if (i == found) found_c = c;
      __syncthreads();
      total = found_c;
      return found;
    }
  }
  total = carry;
  return n;
}

// Sum of one value per thread over the block (fixed tree: deterministic). Contains barriers.
__device__ double block_sum_f64(double v) {
  __shared__ double part[WARPS];
  __shared__ double total;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(dsv3::FULL_MASK, v, o);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    double t = part[threadIdx.x];
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(dsv3::FULL_MASK, t, o);
    if (threadIdx.x == 0) total = t;
  }
  __syncthreads();
  const double r = total;
  __syncthreads();
  return r;
}

__device__ __forceinline__ uint32_t ordered(float v) {
  const uint32_t b = dsv3::f2u(v);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float unordered(uint32_t o) { return dsv3::u2f((o & 0x80000000u) ? (o & 0x7FFFFFFFu) : ~o); }
}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS) dsv3_sample_greedy(const dsv3_sample_greedy_params p) {
  __shared__ Arg part[WARPS];
  const uint32_t r = blockIdx.x;
  const float* row = p.logits + (size_t)r * p.vocab;
  Arg best{dsv3::NEG_INF, 0xFFFFFFFFu};
  uint32_t nan = 0xFFFFFFFFu;
  for (uint32_t i = threadIdx.x; i < p.allowed; i += THREADS) {
    const float v = row[i];
    if (isnan(v)) nan = min(nan, i);
    else if (v > best.v) best = Arg{v, i};  // ascending i: strict > keeps the lowest id
  }
  nan = __reduce_min_sync(dsv3::FULL_MASK, nan);
  for (int o = 16; o > 0; o >>= 1) {
    const Arg x{__shfl_xor_sync(dsv3::FULL_MASK, best.v, o), __shfl_xor_sync(dsv3::FULL_MASK, best.i, o)};
    if (better(x, best)) best = x;
  }
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = best;
  if (threadIdx.x % 32 == 0 && nan != 0xFFFFFFFFu) dsv3::report(p.status, r * p.allowed + nan);
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < WARPS; ++w)
      if (better(part[w], best)) best = part[w];
    // Nothing above -inf: id 0, as the CPU's fold from (0, -inf).
    p.out[r] = best.i == 0xFFFFFFFFu ? 0u : best.i;
  }
}

extern "C" __global__ void __launch_bounds__(THREADS) dsv3_sample_top_k_top_p(const dsv3_sample_top_k_top_p_params p) {
  __shared__ uint32_t nan;
  const uint32_t r = blockIdx.x;
  const float* row = p.logits + (size_t)r * p.vocab;
  unsigned long long* key = p.keys + (size_t)r * p.padded;
  double* prob = p.probs + (size_t)r * p.allowed;
  if (threadIdx.x == 0) nan = 0xFFFFFFFFu;
  __syncthreads();

  // Keys: descending key = descending v, then ascending id; padding sorts last.
  for (uint32_t i = threadIdx.x; i < p.padded; i += THREADS) {
    unsigned long long k = 0;
    if (i < p.allowed) {
      const float v = row[i];
      if (isnan(v)) atomicMin(&nan, i);
      k = ((unsigned long long)ordered(dsv3::div_rn(v, p.temperature)) << 32) | (0xFFFFFFFFu - i);
    }
    key[i] = k;
  }
  __syncthreads();
  if (nan != 0xFFFFFFFFu) {
    if (threadIdx.x == 0) dsv3::report(p.status, r * p.allowed + nan);
    return;  // the whole block: `nan` is read after the barrier
  }

  // Bitonic sort, descending, in global memory (the block's own row; barriers order it).
  for (uint32_t size = 2; size <= p.padded; size <<= 1) {
    for (uint32_t stride = size / 2; stride > 0; stride >>= 1) {
      for (uint32_t t = threadIdx.x; t < p.padded / 2; t += THREADS) {
        const uint32_t i = 2 * t - (t & (stride - 1)), j = i + stride;
        const bool desc = (i & size) == 0;
        const unsigned long long a = key[i], b = key[j];
        if ((a < b) == desc) {
          key[i] = b;
          key[j] = a;
        }
      }
      __syncthreads();
    }
  }

  // Probabilities of the first n candidates.
  const uint32_t n = p.top_k > 0 ? min(p.top_k, p.allowed) : p.allowed;
  const float vmax = unordered((uint32_t)(key[0] >> 32));
  double part = 0.0;
  for (uint32_t i = threadIdx.x; i < n; i += THREADS) {
    const double e = exp((double)dsv3::sub_rn(unordered((uint32_t)(key[i] >> 32)), vmax));
    prob[i] = e;
    part += e;
  }
  const double total = block_sum_f64(part);
  for (uint32_t i = threadIdx.x; i < n; i += THREADS) prob[i] = prob[i] / total;
  __syncthreads();

  // Nucleus: keep up to the first candidate whose cumulative probability reaches top_p.
  uint32_t kept = n;
  if (p.top_p < 1.0f) {
    double mass;
    const uint32_t cut = scan_find(prob, n, (double)p.top_p, true, mass);
    kept = cut < n ? cut + 1 : n;
    for (uint32_t i = threadIdx.x; i < kept; i += THREADS) prob[i] = prob[i] / mass;
    __syncthreads();
  }

  // The draw.
  double unused;
  const uint32_t pick = scan_find(prob, kept, p.uniforms[r], false, unused);
  if (threadIdx.x == 0) {
    const uint32_t slot = pick < kept ? pick : kept - 1;
    p.out[r] = 0xFFFFFFFFu - (uint32_t)(key[slot] & 0xFFFFFFFFu);
  }
}
