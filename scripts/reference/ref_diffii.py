#!/usr/bin/env python3
"""Reference (peer) implementation of the Diff-II generation flow on a diffusers SD-1.x folder.

Flow (one synthetic sample from two real images A, B of the same class):
  1. concepts:   add the placeholder tokens of OUT/concepts/learned_embeds.safetensors to the
                 tokenizer (tokenizer.add_tokens), grow the text encoder's token-embedding table
                 (resize_token_embeddings) and write the learned rows -- as Diff-II's loader does.
  2. text:       CLIP tokenisation padded to 77 with <|endoftext|>, truncation on, NO attention
                 mask (SD-1.x); embeddings = text_encoder(ids)[0] = last_hidden_state (after the
                 final LayerNorm).  uncond = "" (empty prompt, also padded to 77).
  3. encode:     x = 2 * (uint8 / 255) - 1, NCHW float; z0 = vae.encode(x).latent_dist.mean *
                 vae.config.scaling_factor (0.18215).  (mean, not a sample.)
  4. inversion:  DDIM inversion, N_inv steps, guidance 1 (conditional branch only, prompt =
                 concept prompt B), eta 0.  See CONVENTIONS below.
  5. interp:     z = slerp(zA_T, zB_T, t) -- standard slerp, theta = arccos(<a,b>/(|a||b|)) over
                 ALL elements; lerp when |cos theta| > 0.9995.  Optionally Diff-II's "circle"
                 variant (see --interp circle).
  6. denoise:    DDIM (eta 0) from z, N steps, classifier-free guidance w:
                 eps = eps_u + w * (eps_c - eps_u), batch [uncond, cond] in ONE UNet call (batch 2).
                 Stage 1 (the first K steps = the high-noise ones) uses prompt A (concept +
                 context suffix), stage 2 (the rest) uses prompt B (concept only).
  7. decode:     img = vae.decode(z / scaling_factor).sample; (img / 2 + 0.5).clamp(0, 1);
                 uint8 = round(x * 255) (diffusers' numpy_to_pil convention; the official Diff-II
                 code truncates with .to(torch.uint8) instead -- both are saved).

CONVENTIONS (diffusers 0.42 DDIMScheduler / DDIMInverseScheduler with SD-1.5 config:
  num_train_timesteps 1000, scaled_linear betas 0.00085..0.012, set_alpha_to_one False,
  steps_offset 1, clip_sample False, prediction_type epsilon, timestep_spacing "leading"):
  * betas = linspace(sqrt(0.00085), sqrt(0.012), 1000, float32) ** 2;
    alphas_cumprod = cumprod(1 - betas) in float32 (saved as `alphas_cumprod`).
  * step_ratio r = 1000 // N.  Denoise timesteps (descending): t_i = (N-1-i)*r + 1, i.e. for N=50
    [981, 961, ..., 21, 1].  Inversion timesteps (ascending): [1, 21, ..., 981].
  * DDIM denoise step at t (eta 0):  t_prev = t - r;  a_t = ac[t];
    a_prev = ac[t_prev] if t_prev >= 0 else ac[0]   (set_alpha_to_one False -> "final alpha" is
    alphas_cumprod[0] = 0.99915, NOT 1.0);
    x0 = (x - sqrt(1 - a_t) * eps) / sqrt(a_t);  x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps.
  * DDIM inversion step "to" t (DDIMInverseScheduler.step(eps, t, x)): the UNet is evaluated at
    the TARGET timestep t on the current latent (which sits at t - r); t_from = t - r;
    a_from = ac[t_from] if t_from >= 0 else ac[0]  (set_alpha_to_one False -> initial alpha is
    alphas_cumprod[0]; for the first step, t = 1, t_from = -19 -> ac[0]);  a_to = ac[t];
    x0 = (x - sqrt(1 - a_from) * eps) / sqrt(a_from);  x = sqrt(a_to) * x0 + sqrt(1 - a_to) * eps.
    Note the final inverted latent sits at t = 981 (N=50), and denoising starts at 981 too.
  * UNet timestep input: the integer t as an int64 tensor; sinusoidal embedding of
    block_out_channels[0] dims, flip_sin_to_cos True (cos first), downscale_freq_shift 0.
  * No input scaling (DDIM scale_model_input is the identity, init_noise_sigma 1).
  * Two-stage split: with --strength s (Diff-II's parameter), stage 1 = steps whose t >= 1000*(1-s)
    (Diff-II: `if t < 1000*(1-strength): concept prompt else suffix prompt`); --stage1-steps K
    overrides with "first K steps".  s=0.3, N=50 -> K = 15 (t = 981 .. 701).
  * Everything float32 on CPU (--dtype float64 re-runs the same flow in float64, with the same
    float32 alphas_cumprod cast to float64, to measure the float32 error floor).

Output: OUT_DIR/ref_diffii.safetensors (all tensors below, float32 unless noted; metadata
"config" = JSON of every setting, prompt, token id list and derived value), OUT_DIR/ref_diffii.json
(same config + stats + timings), OUT_DIR/input_a.png, input_b.png (the two inputs), output.png.

Usage:
    .venv-ref/bin/python scripts/reference/ref_diffii.py --model fixtures/tiny-sd --out-dir fixtures/tiny-sd-ref
    (see --help for steps, guidance, strength, slerp t, threads, dtype, own input images)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


# ----------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------


def synth_image(size: int, seed: int) -> np.ndarray:
    """Deterministic stand-in for a 'real photo': smooth background gradient, a coloured ellipse
    ('the object'), a darker 'branch' stripe and mild seeded noise.  uint8 HxWx3."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / (size - 1)
    c0, c1 = rng.uniform(0.2, 0.9, 3), rng.uniform(0.1, 0.8, 3)
    ang = rng.uniform(0, 2 * np.pi)
    g = 0.5 + 0.5 * (np.cos(ang) * (xx - 0.5) + np.sin(ang) * (yy - 0.5)) / 0.7071
    img = c0[None, None] * (1 - g[..., None]) + c1[None, None] * g[..., None]
    cx, cy = rng.uniform(0.35, 0.65, 2)
    rx, ry = rng.uniform(0.12, 0.25, 2)
    body = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    img[body] = rng.uniform(0.0, 1.0, 3)
    yb = rng.uniform(0.65, 0.85)
    branch = np.abs(yy - (yb + 0.1 * (xx - 0.5))) < 0.03
    img[branch] = img[branch] * 0.3
    img = img + rng.normal(0, 0.02, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def load_image_u8(path: str, size: int) -> np.ndarray:
    img = Image.open(path).convert("RGB")
    if img.size != (size, size):
        # Diff-II resizes with PIL LANCZOS; a Rust port that must match bit-for-bit should be
        # fed pre-sized images instead.
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8).copy()


