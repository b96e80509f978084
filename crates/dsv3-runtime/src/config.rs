//! The model configuration: HF `config.json` in the DeepSeek-V3 hub format, plus the
//! DeepSeek-V2-Lite (`model_type = deepseek_v2`) and Moonlight variants (docs/model.md §1).
//!
//! [`ModelConfig::from_json_str`] reads every field the forward pass needs, applies the HF
//! defaults listed below to the optional ones, and validates the result
//! ([`ModelConfig::validate`]): every error is a [`RuntimeError::Config`] naming the field.
//!
//! Required (no default, the error says "missing"): `vocab_size`, `hidden_size`,
//! `intermediate_size`, `moe_intermediate_size`, `num_hidden_layers`, `first_k_dense_replace`,
//! `num_attention_heads`, `q_lora_rank` (the key must be present; `null` = no q LoRA),
//! `kv_lora_rank`, `qk_nope_head_dim`, `qk_rope_head_dim`, `v_head_dim`, `n_routed_experts`,
//! `n_shared_experts`, `num_experts_per_tok`, `max_position_embeddings`.
//!
//! Defaults (deepseek_v3 / deepseek_v2): `scoring_func` sigmoid / softmax, `topk_method`
//! noaux_tc / greedy, `norm_topk_prob` true / false, `routed_scaling_factor` 2.5 / 1.0;
//! both: `n_group` and `topk_group` 1 (also when `null`), `moe_layer_freq` 1,
//! `num_nextn_predict_layers` 0, `rms_norm_eps` 1e-6, `rope_theta` 10000, no `rope_scaling`,
//! no `quantization_config` (BF16 weights). YaRN fields default as in HF: `beta_fast` 32,
//! `beta_slow` 1, `mscale` 1, `mscale_all_dim` 0, `original_max_position_embeddings` 4096.
//!
//! Refused because the engine would silently compute something else: `hidden_act` other than
//! silu, `attention_bias: true`, `tie_word_embeddings: true`, `rope_interleave: false`,
//! a `rope_scaling` type other than yarn, a quantization other than fp8 e4m3 128x128, and
//! DeepSeek-V3.2's sparse attention (`model_type: deepseek_v32`, `index_topk`,
//! `index_n_heads`, `index_head_dim`).
//!
//! Later releases in the V3 format load as V3: V3-0324, R1 and R1-0528 add no field;
//! V3.1 (and V3.1-Terminus) add `quantization_config.scale_fmt: "ue8m0"` (power-of-two
//! activation scales on the fp8 GEMM path). Fields used only for training or bookkeeping
//! (`aux_loss_alpha`, `seq_aux`, `ep_size`, `auto_map`, ...) are ignored.

use crate::error::{Result, RuntimeError};
use crate::json::{Obj, parse_json_bytes, read_json_file};
use dsv3_kernels::fp8::{BLOCK, ScaleFmt};
use dsv3_kernels::gating::{RouteCfg, RouteMethod};
use dsv3_kernels::rope::{self, RopeCfg, Yarn};
use serde_json::{Value, json};
use std::ops::Range;
use std::path::Path;

/// `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    /// `deepseek_v2` (V2, V2-Lite).
    DeepseekV2,
    /// `deepseek_v3` (V3, R1, Moonlight).
    DeepseekV3,
}

impl ModelType {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelType::DeepseekV2 => "deepseek_v2",
            ModelType::DeepseekV3 => "deepseek_v3",
        }
    }
}

/// `scoring_func` of the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoringFunc {
    Sigmoid,
    Softmax,
}

/// `topk_method` of the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkMethod {
    /// V3: bias-corrected, group-limited (group score = top-2 sum).
    NoauxTc,
    /// V2-Lite: plain top-k.
    Greedy,
    /// V2: group-limited (group score = max).
    GroupLimitedGreedy,
}

/// `quantization_config` of an FP8 checkpoint: e4m3 weights in 128x128 blocks with F32
/// `weight_scale_inv` (the only layout accepted), activations quantised dynamically.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantConfig {
    /// `scale_fmt`: absent (V3, R1) or `ue8m0` (V3.1 and later; power-of-two scales).
    pub scale_fmt: ScaleFmt,
}

/// What the MLP of a layer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    Dense,
    Moe,
}

