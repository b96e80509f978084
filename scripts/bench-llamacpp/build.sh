#!/usr/bin/env bash
# Builds llama.cpp's `llama-bench` (CPU backend, Release, -march=native) from the llama.cpp tree
# vendored in the PyPI sdist of llama-cpp-python (pinned below), and makes the Python
# environment of that tree's converter (convert_hf_to_gguf.py). Idempotent: every step that is
# already done is skipped. Everything lands in git-ignored paths:
#   .venv-llamacpp/          cmake + ninja (PyPI, when the system has none), the converter's
#                            small requirements (gguf-py from the vendored tree, sentencepiece,
#                            protobuf, tqdm, pyyaml, requests), and a .pth line that adds the
#                            site-packages of .venv-fixtures (scripts/fixtures/venv.sh: the
#                            pinned torch, transformers, safetensors, numpy) instead of a second
#                            copy of torch (~3 GB: PyPI has no CPU-only Linux torch wheel)
#   .cache/llamacpp/         the sdist (sha256-checked), its unpacked tree, build-<version>/
# Usage: scripts/bench-llamacpp/build.sh        (prints the llama-bench path last, on stdout)
set -euo pipefail
cd "$(dirname "$0")/../.."

VERSION=0.3.36 # llama-cpp-python; vendors llama.cpp at the commit printed below
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
CMAKE_PIN=cmake==4.4.5
NINJA_PIN=ninja==1.13.2
SKBUILD_PIN=scikit-build-core==1.1.2 # the sdist's build backend, for pip's metadata step
CONVERTER_PINS=(sentencepiece==0.2.1 protobuf==4.25.8 tqdm==4.67.1 pyyaml==6.0.3 requests==2.32.5)

CACHE=.cache/llamacpp
VENV=.venv-llamacpp
SDIST=$CACHE/llama_cpp_python-$VERSION.tar.gz
SRC=$CACHE/llama_cpp_python-$VERSION/vendor/llama.cpp
BUILD=$CACHE/build-$VERSION
BIN=$BUILD/bin/llama-bench
say() { echo "[bench-llamacpp/build] $*" >&2; }

mkdir -p "$CACHE"
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  python3 -m venv "$VENV" >&2
fi
PIP=("$VENV/bin/pip" install --quiet --disable-pip-version-check)

# cmake and ninja: the system's when it has both, else pinned ones from PyPI in the venv.
if command -v cmake >/dev/null && command -v ninja >/dev/null; then
  CMAKE=$(command -v cmake)
else
  if [ ! -x "$VENV/bin/cmake" ] || [ ! -x "$VENV/bin/ninja" ]; then
    say "installing $CMAKE_PIN $NINJA_PIN into $VENV"
    "${PIP[@]}" "$CMAKE_PIN" "$NINJA_PIN" >&2
  fi
  CMAKE=$PWD/$VENV/bin/cmake
  export PATH="$PWD/$VENV/bin:$PATH"
fi

if [ ! -f "$SDIST" ]; then
  say "downloading the sdist of llama-cpp-python==$VERSION"
  # --no-build-isolation with the backend installed here: otherwise pip builds the backend's
  # own cmake from source just to read the sdist's metadata.
  "${PIP[@]}" "$SKBUILD_PIN" >&2
  "$VENV/bin/pip" download --quiet --no-deps --no-binary :all: --no-build-isolation \
    "llama-cpp-python==$VERSION" -d "$CACHE" >&2
fi
echo "$SHA256  $SDIST" | sha256sum --check --quiet - >&2 || {
  say "error: $SDIST does not have the pinned sha256 $SHA256 (delete it to download again)"
  exit 1
}
if [ ! -f "$SRC/convert_hf_to_gguf.py" ]; then
  say "unpacking $SDIST"
  tar -xzf "$SDIST" -C "$CACHE"
fi

if [ ! -x "$BIN" ]; then
  say "building llama-bench in $BUILD (CPU backend, Release, GGML_NATIVE=ON; several minutes on 2 cores)"
  "$CMAKE" -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON >&2
  "$CMAKE" --build "$BUILD" --target llama-bench -j2 >&2
fi

# The converter's Python: torch & co. from .venv-fixtures (same pins as the golden fixtures).
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if ! "$VENV/bin/python" -c 'import torch, transformers, safetensors, sentencepiece, google.protobuf, tqdm, yaml, requests' 2>/dev/null; then
  say "making .venv-fixtures (torch, transformers; a few GB on first use) and linking it into $VENV"
  FIXPY=$(scripts/fixtures/venv.sh)
  "$FIXPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' >"$SITE/dsv3-fixtures.pth"
  say "installing the converter's small requirements: ${CONVERTER_PINS[*]}"
  "${PIP[@]}" "${CONVERTER_PINS[@]}" >&2
fi

say "llama.cpp $(git -C "$SRC" rev-parse --short HEAD 2>/dev/null || echo "(commit unknown)") from llama-cpp-python $VERSION: $BIN"
echo "$PWD/$BIN"
