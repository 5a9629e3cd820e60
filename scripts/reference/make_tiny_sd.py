#!/usr/bin/env python3
"""Build a tiny, randomly initialised Stable-Diffusion-1.x-architecture pipeline.

Nothing is downloaded: every component is built from a config with a fixed seed,
then written in the diffusers folder layout with safetensors weights:

    OUT/model_index.json
    OUT/unet/{config.json, diffusion_pytorch_model.safetensors}
    OUT/vae/{config.json, diffusion_pytorch_model.safetensors}
    OUT/text_encoder/{config.json, model.safetensors}   (keys "text_model.*", as real SD-1.x files)
    OUT/tokenizer/{vocab.json, merges.txt, tokenizer.json, tokenizer_config.json}
    OUT/scheduler/scheduler_config.json            (DDIMScheduler, SD-1.5 settings)
    OUT/concepts/learned_embeds.safetensors        (textual-inversion style concept vectors)
    OUT/concepts/concepts.json                     (class name -> placeholder token)
    OUT/TINY_SD_README.json                        (what was built, sizes, seed, versions)

Architecture (SD-1.x structure at toy width):
  * UNet2DConditionModel: 2 levels, block_out_channels (32, 64), layers_per_block 2,
    down (CrossAttnDownBlock2D, DownBlock2D), mid UNetMidBlock2DCrossAttn,
    up (UpBlock2D, CrossAttnUpBlock2D) -- the same pattern as SD-1.5 (attention on the
    high-resolution levels, none on the lowest one), cross_attention_dim 32,
    attention_head_dim 8 (in diffusers' SD-1.x naming this is the NUMBER OF HEADS:
    8 heads at every level, exactly as SD-1.5's attention_head_dim=8), norm_num_groups 32,
    conv (not linear) proj_in/proj_out, GEGLU feed-forward, silu, flip_sin_to_cos True,
    freq_shift 0, sample_size 32 (latent 32x32).
  * AutoencoderKL: 2 blocks (32, 64) -> spatial factor 2 (SD's has 4 blocks, factor 8),
    layers_per_block 2, 4 latent channels, mid-block attention (1 head, as SD's VAE),
    quant_conv/post_quant_conv, scaling_factor 0.18215 (SD-1.x's constant).
    Image size for sample_size 32 latents: 64x64.
  * CLIPTextModel: hidden 32, 3 layers, 4 heads, intermediate 37 (deliberately not 4x, to
    catch hard-coded ratios), quick_gelu (as SD-1.x's ViT-L/14 text tower),
    max_position_embeddings 77, layer_norm_eps 1e-5.
  * CLIPTokenizer: a TINY CLIP-FORMAT byte-level BPE vocabulary written by this script
    (no real CLIP vocab is available offline).  Layout mirrors openai/CLIP exactly:
        ids 0..255     the 256 byte symbols in GPT-2/CLIP bytes_to_unicode() order
        ids 256..511   the same symbols with the end-of-word suffix "</w>"
        ids 512..      one token per BPE merge, in merge order ("".join(pair))
        last two       "<|startoftext|>", "<|endoftext|>"
    merges.txt starts with the header line "#version: 0.2" (like CLIP's) followed by one
    "left right" pair per line, in rank order.  The merges are learned here by plain
    greedy BPE (most frequent adjacent pair; ties broken by the lexicographically smallest
    pair; a pair whose concatenation already exists in the vocab is skipped so every
    vocab string is unique) over a small built-in corpus of Diff-II style prompt words,
    until the vocab reaches --vocab-size (default 1000).  Words are split CLIP-style:
    last symbol of each word carries "</w>".  Padding token = "<|endoftext|>" (SD-1.x),
    model_max_length 77.  The script cross-checks the HF tokenizer against an
    independent pure-Python CLIP BPE on a set of prompts and fails if they differ.
  * DDIMScheduler with SD-1.5's settings: num_train_timesteps 1000, scaled_linear betas
    0.00085..0.012, clip_sample False, set_alpha_to_one False, steps_offset 1,
    prediction_type epsilon, timestep_spacing "leading".
  * Concepts: --num-concepts placeholder tokens "<cls0>", "<cls1>", ... with seeded random
    vectors (std 0.02, like the token-embedding init).  Stored the way diffusers'
    textual-inversion script stores them: {placeholder_token: tensor[hidden]} in
    learned_embeds.safetensors.  They are NOT merged into the tokenizer/text encoder:
    the consumer adds them (tokenizer.add_tokens + resize_token_embeddings + row write),
    as Diff-II's loader does.  The added ids are vocab_size + i in file order.

Usage:
    .venv-ref/bin/python scripts/reference/make_tiny_sd.py OUT_DIR [--seed 0] [--vocab-size 1000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

# ----------------------------------------------------------------------------------------
# Tokenizer: CLIP-format byte-level BPE built from a small corpus
# ----------------------------------------------------------------------------------------

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

# Diff-II style prompt words: "a photo of a <cls> bird" + context suffixes, some class names.
CORPUS = """
a photo of a bird aircraft car animal flower dog cat pet plane jet airliner
in on at with the and near over under by of for from into through beside behind
snow snowy rain rainy fog foggy sunset sunrise night day morning evening dusk dawn
forest jungle grass grassy field meadow garden park beach ocean sea sky cloud clouds
cloudy blue green red yellow white black brown gray grey orange purple pink golden
branch tree trees leaves water lake river pond mountain mountains desert city street
road runway airport hangar parked flying perched sitting standing swimming running
close up closeup background blurry bright dark light soft sunlight shadow shadows
small large big little tiny huge old new vintage modern painting drawing sketch
realistic detailed high quality resolution photograph picture image view side front
sparrow gull warbler wren tern oriole vireo finch grosbeak kingfisher woodpecker
albatross pelican cormorant swallow flycatcher blackbird hummingbird jay crow raven
boeing airbus cessna embraer fokker douglas lockheed spitfire tornado falcon
sedan coupe convertible hatchback wagon suv minivan truck pickup cab van
rose tulip daisy lily orchid sunflower iris poppy lotus
tabby siamese persian beagle boxer pug terrier retriever collie husky poodle
one two three four five six seven eight nine ten 2012 2007 737 747 a320 a380
photo photos photography camera lens zoom wide angle portrait landscape macro
"""

# Prompts used for the tokenizer self-check (and by ref_diffii.py).
CHECK_PROMPTS = [
    "",
    "a photo of a bird",
    "a photo of a <cls0> bird",
    "a photo of a <cls0> bird in the snow",
    "A Photo  of a Sparrow,   perched on a branch at sunset!",
    "boeing 737-800 on the runway (2012)",
    "zebra xylophone quokka",  # words not in the corpus -> fall back to smaller pieces
    "it's a bird's nest",
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode char mapping (same order as openai/CLIP)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


# CLIP's pre-tokenisation pattern (openai/CLIP simple_tokenizer.py), needs the `regex` module.
CLIP_PAT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def clip_pretokenize(text: str) -> list[str]:
    import regex

    text = re.sub(r"\s+", " ", text).strip().lower()
    b2u = bytes_to_unicode()
    return ["".join(b2u[b] for b in w.encode("utf-8")) for w in regex.findall(CLIP_PAT, text, regex.IGNORECASE)]


def learn_bpe(corpus: str, num_merges: int) -> list[tuple[str, str]]:
    b2u = bytes_to_unicode()
    base = [b2u[b] for b in range(256)]
    vocab_strings = set(base) | {s + "</w>" for s in base}
    word_counts = Counter(clip_pretokenize(corpus))
    # Each word: tuple of symbols, last symbol carries </w>.
    words = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in word_counts}
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter = Counter()
        for w, syms in words.items():
            c = word_counts[w]
            for a, b in zip(syms, syms[1:]):
                pairs[(a, b)] += c
        # best = highest count, ties -> lexicographically smallest pair; skip duplicates
        cands = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        best = None
        for pair, _ in cands:
            if pair[0] + pair[1] not in vocab_strings:
                best = pair
                break
        if best is None:
            break
        merges.append(best)
        vocab_strings.add(best[0] + best[1])
        new_words = {}
        for w, syms in words.items():
            out = []
            i = 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            new_words[w] = tuple(out)
        words = new_words
    return merges


def build_clip_vocab(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    b2u = bytes_to_unicode()
    base = list(b2u.values())  # insertion order == CLIP order
    merges = learn_bpe(CORPUS, vocab_size - 2 * 256 - 2)
    vocab_list = base + [v + "</w>" for v in base] + ["".join(m) for m in merges] + [BOS, EOS]
    assert len(vocab_list) == len(set(vocab_list)), "duplicate vocab strings"
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


class ReferenceClipBPE:
    """Independent re-implementation of openai/CLIP's SimpleTokenizer.encode (without ftfy /
    html-unescape, which are no-ops for plain ASCII prompts), used only as a cross-check."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        self.encoder = vocab
        self.ranks = {m: i for i, m in enumerate(merges)}

    def bpe(self, token: str) -> list[str]:
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        return word

    def encode(self, text: str, added: dict[str, int] | None = None, max_len: int = 77) -> list[int]:
        added = added or {}
        ids = [self.encoder[BOS]]
        # split out added tokens first (HF behaviour for tokenizer.add_tokens)
        parts = [text]
        for tok in added:
            parts = [p for part in parts for p in re.split(f"({re.escape(tok)})", part)]
        for part in parts:
            if part in added:
                ids.append(added[part])
                continue
            for w in clip_pretokenize(part):
                ids.extend(self.encoder[t] for t in self.bpe(w))
        ids = ids[: max_len - 1] + [self.encoder[EOS]]
        return ids + [self.encoder[EOS]] * (max_len - len(ids))


