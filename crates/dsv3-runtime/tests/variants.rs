//! Checkpoint variants that exist in the wild beyond the three official layouts, each with a
//! fixture the test writes: an FP8 MTP `eh_proj`, BF16 checkpoints whose K is off the 128
//! grid on the fp8 GEMM path, `scale_fmt: "ue8m0"` end to end, and the configs of the later
//! V3 releases; and the numerical hazards (positions past the limit, non-finite activations).

mod common;

use common::{Owned, copy_dir, load_model, load_model_mtp, rewrite, write_preset};
use dsv3_kernels::fp8::{BLOCK, ScaleFmt, blocks, decode_e4m3, encode_e4m3};
use dsv3_kernels::gemm::GemmPath;
use dsv3_kernels::{Backend, Cpu};
use dsv3_runtime::checkpoint::SINGLE_FILE;
use dsv3_runtime::model::{FiniteCheck, Model};
use dsv3_runtime::mtp::Mtp;
use dsv3_runtime::tensor_file::Dtype;
use dsv3_runtime::{Checkpoint, ModelConfig, Preset, Progress};
use half::bf16;
use std::path::Path;

/// MTP logits of `next` after the main model read `prompt` (one row per next token).
fn mtp_logits(m: &Model<Cpu>, mtp: &Mtp<Cpu>, prompt: &[u32], next: &[u32]) -> Vec<f32> {
    let mut cache = m.new_cache(&Cpu, 64).unwrap();
    let seq = cache.add_sequence();
    let h = m.forward_hidden(&Cpu, &mut cache, &[(seq, prompt)]).unwrap();
    let mut mc = mtp.new_cache(&Cpu, m, 64).unwrap();
    let mseq = mc.add_sequence();
    let states = mtp.forward(&Cpu, m, &mut mc, mseq, &h, next).unwrap();
    mtp.logits(&Cpu, &states, &(0..next.len()).collect::<Vec<_>>()).unwrap()
}

fn bf16s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
}

/// Some converted checkpoints quantise the MTP projection: `eh_proj` as F8_E4M3 with a
/// `weight_scale_inv`. It validates, loads, and computes what the same values stored as BF16
/// compute. The FP8 form uses power-of-two block scales, so every dequantised value
/// (≤ 4 significant bits) is exact in BF16 and the two files hold the same numbers.
#[test]
fn fp8_eh_proj_with_scale_matches_its_bf16_form() {
    let tmp = tempfile::tempdir().unwrap();
    let rep = write_preset(tmp.path(), "bf16", Preset::Tiny, None);
    let cfg = rep.config.clone();
    let h = cfg.hidden_size;
    let name = format!("model.layers.{}.eh_proj.weight", cfg.num_hidden_layers);
    let fp8_dir = copy_dir(&rep.dir, tmp.path(), "fp8");
    let (br, bc) = (blocks(h), blocks(2 * h));
    let mut codes = Vec::new();
    let mut scales = vec![0f32; br * bc];
    rewrite(&rep.dir.join(SINGLE_FILE), |ts: &mut Vec<Owned>| {
        let t = ts.iter_mut().find(|t| t.name == name).expect("eh_proj in the file");
        let w = bf16s(&t.data);
        for (i, s) in scales.iter_mut().enumerate() {
            let (r0, c0) = ((i / bc) * BLOCK, (i % bc) * BLOCK);
            let amax = (r0..(r0 + BLOCK).min(h))
                .flat_map(|r| (c0..(c0 + BLOCK).min(2 * h)).map(move |c| (r, c)))
                .fold(0f32, |m, (r, c)| m.max(w[r * 2 * h + c].abs()));
            *s = 2f32.powi((amax / 448.0).log2().ceil() as i32);
        }
        codes = w.iter().enumerate().map(|(i, v)| encode_e4m3(v / scales[(i / (2 * h) / BLOCK) * bc + (i % (2 * h)) / BLOCK])).collect();
        let deq: Vec<bf16> = codes
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let v = decode_e4m3(c) * scales[(i / (2 * h) / BLOCK) * bc + (i % (2 * h)) / BLOCK];
                assert_eq!(bf16::from_f32(v).to_f32(), v, "exact in BF16");
                bf16::from_f32(v)
            })
            .collect();
        t.data = deq.iter().flat_map(|v| v.to_le_bytes()).collect();
    });
    rewrite(&fp8_dir.join(SINGLE_FILE), |ts: &mut Vec<Owned>| {
        let t = ts.iter_mut().find(|t| t.name == name).unwrap();
        (t.dtype, t.data) = (Dtype::F8E4M3, codes.clone());
        let data = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
        ts.push(Owned { name: format!("{name}_scale_inv"), dtype: Dtype::F32, shape: vec![br, bc], data });
    });
    let ck = Checkpoint::open_with(&fp8_dir, Progress::Never).unwrap();
    assert_eq!(ck.info(&name).unwrap().1.dtype, Dtype::F8E4M3);
    ck.validate(&cfg).expect("an FP8 eh_proj with its scale is a valid checkpoint");
    for path in [GemmPath::Reference, GemmPath::Fp8] {
        let (m_b, mtp_b) = load_model_mtp(&rep.dir, path);
        let (m_f, mtp_f) = load_model_mtp(&fp8_dir, path);
        let (prompt, next) = ([5u32, 77, 300, 12], [77u32, 300, 12, 9]);
        let (want, got) = (mtp_logits(&m_b, &mtp_b, &prompt, &next), mtp_logits(&m_f, &mtp_f, &prompt, &next));
        // The same weight values (the FP8 eh_proj is dequantised exactly on either path),
        // summed in another order.
        let rel = common::rel_max_diff(&got, &want);
        assert!(rel <= 1e-5, "{path:?}: MTP logits of the FP8 eh_proj differ by {rel:e} of max |logit|");
    }
    // Without its scale the FP8 eh_proj is refused, naming the scale tensor.
    rewrite(&fp8_dir.join(SINGLE_FILE), |ts: &mut Vec<Owned>| ts.retain(|t| !t.name.ends_with("eh_proj.weight_scale_inv")));
    let err = Checkpoint::open_with(&fp8_dir, Progress::Never).unwrap().validate(&cfg).unwrap_err().to_string();
    assert!(err.contains("eh_proj.weight_scale_inv") && err.contains("missing"), "{err}");
}

