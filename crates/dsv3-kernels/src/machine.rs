//! The limits of this machine, measured in the same run as a benchmark, so that every figure
//! can be printed as a ratio: streaming memory bandwidth and f32 FMA peak.

use rayon::prelude::*;
use std::hint::black_box;
use std::time::Instant;

/// Bytes of each buffer used for the bandwidth probes: far beyond any last-level cache.
pub const BANDWIDTH_PROBE_BYTES: usize = 1 << 30;

/// Runs of each bandwidth probe; the figure is their median.
pub const BANDWIDTH_PROBE_RUNS: usize = 9;

/// A rate measured several times: the median, and the slowest and fastest run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

impl Spread {
    /// The spread of `samples` (`None` when there are none or one is not finite).
    pub fn of(mut samples: Vec<f64>) -> Option<Spread> {
        if samples.is_empty() || samples.iter().any(|x| !x.is_finite()) {
            return None;
        }
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        let median = if n % 2 == 1 { samples[n / 2] } else { (samples[n / 2 - 1] + samples[n / 2]) / 2.0 };
        Some(Spread { median, min: samples[0], max: samples[n - 1], runs: n })
    }

    /// `(max - min) / median`: 0.1 means the runs lay within 10 % of the median's size.
    pub fn relative(&self) -> f64 {
        (self.max - self.min) / self.median
    }
}

/// Measured limits of this machine.
///
/// The bandwidths are medians of [`BANDWIDTH_PROBE_RUNS`] runs, not the best run: on a shared
/// machine the best of a few runs swung by almost 2x from one measurement to the next, which
/// made every ratio printed against it swing too. The spread says how far to trust it.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Read-only streaming bandwidth over all threads, bytes/s (median of the runs).
    pub read_bytes_per_s: f64,
    /// Copy bandwidth over all threads, counting bytes read plus bytes written, bytes/s
    /// (median of the runs).
    pub copy_bytes_per_s: f64,
    /// Every run of the read probe.
    pub read: Spread,
    /// Every run of the copy probe.
    pub copy: Spread,
    /// Best f32 FMA throughput over all threads at the widest ISA level the fast kernels use
    /// (see [`crate::cpu::isa_level`]), FLOP/s
    /// (one FMA = 2 FLOP).
    pub fma_flops_per_s: f64,
    pub threads: usize,
    pub isa: crate::cpu::IsaLevel,
}

impl Limits {
    /// Measures all limits (takes a few seconds and 2 GiB of memory). Call it right before
    /// the work it judges: on a shared machine the bandwidth changes from minute to minute.
    pub fn measure() -> Limits {
        let (read, copy) = measure_bandwidth_runs(BANDWIDTH_PROBE_BYTES, BANDWIDTH_PROBE_RUNS);
        Limits {
            read_bytes_per_s: read.median,
            copy_bytes_per_s: copy.median,
            read,
            copy,
            fma_flops_per_s: measure_fma_peak(),
            threads: crate::cpu::threads(),
            isa: crate::cpu::isa_level(),
        }
    }

    /// One line for benchmark output.
    pub fn describe(&self) -> String {
        format!(
            "machine limits ({} threads, {:?}): read {:.2} GB/s ({}), copy {:.2} GB/s (read+write; {}), f32 FMA peak {:.1} GFLOP/s",
            self.threads,
            self.isa,
            self.read_bytes_per_s / 1e9,
            describe_spread(&self.read),
            self.copy_bytes_per_s / 1e9,
            describe_spread(&self.copy),
            self.fma_flops_per_s / 1e9
        )
    }
}

fn describe_spread(s: &Spread) -> String {
    format!("median of {}, runs {:.2}-{:.2}, spread {:.0} %", s.runs, s.min / 1e9, s.max / 1e9, 100.0 * s.relative())
}

/// Best-of-`reps` read bandwidth and copy bandwidth (read + write bytes) on buffers of `bytes`.
pub fn measure_bandwidth(bytes: usize, reps: usize) -> (f64, f64) {
    let (read, copy) = measure_bandwidth_runs(bytes, reps);
    (read.max, copy.max)
}

