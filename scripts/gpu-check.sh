#!/usr/bin/env bash
# The GPU check: run on a Linux x86-64 machine with an NVIDIA GPU (compute capability >= 8.0),
# its driver, and a Python whose PyTorch has CUDA 13; no Rust toolchain and no network needed.
# Prepare the bundle first, on a CPU machine: scripts/gpu-bundle.sh.
#
#   scripts/gpu-check.sh [--bundle target/gpu-bundle] [--out DIR] [--python python3] [--reps N]
#                        [--device cuda:N] [--cpu-bench [--cpu-threads N] [--cpu-precisions f32,bf16]]
#                        [--cpu-demo] [--cpu-only]
#
# It runs, writing each step's output to DIR (default gpu-check-out/) and to the terminal:
#   1. parity.txt          diffii parity of the tiny fixture on the GPU (--device), at the CPU's
#                          tolerances (exit status 1 when a tensor is outside them)
#   2. batch.txt           the same augmentation of two fixture images (tiny model, 64 px) at
#                          batch 1, 3 and 8 on the GPU: every written file must be identical
#                          (exit status 1 when a batch size changes a byte)
#   3. bench-f32.txt/json  SD-1.5-shaped UNet steps at 64x64 latents, batch 1 / 4 / 8, the text
#                          encoder (batch 2), VAE encode / decode at 512 px, and one whole 512 px
#                          Diff-II generation (50 + 50 inversion steps, 50 guided steps;
#                          synthetic weights), f32 (no TF32 on either side); with PyTorch +
#                          diffusers on the same shapes in the same run for every case (the
#                          whole generation composed of diffusers' models and DDIM steps, as
#                          the research code does); and the GPU time of each op class (conv,
#                          linear, attention, ...) per case
#   4. bench-f16.*, bench-bf16.*  the UNet cases and the whole generation with the UNet in f16
#                          and in bf16 (text encoder and VAE stay f32), PyTorch likewise
#   5. cpu-kernels.txt     the CPU kernel tests (tests/bf16.rs, tests/kernels.rs) on this host's
#                          CPU, which on GPU servers often has AMX: each test says which bf16
#                          kernels it ran and which it skipped for lack of the hardware
#   6. with --cpu-bench:   cpu-f32.*, cpu-bf16.*  the CPU's own speed against PyTorch on the
#                          CPU, --cpu-threads threads (default 2): the SD-1.5 UNet at batch 1,
#                          64/32/16 latents, and the text encoder, in f32 and in bf16 (AMX where
#                          the CPU has it; bf16 with the VAE), each op class's time beside
#                          PyTorch's (--profile); about 7 minutes at 2 threads on an
#                          Emerald-Rapids Xeon.
#                          --cpu-precisions picks f32 and/or bf16. For each base-<rev>.gz of
#                          the bundle (gpu-bundle.sh --baseline REV), cpu-bf16-base-<rev>.*
#                          times that build's bf16 UNet and text encoder right after, without
#                          PyTorch (half a minute each on the EPYC)
#   7. with --cpu-demo:    cpu-demo.*  the demo world stage by stage against PyTorch on the CPU
#                          (`bench --demo`, about a minute on 2 threads; needs the repository's
#                          models/fashion-mini-sd and data/)
# --cpu-only runs steps 5 to 7 alone, without a GPU (a --cpu bundle needs no CUDA libraries).
# UNet evaluations per second at batch B = B / the UNet step's seconds; a Diff-II sample costs 100
# of them (50 guided steps, two evaluations each), plus its inputs' inversions, done once per input.
set -uo pipefail
cd "$(dirname "$0")/.."
bundle=target/gpu-bundle
out=gpu-check-out
python=python3
reps=5
device=cuda
cpu_bench=0
cpu_threads=2
cpu_precisions=f32,bf16
cpu_demo=0
gpu=1
while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) bundle="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --reps) reps="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --cpu-bench) cpu_bench=1; shift ;;
    --cpu-threads) cpu_threads="$2"; shift 2 ;;
    --cpu-precisions) cpu_precisions="$2"; shift 2 ;;
    --cpu-demo) cpu_demo=1; shift ;;
    --cpu-only) gpu=0; cpu_bench=1; shift ;;
    *) echo "unknown argument $1 (use --bundle DIR, --out DIR, --python PY, --reps N, --device cuda:N, --cpu-bench, --cpu-threads N, --cpu-precisions LIST, --cpu-demo, --cpu-only)" >&2; exit 2 ;;
  esac
done
[ -f "$bundle/diffii.gz" ] || { echo "$bundle/diffii.gz not found: make the bundle with scripts/gpu-bundle.sh on a CPU machine" >&2; exit 1; }
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
bin="$work/diffii"
gunzip -c "$bundle/diffii.gz" >"$bin" && chmod +x "$bin"

# CUDA libraries: cuBLAS, cuRAND, NVRTC and the runtime from PyTorch's wheels (or a system
# toolkit), the driver's libcuda from wherever the driver put it.
site="$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
libdirs="$(find "$site/nvidia" /usr/local/cuda/lib64 \( -name 'libcublas.so.*' -o -name 'libcurand.so.*' -o -name 'libnvrtc.so.*' -o -name 'libcudart.so.*' \) \
  -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)"
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64; do
  [ -e "$d/libcuda.so.1" ] && libdirs="$libdirs:$d"