fn fixture_config(name: &str) -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

/// The configs of the later V3-format releases. V3-0324, R1 and R1-0528 carry exactly V3's
/// fields; V3.1 adds `quantization_config.scale_fmt: "ue8m0"`; V3.2 (Exp) changes the model
/// type to `deepseek_v32` and adds the sparse-attention indexer (`index_topk`,
/// `index_n_heads`, `index_head_dim`), which is refused naming the field.
#[test]
fn configs_of_later_releases() {
    let v3 = fixture_config("config-deepseek-v3.json");
    for release in ["V3-0324", "R1", "R1-0528"] {
        let c = ModelConfig::from_json_value(&v3, release).unwrap();
        assert_eq!(c.scale_fmt(), ScaleFmt::Float, "{release}");
    }
    let mut v31 = v3.clone();
    v31["quantization_config"]["scale_fmt"] = "ue8m0".into();
    assert_eq!(ModelConfig::from_json_value(&v31, "V3.1").unwrap().scale_fmt(), ScaleFmt::Ue8m0);
    let mut v32 = v31.clone();
    v32["model_type"] = "deepseek_v32".into();
    v32["architectures"] = serde_json::json!(["DeepseekV32ForCausalLM"]);
    (v32["index_topk"], v32["index_n_heads"], v32["index_head_dim"]) = (2048.into(), 64.into(), 128.into());
    let err = ModelConfig::from_json_value(&v32, "V3.2").unwrap_err().to_string();
    assert!(err.contains("`model_type`") && err.contains("deepseek_v32") && err.contains("index_topk"), "{err}");
    // The indexer fields under the V3 model type are refused too, by name.
    let mut v3_idx = v3.clone();
    v3_idx["index_topk"] = 2048.into();
    let err = ModelConfig::from_json_value(&v3_idx, "config.json").unwrap_err().to_string();
    assert!(err.contains("`index_topk`") && err.contains("Sparse Attention"), "{err}");
}

/// Logits of `ids` (one prefill step) and the model.
fn prefill_logits(m: &Model<Cpu>, ids: &[u32]) -> Vec<f32> {
    common::logits_in_chunks(m, ids, &[ids.len()])
}

