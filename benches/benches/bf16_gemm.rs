//! The bf16 GEMM at decode shapes: V3's `lm_head` (129280 x 7168, 1.85 GB), the `small`
//! preset's `lm_head` (129280 x 1024) and the V3 router (256 x 7168), at M = 1 and 2 (a decode
//! step and an MTP verification step). Router weights rotate through copies beyond the
//! last-level cache; each `lm_head` is larger than it already. GB/s against the read bandwidth
//! measured in the same run.

use criterion::{Criterion, criterion_group, criterion_main};
use dsv3_benches::{Rng, Work, limits, median_time, report};
use dsv3_kernels::bf16_gemm::{self, Bf16Weight};
use dsv3_kernels::gemm::GemmShape;
use half::bf16;
use std::time::Duration;

const SHAPES: &[(&str, usize, usize)] = &[("lm_head_v3", 129_280, 7168), ("lm_head_small", 129_280, 1024), ("router_v3", 256, 7168)];
const WORKING_SET: usize = 768 << 20;

fn bench(c: &mut Criterion) {
    limits();
    let mut rng = Rng::new(2);
    for &(name, n, k) in SHAPES {
        let copies = (WORKING_SET / (2 * n * k)).clamp(1, 64);
        let ws: Vec<Bf16Weight> = (0..copies)
            .map(|_| Bf16Weight::new(n, k, (0..n * k).map(|_| bf16::from_f32(rng.f32() * 0.05)).collect()).expect("weight"))
            .collect();
        let mut g = c.benchmark_group(format!("bf16_gemm_{name}"));
        g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
        for m in [1usize, 2] {
            let a = rng.vec(m * k, 1.0);
            let mut out = vec![0f32; m * n];
            let mut i = 0;
            let mut step = || {
                let w = &ws[i % copies];
                i += 1;
                bf16_gemm::gemm_bf16(&a, w.view(), GemmShape { m, n, k }, &mut out).expect("gemm_bf16");
            };
            g.bench_function(format!("m{m}"), |b| b.iter(&mut step));
            let t = median_time((5 * copies).max(5), &mut step);
            let work = Work { bytes: (2 * n * k + 4 * (m * k + m * n)) as f64, flops: 2.0 * (m * n * k) as f64 };
            report(&format!("bf16_gemm {name} {n}x{k} m{m}"), work, t);
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