/// `runs` runs of the read and of the copy probe on buffers of `bytes`, alternating (so a
/// change of load hits both alike).
pub fn measure_bandwidth_runs(bytes: usize, runs: usize) -> (Spread, Spread) {
    let n = bytes / 8;
    let src: Vec<u64> = (0..n as u64).into_par_iter().map(|i| i.wrapping_mul(0x9E37_79B9)).collect();
    let mut dst: Vec<u64> = vec![0; n];
    dst.par_chunks_mut(1 << 16).for_each(|c| c.fill(1));
    let chunk = (n / (crate::cpu::threads() * 8)).max(1 << 14);
    let (mut read, mut copy) = (Vec::new(), Vec::new());
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let s: u64 = src.par_chunks(chunk).map(sum_u64).reduce(|| 0, |a, b| a ^ b);
        black_box(s);
        read.push(bytes as f64 / t.elapsed().as_secs_f64().max(1e-9));
        let t = Instant::now();
        dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
        black_box(&dst);
        copy.push(2.0 * bytes as f64 / t.elapsed().as_secs_f64().max(1e-9));
    }
    // At least one finite sample each (the elapsed time is floored above 0).
    let none = Spread { median: 0.0, min: 0.0, max: 0.0, runs: 0 };
    (Spread::of(read).unwrap_or(none), Spread::of(copy).unwrap_or(none))
}

crate::cpu::dispatch! { fn sum_u64(x: &[u64]) -> u64 = sum_u64_body; }

#[inline(always)]
fn sum_u64_body(x: &[u64]) -> u64 {
    // Eight independent lanes so the loop is bound by loads, not by one add chain.
    let mut acc = [0u64; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            acc[i] = acc[i].wrapping_add(c[i]);
        }
    }
    let tail: u64 = chunks.remainder().iter().fold(0, |a, &b| a.wrapping_add(b));
    acc.iter().fold(tail, |a, &b| a.wrapping_add(b))
}

/// Best f32 FMA throughput of all threads, FLOP/s, with as many independent accumulators as
/// keep both FMA pipes busy.
pub fn measure_fma_peak() -> f64 {
    const ITERS: usize = 20_000_000;
    let threads = crate::cpu::threads();
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let flops: usize = (0..threads).into_par_iter().map(|i| fma_loop(black_box(1.0 + i as f32 * 1e-9), ITERS)).sum();
        best = best.max(flops as f64 / t.elapsed().as_secs_f64());
    }
    best
}

/// Runs `iters` rounds of 12 independent FMA chains of the widest vector the fast kernels use;
/// returns the FLOP count.
fn fma_loop(seed: f32, iters: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    match crate::cpu::isa_level() {
        // SAFETY: the CPU was checked at run time to have avx512f.
        crate::cpu::IsaLevel::Avx512 => return unsafe { fma_loop_avx512(seed, iters) },
        // SAFETY: the CPU was checked at run time to have avx2 and fma.
        crate::cpu::IsaLevel::Avx2Fma => return unsafe { fma_loop_avx2(seed, iters) },
        crate::cpu::IsaLevel::Baseline => {}
    }
    let mut acc = [seed; 8];
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = *a * 0.999_999 + 1e-7;
        }
    }
    black_box(acc);
    iters * 8 * 2
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fma_loop_avx2(seed: f32, iters: usize) -> usize {
    use std::arch::x86_64::*;
    const CHAINS: usize = 12;
    let mut acc = [_mm256_set1_ps(seed); CHAINS];
    let a = _mm256_set1_ps(black_box(0.999_999));
    let b = _mm256_set1_ps(black_box(1e-7));
    for _ in 0..iters {
        for c in acc.iter_mut() {
            *c = _mm256_fmadd_ps(*c, a, b);
        }
    }
    black_box(acc);
    iters * CHAINS * 8 * 2
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn fma_loop_avx512(seed: f32, iters: usize) -> usize {
    use std::arch::x86_64::*;
    const CHAINS: usize = 12;
    let mut acc = [_mm512_set1_ps(seed); CHAINS];
    let a = _mm512_set1_ps(black_box(0.999_999));
    let b = _mm512_set1_ps(black_box(1e-7));
    for _ in 0..iters {
        for c in acc.iter_mut() {
            *c = _mm512_fmadd_ps(*c, a, b);
        }
    }
    black_box(acc);
    iters * CHAINS * 16 * 2
}

#[cfg(test)]
mod tests {
    use super::Spread;

    #[test]
    fn spread_is_the_median_and_the_extremes() {
        let s = Spread::of(vec![3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.runs), (2.0, 1.0, 3.0, 3));
        assert_eq!(Spread::of(vec![4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert!((Spread::of(vec![9.0, 11.0, 10.0]).unwrap().relative() - 0.2).abs() < 1e-12);
        assert_eq!(Spread::of(vec![]), None);
        assert_eq!(Spread::of(vec![1.0, f64::NAN]), None);
    }
}
