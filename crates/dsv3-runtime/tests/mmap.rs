//! Memory-mapped loading: weights handed out in place equal the bytes a positioned read
//! gives; a BF16 tensor at an odd offset falls back to a copy with the same values (and the
//! model computes the same logits); a file truncated after it was opened is a typed error,
//! not a crash; the model keeps working after the checkpoint is dropped.

mod common;

use common::*;
use dsv3_kernels::Cpu;
use dsv3_kernels::backend::Backend;
use dsv3_kernels::bf16_gemm::Bf16Weight;
use dsv3_kernels::fp8::Fp8Weight;
use dsv3_kernels::gemm::GemmPath;
use dsv3_runtime::checkpoint::SINGLE_FILE;
use dsv3_runtime::plan::{TensorRole, tensor_plan};
use dsv3_runtime::tensor_file::TensorFile;
use dsv3_runtime::{Checkpoint, LinearWeight, ModelConfig, Preset, Progress, RuntimeError};
use half::bf16;
use std::path::Path;

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}
fn bf16s(b: &[u8]) -> Vec<bf16> {
    b.chunks_exact(2).map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]]))).collect()
}

/// Every planned FP8 / BF16 matrix of `dir`, through the checkpoint (mapped) and through
/// positioned reads of the same files (the loader's old path); returns how many were in place.
fn compare_with_positioned_reads(dir: &Path) -> (usize, usize) {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let ck = Checkpoint::open_with(dir, Progress::Never).unwrap();
    ck.validate(&cfg).unwrap();
    let (mut in_place, mut total) = (0, 0);
    for t in tensor_plan(&cfg).iter() {
        let (file, _) = ck.info(&t.name).unwrap();
        let f = TensorFile::open(file).unwrap();
        match t.role {
            TensorRole::Linear => {
                let (r, c) = (t.shape[0], t.shape[1]);
                let LinearWeight::Fp8(w) = ck.linear_weight(&t.name, r, c).unwrap() else { panic!("{} is not FP8", t.name) };
                let scale_name = format!("{}_scale_inv", t.name);
                let (sf, _) = ck.info(&scale_name).unwrap();
                let scales = f32s(&TensorFile::open(sf).unwrap().read(&scale_name).unwrap());
                let old = Fp8Weight::new(r, c, f.read(&t.name).unwrap(), scales).unwrap();
                assert_eq!(w, old, "{}", t.name);
                assert!(w.is_mapped(), "{}: FP8 bytes are always read in place", t.name);
                // The CPU backend keeps it in the map.
                let up = Cpu.upload_weight(w.view()).unwrap();
                assert_eq!(up.view().data().as_ptr(), w.view().data().as_ptr(), "{}", t.name);
                in_place += 1;
            }
            TensorRole::Bf16 | TensorRole::Bf16OrFp8 => {
                let (r, c) = (t.shape[0], t.shape[1]);
                let w = ck.bf16_weight(&t.name, r, c).unwrap();
                assert_eq!(w, Bf16Weight::new(r, c, bf16s(&f.read(&t.name).unwrap())).unwrap(), "{}", t.name);
                let info = &f.tensors()[&t.name];
                assert_eq!(w.is_mapped(), info.offset.is_multiple_of(2), "{}: in place exactly when aligned", t.name);
                in_place += w.is_mapped() as usize;
            }
            TensorRole::Norm | TensorRole::F32 => continue,
        }
        total += 1;
    }
    (in_place, total)
}

#[test]
fn mapped_weights_equal_positioned_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let single = write_preset(tmp.path(), "single", Preset::Tiny, None);
    let (in_place, total) = compare_with_positioned_reads(&single.dir);
    assert!(total > 20);
    assert_eq!(in_place, total, "the writer aligns every tensor, so nothing is copied");
    let sharded = write_preset(tmp.path(), "sharded", Preset::Tiny, Some(200_000));
    assert!(sharded.files.len() > 1);
    assert_eq!(compare_with_positioned_reads(&sharded.dir), (total, total));
    // A BF16-only checkpoint: projection weights come back as BF16, in place.
    let v2 = write_preset(tmp.path(), "v2", Preset::TinyV2Lite, None);
    let (i, t) = compare_with_positioned_reads_bf16(&v2.dir);
    assert_eq!(i, t);
}

