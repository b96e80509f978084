#!/usr/bin/env bash
# Installs what the `mpi` feature needs, from Debian packages: OpenMPI (headers, libraries,
# `mpicc` for the build probe, `mpirun`) and libclang (the `mpi` crate generates its bindings
# with bindgen at build time). Idempotent: when `mpicc`, `mpirun` and libclang are already
# there, nothing is installed. Needs root (CI runs as root) or sudo.
set -euo pipefail

have_libclang() {
  ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1
}

if command -v mpicc >/dev/null && command -v mpirun >/dev/null && have_libclang; then
  echo "OpenMPI and libclang already installed"
else
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends libopenmpi-dev openmpi-bin libclang-dev >/dev/null
fi
mpirun --version | head -1
