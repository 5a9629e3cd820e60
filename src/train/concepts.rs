//! Category concept learning: one new token per class whose embedding row is trained by
//! textual inversion (Gal et al. 2023, "An Image is Worth One Word") with the latent-diffusion
//! noise-prediction loss, optionally jointly with a LoRA (Hu et al. 2022) on the UNet's
//! attention projections — the recipe of Diff-Mix that the official Diff-II release used.
//!
//! One optimisation step: for each of `grad_accum` micro-batches draw `batch` images (from all
//! classes in `joint` mode, from the current class in `per-class` mode), a VAE posterior sample
//! of each (x scaling factor), a timestep t ~ U{0, …, T-1}, noise, and a prompt from the
//! templates with the image's class token; the loss is `mean((unet(x_t, t, clip(prompt)) -
//! target)^2)` with target = noise (epsilon models) or velocity (v-prediction models).
//! Gradients reach only the concept rows (and the adapters): the base vocabulary and every
//! model weight stay frozen, and frozen matmul operands get no gradient computed at all
//! (see [`crate::nn::frozen`]).
//!
//! Every random draw of a step derives from (seed, phase, step, micro-batch), so a run resumed
//! from a checkpoint (rows, adapters, optimizer moments, step) continues exactly as the
//! uninterrupted run would.
//!
//! Outputs (diffusers formats): `learned_embeds.safetensors` (`{token: [hidden]}`) with
//! `concepts.json` (class → token map and token order), `pytorch_lora_weights.safetensors`
//! when a LoRA is trained, `train_config.json`, `loss.csv`, and `checkpoint.safetensors`
//! while training.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::dataset::Dataset;
use crate::data::image::{load_for_model, ResizePolicy};
use crate::data::pixels::u8_to_tensor;
use crate::error::{Error, Result};
use crate::hash::{settings_sha256, sha256_file};
use crate::rng::seeded_randn;
use crate::schedule::ddim::{Ddim, PredictionType};
use crate::sd::concepts::Concepts;
use crate::sd::loader::StableDiffusion;
use crate::sd::lora::{self, TrainableAdapter};
use crate::train::checkpoint::{self, Checkpoint};
use crate::train::diffusion::{noise_prediction_loss, Batch};
use crate::train::log::LossLog;
use crate::train::optim::{AdamW, AdamWParams};

/// The prompt template of the Diff-II / Diff-Mix concept training.
pub const DEFAULT_TEMPLATE: &str = "a photo of a {concept} {superclass}";

/// diffusers' `imagenet_templates_small` (textual_inversion.py), with `{}` written as
/// `{concept} {superclass}`.
pub const IMAGENET_TEMPLATES: &[&str] = &[
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
];

/// The standard template list in our placeholder syntax.
pub fn imagenet_templates() -> Vec<String> {
    IMAGENET_TEMPLATES.iter().map(|t| t.replace("{}", "{concept} {superclass}")).collect()
}

/// How classes share the optimisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrainMode {
    /// All tokens (and the LoRA) in one run, batches drawn from the whole dataset (Diff-Mix).
    Joint,
    /// One token at a time, `steps` steps each, batches from that class only.
    PerClass,
}

/// Every setting of a concept-learning run (written to `train_config.json`; a resumed run must
/// match it exactly).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    pub mode: TrainMode,
    /// Optimiser steps (per class in per-class mode).
    pub steps: usize,
    /// Images per micro-batch.
    pub batch: usize,
    /// Micro-batches per optimiser step.
    pub grad_accum: usize,
    /// Learning rate of the token rows.
    pub lr: f64,
    pub weight_decay: f64,
    /// 0 = no LoRA.
    pub lora_rank: usize,
    /// LoRA alpha (scale = alpha / rank).
    pub lora_alpha: f64,
    pub lora_lr: f64,
    /// Square training resolution in pixels.
    pub resolution: usize,
    pub resize: ResizePolicy,
    /// Random horizontal flips.
    pub flip: bool,
    /// Random `resolution`-square crops of the image resized to 9/8 of the resolution.
    pub random_crop: bool,
    /// Prompt templates with `{concept}` and `{superclass}`.
    pub templates: Vec<String>,
    pub superclass: String,
    /// Word(s) whose token embedding (mean over its tokens) initialises every row.
    pub init_word: String,
    /// Rows learned before (`learned_embeds.safetensors`) that initialise the tokens instead
    /// of `init_word`, e.g. tokens learned alone, then tuned further with a LoRA. The run is
    /// identified by the file's hash, not its path.
    #[serde(skip)]
    pub init_embeds: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_embeds_sha256: Option<String>,
    /// Dataset classes and their tokens, in token-id order.
    pub classes: Vec<String>,
    pub tokens: Vec<String>,
    pub seed: u64,
    /// Write a resumable checkpoint every N steps (0 = only at the end of each class).
    pub checkpoint_every: usize,
    /// What the run depends on: the model files and the dataset's images.
    pub model_sha256: String,
    pub data_sha256: String,
}

