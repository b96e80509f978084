//! Decode steps through `DecodeRunner` on the CPU: the padded step (what a GPU captures as a
//! graph per batch-size bucket) gives the real rows the ids and the cache rows of the plain
//! step and of the logits-on-the-host path; sampled rows draw with their own seeded streams;
//! a bad step leaves the cache as it was; the step refuses what `forward_hidden` refuses
//! (ids, positions past the limit) and checks the final hidden state as it does. (The graph
//! replay itself needs a GPU: `cuda_decode_graph_replay_matches_eager` in cuda_model.rs.)

#![allow(clippy::needless_range_loop)] // sequences and steps index several tables in lock-step

mod common;

use common::{Owned, load_model, rewrite};
use dsv3_kernels::Cpu;
use dsv3_kernels::gemm::GemmPath;
use dsv3_kernels::sample::SampleRow;
use dsv3_runtime::RuntimeError;
use dsv3_runtime::checkpoint::SINGLE_FILE;
use dsv3_runtime::decode::{DecodeRow, DecodeRunner, Graphs};
use dsv3_runtime::generate::{Sampler, SamplingParams};
use dsv3_runtime::model::{FiniteCheck, LmHead, Model};
use dsv3_runtime::{InitOptions, Preset, Progress, mla::PagedLatentCache, mla::SeqId};

fn tiny(preset: Preset) -> (tempfile::TempDir, Model<Cpu>) {
    let tmp = tempfile::tempdir().unwrap();
    common::write_preset(tmp.path(), "m", preset, None);
    let m = load_model(&tmp.path().join("m"), GemmPath::Reference);
    (tmp, m)
}

/// `n` sequences with prompts of different lengths (3, 10, 17, ...: some past a page boundary
/// of 64 after decoding), prefilled one by one; returns the cache, the sequences and each
/// one's first sampled token (greedy).
fn prefill(m: &Model<Cpu>, n: usize, pad_rows: usize) -> (PagedLatentCache<Cpu>, Vec<SeqId>, Vec<u32>) {
    let vocab = m.config().vocab_size as u32;
    let mut cache = m.new_cache_with(&Cpu, 4096, pad_rows).unwrap();
    let (mut seqs, mut next) = (Vec::new(), Vec::new());
    for k in 0..n {
        let s = cache.add_sequence();
        let prompt: Vec<u32> = (0..3 + 7 * k).map(|i| ((i * 31 + k * 17 + 5) as u32) % vocab).collect();
        let h = m.forward_hidden(&Cpu, &mut cache, &[(s, &prompt[..])]).unwrap();
        next.push(m.sample(&Cpu, &h, &[prompt.len() - 1], &[SampleRow::GREEDY], vocab as usize).unwrap()[0]);
        seqs.push(s);
    }
    (cache, seqs, next)
}

/// `steps` decode steps of every sequence through `mode`; returns the ids and every cached row.
fn decode(m: &Model<Cpu>, n: usize, steps: usize, mode: Graphs, params: SamplingParams) -> (Vec<Vec<u32>>, Vec<Vec<f32>>) {
    let allowed = m.config().vocab_size;
    let mut runner = DecodeRunner::new(&Cpu, m, n, mode).unwrap();
    let (mut cache, seqs, mut next) = prefill(m, n, runner.pad_rows());
    let mut samplers: Vec<Sampler> = (0..n).map(|k| Sampler::new(SamplingParams { seed: 100 + k as u64, ..params }).unwrap()).collect();
    let mut ids = vec![Vec::new(); n];
    for _ in 0..steps {
        let rows: Vec<DecodeRow> = (0..n).map(|k| DecodeRow { seq: seqs[k], token: next[k], sample: samplers[k].next_row() }).collect();
        next = runner.step(&Cpu, m, &mut cache, &rows, allowed).unwrap();
        for k in 0..n {
            ids[k].push(next[k]);
        }
    }
    let layers = m.config().num_hidden_layers;
    let rows = seqs.iter().flat_map(|&s| (0..layers).map(move |l| (s, l))).map(|(s, l)| cache.read_rows(&Cpu, l, s).unwrap()).collect();
    (ids, rows)
}

/// Padding to the bucket changes nothing for the real rows: ids and cache rows bit for bit,
/// for batches that fill a bucket and batches that need pad rows, greedy and sampled.
#[test]
fn padded_steps_equal_plain_steps() {
    let (_t, m) = tiny(Preset::Tiny);
    let sampled = SamplingParams { temperature: 0.9, top_k: 40, top_p: 0.9, seed: 0 };
    for (n, params) in [(1, SamplingParams::default()), (3, SamplingParams::default()), (5, sampled), (8, sampled)] {
        let plain = decode(&m, n, 6, Graphs::Off, params);
        let padded = decode(&m, n, 6, Graphs::Padded, params);
        assert_eq!(plain.0, padded.0, "batch {n}: ids");
        assert!(plain.1 == padded.1, "batch {n}: cache rows differ");
    }
}

