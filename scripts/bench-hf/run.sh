#!/usr/bin/env bash
# dsv3 and HF transformers side by side on the same checkpoint (see compare.py). Makes
# .venv-fixtures/ (the pinned torch + transformers of scripts/fixtures) on first use and builds
# dsv3 in release. Usage: scripts/bench-hf/run.sh (--preset NAME | MODEL_DIR) [compare.py options]
# With --preset, the random preset is written to a temporary directory first.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=$(scripts/fixtures/venv.sh)
cargo build --quiet --release -p dsv3-cli --bin dsv3
if [ "${1:-}" = "--preset" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  DSV3_TOKENIZER_DIR=/nonexistent ./target/release/dsv3 init-random --preset "$2" --out "$tmp/m" >&2
  dir=$tmp/m
  shift 2
else
  dir=$1
  shift
fi
"$PY" scripts/bench-hf/compare.py "$dir" ./target/release/dsv3 "$@"
