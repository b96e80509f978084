//! config.json: the three real configs, conversions to the kernel configs, the tensor plan's
//! counts, and one error per bad field (the message must name the field).

use dsv3_kernels::gating::RouteCfg;
use dsv3_kernels::rope::RopeCfg;
use dsv3_runtime::config::{LayerKind, ModelConfig, ModelType, ScoringFunc, TopkMethod};
use dsv3_runtime::plan::tensor_plan;
use dsv3_runtime::{Preset, RuntimeError};
use serde_json::{Value, json};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}
fn v3() -> ModelConfig {
    ModelConfig::from_file(&fixture("config-deepseek-v3.json")).expect("V3 config loads")
}
fn v2_lite() -> ModelConfig {
    ModelConfig::from_file(&fixture("config-deepseek-v2-lite.json")).expect("V2-Lite config loads")
}
fn moonlight() -> ModelConfig {
    ModelConfig::from_file(&fixture("config-moonlight-16b-a3b-instruct.json")).expect("Moonlight config loads")
}

#[test]
fn deepseek_v3_config() {
    let c = v3();
    assert_eq!(c.model_type, ModelType::DeepseekV3);
    assert_eq!((c.vocab_size, c.hidden_size, c.intermediate_size, c.moe_intermediate_size), (129280, 7168, 18432, 2048));
    assert_eq!((c.num_hidden_layers, c.first_k_dense_replace, c.num_attention_heads), (61, 3, 128));
    assert_eq!((c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim), (Some(1536), 512, 128, 64, 128));
    assert_eq!((c.qk_head_dim(), c.q_out(), c.kv_a_out(), c.kv_b_out(), c.o_in()), (192, 24576, 576, 32768, 16384));
    assert_eq!(c.route_cfg(), RouteCfg::deepseek_v3());
    assert_eq!(c.rope_cfg(), RopeCfg::DEEPSEEK_V3);
    assert!((c.softmax_scale().unwrap() - 0.135_233_78).abs() < 1e-7);
    assert!(c.is_fp8() && c.has_router_bias());
    assert_eq!((c.bos_token_id, c.eos_token_ids.clone()), (Some(0), vec![1]));
    assert_eq!(c.mtp_layers(), 61..62);
    assert_eq!((c.layer_kind(2), c.layer_kind(3), c.layer_kind(61)), (LayerKind::Dense, LayerKind::Moe, LayerKind::Moe));
    assert_eq!((c.norm_eps(), c.latent_norm_eps()), (1e-6, 1e-6));
}

#[test]
fn deepseek_v2_lite_config() {
    let c = v2_lite();
    assert_eq!(c.model_type, ModelType::DeepseekV2);
    assert_eq!(c.q_lora_rank, None);
    assert_eq!((c.scoring_func, c.topk_method, c.norm_topk_prob), (ScoringFunc::Softmax, TopkMethod::Greedy, false));
    assert_eq!(c.route_cfg(), RouteCfg::deepseek_v2_lite());
    assert_eq!(c.rope_cfg(), RopeCfg::DEEPSEEK_V2_LITE);
    assert!((c.softmax_scale().unwrap() - 0.114_721_39).abs() < 1e-7);
    assert!(!c.is_fp8() && !c.has_router_bias());
    assert_eq!((c.num_nextn_predict_layers, c.mtp_layers().len()), (0, 0));
    assert_eq!((c.bos_token_id, c.eos_token_ids.clone()), (Some(100000), vec![100001]));
    assert_eq!(c.shared_intermediate(), 2816);
}

#[test]
fn moonlight_config() {
    let c = moonlight();
    assert_eq!(c.model_type, ModelType::DeepseekV3);
    assert_eq!(c.route_cfg(), RouteCfg::moonlight());
    assert_eq!(c.rope_cfg(), RopeCfg::MOONLIGHT);
    assert_eq!(c.rope_scaling, None);
    assert!((c.softmax_scale().unwrap() - 0.072_168_78).abs() < 1e-7);
    assert_eq!((c.rms_norm_eps, c.norm_eps(), c.latent_norm_eps()), (1e-5, 1e-5, 1e-6));
    assert!(c.has_router_bias() && !c.is_fp8());
    assert_eq!(c.eos_token_ids, vec![163586]);
}

#[test]
fn eos_may_be_a_list() {
    let mut v = load_json("config-deepseek-v3.json");
    v["eos_token_id"] = json!([1, 2]);
    assert_eq!(ModelConfig::from_json_value(&v, "x").unwrap().eos_token_ids, vec![1, 2]);
}

#[test]
fn ue8m0_scale_fmt_is_read() {
    let mut v = load_json("config-deepseek-v3.json");
    v["quantization_config"]["scale_fmt"] = json!("ue8m0");
    let c = ModelConfig::from_json_value(&v, "x").unwrap();
    assert_eq!(c.scale_fmt(), dsv3_kernels::fp8::ScaleFmt::Ue8m0);
}