/// The runner's step is the host path's step: `forward_hidden` + `logits` on the host + the
/// seeded `Sampler`, token for token (sampling on the backend draws the same tokens).
#[test]
fn runner_equals_host_sampling() {
    let (_t, m) = tiny(Preset::TinyV2Lite);
    let params = SamplingParams { temperature: 0.7, top_k: 0, top_p: 0.95, seed: 0 };
    let n = 3;
    let (got, _) = decode(&m, n, 5, Graphs::Off, params);
    let (mut cache, seqs, mut next) = prefill(&m, n, 0);
    let mut samplers: Vec<Sampler> = (0..n).map(|k| Sampler::new(SamplingParams { seed: 100 + k as u64, ..params }).unwrap()).collect();
    let allowed = m.config().vocab_size;
    for step in 0..5 {
        let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let batch: Vec<(SeqId, &[u32])> = seqs.iter().zip(&toks).map(|(&s, t)| (s, &t[..])).collect();
        let h = m.forward_hidden(&Cpu, &mut cache, &batch).unwrap();
        let logits = m.logits(&Cpu, &h, &(0..n).collect::<Vec<_>>()).unwrap();
        for k in 0..n {
            next[k] = samplers[k].sample(&logits[k * allowed..(k + 1) * allowed], allowed).unwrap();
            assert_eq!(next[k], got[k][step], "sequence {k}, step {step}");
        }
    }
}

/// A step with a bad id, an unknown sequence or bad sampling parameters fails with a typed
/// error and leaves every sequence as it was; the next good step runs.
#[test]
fn bad_steps_change_nothing() {
    let (_t, m) = tiny(Preset::Tiny);
    for mode in [Graphs::Off, Graphs::Padded] {
        let mut runner = DecodeRunner::new(&Cpu, &m, 4, mode).unwrap();
        let (mut cache, seqs, next) = prefill(&m, 2, runner.pad_rows());
        let lens: Vec<usize> = seqs.iter().map(|&s| cache.seq_len(s).unwrap()).collect();
        let vocab = m.config().vocab_size;
        let good = |k: usize| DecodeRow { seq: seqs[k], token: next[k], sample: SampleRow::GREEDY };
        let bad_id = DecodeRow { token: vocab as u32, ..good(1) };
        let e = runner.step(&Cpu, &m, &mut cache, &[good(0), bad_id], vocab).unwrap_err();
        assert!(matches!(e, RuntimeError::TokenId { .. }), "{e}");
        let bad_t = DecodeRow { sample: SampleRow { temperature: f32::NAN, ..SampleRow::GREEDY }, ..good(1) };
        let e = runner.step(&Cpu, &m, &mut cache, &[good(0), bad_t], vocab).unwrap_err();
        assert!(e.to_string().contains("temperature"), "{e}");
        let ghost = DecodeRow { seq: SeqId::PAD, ..good(0) };
        assert!(runner.step(&Cpu, &m, &mut cache, &[good(0), ghost], vocab).is_err());
        assert!(runner.step(&Cpu, &m, &mut cache, &[], vocab).is_err());
        for (k, &s) in seqs.iter().enumerate() {
            assert_eq!(cache.seq_len(s).unwrap(), lens[k], "{mode:?}: sequence {k} changed");
        }
        runner.step(&Cpu, &m, &mut cache, &[good(0), good(1)], vocab).unwrap();
        assert_eq!(cache.seq_len(seqs[0]).unwrap(), lens[0] + 1);
        // The CPU never captures and reserves no device workspace.
        assert!(!runner.uses_graphs());
        assert_eq!(runner.stats().workspace_bytes, 0);
    }
}

/// A batch past the largest bucket runs as it is, even with padding asked for.
#[test]
fn batches_past_the_buckets_run_unpadded() {
    let (_t, m) = tiny(Preset::TinyMoonlight);
    let mut runner = DecodeRunner::new(&Cpu, &m, 200, Graphs::Padded).unwrap();
    assert_eq!(runner.pad_rows(), 0);
    let (mut cache, seqs, next) = prefill(&m, 2, 0);
    let rows: Vec<DecodeRow> = (0..2).map(|k| DecodeRow { seq: seqs[k], token: next[k], sample: SampleRow::GREEDY }).collect();
    runner.step(&Cpu, &m, &mut cache, &rows, m.config().vocab_size).unwrap();
    assert_eq!(runner.stats().eager_steps, 1);
}

