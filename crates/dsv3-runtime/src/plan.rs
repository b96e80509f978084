//! The tensors a config implies (docs/model.md §2) and the check of a checkpoint against
//! them.
//!
//! [`tensor_plan`] lists every logical tensor with its shape and role; the MTP modules (layers
//! `num_hidden_layers..`) are listed apart from the main model, so they are never mistaken for
//! main layers. [`TensorPlan::stored`] expands the plan into what is on disk: an FP8 config
//! stores each projection as F8_E4M3 plus `{name}_scale_inv` (F32, `[ceil(rows/128),
//! ceil(cols/128)]`), a BF16 config as one BF16 tensor. [`Checkpoint::validate`] compares a
//! checkpoint with the stored plan and reports the first missing, extra or misshaped tensor.

use crate::checkpoint::Checkpoint;
use crate::config::{LayerKind, ModelConfig};
use crate::error::{Result, tensor_err};
use crate::tensor_file::{Dtype, TensorSpec};
use dsv3_kernels::fp8::blocks;
use std::collections::BTreeSet;

/// What a planned tensor is, which decides its stored dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorRole {
    /// A projection: F8_E4M3 + scale in FP8 configs, BF16 otherwise.
    Linear,
    /// A high-precision matrix (embeddings, lm_head, router, eh_proj): BF16.
    Bf16,
    /// An RMSNorm weight: BF16 or F32 (written as BF16).
    Norm,
    /// An F32 vector (the router's `e_score_correction_bias`).
    F32,
    /// The MTP `eh_proj`: BF16 as DeepSeek ships it, or FP8 with a `weight_scale_inv` as some
    /// converted checkpoints store it (accepted in any config; the writer uses BF16).
    Bf16OrFp8,
}

/// One logical tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub role: TensorRole,
}

/// Every tensor a config implies: the main model (embedding, layers `0..num_hidden_layers`,
/// final norm, lm_head) and, separately, each MTP module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorPlan {
    pub main: Vec<PlannedTensor>,
    /// One list per MTP module, for layers `num_hidden_layers + j`.
    pub mtp: Vec<Vec<PlannedTensor>>,
}

/// `model.layers.{layer}.{suffix}`.
pub fn layer_name(layer: usize, suffix: &str) -> String {
    format!("model.layers.{layer}.{suffix}")
}

fn t(name: String, shape: &[usize], role: TensorRole) -> PlannedTensor {
    PlannedTensor { name, shape: shape.to_vec(), role }
}

/// The decoder block of `layer` (attention + dense MLP or MoE), main or MTP.
pub fn layer_tensors(cfg: &ModelConfig, layer: usize) -> Vec<PlannedTensor> {
    use TensorRole::*;
    let h = cfg.hidden_size;
    let n = |s: &str| layer_name(layer, s);
    let mut v = vec![t(n("input_layernorm.weight"), &[h], Norm)];
    match cfg.q_lora_rank {
        Some(r) => {
            v.push(t(n("self_attn.q_a_proj.weight"), &[r, h], Linear));
            v.push(t(n("self_attn.q_a_layernorm.weight"), &[r], Norm));
            v.push(t(n("self_attn.q_b_proj.weight"), &[cfg.q_out(), r], Linear));
        }
        None => v.push(t(n("self_attn.q_proj.weight"), &[cfg.q_out(), h], Linear)),
    }
    v.push(t(n("self_attn.kv_a_proj_with_mqa.weight"), &[cfg.kv_a_out(), h], Linear));
    v.push(t(n("self_attn.kv_a_layernorm.weight"), &[cfg.kv_lora_rank], Norm));
    v.push(t(n("self_attn.kv_b_proj.weight"), &[cfg.kv_b_out(), cfg.kv_lora_rank], Linear));
    v.push(t(n("self_attn.o_proj.weight"), &[h, cfg.o_in()], Linear));
    v.push(t(n("post_attention_layernorm.weight"), &[h], Norm));
    let mlp = |v: &mut Vec<PlannedTensor>, prefix: String, inter: usize| {
        v.push(t(format!("{prefix}.gate_proj.weight"), &[inter, h], Linear));
        v.push(t(format!("{prefix}.up_proj.weight"), &[inter, h], Linear));
        v.push(t(format!("{prefix}.down_proj.weight"), &[h, inter], Linear));
    };
    match cfg.layer_kind(layer) {
        LayerKind::Dense => mlp(&mut v, n("mlp"), cfg.intermediate_size),
        LayerKind::Moe => {
            v.push(t(n("mlp.gate.weight"), &[cfg.n_routed_experts, h], Bf16));
            if cfg.has_router_bias() {
                v.push(t(n("mlp.gate.e_score_correction_bias"), &[cfg.n_routed_experts], F32));
            }
            for e in 0..cfg.n_routed_experts {
                mlp(&mut v, n(&format!("mlp.experts.{e}")), cfg.moe_intermediate_size);
            }
            if cfg.n_shared_experts > 0 {
                mlp(&mut v, n("mlp.shared_experts"), cfg.shared_intermediate());
            }
        }
    }
    v
}