#[test]
fn to_json_round_trips_every_config() {
    let mut all = vec![v3(), v2_lite(), moonlight()];
    all.extend(Preset::ALL.iter().map(|p| p.config()));
    for c in all {
        let back = ModelConfig::from_json_value(&c.to_json(), "round trip").unwrap();
        assert_eq!(back, c);
    }
}

#[test]
fn presets_are_valid() {
    for p in Preset::ALL {
        p.config().validate().unwrap_or_else(|e| panic!("{}: {e}", p.name()));
        assert_eq!(Preset::from_name(p.name()).unwrap(), p);
    }
    let e = Preset::from_name("huge").unwrap_err().to_string();
    assert!(e.contains("huge") && e.contains("tiny"), "{e}");
}

/// The tensor counts of docs/model.md §2.
#[test]
fn plan_matches_published_tensor_counts() {
    let c = v3();
    let plan = tensor_plan(&c);
    assert_eq!(plan.stored(&c).len(), 91_991);
    let c2 = v2_lite();
    assert_eq!(tensor_plan(&c2).stored(&c2).len(), 5_291);
    let m = moonlight();
    assert_eq!(tensor_plan(&m).stored(&m).len(), 5_291 + 26);
}

#[test]
fn mtp_layer_is_listed_apart_from_the_main_model() {
    let c = v3();
    let plan = tensor_plan(&c);
    assert!(plan.main.iter().all(|t| !t.name.starts_with("model.layers.61.")));
    assert_eq!(plan.mtp.len(), 1);
    assert!(plan.mtp[0].iter().all(|t| t.name.starts_with("model.layers.61.")));
    let names: Vec<&str> = plan.mtp[0].iter().map(|t| t.name.as_str()).collect();
    for n in ["embed_tokens.weight", "enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "shared_head.head.weight"]
    {
        assert!(names.contains(&format!("model.layers.61.{n}").as_str()), "{n}");
    }
    let eh = plan.mtp[0].iter().find(|t| t.name.ends_with("eh_proj.weight")).unwrap();
    assert_eq!(eh.shape, vec![7168, 14336]);
    let kv_a_scale = plan.stored(&c).into_iter().find(|(s, _)| s.name == "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv");
    assert_eq!(kv_a_scale.unwrap().0.shape, vec![5, 56]);
}

fn load_json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap()
}

/// Applies `edit` to a fixture and expects an error naming `field`.
fn bad(base: &str, edit: impl FnOnce(&mut Value), field: &str) {
    let mut v = load_json(base);
    edit(&mut v);
    let err = ModelConfig::from_json_value(&v, base).expect_err(&format!("edit of `{field}` must be rejected"));
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, RuntimeError::Config { .. }), "{msg}");
    assert!(msg.contains(&format!("`{field}`")), "message must name `{field}`: {msg}");
    assert!(msg.contains(base), "message must name the file: {msg}");
}

fn set(field: &'static str, val: Value) -> impl FnOnce(&mut Value) {
    move |v| v[field] = val
}

const V3: &str = "config-deepseek-v3.json";
const V2: &str = "config-deepseek-v2-lite.json";
const ML: &str = "config-moonlight-16b-a3b-instruct.json";

#[test]
fn bad_sizes_name_their_field() {
    bad(V3, set("hidden_size", json!(0)), "hidden_size");
    bad(V3, set("hidden_size", json!("7168")), "hidden_size");
    bad(V3, set("vocab_size", json!(-1)), "vocab_size");
    bad(V3, set("num_attention_heads", json!(0)), "num_attention_heads");
    bad(V3, set("q_lora_rank", json!(0)), "q_lora_rank");
    bad(V3, |v| drop(v.as_object_mut().unwrap().remove("q_lora_rank")), "q_lora_rank");
    bad(V3, |v| drop(v.as_object_mut().unwrap().remove("kv_lora_rank")), "kv_lora_rank");
    bad(V3, set("qk_rope_head_dim", json!(63)), "qk_rope_head_dim");
    bad(V3, set("v_head_dim", json!(1.5)), "v_head_dim");
    bad(V3, set("intermediate_size", json!(0)), "intermediate_size");
    bad(V3, set("num_hidden_layers", json!(0)), "num_hidden_layers");
    bad(V3, set("first_k_dense_replace", json!(62)), "first_k_dense_replace");
    bad(V3, set("moe_layer_freq", json!(0)), "moe_layer_freq");
    bad(V3, set("max_position_embeddings", json!(0)), "max_position_embeddings");
    bad(V3, set("num_nextn_predict_layers", json!(1000)), "num_nextn_predict_layers");
    bad(V3, |v| (v["vocab_size"], v["hidden_size"]) = (json!(4_000_000_000u64), json!(4_000_000_000u64)), "vocab_size");
}

