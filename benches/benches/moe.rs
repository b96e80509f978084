//! One DeepSeek-V3 MoE layer at true widths (hidden 7168, 256 experts of width 2048, top-8,
//! 8 groups keep 4, 1 shared expert, FP8 weights) on the CPU backend, router to combine:
//! decode batches of 1 and 16 tokens (criterion, both GEMM paths) and a prefill batch of 256
//! tokens (reference path; about 10 s a pass on 2 cores, so it is timed with two passes
//! outside criterion, whose minimum of 10 samples would take minutes).
//!
//! **Shared expert weights.** 256 distinct experts would be 11.3 GB of FP8; this bench holds
//! `DISTINCT` = 32 random experts (1.4 GB, far beyond the 260 MB L3) and lets expert `e` use
//! set `e % 32` ([`MoeWeights::random_cyclic`]; the backend uploads each set once). Routing is
//! computed as for 256 experts.
//!
//! **Bytes counted** are what a model with 256 distinct experts reads: every active expert's
//! FP8 codes + scales (gate, up, down), the bf16 router and its bias, the shared expert, and
//! the activations in and out. For that to be what this bench's memory system actually
//! serves, two active experts of one pass must not share a set while one could still be in
//! cache: the 1-token batches are drawn so that their 8 experts use 8 distinct sets; with 16
//! tokens (~85 active experts) the reuse distance of a set is ~470 MB per projection, past
//! the L3. Inputs rotate through `BATCHES` batches so consecutive passes route differently.

use criterion::{Criterion, criterion_group, criterion_main};
use dsv3_benches::{Rng, Work, limits, median_time, report};
use dsv3_kernels::backend::Cpu;
use dsv3_kernels::gemm::GemmPath;
use dsv3_moe::{LoadStats, MoeConfig, MoeLayer, MoeWeights};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const DISTINCT: usize = 32;
const BATCHES: usize = 8;

fn bench(c: &mut Criterion) {
    limits();
    let cfg = MoeConfig::deepseek_v3();
    let t0 = Instant::now();
    let w = MoeWeights::random_cyclic(&cfg, 7, DISTINCT).expect("random weights");
    let expert_bytes = w.experts()[0].bytes();
    let shared_bytes = w.shared().map_or(0, |s| s.bytes());
    let router_bytes = 2 * cfg.n_routed_experts * cfg.hidden + 4 * cfg.n_routed_experts;
    println!(
        "moe: V3 layer, {} experts served by {DISTINCT} distinct random FP8 sets (expert e uses set e % {DISTINCT}), \
         {:.1} MB per expert, generated in {:.1} s",
        cfg.n_routed_experts,
        expert_bytes as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );
    let layers: Vec<(GemmPath, MoeLayer<Cpu>)> = [GemmPath::Reference, GemmPath::Fp8]
        .into_iter()
        .map(|p| (p, MoeLayer::new(&Cpu, MoeConfig { gemm_path: p, ..cfg }, &w).expect("layer")))
        .collect();
    drop(w); // the layers hold their own (backend) copies
    let mut rng = Rng::new(3);
    let n = cfg.n_routed_experts;
    let stats_of = |x: &Vec<f32>, tokens: usize| {
        let r = layers[0].1.route(&Cpu, x, tokens).expect("route");
        LoadStats::from_topk_ids(&r.ids, tokens, cfg.route.top_k, n, 1).expect("stats")
    };
    // Batches per size; 1-token batches whose experts use distinct sets.
    let mut inputs: Vec<(usize, Vec<Vec<f32>>)> = Vec::new();
    for tokens in [1usize, 16, 256] {
        let mut batches = Vec::new();
        while batches.len() < BATCHES {
            let x = rng.vec(tokens * cfg.hidden, 1.0);
            let s = stats_of(&x, tokens);
            let sets: BTreeSet<usize> = active(&s).map(|e| e % DISTINCT).collect();
            if tokens > 1 || sets.len() == s.active_experts() {
                batches.push(x);
            }
        }
        inputs.push((tokens, batches));
    }

    for (path, layer) in &layers {
        let path = *path;
        let mut g = c.benchmark_group(format!("moe_v3_{path:?}").to_lowercase());
        g.sample_size(10).warm_up_time(Duration::from_millis(200)).measurement_time(Duration::from_secs(1));
        for (tokens, batches) in &inputs {
            let tokens = *tokens;
            if tokens > 16 && path == GemmPath::Fp8 {
                continue;
            }
            let stats: Vec<LoadStats> = batches.iter().map(|x| stats_of(x, tokens)).collect();
            let active_mean = stats.iter().map(|s| s.active_experts()).sum::<usize>() as f64 / BATCHES as f64;
            let sets_mean =
                stats.iter().map(|s| active(s).map(|e| e % DISTINCT).collect::<BTreeSet<_>>().len()).sum::<usize>() as f64 / BATCHES as f64;
            let bytes = active_mean * expert_bytes as f64 + (shared_bytes + router_bytes + 2 * 4 * tokens * cfg.hidden) as f64;
            let pairs = (tokens * cfg.route.top_k) as f64;
            let gemm_flops = 2.0 * 3.0 * (cfg.hidden * cfg.moe_intermediate) as f64;
            let flops = gemm_flops * (pairs + tokens as f64) + 2.0 * (tokens * n * cfg.hidden) as f64;

            let mut i = 0;
            let mut step = || {
                let x = &batches[i % BATCHES];
                i += 1;
                std::hint::black_box(layer.forward(&Cpu, x, tokens).expect("forward"));
            };
            let t = if tokens <= 16 {
                g.bench_function(format!("t{tokens}"), |b| b.iter(&mut step));
                median_time(BATCHES, &mut step)
            } else {
                median_time(2, &mut step)
            };
            report(&format!("moe v3 {path:?} t{tokens}").to_lowercase(), Work { bytes, flops }, t);
            println!(
                "    {:.1} tokens/s; per pass {active_mean:.1} active experts on {sets_mean:.1} of the {DISTINCT} weight sets; batch 0: {}",
                tokens as f64 / t.as_secs_f64(),
                stats[0]
            );
        }
        g.finish();
    }
}

/// The experts a batch routed at least one token to.
fn active(s: &LoadStats) -> impl Iterator<Item = usize> + '_ {
    s.per_expert().iter().enumerate().filter(|&(_, &c)| c > 0).map(|(e, _)| e)
}

criterion_group!(benches, bench);
criterion_main!(benches);
