//! [`ModelConfig::validate`]: every range and cross-field constraint, each error naming the
//! field at fault.

use crate::config::{ModelConfig, ScoringFunc, TopkMethod, max_mtp_layers};
use crate::error::{Result, RuntimeError};

struct Check<'a> {
    file: &'a str,
}

impl Check<'_> {
    fn err(&self, field: &str, detail: impl Into<String>) -> RuntimeError {
        RuntimeError::Config { file: self.file.to_string(), field: field.to_string(), detail: detail.into() }
    }
    fn pos(&self, field: &str, v: usize) -> Result<()> {
        if v == 0 { Err(self.err(field, "must be > 0, got 0")) } else { Ok(()) }
    }
    fn at_most(&self, field: &str, v: usize, max: u64) -> Result<()> {
        if v as u64 > max { Err(self.err(field, format!("{v} exceeds the maximum {max}"))) } else { Ok(()) }
    }
    fn finite_pos(&self, field: &str, v: f64) -> Result<()> {
        if v.is_finite() && v > 0.0 { Ok(()) } else { Err(self.err(field, format!("must be finite and > 0, got {v}"))) }
    }
}

/// Product of `dims` in u64, or an error naming `field` when it overflows the address space.
fn size(c: &Check<'_>, field: &str, dims: &[usize]) -> Result<u64> {
    dims.iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .filter(|&n| usize::try_from(n).is_ok() && n <= (1u64 << 48))
        .ok_or_else(|| c.err(field, format!("tensor size {dims:?} overflows")))
}

pub(crate) fn validate(m: &ModelConfig, file: &str) -> Result<()> {
    let c = Check { file };
    c.pos("vocab_size", m.vocab_size)?;
    c.at_most("vocab_size", m.vocab_size, u32::MAX as u64)?;
    c.pos("hidden_size", m.hidden_size)?;
    c.pos("intermediate_size", m.intermediate_size)?;
    c.pos("moe_intermediate_size", m.moe_intermediate_size)?;
    c.pos("num_hidden_layers", m.num_hidden_layers)?;
    c.at_most("num_hidden_layers", m.num_hidden_layers, 1 << 16)?;
    if m.first_k_dense_replace > m.num_hidden_layers {
        return Err(
            c.err("first_k_dense_replace", format!("{} exceeds num_hidden_layers = {}", m.first_k_dense_replace, m.num_hidden_layers))
        );
    }
    c.pos("moe_layer_freq", m.moe_layer_freq)?;
    c.pos("num_attention_heads", m.num_attention_heads)?;
    if let Some(r) = m.q_lora_rank {
        c.pos("q_lora_rank", r)?;
    }
    c.pos("kv_lora_rank", m.kv_lora_rank)?;
    c.pos("qk_nope_head_dim", m.qk_nope_head_dim)?;
    c.pos("qk_rope_head_dim", m.qk_rope_head_dim)?;
    if !m.qk_rope_head_dim.is_multiple_of(2) {
        return Err(c.err("qk_rope_head_dim", format!("must be even (RoPE rotates pairs), got {}", m.qk_rope_head_dim)));
    }
    c.pos("v_head_dim", m.v_head_dim)?;
    check_moe(&c, m)?;
    check_scalars(&c, m)?;
    check_rope(&c, m)?;
    if m.num_nextn_predict_layers > max_mtp_layers() {
        return Err(c.err("num_nextn_predict_layers", format!("{} exceeds the maximum {}", m.num_nextn_predict_layers, max_mtp_layers())));
    }
    for (field, id) in m.bos_token_id.iter().map(|&b| ("bos_token_id", b)).chain(m.eos_token_ids.iter().map(|&e| ("eos_token_id", e))) {
        if id as usize >= m.vocab_size {
            return Err(c.err(field, format!("id {id} is outside the vocabulary (vocab_size {})", m.vocab_size)));
        }
    }
    check_sizes(&c, m)?;
    let tensors = crate::plan::planned_tensor_count(m);
    if tensors > crate::plan::MAX_PLANNED_TENSORS {
        return Err(c.err(
            "n_routed_experts",
            format!(
                "the checkpoint would hold {tensors} tensors ({} layers x {} experts), more than the {} accepted",
                m.num_hidden_layers,
                m.n_routed_experts,
                crate::plan::MAX_PLANNED_TENSORS
            ),
        ));
    }
    // The kernel layer's own checks, as a second line (every case above should catch first).
    m.route_cfg().validate().map_err(|e| c.err("num_experts_per_tok", e.to_string()))?;
    m.rope_cfg().validate("config").map_err(|e| c.err("rope_scaling", e.to_string()))?;
    m.softmax_scale().map_err(|e| c.err("rope_scaling", e.to_string()))?;
    Ok(())
}

