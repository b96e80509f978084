// sm90 FP8 GEMM for (N, K) = (7168, 18432): dense-layer down_proj, K = intermediate.
// Two instantiations of dsv3/sm90_fp8_gemm.cuh, chosen by the host (src/cuda/sm90_gemm.rs):
// block M 64 (one consumer warpgroup, 256 threads) for groups of <= 64 rows, else block M 128
// (two consumer warpgroups, 384 threads). Block N and stages are listed per kernel.
#include "dsv3/sm90_fp8_gemm.cuh"

// block 64 x 56 x 128, 10 stages of 15360 bytes.
extern "C" __global__ void __launch_bounds__(256, 1)
    dsv3_sm90_fp8_gemm_n7168_k18432_bm64(const __grid_constant__ dsv3_sm90_fp8_gemm_params p) {
  dsv3::sm90::fp8_gemm<7168, 18432, 64, 56, 10>(p);
}

// block 128 x 160 x 128, 6 stages of 36864 bytes.
extern "C" __global__ void __launch_bounds__(384, 1)
    dsv3_sm90_fp8_gemm_n7168_k18432_bm128(const __grid_constant__ dsv3_sm90_fp8_gemm_params p) {
  dsv3::sm90::fp8_gemm<7168, 18432, 128, 160, 6>(p);
}
