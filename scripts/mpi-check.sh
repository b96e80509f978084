#!/usr/bin/env bash
# Multi-process dsv3 under mpirun, as CI runs it (2 cores, so 4 ranks are oversubscribed):
#  1. every EP x PP layout prints the ids `dsv3 generate` prints alone, and writes the same
#     logits file byte for byte (tiny presets; reference and fp8 GEMM paths);
#  2. several prompts, one per micro-batch, in flight together: each prompt's ids as alone;
#  3. failures end the job, bounded by `timeout`, never a hang: a bad layout (every rank
#     prints the error), a rank failing mid-run (its error, and every other rank reports the
#     abort), a rank crashing mid-run, a rank killed with SIGKILL mid-run;
#  4. a dsv3 built without the `mpi` feature refuses to run as one of several ranks.
#
#   scripts/mpi-check.sh [PROFILE]     (cargo profile, default test-opt)
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${1:-test-opt}
scripts/install-mpi.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1   # CI runs as root
export DSV3_TOKENIZER_DIR=/nonexistent                              # ids in, ids out
# Ranks that wait for a peer yield the core instead of spinning (4 ranks on 2 cores).
export OMPI_MCA_mpi_yield_when_idle=1
# When a rank dies, mpirun sends the others SIGTERM and, after this many seconds, SIGKILL. Each
# rank's SIGTERM watcher writes its "the job was aborted" line first; the default of 1 s was
# too short for that on a loaded 2-core machine (the kill check failed once). A rank that
# exits on SIGTERM at once (all of them) does not make the job wait.
export OMPI_MCA_odls_base_sigkill_timeout=10

cargo build --quiet --profile "$PROFILE" -p dsv3-cli --features mpi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "target/$PROFILE/dsv3" "$work/dsv3-mpi"
dsv3="$work/dsv3-mpi"
mpi() { timeout 120 mpirun --oversubscribe --bind-to none "$@"; }
pass=0
ok() { pass=$((pass + 1)); echo "  ok: $*"; }
fail() { echo "mpi-check FAILED: $*" >&2; exit 1; }

echo "== 1. every layout prints what one process prints"
for preset in tiny tiny-v2lite; do
  for gemm in reference fp8; do
    args=(generate --preset $preset --prompt-ids 0,1003,3,77 --max-tokens 24 --gemm $gemm)
    want=$("$dsv3" "${args[@]}")
    for layout in "2 --ep 2" "4 --ep 4" "2 --pp 2" "4 --pp 4" "4 --pp 2 --ep 2"; do
      read -r np rest <<< "$layout"
      # shellcheck disable=SC2086
      got=$(mpi -np "$np" "$dsv3" "${args[@]}" $rest)
      [[ "$got" == "$want" ]] || fail "$preset $gemm -np $np $rest: got $got, want $want"
      ok "$preset $gemm  mpirun -np $np ... $rest  ==  one process ($want)"
    done
  done
done
"$dsv3" logits --preset tiny --ids 5,9,300,7,1000,2 --out "$work/one.safetensors"
for layout in "4 --ep 4" "4 --pp 2 --ep 2" "2 --pp 2"; do
  read -r np rest <<< "$layout"
  out="$work/np$np${rest// /}.safetensors"
  # shellcheck disable=SC2086
  mpi -np "$np" "$dsv3" logits --preset tiny --ids 5,9,300,7,1000,2 --out "$out" $rest
  cmp "$work/one.safetensors" "$out" || fail "logits -np $np $rest differ from one process"
  ok "logits  mpirun -np $np ... $rest: the same file, byte for byte"
done

echo "== 2. micro-batches in flight: three prompts, each as alone"
want=""; i=0
for p in 0,1003,3 5,6 77,1000,12,9; do
  want+=$("$dsv3" generate --preset tiny --prompt-ids $p --max-tokens 16 --temperature 0.7 --seed $((40 + i)))$'\n'
  i=$((i + 1))
done
three=(generate --preset tiny --prompt-ids 0,1003,3 --prompt-ids 5,6 --prompt-ids 77,1000,12,9 --max-tokens 16 --temperature 0.7 --seed 40 --micro-batches 3)
for layout in "1" "4 --pp 2 --ep 2" "3 --pp 3"; do
  read -r np rest <<< "$layout"
  # shellcheck disable=SC2086
  if [[ $np == 1 ]]; then got=$("$dsv3" "${three[@]}")$'\n'; else got=$(mpi -np "$np" "$dsv3" "${three[@]}" $rest)$'\n'; fi
  [[ "$got" == "$want" ]] || fail "three prompts -np $np $rest: got $got want $want"
  ok "three prompts (sampled, seeds 40..42), -np $np $rest: each as alone"
