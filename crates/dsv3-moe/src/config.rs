//! Layer configurations, validated once at construction with errors naming the field.

use crate::error::{Result, config};
use dsv3_kernels::fp8::BLOCK;
use dsv3_kernels::gating::RouteCfg;
use dsv3_kernels::gemm::GemmPath;

/// A dense SwiGLU MLP: `down(silu(gate x) ⊙ up x)` (docs/model.md §3.8). Used by the dense
/// layers (`< first_k_dense_replace`), by every routed expert and by the shared experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DenseMlpConfig {
    /// Model width (`hidden_size`), the input and output width.
    pub hidden: usize,
    /// Inner width (`intermediate_size` for dense layers, `moe_intermediate_size` per expert).
    pub intermediate: usize,
    /// Numeric path of the three FP8 GEMMs.
    pub gemm_path: GemmPath,
}

impl DenseMlpConfig {
    /// `hidden → intermediate → hidden` on the reference GEMM path.
    pub fn new(hidden: usize, intermediate: usize) -> DenseMlpConfig {
        DenseMlpConfig { hidden, intermediate, gemm_path: GemmPath::Reference }
    }

    /// DeepSeek-V3's dense layers: 7168 → 18432 → 7168.
    pub fn deepseek_v3() -> DenseMlpConfig {
        Self::new(7168, 18432)
    }

    /// The same MLP on another GEMM path.
    pub fn with_gemm_path(self, gemm_path: GemmPath) -> DenseMlpConfig {
        DenseMlpConfig { gemm_path, ..self }
    }

    /// Both widths positive; on the fp8 path `hidden` (the K of gate and up) a multiple of 128.
    /// `intermediate` (the K of down) may be any width: on the fp8 path the weights are
    /// zero-padded to [`DenseMlpConfig::inner`] when they are made resident.
    pub fn validate(&self) -> Result<()> {
        check_width("hidden", self.hidden, self.gemm_path)?;
        check_width("intermediate", self.intermediate, GemmPath::Reference)
    }

    /// The inner width the projections run at: `intermediate`, rounded up to a multiple of
    /// 128 on the fp8 path. The padding columns are exact zeros: zero weight rows in gate and
    /// up give zero activations (silu(0)·0 = 0), which meet zero weight columns in down, and
    /// the last 128-tile's activation scale is that of its real values.
    pub fn inner(&self) -> usize {
        if self.gemm_path == GemmPath::Fp8 { self.intermediate.next_multiple_of(BLOCK) } else { self.intermediate }
    }
}

fn check_width(field: &'static str, v: usize, path: GemmPath) -> Result<()> {
    if v == 0 {
        return Err(config(field, "must be >= 1"));
    }
    if path == GemmPath::Fp8 && !v.is_multiple_of(BLOCK) {
        return Err(config(field, format!("= {v} must be a multiple of {BLOCK} on the fp8 GEMM path")));
    }
    Ok(())
}

/// How the routed experts' grouped GEMMs lay out their rows (DeepGEMM's two layouts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupedLayout {
    /// Expert `e` owns rows `offsets[e]..offsets[e+1]` of one stacked buffer (prefill).
    #[default]
    Contiguous,
    /// `[experts, capacity, K]` with a live-row count per expert, capacity = the largest count
    /// (decode; the layout a CUDA graph can capture).
    Masked,
    /// Masked for batches of at most `masked_max_tokens` tokens, contiguous above.
    Auto { masked_max_tokens: usize },
}

impl GroupedLayout {
    /// Whether a batch of `tokens` tokens takes the masked layout.
    pub fn is_masked(&self, tokens: usize) -> bool {
        match *self {
            GroupedLayout::Contiguous => false,
            GroupedLayout::Masked => true,
            GroupedLayout::Auto { masked_max_tokens } => tokens <= masked_max_tokens,
        }
    }
}

/// One MoE layer: router, `n_routed_experts` routed experts of width `moe_intermediate`, and
/// `n_shared_experts` shared experts fused into one SwiGLU MLP of width
/// `n_shared_experts * moe_intermediate` (docs/model.md §3.9; 0 shared experts is allowed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MoeConfig {
    /// Model width (`hidden_size`).
    pub hidden: usize,
    /// Width of each routed expert (`moe_intermediate_size`).
    pub moe_intermediate: usize,
    /// Routed experts (`n_routed_experts`); must equal `route.n_experts`.
    pub n_routed_experts: usize,
    /// Shared experts (`n_shared_experts`).
    pub n_shared_experts: usize,
    /// Routing method and sizes.
    pub route: RouteCfg,
    /// Numeric path of every FP8 GEMM of the layer (the router is always bf16 × f32 in f32).
    pub gemm_path: GemmPath,
    /// Grouped-GEMM layout of the routed experts.
    pub layout: GroupedLayout,
}

