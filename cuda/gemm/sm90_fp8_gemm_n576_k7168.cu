// sm90 FP8 GEMM for (N, K) = (576, 7168): kv_a_proj_with_mqa (unfused), K = hidden.
// Two instantiations of dsv3/sm90_fp8_gemm.cuh, chosen by the host (src/cuda/sm90_gemm.rs):
// block M 64 (one consumer warpgroup, 256 threads) for groups of <= 64 rows, else block M 128
// (two consumer warpgroups, 384 threads). Block N and stages are listed per kernel.
#include "dsv3/sm90_fp8_gemm.cuh"

// block 64 x 32 x 128, 10 stages of 12288 bytes (wgmma N = 32: 18 CTAs, a 4 MB weight).
extern "C" __global__ void __launch_bounds__(256, 1)
    dsv3_sm90_fp8_gemm_n576_k7168_bm64(const __grid_constant__ dsv3_sm90_fp8_gemm_params p) {
  dsv3::sm90::fp8_gemm<576, 7168, 64, 32, 10>(p);
}

// block 128 x 64 x 128, 7 stages of 24576 bytes.
extern "C" __global__ void __launch_bounds__(384, 1)
    dsv3_sm90_fp8_gemm_n576_k7168_bm128(const __grid_constant__ dsv3_sm90_fp8_gemm_params p) {
  dsv3::sm90::fp8_gemm<576, 7168, 128, 64, 7>(p);
}
