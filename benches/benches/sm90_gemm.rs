//! GPU benchmark of `sm90_fp8_gemm` (TMA + wgmma FP8 GEMM): every DeepSeek-V3 (N, K) dense at
//! decode and prefill M, and the expert shapes grouped (contiguous, masked). Timed with CUDA
//! events around one launch, L2 flushed (a buffer larger than L2 zeroed) before each run,
//! median of 10. Each line prints TFLOPS and its ratio to the H200's FP8 dense peak
//! (1979 TFLOPS), and effective GB/s (A, B, scales, out, each moved once) against the
//! device-to-device copy bandwidth measured in the same run and the 4.8 TB/s nominal HBM.
//!
//! Needs the `cuda` feature and a GPU: `cargo bench -p dsv3-benches --features cuda --bench
//! sm90_gemm` (scripts/gpu-check/build.sh packages it). Without either it prints SKIPPED;
//! with DSV3_REQUIRE_GPU set a missing GPU is a failure.

use dsv3_kernels::Result;
use dsv3_kernels::cuda::sm90_gemm::{Sm90Layout, Sm90Out, Sm90Route};
use dsv3_kernels::cuda::{CudaDevice, DeviceBuf};
use dsv3_kernels::fp8::Fp8WeightRef;

const PEAK_TFLOPS: f64 = 1979.0;
const HBM_GBS: f64 = 4800.0;
const REPS: usize = 10;

fn main() {
    let dev = match CudaDevice::new(0) {
        Ok(d) => d,
        Err(e) => {
            if std::env::var_os("DSV3_REQUIRE_GPU").is_some() {
                eprintln!("sm90_gemm bench: DSV3_REQUIRE_GPU is set, but {e}");
                std::process::exit(1);
            }
            println!("SKIPPED: sm90_gemm bench: {e}");
            return;
        }
    };
    if let Err(e) = run(&dev) {
        eprintln!("sm90_gemm bench: {e}");
        std::process::exit(1);
    }
}

/// xorshift64*: e4m3 codes (never NaN) and positive scales.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn codes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend(self.next().to_le_bytes().map(|c| if c & 0x7F == 0x7F { c ^ 1 } else { c }));
        }
        v.truncate(n);
        v
    }
    fn scales(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| 2f32.powi(-8 - (self.next() % 4) as i32)).collect()
    }
}

struct Bench<'a> {
    dev: &'a CudaDevice,
    flush: DeviceBuf<u8>,
    copy_gbs: f64,
}

/// Median GPU milliseconds of `f`, L2 flushed (`flush` zeroed) before each run.
fn time(dev: &CudaDevice, flush: &mut DeviceBuf<u8>, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up (and first-launch costs)
    let mut t = Vec::with_capacity(REPS);
    for _ in 0..REPS {
        dev.sm90_zero(flush)?;
        t.push(dev.sm90_time_ms(f)? as f64);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[REPS / 2])
}

