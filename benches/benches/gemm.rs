//! FP8 matrix-vector and GEMM at DeepSeek-V3 shapes, M in {1, 8, 64}, both numeric paths; and
//! the routed experts' grouped GEMMs of one MoE layer at a 128-token prefill (`grouped_prefill`).
//!
//! Weights rotate through enough copies to exceed the last-level cache (768 MiB or more), so
//! M = 1 measures memory, not cache. `DSV3_BENCH_SHAPE=NxK` narrows the run to one shape and
//! `DSV3_BENCH_M` sets the list of M (`DSV3_BENCH_M=1`, `DSV3_BENCH_M=1,8,64,256`). Each case
//! prints GB/s against the read bandwidth measured in the same run and GFLOP/s against the
//! measured FMA peak.

use criterion::{Criterion, criterion_group, criterion_main};
use dsv3_benches::{Rng, Work, limits, median_time, report};
use dsv3_kernels::fp8::{Fp8Weight, Fp8WeightRef};
use dsv3_kernels::gemm::{self, GemmPath, GemmShape};
use std::time::Duration;

const SHAPES: &[(usize, usize)] = &[(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)];
/// Bytes of weights cycled through per shape: well beyond a 260 MiB L3. Every shape gets at
/// least this much (up to 64 copies): with fewer copies the small shapes' working set came
/// close to the L3 and their M = 1 figures were inflated by cache hits.
const WORKING_SET: usize = 768 << 20;

fn random_fp8(rng: &mut Rng, n: usize, k: usize) -> Fp8Weight {
    // Random codes (no NaN) and scales directly: quantising 768 MiB of f32 would dominate.
    let data = (0..n * k).map(|_| (rng.u64() as u8) & 0xF7).collect();
    let scales = (0..n.div_ceil(128) * k.div_ceil(128)).map(|_| 1e-3 * (1.5 + rng.f32())).collect();
    Fp8Weight::new(n, k, data, scales).expect("valid random weight")
}

fn bench(c: &mut Criterion) {
    limits();
    let mut rng = Rng::new(1);
    let only: Option<String> = std::env::var("DSV3_BENCH_SHAPE").ok();
    for &(n, k) in SHAPES {
        if only.as_deref().is_some_and(|o| o != format!("{n}x{k}")) {
            continue;
        }
        let copies = WORKING_SET.div_ceil(n * k).clamp(1, 64);
        let ws: Vec<Fp8Weight> = (0..copies).map(|_| random_fp8(&mut rng, n, k)).collect();
        let mut g = c.benchmark_group(format!("gemm_{n}x{k}"));
        g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
        let ms: Vec<usize> = match std::env::var("DSV3_BENCH_M") {
            Ok(list) => list.split(',').map(|v| v.trim().parse().expect("DSV3_BENCH_M: a comma-separated list of M")).collect(),
            Err(_) => vec![1, 8, 64],
        };
        for m in ms {
            let a = rng.vec(m * k, 1.0);
            let mut out = vec![0f32; m * n];
            for path in [GemmPath::Reference, GemmPath::Fp8] {
                let name = format!("m{m}_{path:?}").to_lowercase();
                let mut i = 0;
                let mut step = || {
                    let w = &ws[i % copies];
                    i += 1;
                    gemm::gemm(&a, w.view(), GemmShape { m, n, k }, path, &mut out).expect("gemm");
                };
                g.bench_function(&name, |b| b.iter(&mut step));
                // Compute-bound cases need fewer repetitions than the memory-bound ones.
                let t = median_time(if m <= 8 { 5 * copies } else { 2 * copies }, &mut step);
                let work = Work { bytes: (n * k + 4 * (m * k + m * n)) as f64, flops: 2.0 * (m * n * k) as f64 };
                report(&format!("gemm {n}x{k} {name}"), work, t);
            }
        }
        g.finish();
    }
}

/// The routed experts of one MoE layer of the `small` preset (and of the 32K model of
/// `scripts/bench-llamacpp/`) at a 128-token prefill: 128 tokens x top-8 of 64 experts, each
/// token's 8 distinct experts drawn uniformly (as a random model routes; ~16 rows per expert,
/// from a few to ~30), gate + up as one paired grouped GEMM `[rows, 1024] x [384, 1024]ᵀ`, then
/// down `[rows, 384] x [1024, 384]ᵀ`. The experts rotate through `COPIES` layers' worth
/// (300 MB) so the weights come from memory, as they do in a prefill. Narrow it with
/// `DSV3_BENCH_SHAPE=grouped_prefill` (any other shape name skips it).
fn grouped_prefill(c: &mut Criterion) {
    const COPIES: usize = 4;
    let (experts, hidden, inter, tokens, top_k) = (64, 1024, 384, 128, 8);
    if std::env::var("DSV3_BENCH_SHAPE").is_ok_and(|o| o != "grouped_prefill") {
        return;
    }
    limits();
    let mut rng = Rng::new(3);
    let layers: Vec<[Vec<Fp8Weight>; 3]> = (0..COPIES)
        .map(|_| {
            let mut set = |n, k| (0..experts).map(|_| random_fp8(&mut rng, n, k)).collect::<Vec<_>>();
            [set(inter, hidden), set(inter, hidden), set(hidden, inter)]
        })
        .collect();
    let views: Vec<[Vec<Fp8WeightRef<'_>>; 3]> =
        layers.iter().map(|l| l.each_ref().map(|set| set.iter().map(|w| w.view()).collect())).collect();
    let mut counts = vec![0u32; experts];
    for _ in 0..tokens {
        let mut picked = Vec::with_capacity(top_k);
        while picked.len() < top_k {
            let e = rng.below(experts);
            if !picked.contains(&e) {
                picked.push(e);
            }
        }
        picked.iter().for_each(|&e| counts[e] += 1);
    }
    let mut offsets = vec![0u32; experts + 1];
    for e in 0..experts {
        offsets[e + 1] = offsets[e] + counts[e];
    }
    let rows = tokens * top_k;
    let (x, h) = (rng.vec(rows * hidden, 1.0), rng.vec(rows * inter, 1.0));
    let (mut gate, mut up, mut down) = (vec![0f32; rows * inter], vec![0f32; rows * inter], vec![0f32; rows * hidden]);
    let (lo, hi) = (counts.iter().min().copied().unwrap_or(0), counts.iter().max().copied().unwrap_or(0));
    println!("grouped_prefill: {experts} experts, {rows} routed rows, {lo}-{hi} rows per expert, {COPIES} layers of weights");
    let mut g = c.benchmark_group("grouped_prefill");
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    for path in [GemmPath::Reference, GemmPath::Fp8] {
        let name = format!("{path:?}").to_lowercase();
        let mut i = 0;
        let mut step = || {
            let [vg, vu, vd] = &views[i % COPIES];
            i += 1;
            gemm::grouped_contiguous_pair(&x, &offsets, [vg, vu], path, [&mut gate, &mut up]).expect("gate and up");
            gemm::grouped_contiguous(&h, &offsets, vd, path, &mut down).expect("down");
        };
        g.bench_function(&name, |b| b.iter(&mut step));
        let t = median_time(4 * COPIES, &mut step);
        let weights = (experts * 3 * hidden * inter) as f64;
        let work =
            Work { bytes: weights + 4.0 * (rows * (2 * hidden + 3 * inter)) as f64, flops: 2.0 * (rows * 3 * hidden * inter) as f64 };
        report(&format!("grouped_prefill {name}"), work, t);
    }
    g.finish();
}

criterion_group!(benches, bench, grouped_prefill);
criterion_main!(benches);