/// The plan of `cfg` (which must be valid: [`ModelConfig`] constructors ensure it).
pub fn tensor_plan(cfg: &ModelConfig) -> TensorPlan {
    use TensorRole::*;
    let (h, vocab) = (cfg.hidden_size, cfg.vocab_size);
    let mut main = vec![t("model.embed_tokens.weight".into(), &[vocab, h], Bf16)];
    for layer in 0..cfg.num_hidden_layers {
        main.extend(layer_tensors(cfg, layer));
    }
    main.push(t("model.norm.weight".into(), &[h], Norm));
    main.push(t("lm_head.weight".into(), &[vocab, h], Bf16));
    let mtp = cfg
        .mtp_layers()
        .map(|layer| {
            let n = |s: &str| layer_name(layer, s);
            let mut v = vec![
                t(n("embed_tokens.weight"), &[vocab, h], Bf16),
                t(n("enorm.weight"), &[h], Norm),
                t(n("hnorm.weight"), &[h], Norm),
                t(n("eh_proj.weight"), &[h, 2 * h], Bf16OrFp8),
            ];
            v.extend(layer_tensors(cfg, layer));
            v.push(t(n("shared_head.norm.weight"), &[h], Norm));
            v.push(t(n("shared_head.head.weight"), &[vocab, h], Bf16));
            v
        })
        .collect();
    TensorPlan { main, mtp }
}

/// The number of tensors [`TensorPlan::stored`] lists for `cfg` (scales included), computed
/// without building the plan, saturating. [`ModelConfig`] validation refuses a config whose
/// count exceeds [`MAX_PLANNED_TENSORS`], so building the plan of a valid config is bounded.
pub fn planned_tensor_count(cfg: &ModelConfig) -> u64 {
    let linear: u64 = if cfg.is_fp8() { 2 } else { 1 };
    let q = match cfg.q_lora_rank {
        Some(_) => 2 * linear + 1,
        None => linear,
    };
    // Norms (input, kv_a, post-attention) + q + kv_a, kv_b, o.
    let attn = 3 + q + 3 * linear;
    let mlp = 3 * linear;
    let experts = (cfg.n_routed_experts as u64).saturating_mul(mlp);
    let moe = 1 + u64::from(cfg.has_router_bias()) + experts.saturating_add(if cfg.n_shared_experts > 0 { mlp } else { 0 });
    // MoE layers in `range`: indices >= first_k_dense_replace that are multiples of moe_layer_freq.
    let moe_layers = |start: usize, end: usize| -> u64 {
        let (a, f) = (start.max(cfg.first_k_dense_replace) as u64, cfg.moe_layer_freq.max(1) as u64);
        let end = end as u64;
        if a >= end { 0 } else { end.div_ceil(f) - a.div_ceil(f) }
    };
    let layers = |start: usize, n: usize| -> u64 {
        let m = moe_layers(start, start + n);
        let d = n as u64 - m;
        (n as u64).saturating_mul(attn).saturating_add(d.saturating_mul(mlp)).saturating_add(m.saturating_mul(moe))
    };
    let main = layers(0, cfg.num_hidden_layers).saturating_add(3);
    // Each MTP module: embed, enorm, hnorm, eh_proj, its block, shared_head norm and head.
    let mtp = (cfg.num_nextn_predict_layers as u64 * 6).saturating_add(layers(cfg.num_hidden_layers, cfg.num_nextn_predict_layers));
    main.saturating_add(mtp)
}

/// Most tensors a checkpoint may hold (V3: about 91 000 with scales; a 384-expert model of
/// the same shape about 140 000).
pub const MAX_PLANNED_TENSORS: u64 = 1 << 19;

impl TensorPlan {
    /// Every logical tensor, main model first, then the MTP modules.
    pub fn iter(&self) -> impl Iterator<Item = &PlannedTensor> {
        self.main.iter().chain(self.mtp.iter().flatten())
    }

