//! Built-in model shapes for random models ([`crate::init_random()`]).
//!
//! | preset | what | size |
//! |---|---|---|
//! | `tiny` | V3 layout in miniature: FP8, q LoRA, sigmoid/noaux_tc with 4 groups, YaRN, 1 MTP layer; every Linear input a multiple of 128 so the fp8 GEMM path runs; partial 128-blocks in q_b, kv_a and kv_b | 10 MB, 501 tensors (vocab 1024) |
//! | `tiny-v2lite` | V2-Lite layout: BF16, no q LoRA, softmax greedy, no bias, not renormalised, YaRN mscale 0.707, no MTP | 13 MB, 190 tensors |
//! | `tiny-moonlight` | Moonlight layout: BF16, no q LoRA, sigmoid + bias with one group, plain RoPE θ = 50000, eps 1e-5, no MTP | 13 MB, 193 tensors |
//! | `small` | the model class of the CPU comparison with HF and llama.cpp (benches/results/2026-11-29-hf-side-by-side-2core.md): a V3-architecture model of ~0.67B parameters (hidden 1024, 6 layers: 1 dense + 5 MoE of 64 experts of width 384 in 8 groups keeping 4, top-8, 1 shared; 16 heads, q LoRA 384, kv LoRA 256, vocab 129280), FP8; no MTP | 0.86 GB, 2143 tensors; embed + lm_head are 0.53 GB of it |
//! | `bench` | true V3 widths (hidden 7168, 128 heads, q LoRA 1536, kv LoRA 512, dense 18432, experts 2048, vocab 129280) with 4 layers (1 dense + 3 MoE), 16 experts in 4 groups keeping 3, top-8, 1 shared; no MTP | 7.1 GB in 2 shards, 377 tensors; embed + lm_head alone are 3.7 GB. Written in ~42 s on 2 cores (disk-bound at ~200 MB/s) |

use crate::config::{ModelConfig, ModelType, QuantConfig, ScoringFunc, TopkMethod};
use crate::error::{Result, RuntimeError};
use dsv3_kernels::fp8::ScaleFmt;
use dsv3_kernels::rope::Yarn;

/// A built-in model shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    Tiny,
    TinyV2Lite,
    TinyMoonlight,
    Small,
    Bench,
}

impl Preset {
    pub const ALL: [Preset; 5] = [Preset::Tiny, Preset::TinyV2Lite, Preset::TinyMoonlight, Preset::Small, Preset::Bench];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::TinyV2Lite => "tiny-v2lite",
            Preset::TinyMoonlight => "tiny-moonlight",
            Preset::Small => "small",
            Preset::Bench => "bench",
        }
    }

    /// Parses a preset name; the error lists the valid ones.
    pub fn from_name(name: &str) -> Result<Preset> {
        Preset::ALL.into_iter().find(|p| p.name() == name).ok_or_else(|| RuntimeError::Config {
            file: "--preset".into(),
            field: "preset".into(),
            detail: format!(
                "unknown preset \"{name}\", expected one of: {}",
                Preset::ALL.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
            ),
        })
    }

    /// Whether a tokenizer given at init sets the vocabulary (tiny presets) or must fit the
    /// preset's real one (bench).
    pub fn vocab_from_tokenizer(self) -> bool {
        !matches!(self, Preset::Small | Preset::Bench)
    }

    /// The config (vocab 1024 for the tiny presets; a tokenizer may replace it).
    pub fn config(self) -> ModelConfig {
        let yarn = |mscale| Yarn {
            factor: 4.0,
            original_max_position_embeddings: 1024,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale,
            mscale_all_dim: mscale,
        };
        let tiny = ModelConfig {
            model_type: ModelType::DeepseekV3,
            vocab_size: 1024,
            hidden_size: 256,
            intermediate_size: 384,
            moe_intermediate_size: 128,
            num_hidden_layers: 4,
            first_k_dense_replace: 1,
            moe_layer_freq: 1,
            num_attention_heads: 4,
            q_lora_rank: Some(128),
            kv_lora_rank: 64,
            qk_nope_head_dim: 32,
            qk_rope_head_dim: 16,
            v_head_dim: 32,
            n_routed_experts: 16,
            n_shared_experts: 1,
            num_experts_per_tok: 4,
            n_group: 4,
            topk_group: 2,
            scoring_func: ScoringFunc::Sigmoid,
            topk_method: TopkMethod::NoauxTc,
            norm_topk_prob: true,
            routed_scaling_factor: 2.5,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            max_position_embeddings: 4096,
            rope_scaling: Some(yarn(1.0)),
            num_nextn_predict_layers: 1,
            quantization: Some(QuantConfig { scale_fmt: ScaleFmt::Float }),
            bos_token_id: Some(0),
            eos_token_ids: vec![1],
        };
        match self {
            Preset::Tiny => tiny,
            Preset::TinyV2Lite => ModelConfig {
                model_type: ModelType::DeepseekV2,
                q_lora_rank: None,
                n_shared_experts: 2,
                n_group: 1,
                topk_group: 1,
                scoring_func: ScoringFunc::Softmax,
                topk_method: TopkMethod::Greedy,
                norm_topk_prob: false,
                routed_scaling_factor: 1.0,
                rope_scaling: Some(yarn(0.707)),
                num_nextn_predict_layers: 0,
                quantization: None,
                ..tiny
            },
            Preset::TinyMoonlight => ModelConfig {
                q_lora_rank: None,
                n_shared_experts: 2,
                n_group: 1,
                topk_group: 1,
                routed_scaling_factor: 2.446,
                rms_norm_eps: 1e-5,
                rope_theta: 50000.0,
                max_position_embeddings: 8192,
                rope_scaling: None,
                num_nextn_predict_layers: 0,
                quantization: None,
                ..tiny
            },
            Preset::Small => ModelConfig {
                vocab_size: 129_280,
                hidden_size: 1024,
                intermediate_size: 2816,
                moe_intermediate_size: 384,
                num_hidden_layers: 6,
                first_k_dense_replace: 1,
                num_attention_heads: 16,
                q_lora_rank: Some(384),
                kv_lora_rank: 256,
                qk_nope_head_dim: 64,
                qk_rope_head_dim: 32,
                v_head_dim: 64,
                n_routed_experts: 64,
                n_shared_experts: 1,
                num_experts_per_tok: 8,
                n_group: 8,
                topk_group: 4,
                num_nextn_predict_layers: 0,
                ..tiny
            },
            Preset::Bench => ModelConfig {
                vocab_size: 129_280,
                hidden_size: 7168,
                intermediate_size: 18432,
                moe_intermediate_size: 2048,
                num_hidden_layers: 4,
                first_k_dense_replace: 1,
                num_attention_heads: 128,
                q_lora_rank: Some(1536),
                kv_lora_rank: 512,
                qk_nope_head_dim: 128,
                qk_rope_head_dim: 64,
                v_head_dim: 128,
                n_routed_experts: 16,
                n_shared_experts: 1,
                num_experts_per_tok: 8,
                n_group: 4,
                topk_group: 3,
                max_position_embeddings: 163_840,
                rope_scaling: Some(Yarn {
                    factor: 40.0,
                    original_max_position_embeddings: 4096,
                    beta_fast: 32.0,
                    beta_slow: 1.0,
                    mscale: 1.0,
                    mscale_all_dim: 1.0,
                }),
                num_nextn_predict_layers: 0,
                ..tiny
            },
        }
    }
}