/// A decode step refuses a position past `max_position_embeddings` before any work, as
/// `forward_hidden` does (from the cache's host tables): the error names the field and the
/// sequence keeps its length and pages, in plain and padded steps.
#[test]
fn decode_steps_refuse_positions_past_max_position_embeddings() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = Preset::Tiny.config();
    cfg.max_position_embeddings = 12;
    let opts = InitOptions { seed: 2, progress: Progress::Never, ..Default::default() };
    let rep = dsv3_runtime::init_random(&cfg, &tmp.path().join("m"), &opts).unwrap();
    let m = load_model(&rep.dir, GemmPath::Reference);
    let vocab = cfg.vocab_size;
    for mode in [Graphs::Off, Graphs::Padded] {
        let mut runner = DecodeRunner::new(&Cpu, &m, 2, mode).unwrap();
        let mut cache = m.new_cache_with(&Cpu, 64, runner.pad_rows()).unwrap();
        let seq = cache.add_sequence();
        m.forward_hidden(&Cpu, &mut cache, &[(seq, &[1; 11][..])]).unwrap();
        let row = DecodeRow { seq, token: 5, sample: SampleRow::GREEDY };
        runner.step(&Cpu, &m, &mut cache, &[row], vocab).unwrap(); // position 11, the last one
        let (pages, generation) = (cache.free_pages(), cache.generation());
        let err = runner.step(&Cpu, &m, &mut cache, &[row], vocab).unwrap_err().to_string();
        assert!(err.contains("max_position_embeddings = 12") && err.contains("nothing was computed"), "{mode:?}: {err}");
        assert_eq!((cache.seq_len(seq).unwrap(), cache.free_pages(), cache.generation()), (12, pages, generation), "{mode:?}");
    }
}

/// A non-finite final hidden state in a decode step is the typed error `forward_hidden`
/// gives (expert down_proj scales of 3e38 in the last layer, as in variants.rs): the default
/// check names the final hidden state, `FiniteCheck::Layers` the layer; with the check off the
/// sampler still refuses the NaN logits it makes (the check a GPU step folds the default one
/// into). Plain and padded steps; the sequence keeps its length.
#[test]
fn decode_steps_check_the_final_hidden_state() {
    let tmp = tempfile::tempdir().unwrap();
    let rep = common::write_preset(tmp.path(), "m", Preset::Tiny, None);
    let last = rep.config.num_hidden_layers - 1;
    rewrite(&rep.dir.join(SINGLE_FILE), |ts: &mut Vec<Owned>| {
        let prefix = format!("model.layers.{last}.mlp.experts.");
        for t in ts.iter_mut().filter(|t| t.name.starts_with(&prefix) && t.name.ends_with("down_proj.weight_scale_inv")) {
            t.data = t.data.chunks_exact(4).flat_map(|_| 3e38f32.to_le_bytes()).collect();
        }
    });
    let mut m = load_model(&rep.dir, GemmPath::Reference);
    let vocab = m.config().vocab_size;
    let cases = [
        (FiniteCheck::Final, "final hidden state".to_string()),
        (FiniteCheck::Layers, format!("layer {last} MLP output")),
        (FiniteCheck::Off, "NaN logit".to_string()),
    ];
    for (check, want) in cases {
        m.set_finite_check(check);
        for mode in [Graphs::Off, Graphs::Padded] {
            let mut runner = DecodeRunner::new(&Cpu, &m, 2, mode).unwrap();
            let mut cache = m.new_cache_with(&Cpu, 64, runner.pad_rows()).unwrap();
            let seq = cache.add_sequence();
            let row = DecodeRow { seq, token: 3, sample: SampleRow::GREEDY };
            let err = runner.step(&Cpu, &m, &mut cache, &[row], vocab).unwrap_err();
            let typed = check == FiniteCheck::Off || matches!(err, RuntimeError::NonFinite { .. });
            assert!(typed && err.to_string().contains(&want), "{check:?} {mode:?}: {err}");
            assert_eq!(cache.seq_len(seq).unwrap(), 0, "{check:?} {mode:?}");
        }
    }
}

/// `--lm-head int8`: greedy decoding (the runner's steps and `Model::sample`) gives the exact
/// head's tokens and cache rows, for one sequence and a batch; `logits` stays exact; a sampled
/// run still draws valid tokens.
#[test]
fn int8_screened_head_keeps_greedy_tokens() {
    let (_t, mut m) = tiny(Preset::Tiny);
    let greedy = SamplingParams::default();
    let exact: Vec<_> = [1, 4].iter().map(|&n| decode(&m, n, 8, Graphs::Off, greedy)).collect();
    let h = {
        let mut cache = m.new_cache(&Cpu, 64).unwrap();
        let s = cache.add_sequence();
        m.forward_hidden(&Cpu, &mut cache, &[(s, &[3, 1, 4, 1, 5][..])]).unwrap()
    };
    let logits = m.logits(&Cpu, &h, &[4]).unwrap();
    m.set_lm_head(&Cpu, LmHead::Int8).unwrap();
    assert_eq!(m.lm_head_mode(), LmHead::Int8);
    for (&n, want) in [1, 4].iter().zip(&exact) {
        let got = decode(&m, n, 8, Graphs::Off, greedy);
        assert_eq!(got.0, want.0, "batch {n}: ids");
        assert!(got.1 == want.1, "batch {n}: cache rows");
    }
    assert_eq!(m.logits(&Cpu, &h, &[4]).unwrap(), logits, "logits stay exact");
    let sampled = decode(&m, 3, 4, Graphs::Off, SamplingParams { temperature: 0.8, top_k: 0, top_p: 1.0, seed: 1 });
    assert!(sampled.0.iter().flatten().all(|&t| (t as usize) < m.config().vocab_size));
    assert!(m.decode_weight_bytes() < dsv3_runtime::model::decode_weight_bytes(m.config()));
}
