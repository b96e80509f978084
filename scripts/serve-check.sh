#!/usr/bin/env bash
# `dsv3 serve` end to end, as CI runs it: a tiny random model with the real DeepSeek tokenizer
# served on 127.0.0.1 (an ephemeral port), driven by the official `openai` Python package
# (pinned, in its own venv), then a bounded load test (requests capped in number and time) that
# prints throughput and TTFT/TPOT percentiles, then SIGTERM: the server must exit 0.
#
#   scripts/serve-check.sh [PROFILE]     (cargo profile of the binaries, default test-opt)
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${1:-test-opt}
VENV=.venv-openai
OPENAI=openai==3.60.0
if [[ ! -f "$VENV/.stamp" || "$(cat "$VENV/.stamp")" != "$OPENAI" ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$OPENAI"
  echo "$OPENAI" > "$VENV/.stamp"
fi
tok=$(scripts/fetch-tokenizer.sh)
cargo build --quiet --profile "$PROFILE" -p dsv3-cli --bin dsv3
cargo build --quiet --profile "$PROFILE" -p dsv3-server --example load
bin=target/$PROFILE

log=$(mktemp)
DSV3_TOKENIZER_DIR=$tok "$bin/dsv3" serve --preset tiny --port 0 --max-running 16 --max-context 1024 --cache-tokens 32768 2> "$log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 600); do
  grep -q "listening on" "$log" && break
  kill -0 $pid 2>/dev/null || { cat "$log"; echo "serve-check: dsv3 serve exited early" >&2; exit 1; }
  sleep 0.1
done
url=$(sed -n 's/.*listening on \(http:[^ ]*\).*/\1/p' "$log" | head -1)
[[ -n "$url" ]] || { cat "$log"; echo "serve-check: no address" >&2; exit 1; }
echo "== openai client against $url"
"$VENV/bin/python" scripts/serve/openai_client.py "$url/v1" tiny
echo "== load test (bounded: 96 requests, 16 at a time, at most 120 s)"
"$bin/examples/load" --url "$url" --requests 96 --concurrency 16 --max-tokens 32 --time-limit 120
echo "== SIGTERM"
kill -TERM $pid
wait $pid
echo "dsv3 serve exited 0 after SIGTERM"
