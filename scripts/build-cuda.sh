#!/usr/bin/env bash
# Builds diffii with the optional CUDA backend. Needs an NVIDIA driver and a CUDA toolkit
# (nvcc on PATH, or from the PyPI wheel below). The default CPU build never needs any of this.
#
#   python3 -m venv .venv-cuda && .venv-cuda/bin/pip install nvidia-cuda-nvcc-cu12 nvidia-cuda-runtime-cu12
#   export PATH="$PWD/.venv-cuda/lib/python3*/site-packages/nvidia/cuda_nvcc/bin:$PATH"
#
# CUDA_COMPUTE_CAP selects the GPU architecture (e.g. 80 for A100, 89 for L4/RTX 40xx).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then
  echo "nvcc not found: install a CUDA toolkit or the nvidia-cuda-nvcc wheel (see this script's header)" >&2
  exit 1
fi
cargo build --release --features cuda "$@"
echo "built target/release/diffii with CUDA support"
