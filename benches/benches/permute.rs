//! MoE dispatch at DeepSeek-V3 sizes: hidden 7168, 256 experts, top-8, 64 and 1024 tokens.
//! Plan building, permute (token → expert order) and the weighted un-permute (combine).
//!
//! Bytes counted are the unique bytes each kernel must move (read + written): permute reads
//! x once and writes one row per pair (a token's k copies read the same x row, from cache);
//! un-permute reads one row and one weight per pair and writes one row per token. At 64
//! tokens the buffers are partly cache-resident, so the ratio to DRAM bandwidth can pass 100%.

use criterion::{Criterion, criterion_group, criterion_main};
use dsv3_benches::{Rng, Work, limits, median_time, report};
use dsv3_kernels::permute::{self, DispatchPlan, PlanShape};
use std::time::Duration;

const HIDDEN: usize = 7168;
const EXPERTS: usize = 256;
const TOP_K: usize = 8;

/// `top_k` distinct random experts per token, as a router gives.
fn random_ids(rng: &mut Rng, tokens: usize) -> Vec<u32> {
    let mut ids = Vec::with_capacity(tokens * TOP_K);
    for _ in 0..tokens {
        let start = ids.len();
        while ids.len() < start + TOP_K {
            let e = (rng.u64() % EXPERTS as u64) as u32;
            if !ids[start..].contains(&e) {
                ids.push(e);
            }
        }
    }
    ids
}

fn bench(c: &mut Criterion) {
    limits();
    let mut rng = Rng::new(4);
    let mut g = c.benchmark_group("permute");
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    for tokens in [64usize, 1024] {
        let pairs = tokens * TOP_K;
        let shape = PlanShape { tokens, top_k: TOP_K, n_experts: EXPERTS };
        let ids = random_ids(&mut rng, tokens);
        let x = rng.vec(tokens * HIDDEN, 1.0);
        let w = rng.vec(pairs, 1.0);
        let plan = DispatchPlan::build(shape, &ids).expect("plan");
        let mut p = vec![0f32; pairs * HIDDEN];
        let mut out = vec![0f32; tokens * HIDDEN];
        let reps = if tokens > 100 { 10 } else { 50 };

        let mut build = || {
            std::hint::black_box(DispatchPlan::build(shape, &ids).expect("plan"));
        };
        g.bench_function(format!("plan_t{tokens}"), |b| b.iter(&mut build));
        let work = Work { bytes: (4 * pairs + 12 * pairs + 8 * EXPERTS) as f64, flops: 0.0 };
        report(&format!("dispatch plan e256 top8 t{tokens}"), work, median_time(reps * 10, &mut build));

        let mut perm = || permute::permute(&plan, HIDDEN, &x, &mut p).expect("permute");
        g.bench_function(format!("permute_t{tokens}"), |b| b.iter(&mut perm));
        let work = Work { bytes: (4 * (tokens + pairs) * HIDDEN + 4 * pairs) as f64, flops: 0.0 };
        report(&format!("permute h7168 top8 t{tokens}"), work, median_time(reps, &mut perm));

        let mut unperm = || permute::unpermute(&plan, HIDDEN, &p, &w, &mut out).expect("unpermute");
        g.bench_function(format!("unpermute_t{tokens}"), |b| b.iter(&mut unperm));
        let work = Work { bytes: (4 * (pairs * HIDDEN + pairs + tokens * HIDDEN)) as f64, flops: (2 * pairs * HIDDEN) as f64 };
        report(&format!("unpermute h7168 top8 t{tokens}"), work, median_time(reps, &mut unperm));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
