#!/usr/bin/env bash
# The whole test suite, as CI runs it (`.ci/run` calls exactly this). Needs only the Rust
# toolchain with cargo-nextest, and python3 (venv, pip) to install the pinned CUDA compiler
# from PyPI for the `cuda` feature's kernel build; no GPU, no model download.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== format"
cargo fmt --all --check

echo "== lints"
cargo clippy --workspace --all-targets --profile test-opt -- -D warnings

echo "== tests (optimised profile, so property tests stay fast on 2 cores)"
cargo nextest run --workspace --cargo-profile test-opt --no-fail-fast

echo "== kernel tests again on the narrower code paths (AVX2 only, then portable)"
# The fast kernels dispatch at run time to AVX-512, AVX2 or portable code; DSV3_ISA caps the
# level so that every path is tested on this one machine.
for isa in avx2 baseline; do
  DSV3_ISA=$isa cargo nextest run -p dsv3-kernels --cargo-profile test-opt --no-fail-fast
done

echo "== CUDA feature: pinned toolchain from PyPI, every kernel built for sm_90a (ptxas -v, fails on"
echo "   spills), lints, and the tests that need no GPU (the GPU ones are ignored: reported skipped)"
scripts/install-cuda-toolchain.sh
cargo clippy -p dsv3-kernels --features cuda --all-targets --profile test-opt -- -D warnings
cargo nextest run -p dsv3-kernels --features cuda --cargo-profile test-opt --test 'cuda_*' --no-fail-fast

echo "== benchmarks compile"
cargo bench --workspace --no-run
