//! The whole model against HF transformers (issue 4, "Proven against an independent
//! implementation"): golden fixtures made by `scripts/fixtures/generate.sh` (HF
//! `DeepseekV3ForCausalLM` / `DeepseekV2ForCausalLM`, float32, eager attention, on the
//! dequantised weights; see `scripts/fixtures/gen.py` for the configs and why they are chosen).
//!
//! * `hf-v3-tiny`: FP8 + 128x128 scales with partial blocks, q LoRA, sigmoid/noaux_tc with 4
//!   groups keeping 2 and a non-zero `e_score_correction_bias`, YaRN, 1 dense + 2 MoE layers.
//! * `hf-v2lite-tiny`: BF16, no q LoRA, softmax greedy routing, not renormalised, plain RoPE.
//!
//! The reference GEMM path must match HF to max |diff| <= 1e-3 x max |logit| with the same
//! argmax at every position, in one prefill and token by token on the cache (the absorbed
//! decode form). The fp8 GEMM path (activations quantised per 1x128 tile too) is held to a
//! calc_diff bound against HF.

use dsv3_kernels::Cpu;
use dsv3_kernels::gemm::GemmPath;
use dsv3_runtime::model::Model;
use dsv3_runtime::{Checkpoint, ModelConfig};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn load(name: &str, path: GemmPath) -> Model<Cpu> {
    let dir = fixture(name);
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let ck = Checkpoint::open(&dir).unwrap();
    ck.validate(&cfg).unwrap();
    Model::load(&Cpu, &ck, &cfg, path).unwrap()
}

/// `(ids, logits [T * vocab])` as HF computed them.
fn expected(name: &str, vocab: usize) -> (Vec<u32>, Vec<f32>) {
    let bytes = std::fs::read(fixture(name).join("expected_logits.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids_t = st.tensor("ids").unwrap();
    let ids: Vec<u32> = match ids_t.dtype() {
        safetensors::Dtype::I64 => ids_t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect(),
        safetensors::Dtype::I32 => ids_t.data().chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as u32).collect(),
        d => panic!("ids: unexpected dtype {d:?}"),
    };
    let l = st.tensor("logits").unwrap();
    assert_eq!(l.dtype(), safetensors::Dtype::F32);
    assert_eq!(l.shape(), &[ids.len(), vocab]);
    let logits = l.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    (ids, logits)
}

/// Logits of every position of `ids`, fed as the given chunks (one sequence).
fn logits_in_chunks(m: &Model<Cpu>, ids: &[u32], chunks: &[usize]) -> Vec<f32> {
    let mut cache = m.new_cache(&Cpu, ids.len()).unwrap();
    let seq = cache.add_sequence();
    let mut out = Vec::new();
    let mut at = 0;
    for &c in chunks {
        let h = m.forward_hidden(&Cpu, &mut cache, &[(seq, &ids[at..at + c])]).unwrap();
        out.extend(m.logits(&Cpu, &h, &(0..c).collect::<Vec<_>>()).unwrap());
        at += c;
    }
    assert_eq!(at, ids.len());
    out
}

fn rel_max_diff(a: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(want).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn argmax_rows(l: &[f32], vocab: usize) -> Vec<usize> {
    l.chunks(vocab).map(|r| r.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0).collect()
}

fn calc_diff(a: &[f32], b: &[f32]) -> f64 {
    let (mut xy, mut xx, mut yy) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        xy += x as f64 * y as f64;
        xx += x as f64 * x as f64;
        yy += y as f64 * y as f64;
    }
    1.0 - 2.0 * xy / (xx + yy)
}

fn reference_path_matches_hf(name: &str) {
    let m = load(name, GemmPath::Reference);
    let vocab = m.config().vocab_size;
    let (ids, want) = expected(name, vocab);
    let t = ids.len();
    let prefill = logits_in_chunks(&m, &ids, &[t]);
    let mut steps = vec![3];
    steps.resize(t - 2, 1);
    let decode = logits_in_chunks(&m, &ids, &steps);
    for (how, got) in [("prefill", &prefill), ("decode", &decode)] {
        assert!(got.iter().all(|v| v.is_finite()), "{name} {how}: non-finite logits");
        let d = rel_max_diff(got, &want);
        eprintln!("{name} reference {how}: max |diff| / max |logit| = {d:.3e}");
        assert!(d <= 1e-3, "{name} reference {how}: max |diff| / max |logit| = {d} > 1e-3");
        assert_eq!(argmax_rows(got, vocab), argmax_rows(&want, vocab), "{name} reference {how}: argmax per position");
    }
}

#[test]
fn v3_tiny_reference_path_matches_hf() {
    reference_path_matches_hf("hf-v3-tiny");
}

#[test]
fn v2lite_tiny_reference_path_matches_hf() {
    reference_path_matches_hf("hf-v2lite-tiny");
}

/// The fp8 GEMM path against HF: calc_diff over all logits below `bound` (derived below).
fn fp8_path_tracks_hf(name: &str, bound: f64) {
    let m = load(name, GemmPath::Fp8);
    let vocab = m.config().vocab_size;
    let (ids, want) = expected(name, vocab);
    let got = logits_in_chunks(&m, &ids, &[ids.len()]);
    let cd = calc_diff(&got, &want);
    eprintln!("{name} fp8: calc_diff = {cd:.3e}, max |diff| / max |logit| = {:.3e}", rel_max_diff(&got, &want));
    assert!(cd < bound, "{name}: calc_diff(fp8 path, HF) = {cd} >= {bound}");
}

// Bounds (measured with torch 2.9.1 / transformers 4.57.6 fixtures in brackets). Both
// fixtures' projection weights are exact FP8 values, so the fp8 path differs from HF only by
// quantising each GEMM's activations per 1x128 tile to E4M3. One fp8 GEMM on random data is
// at calc_diff ~6.5e-4 (the kernel tests hold each to < 1e-3) and independent errors add:
// hf-v2lite-tiny has 2 layers x (q, kv_a, o + 3 MLP GEMMs) = 12 fp8 GEMMs on a token's path,
// <= 12 x 6.5e-4 = 7.8e-3 [8.5e-4, same argmax everywhere]. hf-v3-tiny has 3 layers x 7 = 21:
// <= 0.014 without routing changes [per position 1.4e-3..3.1e-3], but the perturbed router
// input flips a group or expert choice at 2 of the 12 positions (calc_diff 0.08 and 0.18 there;
// their layer-1 group margins are 0.022 and 0.008), which lifts the whole-sequence value to
// [2.4e-2]. Its bound, 0.05, is the one tests/model.rs holds the tiny preset's fp8 path to.
#[test]
fn v3_tiny_fp8_path_tracks_hf() {
    fp8_path_tracks_hf("hf-v3-tiny", 0.05);
}

#[test]
fn v2lite_tiny_fp8_path_tracks_hf() {
    fp8_path_tracks_hf("hf-v2lite-tiny", 7.8e-3);
}
