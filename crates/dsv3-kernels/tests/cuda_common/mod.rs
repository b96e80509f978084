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
