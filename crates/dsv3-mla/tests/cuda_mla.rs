//! The MLA layer on the CUDA backend against the same layer on the CPU backend (issue #5):
//! mixed prefill of two sequences (one crossing a page), batched absorbed decode (one sequence
//! with two speculative tokens), then a chunked prefill, on both GEMM paths, for small configs
//! (q LoRA on and off) and the true V3 head widths. Every step's output and the final cache
//! rows are compared: on the Reference path `max |gpu - cpu| <= 1e-4 · max |cpu|` (the MLA
//! tests' own bound); on the fp8 path DeepGEMM's `calc_diff < 1e-5` (a one-ulp e4m3 flip of an
//! activation between the two backends' summation orders stays inside it).
//!
//! Ignored, and reported `SKIPPED` without a GPU (`DSV3_REQUIRE_GPU` turns that into a
//! failure); build it for a GPU with `--features dsv3-kernels/cuda`.

mod common;

use common::{inputs, max_abs, max_abs_diff, small_cfg, v3_widths_cfg};
use dsv3_kernels::fp8::calc_diff;
use dsv3_kernels::gemm::GemmPath;
use dsv3_kernels::{Backend, Cpu, Cuda};
use dsv3_mla::*;

/// The CUDA backend, or `None` after printing why the test is skipped ([`Cuda::for_test`]).
fn gpu(test: &str) -> Option<Cuda> {
    Cuda::for_test(test).unwrap_or_else(|e| panic!("{test}: {e}"))
}

/// One layer on one backend.
struct Engine<B: Backend> {
    b: B,
    ctx: MlaContext<B>,
    w: MlaWeights<B>,
    cache: PagedLatentCache<B>,
}

impl<B: Backend> Engine<B> {
    fn new(b: B, cfg: MlaConfig, host: &MlaHostWeights, pages: usize, path: GemmPath) -> Self {
        let ctx = MlaContext::new(&b, cfg, path).unwrap();
        let w = MlaWeights::new(&b, &cfg, host).unwrap();
        let cache = PagedLatentCache::new(&b, CacheConfig::for_model(&cfg, 1, pages)).unwrap();
        Engine { b, ctx, w, cache }
    }

    fn step(&mut self, batch: &[(SeqId, usize)], x: &[f32], absorbed: bool) -> Vec<f32> {
        let plan = self.cache.plan(&self.b, batch).unwrap();
        let xb = self.b.upload(x).unwrap();
        let mut out = self.b.zeros::<f32>(x.len()).unwrap();
        let mut lc = self.cache.layer(&plan, 0).unwrap();
        if absorbed {
            self.w.decode(&self.b, &self.ctx, &mut lc, &xb, &mut out).unwrap();
        } else {
            self.w.prefill(&self.b, &self.ctx, &mut lc, &xb, &mut out).unwrap();
        }
        self.b.download(&out).unwrap()
    }
}

fn compare(gpu: &[f32], cpu: &[f32], path: GemmPath, what: &str) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    assert!(gpu.iter().all(|v| v.is_finite()), "{what}: non-finite GPU output");
    match path {
        GemmPath::Reference => {
            let (err, scale) = (max_abs_diff(gpu, cpu), max_abs(cpu));
            assert!(err <= 1e-4 * scale, "{what}: max |gpu - cpu| {err} > 1e-4 · {scale}");
        }
        GemmPath::Fp8 => {
            let diff = calc_diff(gpu, cpu);
            assert!(diff < 1e-5, "{what}: calc_diff {diff}");
        }
    }
}

/// The scenario on both backends, step by step.
fn scenario<G: Backend>(gpu_b: G, cfg: MlaConfig, path: GemmPath, seed: u64) {
    let host = MlaHostWeights::random(&cfg, seed).unwrap();
    let hd = cfg.hidden;
    let mut g = Engine::new(gpu_b, cfg, &host, 8, path);
    let mut c = Engine::new(Cpu, cfg, &host, 8, path);
    let (gs, cs) = ([g.cache.add_sequence(), g.cache.add_sequence()], [c.cache.add_sequence(), c.cache.add_sequence()]);
    let steps: [(&[usize], bool); 4] = [(&[70, 5], false), (&[1, 2], true), (&[1, 1], true), (&[0, 10], false)];
    for (i, (lens, absorbed)) in steps.iter().enumerate() {
        let gb: Vec<(SeqId, usize)> = gs.iter().zip(*lens).filter(|x| *x.1 > 0).map(|(&s, &n)| (s, n)).collect();
        let cb: Vec<(SeqId, usize)> = cs.iter().zip(*lens).filter(|x| *x.1 > 0).map(|(&s, &n)| (s, n)).collect();
        let t: usize = lens.iter().sum();
        let x = inputs(seed ^ (i as u64 + 1), t * hd);
        let (go, co) = (g.step(&gb, &x, *absorbed), c.step(&cb, &x, *absorbed));
        compare(&go, &co, path, &format!("{path:?} step {i} ({} form)", if *absorbed { "absorbed" } else { "expanded" }));
    }
    for (&sg, &sc) in gs.iter().zip(&cs) {
        let (rg, rc) = (g.cache.read_rows(&g.b, 0, sg).unwrap(), c.cache.read_rows(&Cpu, 0, sc).unwrap());
        compare(&rg, &rc, path, "cache rows");
    }
}

fn configs() -> [(MlaConfig, u64); 3] {
    [(small_cfg(Some(128), 64, 16), 1), (small_cfg(None, 128, 64), 2), (v3_widths_cfg(), 3)]
}

/// The scenario with the CPU in the GPU's place (runs everywhere): every step is valid, so on
/// a GPU a failure is the CUDA backend's.
#[test]
fn scenario_runs_on_cpu() {
    let (cfg, seed) = configs()[0];
    scenario(Cpu, cfg, GemmPath::Fp8, seed);
}

#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_mla_layer_matches_cpu() {
    if gpu("cuda_mla_layer_matches_cpu").is_none() {
        return;
    }
    for (cfg, seed) in configs() {
        for path in [GemmPath::Reference, GemmPath::Fp8] {
            scenario(Cuda::new(0).unwrap(), cfg, path, seed);
            println!("{path:?} hidden {} heads {} kv_lora {}: ok", cfg.hidden, cfg.n_heads, cfg.kv_lora_rank);
        }
    }
}
