//! The serving engine on the tiny presets: continuous batching gives every request the tokens
//! `generate` gives it alone; preemption, cancellation, disconnects and deadlines end or
//! recompute sequences without leaking a page; requests are checked before they queue.

mod common;

use dsv3_kernels::Cpu;
use dsv3_kernels::gemm::GemmPath;
use dsv3_runtime::decode::Graphs;
use dsv3_runtime::engine::{Engine, EngineConfig, Event, FinishReason, GenRequest, SubmitError};
use dsv3_runtime::generate::{Request, SamplingParams, generate};
use dsv3_runtime::model::Model;
use dsv3_runtime::{Checkpoint, ModelConfig, Preset};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn load(dir: &Path, path: GemmPath) -> Model<Cpu> {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let ck = Checkpoint::open(dir).unwrap();
    ck.validate(&cfg).unwrap();
    Model::load(&Cpu, &ck, &cfg, path).unwrap()
}

fn model(preset: Preset, path: GemmPath) -> (tempfile::TempDir, Model<Cpu>) {
    let tmp = tempfile::tempdir().unwrap();
    common::write_preset(tmp.path(), "m", preset, None);
    let m = load(&tmp.path().join("m"), path);
    (tmp, m)
}

/// Events of one request, collected by its sink.
#[derive(Clone, Default)]
struct Collected(Arc<Mutex<Vec<Event>>>);

impl Collected {
    fn sink(&self) -> dsv3_runtime::engine::EventSink {
        let me = self.0.clone();
        Box::new(move |ev| {
            me.lock().unwrap().push(ev);
            true
        })
    }
    fn ids(&self) -> Vec<u32> {
        self.0.lock().unwrap().iter().filter_map(|e| if let Event::Token { id, .. } = e { Some(*id) } else { None }).collect()
    }
    fn finish(&self) -> Option<(FinishReason, dsv3_runtime::engine::Usage)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .find_map(|e| if let Event::Finished { reason, usage, .. } = e { Some((*reason, *usage)) } else { None })
    }
    fn finished_events(&self) -> usize {
        self.0.lock().unwrap().iter().filter(|e| matches!(e, Event::Finished { .. })).count()
    }
}

fn run_to_idle(e: &mut Engine<Cpu>) -> usize {
    let mut steps = 0;
    while !e.is_idle() {
        e.step().unwrap();
        steps += 1;
        assert!(steps < 10_000, "the engine does not finish");
    }
    steps
}

/// `generate` alone: the reference every engine answer must equal.
fn alone(m: &Model<Cpu>, prompt: &[u32], max_tokens: usize, sampling: SamplingParams) -> Vec<u32> {
    let eos = m.config().eos_token_ids.clone();
    let req = Request { prompt, max_tokens, sampling, eos: &eos, allowed: m.config().vocab_size };
    generate(&Cpu, m, &req, |_| Ok(())).unwrap().ids
}

fn prompts(n: usize, vocab: u32) -> Vec<Vec<u32>> {
    (0..n).map(|i| (0..(1 + (i * 37) % 150)).map(|j| ((j * 131 + i * 17 + 3) as u32) % vocab).collect()).collect()
}

/// Submits every prompt at once, runs the engine dry and returns each request's tokens.
fn serve_all(m: Model<Cpu>, cfg: EngineConfig, reqs: &[GenRequest]) -> (Vec<Collected>, Engine<Cpu>) {
    let mut e = Engine::new(Cpu, m, None, cfg).unwrap();
    let out: Vec<Collected> = reqs.iter().map(|_| Collected::default()).collect();
    for (r, c) in reqs.iter().zip(&out) {
        e.submit(r.clone(), c.sink()).unwrap();
    }
    run_to_idle(&mut e);
    (out, e)
}

fn assert_all_pages_free(e: &Engine<Cpu>) {
    let m = e.metrics();
    assert_eq!(m.cache_pages_used, 0, "pages leaked: {m:?}");
    assert_eq!(e.free_pages() as u64, m.cache_pages_total);
    assert_eq!((m.running, m.waiting), (0, 0));
}

#[test]
fn concurrent_greedy_requests_get_the_tokens_they_get_alone() {
    // The last case pads every decode step to a batch bucket, as CUDA graphs are replayed:
    // the pad rows must change no answer.
    for (preset, path, graphs) in [
        (Preset::Tiny, GemmPath::Reference, Graphs::Auto),
        (Preset::Tiny, GemmPath::Fp8, Graphs::Auto),
        (Preset::TinyV2Lite, GemmPath::Reference, Graphs::Auto),
        (Preset::Tiny, GemmPath::Reference, Graphs::Padded),
    ] {
        let (_tmp, m) = model(preset, path);
        let vocab = m.config().vocab_size as u32;
        let ps = prompts(32, vocab);
        let reqs: Vec<GenRequest> = ps.iter().enumerate().map(|(i, p)| GenRequest::greedy(p.clone(), 4 + i % 9)).collect();
        let want: Vec<Vec<u32>> = reqs.iter().map(|r| alone(&m, &r.prompt, r.max_tokens, r.sampling)).collect();
        // A small step budget: prompts are prefilled in chunks beside the decodes of others.
        let cfg = EngineConfig {
            max_running: 32,
            max_step_tokens: 96,
            cache_tokens: 32 * 256,
            max_context: 512,
            decode_graphs: graphs,
            ..Default::default()
        };
        let (got, e) = serve_all(m, cfg, &reqs);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(&g.ids(), w, "{preset:?} {path:?} {graphs:?}: request {i} (prompt of {} tokens)", reqs[i].prompt.len());
            assert_eq!(g.finished_events(), 1);
        }
        assert!(e.decode_stats().eager_steps > 0, "no step went through the decode runner: {:?}", e.decode_stats());
        assert_all_pages_free(&e);
    }
}