fn check_moe(c: &Check<'_>, m: &ModelConfig) -> Result<()> {
    c.pos("n_routed_experts", m.n_routed_experts)?;
    c.at_most("n_routed_experts", m.n_routed_experts, u32::MAX as u64)?;
    c.at_most("n_shared_experts", m.n_shared_experts, 1 << 16)?;
    c.pos("n_group", m.n_group)?;
    if !m.n_routed_experts.is_multiple_of(m.n_group) {
        return Err(c.err("n_group", format!("{} does not divide n_routed_experts = {}", m.n_group, m.n_routed_experts)));
    }
    if m.topk_group == 0 || m.topk_group > m.n_group {
        return Err(c.err("topk_group", format!("{} must be in 1..=n_group = {}", m.topk_group, m.n_group)));
    }
    match (m.topk_method, m.scoring_func) {
        (TopkMethod::NoauxTc, ScoringFunc::Softmax) => {
            return Err(c.err("scoring_func", "topk_method noaux_tc needs scoring_func \"sigmoid\", got \"softmax\""));
        }
        (TopkMethod::Greedy | TopkMethod::GroupLimitedGreedy, ScoringFunc::Sigmoid) => {
            return Err(c.err("scoring_func", "topk_method greedy / group_limited_greedy needs scoring_func \"softmax\", got \"sigmoid\""));
        }
        _ => {}
    }
    let group = m.n_routed_experts / m.n_group;
    if m.topk_method == TopkMethod::NoauxTc && group < 2 {
        return Err(c.err("n_group", format!("noaux_tc needs >= 2 experts per group (top-2 group score), got {group}")));
    }
    let (available, what) = if m.topk_method == TopkMethod::Greedy {
        (m.n_routed_experts, "n_routed_experts".to_string())
    } else {
        (m.topk_group * group, format!("experts in the topk_group = {} kept groups of {group}", m.topk_group))
    };
    if m.num_experts_per_tok == 0 || m.num_experts_per_tok > available {
        return Err(c.err("num_experts_per_tok", format!("{} must be in 1..={available} ({what})", m.num_experts_per_tok)));
    }
    Ok(())
}

fn check_scalars(c: &Check<'_>, m: &ModelConfig) -> Result<()> {
    c.finite_pos("routed_scaling_factor", m.routed_scaling_factor)?;
    if (m.routed_scaling_factor as f32).is_infinite() {
        return Err(c.err("routed_scaling_factor", "does not fit an f32"));
    }
    c.finite_pos("rms_norm_eps", m.rms_norm_eps)?;
    if m.rms_norm_eps >= 1.0 || (m.rms_norm_eps as f32) == 0.0 {
        return Err(c.err("rms_norm_eps", format!("must be in (0, 1) and representable in f32, got {}", m.rms_norm_eps)));
    }
    if !(m.rope_theta.is_finite() && m.rope_theta > 1.0) {
        return Err(c.err("rope_theta", format!("must be finite and > 1, got {}", m.rope_theta)));
    }
    c.pos("max_position_embeddings", m.max_position_embeddings)?;
    c.at_most("max_position_embeddings", m.max_position_embeddings, MAX_POSITIONS)?;
    // The RoPE table holds max_position_embeddings x qk_rope_head_dim values: bound it before
    // a model load allocates it.
    let table = (m.max_position_embeddings as u64).saturating_mul(m.qk_rope_head_dim as u64);
    if table > MAX_ROPE_TABLE {
        return Err(c.err(
            "max_position_embeddings",
            format!(
                "{} positions x qk_rope_head_dim {} is a RoPE table of {table} values, more than {MAX_ROPE_TABLE}",
                m.max_position_embeddings, m.qk_rope_head_dim
            ),
        ));
    }
    Ok(())
}

