//! `diffii pretrain`: trains a small model of Stable Diffusion 1.x architecture from scratch on
//! an image folder, and writes it as a diffusers folder that this crate and diffusers load.
//!
//! Two phases, as latent diffusion was built (Rombach et al. 2022):
//! 1. **VAE** (`AutoencoderKL`): L1 + MSE reconstruction plus a small KL term, AdamW. When it is
//!    done the scaling factor is chosen as SD's was, 1 / std of the latent means over the data,
//!    and the posterior (mean, log-variance) of every image is stored once.
//! 2. **UNet + text encoder** (CLIP architecture), trained jointly from scratch with the LDM
//!    loss ([`noise_prediction_loss`]) on latents sampled from the stored posteriors, DDPM
//!    `scaled_linear` betas (0.00085-0.012, 1 000 steps), AdamW with warm-up and cosine decay,
//!    gradient-norm clipping and an EMA of the weights (decay warm-up as diffusers' `EMAModel`;
//!    use a short-run decay such as 0.995: 0.9999 would still mostly hold the initialisation).
//!    Captions come from pixels and never name a class ([`captions`]); the tokenizer is a small
//!    CLIP-style BPE made for their words ([`vocab`]).
//!
//! Every random draw (batch, noise, timesteps, caption words) is derived from (seed, phase,
//! step), and a checkpoint holds the weights, the EMA, AdamW's moments and the step, so a run
//! killed and resumed ends with the same bytes as one that was not. Sample grids (captions of
//! real images, their samples) are written every `sample_every` steps; at the end the EMA model
//! is exported to `out/model/` with a grid of DDIM inversion -> reconstruction.
pub mod captions;
pub mod vocab;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::data::atomic::{save_png_atomic, write_json_atomic, write_or_match_settings};
use crate::data::dataset::Dataset;
use crate::data::image::{load_for_model, ResizePolicy};
use crate::data::pixels::{tensor_to_u8, u8_to_tensor, Quantize};
use crate::error::{read_json, Error, Result};
use crate::kernels;
use crate::kernels::io::{fast_dtype_ok, tensor, with_slices};
use crate::nn::{Mode, Weights};
use crate::rng::{derive_rng, derive_u64, seeded_randn};
use crate::schedule::ddim::{Ddim, PredictionType};
use crate::schedule::sampling::{ddim_invert, ddim_sample};
use crate::sd::clip::ClipTextEncoder;
use crate::sd::config::{ClipConfig, UNetConfig, UNetConfigFile, VaeConfig};
use crate::sd::tokenizer::ClipTokenizer;
use crate::sd::unet::UNet;
use crate::sd::vae::Vae;
use crate::synth::guidance::guided_eps;
use crate::train::checkpoint;
use crate::train::diffusion::{noise_prediction_loss, Batch};
use crate::train::log::LossLog;
use crate::train::lr::cosine_with_warmup;
use crate::train::optim::{AdamW, AdamWParams};
use captions::Captioner;
use rand::Rng;

/// Sizes of the three networks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Architecture {
    /// Images are resized (bilinear) to `image_size` x `image_size` RGB.
    pub image_size: usize,
    pub vae_channels: Vec<usize>,
    pub vae_layers: usize,
    pub vae_groups: usize,
    pub latent_channels: usize,
    pub unet_channels: Vec<usize>,
    pub unet_layers: usize,
    pub unet_groups: usize,
    pub unet_heads: usize,
    pub text_hidden: usize,
    pub text_layers: usize,
    pub text_heads: usize,
    pub text_mlp: usize,
    /// Prompt length in tokens (start and end tokens included).
    pub max_length: usize,
}

impl Architecture {
    /// The demo world's model: 32 px images, VAE 16-32-64 (latents 4 x 8 x 8, 0.7 M
    /// parameters), UNet 64-128 with cross-attention at both levels (4.2 M), text encoder
    /// 64 wide, 2 layers (0.1 M).
    pub fn demo() -> Self {
        Architecture {
            image_size: 32,
            vae_channels: vec![16, 32, 64],
            vae_layers: 1,
            vae_groups: 8,
            latent_channels: 4,
            unet_channels: vec![64, 128],
            unet_layers: 1,
            unet_groups: 16,
            unet_heads: 8,
            text_hidden: 64,
            text_layers: 2,
            text_heads: 4,
            text_mlp: 256,
            max_length: 16,
        }
    }