/// A validated model configuration. Field names follow HF `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub model_type: ModelType,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// FFN width of the dense layers.
    pub intermediate_size: usize,
    /// FFN width of each routed expert (shared experts: `n_shared_experts` times this).
    pub moe_intermediate_size: usize,
    /// Main-model layers; MTP modules follow as layers `num_hidden_layers..`.
    pub num_hidden_layers: usize,
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
    pub num_attention_heads: usize,
    /// `None`: a plain `q_proj` (V2-Lite, Moonlight).
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub scoring_func: ScoringFunc,
    pub topk_method: TopkMethod,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    /// YaRN (`rope_scaling` with type yarn); `None` = plain RoPE (Moonlight).
    pub rope_scaling: Option<Yarn>,
    pub num_nextn_predict_layers: usize,
    /// `None`: all weights high precision (BF16), as in V2-Lite and Moonlight.
    pub quantization: Option<QuantConfig>,
    pub bos_token_id: Option<u32>,
    /// `eos_token_id`, an integer or a list in the file; empty when absent.
    pub eos_token_ids: Vec<u32>,
}

const MAX_MTP_LAYERS: usize = 16;

impl ModelConfig {
    /// Reads and validates `path` (a `config.json`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let v = read_json_file(path)?;
        Self::from_json_value(&v, &path.display().to_string())
    }

    /// Parses and validates the bytes of a `config.json` (at most the JSON size limit, 64 MiB);
    /// `source` names it in errors. What [`ModelConfig::from_file`] does after reading.
    pub fn from_json_bytes(bytes: &[u8], source: &str) -> Result<Self> {
        let v = parse_json_bytes(Path::new(source), bytes)?;
        Self::from_json_value(&v, source)
    }

    /// Parses and validates a `config.json` text; `source` names it in errors.
    pub fn from_json_str(text: &str, source: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| RuntimeError::Config {
            file: source.to_string(),
            field: "<root>".into(),
            detail: format!("invalid JSON: {e}"),
        })?;
        Self::from_json_value(&v, source)
    }

    /// Parses and validates an already parsed `config.json`.
    pub fn from_json_value(v: &Value, source: &str) -> Result<Self> {
        let cfg = parse(Obj::root(v, source)?)?;
        cfg.validate_in(source)?;
        Ok(cfg)
    }

    /// Checks every field and cross-field constraint (see the module docs).
    pub fn validate(&self) -> Result<()> {
        self.validate_in("config")
    }

    fn validate_in(&self, file: &str) -> Result<()> {
        crate::config_check::validate(self, file)
    }

    /// The hub-format `config.json` of this config (what [`crate::init_random()`] writes).
    pub fn to_json(&self) -> Value {
        let arch = match self.model_type {
            ModelType::DeepseekV2 => "DeepseekV2ForCausalLM",
            ModelType::DeepseekV3 => "DeepseekV3ForCausalLM",
        };
        let mut v = json!({
            "architectures": [arch],
            "model_type": self.model_type.as_str(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "first_k_dense_replace": self.first_k_dense_replace,
            "moe_layer_freq": self.moe_layer_freq,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "scoring_func": match self.scoring_func { ScoringFunc::Sigmoid => "sigmoid", ScoringFunc::Softmax => "softmax" },
            "topk_method": match self.topk_method {
                TopkMethod::NoauxTc => "noaux_tc",
                TopkMethod::Greedy => "greedy",
                TopkMethod::GroupLimitedGreedy => "group_limited_greedy",
            },
            "norm_topk_prob": self.norm_topk_prob,
            "routed_scaling_factor": self.routed_scaling_factor,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_scaling": self.rope_scaling.map(|y| json!({
                "type": "yarn",
                "factor": y.factor,
                "original_max_position_embeddings": y.original_max_position_embeddings,
                "beta_fast": y.beta_fast,
                "beta_slow": y.beta_slow,
                "mscale": y.mscale,
                "mscale_all_dim": y.mscale_all_dim,
            })),
            "num_nextn_predict_layers": self.num_nextn_predict_layers,
            "attention_bias": false,
            "tie_word_embeddings": false,
            "torch_dtype": "bfloat16",
            "bos_token_id": self.bos_token_id,
            // Absent when there is none: `[]` is refused on reading (found by fuzzing).
            "eos_token_id": match self.eos_token_ids.as_slice() {
                [] => Value::Null,
                [one] => json!(one),
                many => json!(many),
            },
        });
        if let (Some(q), Some(obj)) = (self.quantization, v.as_object_mut()) {
            let mut qc = json!({
                "activation_scheme": "dynamic",
                "fmt": "e4m3",
                "quant_method": "fp8",
                "weight_block_size": [BLOCK, BLOCK],
            });
            if let (ScaleFmt::Ue8m0, Some(m)) = (q.scale_fmt, qc.as_object_mut()) {
                m.insert("scale_fmt".into(), json!("ue8m0"));
            }
            obj.insert("quantization_config".into(), qc);
        }
        v
    }

    // ----- derived sizes -----

    /// `qk_nope_head_dim + qk_rope_head_dim` (192 for V3).
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }
    /// Output rows of `q_b_proj` / `q_proj`: heads × qk_head_dim.
    pub fn q_out(&self) -> usize {
        self.num_attention_heads * self.qk_head_dim()
    }
    /// Output rows of `kv_a_proj_with_mqa`: kv_lora_rank + qk_rope_head_dim (576).
    pub fn kv_a_out(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }
    /// Output rows of `kv_b_proj`: heads × (qk_nope + v).
    pub fn kv_b_out(&self) -> usize {
        self.num_attention_heads * (self.qk_nope_head_dim + self.v_head_dim)
    }
    /// Input columns of `o_proj`: heads × v_head_dim.
    pub fn o_in(&self) -> usize {
        self.num_attention_heads * self.v_head_dim
    }
    /// Width of the fused shared experts (0 without shared experts).
    pub fn shared_intermediate(&self) -> usize {
        self.n_shared_experts * self.moe_intermediate_size
    }
    /// Whether layer `i` (main or MTP) has an MoE MLP: `i >= first_k_dense_replace` and
    /// `i % moe_layer_freq == 0`, as in HF.
    pub fn layer_kind(&self, i: usize) -> LayerKind {
        if i >= self.first_k_dense_replace && i.is_multiple_of(self.moe_layer_freq.max(1)) { LayerKind::Moe } else { LayerKind::Dense }
    }
    /// Layer indices of the MTP modules (empty without MTP).
    pub fn mtp_layers(&self) -> Range<usize> {
        self.num_hidden_layers..self.num_hidden_layers + self.num_nextn_predict_layers
    }
    /// Whether the projection weights are FP8 (a `quantization_config` is present).
    pub fn is_fp8(&self) -> bool {
        self.quantization.is_some()
    }
    /// The activation scale format of the fp8 GEMM path (`Float` unless `scale_fmt` is ue8m0).
    pub fn scale_fmt(&self) -> ScaleFmt {
        self.quantization.map_or(ScaleFmt::Float, |q| q.scale_fmt)
    }

    // ----- kernel configs -----

    /// The router configuration of every MoE layer.
    pub fn route_cfg(&self) -> RouteCfg {
        let method = match self.topk_method {
            TopkMethod::NoauxTc => RouteMethod::NoauxTc,
            TopkMethod::Greedy => RouteMethod::SoftmaxGreedy,
            TopkMethod::GroupLimitedGreedy => RouteMethod::GroupLimitedGreedy,
        };
        RouteCfg {
            n_experts: self.n_routed_experts,
            top_k: self.num_experts_per_tok,
            n_group: self.n_group,
            topk_group: self.topk_group,
            method,
            norm_topk_prob: self.norm_topk_prob,
            routed_scaling_factor: self.routed_scaling_factor as f32,
        }
    }
    /// Whether the router has an `e_score_correction_bias` (noaux_tc only).
    pub fn has_router_bias(&self) -> bool {
        self.topk_method == TopkMethod::NoauxTc
    }
    /// RoPE / YaRN of every attention layer.
    pub fn rope_cfg(&self) -> RopeCfg {
        RopeCfg { rope_head_dim: self.qk_rope_head_dim, theta: self.rope_theta, yarn: self.rope_scaling }
    }
    /// The attention softmax scale (docs/model.md §3.6): 0.1352 for V3, 0.1147 for V2-Lite, 0.0722 Moonlight.
    pub fn softmax_scale(&self) -> Result<f32> {
        Ok(rope::softmax_scale(self.qk_head_dim(), self.rope_scaling.as_ref())?)
    }
    /// Epsilon of the layer norms, the final norm and the MTP norms (`rms_norm_eps`).
    pub fn norm_eps(&self) -> f32 {
        self.rms_norm_eps as f32
    }
    /// Epsilon of `q_a_layernorm` / `kv_a_layernorm`: always 1e-6 (HF builds them with the
    /// default; docs/model.md §8 item 6).
    pub fn latent_norm_eps(&self) -> f32 {
        1e-6
    }
}