/// Largest `max_position_embeddings` accepted (V3: 163840; 16x DeepSeek's longest).
const MAX_POSITIONS: u64 = 1 << 24;
/// Largest RoPE table (values) a config may imply: 1 GiB of f32.
const MAX_ROPE_TABLE: u64 = 1 << 28;

fn check_rope(c: &Check<'_>, m: &ModelConfig) -> Result<()> {
    let Some(y) = m.rope_scaling else { return Ok(()) };
    if !(y.factor.is_finite() && y.factor >= 1.0) {
        return Err(c.err("rope_scaling.factor", format!("must be finite and >= 1, got {}", y.factor)));
    }
    c.pos("rope_scaling.original_max_position_embeddings", y.original_max_position_embeddings)?;
    c.at_most("rope_scaling.original_max_position_embeddings", y.original_max_position_embeddings, u32::MAX as u64)?;
    c.finite_pos("rope_scaling.beta_fast", y.beta_fast)?;
    c.finite_pos("rope_scaling.beta_slow", y.beta_slow)?;
    if y.beta_fast <= y.beta_slow {
        return Err(c.err("rope_scaling.beta_fast", format!("{} must be > beta_slow = {}", y.beta_fast, y.beta_slow)));
    }
    for (field, v) in [("rope_scaling.mscale", y.mscale), ("rope_scaling.mscale_all_dim", y.mscale_all_dim)] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(c.err(field, format!("must be finite and >= 0, got {v}")));
        }
    }
    Ok(())
}

/// Every weight's element count fits in memory arithmetic (checked before any plan is built).
fn check_sizes(c: &Check<'_>, m: &ModelConfig) -> Result<()> {
    let (h, heads) = (m.hidden_size, m.num_attention_heads);
    size(c, "vocab_size", &[m.vocab_size, h])?;
    let qk = m.qk_nope_head_dim.checked_add(m.qk_rope_head_dim).ok_or_else(|| c.err("qk_nope_head_dim", "qk_head_dim overflows"))?;
    size(c, "num_attention_heads", &[heads, qk, m.q_lora_rank.unwrap_or(h)])?;
    let kv = m.qk_nope_head_dim.checked_add(m.v_head_dim).ok_or_else(|| c.err("v_head_dim", "qk_nope + v overflows"))?;
    size(c, "kv_lora_rank", &[heads, kv, m.kv_lora_rank])?;
    m.kv_lora_rank.checked_add(m.qk_rope_head_dim).ok_or_else(|| c.err("kv_lora_rank", "kv_lora_rank + qk_rope overflows"))?;
    size(c, "v_head_dim", &[heads, m.v_head_dim, h])?;
    size(c, "intermediate_size", &[m.intermediate_size, h])?;
    size(c, "moe_intermediate_size", &[m.n_routed_experts, m.moe_intermediate_size, h])?;
    size(c, "n_shared_experts", &[m.n_shared_experts, m.moe_intermediate_size, h])?;
    size(c, "hidden_size", &[h, h, 2])?;
    m.num_hidden_layers
        .checked_add(m.num_nextn_predict_layers)
        .ok_or_else(|| c.err("num_nextn_predict_layers", "layer count overflows"))?;
    Ok(())
}
