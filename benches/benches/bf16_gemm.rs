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
        if n > 100_000 {
            // The int8-screened product (`--lm-head int8`): int8 codes + a scale per row, plus
            // the few candidate rows recomputed in bf16. Bytes: the codes and scales.
            let qs: Vec<Bf16Weight> = ws.iter().map(|w| w.clone().with_int8_screen()).collect();
            let a = rng.vec(k, 1.0);
            let mut out = vec![0f32; n];
            let mut i = 0;
            let mut step = || {
                let w = &qs[i % copies];
                i += 1;
                let q = w.int8_screen().expect("screen");
                bf16_gemm::gemm_bf16_screened(&a, w.view(), q, GemmShape { m: 1, n, k }, &mut out).expect("screened");
            };
            g.bench_function("m1_int8_screened", |b| b.iter(&mut step));
            let t = median_time((5 * copies).max(5), &mut step);
            let work = Work { bytes: (n * k + 4 * n + 4 * (k + n)) as f64, flops: 2.0 * (n * k) as f64 };
            report(&format!("bf16_gemm {name} {n}x{k} m1 int8-screened"), work, t);
            // Its logit error against the exact product on the same input.
            let mut exact = vec![0f32; n];
            let w = &ws[0];
            bf16_gemm::gemm_bf16(&a, w.view(), GemmShape { m: 1, n, k }, &mut exact).expect("gemm_bf16");
            bf16_gemm::gemm_bf16_screened(&a, w.view(), qs[0].int8_screen().expect("screen"), GemmShape { m: 1, n, k }, &mut out)
                .expect("screened");
            let d: Vec<f64> = exact.iter().zip(&out).map(|(e, g)| f64::from(e - g).abs()).collect();
            let sd = (exact.iter().map(|&e| f64::from(e) * f64::from(e)).sum::<f64>() / n as f64).sqrt();
            let rms = (d.iter().map(|x| x * x).sum::<f64>() / n as f64).sqrt();
            let best = |v: &[f32]| (0..n).fold(0, |b, i| if v[i] > v[b] { i } else { b });
            println!(
                "  int8 screen vs exact: {} of {n} logits recomputed exactly, max |err| {:.2e}, rms err {:.2e} (logit rms {:.2e}), arg-max equal: {}",
                d.iter().filter(|&&x| x == 0.0).count(),
                d.iter().cloned().fold(0.0, f64::max),
                rms,
                sd,
                best(&exact) == best(&out)
            );
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