    /// A few-thousand-parameter model for tests.
    pub fn tiny() -> Self {
        Architecture {
            image_size: 16,
            vae_channels: vec![8, 16],
            vae_layers: 1,
            vae_groups: 4,
            latent_channels: 4,
            unet_channels: vec![16, 32],
            unet_layers: 1,
            unet_groups: 8,
            unet_heads: 2,
            text_hidden: 16,
            text_layers: 1,
            text_heads: 2,
            text_mlp: 32,
            max_length: 8,
        }
    }

    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "demo" => Ok(Self::demo()),
            "tiny" => Ok(Self::tiny()),
            other => Err(Error::invalid(format!("unknown architecture preset `{other}`: use demo or tiny"))),
        }
    }

    pub fn check(&self) -> Result<()> {
        let f = 1usize << (self.vae_channels.len().max(1) - 1);
        let lat = self.image_size / f.max(1);
        let down = 1usize << (self.unet_channels.len().max(1) - 1);
        if self.vae_channels.is_empty() || self.unet_channels.is_empty() || self.image_size % f != 0 || lat % down != 0 {
            return Err(Error::invalid(format!(
                "image size {} does not divide through the VAE ({} levels) and UNet ({} levels)",
                self.image_size,
                self.vae_channels.len(),
                self.unet_channels.len()
            )));
        }
        if self.vae_channels.iter().any(|c| c % self.vae_groups != 0) || self.unet_channels.iter().any(|c| c % self.unet_groups != 0) {
            return Err(Error::invalid("channel counts must be divisible by their group-norm groups"));
        }
        if self.text_hidden % self.text_heads != 0 || self.unet_channels.iter().any(|c| c % self.unet_heads != 0) || self.max_length < 3 {
            return Err(Error::invalid("widths must be divisible by the head counts, and prompts hold at least 3 tokens"));
        }
        Ok(())
    }

    pub fn vae_config(&self, scaling_factor: f64) -> Value {
        let n = self.vae_channels.len();
        json!({
            "_class_name": "AutoencoderKL",
            "_diffusers_version": "0.42.1",
            "act_fn": "silu",
            "block_out_channels": self.vae_channels,
            "down_block_types": vec!["DownEncoderBlock2D"; n],
            "up_block_types": vec!["UpDecoderBlock2D"; n],
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": self.latent_channels,
            "layers_per_block": self.vae_layers,
            "norm_num_groups": self.vae_groups,
            "sample_size": self.image_size,
            "scaling_factor": scaling_factor,
            "force_upcast": false,
            "mid_block_add_attention": true,
            "use_quant_conv": true,
            "use_post_quant_conv": true,
        })
    }

    pub fn unet_config(&self) -> Value {
        let n = self.unet_channels.len();
        json!({
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": "0.42.1",
            "act_fn": "silu",
            "attention_head_dim": self.unet_heads,
            "block_out_channels": self.unet_channels,
            "center_input_sample": false,
            "cross_attention_dim": self.text_hidden,
            "down_block_types": vec!["CrossAttnDownBlock2D"; n],
            "up_block_types": vec!["CrossAttnUpBlock2D"; n],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "downsample_padding": 1,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "in_channels": self.latent_channels,
            "out_channels": self.latent_channels,
            "layers_per_block": self.unet_layers,
            "mid_block_scale_factor": 1,
            "norm_eps": 1e-5,
            "norm_num_groups": self.unet_groups,
            "sample_size": self.image_size >> (self.vae_channels.len() - 1),
            "use_linear_projection": false,
        })
    }

    pub fn text_config(&self, v: &vocab::Vocab) -> Value {
        json!({
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            "attention_dropout": 0.0,
            "bos_token_id": v.id(vocab::BOS),
            "eos_token_id": v.id(vocab::EOS),
            "pad_token_id": v.id(vocab::EOS),
            "hidden_act": "quick_gelu",
            "hidden_size": self.text_hidden,
            "intermediate_size": self.text_mlp,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "layer_norm_eps": 1e-5,
            "max_position_embeddings": self.max_length,
            "num_attention_heads": self.text_heads,
            "num_hidden_layers": self.text_layers,
            "projection_dim": self.text_hidden,
            "vocab_size": v.len(),
        })
    }
}

/// Steps, batch and learning rate of one phase.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Phase {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub warmup: usize,
}

/// Everything the trained weights depend on (stored in `pretrain_config.json`; a resumed run
/// must use the same).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PretrainSettings {
    pub arch: Architecture,
    pub seed: u64,
    pub vae: Phase,
    pub unet: Phase,
    pub kl_weight: f64,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub ema_decay: f64,
    pub caption_keep: f64,
    pub caption_empty: f64,
    /// When not empty, every image is screen-blended with one of these colours (drawn per image
    /// from the seed and its path) after its caption is computed: black backgrounds take the
    /// colour, and the captions stay colour-agnostic. Makes a generator that can draw the
    /// coloured group-shift world ([`crate::data::shift`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub background_colours: Vec<[u8; 3]>,
}

impl PretrainSettings {
    /// The demo model's recipe (about an hour on two CPU cores).
    pub fn demo() -> Self {
        PretrainSettings {
            arch: Architecture::demo(),
            seed: 0,
            vae: Phase { steps: 300, batch: 32, lr: 1e-3, warmup: 30 },
            unet: Phase { steps: 1200, batch: 32, lr: 5e-4, warmup: 100 },
            kl_weight: 1e-4,
            weight_decay: 1e-4,
            grad_clip: 1.0,
            ema_decay: 0.995,
            caption_keep: 0.7,
            caption_empty: 0.1,
            background_colours: Vec::new(),
        }
    }

