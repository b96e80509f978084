//! Shared pieces of the benchmarks: the machine limits measured once per run, and a line
//! that prints a measured figure next to its ratio to the limit that bounds it.

use dsv3_kernels::machine::Limits;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The benchmarks allocate as the `dsv3` program does: mimalloc, keeping the pages it frees
/// ([`dsv3_kernels::alloc`], set up by [`limits`], which every benchmark calls first). Its large
/// blocks start on a page; glibc's 16 bytes into one, and the FP8 GEMM's 16-lane loads of
/// such activations straddle cache lines (the routed experts of a 128-token prefill,
/// `gemm`'s `grouped_prefill`, measured 13% slower on glibc).
#[global_allocator]
static ALLOC: dsv3_kernels::alloc::MiMalloc = dsv3_kernels::alloc::MiMalloc;

/// The limits of this machine, measured once per benchmark process and printed when first used.
pub fn limits() -> &'static Limits {
    static L: OnceLock<Limits> = OnceLock::new();
    L.get_or_init(|| {
        dsv3_kernels::alloc::keep_freed_pages();
        let l = Limits::measure();
        println!("{}", l.describe());
        l
    })
}

/// What bounds a kernel: the bytes it must move, the FLOPs it must do, or both.
#[derive(Debug, Clone, Copy, Default)]
pub struct Work {
    /// Bytes read from memory plus bytes written.
    pub bytes: f64,
    /// Floating-point operations (an FMA counts as 2).
    pub flops: f64,
}

/// Median wall time of `reps` calls of `f` after one warm-up call.
pub fn median_time(reps: usize, mut f: impl FnMut()) -> Duration {
    f();
    let mut t: Vec<Duration> = (0..reps.max(1))
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed()
        })
        .collect();
    t.sort();
    t[t.len() / 2]
}

/// Prints `name: time, GB/s (ratio to read bandwidth), GFLOP/s (ratio to FMA peak)` and
/// returns the bandwidth ratio.
pub fn report(name: &str, work: Work, time: Duration) -> f64 {
    let l = limits();
    let s = time.as_secs_f64();
    let gbs = work.bytes / s / 1e9;
    let gflops = work.flops / s / 1e9;
    let bw_ratio = work.bytes / s / l.read_bytes_per_s;
    let fl_ratio = work.flops / s / l.fma_flops_per_s;
    let mut line = format!("{name:<48} {:>10.1} us", s * 1e6);
    if work.bytes > 0.0 {
        line += &format!("  {gbs:>8.2} GB/s = {:>5.1}% of read bw", 100.0 * bw_ratio);
    }
    if work.flops > 0.0 {
        line += &format!("  {gflops:>8.2} GFLOP/s = {:>5.1}% of FMA peak", 100.0 * fl_ratio);
    }
    println!("{line}");
    bw_ratio
}

/// The deterministic generator of the tests (`dsv3-testutil`), so benchmark inputs are the
/// same everywhere and need no extra dependency.
pub use dsv3_testutil::Rng;
