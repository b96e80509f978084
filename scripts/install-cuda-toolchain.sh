#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler toolchain from PyPI into `.venv-cuda/` (docs/architecture.md,
# "CUDA"): nvcc, ptxas, cicc (nvvm), the CUDA headers and the crt headers. No GPU and no
# driver are needed; this is only what `build.rs` of dsv3-kernels (feature `cuda`) calls.
# Idempotent: a venv that already has the pinned versions is left alone.
#
# Prints the paths; `build.rs` finds nvcc at `.venv-cuda/.../nvidia/cu13/bin/nvcc` by itself,
# or wherever `DSV3_NVCC` points.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${DSV3_CUDA_VENV:-.venv-cuda}
PKGS=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85
      nvidia-cuda-runtime==13.0.96 nvidia-nvvm==13.0.88)
STAMP="$VENV/.dsv3-cuda-toolchain"
WANT="${PKGS[*]}"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  echo "CUDA toolchain already installed in $VENV"
else
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PKGS[@]}"
  echo "$WANT" > "$STAMP"
fi

SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
CU=$SITE/nvidia/cu13
echo "nvcc:    $CU/bin/nvcc"
echo "ptxas:   $CU/bin/ptxas"
echo "cicc:    $CU/nvvm/bin/cicc"
echo "include: $CU/include"
"$CU/bin/nvcc" --version | tail -2
