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
// With `counts` (masked layout, `capacity` rows per expert), rows past counts[e] are skipped.
struct dsv3_act_quant_1x128_params {
  const float* x;
  uint8_t* q;
  float* scales;
  uint32_t* status;        // lowest tile (row * cols/128 + t) holding NaN or inf
  const uint32_t* counts;  // null, or [rows / capacity] live rows per expert
  uint32_t tiles;          // rows * cols / 128
  uint32_t ue8m0;          // 1: round each scale up to a power of two
  uint32_t tiles_per_row;  // cols / 128
  uint32_t capacity;       // rows per expert when counts is set
};
static_assert(sizeof(dsv3_act_quant_1x128_params) == 56, "mirror in params.rs");

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

// gemm/*_simt.cu, grouped: one MoE expert's weight (codes and 128x128 scales).
struct dsv3_gemm_expert {
  const uint8_t* w;
  const float* w_s;
};
static_assert(sizeof(dsv3_gemm_expert) == 16, "mirror in params.rs");

// gemm/*_simt.cu, grouped: rows row0..row0+rows (<= 64) of `a` and `out` against `expert`.
struct dsv3_gemm_tile {
  uint32_t expert;
  uint32_t row0;
  uint32_t rows;
  uint32_t pad;
};
static_assert(sizeof(dsv3_gemm_tile) == 16, "mirror in params.rs");

// gemm/fp8_gemm_simt.cu: dsv3_gemm_fp8_simt per tile of `tiles` (grid.y = number of tiles,
// or, with `n_tiles`, at least *n_tiles: the rows past it exit). Expert e's weight is
// experts[e], or, when `experts` is null, entry e of the stack at stack_w / stack_s
// (n·k codes and ceil(n/128)·ceil(k/128) scales per entry).
struct dsv3_gemm_fp8_simt_grouped_params {
  const uint8_t* a;
  const float* a_s;
  const dsv3_gemm_expert* experts;
  const dsv3_gemm_tile* tiles;
  float* out;
  const uint32_t* n_tiles;
  const uint8_t* stack_w;
  const float* stack_s;
  uint32_t n;
  uint32_t k;
};
static_assert(sizeof(dsv3_gemm_fp8_simt_grouped_params) == 72, "mirror in params.rs");

// gemm/dense_gemm_simt.cu: out[M, N] = a[M, K] f32 · dequant(w)ᵀ, w [N, K] e4m3 with
// w_s [ceil(N/128), ceil(K/128)].
struct dsv3_gemm_dequant_simt_params {
  const float* a;
  const uint8_t* w;
  const float* w_s;
  float* out;
  uint32_t m;
  uint32_t n;
  uint32_t k;
  uint32_t pad;
};
static_assert(sizeof(dsv3_gemm_dequant_simt_params) == 48, "mirror in params.rs");

// gemm/dense_gemm_simt.cu: dsv3_gemm_dequant_simt per tile of `tiles`.
struct dsv3_gemm_dequant_simt_grouped_params {
  const float* a;
  const dsv3_gemm_expert* experts;  // or null: the stack at stack_w / stack_s (as fp8 grouped)
  const dsv3_gemm_tile* tiles;
  float* out;
  const uint32_t* n_tiles;          // or null: grid.y tiles
  const uint8_t* stack_w;
  const float* stack_s;
  uint32_t n;
  uint32_t k;
};
static_assert(sizeof(dsv3_gemm_dequant_simt_grouped_params) == 64, "mirror in params.rs");

// gemm/dense_gemm_simt.cu: out[M, N] = a[M, K] f32 · wᵀ, w [N, K] bf16 bits.
struct dsv3_gemm_bf16_simt_params {
  const float* a;
  const uint16_t* w;
  float* out;
  uint32_t m;
  uint32_t n;
  uint32_t k;
  uint32_t pad;
};
static_assert(sizeof(dsv3_gemm_bf16_simt_params) == 40, "mirror in params.rs");

// act/add_assign.cu: acc[i] += x[i], i < n.
struct dsv3_add_assign_params {
  float* acc;
  const float* x;
  uint32_t n;
  uint32_t pad;
};
static_assert(sizeof(dsv3_add_assign_params) == 24, "mirror in params.rs");

// act/softmax.cu: out = softmax of each row of x [rows, cols].
struct dsv3_softmax_params {
  const float* x;
  float* out;
  uint32_t rows;
  uint32_t cols;
};
static_assert(sizeof(dsv3_softmax_params) == 24, "mirror in params.rs");

