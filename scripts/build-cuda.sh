#!/usr/bin/env bash
# Builds diffii with the optional CUDA backend. Needs a CUDA toolkit at build time (nvcc) and,
# to link and run, the CUDA libraries a GPU machine has (driver libcuda, cuBLAS, cuRAND, NVRTC).
# The default CPU build never needs any of this.
#
# Without a system toolkit, PyPI's CUDA 13 wheels provide nvcc and the headers:
#
#   python3 -m venv .venv-cuda
#   .venv-cuda/bin/pip install nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-cccl
#   export CUDA_HOME="$(echo $PWD/.venv-cuda/lib/python3*/site-packages/nvidia/cu13)"
#   export PATH="$CUDA_HOME/bin:$PATH" NVCC_PREPEND_FLAGS="-I$CUDA_HOME/include -I$CUDA_HOME/cccl"
#
# CUDA_COMPUTE_CAP selects the GPU architecture (e.g. 80 for A100, 89 for L4 / RTX 40xx, 90 for
# H100); it is read from nvidia-smi when a GPU is present. If the toolkit is newer than the
# cudarc crate knows ("Unsupported cuda toolkit version"), name the newest version it supports,
# e.g. CUDARC_CUDA_VERSION=13040 for CUDA 13.4.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then
  echo "nvcc not found: install a CUDA toolkit or the PyPI wheels (see this script's header)" >&2
  exit 1
fi
if [ -z "${CUDA_COMPUTE_CAP:-}" ] && command -v nvidia-smi >/dev/null 2>&1; then
  CUDA_COMPUTE_CAP="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d '.')"
  export CUDA_COMPUTE_CAP
fi
if [ -z "${CUDA_COMPUTE_CAP:-}" ]; then
  echo "no GPU found to read the architecture from: set CUDA_COMPUTE_CAP (e.g. 80)" >&2
  exit 1
fi
cargo build --release --features cuda "$@"
echo "built target/release/diffii with CUDA support (run with --device cuda or --device cuda:N)"