fn parse(o: Obj<'_>) -> Result<ModelConfig> {
    let model_type = match o.opt_str("model_type")? {
        Some("deepseek_v3") => ModelType::DeepseekV3,
        Some("deepseek_v2") => ModelType::DeepseekV2,
        Some("deepseek_v32") => {
            return Err(o.err(
                "model_type",
                "\"deepseek_v32\" (DeepSeek-V3.2: sparse attention through a lightning indexer, fields index_topk, \
                 index_n_heads, index_head_dim) is not supported; this engine computes dense MLA attention",
            ));
        }
        Some(other) => return Err(o.err("model_type", format!("unsupported \"{other}\", expected \"deepseek_v3\" or \"deepseek_v2\""))),
        None => return Err(o.err("model_type", "missing (required)")),
    };
    let v3 = model_type == ModelType::DeepseekV3;
    let scoring_func = match o.opt_str("scoring_func")? {
        None => {
            if v3 {
                ScoringFunc::Sigmoid
            } else {
                ScoringFunc::Softmax
            }
        }
        Some("sigmoid") => ScoringFunc::Sigmoid,
        Some("softmax") => ScoringFunc::Softmax,
        Some(other) => return Err(o.err("scoring_func", format!("unsupported \"{other}\", expected \"sigmoid\" or \"softmax\""))),
    };
    let topk_method = match o.opt_str("topk_method")? {
        None => {
            if v3 {
                TopkMethod::NoauxTc
            } else {
                TopkMethod::Greedy
            }
        }
        Some("noaux_tc") => TopkMethod::NoauxTc,
        Some("greedy") => TopkMethod::Greedy,
        Some("group_limited_greedy") => TopkMethod::GroupLimitedGreedy,
        Some(other) => {
            return Err(o.err("topk_method", format!("unsupported \"{other}\", expected noaux_tc, greedy or group_limited_greedy")));
        }
    };
    if !o.contains_key("q_lora_rank") {
        return Err(o.err("q_lora_rank", "missing (required; null means no q LoRA)"));
    }
    refuse_unsupported(&o)?;
    let to_u32 = |field: &str, v: u64| u32::try_from(v).map_err(|_| o.err(field, format!("{v} does not fit a u32 token id")));
    let bos_token_id = o.opt_u64("bos_token_id")?.map(|v| to_u32("bos_token_id", v)).transpose()?;
    let eos_token_ids =
        o.opt_u64_list("eos_token_id")?.unwrap_or_default().into_iter().map(|v| to_u32("eos_token_id", v)).collect::<Result<Vec<_>>>()?;
    if matches!(o.get("eos_token_id"), Some(Value::Array(a)) if a.is_empty()) {
        return Err(o.err("eos_token_id", "an empty list; expected at least one id"));
    }
    Ok(ModelConfig {
        model_type,
        vocab_size: o.usize("vocab_size")?,
        hidden_size: o.usize("hidden_size")?,
        intermediate_size: o.usize("intermediate_size")?,
        moe_intermediate_size: o.usize("moe_intermediate_size")?,
        num_hidden_layers: o.usize("num_hidden_layers")?,
        first_k_dense_replace: o.usize("first_k_dense_replace")?,
        moe_layer_freq: o.usize_or("moe_layer_freq", 1)?,
        num_attention_heads: o.usize("num_attention_heads")?,
        q_lora_rank: o.opt_usize("q_lora_rank")?,
        kv_lora_rank: o.usize("kv_lora_rank")?,
        qk_nope_head_dim: o.usize("qk_nope_head_dim")?,
        qk_rope_head_dim: o.usize("qk_rope_head_dim")?,
        v_head_dim: o.usize("v_head_dim")?,
        n_routed_experts: o.usize("n_routed_experts")?,
        n_shared_experts: o.usize("n_shared_experts")?,
        num_experts_per_tok: o.usize("num_experts_per_tok")?,
        n_group: o.usize_or("n_group", 1)?,
        topk_group: o.usize_or("topk_group", 1)?,
        scoring_func,
        topk_method,
        norm_topk_prob: o.bool_or("norm_topk_prob", v3)?,
        routed_scaling_factor: o.f64_or("routed_scaling_factor", if v3 { 2.5 } else { 1.0 })?,
        rms_norm_eps: o.f64_or("rms_norm_eps", 1e-6)?,
        rope_theta: o.f64_or("rope_theta", 10000.0)?,
        max_position_embeddings: o.usize("max_position_embeddings")?,
        rope_scaling: parse_rope_scaling(&o)?,
        num_nextn_predict_layers: o.usize_or("num_nextn_predict_layers", 0)?,
        quantization: parse_quant(&o)?,
        bos_token_id,
        eos_token_ids,
    })
}