    pub fn check(&self) -> Result<()> {
        self.arch.check()?;
        for (name, p) in [("vae", &self.vae), ("unet", &self.unet)] {
            if p.steps == 0 || p.batch == 0 || !(p.lr > 0.0 && p.lr.is_finite()) {
                return Err(Error::invalid(format!(
                    "--{name}-steps, --{name}-batch and --{name}-lr must be positive and finite (got {}, {}, {})",
                    p.steps, p.batch, p.lr
                )));
            }
        }
        if !(0.0..1.0).contains(&self.ema_decay) || !(0.0..=1.0).contains(&self.caption_keep) || !(0.0..=1.0).contains(&self.caption_empty) {
            return Err(Error::invalid("--ema-decay must lie in [0, 1), caption probabilities in [0, 1]"));
        }
        if !(self.grad_clip > 0.0) {
            return Err(Error::invalid("--grad-clip must be positive"));
        }
        Ok(())
    }
}

/// How often to save and to draw samples (does not change the result).
#[derive(Clone, Debug)]
pub struct Cadence {
    pub checkpoint_every: usize,
    pub sample_every: usize,
    /// Samples drawn with this many DDIM steps and this guidance.
    pub sample_steps: usize,
    pub sample_guidance: f64,
    pub progress: bool,
    /// Stop after this many steps of the current phase in this process (tests of resume).
    pub stop_after: Option<usize>,
}

impl Default for Cadence {
    fn default() -> Self {
        Cadence { checkpoint_every: 100, sample_every: 250, sample_steps: 25, sample_guidance: 2.0, progress: true, stop_after: None }
    }
}

/// What a finished (or stopped) run reports.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub images: usize,
    pub scaling_factor: Option<f64>,
    pub vae_final_loss: Option<f64>,
    pub unet_final_loss: Option<f64>,
    pub seconds_vae: f64,
    pub seconds_unet: f64,
    pub finished: bool,
    pub model: Option<PathBuf>,
}

/// The layout of a pretraining output folder.
struct Paths {
    out: PathBuf,
}

impl Paths {
    fn model(&self) -> PathBuf {
        self.out.join("model")
    }
    fn vae_ckpt(&self) -> PathBuf {
        self.out.join("checkpoint-vae.safetensors")
    }
    fn unet_ckpt(&self) -> PathBuf {
        self.out.join("checkpoint-unet.safetensors")
    }
    fn posteriors(&self) -> PathBuf {
        self.out.join("posteriors.safetensors")
    }
    fn grids(&self) -> PathBuf {
        self.out.join("grids")
    }
}

/// Trains (or resumes) into `out`; the model lands in `out/model/`.
pub fn run(ds: &Dataset, s: &PretrainSettings, cadence: &Cadence, out: &Path) -> Result<Summary> {
    s.check()?;
    if ds.items.is_empty() {
        return Err(Error::invalid("the pretraining dataset has no images"));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    write_or_match_settings(out.join("pretrain_config.json"), s, "a pretraining run")?;
    let paths = Paths { out: out.to_path_buf() };
    let sha = crate::hash::settings_sha256(s);
    let mut images = load_images(ds, s.arch.image_size)?;
    let side = s.arch.image_size;
    let attrs: Vec<[f64; 4]> = images.par_iter().map(|p| captions::attributes(p, side)).collect();
    if !s.background_colours.is_empty() {
        let n = s.background_colours.len() as u64;
        for (px, it) in images.iter_mut().zip(&ds.items) {
            let k = derive_u64(&[b"diffii-pretrain-colour\0", &s.seed.to_le_bytes(), it.rel.as_bytes()]) % n;
            *px = crate::data::shift::screen(px, s.background_colours[k as usize]);
        }
    }
    let captioner = Captioner::fit(&attrs, s.caption_keep, s.caption_empty);
    write_json_atomic(out.join("captions.json"), &captioner)?;
    let model = paths.model();
    write_static_files(&model, s)?;

    let mut summary = Summary { images: images.len(), ..Summary::empty() };
    let t0 = Instant::now();
    let vae_file = model.join("vae").join("diffusion_pytorch_model.safetensors");
    if !vae_file.is_file() {
        let (loss, done) = train_vae(&images, s, cadence, &paths, &sha)?;
        summary.vae_final_loss = loss;
        summary.seconds_vae = t0.elapsed().as_secs_f64();
        if !done {
            return Ok(summary);
        }
    }
    let vae_config = VaeConfig::from_file(&model.join("vae").join("config.json"))?;
    summary.scaling_factor = Some(vae_config.scaling_factor);
    let t1 = Instant::now();
    let (loss, done) = train_unet(&images, &attrs, &captioner, s, cadence, &paths, &sha)?;
    summary.unet_final_loss = loss;
    summary.seconds_unet = t1.elapsed().as_secs_f64();
    summary.finished = done;
    if done {
        summary.model = Some(model);
    }
    Ok(summary)
}

impl Summary {
    fn empty() -> Self {
        Summary { images: 0, scaling_factor: None, vae_final_loss: None, unet_final_loss: None, seconds_vae: 0.0, seconds_unet: 0.0, finished: false, model: None }
    }
}

/// Every image as `side` x `side` RGB bytes (decoded in parallel, in dataset order).
fn load_images(ds: &Dataset, side: usize) -> Result<Vec<Vec<u8>>> {
    ds.items.par_iter().map(|it| Ok(load_for_model(&it.path, side, ResizePolicy::Squash)?.0)).collect()
}

/// The files of the model folder that do not depend on training: model index, scheduler,
/// tokenizer, UNet and text-encoder configs.
fn write_static_files(model: &Path, s: &PretrainSettings) -> Result<()> {
    let a = &s.arch;
    let index = json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [null, null],
        "image_encoder": [null, null],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    });
    let scheduler = json!({
        "_class_name": "DDIMScheduler",
        "_diffusers_version": "0.42.1",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": false,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": null,
    });
    let v = vocab::Vocab::for_words(&captions::vocabulary());
    v.write(&model.join("tokenizer"), a.max_length)?;
    for (rel, value) in [
        ("model_index.json", index),
        ("scheduler/scheduler_config.json", scheduler),
        ("unet/config.json", a.unet_config()),
        ("text_encoder/config.json", a.text_config(&v)),
    ] {
        let path = model.join(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        write_json_atomic(&path, &value)?;
    }
    Ok(())
}

