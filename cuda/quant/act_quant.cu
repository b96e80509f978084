// Per-token activation quantisation in 1x128 tiles (fp8::act_quant): one warp per tile,
// 4 values per lane. Bit-exact with the CPU: amax is order-independent, and the scale and
// the e4m3 codes use the same scalar functions (dsv3/common.cuh).
// With `counts` (the masked layout of gemm::grouped_masked: `capacity` rows per expert), only
// the first counts[e] rows of each expert's block are read and written.
#include "dsv3/common.cuh"
#include "dsv3/params.h"

extern "C" __global__ void __launch_bounds__(256) dsv3_act_quant_1x128(const dsv3_act_quant_1x128_params p) {
  const uint32_t tile = blockIdx.x * 8 + threadIdx.x / 32;
  const uint32_t lane = threadIdx.x % 32;
  if (tile >= p.tiles) return;  // whole warps leave together
  if (p.counts) {
    const uint32_t row = tile / p.tiles_per_row;
    if (row % p.capacity >= p.counts[row / p.capacity]) return;  // a padding row: skipped
  }
  const float4 v = reinterpret_cast<const float4*>(p.x)[(size_t)tile * 32 + lane];
  const float a[4] = {v.x, v.y, v.z, v.w};
  float amax = 0.0f;
  bool finite = true;
  for (int i = 0; i < 4; ++i) {
    const float m = fabsf(a[i]);
    finite &= m <= 3.40282347e38f;
    amax = fmaxf(amax, m);
  }
  if (!__all_sync(dsv3::FULL_MASK, finite)) {
    if (lane == 0) dsv3::report(p.status, tile);
    return;
  }
  amax = dsv3::warp_max(amax);
  const float s = dsv3::tile_scale(amax, p.ue8m0 != 0);
  uint32_t packed = 0;
  for (int i = 0; i < 4; ++i) packed |= (uint32_t)dsv3::encode_e4m3(dsv3::div_rn(a[i], s)) << (8 * i);
  reinterpret_cast<uint32_t*>(p.q)[(size_t)tile * 32 + lane] = packed;
  if (lane == 0) p.scales[tile] = s;
}
