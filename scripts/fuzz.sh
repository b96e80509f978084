#!/usr/bin/env bash
# Coverage-guided fuzzing of one target on the stable toolchain (libFuzzer via libfuzzer-sys,
# instrumented with rustc's own stable SanitizerCoverage flags: no nightly, no cargo-fuzz).
#
#   scripts/fuzz.sh TARGET MINUTES          fuzz TARGET for MINUTES, then merge what adds
#                                           coverage into fuzz/corpus/TARGET/ (minimised)
#   scripts/fuzz.sh TARGET 0 FILE...        run FILE(s) once through TARGET (reproduce a crash)
#   scripts/fuzz.sh TARGET 0                only minimise fuzz/corpus/TARGET with the work corpus
#   scripts/fuzz.sh list                    the targets
#
# Targets and invariants: docs/fuzzing.md. Crashes land in target/fuzz/artifacts/TARGET/ and
# make the script exit 1; the work corpus (everything the fuzzer kept) is
# target/fuzz/corpus/TARGET/; a summary line (minutes, execs, crashes) is appended to
# target/fuzz/runs.log. Set FUZZ_JOBS=N to run N fuzzer processes (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."

targets() { sed -n 's/^ *Target { name: "\([a-z_]*\)".*/\1/p' fuzz/src/lib.rs; }
if [[ "${1:-}" == "list" || $# -lt 2 ]]; then
    [[ "${1:-}" == "list" ]] || echo "usage: scripts/fuzz.sh TARGET MINUTES [FILE...]" >&2
    targets
    [[ "${1:-}" == "list" ]]
    exit
fi
target="$1" minutes="$2"
shift 2
targets | grep -qx "$target" || { echo "fuzz.sh: unknown target '$target'; targets: $(targets | tr '\n' ' ')" >&2; exit 2; }
[[ "$minutes" =~ ^[0-9]+$ ]] || { echo "fuzz.sh: MINUTES must be a whole number" >&2; exit 2; }

# libFuzzer itself is C++, compiled by libfuzzer-sys's build script.
if ! command -v c++ >/dev/null 2>&1; then
    echo "fuzz.sh: installing a C++ compiler (Debian g++) for libFuzzer" >&2
    apt-get update -qq && apt-get install -y -qq g++ >&2
fi

host="$(rustc -vV | sed -n 's/^host: //p')"
export CARGO_TARGET_DIR="$PWD/target/fuzz"
# Coverage counters and comparison tracing (stable -C flags), with the checks of a debug build.
# Passing --target keeps these flags off build scripts and proc macros.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
echo "== building the instrumented fuzzer (target/fuzz)" >&2
cargo build --release --locked -p dsv3-fuzz --features libfuzzer --bin dsv3-fuzz --target "$host" >&2
bin="$CARGO_TARGET_DIR/$host/release/dsv3-fuzz"
export DSV3_FUZZ_TARGET="$target"

max_len="$(sed -n "s/^ *Target { name: \"$target\".*max_len: \([0-9<> ]*\) }.*/\1/p" fuzz/src/lib.rs)"
max_len=$(( max_len ))
seeds="fuzz/corpus/$target"
work="$CARGO_TARGET_DIR/corpus/$target"
artifacts="$CARGO_TARGET_DIR/artifacts/$target"
mkdir -p "$work" "$artifacts"
common=(-max_len="$max_len" -timeout=20 -rss_limit_mb=2048 -artifact_prefix="$artifacts/")
[[ -f "fuzz/dict/$target.dict" ]] && common+=(-dict="fuzz/dict/$target.dict")

if [[ "$minutes" == 0 && $# -gt 0 ]]; then
    exec "$bin" "${common[@]}" "$@"
fi

log="$CARGO_TARGET_DIR/$target-$(date +%Y%m%d-%H%M%S).log"
jobs="${FUZZ_JOBS:-1}"
before=$(ls "$artifacts" | wc -l)
echo "== fuzzing $target for $minutes min ($jobs process(es)); log: $log" >&2
status=0
if [[ "$minutes" == 0 ]]; then
    echo "(0 minutes: only minimising the corpus)" >&2
    : >"$log"
elif [[ "$jobs" -gt 1 ]]; then
    "$bin" "${common[@]}" -max_total_time=$((minutes * 60)) -print_final_stats=1 -jobs="$jobs" -workers="$jobs" \
        "$work" "$seeds" >"$log" 2>&1 || status=$?
    cat fuzz-*.log >>"$log" 2>/dev/null && rm -f fuzz-*.log
else
    "$bin" "${common[@]}" -max_total_time=$((minutes * 60)) -print_final_stats=1 "$work" "$seeds" >"$log" 2>&1 || status=$?
fi
execs=$(awk '/^stat::number_of_executed_units:/ {s += $2} END {print s + 0}' "$log")
crashes=$(( $(ls "$artifacts" | wc -l) - before ))
tail -n 5 "$log" >&2

# Minimise: a small set of inputs covering every edge that the committed corpus and the work
# corpus reach (set cover over edges, hit counts ignored, so the committed corpus stays small)
# replaces the generated files (hash names) of fuzz/corpus/TARGET; the hand-made seed-* and the
# crash-* regression inputs always stay.
echo "== minimising the corpus into $seeds" >&2
min="$(mktemp -d)"
if "$bin" "${common[@]}" -set_cover_merge=1 -use_counters=0 "$min" "$seeds" "$work" >>"$log" 2>&1; then
    find "$seeds" -maxdepth 1 -type f ! -name 'seed-*' ! -name 'crash-*' -delete
    for f in "$seeds"/seed-* "$seeds"/crash-*; do
        [[ -e "$f" ]] && rm -f "$min/$(sha1sum "$f" | cut -c1-40)"
    done
    cp "$min"/* "$seeds"/ 2>/dev/null || true
else
    echo "fuzz.sh: minimising failed (see $log); corpus left as it was" >&2
fi
rm -rf "$min"
line="$(date -u +%FT%TZ) target=$target minutes=$minutes jobs=$jobs execs=$execs new_crashes=$crashes exit=$status corpus_files=$(ls "$seeds" | wc -l) corpus_kib=$(du -sk "$seeds" | cut -f1)"
echo "$line" | tee -a "$CARGO_TARGET_DIR/runs.log" >&2
if [[ "$crashes" -gt 0 || "$status" -ne 0 ]]; then
    echo "fuzz.sh: $target found a problem; inputs in $artifacts (reproduce: scripts/fuzz.sh $target 0 FILE)" >&2
    exit 1
fi
