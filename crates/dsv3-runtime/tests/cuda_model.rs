//! The whole tiny models on the CUDA backend against the CPU backend (issue #5): the same
//! checkpoint loaded on both, logits of a prompt fed as prefill, single-token absorbed decode
//! steps and a chunk, for the V3, V2-Lite and Moonlight tiny presets. Within `1e-3 · max` of
//! the CPU's logits on the Reference path (the two backends sum in different orders through 4
//! layers) with the same argmax per row; on the fp8 path within DeepGEMM's `calc_diff < 1e-4`
//! at every position of models one and two layers deep (see [`compare_models`] for why not
//! through all four). This file adds no code to the runtime: the model is generic over the
//! Backend.
//!
//! Ignored, and reported `SKIPPED` without a GPU (`DSV3_REQUIRE_GPU` turns that into a
//! failure); build it for a GPU with `--features dsv3-kernels/cuda`.

mod common;

use common::argmax_rows;
use dsv3_kernels::fp8::calc_diff;
use dsv3_kernels::gemm::GemmPath;
use dsv3_kernels::sample::SampleRow;
use dsv3_kernels::{Backend, Cpu, Cuda};
use dsv3_runtime::decode::{DecodeRow, DecodeRunner, Graphs, RunnerStats};
use dsv3_runtime::generate::{Request, SamplingParams, generate};
use dsv3_runtime::model::Model;
use dsv3_runtime::{Checkpoint, InitOptions, ModelConfig, Preset, init_random};
use std::path::Path;

/// The CUDA backend, or `None` after printing why the test is skipped ([`Cuda::for_test`]).
fn gpu(test: &str) -> Option<Cuda> {
    Cuda::for_test(test).unwrap_or_else(|e| panic!("{test}: {e}"))
}

fn load<B: Backend>(b: &B, dir: &Path, path: GemmPath) -> Model<B> {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let ck = Checkpoint::open(dir).unwrap();
    ck.validate(&cfg).unwrap();
    Model::load(b, &ck, &cfg, path).unwrap()
}

/// Logits of every position of `ids` fed as `chunks` (one sequence; chunks of 1 after the first
/// take the absorbed decode form).
fn logits<B: Backend>(b: &B, m: &Model<B>, ids: &[u32], chunks: &[usize]) -> Vec<f32> {
    let mut cache = m.new_cache(b, ids.len()).unwrap();
    let seq = cache.add_sequence();
    let (mut out, mut at) = (Vec::new(), 0);
    for &c in chunks {
        let h = m.forward_hidden(b, &mut cache, &[(seq, &ids[at..at + c])]).unwrap();
        out.extend(m.logits(b, &h, &(0..c).collect::<Vec<_>>()).unwrap());
        at += c;
    }
    out
}

/// Per position (row of `vocab` logits), calc_diff of `g` against `c`.
fn calc_diff_rows(g: &[f32], c: &[f32], vocab: usize) -> Vec<f64> {
    g.chunks_exact(vocab).zip(c.chunks_exact(vocab)).map(|(a, b)| calc_diff(a, b)).collect()
}

/// Writes `preset` with its first `layers` decoder layers only (`None`: all of them).
fn write_model(preset: Preset, dir: &Path, layers: Option<usize>) {
    let mut cfg = preset.config();
    if let Some(l) = layers {
        cfg.num_hidden_layers = l.min(cfg.num_hidden_layers);
    }
    init_random(&cfg, dir, &InitOptions { seed: 11, ..Default::default() }).unwrap();
}

