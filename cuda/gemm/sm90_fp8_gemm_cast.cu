// f32 -> bf16 (round to nearest even) for the bf16 output of the sm90 FP8 GEMM's fallback
// path: the simple kernel (fp8_gemm_simt.cu) writes f32, this narrows it. Grid-stride,
// one value per thread and step.
#include <cuda_bf16.h>

#include "dsv3/sm90_fp8_gemm.h"

extern "C" __global__ void __launch_bounds__(256) dsv3_sm90_fp8_gemm_cast_bf16(const dsv3_sm90_fp8_gemm_cast_bf16_params p) {
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) {
    p.out[i] = __bfloat16_as_ushort(__float2bfloat16_rn(p.x[i]));
  }
}
