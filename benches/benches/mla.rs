//! One MLA decode step (the weight-absorbed form on the paged latent cache) at the true V3
//! widths: hidden 7168, 128 heads, q_lora 1536, kv_lora 512, rope 64, nope 128, v 128, for
//! batch 1 and 16 at context 1K and 8K. The caches are filled directly with random latent
//! values (no 8K prefill).
//!
//! One step = q_a/q_b/kv_a projections (FP8, reference path), RoPE, cache write, absorption
//! (`W_UKᵀ q_nope`), attention over `576`-wide cached rows, `W_UV ō`, `o_proj`. Two copies of
//! the layer (weights and cache) alternate so that the ~200 MB of weights per step come from
//! memory, not from the last-level cache. Bytes counted: weights read (FP8 codes and scales,
//! `W_UK`/`W_UV` as the bf16 hi+lo pairs the layer holds, norms) + cache rows read
//! (`Σ len · 576 · 4`); FLOPs: projections, absorption and value up-projection (twice: one
//! product per half of a pair), scores and weighted sums.

use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use dsv3_benches::{Rng, Work, limits, median_time, report};
use dsv3_kernels::Cpu;
use dsv3_kernels::gemm::GemmPath;
use dsv3_mla::{CacheConfig, MlaConfig, MlaContext, MlaHostWeights, MlaWeights, PAGE_SIZE, PagedLatentCache, SeqId};
use std::time::{Duration, Instant};

/// Layer copies the steps alternate between (weights + cache pool each).
const COPIES: usize = 2;

fn bench(c: &mut Criterion) {
    limits();
    let b = Cpu;
    let cfg = MlaConfig::deepseek_v3();
    let t = Instant::now();
    let ctx = MlaContext::new(&b, cfg, GemmPath::Reference).expect("context");
    let host = MlaHostWeights::random(&cfg, 1).expect("random weights");
    let layers: Vec<MlaWeights<Cpu>> = (0..COPIES).map(|_| MlaWeights::new(&b, &cfg, &host).expect("upload")).collect();
    drop(host);
    println!(
        "random V3 MLA layer ({:.1} MB of weights) x{COPIES} built in {:.1} s",
        layers[0].bytes() as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );

    let mut rng = Rng::new(7);
    let mut g = c.benchmark_group("mla_decode_v3");
    g.sample_size(10).sampling_mode(SamplingMode::Flat).warm_up_time(Duration::from_millis(200)).measurement_time(Duration::from_secs(2));
    for (batch, context) in [(1usize, 1024usize), (16, 1024), (1, 8192), (16, 8192)] {
        // Pages for `context` cached tokens + the new one, per sequence.
        let pages = batch * (context + 1).div_ceil(PAGE_SIZE);
        let mut cache = PagedLatentCache::new(&b, CacheConfig::for_model(&cfg, COPIES, pages)).expect("cache");
        let seqs: Vec<SeqId> = (0..batch).map(|_| cache.add_sequence()).collect();
        // Reserve the context (a plan without a forward pass), then fill the pools directly.
        cache.plan(&b, &seqs.iter().map(|&s| (s, context)).collect::<Vec<_>>()).expect("reserve");
        let pool_len = pages * PAGE_SIZE * cfg.latent_dim();
        for layer in 0..COPIES {
            let data: Vec<f32> = (0..pool_len).map(|_| 1.7 * rng.f32()).collect();
            cache.upload_pool(&b, layer, &data).expect("fill");
        }
        // One decode step: one new token per sequence, re-run in place (the same slots).
        let plan = cache.plan(&b, &seqs.iter().map(|&s| (s, 1)).collect::<Vec<_>>()).expect("plan");
        let x: Vec<f32> = rng.vec(batch * cfg.hidden, 1.0);
        let mut out = vec![0f32; batch * cfg.hidden];
        let mut i = 0;
        let mut step = || {
            let l = i % COPIES;
            i += 1;
            let mut lc = cache.layer(&plan, l).expect("layer");
            layers[l].decode(&b, &ctx, &mut lc, &x, &mut out).expect("decode");
        };
        let name = format!("b{batch}_ctx{context}");
        g.bench_function(&name, |bch| bch.iter(&mut step));
        let time = median_time(if context > 4096 && batch > 1 { 5 } else { 20 }, &mut step);

        let keys = (batch * (context + 1)) as f64;
        let (h, l, r) = (cfg.n_heads as f64, cfg.kv_lora_rank as f64, cfg.qk_rope_head_dim as f64);
        let (dn, dv, bt) = (cfg.qk_nope_head_dim as f64, cfg.v_head_dim as f64, batch as f64);
        let proj = (cfg.q_lora_rank.unwrap_or(0) * cfg.hidden + cfg.q_dim() * cfg.q_lora_rank.unwrap_or(0)) as f64
            + (cfg.latent_dim() * cfg.hidden + cfg.hidden * cfg.o_dim()) as f64;
        let flops = 2.0 * bt * proj + 2.0 * 2.0 * bt * h * (dn + dv) * l + 2.0 * keys * h * (l + r + l);
        let work = Work { bytes: layers[0].bytes() as f64 + keys * (l + r) * 4.0, flops };
        report(&format!("mla decode v3 {name}"), work, time);
        println!("{:<48} {:>10.1} tokens/s", "", bt / time.as_secs_f64());
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