impl TrainSettings {
    fn phases(&self) -> usize {
        match self.mode {
            TrainMode::Joint => 1,
            TrainMode::PerClass => self.classes.len(),
        }
    }

    /// The prompt of template `i` for `token`.
    pub fn prompt(&self, i: usize, token: &str) -> String {
        let p = self.templates[i].replace("{concept}", token).replace("{superclass}", &self.superclass);
        p.split_whitespace().collect::<Vec<_>>().join(" ")
    }
}

/// Concept-learning settings as a user gives them: `None` takes the default, or the official
/// preset's value when `official` is set.
#[derive(Clone, Debug)]
pub struct TrainRequest {
    /// The Diff-Mix recipe of the official Diff-II release: joint, LoRA rank 10, lr 5e-5 for
    /// tokens and LoRA, batch 2, 224 px, 35000 steps.
    pub official: bool,
    /// JSON map from class name to the token to learn (default `<class_0>`, `<class_1>`, ...).
    pub class_map: Option<PathBuf>,
    pub superclass: String,
    /// Default: the superclass.
    pub init_word: Option<String>,
    /// Initialise the tokens from these learned rows instead (see [`TrainSettings::init_embeds`]).
    pub init_embeds: Option<PathBuf>,
    pub templates: Vec<String>,
    pub mode: Option<TrainMode>,
    pub steps: Option<usize>,
    pub batch: Option<usize>,
    pub grad_accum: usize,
    pub lr: Option<f64>,
    pub weight_decay: f64,
    pub lora_rank: Option<usize>,
    /// Default: the rank.
    pub lora_alpha: Option<f64>,
    pub lora_lr: Option<f64>,
    /// Default: the model's native size; official 224.
    pub resolution: Option<usize>,
    pub resize: ResizePolicy,
    pub flip: bool,
    pub random_crop: bool,
    pub seed: u64,
    pub checkpoint_every: usize,
}