def make_tokenizer(tok_dir: str, vocab_size: int, real_vocab_dir: str | None = None):
    from transformers import CLIPTokenizer

    if real_vocab_dir:
        with open(os.path.join(real_vocab_dir, "vocab.json"), encoding="utf-8") as f:
            vocab = json.load(f)
        with open(os.path.join(real_vocab_dir, "merges.txt"), encoding="utf-8") as f:
            merges = [tuple(l.split()) for l in f.read().split("\n")[1:] if l.strip()]
    else:
        vocab, merges = build_clip_vocab(vocab_size)
    os.makedirs(tok_dir, exist_ok=True)
    with open(os.path.join(tok_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(tok_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)
    return tok, vocab, merges


def check_tokenizer(tok, vocab, merges, added: dict[str, int] | None = None):
    ref = ReferenceClipBPE(vocab, merges)
    for p in CHECK_PROMPTS:
        got = tok(p, padding="max_length", max_length=77, truncation=True).input_ids
        want = ref.encode(p, added=added)
        if list(got) != want:
            raise SystemExit(f"tokenizer mismatch for {p!r}:\n HF  {list(got)[:20]}\n ref {want[:20]}")


# ----------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------


def unet_config(sample_size: int, cross_dim: int, args=None) -> dict:
    cfg = _unet_config(sample_size, cross_dim)
    if args is not None and args.variant == "sd2style":
        # SD-2.x-like structure: 3 levels, per-level head counts, linear proj_in/proj_out.
        cfg.update(
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            attention_head_dim=[2, 4, 4],
            use_linear_projection=True,
        )
    return cfg


def _unet_config(sample_size: int, cross_dim: int) -> dict:
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        center_input_sample=False,
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        only_cross_attention=False,
        block_out_channels=(32, 64),
        layers_per_block=2,
        downsample_padding=1,
        mid_block_scale_factor=1,
        act_fn="silu",
        norm_num_groups=32,
        norm_eps=1e-5,
        cross_attention_dim=cross_dim,
        attention_head_dim=8,
        use_linear_projection=False,
        upcast_attention=False,
        resnet_time_scale_shift="default",
    )


def vae_config(image_size: int, args=None) -> dict:
    cfg = _vae_config(image_size)
    if args is not None and args.variant == "sd2style":
        cfg.update(
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(32, 32, 64),
            layers_per_block=1,
        )
    return cfg


def _vae_config(image_size: int) -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=32,
        sample_size=image_size,
        scaling_factor=0.18215,
    )


SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=1000, help="base vocab incl. the 2 specials (>=514)")
    ap.add_argument("--sample-size", type=int, default=32, help="UNet latent size; image = 2x this")
    ap.add_argument("--text-layers", type=int, default=3)
    ap.add_argument("--num-concepts", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="overwrite OUT_DIR if it exists")
    ap.add_argument("--real-vocab", default=None,
                    help="folder with a real CLIP vocab.json + merges.txt to use instead of the tiny self-made one")
    ap.add_argument("--variant", choices=["sd1", "sd2style"], default="sd1",
                    help="sd2style: 3-level UNet with per-level heads and linear projections, VAE factor 4, "
                         "text hidden 48 with gelu, CLIP keys without 'text_model.', old VAE attention key names")
    args = ap.parse_args()

    import diffusers
    import transformers
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = os.path.abspath(args.out_dir)
    if os.path.exists(out):
        if not args.force:
            raise SystemExit(f"{out} exists (use --force)")
        shutil.rmtree(out)
    os.makedirs(out)

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    # --- tokenizer ------------------------------------------------------------------------
    tmp_tok_dir = os.path.join(out, "_tok_build")
    tok, vocab, merges = make_tokenizer(tmp_tok_dir, args.vocab_size, args.real_vocab)
    check_tokenizer(tok, vocab, merges)
    V = len(vocab)

    # --- text encoder ---------------------------------------------------------------------
    sd2 = args.variant == "sd2style"
    hidden = 48 if sd2 else 32
    te_cfg = CLIPTextConfig(
        vocab_size=V,
        hidden_size=hidden,
        intermediate_size=100 if sd2 else 37,
        projection_dim=hidden,
        num_hidden_layers=args.text_layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu" if sd2 else "quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    torch.manual_seed(args.seed + 1)
    text_encoder = CLIPTextModel(te_cfg).eval()

    # --- unet / vae / scheduler -----------------------------------------------------------
    torch.manual_seed(args.seed + 2)
    unet = UNet2DConditionModel(**unet_config(args.sample_size, hidden, args)).eval()
    torch.manual_seed(args.seed + 3)
    vae = AutoencoderKL(**vae_config(args.sample_size * (4 if sd2 else 2), args)).eval()
    scheduler = DDIMScheduler(**SD15_SCHEDULER)

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)

    # transformers 5 saves CLIPTextModel keys without the "text_model." prefix; the real SD-1.x
    # checkpoints (written by transformers 4) have it.  Rewrite the file in the real-world layout
    # (transformers 5 loads both; the reload check below confirms identical weights).
    from safetensors.torch import load_file

    te_path = os.path.join(out, "text_encoder", "model.safetensors")
    te_sd = load_file(te_path)
    if not sd2 and not any(k.startswith("text_model.") for k in te_sd):
        save_file({"text_model." + k: v.contiguous() for k, v in te_sd.items()}, te_path, metadata={"format": "pt"})

    # Keep the plain CLIP files (vocab.json / merges.txt) next to tokenizer.json whatever the
    # installed transformers' save_pretrained writes.
    for fn in ("vocab.json", "merges.txt"):
        shutil.copyfile(os.path.join(tmp_tok_dir, fn), os.path.join(out, "tokenizer", fn))
    shutil.rmtree(tmp_tok_dir)

    # --- concepts (textual-inversion style) -----------------------------------------------
    g = torch.Generator().manual_seed(args.seed + 4)
    class_names = ["sparrow", "gull", "warbler", "tern", "wren", "oriole", "vireo", "finch"]
    concepts = {}
    learned = {}
    for i in range(args.num_concepts):
        ph = f"<cls{i}>"
        concepts[class_names[i % len(class_names)] + ("" if i < len(class_names) else str(i))] = ph
        learned[ph] = (torch.randn(hidden, generator=g) * 0.02).contiguous()
    os.makedirs(os.path.join(out, "concepts"))
    save_file(learned, os.path.join(out, "concepts", "learned_embeds.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "concepts", "concepts.json"), "w") as f:
        json.dump({"name2placeholder": concepts, "order": list(learned)}, f, indent=2)

    # --- reload check ---------------------------------------------------------------------
    from transformers import CLIPTokenizer

    tok2 = CLIPTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    check_tokenizer(tok2, vocab, merges)
    # reload from the plain CLIP files only (vocab.json + merges.txt, no tokenizer.json)
    plain = os.path.join(out, "_plain_tok_check")
    os.makedirs(plain)
    for fn in ("vocab.json", "merges.txt"):
        shutil.copyfile(os.path.join(out, "tokenizer", fn), os.path.join(plain, fn))
    tok3 = CLIPTokenizer(vocab=os.path.join(plain, "vocab.json"), merges=os.path.join(plain, "merges.txt"),
                         model_max_length=77)
    plain_ok = True
    try:
        check_tokenizer(tok3, vocab, merges)
    except SystemExit as e:  # informative only
        plain_ok = False
        print("note: CLIPTokenizer(vocab=vocab.json, merges=merges.txt) differs:", e, file=sys.stderr)
    shutil.rmtree(plain)
    # added-token behaviour (what ref_diffii.py does with the concepts)
    added = {}
    for ph in learned:
        tok2.add_tokens(ph)
        added[ph] = tok2.convert_tokens_to_ids(ph)
    check_tokenizer(tok2, vocab, merges, added=added)

    reloaded = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    for name in ("unet", "vae", "text_encoder"):
        a = getattr(pipe, name).state_dict()
        b = getattr(reloaded, name).state_dict()
        assert a.keys() == b.keys(), name
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)

    if sd2:
        # Old (pre-0.14 diffusers) VAE attention names, as in many SD checkpoints in the wild.
        vae_path = os.path.join(out, "vae", "diffusion_pytorch_model.safetensors")
        old = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
        vsd = load_file(vae_path)
        ren = {}
        for k, v in vsd.items():
            nk = k
            if ".attentions." in k:
                for a, b in old.items():
                    nk = nk.replace(a, b)
            ren[nk] = v.contiguous()
        save_file(ren, vae_path, metadata={"format": "pt"})
        reloaded = AutoencoderKL.from_pretrained(os.path.join(out, "vae")).eval()
        for (ka, va), (kb, vb) in zip(sorted(vae.state_dict().items()), sorted(reloaded.state_dict().items())):
            assert ka == kb and torch.equal(va, vb), (ka, kb)

    # --- summary --------------------------------------------------------------------------
    def nparams(m):
        return sum(p.numel() for p in m.parameters())

    files = {}
    total = 0
    for root, _, fns in os.walk(out):
        for fn in sorted(fns):
            p = os.path.join(root, fn)
            rel = os.path.relpath(p, out)
            files[rel] = {"bytes": os.path.getsize(p), "sha256": sha256(p)}
            total += os.path.getsize(p)
    summary = {
        "seed": args.seed,
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        },
        "params": {"unet": nparams(unet), "vae": nparams(vae), "text_encoder": nparams(text_encoder)},
        "vocab_size": V,
        "num_merges": len(merges),
        "token_ids": {"bos": vocab[BOS], "eos": vocab[EOS], "pad": vocab[EOS]},
        "concept_token_ids_after_add": added,
        "latent_size": args.sample_size,
        "image_size": args.sample_size * (4 if sd2 else 2),
        "vae_scale_factor": 4 if sd2 else 2,
        "variant": args.variant,
        "plain_vocab_merges_reload_matches": plain_ok,
        "total_bytes": total,
        "files": files,
    }
    with open(os.path.join(out, "TINY_SD_README.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps({k: v for k, v in summary.items() if k != "files"}, indent=2))


if __name__ == "__main__":
    main()
