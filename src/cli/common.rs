//! Arguments shared by `invert`, `generate` and `augment`, and their resolution into the
//! library's settings (explicit flag > `--preset` > default).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::ValueEnum;
use diffii::data::dataset::Dataset;
use diffii::data::image::ResizePolicy;
use diffii::data::pixels::Quantize;
use diffii::diffii::generate::{Pipeline, RunOptions, Settings, BUILTIN_SUFFIXES};
use diffii::diffii::plan::{Count, Interp, Shard};
use diffii::schedule::ddim::Ddim;
use diffii::nn::Precision;
use diffii::sd::concepts::Concepts;
use diffii::sd::loader::{LoadOptions, StableDiffusion};

#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// diffusers SD-1.x model folder (safetensors weights).
    #[arg(long)]
    pub model: PathBuf,
    /// Concept files: diffusers textual-inversion safetensors ({token: row}, one or more) or the
    /// official Diff-II / Diff-Mix `learned_embeds-steps-*.bin`. Default: the model's concepts/.
    #[arg(long, num_args = 1..)]
    pub concepts: Vec<PathBuf>,
    /// JSON map from class name to concept token (default: taken from the concept files).
    #[arg(long)]
    pub class_map: Option<PathBuf>,
    /// diffusers LoRA safetensors for the UNet attention projections.
    #[arg(long)]
    pub lora: Option<PathBuf>,
    /// LoRA strength.
    #[arg(long, default_value_t = 1.0)]
    pub lora_scale: f64,
    /// Where to run: cpu, cuda or cuda:N (CUDA needs a `--features cuda` build).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Product precision on the CPU: f32, or bf16 (inputs of every convolution and linear layer
    /// rounded to bf16, f32 accumulation; ~1.3x faster, needs AVX-512 BF16).
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: PrecisionArg,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrecisionArg {
    F32,
    Bf16,
}