impl TrainSettings {
    /// Resolves a request against the model and dataset (explicit value > official preset >
    /// default) and hashes both, so the settings identify the run.
    pub fn resolve(r: &TrainRequest, sd: &StableDiffusion, ds: &Dataset) -> Result<Self> {
        let official = r.official;
        let tokens = match &r.class_map {
            Some(path) => {
                let map = crate::sd::concepts::ClassMap::from_file(path)?;
                ds.classes
                    .iter()
                    .map(|c| {
                        map.entries.iter().find(|(k, _)| k == c).map(|(_, t)| t.clone()).ok_or_else(|| {
                            Error::bad_file(path, format!("class `{c}` has no token; the map must cover every dataset class"))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            None => default_tokens(ds.classes.len()),
        };
        let init_word = match r.init_word.clone().filter(|w| !w.trim().is_empty()) {
            Some(w) => w,
            None if !r.superclass.trim().is_empty() => r.superclass.clone(),
            None if r.init_embeds.is_some() => String::new(),
            None => return Err(Error::invalid("pass --superclass (e.g. `bird`) or --init-word to initialise the tokens")),
        };
        let init_embeds_sha256 = r.init_embeds.as_deref().map(sha256_file).transpose()?;
        for (flag, v) in [("--lr", r.lr), ("--lora-lr", r.lora_lr), ("--lora-alpha", r.lora_alpha), ("--weight-decay", Some(r.weight_decay))] {
            if let Some(v) = v.filter(|v| !v.is_finite() || *v < 0.0) {
                return Err(Error::invalid(format!("{flag} {v} must be a finite number >= 0")));
            }
        }
        let native = sd.unet.config.sample_size * sd.vae.config.spatial_factor();
        let lora_rank = r.lora_rank.unwrap_or(if official { 10 } else { 0 });
        Ok(TrainSettings {
            mode: r.mode.unwrap_or(TrainMode::Joint),
            steps: r.steps.unwrap_or(if official { 35_000 } else { 3000 }),
            batch: r.batch.unwrap_or(if official { 2 } else { 1 }),
            grad_accum: r.grad_accum,
            lr: r.lr.unwrap_or(if official { 5e-5 } else { 5e-4 }),
            weight_decay: r.weight_decay,
            lora_rank,
            lora_alpha: r.lora_alpha.unwrap_or(lora_rank as f64),
            lora_lr: r.lora_lr.unwrap_or(5e-5),
            resolution: r.resolution.unwrap_or(if official { 224 } else { native }),
            resize: r.resize,
            flip: r.flip,
            random_crop: r.random_crop,
            templates: r.templates.clone(),
            superclass: r.superclass.clone(),
            init_word,
            init_embeds: r.init_embeds.clone(),
            init_embeds_sha256,
            classes: ds.classes.clone(),
            tokens,
            seed: r.seed,
            checkpoint_every: r.checkpoint_every,
            model_sha256: sd.fingerprint()?,
            data_sha256: dataset_sha256(ds)?,
        })
    }
}

/// Loads a model for concept learning: training mode, without concepts.
pub fn load_model(dir: &Path, device: &str) -> Result<StableDiffusion> {
    let opts = crate::sd::loader::LoadOptions {
        mode: crate::nn::Mode::Train,
        concepts: false,
        device: crate::sd::loader::parse_device(device)?,
        ..Default::default()
    };
    StableDiffusion::load(dir, &opts)
}

/// The default tokens: `<class_0>`, `<class_1>`, …
pub fn default_tokens(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("<class_{i}>")).collect()
}

/// Where and how to run.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub out: PathBuf,
    /// Continue from `checkpoint.safetensors` in `out`.
    pub resume: bool,
    pub progress: bool,
    /// Stop (after checkpointing) once this many steps in total are done; for tests and for
    /// splitting a long run over time-limited jobs. `None` = run to the end.
    pub stop_after: Option<usize>,
}

/// What a run did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TrainSummary {
    pub steps_done: usize,
    pub steps_total: usize,
    pub resumed_from: usize,
    pub seconds: f64,
    pub seconds_per_step: f64,
    /// Mean loss of the first and last tenth of the steps run now.
    pub loss_first: f64,
    pub loss_last: f64,
    pub peak_rss_mib: f64,
    pub finished: bool,
    pub notes: Vec<String>,
}

/// Output file names.
pub const EMBEDS_FILE: &str = "learned_embeds.safetensors";
pub const LORA_FILE: &str = "pytorch_lora_weights.safetensors";
pub const CONFIG_FILE: &str = "train_config.json";
pub const LOSS_FILE: &str = "loss.csv";
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

/// SHA-256 over the dataset's classes, relative paths and image bytes.
pub fn dataset_sha256(ds: &Dataset) -> Result<String> {
    let mut h = Sha256::new();
    for c in &ds.classes {
        h.update(c.as_bytes());
        h.update([0]);
    }
    for it in &ds.items {
        h.update(it.rel.as_bytes());
        h.update([0]);
        h.update((it.class as u64).to_le_bytes());
        h.update(sha256_file(&it.path)?.as_bytes());
    }
    Ok(crate::hash::hex(&h.finalize()))
}

/// Per-image training data: the VAE posterior (mean, std) of the image and of its mirror image,
/// or the pixels when crops are random (encoded per draw).
enum Source {
    Posterior { mean: Vec<Tensor>, std: Vec<Tensor> },
    Pixels { rgb: Vec<u8>, side: usize },
}

/// A prepared training problem: model, data and settings.
pub struct Trainer<'a> {
    pub sd: &'a mut StableDiffusion,
    pub settings: TrainSettings,
    sched: Ddim,
    prediction: PredictionType,
    alphas: Vec<f32>,
    sources: Vec<Source>,
    /// Item indices of each class.
    members: Vec<Vec<usize>>,
    item_class: Vec<usize>,
    /// Current rows [k, hidden] of every concept (those not being trained right now).
    rows: Tensor,
    pub adapters: Vec<TrainableAdapter>,
}

impl<'a> Trainer<'a> {
    /// Adds the tokens, initialises their rows, attaches adapters and encodes the dataset.
    /// `sd` must be loaded in [`Mode::Train`](crate::nn::Mode) without concepts.
    pub fn new(sd: &'a mut StableDiffusion, ds: &Dataset, settings: TrainSettings, progress: bool) -> Result<Self> {
        let s = &settings;
        validate(sd, ds, s)?;
        sd.tokenizer.add_concept_tokens(&s.tokens)?;
        let k = s.tokens.len();
        let rows = match &s.init_embeds {
            Some(path) => learned_rows(sd, path, &s.tokens)?,
            None => init_row(sd, &s.init_word)?.unsqueeze(0)?.repeat((k, 1))?.contiguous()?,
        };
        let adapters = if s.lora_rank > 0 {
            lora::attach_trainable(&mut sd.unet, s.lora_rank, s.lora_alpha, s.seed)?
        } else {
            Vec::new()
        };
        let sched = Ddim::new(sd.scheduler.clone())?;
        let prediction = sd.scheduler.prediction().map_err(Error::invalid)?;
        let alphas = sched.alphas_cumprod().to_vec();
        let members = ds.class_members();
        let item_class = ds.items.iter().map(|it| it.class).collect();
        let sources = encode_dataset(sd, ds, s, progress)?;
        Ok(Trainer { sd, settings, sched, prediction, alphas, sources, members, item_class, rows, adapters })
    }

