#!/usr/bin/env bash
# dsv3 and llama.cpp side by side on the CPU, on the same model and the same number of threads.
#
# Usage: scripts/bench-llamacpp/run.sh MODEL_DIR [--rounds 9] [--threads 2] [--prompt 16,128]
#          [--decode 64] [--dsv3-args "EXTRA DSV3 BENCH FLAGS"] [--idle 90] [--out DIR]
#
# 1. build.sh (llama-bench from the llama.cpp tree vendored in llama-cpp-python's sdist),
#    `cargo build --release` of dsv3, convert.sh (MODEL_DIR to GGUF BF16 and Q8_0, cached).
# 2. ROUNDS rounds; in each, every engine once, in alternating order (odd rounds dsv3, Q8_0,
#    BF16; even rounds the reverse), so slow drift of a shared machine hits all alike:
#    - dsv3: `RAYON_NUM_THREADS=T dsv3 bench --model MODEL_DIR --prompt-tokens P
#      --decode-tokens D --batch 1 DSV3_ARGS`, once per prompt size P; decode tok/s from the
#      run of the first P (D tokens after that prompt), prefill tok/s of each P.
#    - llama.cpp: `llama-bench -m GGUF -t T -p PROMPTS -n D -r 1 -o json` per format (its
#      decode, tg D, starts from an empty context; one warm-up run of each test first).
#    Before each engine's run it waits (up to 10 minutes) until the CPUs were at least --idle
#    percent idle over one second (0: do not wait): llama.cpp's threads spin at their barriers and
#    slow down many times over when another process takes a core, dsv3's less so, so a run
#    during a neighbour's job measures the neighbour. Each wait is logged to raw/idle.txt.
# 3. The Markdown table of compare.py: medians, min–max, ratios dsv3 / llama.cpp.
# Everything (results.jsonl, raw outputs, table.md) lands in --out (default
# .cache/llamacpp/runs/<time>/); the table goes to stdout too.
set -euo pipefail
cd "$(dirname "$0")/../.."
usage() { sed -n '4,5p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 1 ] || usage
case $1 in -h | --help) usage ;; esac
MODEL=$(realpath "$1")
shift
ROUNDS=9 THREADS=2 PROMPTS=16,128 DECODE=64 DSV3_ARGS="" OUT="" IDLE=90
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || { echo "$1 needs a value" >&2; exit 2; }
  case $1 in
    --rounds) ROUNDS=$2 ;;
    --threads) THREADS=$2 ;;
    --prompt) PROMPTS=$2 ;;
    --decode) DECODE=$2 ;;
    --dsv3-args) DSV3_ARGS=$2 ;;
    --out) OUT=$2 ;;
    --idle) IDLE=$2 ;;
    *) echo "unknown option $1" >&2; usage ;;
  esac
  shift 2
done
for v in "$ROUNDS" "$THREADS" "$DECODE"; do
  [[ $v =~ ^[1-9][0-9]*$ ]] || { echo "error: rounds, threads and decode must be positive integers, got '$v'" >&2; exit 2; }
done
if ! [[ $IDLE =~ ^[0-9]+$ ]] || [ "$IDLE" -gt 100 ]; then
  echo "error: --idle wants a percentage 0..100, got '$IDLE'" >&2
  exit 2
