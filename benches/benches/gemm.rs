//! FP8 matrix-vector and GEMM at DeepSeek-V3 shapes, M in {1, 8, 64}, both numeric paths.
//!
//! Weights rotate through enough copies to exceed the last-level cache (768 MiB or more), so
//! M = 1 measures memory, not cache. `DSV3_BENCH_SHAPE=NxK` narrows the run to one shape and
//! `DSV3_BENCH_M` sets the list of M (`DSV3_BENCH_M=1`, `DSV3_BENCH_M=1,8,64,256`). Each case
//! prints GB/s against the read bandwidth measured in the same run and GFLOP/s against the
//! measured FMA peak.

use criterion::{Criterion, criterion_group, criterion_main};
use dsv3_benches::{Rng, Work, limits, median_time, report};
use dsv3_kernels::fp8::Fp8Weight;
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

criterion_group!(benches, bench);
criterion_main!(benches);