    /// All concept rows as they stand.
    pub fn rows(&self) -> &Tensor {
        &self.rows
    }

    /// The randomness of micro-batch `micro` of step `step` of phase `phase`.
    fn rng(&self, phase: usize, step: usize, micro: usize) -> ChaCha8Rng {
        let [a, b, c, d] = [self.settings.seed, phase as u64, step as u64, micro as u64].map(u64::to_le_bytes);
        crate::rng::derive_rng(&[b"diffii-concepts\0", &a, &b, &c, &d])
    }

    /// Draws micro-batch `micro` of `step` in `phase`.
    pub fn batch(&self, phase: usize, step: usize, micro: usize) -> Result<Batch> {
        let s = &self.settings;
        let mut rng = self.rng(phase, step, micro);
        let dev = self.sd.unet_device().clone();
        let dtype = self.sd.unet.dtype();
        let pool: Vec<usize> = match s.mode {
            TrainMode::Joint => (0..self.item_class.len()).collect(),
            TrainMode::PerClass => self.members[phase].clone(),
        };
        let scaling = self.sd.vae.config.scaling_factor;
        let mut latents = Vec::with_capacity(s.batch);
        let mut timesteps = Vec::with_capacity(s.batch);
        let mut ids = Vec::with_capacity(s.batch * self.sd.tokenizer.max_length());
        for _ in 0..s.batch {
            let item = pool[rng.random_range(0..pool.len())];
            let flip = s.flip && rng.random_bool(0.5);
            let (mean, std) = match &self.sources[item] {
                Source::Posterior { mean, std } => (mean[flip as usize].clone(), std[flip as usize].clone()),
                Source::Pixels { rgb, side } => {
                    let r = s.resolution;
                    let (x0, y0) = (rng.random_range(0..=side - r), rng.random_range(0..=side - r));
                    posterior(self.sd, &crop_rgb(rgb, *side, x0, y0, r, flip), r)?
                }
            };
            let eps_seed: u64 = rng.random();
            let e = seeded_randn(eps_seed, mean.dims(), &dev)?.to_dtype(dtype)?;
            latents.push(((mean + (std * e)?)? * scaling)?);
            timesteps.push(rng.random_range(0..self.sched.num_train_timesteps()));
            let template = rng.random_range(0..s.templates.len());
            let class = self.item_class[item];
            ids.extend(self.sd.tokenizer.encode(&s.prompt(template, &s.tokens[class]))?);
        }
        let latents = Tensor::stack(&latents, 0)?;
        let noise_seed: u64 = rng.random();
        let noise = seeded_randn(noise_seed, latents.dims(), &dev)?.to_dtype(dtype)?;
        let n = self.sd.tokenizer.max_length();
        let ids = Tensor::from_vec(ids, (s.batch, n), &dev)?;
        Ok(Batch { latents, noise, timesteps, ids })
    }

