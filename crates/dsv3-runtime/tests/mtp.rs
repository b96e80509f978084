//! Multi-token prediction and speculative decoding.

mod common;

use common::load_model;
use dsv3_kernels::gemm::GemmPath;
use dsv3_kernels::{Backend, Cpu};
use dsv3_runtime::model::{AttnForm, Model};
use dsv3_runtime::{InitOptions, Preset, init_random_preset};

fn random_model(preset: Preset) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    init_random_preset(preset, &tmp.path().join("m"), &InitOptions { seed: 7, ..Default::default() }).unwrap();
    tmp
}

/// Hidden rows, logits and every cache row after `prompt` then `steps` (each a forward call).
fn run(m: &Model<Cpu>, prompt: &[u32], steps: &[&[u32]], form: AttnForm) -> (Vec<f32>, Vec<f32>, Vec<Vec<f32>>) {
    let mut cache = m.new_cache(&Cpu, 64).unwrap();
    let seq = cache.add_sequence();
    m.forward_hidden(&Cpu, &mut cache, &[(seq, prompt)]).unwrap();
    let (mut hidden, mut logits) = (Vec::new(), Vec::new());
    for s in steps {
        let h = m.forward_hidden_with(&Cpu, &mut cache, &[(seq, s)], form).unwrap();
        hidden.extend(Cpu.download(&h).unwrap());
        logits.extend(m.logits(&Cpu, &h, &(0..s.len()).collect::<Vec<_>>()).unwrap());
    }
    let rows = (0..m.config().num_hidden_layers).map(|l| cache.read_rows(&Cpu, l, seq).unwrap()).collect();
    (hidden, logits, rows)
}

/// The verification step of speculative decoding runs [next, draft] in one absorbed step; its
/// rows must be bit-identical to two one-token decode steps, or greedy output with MTP could
/// differ from greedy output without it.
#[test]
fn a_two_token_absorbed_step_equals_two_decode_steps_bit_for_bit() {
    for (preset, paths) in [(Preset::Tiny, &[GemmPath::Reference, GemmPath::Fp8][..]), (Preset::TinyV2Lite, &[GemmPath::Reference][..])] {
        let tmp = random_model(preset);
        for &path in paths {
            let m = load_model(&tmp.path().join("m"), path);
            let prompt = [5u32, 77, 300, 12, 9];
            let one = run(&m, &prompt, &[&[41], &[600], &[7]], AttnForm::Auto);
            let two = run(&m, &prompt, &[&[41, 600], &[7]], AttnForm::Absorbed);
            assert!(one.0 == two.0, "{preset:?} {path:?}: hidden states differ");
            assert!(one.1 == two.1, "{preset:?} {path:?}: logits differ");
            assert!(one.2 == two.2, "{preset:?} {path:?}: cache rows differ");
        }
    }
}

// ----- speculative generation -----

use common::{Owned, load_model_mtp, rewrite, write_preset};
use dsv3_runtime::generate::{Generation, Request, Sampler, SamplingParams, Verdict, generate, generate_mtp};
use dsv3_runtime::tensor_file::Dtype;
use half::bf16;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Generates `max_tokens` (EOS ignored) with and without MTP.
fn both(dir: &Path, path: GemmPath, prompt: &[u32], max_tokens: usize, sampling: SamplingParams) -> (Generation, Generation) {
    let (m, mtp) = load_model_mtp(dir, path);
    let req = Request { prompt, max_tokens, sampling, eos: &[], allowed: m.config().vocab_size };
    let plain = generate(&Cpu, &m, &req, |_| Ok(())).unwrap();
    let spec = generate_mtp(&Cpu, &m, &mtp, &req, |_| Ok(())).unwrap();
    (plain, spec)
}

