//! Shared by the `cuda_*` tests. A GPU test is `#[ignore = "needs a GPU; ..."]`, so that a
//! plain run reports it as skipped, and starts with [`gpu`]: with no usable GPU it prints
//! `SKIPPED: <reason>` and the test returns, unless `DSV3_REQUIRE_GPU` is set (the GPU check
//! sets it), where a missing GPU is a failure, never a pass.
#![allow(dead_code)]

use dsv3_kernels::Cuda;
use dsv3_kernels::cuda::CudaDevice;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// GPU 0, or `None` after printing why the test is skipped ([`Cuda::for_test`]).
pub fn gpu(test: &str) -> Option<CudaDevice> {
    Cuda::for_test(test).unwrap_or_else(|e| panic!("{test}: {e}")).map(Cuda::into_device)
}

/// GPU output against the CPU reference: same length, every value finite, and DeepGEMM's
/// `calc_diff < 1e-3` (the bound issue #6 sets); prints the measured value.
pub fn check_close(what: &str, gpu: &[f32], cpu: &[f32]) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    if let Some(i) = gpu.iter().position(|x| !x.is_finite()) {
        panic!("{what}: element {i} is {} (cpu {})", gpu[i], cpu[i]);
    }
    let d = dsv3_kernels::fp8::calc_diff(gpu, cpu);
    assert!(d < 1e-3, "{what}: calc_diff = {d}");
    println!("{what}: calc_diff = {d:.3e}");
}

/// A proptest runner with `cases` cases and no regression file (GPU cases are few and sized).
pub fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() })
}

/// Bitwise equality of two f32 slices (NaN equal to NaN), naming the first difference.
pub fn same_bits(what: &str, gpu: &[f32], cpu: &[f32]) -> Result<(), TestCaseError> {
    proptest::prop_assert_eq!(gpu.len(), cpu.len(), "{}: lengths", what);
    for (i, (a, b)) in gpu.iter().zip(cpu).enumerate() {
        let same = a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        proptest::prop_assert!(same, "{}: element {}: gpu {} ({:#x}) cpu {} ({:#x})", what, i, a, a.to_bits(), b, b.to_bits());
    }
    Ok(())
}

/// xorshift64* test data for the GPU GEMM tests.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// e4m3 codes, never NaN.
    pub fn codes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend(self.next().to_le_bytes().map(|c| if c & 0x7F == 0x7F { c ^ 1 } else { c }));
        }
        v.truncate(n);
        v
    }
    /// f32 activations `[rows, k]`, each row at its own magnitude (2^-3 .. 2^3), so the
    /// per-row 1x128 scales differ.
    pub fn acts(&mut self, rows: usize, k: usize) -> Vec<f32> {
        let mut v = Vec::with_capacity(rows * k);
        for r in 0..rows {
            let mag = (2f32).powi((r % 7) as i32 - 3);
            v.extend((0..k).map(|_| mag * (2.0 * self.unit() - 1.0)));
        }
        v
    }
    /// Positive scales, 2^-12 .. 2^-4.
    pub fn scales(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| (2f32).powf(-12.0 + 8.0 * (self.next() >> 40) as f32 / (1u64 << 24) as f32)).collect()
    }
}