impl From<PrecisionArg> for Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::Bf16 => Precision::Bf16,
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct DataArgs {
    /// Training images: an ImageFolder (root/<class>/<image>) or a list file (`path label` lines).
    #[arg(long)]
    pub data: PathBuf,
    /// Class names, one per line (fixes the class order; labels in a list file may be indices).
    #[arg(long)]
    pub class_names: Option<PathBuf>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// The released Diff-II settings: 512 px, 200 inversion steps, 25 sampling steps, CFG 7.5,
    /// strength 0.3, circle interpolation, expansion 5, truncated 8-bit output.
    Official,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterpArg {
    Slerp,
    Circle,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResizeArg {
    Squash,
    CenterCrop,
}

impl From<ResizeArg> for ResizePolicy {
    fn from(r: ResizeArg) -> Self {
        match r {
            ResizeArg::Squash => ResizePolicy::Squash,
            ResizeArg::CenterCrop => ResizePolicy::CenterCrop,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantizeArg {
    Round,
    Truncate,
}

/// Settings that decide an inversion (shared by `invert` and `generate`).
#[derive(clap::Args, Debug, Clone)]
pub struct InvertArgs {
    /// Apply a named set of settings; explicit flags still override it.
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    /// Prompt template with {concept} and {superclass}.
    #[arg(long, default_value = "a photo of a {concept} {superclass}")]
    pub prompt_template: String,
    /// The word naming what every class is (e.g. "bird", "aircraft", "car").
    #[arg(long, default_value = "")]
    pub superclass: String,
    /// Image side in pixels (default: the model's native size; official preset: 512).
    #[arg(long)]
    pub size: Option<usize>,
    /// How to make a non-square image square.
    #[arg(long, value_enum)]
    pub resize: Option<ResizeArg>,
    /// DDIM inversion steps (default 200).
    #[arg(long)]
    pub inversion_steps: Option<usize>,
}

/// Settings of the synthesis itself.
#[derive(clap::Args, Debug, Clone)]
pub struct GenArgs {
    #[command(flatten)]
    pub invert: InvertArgs,
    /// Scene suffixes for stage 1, one per line (default: a built-in list of generic scenes).
    #[arg(long)]
    pub suffixes: Option<PathBuf>,
    /// DDIM sampling steps (default 25).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale (default 7.5).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Stage 1 (suffix prompt) covers steps with t >= 1000 (1 - strength) (default 0.3).
    #[arg(long)]
    pub strength: Option<f64>,
    /// Use the suffix prompt for exactly the first K steps instead of deriving K from strength.
    #[arg(long)]
    pub stage1_steps: Option<usize>,
    /// Interpolation: the official full great circle, or slerp on the short arc (default circle).
    #[arg(long, value_enum)]
    pub interp: Option<InterpArg>,
    /// Slerp t is drawn uniformly from [t-min, t-max].
    #[arg(long, default_value_t = 0.0)]
    pub t_min: f64,
    #[arg(long, default_value_t = 1.0)]
    pub t_max: f64,
    /// Synthetic images per real image of each class (default 5).
    #[arg(long, conflicts_with = "per_class")]
    pub expansion: Option<usize>,
    /// A fixed number of synthetic images per class.
    #[arg(long)]
    pub per_class: Option<usize>,
    /// Run seed: with the class and sample index it decides every random choice.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// 8-bit conversion of the decoded image (default round; official preset: truncate).
    #[arg(long, value_enum)]
    pub quantize: Option<QuantizeArg>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Inversion cache folder (default OUT/.cache/inversions).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Samples per UNet call.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Make only part i of n (0-based), e.g. `--shard $SLURM_ARRAY_TASK_ID/$N`.
    #[arg(long, default_value = "0/1")]
    pub shard: Shard,
    /// Hide progress bars.
    #[arg(long)]
    pub quiet: bool,
}

impl RunArgs {
    pub fn options(&self) -> RunOptions {
        RunOptions {
            out: self.out.clone(),
            cache: self.cache.clone().unwrap_or_else(|| diffii::diffii::generate::default_cache(&self.out)),
            batch: self.batch.max(1),
            shard: self.shard,
            progress: !self.quiet,
        }
    }
}

pub fn load_dataset(d: &DataArgs) -> anyhow::Result<Dataset> {
    Ok(Dataset::open(&d.data, d.class_names.as_deref())?)
}

/// Loads the model with its concepts (and LoRA) and computes the identifying hashes.
pub fn load_pipeline(m: &ModelArgs) -> anyhow::Result<Pipeline> {
    eprintln!("[diffii] loading {}", m.model.display());
    let device = diffii::sd::loader::parse_device(&m.device)?;
    let opts = LoadOptions { concepts: m.concepts.is_empty(), device, precision: m.precision.into(), ..LoadOptions::default() };
    let mut sd = StableDiffusion::load(&m.model, &opts)?;
    if !m.concepts.is_empty() {
        let c = Concepts::from_files(&m.concepts, m.class_map.as_deref(), sd.text_encoder.config.hidden_size, &opts.device)?;
        sd.add_concepts(c)?;
    } else if let Some(map) = &m.class_map {
        bail!("--class-map {} needs --concepts", map.display());
    }
    let lora_sha256 = match &m.lora {
        Some(path) => {
            let lora = diffii::sd::lora::Lora::load(path)?;
            let n = diffii::sd::lora::apply_lora(&mut sd.unet, &lora, m.lora_scale)?;
            eprintln!("[diffii] merged LoRA {} into {n} attention projections", path.display());
            Some(format!("{}@{}", lora.sha256(), m.lora_scale))
        }
        None => None,
    };
    let concepts_sha256 = sd.concepts.as_ref().map(|c| c.sha256()).unwrap_or_default();
    let model_sha256 = sd.fingerprint()?;
    let sched = Ddim::new(sd.scheduler.clone())?;
    Ok(Pipeline { sd, sched, model_sha256, concepts_sha256, lora_sha256 })
}

fn read_suffixes(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading suffix file {}", path.display()))?;
    Ok(text.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty() && !l.starts_with('#')).collect())
}

/// Resolves flags, preset and defaults into the settings hashed into every record.
pub fn settings(g: &GenArgs, p: &Pipeline) -> anyhow::Result<Settings> {
    let i = &g.invert;
    let official = i.preset == Some(Preset::Official);
    let native = p.sd.unet.config.sample_size * p.sd.vae.config.spatial_factor();
    let suffixes = match &g.suffixes {
        Some(path) => {
            let s = read_suffixes(path)?;
            if s.is_empty() {
                eprintln!("[diffii] note: {} has no suffix lines; stage 1 uses the plain concept prompt", path.display());
            }
            s
        }
        None => BUILTIN_SUFFIXES.iter().map(|s| s.to_string()).collect(),
    };
    let interp = match g.interp.unwrap_or(InterpArg::Circle) {
        InterpArg::Circle => Interp::Circle,
        InterpArg::Slerp => Interp::Slerp { t_min: g.t_min, t_max: g.t_max },
    };
    let count = match (g.per_class, g.expansion) {
        (Some(n), _) => Count::PerClass(n),
        (None, Some(k)) => Count::Expansion(k),
        (None, None) => Count::Expansion(5),
    };
    let strength = g.strength.unwrap_or(0.3);
    if !(0.0..=1.0).contains(&strength) {
        bail!("--strength {strength} must lie in [0, 1]");
    }
    Ok(Settings {
        prompt_template: i.prompt_template.clone(),
        superclass: i.superclass.clone(),
        suffixes,
        size: i.size.unwrap_or(if official { 512 } else { native }),
        resize: i.resize.unwrap_or(ResizeArg::Squash).into(),
        inversion_steps: i.inversion_steps.unwrap_or(200),
        steps: g.steps.unwrap_or(25),
        guidance: g.guidance.unwrap_or(7.5),
        strength,
        stage1_steps: g.stage1_steps,
        interp,
        count,
        seed: g.seed,
        quantize: match g.quantize.unwrap_or(if official { QuantizeArg::Truncate } else { QuantizeArg::Round }) {
            QuantizeArg::Round => Quantize::Round,
            QuantizeArg::Truncate => Quantize::Truncate,
        },
        model_sha256: p.model_sha256.clone(),
        concepts_sha256: p.concepts_sha256.clone(),
        lora_sha256: p.lora_sha256.clone(),
        precision: p.sd.precision.name().to_string(),
    })
}

pub fn print_summary(s: &diffii::diffii::generate::Summary) {
    for n in &s.notes {
        eprintln!("note: {n}");
    }
    println!(
        "planned {} | written {} | skipped (already done) {} | inverted {} (cache hits {}, stale {}) | inversion {:.1} s | generation {:.1} s | peak memory {:.0} MiB",
        s.planned, s.written, s.skipped_existing, s.inverted, s.inversion_cache_hits, s.inversion_cache_stale,
        s.seconds_inversion, s.seconds_generation, s.peak_rss_mib
    );
}

impl GenArgs {
    /// Generation settings at their defaults around the given inversion settings.
    pub fn from_invert(invert: InvertArgs) -> Self {
        GenArgs {
            invert,
            suffixes: None,
            guidance: None,
            steps: None,
            strength: None,
            stage1_steps: None,
            interp: None,
            t_min: 0.0,
            t_max: 1.0,
            expansion: None,
            per_class: None,
            seed: 0,
            quantize: None,
        }
    }
}

/// The full argument set of `generate` and `augment`.
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub gen: GenArgs,
    #[command(flatten)]
    pub run: RunArgs,
}

impl GenerateArgs {
    /// Loads the dataset and model and resolves the settings.
    pub fn prepare(&self) -> anyhow::Result<(Dataset, Pipeline, Settings, RunOptions)> {
        let ds = load_dataset(&self.data)?;
        let p = load_pipeline(&self.model)?;
        let s = settings(&self.gen, &p)?;
        Ok((ds, p, s, self.run.options()))
    }
}
