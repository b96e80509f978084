//! Decode steps through `DecodeRunner` on the CPU: the padded step (what a GPU captures as a
//! graph per batch-size bucket) gives the real rows the ids and the cache rows of the plain
//! step and of the logits-on-the-host path; sampled rows draw with their own seeded streams;
//! a bad step leaves the cache as it was. (The graph replay itself needs a GPU:
//! `cuda_decode_graph_replay_matches_eager` in cuda_model.rs.)

#![allow(clippy::needless_range_loop)] // sequences and steps index several tables in lock-step

mod common;

use common::load_model;
use dsv3_kernels::Cpu;
use dsv3_kernels::gemm::GemmPath;
use dsv3_kernels::sample::SampleRow;
use dsv3_runtime::RuntimeError;
use dsv3_runtime::decode::{DecodeRow, DecodeRunner, Graphs};
use dsv3_runtime::generate::{Sampler, SamplingParams};
use dsv3_runtime::model::Model;
use dsv3_runtime::{Preset, mla::PagedLatentCache, mla::SeqId};

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
