#!/usr/bin/env bash
# The whole test suite, as CI runs it (`.ci/run` calls exactly this). Needs only the Rust
# toolchain with cargo-nextest; no GPU, no model download.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== format"
cargo fmt --all --check

echo "== lints"
cargo clippy --workspace --all-targets --profile test-opt -- -D warnings

echo "== tests (optimised profile, so property tests stay fast on 2 cores)"
cargo nextest run --workspace --cargo-profile test-opt --no-fail-fast

echo "== benchmarks compile"
cargo bench --workspace --no-run