fn refuse_unsupported(o: &Obj<'_>) -> Result<()> {
    // V3.2's sparse-attention indexer: its weights and top-k selection are not implemented,
    // and dense attention differs from it past index_topk tokens.
    for field in ["index_topk", "index_n_heads", "index_head_dim"] {
        if o.contains_key(field) {
            return Err(o.err(
                field,
                "DeepSeek Sparse Attention (V3.2's lightning indexer) is not supported; this engine computes dense MLA attention",
            ));
        }
    }
    if let Some(act) = o.opt_str("hidden_act")?
        && act != "silu"
    {
        return Err(o.err("hidden_act", format!("unsupported \"{act}\", expected \"silu\"")));
    }
    if o.bool_or("attention_bias", false)? {
        return Err(o.err("attention_bias", "true is not supported (DeepSeek attention has no biases)"));
    }
    if o.bool_or("tie_word_embeddings", false)? {
        return Err(o.err("tie_word_embeddings", "true is not supported (lm_head must be its own tensor)"));
    }
    if !o.bool_or("rope_interleave", true)? {
        return Err(o.err("rope_interleave", "false is not supported (these checkpoints need interleaved RoPE)"));
    }
    if let Some(n) = o.opt_usize("num_key_value_heads")?
        && n == 0
    {
        return Err(o.err("num_key_value_heads", "must be > 0"));
    }
    Ok(())
}

