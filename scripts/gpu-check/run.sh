#!/usr/bin/env bash
# Runs on the GPU machine, from the gpu-check/ folder that build.sh made: every GPU test of
# every binary, one at a time, ignored (GPU) tests included and DSV3_REQUIRE_GPU=1 set, so a
# missing or unusable GPU is a failure, never a pass; then every benchmark in bench/ once
# (figures in $OUT/bench-<name>.txt and the report). Writes $OUT/gpu-check-report.txt (device,
# ptxas' kernel report, PASS/FAIL per test) and $OUT/logs/<test>.log; exits non-zero on any
# failure. Usage: gpu-check/run.sh [per-test timeout in seconds, default 300]
set -uo pipefail
cd "$(dirname "$0")"
# build.sh ships the binaries gzipped; unpack them next to this script once.
if [ ! -d bin ] && [ -f payload.tar.gz ]; then
  tar -xzf payload.tar.gz || { echo "gpu-check: cannot unpack payload.tar.gz" >&2; exit 2; }
fi
OUT=${OUT:-$PWD/out}
LIMIT=${1:-300}
mkdir -p "$OUT/logs"
export DSV3_REQUIRE_GPU=1
# NCCL (cuda_nccl): the GPU machine's PyTorch ships libnccl in its nvidia-nccl wheel.
nccl=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null || true)
[ -n "$nccl" ] && export LD_LIBRARY_PATH="$nccl${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
report=$OUT/gpu-check-report.txt
{
  echo "# dsv3 GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
  echo
  echo "## ptxas (sm_90a)"
  cat kernel-report.txt
  echo
  echo "## tests"
} > "$report"

pass=0
fail=0
for bin in bin/*; do
  for t in $("$bin" --list 2>/dev/null | sed -n 's/: test$//p'); do
    log="$OUT/logs/$(basename "$bin").$t.log"
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
# Then each GPU benchmark once (they measure; a crash or a non-zero exit counts as a failure).
for bench in bench/*; do
  [ -x "$bench" ] || continue
  name=$(basename "$bench")
  log="$OUT/bench-$name.txt"
  timeout "$LIMIT" "$bench" > "$log" 2>&1
  rc=$?
  { echo; echo "## bench $name (exit $rc)"; cat "$log"; echo; } >> "$report"
  if [ $rc -ne 0 ]; then
    echo "FAIL (exit $rc)  bench::$name" | tee -a "$report"
    fail=$((fail + 1))
  else
    echo "ran  bench::$name  (figures in $log)"
  fi
done
echo "$pass passed, $fail failed" | tee -a "$report"
[ $fail -eq 0 ]
