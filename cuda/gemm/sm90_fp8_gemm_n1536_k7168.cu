// sm90 FP8 GEMM for (N, K) = (1536, 7168): q_a_proj (unfused), K = hidden.
// Two instantiations of dsv3/sm90_fp8_gemm.cuh, chosen by the host (src/cuda/sm90_gemm.rs):
// block M 64 (one consumer warpgroup, 256 threads) for groups of <= 64 rows, else block M 128
// (two consumer warpgroups, 384 threads). Block N and stages are listed per kernel.
#include "dsv3/sm90_fp8_gemm.cuh"

// block 64 x 32 x 128, 10 stages of 12288 bytes.
extern "C" __global__ void __launch_bounds__(256, 1)
    dsv3_sm90_fp8_gemm_n1536_k7168_bm64(const __grid_constant__ dsv3_sm90_fp8_gemm_params p) {
  dsv3::sm90::fp8_gemm<1536, 7168, 64, 32, 10>(p);
}

// block 128 x 128 x 128, 7 stages of 32768 bytes.
extern "C" __global__ void __launch_bounds__(384, 1)
    dsv3_sm90_fp8_gemm_n1536_k7168_bm128(const __grid_constant__ dsv3_sm90_fp8_gemm_params p) {
  dsv3::sm90::fp8_gemm<1536, 7168, 128, 128, 7>(p);
}