/// A batch of images [b, 3, side, side] in [-1, 1].
fn pixel_batch(images: &[Vec<u8>], idx: &[usize], side: usize) -> Result<Tensor> {
    let ts = idx.iter().map(|&i| u8_to_tensor(&images[i], side, side, &Device::Cpu)).collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&ts, 0)?)
}

fn draw_indices(n: usize, batch: usize, rng: &mut impl Rng) -> Vec<usize> {
    (0..batch).map(|_| rng.random_range(0..n)).collect()
}

fn step_seed(s: &PretrainSettings, phase: &str, step: usize, what: &str) -> u64 {
    derive_u64(&[b"diffii-pretrain\0", &s.seed.to_le_bytes(), phase.as_bytes(), &(step as u64).to_le_bytes(), what.as_bytes()])
}

/// A phase's checkpoint, when one was written.
fn read_checkpoint(path: &Path, sha: &str) -> Result<Option<checkpoint::Checkpoint>> {
    Ok(if path.is_file() { Some(checkpoint::Checkpoint::read(path, &Device::Cpu, sha)?) } else { None })
}

/// Initial weights of a phase, all trainable: the checkpoint's (`p.<name>`), or fresh ones
/// (N(0, 1/fan_in); norms 1, biases 0) seeded by the run seed and the phase.
fn init_weights(ckpt: Option<&checkpoint::Checkpoint>, names: &[String], seed: u64, phase: &str) -> Result<Weights> {
    match ckpt {
        Some(c) => {
            let mut map = HashMap::new();
            for n in names {
                map.insert(n.clone(), c.tensor(&format!("p.{n}"))?);
            }
            Ok(Weights::from_tensors(map, DType::F32, &Device::Cpu).with_all_trainable())
        }
        None => {
            let seed = derive_u64(&[format!("diffii-pretrain-init-{phase}\0").as_bytes(), &seed.to_le_bytes()]);
            Ok(Weights::synthetic(seed, DType::F32, &Device::Cpu).with_all_trainable())
        }
    }
}

/// The parameter names a model loads, in load order (from a throw-away synthetic load).
fn parameter_names(load: impl Fn(&Weights) -> Result<()>) -> Result<Vec<String>> {
    let w = Weights::synthetic(0, DType::F32, &Device::Cpu).with_all_trainable();
    load(&w)?;
    Ok(w.vars().into_iter().map(|(k, _)| k).collect())
}

/// Global gradient-norm clipping (as `torch.nn.utils.clip_grad_norm_`); returns the norm before.
/// candle runs each variable's ops on the calling thread, so the variables are spread over the
/// pool; their squared norms are still added in variable order.
fn clip_gradients(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let squares: Vec<f32> =
        grads.par_iter().flatten().map(|g| g.sqr()?.sum_all()?.to_scalar::<f32>()).collect::<candle_core::Result<_>>()?;
    let sq: f64 = squares.iter().fold(0f64, |acc, &s| acc + s as f64);
    let norm = sq.sqrt();
    if !norm.is_finite() {
        return Err(Error::invalid("the gradient is not finite: training diverged (lower the learning rate)"));
    }
    let scale = max_norm / (norm + 1e-6);
    if scale < 1.0 {
        grads.par_iter_mut().flatten().try_for_each(|g| -> candle_core::Result<()> {
            *g = (&*g * scale)?;
            Ok(())
        })?;
    }
    Ok(norm)
}

/// The moving average of one variable after a step: `avg · decay + x · (1 - decay)`, in one
/// pass for f32 on the CPU (the same bits as the candle ops of other devices and types).
fn ema_step(avg: &Tensor, x: &Tensor, decay: f64) -> Result<Tensor> {
    if fast_dtype_ok(&[avg, x]) && avg.dims() == x.dims() {
        let out = with_slices(&[avg, x], |s| kernels::optim::ema(s[0], s[1], decay))?;
        return tensor(out, avg.dims());
    }
    Ok(((avg * decay)? + (x.detach() * (1.0 - decay))?)?)
}

/// Runs `steps` optimisation steps from `start`; `loss(step)` builds the loss graph.
struct Loop<'a> {
    vars: Vec<Var>,
    opt: AdamW,
    phase: &'a Phase,
    clip: f64,
}

