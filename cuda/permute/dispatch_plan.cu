// The MoE dispatch plan on the device (permute::DispatchPlan::build), and the metadata
// gather of the all-to-all packing (a2a::pack / a2a::unpack).
//
// dsv3_dispatch_plan: one block. Pair p (= t * top_k + j) goes to bucket
// b = (ids[p] - id_base) / id_div (experts: base 0, div 1; destination ranks of a2a::pack:
// div = experts per rank; local experts of a2a::unpack: base = first local expert). Counts by
// global atomics, offsets by a serial prefix sum, then one warp hands out the slots in pair
// order, 32 pairs at a time (__match_any_sync groups the lanes of one bucket): within a bucket
// rows are in ascending pair order, exactly the CPU's stable counting sort. An id outside the
// buckets is reported (lowest pair) and nothing else is written.
#include "dsv3/common.cuh"
#include "dsv3/params.h"

namespace {
constexpr int THREADS = 1024;

__device__ __forceinline__ bool bucket_of(const dsv3_dispatch_plan_params& p, uint32_t id, uint32_t* b) {
  if (id < p.id_base) return false;
  *b = (id - p.id_base) / p.id_div;
  return *b < p.buckets;
}
}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS) dsv3_dispatch_plan(const dsv3_dispatch_plan_params p) {
  __shared__ int bad;
  if (threadIdx.x == 0) bad = 0;
  for (uint32_t b = threadIdx.x; b < p.buckets; b += THREADS) p.counts[b] = 0;
  __syncthreads();
  for (uint32_t i = threadIdx.x; i < p.pairs; i += THREADS) {
    uint32_t b;
    if (bucket_of(p, p.ids[i], &b)) {
      atomicAdd(&p.counts[b], 1u);
    } else {
      dsv3::report(p.status, i);
      bad = 1;
    }
  }
  __syncthreads();
  if (bad) return;  // the whole block: `bad` is read after the barrier
  if (threadIdx.x == 0) {
    uint32_t acc = 0;
    for (uint32_t b = 0; b < p.buckets; ++b) {
      p.offsets[b] = acc;
      p.cursor[b] = acc;
      acc += __ldcg(&p.counts[b]);  // the atomics' results, from L2
    }
    p.offsets[p.buckets] = acc;
  }
  __syncthreads();
  if (threadIdx.x >= 32) return;
  const uint32_t lane = threadIdx.x;
  for (uint32_t c0 = 0; c0 < p.pairs; c0 += 32) {
    const uint32_t i = c0 + lane;
    uint32_t b = 0xFFFFFFFFu;
    if (i < p.pairs) bucket_of(p, p.ids[i], &b);
    const uint32_t same = __match_any_sync(dsv3::FULL_MASK, b);
    const uint32_t rank = __popc(same & ((1u << lane) - 1u));
    uint32_t slot = 0;
    if (i < p.pairs) slot = p.cursor[b] + rank;
    __syncwarp();
    if (i < p.pairs) {
      if (rank == 0) p.cursor[b] += __popc(same);  // one lane per bucket
      p.slot_of[i] = slot;
      p.token_of_slot[slot] = i / p.top_k;
      p.pair_of_slot[slot] = i;
    }
    __syncwarp();
  }
}

// The grouped GEMMs' tile list of a plan (dsv3_grouped_tiles_params): one thread walks the
// buckets in order (at most 256 experts and a few hundred tiles at decode sizes), so the list
// is the host's (CudaDevice::groups) in the same order. Launched with one block of 32 threads.
extern "C" __global__ void __launch_bounds__(32) dsv3_grouped_tiles(const dsv3_grouped_tiles_params p) {
  if (threadIdx.x != 0) return;
  uint32_t n = 0;
  for (uint32_t b = 0; b < p.buckets; ++b) {
    const uint32_t r0 = p.offsets[b], r1 = p.offsets[b + 1];
    for (uint32_t r = r0; r < r1; r += 64) {
      if (n < p.max_tiles) p.tiles[n] = dsv3_gemm_tile{b, r, min(64u, r1 - r), 0u};
      ++n;
    }
  }
  *p.n_tiles = min(n, p.max_tiles);
}

// out_expert[s] = expert[order[s]], out_weight[s] = weight[order[s]], and, when asked,
// out_src_slot[s] = order[s], for s < rows (order = a plan's pair_of_slot).
extern "C" __global__ void __launch_bounds__(256) dsv3_a2a_gather_meta(const dsv3_a2a_gather_meta_params p) {
  for (uint32_t s = blockIdx.x * blockDim.x + threadIdx.x; s < p.rows; s += gridDim.x * blockDim.x) {
    const uint32_t o = p.order[s];
    p.out_expert[s] = p.expert[o];
    p.out_weight[s] = p.weight[o];
    if (p.out_src_slot) p.out_src_slot[s] = o;
  }
}
