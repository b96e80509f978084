//! DeepSeek-V3 `noaux_tc` routing: 256 experts, 8 groups keep 4, top-8, for 1, 64 and 4096
//! tokens. Bytes counted: logits and bias read, indices and weights written.

use criterion::{Criterion, criterion_group, criterion_main};
use dsv3_benches::{Rng, Work, limits, median_time, report};
use dsv3_kernels::gating::{self, RouteCfg};
use std::time::Duration;

fn bench(c: &mut Criterion) {
    limits();
    let mut rng = Rng::new(3);
    let cfg = RouteCfg::deepseek_v3();
    let (n, k) = (cfg.n_experts, cfg.top_k);
    let bias: Vec<f32> = rng.vec(n, 1.0).iter().map(|v| 0.05 * v).collect();
    let mut g = c.benchmark_group("gating_noaux_tc");
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    for tokens in [1usize, 64, 4096] {
        let logits: Vec<f32> = rng.vec(tokens * n, 1.0).iter().map(|v| 4.0 * v).collect();
        let (mut idx, mut w) = (vec![0u32; tokens * k], vec![0f32; tokens * k]);
        let mut step = || gating::route(&cfg, tokens, &logits, Some(&bias), &mut idx, &mut w).expect("route");
        g.bench_function(format!("t{tokens}"), |b| b.iter(&mut step));
        let work = Work { bytes: (4 * (tokens * n + n) + 8 * tokens * k) as f64, flops: 0.0 };
        report(&format!("gating noaux_tc e256 top8 t{tokens}"), work, median_time(if tokens > 1000 { 20 } else { 200 }, &mut step));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