impl<'a> Loop<'a> {
    /// The optimiser over every variable of `w` (restored from the checkpoint) and the step to
    /// continue from.
    fn new(w: &Weights, ckpt: Option<&checkpoint::Checkpoint>, name: &str, phase: &'a Phase, s: &PretrainSettings) -> Result<(Self, usize)> {
        let vars: Vec<Var> = w.vars().into_iter().map(|(_, v)| v).collect();
        let mut opt = AdamW::new(vars.clone(), AdamWParams { weight_decay: s.weight_decay, ..AdamWParams::with_lr(phase.lr) })?;
        let mut start = 0;
        if let Some(c) = ckpt {
            start = c.position("step")?;
            if let Some((m, v, t)) = c.optimizer(name, vars.len())? {
                opt.restore(m, v, t)?;
            }
        }
        Ok((Loop { vars, opt, phase, clip: s.grad_clip }, start))
    }

    fn step(&mut self, step: usize, loss: &Tensor) -> Result<f64> {
        let value = loss.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            return Err(Error::invalid(format!("the loss is not finite at step {step}: training diverged (lower the learning rate)")));
        }
        let g = loss.backward()?;
        let mut grads: Vec<Option<Tensor>> = self.vars.iter().map(|v| g.get(v.as_tensor()).cloned()).collect();
        clip_gradients(&mut grads, self.clip)?;
        self.opt.params.lr = cosine_with_warmup(step, self.phase.steps, self.phase.warmup, self.phase.lr, 0.0);
        self.opt.step(&grads)?;
        Ok(value)
    }
}

fn train_vae(images: &[Vec<u8>], s: &PretrainSettings, cadence: &Cadence, paths: &Paths, sha: &str) -> Result<(Option<f64>, bool)> {
    let model = paths.model();
    let a = &s.arch;
    let side = a.image_size;
    // The config is written with a placeholder scaling factor; the real one replaces it below.
    let config_path = model.join("vae").join("config.json");
    std::fs::create_dir_all(model.join("vae")).map_err(|e| Error::io(&model, e))?;
    write_json_atomic(&config_path, &a.vae_config(1.0))?;
    let config = VaeConfig::from_file(&config_path)?;
    let names = parameter_names(|w| Vae::load(w, &config, Mode::Train).map(|_| ()))?;
    let ckpt = read_checkpoint(&paths.vae_ckpt(), sha)?;
    let w = init_weights(ckpt.as_ref(), &names, s.seed, "vae")?;
    let vae = Vae::load(&w, &config, Mode::Train)?;
    let (mut lp, start) = Loop::new(&w, ckpt.as_ref(), "vae", &s.vae, s)?;
    let mut log = LossLog::open(&paths.out.join("loss-vae.csv"), &["step", "loss", "lr", "seconds"], Some(start));
    let bar = crate::progress::bar(s.vae.steps, "vae", cadence.progress);
    bar.set_position(start as u64);
    let mut last = None;
    let save = |lp: &Loop, step: usize, log: &LossLog| -> Result<()> {
        let tensors = names.iter().zip(&lp.vars).map(|(n, v)| (format!("p.{n}"), v.as_tensor().clone())).collect();
        // The log first: a kill between the two writes then leaves extra rows, which a resume
        // drops, rather than a checkpoint ahead of its log, whose missing rows nothing restores.
        log.write()?;
        checkpoint::write(&paths.vae_ckpt(), sha, &[("step", step)], tensors, &[("vae", Some(&lp.opt))])
    };
    let mut step = start;
    while step < s.vae.steps {
        if cadence.stop_after.is_some_and(|n| step - start >= n) {
            save(&lp, step, &log)?;
            bar.abandon();
            return Ok((last, false));
        }
        let tic = Instant::now();
        let mut rng = derive_rng(&[&step_seed(s, "vae", step, "batch").to_le_bytes()]);
        let idx = draw_indices(images.len(), s.vae.batch, &mut rng);
        let x = pixel_batch(images, &idx, side)?;
        let loss = vae_loss(&vae, &x, step_seed(s, "vae", step, "eps"), s.kl_weight)?;
        let value = lp.step(step, &loss)?;
        last = Some(value);
        log.push(&[&step.to_string(), &format!("{value:.6}"), &format!("{:.3e}", lp.opt.params.lr), &format!("{:.3}", tic.elapsed().as_secs_f64())]);
        step += 1;
        bar.set_position(step as u64);
        bar.set_message(format!("loss {value:.4}"));
        if step % cadence.checkpoint_every == 0 && step < s.vae.steps {
            save(&lp, step, &log)?;
        }
    }
    bar.finish_and_clear();
    save(&lp, step, &log)?;
    let tensors: Vec<(String, Tensor)> = names.iter().zip(&lp.vars).map(|(n, v)| (n.clone(), v.as_tensor().detach())).collect();
    // SD's scaling factor: unit variance of the latents the UNet will see.
    let trained = Weights::from_tensors(tensors.iter().cloned().collect(), DType::F32, &Device::Cpu);
    let infer = Vae::load(&trained, &config, Mode::Infer)?;
    let (means, logvars) = encode_all(&infer, images, side)?;
    let std = means.flatten_all()?.to_vec1::<f32>()?;
    let n = std.len() as f64;
    let mu = std.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = std.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / n;
    let scaling = 1.0 / var.sqrt().max(1e-6);
    crate::nn::weights::save_safetensors(&paths.posteriors(), &[("mean".into(), means), ("logvar".into(), logvars)], None)?;
    crate::nn::weights::save_safetensors(&model.join("vae").join("diffusion_pytorch_model.safetensors"), &tensors, None)?;
    // The config last: its scaling factor marks the phase as done for a resumed run.
    write_json_atomic(&config_path, &a.vae_config(round_sig(scaling)))?;
    Ok((last, true))
}

