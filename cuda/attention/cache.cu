// The paged latent cache of MLA (attention::cache_write, attention::gather); layout in
// crates/dsv3-kernels/src/attention.rs: pool [num_pages, page_size, kv_lora + rope] f32, the
// token at position pos of a sequence in page table[pos / page_size], slot pos % page_size.
//
// dsv3_mla_cache_write: one block per new token t: RMSNorm of the latent kv[t, 0..kv_lora]
// with norm_w (kv_a_layernorm; the f32 block tree of dsv3_rms_norm, so the two agree) to the
// pool row slots[t], then k_pe = kv[t, kv_lora..] copied. Slots are validated (in range,
// distinct) by the wrapper.
//
// dsv3_mla_cache_gather: one block per gathered row k: its sequence i is found in the prefix
// sums `cu` of the sequence lengths (cu[i] <= k < cu[i + 1]), its position is k - cu[i];
// c_kv[k] and k_pe[k] are copied out of the pool. Exact copies.
#include "dsv3/common.cuh"
#include "dsv3/params.h"
#include "dsv3/reduce.cuh"

namespace {
constexpr int THREADS = 256;
}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS) dsv3_mla_cache_write(const dsv3_mla_cache_write_params p) {
  const uint32_t w = p.kv_lora + p.rope;
  const float* row = p.kv + (size_t)blockIdx.x * w;
  float* dst = p.pool + (size_t)p.slots[blockIdx.x] * w;
  dsv3::rms_scale_row<THREADS>(row, p.norm_w, dst, p.kv_lora, dsv3::block_sum_squares<THREADS>(row, p.kv_lora), p.eps);
  for (uint32_t i = threadIdx.x; i < p.rope; i += THREADS) dst[p.kv_lora + i] = row[p.kv_lora + i];
}

extern "C" __global__ void __launch_bounds__(THREADS) dsv3_mla_cache_gather(const dsv3_mla_cache_gather_params p) {
  const uint32_t w = p.kv_lora + p.rope;
  for (uint32_t k = blockIdx.x; k < p.keys; k += gridDim.x) {
    // The last sequence i with cu[i] <= k (sequences of length 0 are skipped over).
    uint32_t lo = 0, hi = p.seqs;  // invariant: cu[lo] <= k < cu[hi]
    while (hi - lo > 1) {
      const uint32_t mid = (lo + hi) / 2;
      if (p.cu[mid] <= k) lo = mid; else hi = mid;
    }
    const uint32_t pos = k - p.cu[lo];
    const uint32_t page = p.table[(size_t)lo * p.max_blocks + pos / p.page_size];
    const float* src = p.pool + ((size_t)page * p.page_size + pos % p.page_size) * w;
    for (uint32_t i = threadIdx.x; i < w; i += THREADS) {
      if (i < p.kv_lora) p.c_kv[(size_t)k * p.kv_lora + i] = src[i];
      else p.k_pe[(size_t)k * p.rope + (i - p.kv_lora)] = src[i];
    }
  }
}