fn parse_rope_scaling(o: &Obj<'_>) -> Result<Option<Yarn>> {
    let Some(r) = o.opt_obj("rope_scaling")? else { return Ok(None) };
    let ty = match (r.opt_str("type")?, r.opt_str("rope_type")?) {
        (Some(t), _) | (None, Some(t)) => t,
        (None, None) => return Err(r.err("type", "missing (expected \"yarn\")")),
    };
    if ty != "yarn" {
        return Err(r.err("type", format!("unsupported \"{ty}\", expected \"yarn\"")));
    }
    let factor = r.opt_f64("factor")?.ok_or_else(|| r.err("factor", "missing (required for yarn)"))?;
    Ok(Some(Yarn {
        factor,
        original_max_position_embeddings: r.usize_or("original_max_position_embeddings", 4096)?,
        beta_fast: r.f64_or("beta_fast", 32.0)?,
        beta_slow: r.f64_or("beta_slow", 1.0)?,
        mscale: r.f64_or("mscale", 1.0)?,
        mscale_all_dim: r.f64_or("mscale_all_dim", 0.0)?,
    }))
}

fn parse_quant(o: &Obj<'_>) -> Result<Option<QuantConfig>> {
    let Some(q) = o.opt_obj("quantization_config")? else { return Ok(None) };
    match q.opt_str("quant_method")? {
        Some("fp8") => {}
        Some(m) => return Err(q.err("quant_method", format!("unsupported \"{m}\", expected \"fp8\""))),
        None => return Err(q.err("quant_method", "missing (expected \"fp8\")")),
    }
    if let Some(f) = q.opt_str("fmt")?
        && f != "e4m3"
    {
        return Err(q.err("fmt", format!("unsupported \"{f}\", expected \"e4m3\"")));
    }
    if let Some(a) = q.opt_str("activation_scheme")?
        && a != "dynamic"
    {
        return Err(q.err("activation_scheme", format!("unsupported \"{a}\", expected \"dynamic\"")));
    }
    match q.get("weight_block_size") {
        Some(Value::Array(b)) if b.len() == 2 && b.iter().all(|x| x.as_u64() == Some(BLOCK as u64)) => {}
        Some(v) => return Err(q.err("weight_block_size", format!("{}, expected [{BLOCK}, {BLOCK}]", crate::json::short(v)))),
        None => return Err(q.err("weight_block_size", format!("missing (expected [{BLOCK}, {BLOCK}])"))),
    }
    let scale_fmt = match q.opt_str("scale_fmt")? {
        None => ScaleFmt::Float,
        Some("ue8m0") => ScaleFmt::Ue8m0,
        Some(s) => return Err(q.err("scale_fmt", format!("unsupported \"{s}\", expected \"ue8m0\" or absent"))),
    };
    Ok(Some(QuantConfig { scale_fmt }))
}

pub(crate) const fn max_mtp_layers() -> usize {
    MAX_MTP_LAYERS
}
