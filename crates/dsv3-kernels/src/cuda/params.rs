//! The kernels' parameter structs, field for field as `cuda/include/dsv3/params.h` declares
//! them (`dsv3_act_quant_1x128_params` here is [`ActQuant1x128Params`]). Pointers are device
//! addresses; both sides assert each struct's size, and every struct is padded by hand so that
//! it has no hidden padding bytes.

macro_rules! params {
    ($($(#[$m:meta])* $name:ident ($size:literal) { $($field:ident: $ty:ty),* $(,)? })*) => {$(
        $(#[$m])*
        #[repr(C)]
        #[derive(Debug, Clone, Copy, Default, PartialEq)]
        pub struct $name { $(pub $field: $ty),* }
        const _: () = assert!(std::mem::size_of::<$name>() == $size, "must equal sizeof in params.h");
        // SAFETY: `repr(C)` with only u64/u32/f32 fields and no padding (size asserted above
        // against the C declaration), so its bytes are exactly the C struct the kernel reads.
        #[cfg(feature = "cuda")]
        unsafe impl cudarc::driver::DeviceRepr for $name {}
    )*};
}

params! {
    /// `dsv3_act_quant_1x128`: x `[rows, cols]` → e4m3 q and one scale per 1x128 tile.
    ActQuant1x128Params (40) { x: u64, q: u64, scales: u64, status: u64, tiles: u32, ue8m0: u32 }
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
}