done
export LD_LIBRARY_PATH="$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if ldd "$bin" | grep -q "not found"; then
  ldd "$bin" | grep "not found" >&2
  echo "CUDA libraries missing (looked in $site/nvidia and /usr/local/cuda/lib64): install PyTorch with CUDA 13, or set LD_LIBRARY_PATH" >&2
  exit 1
fi
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" "$bundle"/wheels/*.whl \
  || { echo "installing the bundled wheels failed" >&2; exit 1; }
export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
  "$python" -c 'import torch, diffusers, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "| diffusers", diffusers.__version__, "| transformers", transformers.__version__)'
  "$bin" --version
} 2>&1 | tee "$out/environment.txt"

status=0
step() {
  local name="$1"; shift
  echo "== $name: $*" | tee "$out/$name.txt"
  local t0=$SECONDS
  "$@" 2>&1 | tee -a "$out/$name.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "== $name failed (exit $rc)" | tee -a "$out/$name.txt"; status=1; }
  echo "== $name: $((SECONDS - t0)) s wall" | tee -a "$out/$name.txt"
}
fx="$bundle/fixtures"
if [ "$gpu" = 1 ]; then
  step parity "$bin" parity --model "$fx/tiny-sd" --reference "$fx/tiny-sd-ref" --device "$device"
  # A sample's bytes must not depend on its batch (nor, so, on how a run is sharded).
  mkdir -p "$work/data/sparrow" && cp "$fx/tiny-sd-ref/input_a.png" "$fx/tiny-sd-ref/input_b.png" "$work/data/sparrow/"
  batch_check() {
    local b rc=0
    for b in 1 3 8; do
      "$bin" augment --model "$fx/tiny-sd" --data "$work/data" --superclass bird --size 64 --inversion-steps 20 --steps 20 \
        --per-class 8 --batch "$b" --device "$device" --quiet --out "$work/batch-$b" || return 1
    done
    for b in 3 8; do
      if diff -r -q -x .diffii.lock "$work/batch-1" "$work/batch-$b"; then
        echo "batch $b: every file identical to batch 1"
      else
        echo "batch $b: differs from batch 1"; rc=1
      fi
    done
    return $rc
  }
  step batch batch_check
  common=(--sd15 --device "$device" --sd15-latents 64 --sd15-batches 1,4,8 --sd15-flow --reps "$reps" --warmup 2
    --compare-python "$python" --python-script scripts/reference/bench_sd15_cpu.py)
  step bench-f32 "$bin" bench "${common[@]}" --text-vae --sd15-vae --profile --json "$out/bench-f32.json"
  step bench-f16 "$bin" bench "${common[@]}" --dtype f16 --json "$out/bench-f16.json"
  step bench-bf16 "$bin" bench "${common[@]}" --dtype bf16 --json "$out/bench-bf16.json"
fi
kernel_tests() {
  local t rc=0
  for t in bf16 kernels; do
    [ -f "$bundle/tests/$t.gz" ] || { echo "$bundle/tests/$t.gz not found: remake the bundle with scripts/gpu-bundle.sh"; return 1; }
    gunzip -c "$bundle/tests/$t.gz" >"$work/test-$t" && chmod +x "$work/test-$t"
    DIFFII_FIXTURES="$fx" "$work/test-$t" --test-threads 1 --nocapture || rc=1
  done
  return $rc
}
step cpu-kernels kernel_tests
if [ "$cpu_bench" = 1 ]; then
  cpu=(--sd15 --sd15-latents 64,32,16 --sd15-batches 1 --text-vae --reps 3 --warmup 1
    --compare-python "$python" --python-script scripts/reference/bench_sd15_cpu.py)
  case ",$cpu_precisions," in *,f32,*)
    step cpu-f32 env RAYON_NUM_THREADS="$cpu_threads" "$bin" bench "${cpu[@]}" --profile --json "$out/cpu-f32.json" ;;
  esac
  case ",$cpu_precisions," in *,bf16,*)
    step cpu-bf16 env RAYON_NUM_THREADS="$cpu_threads" "$bin" bench "${cpu[@]}" --sd15-vae --precision bf16 --profile \
      --json "$out/cpu-bf16.json"
    for base in "$bundle"/base-*.gz; do
      [ -f "$base" ] || continue
      rev="$(basename "$base" .gz)"
      gunzip -c "$base" >"$work/$rev" && chmod +x "$work/$rev"
      step "cpu-bf16-$rev" env RAYON_NUM_THREADS="$cpu_threads" "$work/$rev" bench --sd15 --sd15-latents 64,32,16 \
        --sd15-batches 1 --text-vae --reps 3 --warmup 1 --precision bf16 --profile --json "$out/cpu-bf16-$rev.json"
    done ;;
  esac
fi
if [ "$cpu_demo" = 1 ]; then
  if [ -d models/fashion-mini-sd ] && [ -d data ]; then
    step cpu-demo env RAYON_NUM_THREADS="$cpu_threads" "$bin" bench --demo --reps 3 --warmup 1 \
      --compare-python "$python" --python-script scripts/reference/bench_sd15_cpu.py --json "$out/cpu-demo.json"
  else
    echo "== cpu-demo: models/fashion-mini-sd or data/ not found: run from a copy of the whole repository" | tee "$out/cpu-demo.txt"
    status=1
  fi
fi
exit $status