/// A BF16 checkpoint whose dense MLP width is off the 128 grid (V2-Lite: 10944) and whose
/// experts are too runs on the fp8 GEMM path (K zero-padded, exact) and stays within the fp8
/// path's usual distance of the reference path.
#[test]
fn bf16_checkpoint_with_k_off_the_grid_runs_on_the_fp8_path() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = Preset::TinyV2Lite.config();
    (cfg.intermediate_size, cfg.moe_intermediate_size) = (330, 200);
    cfg.validate().unwrap();
    assert!(!cfg.is_fp8(), "a BF16 checkpoint");
    let opts = dsv3_runtime::InitOptions { seed: 5, progress: Progress::Never, ..Default::default() };
    let rep = dsv3_runtime::init_random(&cfg, &tmp.path().join("m"), &opts).unwrap();
    let ids = [3u32, 90, 17, 400, 5, 77];
    let want = prefill_logits(&load_model(&rep.dir, GemmPath::Reference), &ids);
    let got = prefill_logits(&load_model(&rep.dir, GemmPath::Fp8), &ids);
    let d = dsv3_kernels::fp8::calc_diff(&got, &want);
    // The same measure on the preset's own widths (multiples of 128, nothing padded).
    let base = dsv3_runtime::init_random(&Preset::TinyV2Lite.config(), &tmp.path().join("b"), &opts).unwrap();
    let (bw, bg) =
        (prefill_logits(&load_model(&base.dir, GemmPath::Reference), &ids), prefill_logits(&load_model(&base.dir, GemmPath::Fp8), &ids));
    let d0 = dsv3_kernels::fp8::calc_diff(&bg, &bw);
    eprintln!("calc_diff(fp8, reference): {d:e} with padded K, {d0:e} on the 128 grid");
    assert!(d < 5e-3, "calc_diff(fp8, reference) = {d:e} (on the 128 grid: {d0:e})");
}

/// `scale_fmt: "ue8m0"` end to end: the config is read, the random checkpoint of that config
/// has power-of-two weight scales, the loaded model quantises activations with power-of-two
/// scales on the fp8 path (its logits differ from the same weights under the default format,
/// and both stay close to the reference path), and the reference path is unaffected.
#[test]
fn ue8m0_checkpoint_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = Preset::Tiny.config();
    cfg.quantization = Some(dsv3_runtime::QuantConfig { scale_fmt: ScaleFmt::Ue8m0 });
    let opts = dsv3_runtime::InitOptions { seed: 6, progress: Progress::Never, ..Default::default() };
    let rep = dsv3_runtime::init_random(&cfg, &tmp.path().join("m"), &opts).unwrap();
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(rep.dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(written["quantization_config"]["scale_fmt"], "ue8m0");
    let ck = Checkpoint::open_with(&rep.dir, Progress::Never).unwrap();
    let w = ck.fp8_weight("model.layers.0.self_attn.o_proj.weight", cfg.hidden_size, cfg.o_in()).unwrap();
    assert!(w.view().scale_inv().iter().all(|s| s.to_bits() & 0x007F_FFFF == 0), "ue8m0 weight scales are powers of two");
    // The same directory under the default format (scale_fmt removed).
    let float_dir = copy_dir(&rep.dir, tmp.path(), "float");
    let mut float_cfg = written.clone();
    float_cfg["quantization_config"].as_object_mut().unwrap().remove("scale_fmt");
    std::fs::write(float_dir.join("config.json"), serde_json::to_vec(&float_cfg).unwrap()).unwrap();
    let ids = [3u32, 90, 17, 400, 5, 77];
    let reference = prefill_logits(&load_model(&rep.dir, GemmPath::Reference), &ids);
    assert_eq!(reference, prefill_logits(&load_model(&float_dir, GemmPath::Reference), &ids), "the reference path ignores scale_fmt");
    let ue8m0 = prefill_logits(&load_model(&rep.dir, GemmPath::Fp8), &ids);
    let float = prefill_logits(&load_model(&float_dir, GemmPath::Fp8), &ids);
    assert_ne!(ue8m0, float, "the activation scale format reaches the fp8 GEMMs");
    // Both formats stay at the fp8 path's distance from the reference path on this random
    // model (large here: random weights amplify rounding through the layers), ue8m0's coarser
    // scales (up to one bit less per value) no more than a few times float's.
    let (d_float, d_ue8m0) = (dsv3_kernels::fp8::calc_diff(&float, &reference), dsv3_kernels::fp8::calc_diff(&ue8m0, &reference));
    eprintln!("calc_diff(fp8, reference): float {d_float:e}, ue8m0 {d_ue8m0:e}");
    assert!(d_float.is_finite() && d_ue8m0 < 3.0 * d_float.max(1e-3), "float {d_float:e}, ue8m0 {d_ue8m0:e}");
}

