// Parameters of the Hopper FP8 GEMM family (cuda/gemm/sm90_fp8_gemm_*.cu): one struct for
// every shape-specialised instantiation, passed by value as the only kernel argument
// (`const __grid_constant__`, so the TMA descriptors inside it stay in parameter space, where
// cp.async.bulk.tensor reads them). Mirrored field for field by `Sm90Fp8GemmParams` in
// crates/dsv3-kernels/src/cuda/sm90_gemm/launch.rs; both sides assert the size.
//
// out[r, n] = sum_kb (sum_{k in kb} A[r, k] B[g N + n, k]) a_s[r, kb] b_s[g ceil(N/128) + n/128, kb]
// for the rows r of group g. Dense is one contiguous group.
#pragma once
#include <stdint.h>

#define DSV3_SM90_MAX_GROUPS 256

// The 128 opaque bytes that cuTensorMapEncodeTiled writes (CUtensorMap).
struct alignas(128) dsv3_tma_map {
  uint64_t opaque[16];
};

struct alignas(128) dsv3_sm90_fp8_gemm_params {
  dsv3_tma_map tma_a;  // A [a_rows, K] e4m3, box {128, BM}, 128-byte swizzle
  dsv3_tma_map tma_b;  // B [groups N, K] e4m3, box {128, BN}, 128-byte swizzle
  const float* a_s;    // [a_rows, K/128]
  const float* b_s;    // [groups ceil(N/128), K/128]
  void* out;           // [a_rows, N], f32 or bf16 (out_bf16)
  uint32_t a_rows;     // rows of A, a_s and out
  uint32_t groups;     // 1 ..= DSV3_SM90_MAX_GROUPS
  uint32_t masked;     // 0: contiguous, group g = rows rows[g] .. rows[g+1]; 1: masked, group g =
                       // rows g capacity .. (g+1) capacity, of which the first rows[g] hold data
  uint32_t capacity;   // masked only
  uint32_t out_bf16;   // 0: f32 out, 1: bf16 out (round to nearest even)
  uint32_t tiles;      // tile0[groups]
  uint32_t rows[DSV3_SM90_MAX_GROUPS + 1];   // contiguous: offsets; masked: counts (<= capacity)
  uint32_t tile0[DSV3_SM90_MAX_GROUPS + 1];  // first tile of each group (the host's prefix sum)
  uint32_t pad[18];                          // to the struct's 128-byte alignment, explicitly
};
static_assert(sizeof(dsv3_sm90_fp8_gemm_params) == 2432, "mirror in sm90_gemm/launch.rs");

// gemm/sm90_fp8_gemm_cast.cu: out[i] = bf16(x[i]) (round to nearest even), for the bf16 output
// of the fallback path (the simple kernel writes f32).
struct dsv3_sm90_fp8_gemm_cast_bf16_params {
  const float* x;
  uint16_t* out;
  uint64_t n;
};
static_assert(sizeof(dsv3_sm90_fp8_gemm_cast_bf16_params) == 24, "mirror in sm90_gemm/launch.rs");