#[test]
fn bad_routing_names_its_field() {
    bad(V3, set("num_experts_per_tok", json!(129)), "num_experts_per_tok"); // 4 groups x 32 available
    bad(V3, set("num_experts_per_tok", json!(0)), "num_experts_per_tok");
    bad(V3, set("n_group", json!(7)), "n_group"); // does not divide 256
    bad(V3, set("n_group", json!(256)), "n_group"); // 1 expert per group: no top-2 sum
    bad(V3, set("topk_group", json!(9)), "topk_group");
    bad(V3, set("n_routed_experts", json!(0)), "n_routed_experts");
    bad(V3, set("scoring_func", json!("tanh")), "scoring_func");
    bad(V3, set("scoring_func", json!("softmax")), "scoring_func"); // noaux_tc needs sigmoid
    bad(V3, set("topk_method", json!("random")), "topk_method");
    bad(V3, set("routed_scaling_factor", json!(-2.5)), "routed_scaling_factor");
    bad(V3, set("norm_topk_prob", json!("yes")), "norm_topk_prob");
    bad(V2, set("n_group", json!(3)), "n_group");
    bad(V2, set("num_experts_per_tok", json!(65)), "num_experts_per_tok");
    bad(V2, set("scoring_func", json!("sigmoid")), "scoring_func"); // greedy needs softmax
    bad(ML, set("num_experts_per_tok", json!(65)), "num_experts_per_tok");
}

#[test]
fn bad_scalars_name_their_field() {
    bad(V3, set("rms_norm_eps", json!(0.0)), "rms_norm_eps");
    bad(V3, set("rms_norm_eps", json!(-1e-6)), "rms_norm_eps");
    bad(V3, set("rms_norm_eps", json!(1e-60)), "rms_norm_eps"); // rounds to 0 in f32
    bad(V3, set("rope_theta", json!(1.0)), "rope_theta");
    bad(V3, set("bos_token_id", json!("x")), "bos_token_id");
    bad(V3, set("eos_token_id", json!(129280)), "eos_token_id");
    bad(V3, set("eos_token_id", json!([])), "eos_token_id");
    bad(V3, set("model_type", json!("llama")), "model_type");
    bad(V3, set("hidden_act", json!("gelu")), "hidden_act");
    bad(V3, set("tie_word_embeddings", json!(true)), "tie_word_embeddings");
    bad(V3, set("attention_bias", json!(true)), "attention_bias");
    bad(V3, set("rope_interleave", json!(false)), "rope_interleave");
}

#[test]
fn bad_rope_scaling_names_its_field() {
    bad(V3, |v| v["rope_scaling"]["factor"] = json!(0.5), "rope_scaling.factor");
    bad(V3, |v| drop(v["rope_scaling"].as_object_mut().unwrap().remove("factor")), "rope_scaling.factor");
    bad(V3, |v| v["rope_scaling"]["type"] = json!("linear"), "rope_scaling.type");
    bad(V3, |v| v["rope_scaling"]["beta_fast"] = json!(0.5), "rope_scaling.beta_fast");
    bad(V3, |v| v["rope_scaling"]["beta_slow"] = json!(-1), "rope_scaling.beta_slow");
    bad(V3, |v| v["rope_scaling"]["mscale"] = json!(-1), "rope_scaling.mscale");
    bad(V3, |v| v["rope_scaling"]["original_max_position_embeddings"] = json!(0), "rope_scaling.original_max_position_embeddings");
    bad(V3, set("rope_scaling", json!("yarn")), "rope_scaling");
}

#[test]
fn bad_quantization_names_its_field() {
    bad(V3, |v| v["quantization_config"]["weight_block_size"] = json!([64, 64]), "quantization_config.weight_block_size");
    bad(V3, |v| v["quantization_config"]["fmt"] = json!("e5m2"), "quantization_config.fmt");
    bad(V3, |v| v["quantization_config"]["quant_method"] = json!("gptq"), "quantization_config.quant_method");
    bad(V3, |v| v["quantization_config"]["scale_fmt"] = json!("e8m0x"), "quantization_config.scale_fmt");
    bad(V3, |v| v["quantization_config"]["activation_scheme"] = json!("static"), "quantization_config.activation_scheme");
}

#[test]
fn garbage_json_names_the_file() {
    let err = ModelConfig::from_json_str("{\"hidden_size\": 7168,", "garbage.json").unwrap_err().to_string();
    assert!(err.contains("garbage.json") && err.contains("invalid JSON"), "{err}");
    let err = ModelConfig::from_json_str("[1, 2]", "list.json").unwrap_err().to_string();
    assert!(err.contains("list.json") && err.contains("object"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let err = ModelConfig::from_file(&dir.path().join("config.json")).unwrap_err().to_string();
    assert!(err.contains("config.json"), "{err}");
}