/// Positions past `max_position_embeddings` are refused before any work: the error names the
/// field, and the cache is as it was (the sequence keeps its length, a fitting step follows).
#[test]
fn positions_past_max_position_embeddings_are_refused_before_work() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = Preset::Tiny.config();
    cfg.max_position_embeddings = 12;
    let opts = dsv3_runtime::InitOptions { seed: 2, progress: Progress::Never, ..Default::default() };
    let rep = dsv3_runtime::init_random(&cfg, &tmp.path().join("m"), &opts).unwrap();
    let m = load_model(&rep.dir, GemmPath::Reference);
    let mut cache = m.new_cache(&Cpu, 64).unwrap();
    let seq = cache.add_sequence();
    let too_long: Vec<u32> = (0..13).collect();
    let err = m.forward_hidden(&Cpu, &mut cache, &[(seq, &too_long)]).unwrap_err().to_string();
    assert!(err.contains("max_position_embeddings = 12"), "{err}");
    m.forward_hidden(&Cpu, &mut cache, &[(seq, &too_long[..10])]).unwrap();
    let (pages, generation) = (cache.free_pages(), cache.generation());
    let err = m.forward_hidden(&Cpu, &mut cache, &[(seq, &[1, 2, 3])]).unwrap_err().to_string();
    assert!(err.contains("positions 10..13") && err.contains("nothing was computed"), "{err}");
    assert_eq!((cache.seq_len(seq).unwrap(), cache.free_pages(), cache.generation()), (10, pages, generation), "the cache is untouched");
    m.forward_hidden(&Cpu, &mut cache, &[(seq, &[1, 2])]).unwrap();
    assert_eq!(cache.seq_len(seq).unwrap(), 12);
}

/// A non-finite activation is a typed error naming where it is, never silent garbage.
/// (a) A post-attention norm weight of 3e38 in layer 1 (MoE) overflows that layer's MLP input:
/// the router refuses the non-finite logits, and the error names layer 1, in every mode.
/// (b) Expert down_proj scales of 3e38 in the last layer overflow after the last router: the
/// default check of the final hidden state reports it; `FiniteCheck::Layers` (the
/// DSV3_CHECK_FINITE=layers mode) names that layer's MLP output.
#[test]
fn non_finite_activations_are_typed_errors_naming_the_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let rep = write_preset(tmp.path(), "norm", Preset::Tiny, None);
    let cfg = rep.config.clone();
    let last = cfg.num_hidden_layers - 1;
    assert_eq!(cfg.layer_kind(last), dsv3_runtime::LayerKind::Moe);
    let scales = copy_dir(&rep.dir, tmp.path(), "scales");
    rewrite(&rep.dir.join(SINGLE_FILE), |ts: &mut Vec<Owned>| {
        let t = ts.iter_mut().find(|t| t.name == "model.layers.1.post_attention_layernorm.weight").unwrap();
        t.data = t.data.chunks_exact(2).flat_map(|_| bf16::from_f32(3e38).to_le_bytes()).collect();
    });
    rewrite(&scales.join(SINGLE_FILE), |ts: &mut Vec<Owned>| {
        let prefix = format!("model.layers.{last}.mlp.experts.");
        for t in ts.iter_mut().filter(|t| t.name.starts_with(&prefix) && t.name.ends_with("down_proj.weight_scale_inv")) {
            t.data = t.data.chunks_exact(4).flat_map(|_| 3e38f32.to_le_bytes()).collect();
        }
    });
    let run = |m: &Model<Cpu>| {
        let mut cache = m.new_cache(&Cpu, 64).unwrap();
        let seq = cache.add_sequence();
        m.forward_hidden(&Cpu, &mut cache, &[(seq, &[3, 90, 17])]).map(|h| Cpu.download(&h).unwrap())
    };
    for path in [GemmPath::Reference, GemmPath::Fp8] {
        let mut m = load_model(&rep.dir, path);
        for check in [FiniteCheck::Final, FiniteCheck::Layers] {
            m.set_finite_check(check);
            let err = run(&m).unwrap_err().to_string();
            assert!(err.starts_with("layer 1: ") && err.contains("non-finite"), "{path:?} {check:?}: {err}");
        }
        let mut m = load_model(&scales, path);
        let err = run(&m).unwrap_err().to_string();
        assert!(err.contains("non-finite activation") && err.contains("final hidden state"), "{path:?}: {err}");
        m.set_finite_check(FiniteCheck::Layers);
        let err = run(&m).unwrap_err().to_string();
        assert!(err.contains(&format!("layer {last} MLP output")), "{path:?}: {err}");
        m.set_finite_check(FiniteCheck::Off);
        assert!(run(&m).unwrap().iter().any(|v| !v.is_finite()), "{path:?}: with the check off the garbage comes through");
    }
}