#[test]
fn sampled_requests_keep_their_seeded_streams() {
    let (_tmp, m) = model(Preset::Tiny, GemmPath::Reference);
    let vocab = m.config().vocab_size as u32;
    let reqs: Vec<GenRequest> = prompts(8, vocab)
        .into_iter()
        .enumerate()
        .map(|(i, p)| GenRequest {
            sampling: SamplingParams { temperature: 0.8, top_k: 40, top_p: 0.9, seed: i as u64 },
            ..GenRequest::greedy(p, 12)
        })
        .collect();
    let want: Vec<Vec<u32>> = reqs.iter().map(|r| alone(&m, &r.prompt, r.max_tokens, r.sampling)).collect();
    let (got, _e) = serve_all(m, EngineConfig { max_context: 512, cache_tokens: 8192, ..Default::default() }, &reqs);
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(&g.ids(), w);
    }
}

#[test]
fn cancel_disconnect_and_deadline_end_requests_and_free_their_pages() {
    let (_tmp, m) = model(Preset::Tiny, GemmPath::Reference);
    let mut e = Engine::new(Cpu, m, None, EngineConfig { max_context: 512, cache_tokens: 4096, ..Default::default() }).unwrap();
    let long = |seed: u32| GenRequest { ignore_eos: true, ..GenRequest::greedy(vec![seed, 5, 9, 11], 400) };
    let (a, b, c, d) = (Collected::default(), Collected::default(), Collected::default(), Collected::default());
    let ia = e.submit(long(1), a.sink()).unwrap();
    e.submit(long(2), b.sink()).unwrap();
    // A client that goes away after three tokens.
    let mut seen = 0;
    let gone: dsv3_runtime::engine::EventSink = Box::new(move |_| {
        seen += 1;
        seen < 3
    });
    e.submit(long(3), gone).unwrap();
    e.submit(GenRequest { deadline: Some(Instant::now() + Duration::from_millis(1)), ..long(4) }, c.sink()).unwrap();
    for _ in 0..5 {
        e.step().unwrap();
    }
    e.cancel(ia);
    e.submit(GenRequest::greedy(vec![7, 8], 3), d.sink()).unwrap();
    std::thread::sleep(Duration::from_millis(5));
    for _ in 0..5 {
        e.step().unwrap();
    }
    assert_eq!(a.finish().map(|f| f.0), Some(FinishReason::Cancelled));
    assert!(a.ids().len() >= 5 && a.ids().len() < 400);
    assert_eq!(c.finish().map(|f| f.0), Some(FinishReason::Timeout));
    assert!(matches!(d.finish().map(|f| f.0), Some(FinishReason::Length | FinishReason::Stop)));
    assert!(b.finish().is_none(), "b runs on");
    e.cancel_all();
    e.step().unwrap();
    assert_eq!(b.finish().map(|f| f.0), Some(FinishReason::Cancelled));
    assert!(e.is_idle());
    let m = e.metrics();
    let count = |r: FinishReason| m.finished.iter().find(|x| x.0 == r).unwrap().1;
    assert_eq!(count(FinishReason::Cancelled), 3, "a, b and the client that went away");
    assert_eq!(count(FinishReason::Timeout), 1);
    assert_all_pages_free(&e);
}