/// The VAE's training loss on pixels `x`: L1 + MSE between `x` and the decoding of a posterior
/// sample (reparameterised with noise seeded by `noise_seed`), plus `kl_weight` x the mean KL
/// divergence of the posterior from N(0, 1).
pub fn vae_loss(vae: &Vae, x: &Tensor, noise_seed: u64, kl_weight: f64) -> Result<Tensor> {
    let (mean, logvar) = vae.encode(x)?;
    let eps = seeded_randn(noise_seed, mean.dims(), x.device())?.to_dtype(x.dtype())?;
    let z = (&mean + (&logvar * 0.5)?.exp()?.mul(&eps)?)?;
    let diff = (vae.decode(&z)? - x)?;
    let kl = ((((mean.sqr()? + logvar.exp()?)? - 1.0)? - &logvar)?.mean_all()? * 0.5)?;
    Ok(((diff.abs()?.mean_all()? + diff.sqr()?.mean_all()?)? + (kl * kl_weight)?)?)
}

/// `x` rounded to 5 significant digits (a readable config value; 0.18215 for SD-1.5 was too).
fn round_sig(x: f64) -> f64 {
    let d = 5 - x.abs().log10().ceil() as i32;
    let p = 10f64.powi(d);
    (x * p).round() / p
}

/// Posterior means and log-variances of every image, in batches.
fn encode_all(vae: &Vae, images: &[Vec<u8>], side: usize) -> Result<(Tensor, Tensor)> {
    let (mut ms, mut ls) = (Vec::new(), Vec::new());
    let idx: Vec<usize> = (0..images.len()).collect();
    for chunk in idx.chunks(256) {
        let (m, l) = vae.encode(&pixel_batch(images, chunk, side)?)?;
        ms.push(m);
        ls.push(l);
    }
    Ok((Tensor::cat(&ms, 0)?, Tensor::cat(&ls, 0)?))
}

/// Loads the text encoder and UNet on `w` (one weight set, keys prefixed `text_encoder.` and `unet.`).
fn load_denoiser(w: &Weights, clip: &ClipConfig, unet: &UNetConfig, mode: Mode) -> Result<(ClipTextEncoder, UNet)> {
    Ok((ClipTextEncoder::load(&w.pp("text_encoder"), clip, mode)?, UNet::load(&w.pp("unet"), unet, mode)?))
}

fn unet_config(model: &Path) -> Result<UNetConfig> {
    let path = model.join("unet").join("config.json");
    let f: UNetConfigFile = read_json(&path)?;
    f.validate(&path)
}

