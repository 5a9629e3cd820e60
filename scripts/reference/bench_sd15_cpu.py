#!/usr/bin/env python3
"""Timing of FULL-SIZE SD-1.5 components with random weights (nothing is downloaded), on the
CPU or (--device cuda) a GPU.

Builds SD-1.5's UNet2DConditionModel, CLIP ViT-L/14 text encoder and AutoencoderKL from
their configs (written out below), counts parameters, counts FLOPs with
torch.utils.flop_counter.FlopCounterMode (matmul / conv / attention only; elementwise ops,
norms and softmax are not counted) and times forwards in float32 (or, with --dtype bf16, with
model and inputs converted by .to(torch.bfloat16)) under torch.inference_mode with
torch.set_num_threads(--threads).  Each timing is repeated --reps times after --warmup
untimed runs; the median (and min/max) are reported.  On a GPU each call ends with
torch.cuda.synchronize(), and --dtype f16 is available.

With --profile (CPU only) one more call of each UNet, text encoder and VAE case runs under
torch.profiler, and its ops' self times are summed into `diffii bench --profile`'s op classes
(`profile` in the case's JSON: the classes, the profiled call's wall time, the slowest ops).

UNet cases: unet64 (batch 2, 64x64), unet32 (batch 2, 32x32), unet64b1 (batch 1, 64x64), or any
unet_b<B>_l<L> (batch B, L x L latent).

flow: one whole Diff-II image at 512 px as `diffii bench --sd15-flow` runs it: three prompts
encoded, two random 512 px images encoded, each DDIM-inverted for --flow-steps steps (batch 1,
stage-2 prompt), slerped at t = 0.5, --flow-steps guided DDIM steps (CFG 7.5 at batch 2, the
stage-1 prompt while t >= 700, i.e. strength 0.3, then the stage-2 prompt) and decoded. The
UNet runs in --dtype and the text encoder and VAE in f32, as `--dtype` does on our side; with
--flow-all-dtype they run in --dtype too, as our `--precision bf16` does on the CPU. The DDIM
steps are ref_diffii.py's, which match diffusers' DDIMScheduler / DDIMInverseScheduler.

Usage:
    .venv-ref/bin/python scripts/reference/bench_sd15_cpu.py [--threads 2] [--reps 5] [--warmup 1]
        [--only unet64,unet32,unet64b1,text,vae_enc,vae_dec,flow] [--flow-steps 50]
        [--flow-all-dtype] [--dtype f32|bf16|f16] [--device cpu|cuda] [--profile] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from timing import bench

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    only_cross_attention=False,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
    use_linear_projection=False,
    upcast_attention=False,
)

SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

SD15_CLIP_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)


def nparams(m) -> int:
    return sum(p.numel() for p in m.parameters())


def count_flops(fn) -> tuple[int, dict]:
    with FlopCounterMode(display=False) as fcm:
        fn()
    by_op = {str(k): int(v) for k, v in fcm.get_flop_counts().get("Global", {}).items()}
    return int(fcm.get_total_flops()), by_op




# `diffii bench --profile`'s op classes, by ATen op name (without "aten::"). Upsampling, which
# our convolutions read through, counts as layout; anything else unnamed here is "other".
LAYOUT_OPS = {"copy_", "_to_copy", "to", "contiguous", "clone", "cat", "view", "reshape", "permute",
              "transpose", "t", "empty", "empty_like", "zeros", "resize_", "as_strided", "expand",
              "chunk", "split", "slice", "select", "unsqueeze", "squeeze", "flatten", "narrow",
              "stack", "index_select", "embedding", "pad", "constant_pad_nd", "fill_", "zero_"}
ELEMENTWISE_OPS = {"add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_", "rsub", "neg", "silu",
                   "silu_", "gelu", "sigmoid", "exp", "sin", "cos", "tanh", "pow", "sqrt", "rsqrt",
                   "clamp", "clamp_", "where", "mean", "sum", "arange", "masked_fill",
                   "masked_fill_", "erf", "lt", "gt", "ge", "le", "eq", "argmax", "abs"}


def op_class(name: str) -> str:
    n = name.removeprefix("aten::")
    if "scaled_dot_product" in n or "flash_attention" in n or n in ("bmm", "baddbmm", "baddbmm_", "_softmax", "softmax"):
        return "attention"
    if "conv" in n:
        return "conv"
    if n in ("addmm", "mm", "matmul", "linear", "_addmm_activation") or "linear" in n:
        return "matmul/linear"
    if "group_norm" in n:
        return "group norm"
    if "layer_norm" in n:
        return "layer norm"
    if n in LAYOUT_OPS or "upsample" in n:
        return "copies/layout"
    if n in ELEMENTWISE_OPS:
        return "elementwise"
    return "other"


def profile_call(fn) -> dict:
    """One call of fn under torch.profiler: the ops' self CPU times summed by op class (an op's
    self time is its wall time on the calling thread less its children's, intra-op threads
    included), "other" being the call's wall time less the classified ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        total = time.perf_counter() - t0
    classes: dict = {}
    ops = []
    for e in prof.key_averages():
        secs = e.self_cpu_time_total / 1e6
        if secs <= 0:
            continue
        ops.append((e.key, secs, e.count))
        c = op_class(e.key)
        if c != "other":
            classes[c] = classes.get(c, 0.0) + secs
    classes["other"] = max(0.0, total - sum(classes.values()))
    ops.sort(key=lambda o: -o[1])
    return {"total_s": total, "classes": classes,
            "top_ops": [{"op": k, "self_s": s, "calls": n} for k, s, n in ops[:12]]}