done

echo "== 3. failures end the job"
expect_fail() {  # NAME STDERR-FILE COMMAND...: must fail within the timeout (124 = it hung)
  local name=$1 err=$2; shift 2
  local rc=0
  "$@" > /dev/null 2> "$err" || rc=$?
  [[ $rc -ne 0 ]] || fail "$name: exited 0"
  [[ $rc -ne 124 ]] || fail "$name: hung (killed by timeout)"
}
gen=(generate --preset tiny --prompt-ids 0,1003,3 --max-tokens 3000 --pp 2 --ep 2)
expect_fail "bad layout" "$work/err" mpi -np 3 "$dsv3" generate --preset tiny --prompt-ids 1,2 --ep 3
[[ $(grep -c "^error: rank 0: request: --ep 3 must divide the model's 16 routed experts" "$work/err") -ge 1 ]] || { cat "$work/err"; fail "bad layout: no typed error"; }
ok "bad layout: $(grep -m1 '^error' "$work/err")"

expect_fail "rank 1 fails" "$work/err" env DSV3_FAULT_INJECT=1:40:error timeout 120 mpirun --oversubscribe -np 4 "$dsv3" "${gen[@]}"
grep -q "^error: rank 1 of 4: request: injected failure at exchange 40" "$work/err" || { cat "$work/err"; fail "rank 1's error missing"; }
for r in 0 2 3; do
  grep -q "^error: rank $r of 4: the job was aborted" "$work/err" || { cat "$work/err"; fail "rank $r did not report the abort"; }
done
ok "rank 1 fails mid-run: its error, and ranks 0, 2, 3 report the abort"

expect_fail "rank 2 crashes" "$work/err" env DSV3_FAULT_INJECT=2:40:crash timeout 120 mpirun --oversubscribe -np 4 "$dsv3" "${gen[@]}"
for r in 0 1 3; do
  grep -q "^error: rank $r of 4: the job was aborted" "$work/err" || { cat "$work/err"; fail "rank $r did not report the crash"; }
done
grep -q "process rank 2 .* exited on signal 6" "$work/err" || { cat "$work/err"; fail "mpirun did not name rank 2"; }
ok "rank 2 crashes mid-run (SIGABRT): mpirun names it, ranks 0, 1, 3 report the abort"

timeout 120 mpirun --oversubscribe -np 4 "$dsv3" "${gen[@]}" > /dev/null 2> "$work/err" &
job=$!
victim=""
for _ in $(seq 200); do   # rank 1's pid, once it is past loading (its model is mapped)
  for p in $(pgrep -P "$(pgrep -P $job -x mpirun || echo 0)" 2>/dev/null); do
    if tr '\0' '\n' < /proc/$p/environ 2>/dev/null | grep -qx OMPI_COMM_WORLD_RANK=1; then victim=$p; fi
  done
  [[ -n $victim ]] && grep -q safetensors /proc/$victim/maps 2>/dev/null && break
  sleep 0.1
done
[[ -n $victim ]] || fail "rank 1 never started"
sleep 1
kill -0 $job 2>/dev/null || fail "the job finished before rank 1 could be killed (raise --max-tokens)"
kill -9 "$victim"
rc=0; wait $job || rc=$?
[[ $rc -ne 0 && $rc -ne 124 ]] || { cat "$work/err"; fail "SIGKILL of rank 1: the job exited $rc"; }
for r in 0 2 3; do
  grep -q "^error: rank $r of 4: the job was aborted" "$work/err" || { cat "$work/err"; fail "rank $r did not report the kill"; }
done
ok "rank 1 killed (SIGKILL) mid-run: job exit $rc, ranks 0, 2, 3 report the abort"

expect_fail "nccl on the cpu" "$work/err" mpi -np 2 "$dsv3" generate --preset tiny --prompt-ids 1,2 --ep-wire nccl
grep -q "^error: request: --ep-wire nccl needs --device cuda" "$work/err" || { cat "$work/err"; fail "--ep-wire nccl on the CPU: no typed error"; }
ok "--ep-wire nccl with --device cpu: $(grep -m1 '^error' "$work/err")"

echo "== 4. a dsv3 without the mpi feature refuses to be one of several ranks"
cargo build --quiet --profile "$PROFILE" -p dsv3-cli
expect_fail "no mpi feature" "$work/err" mpi -np 2 "target/$PROFILE/dsv3" generate --preset tiny --prompt-ids 1,2
grep -q "this dsv3 was built without MPI" "$work/err" || { cat "$work/err"; fail "no typed error without the mpi feature"; }
ok "without the mpi feature: $(grep -m1 '^error' "$work/err")"
echo "mpi-check: $pass checks passed"