impl Bench<'_> {
    fn line(&self, name: &str, route: Sm90Route, ms: f64, flops: f64, bytes: f64) {
        let tflops = flops / ms / 1e9;
        let gbs = bytes / ms / 1e6;
        let route = match route {
            Sm90Route::Tma(c) => format!("tma {}x{}x128 {}st", c.block_m, c.block_n, c.stages),
            Sm90Route::Fallback(why) => format!("fallback {why:?}"),
        };
        println!(
            "{name:<44} {route:<22} {:>9.1} us  {tflops:>7.1} TFLOPS = {:>5.1}% of peak  {gbs:>7.0} GB/s = {:>5.1}% of copy, {:>5.1}% of HBM",
            ms * 1e3,
            100.0 * tflops / PEAK_TFLOPS,
            100.0 * gbs / self.copy_gbs,
            100.0 * gbs / HBM_GBS,
        );
    }

    /// One GEMM of weights [n, k] (one per group) in `layout`.
    fn case(&mut self, name: &str, n: usize, k: usize, layout: Sm90Layout<'_>) -> Result<()> {
        // Groups, rows of A and out, and rows that hold data.
        let (groups, rows, data) = match layout {
            Sm90Layout::Dense { m } => (1, m, m),
            Sm90Layout::Contiguous { offsets } => {
                let rows = offsets.last().copied().unwrap_or(0) as usize;
                (offsets.len() - 1, rows, rows)
            }
            Sm90Layout::Masked { counts, capacity } => (counts.len(), counts.len() * capacity, counts.iter().map(|&c| c as usize).sum()),
        };
        let mut rng = Rng(0x5eed ^ (n * 31 + k) as u64);
        let (w, ws) = (rng.codes(groups * n * k), rng.scales(groups * n.div_ceil(128) * (k / 128)));
        let (wd, sd) = (n * k, n.div_ceil(128) * (k / 128));
        let refs: Vec<Fp8WeightRef<'_>> =
            (0..groups).map(|g| Fp8WeightRef::new(n, k, &w[g * wd..(g + 1) * wd], &ws[g * sd..(g + 1) * sd])).collect::<Result<_>>()?;
        let stack = self.dev.upload_fp8_stack(&refs)?;
        let a_q = self.dev.upload(&rng.codes(rows * k))?;
        let a_s = self.dev.upload(&rng.scales(rows * k / 128))?;
        let dev = self.dev;
        for bf16 in [false, true] {
            let mut route = None;
            let ms = if bf16 {
                let mut out = dev.zeros::<half::bf16>(rows * n)?;
                time(dev, &mut self.flush, &mut || {
                    route = Some(dev.sm90_fp8_gemm(&a_q, &a_s, &stack, layout, Sm90Out::Bf16(&mut out))?);
                    Ok(())
                })?
            } else {
                let mut out = dev.zeros::<f32>(rows * n)?;
                time(dev, &mut self.flush, &mut || {
                    route = Some(dev.sm90_fp8_gemm(&a_q, &a_s, &stack, layout, Sm90Out::F32(&mut out))?);
                    Ok(())
                })?
            };
            let out_bytes = if bf16 { 2.0 } else { 4.0 };
            let flops = 2.0 * (data * n * k) as f64;
            let bytes = (data * k + data * k / 32 + groups * (n * k + 4 * sd)) as f64 + out_bytes * (rows * n) as f64;
            let name = format!("{name} {}", if bf16 { "bf16" } else { "f32" });
            if let Some(r) = route {
                self.line(&name, r, ms, flops, bytes);
            }
        }
        Ok(())
    }
}

fn run(dev: &CudaDevice) -> Result<()> {
    println!("# sm90_fp8_gemm on {} ({} SMs)", dev.name(), dev.sm90_sm_count()?);
    // Copy bandwidth: 1 GiB device to device, best of 5 (bytes read + bytes written).
    const GIB: usize = 1 << 30;
    let best = {
        let src = dev.zeros::<u8>(GIB)?;
        let mut dst = dev.zeros::<u8>(GIB)?;
        dev.sm90_copy(&src, &mut dst)?;
        let mut best = f64::MAX;
        for _ in 0..5 {
            best = best.min(dev.sm90_time_ms(&mut || dev.sm90_copy(&src, &mut dst))? as f64);
        }
        best
    }; // both buffers freed before the cases
    let copy_gbs = 2.0 * GIB as f64 / best / 1e6;
    println!(
        "# measured copy bandwidth: {copy_gbs:.0} GB/s ({:.1}% of 4.8 TB/s); FP8 dense peak taken as {PEAK_TFLOPS} TFLOPS",
        100.0 * copy_gbs / HBM_GBS
    );
    let mut b = Bench { dev, flush: dev.zeros::<u8>(512 << 20)?, copy_gbs };

    for &(n, k) in dsv3_kernels::gemm::V3_SHAPES {
        for m in [1usize, 64, 128, 4096] {
            b.case(&format!("dense {n}x{k} m={m}"), n, k, Sm90Layout::Dense { m })?;
        }
    }
    // Experts: prefill (contiguous, 8 experts x 2048 rows, uneven) and decode (masked, 32
    // experts, capacity 128, 1..128 rows each).
    for (n, k) in [(4096usize, 7168usize), (7168, 2048)] {
        let sizes = [2048u32, 1900, 2200, 2048, 1024, 3072, 2048, 2048];
        let mut offsets = vec![0u32];
        for s in sizes {
            offsets.push(offsets.last().copied().unwrap_or(0) + s);
        }
        b.case(&format!("contiguous {n}x{k} 8x~2048"), n, k, Sm90Layout::Contiguous { offsets: &offsets })?;
        let counts: Vec<u32> = (0..32u32).map(|e| 1 + (e * 37) % 128).collect();
        b.case(&format!("masked {n}x{k} 32x cap 128"), n, k, Sm90Layout::Masked { counts: &counts, capacity: 128 })?;
    }
    Ok(())
}