    /// The noise-prediction loss of `batch` with concept rows `rows` [k, hidden] (a tensor that
    /// may be, or contain, a variable).
    pub fn loss(&self, batch: &Batch, rows: &Tensor) -> Result<Tensor> {
        noise_prediction_loss(&self.sd.text_encoder, &self.sd.unet, &self.alphas, self.prediction, batch, Some(rows))
    }

    /// The rows the text encoder sees in `phase` when `var` holds the trained part.
    fn assemble(&self, phase: usize, var: &Var) -> Result<Tensor> {
        Ok(match self.settings.mode {
            TrainMode::Joint => var.as_tensor().clone(),
            TrainMode::PerClass => {
                let k = self.settings.tokens.len();
                let mut parts = Vec::with_capacity(3);
                if phase > 0 {
                    parts.push(self.rows.narrow(0, 0, phase)?);
                }
                parts.push(var.as_tensor().clone());
                if phase + 1 < k {
                    parts.push(self.rows.narrow(0, phase + 1, k - phase - 1)?);
                }
                Tensor::cat(&parts, 0)?
            }
        })
    }

    fn phase_var(&self, phase: usize) -> Result<Var> {
        Ok(match self.settings.mode {
            TrainMode::Joint => Var::from_tensor(&self.rows.copy()?)?,
            TrainMode::PerClass => Var::from_tensor(&self.rows.narrow(0, phase, 1)?.copy()?)?,
        })
    }

    fn store_phase_var(&mut self, phase: usize, var: &Var) -> Result<()> {
        self.rows = self.assemble(phase, var)?.detach().copy()?;
        Ok(())
    }

    /// The concepts learned so far, ready to save or to generate with.
    pub fn concepts(&self) -> Result<Concepts> {
        let class_to_token: BTreeMap<String, String> =
            self.settings.classes.iter().cloned().zip(self.settings.tokens.iter().cloned()).collect();
        Ok(Concepts { tokens: self.settings.tokens.clone(), rows: self.rows.to_dtype(DType::F32)?, class_to_token })
    }

