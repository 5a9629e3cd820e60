#!/usr/bin/env bash
# Builds diffii with the optional CUDA backend into target/cuda/release/diffii. Needs a CUDA
# toolkit at build time (nvcc and the headers) but no GPU: the binary can be built on a CPU
# machine and copied to a GPU one, which needs the NVIDIA driver (libcuda) and cuBLAS, cuRAND and
# NVRTC at run time (a PyTorch install with CUDA has them; scripts/gpu-check.sh finds them).
# The default CPU build never needs any of this.
#
# Without a system toolkit, PyPI's CUDA 13.0 wheels provide one (1.2 GB, in a venv of your own):
#
#   python3 -m venv .venv-cuda
#   .venv-cuda/bin/pip install "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" \
#       "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
#       "nvidia-cublas==13.0.*" "nvidia-curand==10.*"
#   CUDA_HOME=$PWD/.venv-cuda/lib/python3.11/site-packages/nvidia/cu13 scripts/build-cuda.sh
#
# Why 13.0: the GPU kernels are shipped as PTX, which the driver compiles for its GPU when the
# binary starts; a driver accepts PTX from its own CUDA version or older, so the oldest toolkit of
# the major version runs on every CUDA 13 driver.
#
# CUDA_COMPUTE_CAP is the oldest GPU architecture to support (default 80: A100; its PTX also runs
# on H100/H200, 90, and newer). The wheels have no libcuda.so to link against (the driver brings
# it), so the script links against a generated stub of the driver API, as the toolkit's own
# lib/stubs does. If the toolkit is newer than the cudarc crate knows ("Unsupported cuda toolkit
# version"), name the newest version it supports, e.g. CUDARC_CUDA_VERSION=13040.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
  export PATH="$CUDA_HOME/bin:$PATH"
fi
if ! command -v nvcc >/dev/null 2>&1; then
  echo "nvcc not found: install a CUDA toolkit, or the PyPI wheels and set CUDA_HOME (see this script's header)" >&2
  exit 1
fi
CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}"
export CUDA_HOME
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
# The wheels keep the CCCL headers (cub, thrust) in a folder of their own.
if [ -d "$CUDA_HOME/cccl" ]; then
  export NVCC_PREPEND_FLAGS="${NVCC_PREPEND_FLAGS:-} -I$CUDA_HOME/include -I$CUDA_HOME/cccl"
fi

# Link folder (cudarc looks in $CUDA_ROOT/lib): unversioned names for the wheels' versioned
# libraries, and the driver stub.
link="$PWD/target/cuda/link"
mkdir -p "$link/lib"
for lib in cublas cublasLt curand nvrtc cudart; do
  if [ ! -e "$CUDA_HOME/lib/lib$lib.so" ] && [ ! -e "$CUDA_HOME/lib64/lib$lib.so" ]; then
    found="$(ls "$CUDA_HOME"/lib*/lib$lib.so.* 2>/dev/null | grep -v alt | head -n1 || true)"
    [ -n "$found" ] || { echo "lib$lib.so not found under $CUDA_HOME/lib: install its wheel (see the header)" >&2; exit 1; }
    ln -sf "$found" "$link/lib/lib$lib.so"
  fi
done
if [ ! -e "$CUDA_HOME/lib/stubs/libcuda.so" ] && [ ! -e "$CUDA_HOME/lib64/stubs/libcuda.so" ] \
   && [ ! -e /usr/lib/x86_64-linux-gnu/libcuda.so ]; then
  cudarc="$(cargo metadata --format-version 1 --features cuda 2>/dev/null \
    | python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc"))')"
  sys="$(dirname "$cudarc")/src/driver/sys/mod.rs"
  grep -oE '^\s+fn cu[A-Za-z0-9_]+\(' "$sys" | sed -E 's/.*fn (cu[A-Za-z0-9_]+)\(/void \1(void) {}/' \
    | sort -u >"$link/libcuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$link/lib/libcuda.so" "$link/libcuda_stub.c"
fi
export CUDA_ROOT="$link"

CARGO_TARGET_DIR="$PWD/target/cuda" cargo build --release --locked --features cuda "$@"
echo "built target/cuda/release/diffii with CUDA support (compute capability >= $CUDA_COMPUTE_CAP; run with --device cuda or --device cuda:N)"