/// Every preset and path on `gpu` against the CPU. The Reference path through all layers. The
/// fp8 path as docs/architecture.md ("Numerics") says to judge it: a single e4m3 rounding
/// flip (a value on the other side of a rounding step because the two backends sum in
/// different orders, or a routing near-tie) changes everything after it on either backend,
/// while a wrong scheme changes every position; so models one layer deep (the dense layer)
/// and two (dense + MoE, routing included) must match at every position within DeepGEMM's
/// `calc_diff < 1e-4`, and the full depth is printed position by position (the first GPU run
/// measured 0.0063 over all positions there, from flips: issue 11).
fn compare_models<G: Backend>(gpu: &G) {
    for preset in [Preset::Tiny, Preset::TinyV2Lite, Preset::TinyMoonlight] {
        for (layers, path) in [(None, GemmPath::Reference), (Some(1), GemmPath::Fp8), (Some(2), GemmPath::Fp8), (None, GemmPath::Fp8)] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("m");
            write_model(preset, &dir, layers);
            let (mg, mc) = (load(gpu, &dir, path), load(&Cpu, &dir, path));
            let vocab = mc.config().vocab_size;
            let depth = mc.config().num_hidden_layers;
            let ids: Vec<u32> = (0..10).map(|i| (i * 53 + 7) as u32 % vocab as u32).collect();
            let chunks = [5, 1, 1, 3];
            let (g, c) = (logits(gpu, &mg, &ids, &chunks), logits(&Cpu, &mc, &ids, &chunks));
            assert_eq!(g.len(), c.len());
            let what = format!("{preset:?} {path:?}, {depth} layers");
            assert!(g.iter().all(|v| v.is_finite()), "{what}: non-finite logits");
            match (path, layers) {
                (GemmPath::Reference, _) => {
                    let scale = c.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let err = g.iter().zip(&c).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(err <= 1e-3 * scale, "{what}: max |gpu - cpu| {err} > 1e-3 · {scale}");
                    assert_eq!(argmax_rows(&g, vocab), argmax_rows(&c, vocab), "{what}: argmax");
                }
                (GemmPath::Fp8, Some(_)) => {
                    let d = calc_diff_rows(&g, &c, vocab);
                    assert!(d.iter().all(|&x| x < 1e-4), "{what}: calc_diff per position {d:?}");
                }
                (GemmPath::Fp8, None) => {
                    let d = calc_diff_rows(&g, &c, vocab);
                    let clean = d.iter().take_while(|&&x| x < 1e-4).count();
                    let shown: Vec<String> = d.iter().map(|x| format!("{x:.1e}")).collect();
                    println!("{what}: calc_diff per position [{}]; the first {clean} of {} within 1e-4", shown.join(" "), d.len());
                }
            }
            println!("{what}: ok");
        }
    }
}

/// The comparison with the CPU in the GPU's place (runs everywhere): every call is valid, so
/// on a GPU a failure is the CUDA backend's.
#[test]
fn comparison_runs_on_cpu() {
    compare_models(&Cpu);
}

#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_tiny_models_match_cpu() {
    let Some(cuda) = gpu("cuda_tiny_models_match_cpu") else { return };
    compare_models(&cuda);
}

/// `steps` greedy decode steps of `n` sequences (prompts of 3, 10, 17, ... tokens, prefilled
/// one by one) through a runner in `mode`: the ids, every cached row of every layer, and the
/// runner's statistics.
fn decode_on<B: Backend>(b: &B, m: &Model<B>, n: usize, steps: usize, mode: Graphs) -> (Vec<u32>, Vec<f32>, RunnerStats) {
    let vocab = m.config().vocab_size;
    let mut runner = DecodeRunner::new(b, m, n, mode).unwrap();
    let mut cache = m.new_cache_with(b, 2048, runner.pad_rows()).unwrap();
    let (mut seqs, mut next) = (Vec::new(), Vec::new());
    for k in 0..n {
        let s = cache.add_sequence();
        let prompt: Vec<u32> = (0..3 + 7 * k).map(|i| ((i * 31 + k * 17 + 5) % vocab) as u32).collect();
        let h = m.forward_hidden(b, &mut cache, &[(s, &prompt[..])]).unwrap();
        next.push(m.sample(b, &h, &[prompt.len() - 1], &[SampleRow::GREEDY], vocab).unwrap()[0]);
        seqs.push(s);
    }
    let mut ids = Vec::new();
    for _ in 0..steps {
        let rows: Vec<DecodeRow> = (0..n).map(|k| DecodeRow { seq: seqs[k], token: next[k], sample: SampleRow::GREEDY }).collect();
        next = runner.step(b, m, &mut cache, &rows, vocab).unwrap();
        ids.extend(&next);
    }
    let mut rows = Vec::new();
    for &s in &seqs {
        for l in 0..m.config().num_hidden_layers {
            rows.extend(cache.read_rows(b, l, s).unwrap());
        }
    }
    (ids, rows, runner.stats().clone())
}