    /// Trains; see the module docs. Returns what was done.
    pub fn run(&mut self, opts: &TrainOptions) -> Result<TrainSummary> {
        let start_time = Instant::now();
        let s = self.settings.clone();
        let out = &opts.out;
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        check_config(out, &s, opts.resume)?;
        let mut summary = TrainSummary { steps_total: s.steps * s.phases(), ..Default::default() };
        let log_path = out.join(LOSS_FILE);
        let mut log = LossLog::open(&log_path, &["phase", "class", "step", "loss"], None);
        // (phase, step) to start from, and optimiser state to restore.
        let mut start = (0usize, 0usize);
        let mut restored: Option<Checkpoint> = None;
        let ckpt_path = out.join(CHECKPOINT_FILE);
        if opts.resume && ckpt_path.is_file() {
            let c = Checkpoint::read(&ckpt_path, self.sd.unet_device(), &settings_sha256(&s))?;
            self.rows = c.tensor("rows")?.to_dtype(self.rows.dtype())?;
            for (i, a) in self.adapters.iter().enumerate() {
                a.down.set(&c.tensor(&format!("lora.{i}.down"))?.to_dtype(a.down.dtype())?)?;
                a.up.set(&c.tensor(&format!("lora.{i}.up"))?.to_dtype(a.up.dtype())?)?;
            }
            start = (c.position("phase")?, c.position("step")?);
            let done = start.0 * s.steps + start.1;
            log = LossLog::open(&log_path, &["phase", "class", "step", "loss"], Some(done));
            summary.resumed_from = done;
            restored = Some(c);
        } else if opts.resume && out.join(EMBEDS_FILE).is_file() && out.join(LOSS_FILE).is_file() {
            summary.finished = true;
            summary.notes.push(format!("{} already holds a finished run with these settings", out.display()));
            return Ok(summary);
        }
        let pb = crate::progress::bar(summary.steps_total, "concepts", opts.progress);
        pb.set_position(summary.resumed_from as u64);
        let mut losses_now: Vec<f64> = Vec::new();
        let mut done_total = summary.resumed_from;
        'phases: for phase in start.0..s.phases() {
            let var = self.phase_var(phase)?;
            let mut opt_rows = AdamW::new(vec![var.clone()], AdamWParams { weight_decay: s.weight_decay, ..AdamWParams::with_lr(s.lr) })?;
            let lora_vars: Vec<Var> = self.adapters.iter().flat_map(|a| [a.down.clone(), a.up.clone()]).collect();
            let mut opt_lora = AdamW::new(lora_vars, AdamWParams { weight_decay: s.weight_decay, ..AdamWParams::with_lr(s.lora_lr) })?;
            let first_step = if phase == start.0 { start.1 } else { 0 };
            if phase == start.0 {
                if let Some(c) = restored.take() {
                    if let Some((m, v, t)) = c.optimizer("rows", 1)? {
                        opt_rows.restore(m, v, t)?;
                    }
                    if let Some((m, v, t)) = c.optimizer("lora", 2 * self.adapters.len())? {
                        opt_lora.restore(m, v, t)?;
                    }
                }
            }
            for step in first_step..s.steps {
                if opts.stop_after.is_some_and(|n| done_total >= n) {
                    break 'phases;
                }
                let mut grads_rows: Option<Tensor> = None;
                let mut grads_lora: Vec<Option<Tensor>> = vec![None; opt_lora.vars().len()];
                let mut loss_sum = 0.0;
                for micro in 0..s.grad_accum {
                    let batch = self.batch(phase, step, micro)?;
                    let rows = self.assemble(phase, &var)?;
                    let loss = (self.loss(&batch, &rows)? / s.grad_accum as f64)?;
                    loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                    let g = loss.backward()?;
                    accumulate(&mut grads_rows, g.get(var.as_tensor()))?;
                    for (acc, v) in grads_lora.iter_mut().zip(opt_lora.vars()) {
                        accumulate(acc, g.get(v.as_tensor()))?;
                    }
                }
                if !loss_sum.is_finite() {
                    return Err(Error::invalid(format!(
                        "loss became {loss_sum} at step {step} (class phase {phase}); lower --lr / --lora-lr"
                    )));
                }
                opt_rows.step(&[grads_rows])?;
                if !self.adapters.is_empty() {
                    opt_lora.step(&grads_lora)?;
                }
                let class = match s.mode {
                    TrainMode::Joint => "all".to_string(),
                    TrainMode::PerClass => s.classes[phase].clone(),
                };
                log.push(&[&phase.to_string(), &class, &(step + 1).to_string(), &format!("{loss_sum:.8}")]);
                losses_now.push(loss_sum);
                done_total += 1;
                summary.steps_done += 1;
                pb.inc(1);
                pb.set_message(format!("loss {loss_sum:.4}"));
                let last = step + 1 == s.steps;
                if last || (s.checkpoint_every > 0 && (step + 1) % s.checkpoint_every == 0) || opts.stop_after == Some(done_total) {
                    self.store_phase_var(phase, &var)?;
                    let (next_phase, next_step) = if last { (phase + 1, 0) } else { (phase, step + 1) };
                    let keep_adam = !last;
                    // The log before the checkpoint: a kill between the two writes then leaves
                    // rows a resume drops, never a checkpoint ahead of its log.
                    log.write()?;
                    self.write_checkpoint(
                        &ckpt_path,
                        next_phase,
                        next_step,
                        keep_adam.then_some(&opt_rows),
                        (!self.adapters.is_empty()).then_some(&opt_lora),
                    )?;
                }
            }
            self.store_phase_var(phase, &var)?;
        }
        pb.finish_and_clear();
        summary.finished = done_total == summary.steps_total;
        if summary.finished {
            self.save_outputs(out)?;
            log.write()?;
            let _ = std::fs::remove_file(&ckpt_path);
        }
        let n = losses_now.len();
        let tenth = (n / 10).max(1).min(n);
        let mean = |xs: &[f64]| if xs.is_empty() { f64::NAN } else { xs.iter().sum::<f64>() / xs.len() as f64 };
        summary.loss_first = mean(&losses_now[..tenth]);
        summary.loss_last = mean(&losses_now[n - tenth..]);
        summary.seconds = start_time.elapsed().as_secs_f64();
        summary.seconds_per_step = if n > 0 { summary.seconds / n as f64 } else { 0.0 };
        summary.peak_rss_mib = crate::instrument::peak_rss_mib();
        Ok(summary)
    }

