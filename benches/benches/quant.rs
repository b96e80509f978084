//! Per-token 1x128 activation quantisation at DeepSeek-V3 widths.

use criterion::{Criterion, criterion_group, criterion_main};
use dsv3_benches::{Rng, Work, limits, median_time, report};
use dsv3_kernels::fp8::{self, ActQuantShape, ScaleFmt};
use std::time::Duration;

fn bench(c: &mut Criterion) {
    limits();
    let mut rng = Rng::new(2);
    let mut g = c.benchmark_group("act_quant");
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    for (rows, cols) in [(1usize, 7168usize), (64, 7168), (4096, 7168), (4096, 2048)] {
        let x = rng.vec(rows * cols, 1.0);
        let shape = ActQuantShape { rows, cols };
        let (mut q, mut s) = (vec![0u8; rows * cols], vec![0f32; rows * cols / 128]);
        let mut step = || fp8::act_quant(&x, shape, ScaleFmt::Float, &mut q, &mut s).expect("act_quant");
        g.bench_function(format!("{rows}x{cols}"), |b| b.iter(&mut step));
        let work = Work { bytes: (rows * cols * 5 + rows * cols / 32) as f64, flops: 0.0 };
        report(&format!("act_quant {rows}x{cols}"), work, median_time(20, &mut step));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
