#!/usr/bin/env bash
# Server throughput against the offline batched-decode rate, on this machine, in one run.
#
#   scripts/bench-serve.sh [ROUNDS] [-- extra dsv3 model args, e.g. --device cuda]
#
# Each round runs, one after the other (so a noisy machine hits both alike):
#   1. `dsv3 bench --preset $PRESET --batch $CONC`: decode tokens/s of $CONC sequences stepped
#      together with nothing else in the loop (the offline limit a server can approach);
#   2. `dsv3 serve --preset $PRESET` and the bounded load test (`examples/load`): $CONC
#      concurrent greedy streams of $MAX_TOKENS tokens after $PROMPT-token prompts, 2 x $CONC
#      requests in all; output tokens/s over the whole run (prefills and ramp included), TTFT
#      and TPOT percentiles.
# and prints the ratio server / offline per round and the medians. Environment: PRESET (small),
# CONC (64), MAX_TOKENS (128), PROMPT (32), PROFILE (release).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
shift || true
[[ "${1:-}" == "--" ]] && shift
extra=("$@")
PRESET=${PRESET:-small} CONC=${CONC:-64} MAX_TOKENS=${MAX_TOKENS:-128} PROMPT=${PROMPT:-32} PROFILE=${PROFILE:-release}

cargo build --quiet --profile "$PROFILE" -p dsv3-cli --bin dsv3
cargo build --quiet --profile "$PROFILE" -p dsv3-server --example load
bin=target/$PROFILE
out=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$out"' EXIT
export DSV3_TOKENIZER_DIR=/nonexistent # token-id prompts: no tokenizer needed

json() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" "$@"; }

for r in $(seq "$rounds"); do
  "$bin/dsv3" bench --preset "$PRESET" --batch "$CONC" --prompt-tokens "$PROMPT" --decode-tokens 16 "${extra[@]}" \
    2>/dev/null | tail -1 > "$out/bench-$r.json"
  offline=$(json "$out/bench-$r.json" "d['batches'][0]['decode_tokens_per_s']")

  "$bin/dsv3" serve --preset "$PRESET" --port 0 --max-running "$CONC" --max-context $((PROMPT + MAX_TOKENS + 64)) \
    --cache-tokens $(((PROMPT + MAX_TOKENS + 64) * CONC * 2)) "${extra[@]}" 2> "$out/serve-$r.log" &
  pid=$!
  for _ in $(seq 3000); do
    grep -q "listening on" "$out/serve-$r.log" && break
    kill -0 $pid 2>/dev/null || { cat "$out/serve-$r.log"; exit 1; }
    sleep 0.1
  done
  url=$(sed -n 's/.*listening on \(http:[^ ]*\).*/\1/p' "$out/serve-$r.log" | head -1)
  "$bin/examples/load" --url "$url" --requests $((2 * CONC)) --concurrency "$CONC" --max-tokens "$MAX_TOKENS" \
    --prompt-tokens "$PROMPT" --time-limit 1800 --json | tail -1 > "$out/load-$r.json"
  kill -TERM $pid
  wait $pid
  server=$(json "$out/load-$r.json" "d['output_tokens_per_s']")
  errors=$(json "$out/load-$r.json" "d['errors']")
  ttft=$(json "$out/load-$r.json" "'%.2f / %.2f' % (d['ttft_p50_s'], d['ttft_p99_s'])")
  tpot=$(json "$out/load-$r.json" "'%.1f / %.1f' % (d['tpot_p50_s'] * 1e3, d['tpot_p99_s'] * 1e3)")
  ratio=$(python3 -c "print('%.2f' % ($server / $offline))")
  printf 'round %s: offline batch-%s decode %.1f tok/s | server %.1f tok/s (errors %s) | ratio %s | TTFT p50/p99 %s s | TPOT p50/p99 %s ms\n' \
    "$r" "$CONC" "$offline" "$server" "$errors" "$ratio" "$ttft" "$tpot"
  echo "$ratio" >> "$out/ratios"
done
echo "median ratio server / offline over $rounds rounds: $(sort -n "$out/ratios" | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}')"