def diffii_flow(dev, dtype, steps: int, all_dtype: bool):
    """The whole Diff-II flow at SD-1.5 shapes (see the module doc), built once; returns the
    call that runs it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ref_diffii import ddim_inverse_step, ddim_step, slerp

    side = dtype if all_dtype else torch.float32
    te = CLIPTextModel(CLIPTextConfig(**SD15_CLIP_TEXT)).eval().to(dev, side)
    vae = AutoencoderKL(**SD15_VAE).eval().to(dev, side)
    unet = UNet2DConditionModel(**SD15_UNET).eval().to(dev, dtype)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = [float(a) for a in torch.cumprod(1.0 - betas, 0)]
    ratio = 1000 // steps
    t_inv = [i * ratio + 1 for i in range(steps)]  # "leading" spacing, steps_offset 1
    t_den = t_inv[::-1]
    ids = torch.randint(0, 49406, (3, 77)).to(dev)
    images = torch.randn(2, 3, 512, 512).tanh().to(dev, side)
    sf = SD15_VAE["scaling_factor"]

    def flow():
        with torch.inference_mode():
            emb = te(ids)[0].to(dtype)
            uncond, stage1, stage2 = emb[0:1], emb[1:2], emb[2:3]
            inverted = []
            for i in range(2):
                x = (vae.encode(images[i:i + 1]).latent_dist.mean * sf).to(dtype)
                for t in t_inv:
                    eps = unet(x, torch.tensor([t], device=dev), encoder_hidden_states=stage2).sample
                    x = ddim_inverse_step(eps, t, x, ac, ratio)
                inverted.append(x)
            x, _, _ = slerp(inverted[0].float(), inverted[1].float(), 0.5)
            x = x.to(dtype)
            for t in t_den:
                e = torch.cat([uncond, stage1 if t >= 1000 * (1 - 0.3) else stage2])
                eps_u, eps_c = unet(torch.cat([x, x]), torch.tensor([t], device=dev), encoder_hidden_states=e).sample.chunk(2)
                x = ddim_step(eps_u + 7.5 * (eps_c - eps_u), t, x, ac, ratio)
            return vae.decode((x / sf).to(side)).sample

    return flow


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--only", default="unet64,unet32,unet64b1,text,vae_enc,vae_dec")
    ap.add_argument("--no-flops", action="store_true")
    ap.add_argument("--dtype", choices=("f32", "bf16", "f16"), default="f32")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--flow-steps", type=int, default=50, help="DDIM steps of the flow's inversions and sampling")
    ap.add_argument("--flow-all-dtype", action="store_true", help="the flow's text encoder and VAE in --dtype too")
    ap.add_argument("--profile", action="store_true", help="also profile one call of each case by op class (CPU)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.profile and args.device != "cpu":
        ap.error("--profile times the CPU's ops; use it with --device cpu")
    which = set(args.only.split(","))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    dev = torch.device(args.device)
    res: dict = {"threads": args.threads, "torch": torch.__version__,
                 "cpu_capability": torch.backends.cpu.get_cpu_capability(), "dtype": args.dtype,
                 "device": args.device}
    if dev.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(dev)
        # Like our side, f32 products are true f32 (no TF32).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    def synced(f):
        if dev.type != "cuda":
            return f

        def g():
            out = f()
            torch.cuda.synchronize(dev)
            return out

        return g

    legacy = {"unet64": (2, 64), "unet32": (2, 32), "unet64b1": (1, 64)}
    unet_cases = []
    for name in args.only.split(","):
        if name in legacy:
            unet_cases.append((name, *legacy[name]))
        elif name.startswith("unet_b"):
            b, l = name[len("unet_b"):].split("_l")
            unet_cases.append((name, int(b), int(l)))

    def report(name, d):
        res[name] = d
        print(name, json.dumps({k: v for k, v in d.items() if k not in ("flops_by_op", "profile")}), flush=True)
        if "profile" in d:
            p = d["profile"]
            print("  profile", json.dumps({k: round(v, 4) for k, v in p["classes"].items()}), flush=True)
            for o in p["top_ops"]:
                print(f"    {o['op']:<55} {o['self_s']:.4f} s {o['calls']:>5} calls", flush=True)

    def measure(d, f, reps):
        """Into d: f's FLOPs (unless --no-flops), its timing, and with --profile one profiled call."""
        if not args.no_flops:
            d["flops"], d["flops_by_op"] = count_flops(f)
        d.update(bench(f, reps, args.warmup))
        if args.profile:
            d["profile"] = profile_call(f)
        return d

    if unet_cases:
        from diffusers import UNet2DConditionModel

        t0 = time.perf_counter()
        unet = UNet2DConditionModel(**SD15_UNET).eval().to(dev, dtype)
        report("unet_build", {"params": nparams(unet), "build_s": time.perf_counter() - t0})
        for name, b, s in unet_cases:
            x = torch.randn(b, 4, s, s).to(dev, dtype)
            e = torch.randn(b, 77, 768).to(dev, dtype)
            t = torch.tensor([501], device=dev)

            @synced
            def f(x=x, e=e, t=t):
                with torch.inference_mode():
                    return unet(x, t, encoder_hidden_states=e).sample

            d = measure({"batch": b, "latent": s}, f, args.reps)
            if "flops" in d:
                d["achieved_gflops"] = d["flops"] / d["median_s"] / 1e9
            report(name, d)
        del unet

    if "text" in which:
        from transformers import CLIPTextConfig, CLIPTextModel

        te = CLIPTextModel(CLIPTextConfig(**SD15_CLIP_TEXT)).eval().to(dev, dtype)
        ids = torch.randint(0, 49406, (2, 77)).to(dev)

        @synced
        def f():
            with torch.inference_mode():
                return te(ids)[0]

        report("clip_text_b2", measure({"params": nparams(te), "batch": 2, "tokens": 77}, f, args.reps))
        del te

    if which & {"vae_enc", "vae_dec"}:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL(**SD15_VAE).eval().to(dev, dtype)
        res["vae_params"] = nparams(vae)
        if "vae_enc" in which:
            x = torch.randn(1, 3, 512, 512).clamp(-1, 1).to(dev, dtype)

            @synced
            def f():
                with torch.inference_mode():
                    return vae.encode(x).latent_dist.mean

            report("vae_encode_512", measure({"params": nparams(vae), "image": 512}, f, max(1, args.reps // 2 + 1)))
        if "vae_dec" in which:
            z = torch.randn(1, 4, 64, 64).to(dev, dtype)

            @synced
            def f():
                with torch.inference_mode():
                    return vae.decode(z).sample

            report("vae_decode_512", measure({"latent": 64}, f, max(1, args.reps // 2 + 1)))
        del vae

    if "flow" in which:
        d = {"steps": args.flow_steps}
        d.update(bench(synced(diffii_flow(dev, dtype, args.flow_steps, args.flow_all_dtype)), args.reps, args.warmup))
        report("diffii_flow_sd15", d)

    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
