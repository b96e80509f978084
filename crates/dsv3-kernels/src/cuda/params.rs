//! The kernels' parameter structs, field for field as `cuda/include/dsv3/params.h` declares
//! them (`dsv3_act_quant_1x128_params` here is [`ActQuant1x128Params`]). Pointers are device
//! addresses; both sides assert each struct's size, and every struct is padded by hand so that
//! it has no hidden padding bytes.

macro_rules! params {
    ($($(#[$m:meta])* $name:ident ($size:literal) { $($field:ident: $ty:ty),* $(,)? })*) => {$(
        $(#[$m])*
        #[repr(C)]
        #[derive(Debug, Clone, Copy, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
        pub struct $name { $(pub $field: $ty),* }
        const _: () = assert!(std::mem::size_of::<$name>() == $size, "must equal sizeof in params.h");
        // SAFETY: `repr(C)` with only u64/u32/f32 fields and no padding (size asserted above
        // against the C declaration), so its bytes are exactly the C struct the kernel reads.
        #[cfg(feature = "cuda")]
        unsafe impl cudarc::driver::DeviceRepr for $name {}
    )*};
}

params! {
    /// `dsv3_act_quant_1x128`: x `[rows, cols]` → e4m3 q and one scale per 1x128 tile (only
    /// the live rows of a masked layout when `counts` is set).
    ActQuant1x128Params (56) {
        x: u64, q: u64, scales: u64, status: u64, counts: u64, tiles: u32, ue8m0: u32, tiles_per_row: u32, capacity: u32,
    }
    /// `dsv3_rms_norm`.
    RmsNormParams (40) { x: u64, w: u64, out: u64, rows: u32, cols: u32, eps: f32, pad: u32 }
    /// `dsv3_add_rms_norm`.
    AddRmsNormParams (48) { x: u64, residual: u64, w: u64, out: u64, rows: u32, cols: u32, eps: f32, pad: u32 }
    /// `dsv3_silu_mul` (separate or packed gate/up, by `in_stride`).
    SiluMulParams (40) { gate: u64, up: u64, out: u64, rows: u32, cols: u32, in_stride: u32, pad: u32 }
    /// `dsv3_embedding_bf16`.
    EmbeddingBf16Params (48) { table: u64, ids: u64, out: u64, status: u64, tokens: u32, vocab: u32, dim: u32, pad: u32 }
    /// `dsv3_rope`.
    RopeParams (72) {
        x: u64, positions: u64, cos: u64, sin: u64, status: u64,
        tokens: u32, heads: u32, row_stride: u32, head_stride: u32, offset: u32, half: u32, max_pos: u32, pad: u32,
    }
    /// `dsv3_route_noaux_tc`.
    RouteNoauxTcParams (72) {
        logits: u64, bias: u64, indices: u64, weights: u64, status: u64,
        tokens: u32, n_experts: u32, n_group: u32, topk_group: u32, top_k: u32, norm_topk_prob: u32,
        routed_scaling_factor: f32, pad: u32,
    }
    /// `dsv3_permute`.
    PermuteParams (32) { x: u64, token_of_slot: u64, out: u64, rows: u32, hidden: u32 }
    /// `dsv3_unpermute`.
    UnpermuteParams (48) { y: u64, slot_of: u64, weights: u64, out: u64, tokens: u32, top_k: u32, hidden: u32, pad: u32 }
    /// `dsv3_gemm_fp8_simt`.
    GemmFp8SimtParams (56) { a: u64, a_s: u64, w: u64, w_s: u64, out: u64, m: u32, n: u32, k: u32, pad: u32 }
    /// One MoE expert's weight of the grouped GEMMs (`dsv3_gemm_expert`, an array element).
    GemmExpert (16) { w: u64, w_s: u64 }
    /// One row tile of the grouped GEMMs (`dsv3_gemm_tile`, an array element).
    GemmTile (16) { expert: u32, row0: u32, rows: u32, pad: u32 }
    /// `dsv3_gemm_fp8_simt_grouped`.
    GemmFp8SimtGroupedParams (72) {
        a: u64, a_s: u64, experts: u64, tiles: u64, out: u64, n_tiles: u64, stack_w: u64, stack_s: u64, n: u32, k: u32,
    }
    /// `dsv3_gemm_dequant_simt`.
    GemmDequantSimtParams (48) { a: u64, w: u64, w_s: u64, out: u64, m: u32, n: u32, k: u32, pad: u32 }
    /// `dsv3_gemm_dequant_simt_grouped`.
    GemmDequantSimtGroupedParams (64) {
        a: u64, experts: u64, tiles: u64, out: u64, n_tiles: u64, stack_w: u64, stack_s: u64, n: u32, k: u32,
    }
    /// `dsv3_gemm_bf16_simt`.
    GemmBf16SimtParams (40) { a: u64, w: u64, out: u64, m: u32, n: u32, k: u32, pad: u32 }
    /// `dsv3_add_assign`.
    AddAssignParams (24) { acc: u64, x: u64, n: u32, pad: u32 }
    /// `dsv3_softmax`.
    SoftmaxParams (24) { x: u64, out: u64, rows: u32, cols: u32 }
    /// `dsv3_route_softmax`.
    RouteSoftmaxParams (64) {
        logits: u64, indices: u64, weights: u64, status: u64,
        tokens: u32, n_experts: u32, n_group: u32, topk_group: u32, top_k: u32, norm_topk_prob: u32, group_limited: u32,
        routed_scaling_factor: f32,
    }
    /// `dsv3_dispatch_plan`.
    DispatchPlanParams (88) {
        ids: u64, counts: u64, offsets: u64, slot_of: u64, token_of_slot: u64, pair_of_slot: u64, cursor: u64, status: u64,
        pairs: u32, top_k: u32, buckets: u32, id_base: u32, id_div: u32, pad: u32,
    }
    /// `dsv3_grouped_tiles`.
    GroupedTilesParams (32) { offsets: u64, tiles: u64, n_tiles: u64, buckets: u32, max_tiles: u32 }
    /// `dsv3_a2a_gather_meta`.
    A2aGatherMetaParams (56) {
        order: u64, expert: u64, weight: u64, out_expert: u64, out_weight: u64, out_src_slot: u64, rows: u32, pad: u32,
    }
    /// `dsv3_mla_cache_write`.
    MlaCacheWriteParams (48) { kv: u64, norm_w: u64, slots: u64, pool: u64, tokens: u32, kv_lora: u32, rope: u32, eps: f32 }
    /// `dsv3_mla_cache_gather`.
    MlaCacheGatherParams (64) {
        pool: u64, table: u64, cu: u64, c_kv: u64, k_pe: u64,
        keys: u32, seqs: u32, max_blocks: u32, page_size: u32, kv_lora: u32, rope: u32,
    }
    /// `dsv3_mla_absorb_q`.
    MlaAbsorbQParams (48) { q: u64, w: u64, out: u64, rows: u32, heads: u32, nope: u32, rope: u32, kv_lora: u32, accumulate: u32 }
    /// `dsv3_mla_expand_v`.
    MlaExpandVParams (40) { o_lat: u64, w: u64, out: u64, rows: u32, heads: u32, v: u32, kv_lora: u32 }
    /// `dsv3_mla_decode`.
    MlaDecodeParams (72) {
        q: u64, pool: u64, table: u64, kv_lens: u64, out: u64,
        batch: u32, heads: u32, max_blocks: u32, page_size: u32, width: u32, kv_lora: u32, scale: f32, pad: u32,
    }
    /// `dsv3_mla_prefill`.
    MlaPrefillParams (96) {
        q: u64, k_nope: u64, k_pe: u64, v: u64, q_pos: u64, cu_q: u64, cu_k: u64, out: u64,
        tokens: u32, seqs: u32, heads: u32, nope: u32, rope: u32, v_dim: u32, scale: f32, pad: u32,
    }
    /// `dsv3_sample_greedy`.
    SampleGreedyParams (40) { logits: u64, out: u64, status: u64, rows: u32, vocab: u32, allowed: u32, pad: u32 }
    /// `dsv3_sample` (its rows are [`crate::sample::SampleRow`]s, `dsv3_sample_row`).
    SampleParams (64) {
        logits: u64, rows: u64, keys: u64, probs: u64, out: u64, status: u64, n_rows: u32, vocab: u32, allowed: u32, padded: u32,
    }
}
const _: () = assert!(size_of::<crate::sample::SampleRow>() == 24, "must equal sizeof(dsv3_sample_row) in params.h");