fi
[[ $PROMPTS =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || { echo "error: --prompt wants sizes like 16,128, got '$PROMPTS'" >&2; exit 2; }
[ -f "$MODEL/config.json" ] || { echo "error: $MODEL/config.json: no such file (not a model directory)" >&2; exit 1; }
say() { echo "[bench-llamacpp] $*" >&2; }

LLAMA_BENCH=$(scripts/bench-llamacpp/build.sh)
VERSION=$(sed -n 's/^VERSION=\([^ ]*\).*/\1/p' scripts/bench-llamacpp/build.sh)
LLAMA_COMMIT=$(git -C ".cache/llamacpp/llama_cpp_python-$VERSION/vendor/llama.cpp" rev-parse --short HEAD 2>/dev/null || echo '?')
say "building dsv3 (release)"
cargo build --quiet --release -p dsv3-cli --bin dsv3
DSV3=$PWD/target/release/dsv3
GGUF=$(scripts/bench-llamacpp/convert.sh "$MODEL")
OUT=${OUT:-.cache/llamacpp/runs/$(date +%Y%m%d-%H%M%S)}
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT")" ]; then
  echo "error: $OUT exists and is not empty (not overwritten)" >&2
  exit 1
fi
mkdir -p "$OUT/raw"
RESULTS=$OUT/results.jsonl
IFS=, read -r -a PS <<<"$PROMPTS"
read -r -a EXTRA <<<"$DSV3_ARGS"
COMPARE=(python3 scripts/bench-llamacpp/compare.py)

idle_pct() { # percent of CPU time idle over one second, from /proc/stat
  local a b
  read -r -a a < <(grep '^cpu ' /proc/stat)
  sleep 1
  read -r -a b < <(grep '^cpu ' /proc/stat)
  local total=0 i
  for i in 1 2 3 4 5 6 7 8; do total=$((total + b[i] - a[i])); done
  echo $((100 * (b[4] + b[5] - a[4] - a[5]) / (total > 0 ? total : 1)))
}
wait_idle() { # what
  [ "$IDLE" -gt 0 ] || return 0
  local start=$SECONDS p
  p=$(idle_pct)
  while [ "$p" -lt "$IDLE" ] && [ $((SECONDS - start)) -lt 600 ]; do
    say "waiting for the CPUs to be idle before $1 ($p % idle, want $IDLE %)"
    sleep 5
    p=$(idle_pct)
  done
  echo "$(date +%T) $p $((SECONDS - start)) $1" >>"$OUT/raw/idle.txt" # time, idle %, waited s, what
}

run_dsv3() { # round
  local p first=1
  for p in "${PS[@]}"; do
    local d=$DECODE flag=(--decode)
    if [ $first -eq 0 ]; then d=1 flag=(); fi # decode is taken from the first prompt size only
    local cmd=("$DSV3" bench --model "$MODEL" --prompt-tokens "$p" --decode-tokens "$d" --batch 1 "${EXTRA[@]}")
    echo "RAYON_NUM_THREADS=$THREADS ${cmd[*]}" >"$OUT/raw/r$1-dsv3-p$p.cmd"
    RAYON_NUM_THREADS=$THREADS "${cmd[@]}" >"$OUT/raw/r$1-dsv3-p$p.txt" 2>"$OUT/raw/r$1-dsv3-p$p.err"
    "${COMPARE[@]}" dsv3 "$RESULTS" "$1" "$p" "${flag[@]}" <"$OUT/raw/r$1-dsv3-p$p.txt"
    first=0
  done
}
run_llama() { # round format
  local name
  name="llama.cpp $(echo "$2" | tr '[:lower:]' '[:upper:]')"
  "$LLAMA_BENCH" -m "$GGUF/model-$2.gguf" -t "$THREADS" -p "$PROMPTS" -n "$DECODE" -r 1 -o json \
    >"$OUT/raw/r$1-llama-$2.json" 2>"$OUT/raw/r$1-llama-$2.err"
  "${COMPARE[@]}" llama "$RESULTS" "$1" "$name" <"$OUT/raw/r$1-llama-$2.json"
}

{
  echo "# dsv3 and llama.cpp side by side"
  echo
  echo "- command: scripts/bench-llamacpp/run.sh $MODEL --rounds $ROUNDS --threads $THREADS --prompt $PROMPTS --decode $DECODE${DSV3_ARGS:+ --dsv3-args \"$DSV3_ARGS\"}"
  echo "- model: $MODEL (vocab $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["vocab_size"])' "$MODEL/config.json")); GGUFs in $GGUF"
  echo "- dsv3 $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates || echo ' (+ uncommitted changes)'); llama.cpp $LLAMA_COMMIT (vendored in the sdist of llama-cpp-python $VERSION)"
  echo "- machine: $(nproc) CPUs, $(sed -n 's/^model name[^:]*: //p' /proc/cpuinfo | head -1); load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$OUT/table.md"

for r in $(seq 1 "$ROUNDS"); do
  if [ $((r % 2)) -eq 1 ]; then order=(dsv3 q8_0 bf16); else order=(bf16 q8_0 dsv3); fi
  for e in "${order[@]}"; do
    say "round $r/$ROUNDS: $e"
    wait_idle "round $r $e"
    if [ "$e" = dsv3 ]; then run_dsv3 "$r"; else run_llama "$r" "$e"; fi
  done
done

{
  echo "- load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
  if [ -f "$OUT/raw/idle.txt" ]; then
    awk -v want="$IDLE" '{ s += $3; if (NR == 1 || $2 < m) m = $2 } END {
      printf "- waited %d s in all for the CPUs to be %d %% idle; idle in the second before a run: %d %% at least\n", s, want, m }' "$OUT/raw/idle.txt"
  fi
  echo
  "${COMPARE[@]}" table "$RESULTS" --prompts "$PROMPTS"
} >>"$OUT/table.md"
cat "$OUT/table.md"
say "results in $OUT"