#[test]
fn bad_requests_are_refused_before_they_queue() {
    let (_tmp, m) = model(Preset::Tiny, GemmPath::Reference);
    let vocab = m.config().vocab_size;
    let cfg = EngineConfig { max_context: 128, cache_tokens: 1024, max_waiting: 2, ..Default::default() };
    let mut e = Engine::new(Cpu, m, None, cfg).unwrap();
    let sink = || Collected::default().sink();
    let cases: Vec<(GenRequest, &str)> = vec![
        (GenRequest::greedy(vec![], 4), "prompt"),
        (GenRequest::greedy(vec![1; 128], 1), "prompt"),
        (GenRequest::greedy(vec![1; 100], 29), "max_tokens"),
        (GenRequest::greedy(vec![1], 0), "max_tokens"),
        (GenRequest::greedy(vec![1, vocab as u32], 4), "prompt"),
        (
            GenRequest { sampling: SamplingParams { temperature: -1.0, ..Default::default() }, ..GenRequest::greedy(vec![1], 4) },
            "temperature",
        ),
        (GenRequest { sampling: SamplingParams { top_p: 0.0, ..Default::default() }, ..GenRequest::greedy(vec![1], 4) }, "top_p"),
        (GenRequest { stop: vec!["x".into()], ..GenRequest::greedy(vec![1], 4) }, "stop"),
        (GenRequest { logprobs: Some(21), ..GenRequest::greedy(vec![1], 4) }, "top_logprobs"),
    ];
    for (r, param) in cases {
        let err = e.submit(r.clone(), sink()).unwrap_err();
        assert_eq!(err.param(), Some(param), "{r:?}: {err}");
    }
    assert!(e.is_idle(), "refused requests never queue");
    e.submit(GenRequest::greedy(vec![1; 100], 28), sink()).unwrap();
    e.submit(GenRequest::greedy(vec![1], 2), sink()).unwrap();
    assert!(matches!(e.submit(GenRequest::greedy(vec![1], 2), sink()), Err(SubmitError::QueueFull { waiting: 2 })));
    run_to_idle(&mut e);
    e.submit(GenRequest::greedy(vec![1], 2), sink()).unwrap();
    run_to_idle(&mut e);
    assert_all_pages_free(&e);
}

#[test]
fn config_that_cannot_serve_one_full_sequence_is_refused() {
    let (_tmp, m) = model(Preset::Tiny, GemmPath::Reference);
    let err = Engine::new(Cpu, m, None, EngineConfig { max_context: 4096, cache_tokens: 1024, ..Default::default() }).unwrap_err();
    assert!(err.to_string().contains("cache_tokens"), "{err}");
    let (_tmp, m) = model(Preset::Tiny, GemmPath::Reference);
    let err = Engine::new(Cpu, m, None, EngineConfig { max_running: 8, max_step_tokens: 4, ..Default::default() }).unwrap_err();
    assert!(err.to_string().contains("max_step_tokens"), "{err}");
}

#[test]
fn logprobs_come_with_each_token_and_match_the_logits() {
    let (_tmp, m) = model(Preset::Tiny, GemmPath::Reference);
    let prompt = vec![3u32, 14, 15, 92];
    let mut cache = m.new_cache(&Cpu, 64).unwrap();
    let seq = cache.add_sequence();
    let h = m.forward_hidden(&Cpu, &mut cache, &[(seq, &prompt[..])]).unwrap();
    let first = m.logits(&Cpu, &h, &[prompt.len() - 1]).unwrap();
    let (c, mut e) = (
        Collected::default(),
        Engine::new(Cpu, m, None, EngineConfig { max_context: 256, cache_tokens: 1024, ..Default::default() }).unwrap(),
    );
    e.submit(GenRequest { logprobs: Some(5), ..GenRequest::greedy(prompt, 3) }, c.sink()).unwrap();
    run_to_idle(&mut e);
    let events = c.0.lock().unwrap().clone();
    let Event::Token { id, logprob: Some(lp), .. } = &events[0] else { panic!("first event: {:?}", events[0]) };
    assert_eq!(lp.id, *id);
    assert_eq!(lp.top.len(), 5);
    assert_eq!(lp.top[0].0, *id, "greedy picks the most likely token");
    let max = first.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + first.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
    assert!((lp.logprob as f64 - (first[*id as usize] as f64 - lse)).abs() < 1e-5);
    assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
}
#[test]
fn preempted_sequences_are_recomputed_to_the_same_tokens() {
    let (_tmp, m) = model(Preset::Tiny, GemmPath::Reference);
    let vocab = m.config().vocab_size as u32;
    // 6 sequences that each grow past two pages, in a cache of 8 pages: decodes run out of
    // pages and the newest sequences are preempted, then recomputed. Every other one samples:
    // its seeded stream must not advance while it re-caches what it had generated.
    let reqs: Vec<GenRequest> = (0..6)
        .map(|i| {
            let greedy = GenRequest::greedy((0..40 + i).map(|j| (j * 7 + i) as u32 % vocab).collect(), 100);
            match i % 2 {
                0 => greedy,
                _ => GenRequest { sampling: SamplingParams { temperature: 0.8, top_k: 40, top_p: 0.9, seed: i as u64 }, ..greedy },
            }
        })
        .collect();
    let want: Vec<Vec<u32>> = reqs.iter().map(|r| alone(&m, &r.prompt, r.max_tokens, r.sampling)).collect();
    let cfg = EngineConfig { max_running: 6, max_step_tokens: 64, max_context: 256, cache_tokens: 8 * 64, ..Default::default() };
    let (got, e) = serve_all(m, cfg, &reqs);
    let metrics = e.metrics();
    assert!(metrics.preemptions > 0, "the cache was meant to run out: {metrics:?}");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(&g.ids(), w, "request {i}");
    }
    let preempted: Vec<usize> = (0..6).filter(|&i| got[i].finish().unwrap().1.preemptions > 0).collect();
    assert!(preempted.iter().any(|i| i % 2 == 0) && preempted.iter().any(|i| i % 2 == 1), "preempted: {preempted:?}");
    assert_all_pages_free(&e);
}
