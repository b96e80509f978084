// Token sampling from logits rows, the rule of crates/dsv3-kernels/src/sample.rs exactly (its
// module docs state it): only ids < `allowed` are candidates.
//
// dsv3_sample_greedy: one block per row; the argmax, lowest id on ties (strict >, from -inf:
// a row of -inf gives id 0); a NaN is reported (lowest row * allowed + id) and its row is not
// written.
//
// dsv3_sample: one block per row, each row with its own parameters (dsv3_sample_row).
// Temperature 0: the greedy argmax above. Otherwise:
//   1. the candidates sorted descending by LOGIT in IEEE order (-0 == +0: keys of -0 are +0's),
//      ties by ascending id: a bitonic sort of 64-bit keys (ordered logit bits << 32 | ~id) in
//      the row's scratch; the first top_k kept (0: all). Candidate 0 is the greedy token.
//   2. w_i = 1 when l_i == l_0, else exp((double(l_i) - double(l_0)) / double(T)) (in [0, 1]:
//      no temperature makes it NaN); p_i = w_i / sum(w).
//   3. with top_p < 1 the list is cut after the first candidate whose cumulative probability
//      reaches top_p, and renormalised.
//   4. the draw: the first i with u < sum_{j<=i} p_j for the row's uniform u (the last one if
//      rounding leaves none).
// Sums and cumulative sums are f64 block scans in candidate order; the CPU adds one by one, so
// the two agree to f64 rounding and a draw can differ only for u within ~1e-15 of a boundary.
// (Until issue 11 this kernel sorted logit / T in f32 and weighed exp(v_i - v_0): the rule the
// CPU left in issue 16.)
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
__device__ __forceinline__ double block_scan(double v, double& carry) {
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
__device__ __forceinline__ uint32_t scan_find(const double* p, uint32_t n, double thr, bool reach, double& total) {
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
__device__ __forceinline__ double block_sum_f64(double v) {
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

// The argmax of one row's first `allowed` values, lowest id on ties, from (-inf, id 0); a NaN
// is reported and the row is not written. Contains barriers: the whole block calls it.
__device__ __forceinline__ void greedy_row(const float* row, uint32_t allowed, uint32_t* status, uint32_t r, uint32_t* out) {
  __shared__ Arg part[WARPS];
  Arg best{dsv3::NEG_INF, 0xFFFFFFFFu};
  uint32_t nan = 0xFFFFFFFFu;
  for (uint32_t i = threadIdx.x; i < allowed; i += THREADS) {
    const float v = row[i];
    if (isnan(v)) nan = min(nan, i);
    else if (v > best.v) best = Arg{v, i};  // ascending i: strict > keeps the lowest id
  }
  nan = __reduce_min_sync(dsv3::FULL_MASK, nan);
  for (int o = 16; o > 0; o >>= 1) {
    const Arg x{__shfl_xor_sync(dsv3::FULL_MASK, best.v, o), __shfl_xor_sync(dsv3::FULL_MASK, best.i, o)};
    if (better(x, best)) best = x;
  }
  __shared__ uint32_t row_nan;
  if (threadIdx.x == 0) row_nan = 0xFFFFFFFFu;
  __syncthreads();
  if (threadIdx.x % 32 == 0) {
    part[threadIdx.x / 32] = best;
    if (nan != 0xFFFFFFFFu) atomicMin(&row_nan, nan);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < WARPS; ++w)
      if (better(part[w], best)) best = part[w];
    if (row_nan != 0xFFFFFFFFu) {
      dsv3::report(status, r * allowed + row_nan);
    } else {
      // Nothing above -inf: id 0, as the CPU's fold from (0, -inf).
      *out = best.i == 0xFFFFFFFFu ? 0u : best.i;
    }
  }
  __syncthreads();  // `part` and `row_nan` are reused by the next call
}
}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS) dsv3_sample_greedy(const dsv3_sample_greedy_params p) {
  const uint32_t r = blockIdx.x;
  greedy_row(p.logits + (size_t)r * p.vocab, p.allowed, p.status, r, p.out + r);
}

// __maxnreg__(64) instead of __launch_bounds__(1024): with the latter ptxas keeps this kernel
// to 32 registers and spills; 64 still fit a block of 1024 threads on an SM (64 K registers).
extern "C" __global__ void __maxnreg__(64) dsv3_sample(const dsv3_sample_params p) {
  __shared__ uint32_t nan;
  const uint32_t r = blockIdx.x;
  // Read at each use rather than held in registers (the block's barriers and scans need them).
  const dsv3_sample_row* rp = p.rows + r;
  const float* row = p.logits + (size_t)r * p.vocab;
  if (rp->temperature == 0.0f) {
    greedy_row(row, p.allowed, p.status, r, p.out + r);
    return;
  }
  unsigned long long* key = p.keys + (size_t)r * p.padded;
  double* prob = p.probs + (size_t)r * p.allowed;
  if (threadIdx.x == 0) nan = 0xFFFFFFFFu;
  __syncthreads();

  // Keys: descending key = descending logit (-0 as +0), then ascending id; padding sorts last
  // (key 0 is below every candidate's: ordered() of any non-NaN float is > 0 in its high word).
  for (uint32_t i = threadIdx.x; i < p.padded; i += THREADS) {
    unsigned long long k = 0;
    if (i < p.allowed) {
      const float v = row[i];
      if (isnan(v)) atomicMin(&nan, i);
      k = ((unsigned long long)ordered(v == 0.0f ? 0.0f : v) << 32) | (0xFFFFFFFFu - i);
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

  // Weights of the first n candidates, then probabilities.
  const uint32_t n = rp->top_k > 0 ? min(rp->top_k, p.allowed) : p.allowed;
  const float l0 = unordered((uint32_t)(key[0] >> 32));
  const double t = (double)rp->temperature;
  double part = 0.0;
  for (uint32_t i = threadIdx.x; i < n; i += THREADS) {
    const float li = unordered((uint32_t)(key[i] >> 32));
    const double w = li == l0 ? 1.0 : exp(((double)li - (double)l0) / t);
    prob[i] = w;
    part += w;
  }
  const double total = block_sum_f64(part);
  for (uint32_t i = threadIdx.x; i < n; i += THREADS) prob[i] = prob[i] / total;
  __syncthreads();

  // Nucleus: keep up to the first candidate whose cumulative probability reaches top_p.
  uint32_t kept = n;
  if (rp->top_p < 1.0f) {
    double mass;
    const uint32_t cut = scan_find(prob, n, (double)rp->top_p, true, mass);
    kept = cut < n ? cut + 1 : n;
    for (uint32_t i = threadIdx.x; i < kept; i += THREADS) prob[i] = prob[i] / mass;
    __syncthreads();
  }

  // The draw.
  double unused;
  const uint32_t pick = scan_find(prob, kept, rp->uniform, false, unused);
  if (threadIdx.x == 0) {
    const uint32_t slot = pick < kept ? pick : kept - 1;
    p.out[r] = 0xFFFFFFFFu - (uint32_t)(key[slot] & 0xFFFFFFFFu);
  }
}
