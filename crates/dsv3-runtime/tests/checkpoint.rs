//! Random checkpoints written in the real format and read back: every planned tensor loads
//! through the typed accessors and validates; sharding, determinism, the reference
//! `safetensors` library's view of the files, and the output-directory rules.

mod common;

use common::*;
use dsv3_kernels::fp8::blocks;
use dsv3_runtime::checkpoint::{INDEX_FILE, SINGLE_FILE};
use dsv3_runtime::plan::{TensorRole, tensor_plan};
use dsv3_runtime::writer::OutputDir;
use dsv3_runtime::{Checkpoint, LinearWeight, ModelConfig, Preset, Progress, RuntimeError};

/// Loads every planned tensor through its accessor and checks value statistics.
fn load_everything(dir: &std::path::Path) -> (ModelConfig, Checkpoint) {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let ck = Checkpoint::open_with(dir, Progress::Never).unwrap();
    ck.validate(&cfg).unwrap();
    let plan = tensor_plan(&cfg);
    for t in plan.iter() {
        match t.role {
            TensorRole::Linear => {
                let (r, c) = (t.shape[0], t.shape[1]);
                let w = ck.fp8_weight(&t.name, r, c).unwrap();
                let deq = w.view().dequantize();
                let std = (deq.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / deq.len() as f64).sqrt();
                let want = (c as f64).powf(-0.5);
                assert!((std / want - 1.0).abs() < 0.25, "{}: std {std}, expected ~{want}", t.name);
                let stored = ck.linear_weight(&t.name, r, c).unwrap();
                assert_eq!(matches!(stored, LinearWeight::Fp8(_)), cfg.is_fp8(), "{}", t.name);
                if cfg.is_fp8() {
                    assert_eq!(w.view().scale_inv().len(), blocks(r) * blocks(c));
                }
            }
            TensorRole::Bf16 | TensorRole::Bf16OrFp8 => {
                let w = ck.bf16_weight(&t.name, t.shape[0], t.shape[1]).unwrap();
                assert_eq!((w.rows(), w.cols()), (t.shape[0], t.shape[1]));
            }
            TensorRole::Norm => {
                let v = ck.norm_weight(&t.name, t.shape[0]).unwrap();
                let mean = v.iter().sum::<f32>() / v.len() as f32;
                assert!((mean - 1.0).abs() < 0.05, "{}: mean {mean}", t.name);
            }
            TensorRole::F32 => {
                let v = ck.f32_vec(&t.name, t.shape[0]).unwrap();
                assert!(v.iter().any(|&b| b != 0.0), "{}: router bias must be non-zero", t.name);
            }
        }
    }
    ck.finish_progress();
    (cfg, ck)
}

#[test]
fn tiny_round_trip_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    let rep = write_preset(tmp.path(), "tiny", Preset::Tiny, None);
    assert_eq!(rep.files, vec![rep.dir.join(SINGLE_FILE)]);
    let (cfg, ck) = load_everything(&rep.dir);
    assert_eq!(cfg, Preset::Tiny.config());
    assert_eq!(ck.len(), tensor_plan(&cfg).stored(&cfg).len());
    assert_eq!(ck.len(), rep.tensors);
    // The MTP copies are byte-identical to the main embedding and head, as in the real files.
    let (v, h) = (cfg.vocab_size, cfg.hidden_size);
    let mtp = cfg.num_hidden_layers;
    assert_eq!(
        ck.bf16_weight("model.embed_tokens.weight", v, h).unwrap(),
        ck.bf16_weight(&format!("model.layers.{mtp}.embed_tokens.weight"), v, h).unwrap()
    );
    assert_eq!(
        ck.bf16_weight("lm_head.weight", v, h).unwrap(),
        ck.bf16_weight(&format!("model.layers.{mtp}.shared_head.head.weight"), v, h).unwrap()
    );
    // A partial 128-block: kv_a_proj has kv_lora + rope = 80 rows, one block row of 80.
    let kv_a = ck.fp8_weight("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", 80, 256).unwrap();
    assert_eq!(kv_a.view().scale_inv().len(), 2);
}

#[test]
fn tiny_round_trip_sharded() {
    let tmp = tempfile::tempdir().unwrap();
    let rep = write_preset(tmp.path(), "tiny", Preset::Tiny, Some(1 << 20));
    assert!(rep.files.len() > 3, "expected several shards, got {:?}", rep.files);
    assert!(rep.dir.join(INDEX_FILE).exists() && !rep.dir.join(SINGLE_FILE).exists());
    let (_, ck) = load_everything(&rep.dir);
    assert_eq!(ck.files().count(), rep.files.len() - 1);
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(rep.dir.join(INDEX_FILE)).unwrap()).unwrap();
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(rep.bytes));
    assert_eq!(index["weight_map"].as_object().unwrap().len(), rep.tensors);
}