impl MoeConfig {
    /// A layer of width `hidden` with `route.n_experts` routed experts of width
    /// `moe_intermediate` and `n_shared_experts` shared ones, on the reference GEMM path in the
    /// contiguous layout. Nothing is checked until [`MoeConfig::validate`] (which every
    /// constructor of this crate runs).
    ///
    /// ```
    /// use dsv3_moe::{GemmPath, GroupedLayout, MoeConfig, RouteCfg};
    /// // V3's routing at test size: 16 experts in 4 groups keeping 2, top-4, one shared expert.
    /// let cfg = MoeConfig::new(256, 128, 1, RouteCfg::deepseek_v3().with_experts(16, 4).with_groups(4, 2))
    ///     .with_gemm_path(GemmPath::Fp8)
    ///     .with_layout(GroupedLayout::Masked);
    /// assert!(cfg.validate().is_ok());
    /// assert_eq!(cfg.n_routed_experts, 16);
    /// ```
    pub fn new(hidden: usize, moe_intermediate: usize, n_shared_experts: usize, route: RouteCfg) -> MoeConfig {
        MoeConfig {
            hidden,
            moe_intermediate,
            n_routed_experts: route.n_experts,
            n_shared_experts,
            route,
            gemm_path: GemmPath::Reference,
            layout: GroupedLayout::Contiguous,
        }
    }

    /// DeepSeek-V3 / R1: hidden 7168, 256 experts of width 2048, 1 shared, V3 routing.
    pub fn deepseek_v3() -> MoeConfig {
        Self::new(7168, 2048, 1, RouteCfg::deepseek_v3())
    }
    /// DeepSeek-V2-Lite: hidden 2048, 64 experts of width 1408, 2 shared, softmax greedy top-6.
    pub fn deepseek_v2_lite() -> MoeConfig {
        Self::new(2048, 1408, 2, RouteCfg::deepseek_v2_lite())
    }
    /// Moonlight-16B-A3B: hidden 2048, 64 experts of width 1408, 2 shared, noaux_tc, 1 group.
    pub fn moonlight() -> MoeConfig {
        Self::new(2048, 1408, 2, RouteCfg::moonlight())
    }

    /// The same layer on another GEMM path (every FP8 GEMM of the layer).
    pub fn with_gemm_path(self, gemm_path: GemmPath) -> MoeConfig {
        MoeConfig { gemm_path, ..self }
    }

    /// The same layer with another grouped-GEMM layout for the routed experts.
    pub fn with_layout(self, layout: GroupedLayout) -> MoeConfig {
        MoeConfig { layout, ..self }
    }

    /// The same layer with another routing (and `n_routed_experts = route.n_experts`).
    pub fn with_route(self, route: RouteCfg) -> MoeConfig {
        MoeConfig { route, n_routed_experts: route.n_experts, ..self }
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        check_width("hidden", self.hidden, self.gemm_path)?;
        check_width("moe_intermediate", self.moe_intermediate, GemmPath::Reference)?;
        if self.n_routed_experts != self.route.n_experts {
            return Err(config(
                "n_routed_experts",
                format!("= {} differs from route.n_experts = {}", self.n_routed_experts, self.route.n_experts),
            ));
        }
        self.route.validate().map_err(|e| config("route", e.to_string()))?;
        self.n_shared_experts
            .checked_mul(self.moe_intermediate)
            .ok_or_else(|| config("n_shared_experts", "n_shared_experts * moe_intermediate overflows"))?;
        Ok(())
    }

    /// The config of one routed expert.
    pub fn expert_mlp(&self) -> DenseMlpConfig {
        DenseMlpConfig { hidden: self.hidden, intermediate: self.moe_intermediate, gemm_path: self.gemm_path }
    }

    /// The config of the fused shared experts (`None` without shared experts). Call after
    /// [`MoeConfig::validate`] (the width cannot overflow then).
    pub fn shared_mlp(&self) -> Option<DenseMlpConfig> {
        (self.n_shared_experts > 0).then(|| DenseMlpConfig {
            hidden: self.hidden,
            intermediate: self.n_shared_experts.saturating_mul(self.moe_intermediate),
            gemm_path: self.gemm_path,
        })
    }
}