/// As [`compare_with_positioned_reads`] for a BF16 checkpoint (`linear_weight` gives BF16).
fn compare_with_positioned_reads_bf16(dir: &Path) -> (usize, usize) {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    assert!(!cfg.is_fp8());
    let ck = Checkpoint::open_with(dir, Progress::Never).unwrap();
    let (mut in_place, mut total) = (0, 0);
    for t in tensor_plan(&cfg).iter().filter(|t| t.role == TensorRole::Linear) {
        let (r, c) = (t.shape[0], t.shape[1]);
        let LinearWeight::Bf16(w) = ck.linear_weight(&t.name, r, c).unwrap() else { panic!("{} is not BF16", t.name) };
        let (file, _) = ck.info(&t.name).unwrap();
        let old = bf16s(&TensorFile::open(file).unwrap().read(&t.name).unwrap());
        assert_eq!(w, Bf16Weight::new(r, c, old).unwrap(), "{}", t.name);
        in_place += w.is_mapped() as usize;
        total += 1;
    }
    (in_place, total)
}

/// Rewrites `path` with its header padded to an odd length, so every tensor starts at an odd
/// file offset (the data section is unchanged).
fn misalign(path: &Path) {
    let (header, data) = split_raw(path);
    let mut h = serde_json::to_vec(&header).unwrap();
    if h.len() % 2 == 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    std::fs::remove_file(path).unwrap();
    std::fs::write(path, out).unwrap();
}

#[test]
fn misaligned_bf16_falls_back_to_a_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let rep = write_preset(tmp.path(), "aligned", Preset::Tiny, None);
    let odd = copy_dir(&rep.dir, tmp.path(), "odd");
    misalign(&odd.join(SINGLE_FILE));
    let f = TensorFile::open(&odd.join(SINGLE_FILE)).unwrap();
    assert!(f.tensors().values().all(|i| i.offset % 2 == 1), "every tensor starts at an odd offset");

    let (in_place, total) = compare_with_positioned_reads(&odd);
    let cfg = ModelConfig::from_file(&odd.join("config.json")).unwrap();
    let fp8 = tensor_plan(&cfg).iter().filter(|t| t.role == TensorRole::Linear).count();
    assert_eq!(in_place, fp8, "FP8 stays in place, every BF16 matrix is copied");
    assert!(total > fp8);

    // The same values either way: the two checkpoints give the same weights and logits.
    let (a, b) = (Checkpoint::open(&rep.dir).unwrap(), Checkpoint::open(&odd).unwrap());
    let (v, h) = (cfg.vocab_size, cfg.hidden_size);
    let (wa, wb) = (a.bf16_weight("lm_head.weight", v, h).unwrap(), b.bf16_weight("lm_head.weight", v, h).unwrap());
    assert!(wa.is_mapped() && !wb.is_mapped());
    assert_eq!(wa, wb);
    let ids = [0u32, 5, 9, 2, 7];
    let la = logits_in_chunks(&load_model(&rep.dir, GemmPath::Reference), &ids, &[3, 1, 1]);
    let lb = logits_in_chunks(&load_model(&odd, GemmPath::Reference), &ids, &[3, 1, 1]);
    assert_eq!(la, lb);
}

#[test]
fn file_truncated_after_open_is_a_typed_error() {
    let tmp = tempfile::tempdir().unwrap();
    let rep = write_preset(tmp.path(), "m", Preset::Tiny, None);
    let path = rep.dir.join(SINGLE_FILE);
    let cfg = ModelConfig::from_file(&rep.dir.join("config.json")).unwrap();
    let ck = Checkpoint::open_with(&rep.dir, Progress::Never).unwrap();
    ck.validate(&cfg).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len / 2).unwrap();
    let name = "model.layers.0.self_attn.q_a_proj.weight";
    let (r, c) = (cfg.q_lora_rank.unwrap(), cfg.hidden_size);
    for e in [ck.fp8_weight(name, r, c).unwrap_err(), ck.bf16_weight("lm_head.weight", cfg.vocab_size, c).unwrap_err()] {
        match &e {
            RuntimeError::Tensor { file, detail, .. } => {
                assert_eq!(file, &path.canonicalize().unwrap());
                assert!(detail.contains(&format!("the file is {} bytes but was {len} bytes", len / 2)), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }
    drop(ck);
    // Opened after the truncation, it is the header check's error, as before.
    let e = Checkpoint::open(&rep.dir).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
}

#[test]
fn model_outlives_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let rep = write_preset(tmp.path(), "m", Preset::Tiny, None);
    let ids = [1u32, 4, 4, 8];
    let before = logits_in_chunks(&load_model(&rep.dir, GemmPath::Fp8), &ids, &[4]);
    // load_model drops the checkpoint; the weights keep the map. Removing the directory
    // does not take the mapped files away either (unix keeps an unlinked file's pages).
    let m = load_model(&rep.dir, GemmPath::Fp8);
    #[cfg(unix)]
    std::fs::remove_dir_all(&rep.dir).unwrap();
    assert_eq!(logits_in_chunks(&m, &ids, &[4]), before);
}
