// One plain parameter struct per kernel, passed by value as the kernel's only argument.
// Each is mirrored field for field by a `#[repr(C)]` struct of the same name (CamelCase) in
// crates/dsv3-kernels/src/cuda/params.rs; both sides assert the size. Pointers are device
// addresses (8 bytes), counts are 32-bit (the Rust wrappers check that they fit), and every
// struct is padded by hand to a multiple of 8 bytes so that it has no hidden padding.
#pragma once
#include <stdint.h>

// Every kernel that checks its input reports the lowest bad index `i` as `atomicMax(status,
// ~i)` on one u32 that the wrapper zeroes first: 0 means no error.

// quant/act_quant.cu: x [rows, cols] f32 -> q [rows, cols] e4m3, scales [rows, cols / 128].
struct dsv3_act_quant_1x128_params {
  const float* x;
  uint8_t* q;
  float* scales;
  uint32_t* status;  // lowest tile (row * cols/128 + t) holding NaN or inf
  uint32_t tiles;    // rows * cols / 128
  uint32_t ue8m0;    // 1: round each scale up to a power of two
};
static_assert(sizeof(dsv3_act_quant_1x128_params) == 40, "mirror in params.rs");

// norm/rms_norm.cu: out = w * (x * rsqrt(mean(x^2) + eps)) per row.
struct dsv3_rms_norm_params {
  const float* x;
  const float* w;
  float* out;
  uint32_t rows;
  uint32_t cols;
  float eps;
  uint32_t pad;
};
static_assert(sizeof(dsv3_rms_norm_params) == 40, "mirror in params.rs");

// norm/rms_norm.cu: residual += x; out = rms_norm(residual).
struct dsv3_add_rms_norm_params {
  const float* x;
  float* residual;
  const float* w;
  float* out;
  uint32_t rows;
  uint32_t cols;
  float eps;
  uint32_t pad;
};
static_assert(sizeof(dsv3_add_rms_norm_params) == 48, "mirror in params.rs");

// act/silu_mul.cu: out[r, i] = silu(gate[r * in_stride + i]) * up[r * in_stride + i];
// in_stride = cols for two buffers, 2 * cols for a packed [gate | up] row (up = gate + cols).
struct dsv3_silu_mul_params {
  const float* gate;
  const float* up;
  float* out;
  uint32_t rows;
  uint32_t cols;
  uint32_t in_stride;
  uint32_t pad;
};
static_assert(sizeof(dsv3_silu_mul_params) == 40, "mirror in params.rs");

// embed/embedding.cu: out[t, :] = f32(table[ids[t], :]), table [vocab, dim] bf16 bits.
struct dsv3_embedding_bf16_params {
  const uint16_t* table;
  const uint32_t* ids;
  float* out;
  uint32_t* status;  // lowest position t with ids[t] >= vocab
  uint32_t tokens;
  uint32_t vocab;
  uint32_t dim;
  uint32_t pad;
};
static_assert(sizeof(dsv3_embedding_bf16_params) == 48, "mirror in params.rs");

// rope/rope.cu: rotates pair i of each rope vector of x in place by the table row of its
// token's position: (a, b) -> (a c - b s, a s + b c). cos/sin are [max_pos, half].
struct dsv3_rope_params {
  float* x;
  const uint32_t* positions;
  const float* cos;
  const float* sin;
  uint32_t* status;  // lowest token whose position is >= max_pos
  uint32_t tokens;
  uint32_t heads;
  uint32_t row_stride;
  uint32_t head_stride;
  uint32_t offset;
  uint32_t half;     // rope_dim / 2
  uint32_t max_pos;
  uint32_t pad;
};
static_assert(sizeof(dsv3_rope_params) == 72, "mirror in params.rs");

// gating/noaux_tc.cu: DeepSeek-V3 routing, one warp per token (see the kernel).
struct dsv3_route_noaux_tc_params {
  const float* logits;  // [tokens, n_experts]
  const float* bias;    // [n_experts]
  uint32_t* indices;    // [tokens, top_k]
  float* weights;       // [tokens, top_k]
  uint32_t* status;     // lowest token * n_experts + expert with a non-finite logit
  uint32_t tokens;
  uint32_t n_experts;   // <= 256
  uint32_t n_group;     // <= 32, divides n_experts
  uint32_t topk_group;
  uint32_t top_k;       // <= 32
  uint32_t norm_topk_prob;
  float routed_scaling_factor;
  uint32_t pad;
};
static_assert(sizeof(dsv3_route_noaux_tc_params) == 72, "mirror in params.rs");

// permute/permute.cu: out[s, :] = x[token_of_slot[s], :] for s < rows.
struct dsv3_permute_params {
  const float* x;
  const uint32_t* token_of_slot;
  float* out;
  uint32_t rows;
  uint32_t hidden;
};
static_assert(sizeof(dsv3_permute_params) == 32, "mirror in params.rs");

// permute/permute.cu: out[t, c] = sum_j weights[t, j] * y[slot_of[t, j], c], ascending j.
struct dsv3_unpermute_params {
  const float* y;
  const uint32_t* slot_of;
  const float* weights;
  float* out;
  uint32_t tokens;
  uint32_t top_k;
  uint32_t hidden;
  uint32_t pad;
};
static_assert(sizeof(dsv3_unpermute_params) == 48, "mirror in params.rs");

// gemm/fp8_gemm_simt.cu: out[M, N] = a · wᵀ on e4m3 codes, both block-scaled:
// a_s [M, K/128], w_s [ceil(N/128), K/128]; K % 128 == 0.
struct dsv3_gemm_fp8_simt_params {
  const uint8_t* a;
  const float* a_s;
  const uint8_t* w;
  const float* w_s;
  float* out;
  uint32_t m;
  uint32_t n;
  uint32_t k;
  uint32_t pad;
};
static_assert(sizeof(dsv3_gemm_fp8_simt_params) == 56, "mirror in params.rs");