/// A random `tiny` model rewritten so that its MTP module predicts well: every attention and
/// MLP output is damped (o_proj and down_proj scales x `damp`), so the main model is close to
/// a bigram model (the next token is a function of the current one, through
/// `lm_head · model.norm(E[t])`), and the MTP module computes the same function of the token it
/// is fed: `eh_proj = [I | 0]` passes the normalised embedding through, `enorm` is 1 and
/// `shared_head.norm` equals `model.norm` (its head is already a copy of `lm_head`). The
/// damped sub-layers still move the logits a little, so drafts are mostly, not always, right:
/// both the accept and the reject paths run.
fn predictable_model(parent: &Path, damp: f32) -> PathBuf {
    write_preset(parent, "p", Preset::Tiny, None);
    let dir = parent.join("p");
    let cfg = dsv3_runtime::ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let (h, l) = (cfg.hidden_size, cfg.num_hidden_layers);
    rewrite(&dir.join("model.safetensors"), |ts| {
        let final_norm = ts.iter().find(|t| t.name == "model.norm.weight").unwrap().data.clone();
        for t in ts.iter_mut() {
            let n = t.name.as_str();
            if n.ends_with("o_proj.weight_scale_inv") || n.ends_with("down_proj.weight_scale_inv") {
                assert_eq!(t.dtype, Dtype::F32);
                let v: Vec<f32> = bytemuck::cast_slice::<u8, f32>(&t.data).iter().map(|x| x * damp).collect();
                t.data = bytemuck::cast_slice(&v).to_vec();
            } else if n == format!("model.layers.{l}.enorm.weight") {
                t.data = bytemuck::cast_slice(&vec![bf16::ONE; h]).to_vec();
            } else if n == format!("model.layers.{l}.shared_head.norm.weight") {
                t.data = final_norm.clone();
            } else if n == format!("model.layers.{l}.eh_proj.weight") {
                let eye: Vec<bf16> = (0..h * 2 * h).map(|i| if i / (2 * h) == i % (2 * h) { bf16::ONE } else { bf16::ZERO }).collect();
                t.data = bytemuck::cast_slice(&eye).to_vec();
            }
        }
        let _: &Vec<Owned> = ts;
    });
    dir
}

/// Greedy generation with MTP is the same, token for token, as without it: on the HF fixture
/// (a real MTP layer), on a random model (drafts almost always rejected), and on a model whose
/// drafts are mostly accepted; both GEMM paths.
#[test]
fn greedy_output_with_mtp_is_identical_to_without() {
    let tmp = tempfile::tempdir().unwrap();
    let random = tmp.path().join("r");
    init_random_preset(Preset::Tiny, &random, &InitOptions { seed: 3, ..Default::default() }).unwrap();
    let predictable = predictable_model(tmp.path(), 0.05);
    for (what, dir) in [("hf-v3-tiny", fixture("hf-v3-tiny")), ("random", random), ("predictable", predictable)] {
        for path in [GemmPath::Reference, GemmPath::Fp8] {
            let (plain, spec) = both(&dir, path, &[5, 17, 250, 3], 48, SamplingParams::default());
            let s = spec.mtp.clone().unwrap();
            eprintln!(
                "{what} {path:?}: acceptance {:.3} ({} of {}), {} main steps",
                s.acceptance(),
                s.accepted(),
                s.drafted(),
                s.main_steps()
            );
            assert_eq!(plain.ids.len(), 48);
            assert_eq!(spec.ids, plain.ids, "{what} {path:?}: greedy tokens differ with MTP");
            assert!(plain.mtp.is_none());
            // Every step but the last verified one draft; an accepted draft saves one step.
            assert_eq!(s.per_position.len(), 1);
            assert!(s.main_steps() + s.accepted() <= 48 && s.main_steps() + s.accepted() >= 46, "{s:?}");
            if what == "predictable" {
                assert!(
                    s.acceptance() > 0.5,
                    "{what} {path:?}: acceptance {} (the construction should make drafts mostly right)",
                    s.acceptance()
                );
                assert!(s.accepted() < s.drafted(), "{what} {path:?}: no draft rejected; the reject path did not run");
            }
        }
    }
}

