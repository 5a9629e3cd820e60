#!/usr/bin/env bash
# Prepares, on a CPU machine with Rust, everything scripts/gpu-check.sh needs on a GPU machine
# that has the NVIDIA driver, CUDA 13 and PyTorch but no Rust toolchain and no network:
#
#   target/gpu-bundle/diffii.gz     the CUDA build (scripts/build-cuda.sh), stripped, gzipped
#   target/gpu-bundle/fixtures/     the tiny SD model and its reference run (for parity)
#   target/gpu-bundle/tests/        the CPU kernel tests (tests/bf16.rs, tests/kernels.rs), built
#                                   without CUDA, stripped, gzipped: GPU machines' host CPUs
#                                   often have AMX, whose kernels no other machine can test
#   target/gpu-bundle/wheels/       diffusers and what it needs beyond a PyTorch install
#                                   (pure Python), for the same-run PyTorch comparison
#
# About 40 MB in all. Copy the repository (or just scripts/ and target/gpu-bundle/) to the GPU
# machine and run scripts/gpu-check.sh there. Needs what build-cuda.sh needs (set CUDA_HOME to
# a toolkit; see its header), and pip with access to PyPI for the wheels.
#
# --cpu bundles the default CPU build as diffii.gz instead (about 25 MB in all, no toolkit
# needed), for `gpu-check.sh --cpu-only` on a host CPU: small enough to travel with the
# repository's demo model and data (`--cpu-demo`). --baseline REV adds base-<rev>.gz, the CPU
# build of git revision REV (built in a worktree under target/), which `gpu-check.sh
# --cpu-bench` times beside diffii.gz in the same run: a kernel change measured before and after
# on a CPU no machine with Rust has. Give it several times to time each step of a series of
# changes (6 MB each).
#
#   scripts/gpu-bundle.sh [--fixtures DIR] [--python PY] [--cpu] [--baseline REV]...
set -euo pipefail
cd "$(dirname "$0")/.."
fixtures="${DIFFII_FIXTURES:-../shared/fixtures}"
python="python3"
cpu=0
baselines=()
while [ $# -gt 0 ]; do
  case "$1" in
    --fixtures) fixtures="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --cpu) cpu=1; shift ;;
    --baseline) baselines+=("$2"); shift 2 ;;
    *) echo "unknown argument $1 (use --fixtures DIR, --python PY, --cpu, --baseline REV)" >&2; exit 2 ;;
  esac
done
for d in tiny-sd tiny-sd-ref; do
  [ -d "$fixtures/$d" ] || { echo "$fixtures/$d not found: pass --fixtures DIR (the folder holding tiny-sd/ and tiny-sd-ref/)" >&2; exit 1; }
done
out=target/gpu-bundle
rm -rf "$out.tmp" && mkdir -p "$out.tmp/fixtures" "$out.tmp/wheels" "$out.tmp/tests"
if [ "$cpu" = 1 ]; then
  cargo build --release --locked
  strip -o "$out.tmp/diffii" target/release/diffii
else
  scripts/build-cuda.sh
  strip -o "$out.tmp/diffii" target/cuda/release/diffii
fi
gzip -9 "$out.tmp/diffii"
for baseline in "${baselines[@]}"; do
  rev="$(git rev-parse --verify "$baseline^{commit}")" || { echo "--baseline $baseline: not a git revision" >&2; exit 1; }
  tree="target/baseline-${rev:0:12}"
  [ -d "$tree" ] || git worktree add --detach "$tree" "$rev"
  # Its own target folder, so that neither build invalidates the other's.
  (cd "$tree" && cargo build --release --locked)
  strip -o "$out.tmp/base-${rev:0:12}" "$tree/target/release/diffii"
  gzip -9 "$out.tmp/base-${rev:0:12}"
done
cargo test --release --locked --no-run --test bf16 --test kernels --message-format=json \
  | "$python" -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])' \
  | while read -r name exe; do strip -o "$out.tmp/tests/$name" "$exe" && gzip -9 "$out.tmp/tests/$name"; done
[ -f "$out.tmp/tests/bf16.gz" ] && [ -f "$out.tmp/tests/kernels.gz" ] || { echo "building the kernel tests failed" >&2; exit 1; }
cp -r "$fixtures/tiny-sd" "$fixtures/tiny-sd-ref" "$out.tmp/fixtures/"
# The GPU image's Python (3.12) has torch, transformers, huggingface_hub, safetensors, numpy,
# Pillow, regex and requests; diffusers and importlib_metadata travel.
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d "$out.tmp/wheels" diffusers==0.42.1 importlib_metadata
rm -rf "$out" && mv "$out.tmp" "$out"
du -sh "$out"
echo "bundle ready in $out: on the GPU machine run scripts/gpu-check.sh --bundle $out --out DIR"