    /// The tensors as stored on disk for `cfg`, in plan order (each FP8 weight followed by
    /// its scale). The first dtype is what a writer uses; the others are also accepted.
    pub fn stored(&self, cfg: &ModelConfig) -> Vec<(TensorSpec, &'static [Dtype])> {
        let mut out = Vec::new();
        for p in self.iter() {
            let spec = |name: String, dtype, shape: Vec<usize>| TensorSpec { name, dtype, shape };
            match p.role {
                TensorRole::Linear if cfg.is_fp8() => {
                    let (r, c) = (p.shape[0], p.shape[1]);
                    out.push((spec(p.name.clone(), Dtype::F8E4M3, p.shape.clone()), &[Dtype::F8E4M3][..]));
                    out.push((spec(format!("{}_scale_inv", p.name), Dtype::F32, vec![blocks(r), blocks(c)]), &[Dtype::F32][..]));
                }
                TensorRole::Linear | TensorRole::Bf16 => out.push((spec(p.name.clone(), Dtype::Bf16, p.shape.clone()), &[Dtype::Bf16][..])),
                TensorRole::Bf16OrFp8 => out.push((spec(p.name.clone(), Dtype::Bf16, p.shape.clone()), &[Dtype::Bf16, Dtype::F8E4M3][..])),
                TensorRole::Norm => out.push((spec(p.name.clone(), Dtype::Bf16, p.shape.clone()), &[Dtype::Bf16, Dtype::F32][..])),
                TensorRole::F32 => out.push((spec(p.name.clone(), Dtype::F32, p.shape.clone()), &[Dtype::F32][..])),
            }
        }
        out
    }
}

/// Layer index in a `model.layers.{i}.` name.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

impl Checkpoint {
    /// Checks names, dtypes and shapes against `cfg` (values are checked by the accessors as
    /// tensors load). Reports the first problem in plan order: a missing tensor, a wrong dtype
    /// or shape, then any tensor the plan does not have.
    pub fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        let plan = tensor_plan(cfg);
        let stored = plan.stored(cfg);
        let mut expected = BTreeSet::new();
        let mut scales = Vec::new();
        for (spec, dtypes) in &stored {
            let (path, info) = self.info(&spec.name).map_err(|_| {
                let detail = match layer_of(&spec.name) {
                    Some(l) if l >= cfg.num_hidden_layers => {
                        format!("missing (MTP layer {l}; num_nextn_predict_layers = {})", cfg.num_nextn_predict_layers)
                    }
                    _ => "missing from the checkpoint".to_string(),
                };
                tensor_err(self.dir(), &spec.name, detail)
            })?;
            if !dtypes.contains(&info.dtype) {
                let want: Vec<_> = dtypes.iter().map(|d| d.as_str()).collect();
                let hint = if cfg.is_fp8() { "config has quantization_config fp8" } else { "config has no quantization_config" };
                return Err(tensor_err(
                    path,
                    &spec.name,
                    format!("dtype {}, expected {} ({hint})", info.dtype.as_str(), want.join(" or ")),
                ));
            }
            if info.shape != spec.shape {
                return Err(tensor_err(path, &spec.name, format!("shape {:?}, expected {:?}", info.shape, spec.shape)));
            }
            expected.insert(spec.name.as_str());
            // An FP8 tensor where BF16 is the plan's form (the MTP eh_proj) brings its scale.
            if info.dtype == Dtype::F8E4M3 && spec.dtype == Dtype::Bf16 {
                scales.push(format!("{}_scale_inv", spec.name));
                let (name, want) = (scales.last().map_or("", String::as_str), [blocks(spec.shape[0]), blocks(spec.shape[1])]);
                let (spath, sinfo) = self.info(name).map_err(|_| {
                    tensor_err(path, name, format!("missing: the F8_E4M3 weight `{}` needs its F32 scale tensor", spec.name))
                })?;
                if sinfo.dtype != Dtype::F32 || sinfo.shape != want {
                    let detail = format!("{} {:?}, expected F32 {want:?}", sinfo.dtype.as_str(), sinfo.shape);
                    return Err(tensor_err(spath, name, detail));
                }
            }
        }
        expected.extend(scales.iter().map(String::as_str));
        if let Some(extra) = self.names().find(|n| !expected.contains(n)) {
            let path = self.info(extra)?.0;
            let detail = match layer_of(extra) {
                Some(l) if l >= cfg.num_hidden_layers && !cfg.mtp_layers().contains(&l) => format!(
                    "unexpected: layer {l} is beyond num_hidden_layers = {} + num_nextn_predict_layers = {}",
                    cfg.num_hidden_layers, cfg.num_nextn_predict_layers
                ),
                _ => "unexpected: not in the tensor plan of this config".to_string(),
            };
            return Err(tensor_err(path, extra, detail));
        }
        Ok(())
    }
}