def u8_to_model(img: np.ndarray, dtype) -> torch.Tensor:
    x = torch.from_numpy(img).permute(2, 0, 1)[None].to(torch.float32) / 255.0  # ToTensor()
    return (2.0 * x - 1.0).to(dtype)


# ----------------------------------------------------------------------------------------
# math
# ----------------------------------------------------------------------------------------


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = 0.9995):
    """Standard slerp over the whole tensor.  t may lie outside [0, 1] (great-circle walk)."""
    cos = torch.sum(a * b) / (torch.norm(a) * torch.norm(b))
    if torch.abs(cos) > dot_threshold:
        return (1.0 - t) * a + t * b, cos, None
    theta = torch.acos(cos)
    s = torch.sin(theta)
    return torch.sin((1.0 - t) * theta) / s * a + torch.sin(t * theta) / s * b, cos, theta


def diffii_circle(a: torch.Tensor, b: torch.Tensor, alpha: float):
    """Diff-II's official rand_slerp with a given alpha (they draw alpha ~ U(0, 2*pi/theta)):
    sin((1+alpha)theta)/sin(theta) * a - sin(alpha*theta)/sin(theta) * b  ==  slerp(a, b, -alpha)."""
    theta = torch.acos(torch.sum(a * b) / (torch.norm(a) * torch.norm(b)))
    return torch.sin((1 + alpha) * theta) / torch.sin(theta) * a - torch.sin(alpha * theta) / torch.sin(theta) * b