// gating/route_softmax.cu: softmax routing, one warp per token (see the kernel).
struct dsv3_route_softmax_params {
  const float* logits;  // [tokens, n_experts]
  uint32_t* indices;    // [tokens, top_k]
  float* weights;       // [tokens, top_k]
  uint32_t* status;     // lowest token * n_experts + expert with a non-finite logit
  uint32_t tokens;
  uint32_t n_experts;   // <= 256
  uint32_t n_group;     // <= 32, divides n_experts (group-limited only)
  uint32_t topk_group;
  uint32_t top_k;       // <= 32
  uint32_t norm_topk_prob;
  uint32_t group_limited;  // 0: SoftmaxGreedy, 1: GroupLimitedGreedy
  float routed_scaling_factor;
};
static_assert(sizeof(dsv3_route_softmax_params) == 64, "mirror in params.rs");

// permute/dispatch_plan.cu: the stable counting sort of pairs by bucket (see the kernel).
struct dsv3_dispatch_plan_params {
  const uint32_t* ids;      // [pairs]
  uint32_t* counts;         // [buckets]
  uint32_t* offsets;        // [buckets + 1]
  uint32_t* slot_of;        // [pairs]
  uint32_t* token_of_slot;  // [pairs]
  uint32_t* pair_of_slot;   // [pairs]
  uint32_t* cursor;         // [buckets] scratch
  uint32_t* status;         // lowest pair whose id is outside the buckets
  uint32_t pairs;
  uint32_t top_k;
  uint32_t buckets;
  uint32_t id_base;
  uint32_t id_div;
  uint32_t pad;
};
static_assert(sizeof(dsv3_dispatch_plan_params) == 88, "mirror in params.rs");

// permute/dispatch_plan.cu: the grouped GEMMs' tile list of a plan, on the device: for each
// bucket b in order, tiles of at most 64 rows of offsets[b]..offsets[b+1]; *n_tiles = their
// number (never more than max_tiles, the length of `tiles`).
struct dsv3_grouped_tiles_params {
  const uint32_t* offsets;  // [buckets + 1]
  dsv3_gemm_tile* tiles;    // [max_tiles]
  uint32_t* n_tiles;        // [1]
  uint32_t buckets;
  uint32_t max_tiles;
};
static_assert(sizeof(dsv3_grouped_tiles_params) == 32, "mirror in params.rs");

// permute/dispatch_plan.cu: per-row metadata in a plan's order (a2a packing).
struct dsv3_a2a_gather_meta_params {
  const uint32_t* order;   // [rows] source index of each row
  const uint32_t* expert;  // [sources]
  const float* weight;     // [sources]
  uint32_t* out_expert;    // [rows]
  float* out_weight;       // [rows]
  uint32_t* out_src_slot;  // null, or [rows]: order itself
  uint32_t rows;
  uint32_t pad;
};
static_assert(sizeof(dsv3_a2a_gather_meta_params) == 56, "mirror in params.rs");

// attention/cache.cu: pool[slots[t]] = [rms_norm(kv[t, ..kv_lora]) * norm_w | kv[t, kv_lora..]].
struct dsv3_mla_cache_write_params {
  const float* kv;      // [tokens, kv_lora + rope]
  const float* norm_w;  // [kv_lora]
  const uint32_t* slots;
  float* pool;          // [num_pages * page_size, kv_lora + rope]
  uint32_t tokens;
  uint32_t kv_lora;
  uint32_t rope;
  float eps;
};
static_assert(sizeof(dsv3_mla_cache_write_params) == 48, "mirror in params.rs");

// attention/cache.cu: the sequences' cached rows, out of the pool into c_kv and k_pe.
struct dsv3_mla_cache_gather_params {
  const float* pool;
  const uint32_t* table;  // [seqs, max_blocks]
  const uint32_t* cu;     // [seqs + 1] prefix sums of the sequence lengths
  float* c_kv;            // [keys, kv_lora]
  float* k_pe;            // [keys, rope]
  uint32_t keys;
  uint32_t seqs;
  uint32_t max_blocks;
  uint32_t page_size;
  uint32_t kv_lora;
  uint32_t rope;
};
static_assert(sizeof(dsv3_mla_cache_gather_params) == 64, "mirror in params.rs");