#[test]
fn bf16_presets_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, p) in [("v2lite", Preset::TinyV2Lite), ("moonlight", Preset::TinyMoonlight)] {
        let rep = write_preset(tmp.path(), name, p, None);
        let (cfg, ck) = load_everything(&rep.dir);
        assert!(!cfg.is_fp8());
        assert!(!ck.names().any(|n| n.ends_with("_scale_inv")));
        assert!(ck.contains("model.layers.0.self_attn.q_proj.weight"));
        assert_eq!(ck.contains("model.layers.1.mlp.gate.e_score_correction_bias"), p == Preset::TinyMoonlight);
    }
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let a = write_preset(tmp.path(), "a", Preset::Tiny, None);
    let b = write_preset(tmp.path(), "b", Preset::Tiny, None);
    let read = |d: &std::path::Path| std::fs::read(d.join(SINGLE_FILE)).unwrap();
    assert!(read(&a.dir) == read(&b.dir), "same seed must give identical files");
    let opts = dsv3_runtime::InitOptions { seed: 8, progress: Progress::Never, ..Default::default() };
    let c = dsv3_runtime::init_random_preset(Preset::Tiny, &tmp.path().join("c"), &opts).unwrap();
    assert!(read(&a.dir) != read(&c.dir));
}

/// The reference `safetensors` library reads what we write, with the same names and shapes.
#[test]
fn reference_library_reads_our_files() {
    let tmp = tempfile::tempdir().unwrap();
    let rep = write_preset(tmp.path(), "tiny", Preset::Tiny, None);
    let bytes = std::fs::read(rep.dir.join(SINGLE_FILE)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ck = Checkpoint::open_with(&rep.dir, Progress::Never).unwrap();
    assert_eq!(st.len(), ck.len());
    for (name, view) in st.tensors() {
        let (_, info) = ck.info(&name).unwrap();
        assert_eq!(view.shape(), info.shape.as_slice(), "{name}");
        assert_eq!(format!("{:?}", view.dtype()), info.dtype.as_str(), "{name}");
        assert_eq!(view.data().len(), info.len, "{name}");
    }
}

#[test]
fn init_refuses_a_non_empty_directory_and_leaves_it_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), b"mine").unwrap();
    let opts = dsv3_runtime::InitOptions { progress: Progress::Never, ..Default::default() };
    let err = dsv3_runtime::init_random_preset(Preset::Tiny, &out, &opts).unwrap_err();
    assert!(matches!(err, RuntimeError::Output { .. }), "{err}");
    assert!(err.to_string().contains("not empty") && err.to_string().contains("model"), "{err}");
    assert_eq!(std::fs::read(out.join("keep.txt")).unwrap(), b"mine");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
    // A file in the way is refused too; an empty directory is fine.
    std::fs::write(tmp.path().join("file"), b"x").unwrap();
    assert!(dsv3_runtime::init_random_preset(Preset::Tiny, &tmp.path().join("file"), &opts).is_err());
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    dsv3_runtime::init_random_preset(Preset::Tiny, &empty, &opts).unwrap();
    // Nothing half-written is left beside the outputs.
    let names: Vec<String> =
        std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.contains("partial")), "{names:?}");
}

#[test]
fn an_uncommitted_output_dir_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("out");
    {
        let o = OutputDir::create(&target).unwrap();
        std::fs::write(o.path().join("half.safetensors"), b"partial").unwrap();
        // dropped without commit, as on an error
    }
    assert!(!target.exists());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

/// `vocab_size` resizes the embedding and lm_head of a preset (and wins over a tokenizer's
/// count); 0, or a tokenizer with more tokens than that, is refused with a typed error and
/// nothing is written.
#[test]
fn vocab_option_resizes_embedding_and_head_and_refuses_what_does_not_fit() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = |v| dsv3_runtime::InitOptions { vocab_size: Some(v), progress: Progress::Never, ..Default::default() };
    let rep = dsv3_runtime::init_random_preset(Preset::Tiny, &tmp.path().join("v300"), &opts(300)).unwrap();
    let (cfg, ck) = load_everything(&rep.dir);
    assert_eq!(cfg.vocab_size, 300);
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        assert_eq!(ck.info(name).unwrap().1.shape, [300, cfg.hidden_size], "{name}");
    }

    let err = dsv3_runtime::init_random_preset(Preset::Tiny, &tmp.path().join("v0"), &opts(0)).unwrap_err();
    assert!(matches!(&err, RuntimeError::Config { field, .. } if field == "vocab_size"), "{err}");
    // The preset's EOS id 1 does not fit in one row.
    let err = dsv3_runtime::init_random_preset(Preset::Tiny, &tmp.path().join("v1"), &opts(1)).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");

    let tok = tmp.path().join("tok");
    std::fs::create_dir(&tok).unwrap();
    let vocab: serde_json::Map<String, serde_json::Value> = (0..40).map(|i| (format!("w{i}"), i.into())).collect();
    let tj = serde_json::json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}});
    std::fs::write(tok.join("tokenizer.json"), serde_json::to_vec(&tj).unwrap()).unwrap();
    let with_tok = |v| dsv3_runtime::InitOptions { tokenizer_dir: Some(tok.clone()), ..opts(v) };
    let err = dsv3_runtime::init_random_preset(Preset::Tiny, &tmp.path().join("v32"), &with_tok(32)).unwrap_err();
    assert!(matches!(err, RuntimeError::Output { .. }) && err.to_string().contains("40 tokens"), "{err}");
    let rep = dsv3_runtime::init_random_preset(Preset::Tiny, &tmp.path().join("v64"), &with_tok(64)).unwrap();
    assert_eq!(rep.config.vocab_size, 64, "the explicit size, not the tokenizer's rounded up to 128");
    let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 3, "only v300, tok and v64: {names:?}");
}
