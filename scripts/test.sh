#!/usr/bin/env bash
# The whole test suite, as CI runs it (`.ci/run` calls exactly this). Needs only the Rust
# toolchain with cargo-nextest, python3 (venv, pip) to install the pinned CUDA compiler
# from PyPI for the `cuda` feature's kernel build, and root or sudo for apt-get (OpenMPI for
# the `mpi` feature, scripts/install-mpi.sh); no GPU, no model download.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== format"
cargo fmt --all --check

echo "== lints (every unsafe block has a SAFETY comment: [workspace.lints] in Cargo.toml)"
cargo clippy --workspace --all-targets --profile test-opt -- -D warnings
echo "== no unwrap in library, program and example code (tests may unwrap)"
cargo clippy --workspace --lib --bins --examples --profile test-opt -- -D warnings -D clippy::unwrap_used

echo "== tests (optimised profile, so property tests stay fast on 2 cores)"
cargo nextest run --workspace --cargo-profile test-opt --no-fail-fast

echo "== doctests (nextest does not run them), and the API docs build without warnings"
cargo test --doc --workspace --profile test-opt
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --profile test-opt

echo "== kernel tests and the model's batch invariance again on the narrower code paths (AVX2 only, then portable)"
# The fast kernels dispatch at run time to AVX-512, AVX2 or portable code; DSV3_ISA caps the
# level so that every path is tested on this one machine. Each path must be batch-invariant
# by itself, so the whole-model invariance test runs on each too.
for isa in avx2 baseline; do
  DSV3_ISA=$isa cargo nextest run -p dsv3-kernels --cargo-profile test-opt --no-fail-fast
  DSV3_ISA=$isa cargo nextest run -p dsv3-runtime --cargo-profile test-opt --test batch_invariance --no-fail-fast
done

echo "== CUDA feature: pinned toolchain from PyPI, every kernel built for sm_90a (ptxas -v, fails on"
echo "   spills), lints, and the tests that need no GPU (the GPU ones are ignored: reported skipped)"
scripts/install-cuda-toolchain.sh
cargo clippy -p dsv3-kernels --features cuda --all-targets --profile test-opt -- -D warnings
cargo clippy -p dsv3-kernels --features cuda --lib --profile test-opt -- -D warnings -D clippy::unwrap_used
cargo nextest run -p dsv3-kernels --features cuda --cargo-profile test-opt --test 'cuda_*' --no-fail-fast

echo "== a GPU-capable dsv3 (--features cuda) still runs without a GPU; --device cuda is one line"
cargo build --quiet --profile test-opt -p dsv3-cli --features cuda
mkdir -p target/cuda-cli && cp target/test-opt/dsv3 target/cuda-cli/dsv3
cuda_dsv3=target/cuda-cli/dsv3
DSV3_TOKENIZER_DIR=/nonexistent "$cuda_dsv3" generate --preset tiny --prompt-ids 1,2,3 --max-tokens 4
if DSV3_TOKENIZER_DIR=/nonexistent "$cuda_dsv3" generate --preset tiny --prompt-ids 1 --device cuda 2> target/cuda-cli/err.txt; then
  echo "--device cuda succeeded on a machine without a GPU?" >&2; exit 1
fi
cat target/cuda-cli/err.txt
if [[ $(wc -l < target/cuda-cli/err.txt) -ne 1 ]] || ! grep -q "^error: --device cuda:0: CUDA is unavailable" target/cuda-cli/err.txt; then
  echo "--device cuda without a GPU must be one line: error: --device cuda:0: CUDA is unavailable: ..." >&2; exit 1
fi

echo "== multi-process dsv3 under mpirun (feature mpi): OpenMPI from Debian, lints, then every"
echo "   EP x PP layout against one process, micro-batches in flight, failing/crashing/killed ranks"
scripts/install-mpi.sh
cargo clippy -p dsv3-dist -p dsv3-cli --features mpi --all-targets --profile test-opt -- -D warnings
cargo clippy -p dsv3-dist -p dsv3-cli --features mpi --lib --bins --profile test-opt -- -D warnings -D clippy::unwrap_used
cargo clippy -p dsv3-dist --features mpi,cuda --lib --profile test-opt -- -D warnings -D clippy::unwrap_used
scripts/mpi-check.sh test-opt

echo "== dsv3 serve end to end: the openai client, a bounded load test, SIGTERM"
scripts/serve-check.sh test-opt

echo "== benchmarks compile (in the test profile: a second optimised build would double target/)"
cargo bench --workspace --no-run --profile test-opt

echo "== disk used by the build (CI's disk is not large: keep this well under 5 GB)"
du -sh target 2>/dev/null || true