// attention/absorb.cu: out[t, h] = [W_UK[h]ᵀ q_nope[t, h] | q_pe[t, h]] (or += the product).
struct dsv3_mla_absorb_q_params {
  const float* q;     // [rows, heads, nope + rope]
  const uint16_t* w;  // [heads * nope, kv_lora] bf16 bits
  float* out;         // [rows, heads, kv_lora + rope]
  uint32_t rows;
  uint32_t heads;
  uint32_t nope;      // <= 256
  uint32_t rope;
  uint32_t kv_lora;
  uint32_t accumulate;
};
static_assert(sizeof(dsv3_mla_absorb_q_params) == 48, "mirror in params.rs");

// attention/absorb.cu: out[t, h·v + e] = Σ_c W_UV[h·v + e, c] · o_lat[t, h, c].
struct dsv3_mla_expand_v_params {
  const float* o_lat;  // [rows, heads, kv_lora]
  const uint16_t* w;   // [heads * v, kv_lora] bf16 bits
  float* out;          // [rows, heads * v]
  uint32_t rows;
  uint32_t heads;
  uint32_t v;
  uint32_t kv_lora;    // <= 1024
};
static_assert(sizeof(dsv3_mla_expand_v_params) == 40, "mirror in params.rs");

// attention/attend.cu: absorbed decode over the paged latent cache.
struct dsv3_mla_decode_params {
  const float* q;         // [batch, heads, width]
  const float* pool;      // [num_pages * page_size, width]
  const uint32_t* table;  // [batch, max_blocks]
  const uint32_t* kv_lens;  // [batch]
  float* out;             // [batch, heads, kv_lora]
  uint32_t batch;
  uint32_t heads;
  uint32_t max_blocks;
  uint32_t page_size;
  uint32_t width;         // kv_lora + rope, <= 640
  uint32_t kv_lora;       // <= 512
  float scale;
  uint32_t pad;
};
static_assert(sizeof(dsv3_mla_decode_params) == 72, "mirror in params.rs");

// attention/attend.cu: expanded causal prefill of a batch of sequences.
struct dsv3_mla_prefill_params {
  const float* q;        // [tokens, heads, nope + rope]
  const float* k_nope;   // [keys, heads, nope]
  const float* k_pe;     // [keys, rope]
  const float* v;        // [keys, heads, v_dim]
  const uint32_t* q_pos;  // [tokens]
  const uint32_t* cu_q;   // [seqs + 1]
  const uint32_t* cu_k;   // [seqs + 1]
  float* out;            // [tokens, heads * v_dim]
  uint32_t tokens;
  uint32_t seqs;
  uint32_t heads;
  uint32_t nope;
  uint32_t rope;         // nope + rope <= 256
  uint32_t v_dim;        // <= 256
  float scale;
  uint32_t pad;
};
static_assert(sizeof(dsv3_mla_prefill_params) == 96, "mirror in params.rs");

// sample/sample.cu: argmax of logits[r, ..allowed] per row.
struct dsv3_sample_greedy_params {
  const float* logits;  // [rows, vocab]
  uint32_t* out;        // [rows]
  uint32_t* status;     // lowest row * allowed + id holding NaN
  uint32_t rows;
  uint32_t vocab;
  uint32_t allowed;
  uint32_t pad;
};
static_assert(sizeof(dsv3_sample_greedy_params) == 40, "mirror in params.rs");

// sample/sample.cu: one row's sampling parameters (sample::SampleRow).
struct dsv3_sample_row {
  float temperature;  // 0: greedy
  float top_p;        // in (0, 1]
  uint32_t top_k;     // 0: all
  uint32_t pad;
  double uniform;     // in [0, 1)
};
static_assert(sizeof(dsv3_sample_row) == 24, "mirror in sample.rs (SampleRow)");

// sample/sample.cu: one token per row, each row with its own parameters (sample::sample_rows).
struct dsv3_sample_params {
  const float* logits;             // [rows, vocab]
  const dsv3_sample_row* rows;     // [rows]
  unsigned long long* keys;        // [rows, padded] scratch
  double* probs;                   // [rows, allowed] scratch
  uint32_t* out;                   // [rows]
  uint32_t* status;                // lowest row * allowed + id holding NaN
  uint32_t n_rows;
  uint32_t vocab;
  uint32_t allowed;                // candidates per row, min(allowed, vocab) >= 1
  uint32_t padded;                 // next power of two >= allowed
};
static_assert(sizeof(dsv3_sample_params) == 64, "mirror in params.rs");
