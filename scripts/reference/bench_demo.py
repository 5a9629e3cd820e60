#!/usr/bin/env python3
"""CPU timing, in PyTorch + diffusers + transformers, of the demo-world stages that
`diffii bench --demo --compare-python` times, for the same-run ours / PyTorch ratios.

Everything runs on the shipped demo model (default models/fashion-mini-sd, diffusers layout):
its real weights, configs, tokenizer and scheduler, loaded with UNet2DConditionModel /
AutoencoderKL / CLIPTextModel / CLIPTokenizer / DDIMScheduler.from_pretrained (nothing is
downloaded).  Inputs are random (fixed seed): pixels U(-1, 1) [b, 3, 32, 32], latents and
posteriors N(0, 1) [b, 4, 8, 8]; the values do not matter for the timing.  float32,
torch.set_num_threads(--threads).  Each case: --warmup untimed calls, then --reps timed ones
(wall time by perf_counter, process CPU time by process_time); median / min / max reported.
OMP_WAIT_POLICY is set to PASSIVE unless the environment or --omp-wait-policy says otherwise:
with OpenMP's busy-waiting default, another busy process (a compiler on one of the 2 cores of
the development machine) made these steps up to 80x slower (concept step 5.3 s vs 0.064 s).
Training cases keep their model and optimiser state across calls (every call is one more
optimisation step, as in a training run).  Batch sizes, learning rates, weight decay, clip
norm, KL weight, warm-up and EMA decay come from <model>/training/pretrain_config.json
(demo recipe defaults when the file is missing).

Timed cases (the names are fixed; one call = what is listed):

"vae train step"  (src/train/pretrain/mod.rs `vae_loss` + `Loop::step`), vae.train(), batch
    vae.batch (32):
        x ~ U(-1, 1); post = vae.encode(x).latent_dist      # logvar clamped to [-30, 20]
        z = post.mean + post.std * randn;  d = vae.decode(z).sample - x
        kl = 0.5 * mean(mean^2 + exp(logvar) - 1 - logvar)    # mean over ALL elements
        loss = mean|d| + mean(d^2) + kl_weight * kl;  loss.item() (finite check)
        opt.zero_grad(set_to_none=True); loss.backward()
        clip_grad_norm_(all params, grad_clip); opt.step(); lr_scheduler.step()
    opt = torch.optim.AdamW(lr vae.lr, betas (0.9, 0.999), eps 1e-8, weight_decay), defaults
    otherwise (the for-loop implementation on CPU); lr_scheduler = diffusers
    get_cosine_schedule_with_warmup(vae.warmup, vae.steps).

"unet train step"  (`train_unet`): CLIPTextModel + UNet2DConditionModel trained jointly,
    both .train(), batch unet.batch (32):
        captions as pretraining draws them: "" with p caption_empty, else "an item" + one word
        of each pair dark/light, small/large, narrow/wide, plain/patterned kept with p
        caption_keep; ids = tokenizer(padding="max_length", max_length 16, truncation)
        z0 = (mean + exp(0.5 logvar) * randn) * scaling_factor   # rows of a stored posterior table
        noise ~ N(0, 1); t ~ U{0..999}; x_t = DDPMScheduler.add_noise(z0, noise, t)
        loss = mse(unet(x_t, t, text_encoder(ids)[0]).sample, noise);  loss.item()
        zero_grad; backward; clip_grad_norm_(text encoder + UNet params, grad_clip)
        AdamW(unet.lr, weight_decay) step; cosine-with-warm-up lr step;
        diffusers.training_utils.EMAModel(decay ema_decay).step(params)   # foreach=False default

"concept step"  (src/train/concepts.rs, the demo's per-class textual inversion: template
    "an item {concept}", init word "item", AdamW lr 0.03, weight decay 0, batch 5, no
    clipping, constant lr): tokens <class_0> .. <class_9> added to the tokenizer
    (add_tokens), the embedding table grown (resize_token_embeddings) and every new row set to
    the embedding of "item".  Text encoder and UNet frozen (requires_grad False); the token
    table is replaced by cat(original rows, concept rows) where ONE concept row (class 3) is
    the only trainable tensor, as our per-class phase variable.  One call:
        5 latents from one class's posteriors (as above, x scaling factor), noise, t ~ U{0..999},
        prompts "an item <class_3>" tokenised, x_t = add_noise, loss = mse(unet(x_t, t,
        text_encoder(ids)[0]).sample, noise); loss.item(); zero_grad; backward (reaches the
        row through the frozen UNet and text encoder); AdamW([row]) step.

"ddim inversion"  (src/synth/invert.rs `invert_items`, one chunk of --gen-batch (16) images),
    all models .eval(), torch.inference_mode():
        z = vae.encode(x).latent_dist.mean * scaling_factor     # x: 16 images U(-1, 1)
        ctx = text_encoder(tokenizer(["an item <class_{i % 10}>"]))[0]
        DDIMInverseScheduler(scheduler config).set_timesteps(--steps (25)); for each t:
            z = inv.step(unet(z, t, ctx).sample, t, z).prev_sample    # guidance 1: cond only
    per image = per call / 16.

"diffii generation"  (src/synth/diffii.rs `make`, one batch of --gen-batch (16) samples),
    .eval(), torch.inference_mode(); the unconditional embedding ("" -> text encoder) is made
    once outside the timing (our `prepare` does the same):
        z = circle slerp of two inverted latents per sample (Diff-II's circle interpolation)
        e1 = text_encoder("an item <class_k> <suffix>"), e2 = text_encoder("an item <class_k>")
        DDIMScheduler.set_timesteps(--steps (25)); stage 1 = steps with t >= 1000 (1 - strength)
        (strength 0.3) use e1, the rest e2; each step ONE UNet call on the batch of 32
        [uncond x 16, cond x 16], eps = eps_u + g (eps_c - eps_u) (g = --guidance, 1.5),
        z = DDIMScheduler.step(eps, t, z).prev_sample (eta 0)
        images = vae.decode(z / scaling_factor).sample
    per image = per call / 16.

Output: one line per finished case on stdout, `<case name>: {json}`, then a table.
--json OUT writes one object (layout as bench_sd15_cpu.py: metadata keys, then one key per
case name that ran):
    {"threads": int, "torch": str, "diffusers": str, "transformers": str,
     "cpu_capability": str, "model": str, "reps": int, "warmup": int, "omp_wait_policy": str,
     "cases": [case names in run order],
     "<case name>": {"batch": int,               # images per call (latents for training)
                     "median_s": float, "min_s": float, "max_s": float, "runs_s": [float],
                     "median_cpu_s": float, "runs_cpu_s": [float],   # process CPU seconds
                     "loadavg_before": float, "loadavg_after": float,
                     # per-image cases only ("ddim inversion", "diffii generation"):
                     "images": int, "median_s_per_image": float, "min_s_per_image": float,
                     "max_s_per_image": float,
                     # training cases: "loss_last": float (loss of the last timed step);
                     # generation: "steps", "guidance", "strength", "stage1_steps"
                     ...}}

Usage:
    .venv-ref/bin/python scripts/reference/bench_demo.py [--model models/fashion-mini-sd]
        [--threads 2] [--reps 5] [--warmup 1] [--only "vae train step,concept step"]
        [--steps 25 --gen-batch 16 --guidance 1.5 --strength 0.3 --concept-batch 5
         --concept-lr 0.03] [--omp-wait-policy PASSIVE|ACTIVE] [--json OUT.json]
    (--only takes case names; "_" or "-" may stand for the spaces, e.g. --only unet_train_step)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random

from timing import bench

CASES = ("vae train step", "unet train step", "concept step", "ddim inversion", "diffii generation")
PER_IMAGE = ("ddim inversion", "diffii generation")
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "models", "fashion-mini-sd")

# The demo recipe (PretrainSettings::demo in src/train/pretrain/mod.rs), used when the model
# folder has no training/pretrain_config.json.
DEMO_PRETRAIN = {
    "vae": {"steps": 300, "batch": 32, "lr": 1e-3, "warmup": 30},
    "unet": {"steps": 1200, "batch": 32, "lr": 5e-4, "warmup": 100},
    "kl_weight": 1e-4, "weight_decay": 1e-4, "grad_clip": 1.0, "ema_decay": 0.995,
    "caption_keep": 0.7, "caption_empty": 0.1,
}
# The demo world's captions and concept prompts (src/experiment/demo.rs, pretrain/captions.rs).
PREFIX = "an item"
WORD_PAIRS = (("dark", "light"), ("small", "large"), ("narrow", "wide"), ("plain", "patterned"))
SUFFIXES = ("dark", "light", "small", "large", "narrow", "wide", "plain", "patterned")
TEMPLATE = "an item {concept}"
INIT_WORD = "item"
DEMO_CLASSES = 10
TRAINED_CLASS = 3




def load_pretrain_config(model: str) -> dict:
    path = os.path.join(model, "training", "pretrain_config.json")
    cfg = json.loads(json.dumps(DEMO_PRETRAIN))
    if os.path.isfile(path):
        with open(path) as fh:
            cfg.update(json.load(fh))
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.normpath(DEFAULT_MODEL))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--only", default=",".join(CASES), help="comma-separated case names")
    ap.add_argument("--steps", type=int, default=25, help="DDIM steps of inversion and sampling")
    ap.add_argument("--gen-batch", type=int, default=16, help="images per inversion / generation call")
    ap.add_argument("--guidance", type=float, default=1.5)
    ap.add_argument("--strength", type=float, default=0.3)
    ap.add_argument("--concept-batch", type=int, default=5)
    ap.add_argument("--concept-lr", type=float, default=3e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--omp-wait-policy", default=None, choices=("PASSIVE", "ACTIVE"),
                    help="OMP_WAIT_POLICY for torch's OpenMP threads (default: the environment's, else PASSIVE)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    norm = lambda s: " ".join(s.replace("_", " ").replace("-", " ").split()).lower()  # noqa: E731
    which = [norm(s) for s in a.only.split(",") if s.strip()]
    unknown = [s for s in which if s not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; cases: {', '.join(CASES)}")

    # Before torch loads its OpenMP runtime: with the default (busy-waiting) policy, any other
    # process on the cores makes torch's threads spin against it (80x slower steps measured on
    # the 2-core development machine while a compiler ran); PASSIVE costs little when idle.
    if a.omp_wait_policy is not None:
        os.environ["OMP_WAIT_POLICY"] = a.omp_wait_policy
    else:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    import diffusers
    import transformers
    from diffusers import (AutoencoderKL, DDIMInverseScheduler, DDIMScheduler, DDPMScheduler,
                           UNet2DConditionModel)
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTextModel, CLIPTokenizer

    class ConceptEmbedding(nn.Module):
        """The token table our per-class concept training sees: the model's rows, then the concept
        rows with row `k` replaced by the trainable variable (everything else frozen)."""

        def __init__(self, base: torch.Tensor, rows: torch.Tensor, k: int):
            super().__init__()
            self.register_buffer("base", base.detach().clone())
            self.register_buffer("rows", rows.detach().clone())
            self.k = k
            self.row = nn.Parameter(rows[k : k + 1].detach().clone())

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            table = torch.cat([self.base, self.rows[: self.k], self.row, self.rows[self.k + 1 :]], 0)
            return F.embedding(ids, table)


    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    M = a.model
    cfg = load_pretrain_config(M)
    res: dict = {"threads": a.threads, "torch": torch.__version__, "diffusers": diffusers.__version__,
                 "transformers": transformers.__version__,
                 "cpu_capability": torch.backends.cpu.get_cpu_capability(), "model": os.path.abspath(M),
                 "reps": a.reps, "warmup": a.warmup,
                 "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "cases": []}

    def sub(name):
        return os.path.join(M, name)

    def tokenizer_():
        return CLIPTokenizer.from_pretrained(sub("tokenizer"))

    def tokenize(tok, prompts):
        return tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids

    def add_concepts(tok, te):
        """Adds <class_0..9>, grows the table, sets every new row to the init word's mean
        embedding (concepts.rs `init_row`); returns (tokens, base rows, concept rows)."""
        tokens = [f"<class_{i}>" for i in range(DEMO_CLASSES)]
        n0 = te.get_input_embeddings().weight.shape[0]
        assert tok.add_tokens(tokens) == len(tokens)
        te.resize_token_embeddings(len(tok), mean_resizing=False)
        w = te.get_input_embeddings().weight
        init_ids = tok(INIT_WORD, add_special_tokens=False).input_ids
        with torch.no_grad():
            init = w[init_ids].mean(0)
            for t in tokens:
                w[tok.convert_tokens_to_ids(t)] = init
        return tokens, w[:n0].detach(), w[n0:].detach()

    def report(name, d):
        res[name] = d
        res["cases"].append(name)
        print(f"{name}: " + json.dumps({k: v for k, v in d.items() if not k.startswith("runs_")}), flush=True)

    g = torch.Generator().manual_seed(a.seed)
    rng = random.Random(a.seed)
    sf = None

    def scaling():
        nonlocal sf
        if sf is None:
            sf = float(AutoencoderKL.load_config(sub("vae"))["scaling_factor"])
        return sf

    def caption():
        if rng.random() < cfg["caption_empty"]:
            return ""
        words = [PREFIX] + [rng.choice(p) for p in WORD_PAIRS if rng.random() < cfg["caption_keep"]]
        return " ".join(words)

    def pretrain_update(what, loss, params, opt, lr_s):
        """`Loop::step` of src/train/pretrain/mod.rs: finite check, backward, global gradient-norm
        clipping, AdamW step, learning-rate schedule step; returns the loss value."""
        v = loss.item()
        if not math.isfinite(v):
            raise RuntimeError(f"{what} loss is not finite")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        opt.step()
        lr_s.step()
        return v

    # ------------------------------------------------------------------ vae train step
    if "vae train step" in which:
        vae = AutoencoderKL.from_pretrained(sub("vae")).train()
        params = [p for p in vae.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg["vae"]["lr"], betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=cfg["weight_decay"])
        lr_s = get_cosine_schedule_with_warmup(opt, cfg["vae"]["warmup"], cfg["vae"]["steps"])
        b = cfg["vae"]["batch"]
        size = int(vae.config.sample_size)
        last = {}

        def vae_step():
            x = torch.rand(b, 3, size, size, generator=g) * 2 - 1
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
            d = vae.decode(z).sample - x
            kl = 0.5 * (post.mean.pow(2) + post.logvar.exp() - 1.0 - post.logvar).mean()
            loss = d.abs().mean() + d.pow(2).mean() + cfg["kl_weight"] * kl
            last["loss"] = pretrain_update("vae", loss, params, opt, lr_s)

        d = {"batch": b, "params": sum(p.numel() for p in params)}
        d.update(bench(vae_step, a.reps, a.warmup))
        d["loss_last"] = last["loss"]
        report("vae train step", d)
        del vae, opt

    # ------------------------------------------------------------------ unet train step
    if "unet train step" in which:
        tok = tokenizer_()
        te = CLIPTextModel.from_pretrained(sub("text_encoder")).train()
        unet = UNet2DConditionModel.from_pretrained(sub("unet")).train()
        noise_sched = DDPMScheduler.from_pretrained(sub("scheduler"))
        params = [p for p in list(te.parameters()) + list(unet.parameters()) if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg["unet"]["lr"], betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=cfg["weight_decay"])
        lr_s = get_cosine_schedule_with_warmup(opt, cfg["unet"]["warmup"], cfg["unet"]["steps"])
        ema = EMAModel(params, decay=cfg["ema_decay"])
        b = cfg["unet"]["batch"]
        c, s = int(unet.config.in_channels), int(unet.config.sample_size)
        # A stored posterior table, as pretraining keeps one row per image.
        table = 4096
        means = torch.randn(table, c, s, s, generator=g)
        logvars = torch.randn(table, c, s, s, generator=g) * 0.1 - 4.0
        T = int(noise_sched.config.num_train_timesteps)
        last = {}

        def unet_step():
            idx = torch.randint(0, table, (b,), generator=g)
            ids = tokenize(tok, [caption() for _ in range(b)])
            eps = torch.randn(b, c, s, s, generator=g)
            z0 = (means[idx] + (0.5 * logvars[idx]).exp() * eps) * scaling()
            noise = torch.randn(b, c, s, s, generator=g)
            t = torch.randint(0, T, (b,), generator=g)
            x_t = noise_sched.add_noise(z0, noise, t)
            pred = unet(x_t, t, encoder_hidden_states=te(ids)[0]).sample
            last["loss"] = pretrain_update("unet", F.mse_loss(pred, noise), params, opt, lr_s)
            ema.step(params)

        d = {"batch": b, "params": sum(p.numel() for p in params)}
        d.update(bench(unet_step, a.reps, a.warmup))
        d["loss_last"] = last["loss"]
        report("unet train step", d)
        del te, unet, opt, ema

    # ------------------------------------------------------------------ concept step
    if "concept step" in which:
        tok = tokenizer_()
        te = CLIPTextModel.from_pretrained(sub("text_encoder"))
        unet = UNet2DConditionModel.from_pretrained(sub("unet"))
        noise_sched = DDPMScheduler.from_pretrained(sub("scheduler"))
        tokens, base, rows = add_concepts(tok, te)
        te.requires_grad_(False)
        unet.requires_grad_(False)
        emb = ConceptEmbedding(base, rows, TRAINED_CLASS)
        te.set_input_embeddings(emb)
        assert te.get_input_embeddings() is emb
        te.train()
        unet.train()
        opt = torch.optim.AdamW([emb.row], lr=a.concept_lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        b = a.concept_batch
        c, s = int(unet.config.in_channels), int(unet.config.sample_size)
        # One class's stored posteriors (mean, std), as concepts.rs `encode_dataset` keeps them.
        pool = 50
        means = torch.randn(pool, c, s, s, generator=g)
        stds = torch.rand(pool, c, s, s, generator=g) * 0.1
        prompt = TEMPLATE.replace("{concept}", tokens[TRAINED_CLASS])
        T = int(noise_sched.config.num_train_timesteps)
        last = {}

        def concept_step():
            idx = torch.randint(0, pool, (b,), generator=g)
            z0 = (means[idx] + stds[idx] * torch.randn(b, c, s, s, generator=g)) * scaling()
            t = torch.randint(0, T, (b,), generator=g)
            ids = tokenize(tok, [prompt] * b)
            noise = torch.randn(b, c, s, s, generator=g)
            x_t = noise_sched.add_noise(z0, noise, t)
            pred = unet(x_t, t, encoder_hidden_states=te(ids)[0]).sample
            loss = F.mse_loss(pred, noise)
            v = loss.item()
            if not math.isfinite(v):
                raise RuntimeError("concept loss is not finite")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last["loss"] = v

        trainable = [p for p in list(te.parameters()) + list(unet.parameters()) if p.requires_grad]
        assert len(trainable) == 1 and trainable[0] is emb.row, "only the concept row may be trainable"
        d = {"batch": b, "trained_params": emb.row.numel()}
        d.update(bench(concept_step, a.reps, a.warmup))
        d["loss_last"] = last["loss"]
        report("concept step", d)
        del te, unet, opt

    # ------------------------------------------------ inference models (inversion, generation)
    if "ddim inversion" in which or "diffii generation" in which:
        tok = tokenizer_()
        te = CLIPTextModel.from_pretrained(sub("text_encoder")).eval()
        unet = UNet2DConditionModel.from_pretrained(sub("unet")).eval()
        vae = AutoencoderKL.from_pretrained(sub("vae")).eval()
        ddim = DDIMScheduler.from_pretrained(sub("scheduler"))
        tokens, _, _ = add_concepts(tok, te)
        b = a.gen_batch
        size = int(vae.config.sample_size)
        c, s = int(unet.config.in_channels), int(unet.config.sample_size)
        classes = [i % DEMO_CLASSES for i in range(b)]
        concept_prompts = [TEMPLATE.replace("{concept}", tokens[k]) for k in classes]

        def per_image(d):
            d["images"] = b
            for k in ("median_s", "min_s", "max_s"):
                d[f"{k}_per_image"] = d[k] / b
            return d

        if "ddim inversion" in which:
            inv = DDIMInverseScheduler.from_config(ddim.config)
            x = torch.rand(b, 3, size, size, generator=g) * 2 - 1

            def invert():
                with torch.inference_mode():
                    z = vae.encode(x).latent_dist.mean * scaling()
                    ctx = te(tokenize(tok, concept_prompts))[0]
                    inv.set_timesteps(a.steps)
                    for t in inv.timesteps:
                        z = inv.step(unet(z, t, encoder_hidden_states=ctx).sample, t, z).prev_sample
                    return z

            d = {"batch": b, "steps": a.steps}
            d.update(bench(invert, a.reps, a.warmup))
            report("ddim inversion", per_image(d))

        if "diffii generation" in which:
            za = torch.randn(b, c, s, s, generator=g)
            zb = torch.randn(b, c, s, s, generator=g)
            draws = torch.rand(b, generator=g).tolist()
            stage1_prompts = [f"{p} {SUFFIXES[i % len(SUFFIXES)]}" for i, p in enumerate(concept_prompts)]
            with torch.inference_mode():
                uncond = te(tokenize(tok, [""]))[0]
            ddim.set_timesteps(a.steps)
            thr = ddim.config.num_train_timesteps * (1.0 - a.strength)
            k1 = sum(1 for _ in itertools.takewhile(lambda t: not (float(t) < thr), ddim.timesteps))

            def slerp(p, q, t, thr_dot=0.9995):
                cos = float((p * q).sum() / (p.norm() * q.norm()))
                theta = math.acos(max(-1.0, min(1.0, cos)))
                if abs(cos) > thr_dot:
                    return (1 - t) * p + t * q
                sn = math.sin(theta)
                return math.sin((1 - t) * theta) / sn * p + math.sin(t * theta) / sn * q

            def circle(p, q, frac):
                cos = float((p * q).sum() / (p.norm() * q.norm()))
                theta = max(math.acos(max(-1.0, min(1.0, cos))), 1e-12)
                return slerp(p, q, -(frac * 2 * math.pi / theta))

            def generate():
                with torch.inference_mode():
                    z = torch.stack([circle(za[i], zb[i], draws[i]) for i in range(b)])
                    e1 = te(tokenize(tok, stage1_prompts))[0]
                    e2 = te(tokenize(tok, concept_prompts))[0]
                    u = uncond.expand(b, -1, -1)
                    ddim.set_timesteps(a.steps)
                    for i, t in enumerate(ddim.timesteps):
                        ctx = torch.cat([u, e1 if i < k1 else e2])
                        out = unet(torch.cat([z, z]), t, encoder_hidden_states=ctx).sample
                        eu, ec = out.chunk(2)
                        z = ddim.step(eu + a.guidance * (ec - eu), t, z).prev_sample
                    return vae.decode(z / scaling()).sample

            d = {"batch": b, "unet_batch": 2 * b, "steps": a.steps, "guidance": a.guidance,
                 "strength": a.strength, "stage1_steps": k1}
            d.update(bench(generate, a.reps, a.warmup))
            report("diffii generation", per_image(d))

    # ------------------------------------------------------------------ table
    print()
    print(f"{'case':<20} {'batch':>5} {'median s':>9} {'min s':>8} {'max s':>8} {'s/image':>8}")
    for name in res["cases"]:
        d = res[name]
        per = f"{d['median_s_per_image']:8.4f}" if "median_s_per_image" in d else f"{'-':>8}"
        print(f"{name:<20} {d['batch']:>5} {d['median_s']:9.4f} {d['min_s']:8.4f} {d['max_s']:8.4f} {per}")
    print(f"(torch {res['torch']}, diffusers {res['diffusers']}, transformers {res['transformers']}, "
          f"{a.threads} threads, {a.warmup} warm-up + {a.reps} timed calls each)")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