#[allow(clippy::too_many_arguments)]
fn train_unet(
    images: &[Vec<u8>],
    attrs: &[[f64; 4]],
    captioner: &Captioner,
    s: &PretrainSettings,
    cadence: &Cadence,
    paths: &Paths,
    sha: &str,
) -> Result<(Option<f64>, bool)> {
    let model = paths.model();
    let clip_config = ClipConfig::from_file(&model.join("text_encoder").join("config.json"))?;
    let unet_cfg = unet_config(&model)?;
    let tokenizer = ClipTokenizer::from_dir(&model.join("tokenizer"))?;
    let sched = Ddim::from_file(model.join("scheduler").join("scheduler_config.json"))?;
    let alphas = sched.alphas_cumprod().to_vec();
    let vae_config = VaeConfig::from_file(&model.join("vae").join("config.json"))?;
    let scaling = vae_config.scaling_factor;
    let post = crate::nn::weights::load_all(&paths.posteriors(), &Device::Cpu)?;
    let get = |k: &str| post.get(k).cloned().ok_or_else(|| Error::bad_file(paths.posteriors(), format!("lacks `{k}`; delete the file to recompute it")));
    let (means, logvars) = (get("mean")?, get("logvar")?);
    if means.dim(0)? != images.len() {
        return Err(Error::bad_file(paths.posteriors(), "holds another number of images than the dataset; delete it to recompute"));
    }

    let names = parameter_names(|w| load_denoiser(w, &clip_config, &unet_cfg, Mode::Train).map(|_| ()))?;
    let ckpt = read_checkpoint(&paths.unet_ckpt(), sha)?;
    let w = init_weights(ckpt.as_ref(), &names, s.seed, "unet")?;
    let (te, unet) = load_denoiser(&w, &clip_config, &unet_cfg, Mode::Train)?;
    let (mut lp, start) = Loop::new(&w, ckpt.as_ref(), "unet", &s.unet, s)?;
    let mut ema: Vec<Tensor> = match &ckpt {
        Some(c) => names.iter().map(|n| c.tensor(&format!("ema.{n}"))).collect::<Result<_>>()?,
        None => lp.vars.iter().map(|v| v.as_tensor().detach()).collect(),
    };
    let mut log = LossLog::open(&paths.out.join("loss-unet.csv"), &["step", "loss", "lr", "seconds"], Some(start));
    let bar = crate::progress::bar(s.unet.steps, "unet", cadence.progress);
    bar.set_position(start as u64);
    let save = |lp: &Loop, ema: &[Tensor], step: usize, log: &LossLog| -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = names.iter().zip(&lp.vars).map(|(n, v)| (format!("p.{n}"), v.as_tensor().clone())).collect();
        tensors.extend(names.iter().zip(ema).map(|(n, e)| (format!("ema.{n}"), e.clone())));
        // The log before the checkpoint, as in the VAE phase.
        log.write()?;
        checkpoint::write(&paths.unet_ckpt(), sha, &[("step", step)], tensors, &[("unet", Some(&lp.opt))])
    };
    let grid_rows: Vec<usize> = {
        let mut rng = derive_rng(&[b"diffii-pretrain-grid\0", &s.seed.to_le_bytes()]);
        draw_indices(images.len(), 8, &mut rng)
    };
    let sampler = Sampler { names: &names, clip: &clip_config, unet: &unet_cfg, sched: &sched, tokenizer: &tokenizer, model: &model, scaling, cadence };
    let mut last = None;
    let mut step = start;
    let dims = means.dims().to_vec();
    while step < s.unet.steps {
        if cadence.stop_after.is_some_and(|n| step - start >= n) {
            save(&lp, &ema, step, &log)?;
            bar.abandon();
            return Ok((last, false));
        }
        let tic = Instant::now();
        let mut rng = derive_rng(&[&step_seed(s, "unet", step, "batch").to_le_bytes()]);
        let idx = draw_indices(images.len(), s.unet.batch, &mut rng);
        let timesteps: Vec<usize> = (0..idx.len()).map(|_| rng.random_range(0..alphas.len())).collect();
        let ids: Vec<u32> = idx.iter().map(|&i| tokenizer.encode(&captioner.caption(&attrs[i], &mut rng))).collect::<Result<Vec<_>>>()?.concat();
        let sel = Tensor::from_vec(idx.iter().map(|&i| i as u32).collect::<Vec<_>>(), idx.len(), &Device::Cpu)?;
        let mut shape = dims.clone();
        shape[0] = idx.len();
        let eps = seeded_randn(step_seed(s, "unet", step, "posterior"), &shape, &Device::Cpu)?;
        let z = (means.index_select(&sel, 0)? + (logvars.index_select(&sel, 0)? * 0.5)?.exp()?.mul(&eps)?)?;
        let batch = Batch {
            latents: (z * scaling)?,
            noise: seeded_randn(step_seed(s, "unet", step, "noise"), &shape, &Device::Cpu)?,
            timesteps,
            ids: Tensor::from_vec(ids, (idx.len(), tokenizer.max_length()), &Device::Cpu)?,
        };
        let loss = noise_prediction_loss(&te, &unet, &alphas, PredictionType::Epsilon, &batch, None)?;
        let value = lp.step(step, &loss)?;
        // diffusers' EMAModel: the decay warms up as (1 + t) / (10 + t).
        let decay = s.ema_decay.min((1.0 + step as f64) / (10.0 + step as f64));
        for (e, v) in ema.iter_mut().zip(&lp.vars) {
            *e = ema_step(e, v.as_tensor(), decay)?;
        }
        last = Some(value);
        log.push(&[&step.to_string(), &format!("{value:.6}"), &format!("{:.3e}", lp.opt.params.lr), &format!("{:.3}", tic.elapsed().as_secs_f64())]);
        step += 1;
        bar.set_position(step as u64);
        bar.set_message(format!("loss {value:.4}"));
        if step % cadence.checkpoint_every == 0 && step < s.unet.steps {
            save(&lp, &ema, step, &log)?;
        }
        if step % cadence.sample_every == 0 || step == s.unet.steps {
            sampler.grid(&ema, images, attrs, captioner, &grid_rows, &paths.grids().join(format!("samples-{step:06}.png")))?;
        }
    }
    bar.finish_and_clear();
    save(&lp, &ema, step, &log)?;
    let tensors = |prefix: &str| -> Vec<(String, Tensor)> {
        names.iter().zip(&ema).filter_map(|(n, e)| n.strip_prefix(prefix).map(|k| (k.to_string(), e.clone()))).collect()
    };
    crate::nn::weights::save_safetensors(&model.join("text_encoder").join("model.safetensors"), &tensors("text_encoder."), None)?;
    crate::nn::weights::save_safetensors(&model.join("unet").join("diffusion_pytorch_model.safetensors"), &tensors("unet."), None)?;
    sampler.inversion_grid(&ema, images, attrs, captioner, &grid_rows, &paths.grids().join("inversion.png"))?;
    Ok((last, true))
}

/// Draws sample grids from the EMA weights during and after training.
struct Sampler<'a> {
    names: &'a [String],
    clip: &'a ClipConfig,
    unet: &'a UNetConfig,
    sched: &'a Ddim,
    tokenizer: &'a ClipTokenizer,
    model: &'a Path,
    scaling: f64,
    cadence: &'a Cadence,
}

