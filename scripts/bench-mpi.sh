#!/usr/bin/env bash
# Multi-process dsv3 on this machine's CPUs, alternating runs, medians (benches/results/ has
# what it printed): decode tokens/s of one process and of 2 ranks (--ep 2, --pp 2), the
# pipeline with one micro-batch and with two in flight, and each rank's peak RSS.
#
#   scripts/bench-mpi.sh [MODEL_DIR] [ROUNDS]   (default: the `small` preset written to /tmp)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-mpi.sh > /dev/null
cargo build --quiet --release -p dsv3-cli --features mpi
bin=$(mktemp -d)/dsv3 && cp target/release/dsv3 "$bin"
model=${1:-/tmp/dsv3-bench-mpi-small}
rounds=${2:-5}
[[ -f $model/config.json ]] || "$bin" init-random --preset small --out "$model"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 DSV3_TOKENIZER_DIR=/nonexistent OMPI_MCA_mpi_yield_when_idle=1
mpi() { mpirun --oversubscribe --bind-to none "$@"; }
# Decode tokens/s of the last N JSON lines: all decode tokens over the longest decode time.
rate() { grep "^{" | tail -n "$1" | python3 -c "
import json, sys
r = [json.loads(l) for l in sys.stdin]
n = [len(x['ids']) - 1 for x in r]
print(sum(n) / max(k / x['decode_tokens_per_s'] for k, x in zip(n, r)))"; }
med() { python3 -c "import sys,statistics; v=[float(x) for x in sys.argv[1:]]; print(f'{statistics.median(v):.2f} (runs: {\" \".join(f\"{x:.2f}\" for x in v)})')" "$@"; }
gen=(generate --model "$model" --prompt-ids 1,2,3,4 --max-tokens 48 --json)
two=(generate --model "$model" --prompt-ids 1,2,3,4 --prompt-ids 5,6,7,8 --max-tokens 48 --json)
declare -A r
for _ in $(seq "$rounds"); do
  r[single2]+=" $(RAYON_NUM_THREADS=2 "$bin" "${gen[@]}" | rate 1)"
  r[single1]+=" $(RAYON_NUM_THREADS=1 "$bin" "${gen[@]}" | rate 1)"
  r[ep2]+=" $(mpi -np 2 -x RAYON_NUM_THREADS=1 "$bin" "${gen[@]}" --ep 2 | rate 1)"
  r[pp2]+=" $(mpi -np 2 -x RAYON_NUM_THREADS=1 "$bin" "${gen[@]}" --pp 2 | rate 1)"
  r[pp2mb1]+=" $(mpi -np 2 -x RAYON_NUM_THREADS=1 "$bin" "${two[@]}" --pp 2 --micro-batches 1 | rate 2)"
  r[pp2mb2]+=" $(mpi -np 2 -x RAYON_NUM_THREADS=1 "$bin" "${two[@]}" --pp 2 --micro-batches 2 | rate 2)"
done
echo "machine: $(nproc) cores; load average before/after: see uptime below"; uptime
echo "decode tokens/s, one prompt of 4 tokens, 48 generated (median of $rounds, alternating):"
echo "  one process, 2 threads:        $(med ${r[single2]})"
echo "  one process, 1 thread:         $(med ${r[single1]})"
echo "  2 ranks --ep 2, 1 thread each: $(med ${r[ep2]})"
echo "  2 ranks --pp 2, 1 thread each: $(med ${r[pp2]})"
echo "decode tokens/s of two prompts together, 2 ranks --pp 2, 1 thread each:"
echo "  one micro-batch (both prompts in one batch; the stages take turns): $(med ${r[pp2mb1]})"
echo "  two micro-batches in flight:                                     $(med ${r[pp2mb2]})"
echo "peak RSS per rank (KB), one process and 2 ranks --ep 2 (each maps only its experts):"
/usr/bin/time -f "  one process: %M KB" "$bin" "${gen[@]}" > /dev/null
mpi -np 2 /usr/bin/time -f "  --ep 2 rank: %M KB" "$bin" "${gen[@]}" --ep 2 > /dev/null
mpi -np 2 /usr/bin/time -f "  --pp 2 rank: %M KB" "$bin" "${gen[@]}" --pp 2 > /dev/null