/// A rejected draft leaves the main cache bit-identical to a cache that never saw it: same
/// length, same rows, same free pages; and later steps on it give the same logits.
#[test]
fn rolling_back_a_draft_restores_the_cache_exactly() {
    let tmp = random_model(Preset::Tiny);
    let m = load_model(&tmp.path().join("m"), GemmPath::Reference);
    let layers = m.config().num_hidden_layers;
    // 63 prompt tokens + next: the draft is the first token of a new page, which must be freed.
    let prompt: Vec<u32> = (0..63).map(|i| (i * 31 + 7) % 1000).collect();
    let (mut a, mut b) = (m.new_cache(&Cpu, 200).unwrap(), m.new_cache(&Cpu, 200).unwrap());
    let (sa, sb) = (a.add_sequence(), b.add_sequence());
    for (c, s) in [(&mut a, sa), (&mut b, sb)] {
        m.forward_hidden(&Cpu, c, &[(s, &prompt[..])]).unwrap();
    }
    // a: [next, draft] then rollback; b: only next.
    m.forward_hidden_with(&Cpu, &mut a, &[(sa, &[40, 900][..])], AttnForm::Absorbed).unwrap();
    a.truncate(sa, 64).unwrap();
    m.forward_hidden(&Cpu, &mut b, &[(sb, &[40][..])]).unwrap();
    assert_eq!(a.seq_len(sa).unwrap(), b.seq_len(sb).unwrap());
    assert_eq!(a.free_pages(), b.free_pages(), "the draft's page was not returned");
    for l in 0..layers {
        assert!(a.read_rows(&Cpu, l, sa).unwrap() == b.read_rows(&Cpu, l, sb).unwrap(), "layer {l} rows differ");
    }
    let ha = m.forward_hidden(&Cpu, &mut a, &[(sa, &[77][..])]).unwrap();
    let hb = m.forward_hidden(&Cpu, &mut b, &[(sb, &[77][..])]).unwrap();
    assert!(Cpu.download(&ha).unwrap() == Cpu.download(&hb).unwrap());
}

/// Speculative sampling keeps the target distribution: over many draws with a draft
/// distribution q that differs from the target p, the token that comes out (the accepted
/// draft, or the replacement) has frequencies p. Exact small cases first.
#[test]
fn speculative_sampling_preserves_the_target_distribution() {
    let params = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 11 };
    let mut s = Sampler::new(params).unwrap();
    let (pl, ql) = ([2.0f32, 1.0, 0.0, -1.0, 0.5, 3.0], [0.0f32, 2.5, 1.0, 0.0, -2.0, 0.0]);
    let (p, q) = (s.dist(&pl, 6).unwrap(), s.dist(&ql, 6).unwrap());
    // A draft where p(d) >= q(d) is always accepted.
    let d_up = (0..6u32).find(|&d| p.prob(d) >= q.prob(d)).unwrap();
    for _ in 0..100 {
        assert_eq!(s.verify(&p, &q, d_up), Verdict::Accepted);
    }
    // A token outside p's support is never the replacement (top-k 3 target).
    let mut s3 = Sampler::new(SamplingParams { top_k: 3, ..params }).unwrap();
    let p3 = s3.dist(&pl, 6).unwrap();
    let n = 200_000;
    let mut counts = [0u64; 6];
    let mut counts3 = [0u64; 6];
    for _ in 0..n {
        let d = s.draw(&q);
        let out = match s.verify(&p, &q, d) {
            Verdict::Accepted => d,
            Verdict::Rejected(t) => t,
        };
        counts[out as usize] += 1;
        let d = s3.draw(&q);
        let out = match s3.verify(&p3, &q, d) {
            Verdict::Accepted => d,
            Verdict::Rejected(t) => t,
        };
        counts3[out as usize] += 1;
    }
    for (dist, counts) in [(&p, &counts), (&p3, &counts3)] {
        for id in 0..6u32 {
            let f = counts[id as usize] as f64 / n as f64;
            // 200k draws: one standard deviation is <= 0.0012.
            assert!((f - dist.prob(id)).abs() < 0.006, "token {id}: frequency {f}, target {}", dist.prob(id));
        }
    }
    // Greedy: accepted iff the draft is the argmax.
    let mut g = Sampler::new(SamplingParams::default()).unwrap();
    let (pg, qg) = (g.dist(&pl, 6).unwrap(), g.dist(&ql, 6).unwrap());
    assert_eq!(g.verify(&pg, &qg, 5), Verdict::Accepted);
    assert_eq!(g.verify(&pg, &qg, 1), Verdict::Rejected(5));
}

/// Sampled generation with MTP is reproducible for a seed, and reports its acceptance.
#[test]
fn sampled_generation_with_mtp_is_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = predictable_model(tmp.path(), 0.05);
    let params = SamplingParams { temperature: 0.8, top_k: 50, top_p: 0.95, seed: 9 };
    let (_, a) = both(&dir, GemmPath::Reference, &[5, 6, 7], 32, params);
    let (_, b) = both(&dir, GemmPath::Reference, &[5, 6, 7], 32, params);
    assert_eq!(a.ids, b.ids);
    assert_eq!(a.ids.len(), 32);
    assert!(a.mtp.unwrap().drafted() > 0);
}