def ddim_step(eps, t, x, ac, ratio):
    """diffusers DDIMScheduler.step, eta=0, epsilon prediction, clip_sample False,
    set_alpha_to_one False -- written with the same operation order (bit-identical)."""
    t_prev = t - ratio
    a_t = ac[t]
    a_prev = ac[t_prev] if t_prev >= 0 else ac[0]
    beta_t = 1 - a_t
    x0 = (x - beta_t ** 0.5 * eps) / a_t ** 0.5
    direction = (1 - a_prev) ** 0.5 * eps
    return a_prev ** 0.5 * x0 + direction


def ddim_inverse_step(eps, t, x, ac, ratio):
    """diffusers DDIMInverseScheduler.step with set_alpha_to_one False (bit-identical order)."""
    t_from = min(t - ratio, len(ac) - 1)
    a_from = ac[t_from] if t_from >= 0 else ac[0]
    a_to = ac[t]
    beta_from = 1 - a_from
    x0 = (x - beta_from ** 0.5 * eps) / a_from ** 0.5
    direction = (1 - a_to) ** 0.5 * eps
    return a_to ** 0.5 * x0 + direction


# ----------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="diffusers SD-1.x folder (e.g. from make_tiny_sd.py)")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--image-a", help="PNG/JPG; default: synthetic image (seed --seed)")
    ap.add_argument("--image-b", help="PNG/JPG; default: synthetic image (seed --seed + 1)")
    ap.add_argument("--concept", default="<cls0>", help="placeholder token of the class")
    ap.add_argument("--prompt-b", default="a photo of a {c} bird", help="concept prompt (inversion + stage 2)")
    ap.add_argument("--suffix", default=" in the snow", help="stage-1 prompt A = prompt B + suffix")
    ap.add_argument("--inv-steps", type=int, default=50)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--inv-guidance", type=float, default=1.0, help="only 1.0 is implemented (as Diff-II)")
    ap.add_argument("--strength", type=float, default=0.3, help="Diff-II split: stage 1 = t >= 1000*(1-s)")
    ap.add_argument("--stage1-steps", type=int, default=None, help="override: stage 1 = first K steps")
    ap.add_argument("--interp", choices=["slerp", "circle"], default="slerp")
    ap.add_argument("--slerp-t", type=float, default=0.5)
    ap.add_argument("--circle-frac", type=float, default=0.3,
                    help="circle variant: alpha = frac * 2*pi/theta (Diff-II draws frac ~ U(0,1))")
    ap.add_argument("--latent-size", type=int, default=None,
                    help="latent H=W (default: unet sample_size); image = latent * VAE factor")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--no-check", action="store_true", help="skip the diffusers cross-checks")
    args = ap.parse_args()
    if args.inv_guidance != 1.0:
        raise SystemExit("--inv-guidance other than 1.0 is not implemented")

    import diffusers
    import transformers
    from diffusers import AutoencoderKL, DDIMInverseScheduler, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = torch.float32 if args.dtype == "float32" else torch.float64
    os.makedirs(args.out_dir, exist_ok=True)
    M = args.model

    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(M, "tokenizer"))
    text_encoder = CLIPTextModel.from_pretrained(os.path.join(M, "text_encoder")).eval()
    unet = UNet2DConditionModel.from_pretrained(os.path.join(M, "unet")).eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(M, "vae")).eval()
    scheduler = DDIMScheduler.from_pretrained(os.path.join(M, "scheduler"))
    sf = float(vae.config.scaling_factor)
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_size = int(args.latent_size or unet.config.sample_size)
    image_size = latent_size * vae_factor

    # ---- 1. concepts ---------------------------------------------------------------------
    concept_rows = {}
    cdir = os.path.join(M, "concepts")
    if os.path.isdir(cdir):
        learned = load_file(os.path.join(cdir, "learned_embeds.safetensors"))
        order = json.load(open(os.path.join(cdir, "concepts.json")))["order"]
        with torch.no_grad():
            for tok in order:
                assert tokenizer.add_tokens(tok) == 1, tok
                text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
                tid = tokenizer.convert_tokens_to_ids(tok)
                text_encoder.get_input_embeddings().weight[tid] = learned[tok].to(torch.float32)
                concept_rows[tok] = tid

    text_encoder.to(dtype)
    unet.to(dtype)
    vae.to(dtype)

    prompt_b = args.prompt_b.format(c=args.concept)
    prompt_a = prompt_b + args.suffix

    def tokenize(p):
        return tokenizer([p], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids

    @torch.inference_mode()
    def encode_text(ids):
        return text_encoder(ids)[0]

    ids_u, ids_a, ids_b = tokenize(""), tokenize(prompt_a), tokenize(prompt_b)
    emb_u, emb_a, emb_b = encode_text(ids_u), encode_text(ids_a), encode_text(ids_b)

    # ---- inputs --------------------------------------------------------------------------
    img_a = load_image_u8(args.image_a, image_size) if args.image_a else synth_image(image_size, args.seed)
    img_b = load_image_u8(args.image_b, image_size) if args.image_b else synth_image(image_size, args.seed + 1)
    Image.fromarray(img_a).save(os.path.join(args.out_dir, "input_a.png"))
    Image.fromarray(img_b).save(os.path.join(args.out_dir, "input_b.png"))
    x_a, x_b = u8_to_model(img_a, dtype), u8_to_model(img_b, dtype)

    ac = scheduler.alphas_cumprod.to(dtype)  # float32 values (cast for float64 runs)
    T = scheduler.config.num_train_timesteps
    t_inv = [i * (T // args.inv_steps) + scheduler.config.steps_offset for i in range(args.inv_steps)]
    inv_ratio = T // args.inv_steps
    scheduler.set_timesteps(args.steps)
    t_den = [int(t) for t in scheduler.timesteps]
    den_ratio = T // args.steps
    if args.stage1_steps is not None:
        stage1 = [i < args.stage1_steps for i in range(args.steps)]
    else:
        thr = T * (1 - args.strength)
        stage1 = [not (t < thr) for t in t_den]  # Diff-II: t < thr -> concept prompt

    timings = {}
    t_flow = time.perf_counter()
    with torch.inference_mode():
        # ---- 3. encode -------------------------------------------------------------------
        t0 = time.perf_counter()
        post_a, post_b = vae.encode(x_a).latent_dist, vae.encode(x_b).latent_dist
        z0_a, z0_b = post_a.mean * sf, post_b.mean * sf
        timings["vae_encode_2_images_s"] = time.perf_counter() - t0

        # ---- 4. inversion ----------------------------------------------------------------
        def invert(z0):
            traj, eps0 = [z0], None
            x = z0
            for t in t_inv:
                eps = unet(x, torch.tensor([t]), encoder_hidden_states=emb_b).sample
                if eps0 is None:
                    eps0 = eps
                x = ddim_inverse_step(eps, t, x, ac, inv_ratio)
                traj.append(x)
            return x, torch.cat(traj), eps0

        t0 = time.perf_counter()
        zT_a, traj_a, inv_eps0_a = invert(z0_a)
        zT_b, traj_b, _ = invert(z0_b)
        timings["inversion_2_images_s"] = time.perf_counter() - t0

        # ---- 5. interpolation ------------------------------------------------------------
        z_slerp, cos, theta = slerp(zT_a, zT_b, args.slerp_t)
        theta_v = float(torch.acos(cos))
        alpha = args.circle_frac * 2 * math.pi / theta_v
        z_circle, _, _ = slerp(zT_a, zT_b, -alpha)
        z_circle_official = diffii_circle(zT_a, zT_b, alpha)
        z = z_slerp if args.interp == "slerp" else z_circle

        # ---- 6. two-stage denoising --------------------------------------------------------
        emb_stage1 = torch.cat([emb_u, emb_a])
        emb_stage2 = torch.cat([emb_u, emb_b])
        t0 = time.perf_counter()
        x = z
        den_traj = [x]
        den_eps0 = None
        for i, t in enumerate(t_den):
            emb = emb_stage1 if stage1[i] else emb_stage2
            out = unet(torch.cat([x, x]), torch.tensor([t]), encoder_hidden_states=emb).sample
            eps_u, eps_c = out.chunk(2)
            eps = eps_u + args.guidance * (eps_c - eps_u)
            if den_eps0 is None:
                den_eps0 = (eps_u, eps_c, eps)
            x = ddim_step(eps, t, x, ac, den_ratio)
            den_traj.append(x)
        z_final = x
        timings["denoise_s"] = time.perf_counter() - t0

        # ---- 7. decode -------------------------------------------------------------------
        t0 = time.perf_counter()
        decoded = vae.decode(z_final / sf).sample
        timings["vae_decode_s"] = time.perf_counter() - t0
        timings["flow_total_s"] = time.perf_counter() - t_flow  # encode+invert(2)+slerp+denoise+decode
        img01 = (decoded / 2 + 0.5).clamp(0, 1)
        hwc = img01[0].permute(1, 2, 0)
        img_u8_round = (hwc * 255).round().to(torch.uint8)
        img_u8_trunc = (hwc * 255).to(torch.uint8)
        Image.fromarray(img_u8_round.numpy()).save(os.path.join(args.out_dir, "output.png"))

        # ---- probes (independent single-call checks) --------------------------------------
        g = torch.Generator().manual_seed(args.seed + 100)
        probe_x = torch.randn(2, 4, latent_size, latent_size, generator=g).to(dtype)
        probe_t = 500
        probe_out = unet(probe_x, torch.tensor([probe_t]), encoder_hidden_states=torch.cat([emb_u, emb_b])).sample
        probe_dec = vae.decode(probe_x[:1]).sample

    # ---- cross-checks against diffusers' own schedulers / pipeline ------------------------
    checks = {}
    if not args.no_check:
        with torch.inference_mode():
            inv = DDIMInverseScheduler.from_config(scheduler.config)
            inv.set_timesteps(args.inv_steps)
            checks["inverse_timesteps_match"] = [int(t) for t in inv.timesteps] == t_inv
            x = z0_a
            for t in inv.timesteps:
                eps = unet(x, t, encoder_hidden_states=emb_b).sample
                x = inv.step(eps, t, x).prev_sample
            checks["inversion_vs_DDIMInverseScheduler_maxabs"] = float((x - zT_a).abs().max())
            sch = DDIMScheduler.from_config(scheduler.config)
            sch.set_timesteps(args.steps)
            x = z
            for i, t in enumerate(sch.timesteps):
                emb = emb_stage1 if stage1[i] else emb_stage2
                out = unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample
                eu, ec = out.chunk(2)
                x = sch.step(eu + args.guidance * (ec - eu), t, x, eta=0.0).prev_sample
            checks["denoise_vs_DDIMScheduler_maxabs"] = float((x - z_final).abs().max())
            checks["circle_slerp_vs_official_formula_maxabs"] = float((z_circle - z_circle_official).abs().max())
            if dtype == torch.float32:
                # Diff-II's own inversion call: StableDiffusionPipeline with the inverse scheduler.
                from diffusers import StableDiffusionPipeline

                pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                               scheduler=DDIMInverseScheduler.from_config(scheduler.config),
                                               safety_checker=None, feature_extractor=None,
                                               requires_safety_checker=False)
                pipe.set_progress_bar_config(disable=True)
                inv_pipe, _ = pipe(prompt=prompt_b, negative_prompt="", guidance_scale=1.0, width=image_size,
                                   height=image_size, output_type="latent", return_dict=False,
                                   num_inference_steps=args.inv_steps, latents=z0_a)
                checks["inversion_vs_SD_pipeline_maxabs"] = float((inv_pipe - zT_a).abs().max())

    # ---- save ----------------------------------------------------------------------------
    f32 = lambda v: v.detach().to(torch.float32).contiguous().clone()  # noqa: E731  (clone: no shared storage)
    tensors = {
        "alphas_cumprod": scheduler.alphas_cumprod.to(torch.float32).contiguous(),
        "inv_timesteps": torch.tensor(t_inv, dtype=torch.int64),
        "denoise_timesteps": torch.tensor(t_den, dtype=torch.int64),
        "denoise_stage1_mask": torch.tensor(stage1, dtype=torch.uint8),
        "input_ids_uncond": ids_u.to(torch.int64).contiguous(),
        "input_ids_a": ids_a.to(torch.int64).contiguous(),
        "input_ids_b": ids_b.to(torch.int64).contiguous(),
        "text_emb_uncond": f32(emb_u),
        "text_emb_a": f32(emb_a),
        "text_emb_b": f32(emb_b),
        "image_a_u8": torch.from_numpy(img_a).contiguous(),
        "image_b_u8": torch.from_numpy(img_b).contiguous(),
        "image_a": f32(x_a),
        "vae_mean_a": f32(post_a.mean),
        "vae_logvar_a": f32(post_a.logvar),
        "vae_mean_b": f32(post_b.mean),
        "z0_a": f32(z0_a),
        "z0_b": f32(z0_b),
        "inv_eps0_a": f32(inv_eps0_a),
        "inv_traj_a": f32(traj_a),
        "inv_traj_b": f32(traj_b),
        "inv_latent_a": f32(zT_a),
        "inv_latent_b": f32(zT_b),
        "slerp_cos": f32(cos.reshape(1)),
        "interp_slerp": f32(z_slerp),
        "interp_circle": f32(z_circle),
        "interp_latent": f32(z),
        "den_eps0_uncond": f32(den_eps0[0]),
        "den_eps0_text": f32(den_eps0[1]),
        "den_eps0_cfg": f32(den_eps0[2]),
        "den_traj": f32(torch.cat(den_traj)),
        "final_latent": f32(z_final),
        "decoded": f32(decoded),
        "image_01": f32(img01),
        "image_u8": img_u8_round.contiguous().clone(),
        "image_u8_trunc": img_u8_trunc.contiguous().clone(),
        "probe_unet_x": f32(probe_x),
        "probe_unet_out": f32(probe_out),
        "probe_vae_decode_out": f32(probe_dec),
    }
    for tok, tid in concept_rows.items():
        tensors[f"concept_row_{tid}"] = f32(text_encoder.get_input_embeddings().weight[tid])
    config = {
        "model": os.path.abspath(M),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
        "dtype": args.dtype,
        "threads": args.threads,
        "seed": args.seed,
        "prompt_uncond": "",
        "prompt_a_stage1": prompt_a,
        "prompt_b_concept_inversion_stage2": prompt_b,
        "concept_token_ids": concept_rows,
        "input_ids_a": ids_a[0].tolist(),
        "input_ids_b": ids_b[0].tolist(),
        "input_ids_uncond": ids_u[0].tolist(),
        "image_size": image_size,
        "latent_size": latent_size,
        "vae_scaling_factor": sf,
        "inv_steps": args.inv_steps,
        "inv_guidance": args.inv_guidance,
        "inv_timesteps": t_inv,
        "steps": args.steps,
        "guidance": args.guidance,
        "denoise_timesteps": t_den,
        "strength": args.strength,
        "stage1_steps": int(sum(stage1)),
        "interp": args.interp,
        "slerp_t": args.slerp_t,
        "slerp_dot_threshold": 0.9995,
        "slerp_theta": theta_v,
        "circle_frac": args.circle_frac,
        "circle_alpha": alpha,
        "circle_as_slerp_t": -alpha,
        "probe_unet_t": probe_t,
        "probe_unet_encoder_hidden_states": "cat([text_emb_uncond, text_emb_b])",
        "probe_vae_decode_input": "probe_unet_x[:1] (no 1/scaling_factor applied)",
        "cfg_batching": "one UNet call on batch 2: [uncond, cond]",
        "uint8": "image_u8 = round(clamp(dec/2+0.5,0,1)*255); image_u8_trunc = trunc(...) (Diff-II's)",
    }
    stats = {k: {"mean": float(v.float().mean()), "std": float(v.float().std()), "absmax": float(v.float().abs().max())}
             for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1}
    save_file(tensors, os.path.join(args.out_dir, "ref_diffii.safetensors"), metadata={"config": json.dumps(config)})
    report = {"config": config, "checks": checks, "timings_s": timings, "stats": stats}
    with open(os.path.join(args.out_dir, "ref_diffii.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps({"checks": checks, "timings_s": timings, "stage1_steps": config["stage1_steps"],
                      "slerp_theta": theta_v,
                      "final_latent": stats["final_latent"], "inv_latent_a": stats["inv_latent_a"],
                      "decoded": stats["decoded"]}, indent=2))


if __name__ == "__main__":
    main()
