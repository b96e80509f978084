//! The limits of this machine, measured in the same run as a benchmark, so that every figure
//! can be printed as a ratio: streaming memory bandwidth and f32 FMA peak.

use rayon::prelude::*;
use std::hint::black_box;
use std::time::Instant;

/// Bytes of each buffer used for the bandwidth probes: far beyond any last-level cache.
pub const BANDWIDTH_PROBE_BYTES: usize = 1 << 30;

/// Measured limits of this machine.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Best read-only streaming bandwidth over all threads, bytes/s.
    pub read_bytes_per_s: f64,
    /// Best copy bandwidth over all threads, counting bytes read plus bytes written, bytes/s.
    pub copy_bytes_per_s: f64,
    /// Best f32 FMA throughput over all threads at the widest ISA level the fast kernels use
    /// (see [`crate::cpu::isa_level`]), FLOP/s
    /// (one FMA = 2 FLOP).
    pub fma_flops_per_s: f64,
    pub threads: usize,
    pub isa: crate::cpu::IsaLevel,
}

impl Limits {
    /// Measures all limits (takes about two seconds and 2 GiB of memory).
    pub fn measure() -> Limits {
        let (read, copy) = measure_bandwidth(BANDWIDTH_PROBE_BYTES, 5);
        Limits {
            read_bytes_per_s: read,
            copy_bytes_per_s: copy,
            fma_flops_per_s: measure_fma_peak(),
            threads: crate::cpu::threads(),
            isa: crate::cpu::isa_level(),
        }
    }

    /// One line for benchmark output.
    pub fn describe(&self) -> String {
        format!(
            "machine limits ({} threads, {:?}): read {:.2} GB/s, copy {:.2} GB/s (read+write), f32 FMA peak {:.1} GFLOP/s",
            self.threads,
            self.isa,
            self.read_bytes_per_s / 1e9,
            self.copy_bytes_per_s / 1e9,
            self.fma_flops_per_s / 1e9
        )
    }
}

/// Best-of-`reps` read bandwidth and copy bandwidth (read + write bytes) on buffers of `bytes`.
pub fn measure_bandwidth(bytes: usize, reps: usize) -> (f64, f64) {
    let n = bytes / 8;
    let src: Vec<u64> = (0..n as u64).into_par_iter().map(|i| i.wrapping_mul(0x9E37_79B9)).collect();
    let mut dst: Vec<u64> = vec![0; n];
    dst.par_chunks_mut(1 << 16).for_each(|c| c.fill(1));
    let chunk = (n / (crate::cpu::threads() * 8)).max(1 << 14);
    let mut best_read = 0f64;
    let mut best_copy = 0f64;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        let s: u64 = src.par_chunks(chunk).map(sum_u64).reduce(|| 0, |a, b| a ^ b);
        black_box(s);
        best_read = best_read.max(bytes as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
        black_box(&dst);
        best_copy = best_copy.max(2.0 * bytes as f64 / t.elapsed().as_secs_f64());
    }
    (best_read, best_copy)
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