    /// Writes the final files: embeddings + class map, LoRA (if any).
    pub fn save_outputs(&self, out: &Path) -> Result<()> {
        let concepts = self.concepts()?;
        concepts.save(&out.join(EMBEDS_FILE))?;
        if !self.adapters.is_empty() {
            lora::to_lora(&self.adapters, self.settings.lora_alpha)?.save(&out.join(LORA_FILE))?;
        }
        Ok(())
    }

    fn write_checkpoint(&self, path: &Path, phase: usize, step: usize, rows_opt: Option<&AdamW>, lora_opt: Option<&AdamW>) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = vec![("rows".into(), self.rows.clone())];
        for (i, a) in self.adapters.iter().enumerate() {
            tensors.push((format!("lora.{i}.down"), a.down.as_tensor().clone()));
            tensors.push((format!("lora.{i}.up"), a.up.as_tensor().clone()));
        }
        let position = [("phase", phase), ("step", step)];
        checkpoint::write(path, &settings_sha256(&self.settings), &position, tensors, &[("rows", rows_opt), ("lora", lora_opt)])
    }
}

fn accumulate(acc: &mut Option<Tensor>, g: Option<&Tensor>) -> Result<()> {
    if let Some(g) = g {
        *acc = Some(match acc.take() {
            Some(a) => (a + g)?,
            None => g.clone(),
        });
    }
    Ok(())
}

fn validate(sd: &StableDiffusion, ds: &Dataset, s: &TrainSettings) -> Result<()> {
    if sd.concepts.is_some() {
        return Err(Error::invalid("the model was loaded with concepts; load it without them to learn new ones"));
    }
    if s.steps == 0 || s.batch == 0 || s.grad_accum == 0 {
        return Err(Error::invalid("--steps, --batch and --grad-accum must be at least 1"));
    }
    if s.templates.is_empty() || s.templates.iter().any(|t| !t.contains("{concept}")) {
        return Err(Error::invalid("every prompt template must contain {concept}"));
    }
    // The latent must survive the UNet's downsamplings exactly (skip connections are concatenated).
    let f = sd.vae.config.spatial_factor() << sd.unet.config.block_out_channels.len().saturating_sub(1);
    if s.resolution == 0 || s.resolution % f != 0 {
        return Err(Error::invalid(format!(
            "--resolution {} must be a positive multiple of {f} (the VAE factor times the UNet's downsampling)",
            s.resolution
        )));
    }
    if s.tokens.len() != ds.classes.len() || s.classes != ds.classes {
        return Err(Error::invalid(format!("{} tokens for {} dataset classes", s.tokens.len(), ds.classes.len())));
    }
    if s.lora_rank > 0 && s.mode == TrainMode::PerClass {
        return Err(Error::invalid(
            "a LoRA is shared by all classes: train it with --mode joint (per-class mode learns tokens only)",
        ));
    }
    for (c, name) in ds.classes.iter().enumerate() {
        if !ds.items.iter().any(|it| it.class == c) {
            return Err(Error::invalid(format!("class `{name}` has no images; remove it or add images")));
        }
    }
    Ok(())
}

