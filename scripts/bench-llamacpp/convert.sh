#!/usr/bin/env bash
# Converts a dsv3 model directory (FP8 checkpoint with 128x128 weight_scale_inv blocks,
# config.json, tokenizer.json / tokenizer_config.json) to GGUF BF16 and Q8_0 with the converter
# of the llama.cpp tree that build.sh unpacked (see convert.py for the FP8 dequantisation and the
# tokenizer fingerprint). The GGUFs are cached, never written into the model directory:
#   .cache/llamacpp/gguf/<key>/model-{bf16,q8_0}.gguf
# where <key> is a sha256 of the model directory's path, of every file's name, size and mtime,
# and of config.json, tokenizer.json and tokenizer_config.json, with the pinned version: a
# changed model gets a new key and a fresh conversion; a present GGUF is reused.
# Usage: scripts/bench-llamacpp/convert.sh MODEL_DIR     (prints the cache directory last)
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -eq 1 ] || { echo "usage: $0 MODEL_DIR" >&2; exit 2; }
MODEL=$(realpath "$1")
[ -f "$MODEL/config.json" ] || { echo "error: $MODEL/config.json: no such file (not a model directory)" >&2; exit 1; }
say() { echo "[bench-llamacpp/convert] $*" >&2; }

scripts/bench-llamacpp/build.sh >/dev/null
VERSION=$(sed -n 's/^VERSION=\([^ ]*\).*/\1/p' scripts/bench-llamacpp/build.sh)
SRC=.cache/llamacpp/llama_cpp_python-$VERSION/vendor/llama.cpp
KEY=$(
  {
    echo "$VERSION $MODEL"
    find "$MODEL" -maxdepth 1 -type f -printf '%f %s %T@\n' | LC_ALL=C sort
    cat "$MODEL/config.json" "$MODEL"/tokenizer*.json 2>/dev/null
  } | sha256sum | cut -c1-16
)
OUT=.cache/llamacpp/gguf/$KEY
mkdir -p "$OUT"
echo "$MODEL" >"$OUT/source.txt"
for t in bf16 q8_0; do
  if [ -f "$OUT/model-$t.gguf" ]; then
    say "$OUT/model-$t.gguf: already converted"
  else
    say "converting $MODEL to $OUT/model-$t.gguf"
    .venv-llamacpp/bin/python scripts/bench-llamacpp/convert.py "$SRC" "$MODEL" "$OUT/model-$t.gguf" --outtype "$t" >&2
  fi
done
echo "$PWD/$OUT"
