//! Checkpoint variants that exist in the wild beyond the three official layouts, each with a
//! fixture the test writes: an FP8 MTP `eh_proj`, BF16 checkpoints whose K is off the 128
//! grid on the fp8 GEMM path, `scale_fmt: "ue8m0"` end to end, and the configs of the later
//! V3 releases.

mod common;

use common::{Owned, copy_dir, load_model, load_model_mtp, rewrite, write_preset};
use dsv3_kernels::fp8::{BLOCK, blocks, decode_e4m3, encode_e4m3};
use dsv3_kernels::gemm::GemmPath;
use dsv3_kernels::{Backend, Cpu};
use dsv3_runtime::checkpoint::SINGLE_FILE;
use dsv3_runtime::model::Model;
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
