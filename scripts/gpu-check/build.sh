#!/usr/bin/env bash
# Prepares the GPU check (docs/testing.md, "GPU"): builds the `cuda`-feature test binaries
# (dsv3-kernels, and the layer / model tests of dsv3-mla, dsv3-moe, dsv3-runtime), the GPU
# benchmarks and a GPU-capable `dsv3` here, strips them and gathers them with run.sh, its
# helpers, the golden fixtures and ptxas' kernel report into gpu-check/ (git-ignored; the
# binaries and fixtures in one gzipped payload, about 35 MB: what travels to the GPU machine
# is limited to 64 MiB). Copy that folder to the GPU machine (no Rust, no network, CUDA 13
# driver) and run `gpu-check/run.sh` there; it unpacks the payload and writes its report to
# $OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."

scripts/install-cuda-toolchain.sh > /dev/null
DEST=gpu-check
rm -rf "$DEST"
mkdir -p "$DEST/bin" "$DEST/bench" "$DEST/e2e"

# Every test executable of the kernel crate and of the crates above it (dsv3-mla, dsv3-moe,
# dsv3-runtime: their cuda_* tests run the layers and the tiny models on the CUDA backend)
# built with the feature; keep the GPU ones (cuda_*).
cargo test --no-run --features dsv3-kernels/cuda --profile test-opt -p dsv3-kernels -p dsv3-mla -p dsv3-moe -p dsv3-runtime \
  --message-format=json \
  | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do
  case "$name" in
    cuda_*) cp "$exe" "$DEST/bin/$name" && strip "$DEST/bin/$name" ;;
  esac
done

# The GPU benchmarks: harness-less bench targets of dsv3-benches built with its `cuda` feature
# (in the test-opt profile, so the kernels built above are reused). run.sh runs each once.
for b in sm90_gemm; do
  cargo bench --no-run --features cuda --profile test-opt -p dsv3-benches --bench "$b" --message-format=json \
    | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "bench" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do
    cp "$exe" "$DEST/bench/$name" && strip "$DEST/bench/$name"
  done
done

# The dsv3 program with the GPU backend (run.sh's end-to-end part), and what it runs on:
# the golden fixtures (HF's logits of two tiny checkpoints) and the helper that compares.
cargo build --profile test-opt -p dsv3-cli --features cuda
cp target/test-opt/dsv3 "$DEST/e2e/dsv3" && strip "$DEST/e2e/dsv3"
cp -r crates/dsv3-runtime/tests/fixtures/hf-v3-tiny crates/dsv3-runtime/tests/fixtures/hf-v2lite-tiny "$DEST/e2e/"
cp scripts/gpu-check/e2e.py "$DEST/e2e/e2e.py"

report=$(ls -t target/test-opt/build/dsv3-kernels-*/out/kernel-report.txt | head -1)
cp "$report" "$DEST/kernel-report.txt"
cp scripts/gpu-check/run.sh "$DEST/run.sh"
chmod +x "$DEST/run.sh"
ls "$DEST/bin" "$DEST/bench" "$DEST/e2e"
# Every binary embeds all the cubins: about 90 MB unpacked, more than what travels to the GPU
# machine (64 MiB in all). Gzipped they are about 30 MB; run.sh unpacks them.
tar -C "$DEST" -czf "$DEST/payload.tar.gz" bin bench e2e
rm -rf "$DEST/bin" "$DEST/bench" "$DEST/e2e"
du -sh "$DEST"
size=$(du -sm "$DEST" | cut -f1)
if [ "$size" -gt 60 ]; then
  echo "gpu-check/ is $size MiB: over what travels to the GPU machine (64 MiB with the tree)" >&2
  exit 1
fi