/// Graph replay against the eager step it recorded: ids and cache rows bit for bit, batches
/// 1, 3 (padded to the bucket of 4) and 8, two table widths (the third sequence passes 64
/// positions), on `b`; with graphs where `b` captures them (checked by the statistics).
fn compare_graph_and_eager<B: Backend>(b: &B) {
    let tmp = tempfile::tempdir().unwrap();
    for preset in [Preset::Tiny, Preset::TinyV2Lite] {
        let dir = tmp.path().join(preset.name());
        write_model(preset, &dir, None);
        let m = load(b, &dir, GemmPath::Reference);
        for n in [1, 3, 8] {
            let (ids_g, rows_g, stats) = decode_on(b, &m, n, 50, Graphs::Auto);
            let (ids_e, rows_e, _) = decode_on(b, &m, n, 50, Graphs::Padded);
            if b.can_capture() {
                assert_eq!(stats.graph_steps, 50, "{preset:?} batch {n}: {stats:?}");
                assert!(stats.captures >= 1 && stats.capture_error.is_none(), "{stats:?}");
            }
            assert_eq!(ids_g, ids_e, "{preset:?} batch {n}: ids");
            let same = rows_g.len() == rows_e.len() && rows_g.iter().zip(&rows_e).all(|(a, c)| a.to_bits() == c.to_bits());
            assert!(same, "{preset:?} batch {n}: cache rows differ");
            println!("{preset:?} batch {n}: replay == eager ({stats:?})");
        }
    }
}

/// The graph-versus-eager comparison with the CPU in the GPU's place (runs everywhere; the
/// CPU never captures, so this checks the padded step against the plain one).
#[test]
fn graph_comparison_runs_on_cpu() {
    compare_graph_and_eager(&Cpu);
}

/// Issue 11: the decode step replayed as a CUDA graph per batch-size bucket gives the eager
/// step's ids and cache rows bit for bit.
#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_decode_graph_replay_matches_eager() {
    let Some(cuda) = gpu("cuda_decode_graph_replay_matches_eager") else { return };
    compare_graph_and_eager(&cuda);
}

/// Issue 11: greedy `generate` on the GPU (a runner with graphs, sampling on the device) gives
/// the CPU's ids on every tiny preset, Reference path; the fp8 path is printed (rounding flips
/// may change a token there, see `compare_models`).
#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_generate_matches_cpu_greedy() {
    let Some(cuda) = gpu("cuda_generate_matches_cpu_greedy") else { return };
    let tmp = tempfile::tempdir().unwrap();
    for preset in [Preset::Tiny, Preset::TinyV2Lite, Preset::TinyMoonlight] {
        let dir = tmp.path().join(preset.name());
        write_model(preset, &dir, None);
        for path in [GemmPath::Reference, GemmPath::Fp8] {
            let (mg, mc) = (load(&cuda, &dir, path), load(&Cpu, &dir, path));
            let prompt: Vec<u32> = (0..12).map(|i| (i * 37 + 11) % mc.config().vocab_size as u32).collect();
            let req =
                Request { prompt: &prompt, max_tokens: 40, sampling: SamplingParams::default(), eos: &[], allowed: mc.config().vocab_size };
            let g = generate(&cuda, &mg, &req, |_| Ok(())).unwrap();
            let c = generate(&Cpu, &mc, &req, |_| Ok(())).unwrap();
            match path {
                GemmPath::Reference => assert_eq!(g.ids, c.ids, "{preset:?}"),
                GemmPath::Fp8 => println!("{preset:?} fp8: same ids: {}", g.ids == c.ids),
            }
        }
    }
}