/// The mean token embedding of `word` (its BPE tokens, without start / end / padding).
/// The rows of `tokens` ([k, hidden]) from a `learned_embeds.safetensors`.
fn learned_rows(sd: &StableDiffusion, path: &Path, tokens: &[String]) -> Result<Tensor> {
    let emb = sd.text_encoder.token_embedding();
    let c = crate::sd::concepts::Concepts::load(path, emb.dim(1)?, emb.device())?;
    let rows = tokens
        .iter()
        .map(|t| match c.tokens.iter().position(|x| x == t) {
            Some(i) => Ok(c.rows.get(i)?.to_dtype(emb.dtype())?),
            None => Err(Error::bad_file(path, format!("has no row for token `{t}`; it must come from a run with the same classes and tokens"))),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&rows, 0)?.contiguous()?)
}

pub fn init_row(sd: &StableDiffusion, word: &str) -> Result<Tensor> {
    let tk = &sd.tokenizer;
    let ids = tk.encode(word)?;
    let body: Vec<u32> = ids.iter().skip(1).take_while(|&&i| i != tk.eos_id()).copied().collect();
    if body.is_empty() {
        return Err(Error::invalid(format!(
            "--init-word {word:?} has no tokens; pass a word such as the superclass (e.g. `bird`)"
        )));
    }
    let emb = sd.text_encoder.token_embedding();
    let idx = Tensor::new(body.as_slice(), emb.device())?;
    Ok(emb.index_select(&idx, 0)?.mean(0)?)
}

/// Encodes every image once (and its mirror image when flips are on), or keeps its pixels when
/// crops are random.
fn encode_dataset(sd: &StableDiffusion, ds: &Dataset, s: &TrainSettings, progress: bool) -> Result<Vec<Source>> {
    let pb = crate::progress::bar(ds.items.len(), "encode", progress);
    let mut out = Vec::with_capacity(ds.items.len());
    for it in &ds.items {
        if s.random_crop {
            let side = s.resolution * 9 / 8;
            out.push(Source::Pixels { rgb: load_for_model(&it.path, side, s.resize)?.0, side });
        } else {
            let r = s.resolution;
            let rgb = load_for_model(&it.path, r, s.resize)?.0;
            let (mut mean, mut std) = (Vec::new(), Vec::new());
            for flip in [false, true].into_iter().take(1 + s.flip as usize) {
                let (m, sd_) = posterior(sd, &crop_rgb(&rgb, r, 0, 0, r, flip), r)?;
                mean.push(m);
                std.push(sd_);
            }
            out.push(Source::Posterior { mean, std });
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(out)
}

/// The VAE posterior (mean, standard deviation) [c, h, w] of a `side`-square RGB image.
fn posterior(sd: &StableDiffusion, rgb: &[u8], side: usize) -> Result<(Tensor, Tensor)> {
    let x = u8_to_tensor(rgb, side, side, sd.unet_device())?.to_dtype(sd.unet.dtype())?;
    let (mean, logvar) = sd.vae.encode(&x)?;
    Ok((mean.squeeze(0)?, (logvar * 0.5)?.exp()?.squeeze(0)?))
}

/// The `size`-square window at (x0, y0) of a `side`-square RGB image, optionally mirrored.
fn crop_rgb(rgb: &[u8], side: usize, x0: usize, y0: usize, size: usize, mirror: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(size * size * 3);
    for y in 0..size {
        for x in 0..size {
            let sx = if mirror { x0 + size - 1 - x } else { x0 + x };
            let p = ((y0 + y) * side + sx) * 3;
            out.extend_from_slice(&rgb[p..p + 3]);
        }
    }
    out
}

/// Refuses to mix runs in one folder; writes the config of a new run.
fn check_config(out: &Path, s: &TrainSettings, resume: bool) -> Result<()> {
    let path = out.join(CONFIG_FILE);
    let existed = crate::data::atomic::write_or_match_settings(&path, s, "a concept run")?;
    if existed && !resume {
        return Err(Error::bad_file(
            &path,
            "this folder already holds a concept run; pass --resume to continue or finish it, or use another --out",
        ));
    }
    Ok(())
}