impl Sampler<'_> {
    fn models(&self, ema: &[Tensor]) -> Result<(ClipTextEncoder, UNet, Vae)> {
        let map: HashMap<String, Tensor> = self.names.iter().cloned().zip(ema.iter().cloned()).collect();
        let w = Weights::from_tensors(map, DType::F32, &Device::Cpu);
        let (te, unet) = load_denoiser(&w, self.clip, self.unet, Mode::Infer)?;
        let vae_dir = self.model.join("vae");
        let vw = crate::sd::loader::vae_weights(&vae_dir.join("diffusion_pytorch_model.safetensors"), DType::F32, &Device::Cpu)?;
        let vae = Vae::load(&vw, &VaeConfig::from_file(&vae_dir.join("config.json"))?, Mode::Infer)?;
        Ok((te, unet, vae))
    }

    fn encode(&self, te: &ClipTextEncoder, prompts: &[String]) -> Result<Tensor> {
        let ids: Vec<u32> = prompts.iter().map(|p| self.tokenizer.encode(p)).collect::<Result<Vec<_>>>()?.concat();
        te.forward(&Tensor::from_vec(ids, (prompts.len(), self.tokenizer.max_length()), &Device::Cpu)?, None)
    }

    /// Row 1: real images; rows 2-3: samples from those images' full captions.
    fn grid(&self, ema: &[Tensor], images: &[Vec<u8>], attrs: &[[f64; 4]], cap: &Captioner, rows: &[usize], path: &Path) -> Result<()> {
        let (te, unet, vae) = self.models(ema)?;
        let prompts: Vec<String> = rows.iter().map(|&i| cap.full_caption(&attrs[i])).collect();
        let cond = self.encode(&te, &prompts)?;
        let uncond = self.encode(&te, &[String::new()])?;
        let mut tiles: Vec<Vec<u8>> = rows.iter().map(|&i| images[i].clone()).collect();
        let side = self.unet.sample_size;
        for r in 0..2u64 {
            let x_t = seeded_randn(derive_u64(&[b"diffii-pretrain-sample\0", &r.to_le_bytes()]), &[rows.len(), self.unet.in_channels, side, side], &Device::Cpu)?;
            let g = self.cadence.sample_guidance;
            let z = ddim_sample(self.sched, &x_t, self.cadence.sample_steps, |x, _, t| guided_eps(&unet, x, t, &uncond, &cond, g), |_| {})?;
            tiles.extend(decode_tiles(&vae, &(z / self.scaling)?)?);
        }
        save_grid(path, &tiles, rows.len())
    }

    /// Rows: real images, VAE reconstructions, DDIM inversion (caption-conditioned, no
    /// guidance) followed by sampling back.
    fn inversion_grid(&self, ema: &[Tensor], images: &[Vec<u8>], attrs: &[[f64; 4]], cap: &Captioner, rows: &[usize], path: &Path) -> Result<()> {
        let (te, unet, vae) = self.models(ema)?;
        let prompts: Vec<String> = rows.iter().map(|&i| cap.full_caption(&attrs[i])).collect();
        let cond = self.encode(&te, &prompts)?;
        let side = ((images[0].len() / 3) as f64).sqrt() as usize;
        let x = pixel_batch(images, rows, side)?;
        let z0 = (vae.encode(&x)?.0 * self.scaling)?;
        let mut tiles: Vec<Vec<u8>> = rows.iter().map(|&i| images[i].clone()).collect();
        tiles.extend(decode_tiles(&vae, &(&z0 / self.scaling)?)?);
        let steps = self.cadence.sample_steps;
        let eps = |x: &Tensor, _: usize, t: usize| guided_eps(&unet, x, t, &cond, &cond, 1.0);
        let z_t = ddim_invert(self.sched, &z0, steps, eps, |_| {})?;
        let z = ddim_sample(self.sched, &z_t, steps, eps, |_| {})?;
        tiles.extend(decode_tiles(&vae, &(z / self.scaling)?)?);
        save_grid(path, &tiles, rows.len())
    }
}

fn decode_tiles(vae: &Vae, z: &Tensor) -> Result<Vec<Vec<u8>>> {
    let x = vae.decode(z)?;
    (0..x.dim(0)?).map(|i| Ok(tensor_to_u8(&x.get(i)?, Quantize::Round)?.0)).collect()
}

/// Square RGB tiles laid out `cols` per row, as a PNG.
pub fn save_grid(path: &Path, tiles: &[Vec<u8>], cols: usize) -> Result<()> {
    let Some(first) = tiles.first() else { return Err(Error::invalid("no tiles for a grid")) };
    let side = ((first.len() / 3) as f64).sqrt() as usize;
    let rows = tiles.len().div_ceil(cols);
    let (w, h) = (cols * side, rows * side);
    let mut px = vec![0u8; w * h * 3];
    for (k, t) in tiles.iter().enumerate() {
        let (r, c) = (k / cols, k % cols);
        for y in 0..side {
            let dst = ((r * side + y) * w + c * side) * 3;
            px[dst..dst + side * 3].copy_from_slice(&t[y * side * 3..(y + 1) * side * 3]);
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    save_png_atomic(path, &px, w, h)?;
    Ok(())
}
