#!/usr/bin/env bash
# Runs on the GPU machine, from the gpu-check/ folder that build.sh made, in this order (the
# most informative first, so a check cut short by its time limit still says the most):
#   1. the `dsv3` program end to end on the GPU (e2e.py): greedy ids of `generate --device
#      cuda` against `--device cpu` on the tiny presets (both GEMM paths, --mtp, a sampled
#      run), the golden fixtures through `dsv3 logits --device cuda` on both GEMM paths
#      against HF's stored logits, and a `dsv3 serve --device cuda` smoke test;
#   2. every GPU test of every test binary, one at a time, ignored (GPU) tests included and
#      DSV3_REQUIRE_GPU=1 set, so a missing or unusable GPU is a failure, never a pass;
#   3. `dsv3 bench --device cuda` on the `bench` preset (true V3 widths) at batch 1, 8, 64,
#      with decode graphs and without, then every benchmark in bench/ once.
# Writes $OUT/gpu-check-report.txt (device, ptxas' kernel report, PASS/FAIL per check, the
# benchmark figures) and $OUT/logs.tar.gz (one log per check); exits non-zero on any failure.
# Usage: gpu-check/run.sh [per-test timeout in seconds, default 300]
set -uo pipefail
cd "$(dirname "$0")"
# build.sh ships the binaries gzipped; unpack them next to this script once.
if [ ! -d bin ] && [ -f payload.tar.gz ]; then
  tar -xzf payload.tar.gz || { echo "gpu-check: cannot unpack payload.tar.gz" >&2; exit 2; }
fi
OUT=${OUT:-$PWD/out}
LIMIT=${1:-300}
WORK=$(mktemp -d)
LOGS=$WORK/logs
mkdir -p "$OUT" "$LOGS"
export DSV3_REQUIRE_GPU=1
# NCCL (cuda_nccl): the GPU machine's PyTorch ships libnccl in its nvidia-nccl wheel.
nccl=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null || true)
[ -n "$nccl" ] && export LD_LIBRARY_PATH="$nccl${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
report=$OUT/gpu-check-report.txt
started=$(date +%s)
elapsed() { echo "$(( $(date +%s) - started ))s"; }
{
  echo "# dsv3 GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
  echo
  echo "## ptxas (sm_90a)"
  cat kernel-report.txt
} > "$report"

pass=0
fail=0
count() { # count <exit status of a check that prints PASS/FAIL lines>
  pass=$((pass + $(grep -c '^PASS' "$1" || true)))
  fail=$((fail + $(grep -c '^FAIL' "$1" || true)))
}

# 1. End to end.
DSV3=$PWD/e2e/dsv3
{ echo; echo "## 1. dsv3 end to end on the GPU ($(elapsed))"; } >> "$report"
for part in generate golden-v3 golden-v2lite serve; do
  log="$LOGS/e2e-$part.log"
  case $part in
    generate) args=(generate "$DSV3" "$WORK") ;;
    golden-v3) args=(golden "$DSV3" "$PWD/e2e/hf-v3-tiny" "$WORK") ;;
    golden-v2lite) args=(golden "$DSV3" "$PWD/e2e/hf-v2lite-tiny" "$WORK") ;;
    serve) args=(serve "$DSV3" "$WORK") ;;
  esac
  timeout "$LIMIT" python3 e2e/e2e.py "${args[@]}" > "$log" 2>&1
  rc=$?
  grep -E '^(PASS|FAIL)' "$log" | tee -a "$report"
  count "$log"
  if [ $rc -ne 0 ] && ! grep -q '^FAIL' "$log"; then
    echo "FAIL  e2e::$part (exit $rc)" | tee -a "$report"
    tail -5 "$log" | sed 's/^/    /' | tee -a "$report"
    fail=$((fail + 1))
  fi
done

# 2. The GPU tests.
{ echo; echo "## 2. GPU tests ($(elapsed))"; } >> "$report"
for bin in bin/*; do
  for t in $("$bin" --list 2>/dev/null | sed -n 's/: test$//p'); do
    log="$LOGS/$(basename "$bin").$t.log"
    start=$(date +%s.%N)
    timeout "$LIMIT" "$bin" --include-ignored --exact "$t" --nocapture --test-threads 1 > "$log" 2>&1
    rc=$?
    secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    if [ $rc -eq 0 ] && grep -q "test result: ok. 1 passed" "$log"; then
      verdict=PASS
      pass=$((pass + 1))
    else
      verdict="FAIL (exit $rc)"
      fail=$((fail + 1))
    fi
    line="$verdict  $(basename "$bin")::$t  ${secs}s"
    echo "$line" | tee -a "$report"
    [ "$verdict" = PASS ] || grep -m3 -E "panicked|SKIPPED|unavailable|error" "$log" | sed 's/^/    /' | tee -a "$report"
  done
done

# 3. Benchmarks: dsv3 bench on the bench preset (written once), graphs on and off.
{ echo; echo "## 3. dsv3 bench --device cuda, bench preset ($(elapsed))"; } >> "$report"
model=$WORK/bench-model
if DSV3_TOKENIZER_DIR=/nonexistent timeout "$LIMIT" "$DSV3" init-random --preset bench --out "$model" > "$LOGS/init-bench.log" 2>&1; then
  for graphs in auto off; do
    log="$LOGS/dsv3-bench-graphs-$graphs.log"
    timeout "$LIMIT" "$DSV3" bench --model "$model" --device cuda --gemm fp8 --batch 1,8,64 --prompt-tokens 32 --decode-tokens 16 \
      --graphs "$graphs" > "$log" 2>&1
    rc=$?
    { echo; echo "### --graphs $graphs (exit $rc)"; grep -E '^batch|^\{' "$log"; } >> "$report"
    if [ $rc -ne 0 ]; then
      echo "FAIL (exit $rc)  bench::dsv3-graphs-$graphs" | tee -a "$report"
      tail -5 "$log" | sed 's/^/    /' | tee -a "$report"
      fail=$((fail + 1))
    else
      echo "ran  bench::dsv3-graphs-$graphs"
      grep '^batch' "$log"
    fi
  done
  rm -rf "$model"
else
  echo "FAIL  bench::init-random (see init-bench.log)" | tee -a "$report"
  fail=$((fail + 1))
fi
for bench in bench/*; do
  [ -x "$bench" ] || continue
  name=$(basename "$bench")
  log="$LOGS/bench-$name.txt"
  timeout "$LIMIT" "$bench" > "$log" 2>&1
  rc=$?
  { echo; echo "## bench $name (exit $rc)"; cat "$log"; echo; } >> "$report"
  if [ $rc -ne 0 ]; then
    echo "FAIL (exit $rc)  bench::$name" | tee -a "$report"
    fail=$((fail + 1))
  else
    echo "ran  bench::$name"
  fi
done
echo "$pass passed, $fail failed, $(elapsed) in all" | tee -a "$report"
tar -C "$WORK" -czf "$OUT/logs.tar.gz" logs
rm -rf "$WORK"
[ $fail -eq 0 ]
