//! Arguments shared by `invert`, `generate` and `augment`, and their resolution into the
//! library's settings requests (the library resolves them: explicit flag > `--preset` > default).
use std::path::PathBuf;

use clap::ValueEnum;
use diffii::data::dataset::Dataset;
use diffii::data::image::ResizePolicy;
use diffii::data::pixels::Quantize;
use diffii::kernels::bf16::Kernel;
use diffii::nn::Precision;
use diffii::synth::diffii::{read_suffixes, Settings, SettingsRequest};
use diffii::synth::driver::{RunOptions, Summary};
use diffii::synth::invert::InversionRequest;
use diffii::synth::pipeline::{Pipeline, PipelineSpec};
use diffii::synth::plan::{Count, Interp, Shard};

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
    /// Product precision on the CPU: f32, or bf16 (inputs of the convolutions, linear layers and
    /// attention products rounded to bf16, f32 accumulation; needs AVX-512 BF16 or AMX) on the
    /// fastest bf16 kernel of this CPU (AMX tiles where present), or bf16-avx512 / bf16-amx to
    /// choose the kernel.
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: PrecisionArg,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrecisionArg {
    F32,
    Bf16,
    #[value(name = "bf16-avx512")]
    Bf16Avx512,
    #[value(name = "bf16-amx")]
    Bf16Amx,
}

impl From<PrecisionArg> for Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::Bf16 => Precision::bf16(),
            PrecisionArg::Bf16Avx512 => Precision::Bf16(Kernel::Avx512),
            PrecisionArg::Bf16Amx => Precision::Bf16(Kernel::Amx),
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
pub enum MethodArg {
    /// Diff-II: interpolated inversions, two-stage guided sampling.
    Diffii,
    /// DA-Fusion: a real image noised to a drawn strength, denoised toward the concept prompt.
    DaFusion,
    /// Diff-AUG: DA-Fusion's img2img on the model with --lora, a LoRA learned with the concepts
    /// (`diffii concepts --lora-rank R`).
    DiffAug,
    /// Diff-Mix: a real image of a random class denoised toward the class's concept, with a
    /// soft label (strength^gamma for the class) in the manifest.
    DiffMix,
    /// Text-to-image from the concept prompt (Real-Guidance style).
    Txt2img,
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
    /// The synthesis method: Diff-II, or a baseline on the same model and concepts.
    #[arg(long, value_enum, default_value = "diffii")]
    pub method: MethodArg,
    /// da-fusion / diff-mix: the strengths one is drawn from per image (default
    /// 0.25,0.5,0.75,1 / 0.7).
    #[arg(long, value_delimiter = ',')]
    pub strengths: Option<Vec<f64>>,
    /// diff-mix: the class's soft-label weight is strength^gamma, the source class's the rest
    /// (default 0.8).
    #[arg(long)]
    pub mix_gamma: Option<f64>,
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
    /// Slerp t is drawn uniformly from [t-min, t-max] (default 0).
    #[arg(long)]
    pub t_min: Option<f64>,
    /// (default 1)
    #[arg(long)]
    pub t_max: Option<f64>,
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
    pub fn options(&self) -> anyhow::Result<RunOptions> {
        if self.batch == 0 {
            anyhow::bail!("--batch 0: the number of samples per UNet call must be at least 1");
        }
        Ok(RunOptions::new(self.out.clone(), self.cache.clone(), self.batch, self.shard, !self.quiet))
    }
}

pub fn load_dataset(d: &DataArgs) -> anyhow::Result<Dataset> {
    Ok(Dataset::open(&d.data, d.class_names.as_deref())?)
}

/// Loads the model with its concepts (and LoRA), saying what it does.
pub fn load_pipeline(m: &ModelArgs) -> anyhow::Result<Pipeline> {
    eprintln!("[diffii] loading {}", m.model.display());
    let spec = PipelineSpec {
        model: m.model.clone(),
        concepts: m.concepts.clone(),
        class_map: m.class_map.clone(),
        lora: m.lora.clone(),
        lora_scale: m.lora_scale,
        device: m.device.clone(),
        precision: m.precision.into(),
    };
    let p = Pipeline::load(&spec)?;
    if let Some(path) = &m.lora {
        eprintln!("[diffii] merged LoRA {} into {} attention projections", path.display(), p.lora_projections);
    }
    Ok(p)
}

impl InvertArgs {
    pub fn request(&self) -> InversionRequest {
        InversionRequest {
            official: self.preset == Some(Preset::Official),
            prompt_template: Some(self.prompt_template.clone()),
            superclass: Some(self.superclass.clone()),
            size: self.size,
            resize: self.resize.map(Into::into),
            steps: self.inversion_steps,
        }
    }
}

impl GenArgs {
    /// The library's settings request; reads the suffix file.
    pub fn request(&self) -> anyhow::Result<SettingsRequest> {
        let suffixes = match &self.suffixes {
            Some(path) => {
                let s = read_suffixes(path)?;
                if s.is_empty() {
                    eprintln!("[diffii] note: {} has no suffix lines; stage 1 uses the plain concept prompt", path.display());
                }
                Some(s)
            }
            None => None,
        };
        Ok(SettingsRequest {
            inversion: self.invert.request(),
            suffixes,
            steps: self.steps,
            guidance: self.guidance,
            strength: self.strength,
            stage1_steps: self.stage1_steps,
            interp: match (self.interp, self.t_min.is_some() || self.t_max.is_some()) {
                (Some(InterpArg::Slerp), _) => Some(Interp::Slerp { t_min: self.t_min.unwrap_or(0.0), t_max: self.t_max.unwrap_or(1.0) }),
                (_, true) => anyhow::bail!("--t-min / --t-max set the slerp range: pass --interp slerp (the circle draw has no range)"),
                (Some(InterpArg::Circle), false) => Some(Interp::Circle),
                (None, false) => None,
            },
            count: match (self.per_class, self.expansion) {
                (Some(n), _) => Some(Count::PerClass(n)),
                (None, Some(k)) => Some(Count::Expansion(k)),
                (None, None) => None,
            },
            seed: self.seed,
            quantize: self.quantize.map(|q| match q {
                QuantizeArg::Round => Quantize::Round,
                QuantizeArg::Truncate => Quantize::Truncate,
            }),
        })
    }
}

pub fn print_summary(s: &Summary) {
    for n in &s.notes {
        eprintln!("note: {n}");
    }
    println!(
        "planned {} | written {} | skipped (already done) {} | inverted {} (cache hits {}, stale {}) | inversion {:.1} s | generation {:.1} s | peak memory {:.0} MiB",
        s.planned, s.written, s.skipped_existing, s.inverted, s.inversion_cache_hits, s.inversion_cache_stale,
        s.seconds_inversion, s.seconds_generation, s.peak_rss_mib
    );
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

/// Resolved settings of the chosen method.
pub enum MethodSettings {
    Diffii(Settings),
    Baseline(diffii::synth::img2img::Settings),
}

impl GenerateArgs {
    /// Loads the dataset and model and resolves the settings.
    pub fn prepare(&self) -> anyhow::Result<(Dataset, Pipeline, MethodSettings, RunOptions)> {
        use diffii::synth::img2img::{Mode, Settings as BaselineSettings};
        let opts = self.run.options()?;
        let ds = load_dataset(&self.data)?;
        let p = load_pipeline(&self.model)?;
        let r = self.gen.request()?;
        let s = match self.gen.method {
            MethodArg::Diffii if self.gen.strengths.is_some() => anyhow::bail!("--strengths is a da-fusion setting; Diff-II uses --strength"),
            MethodArg::Diffii if self.gen.mix_gamma.is_some() => anyhow::bail!("--mix-gamma is a diff-mix setting"),
            MethodArg::Diffii => MethodSettings::Diffii(Settings::resolve(&r, &p)?),
            MethodArg::DaFusion => MethodSettings::Baseline(BaselineSettings::resolve(&r, Mode::Img2Img, self.gen.strengths.clone(), self.gen.mix_gamma, &p)?),
            MethodArg::DiffAug => MethodSettings::Baseline(BaselineSettings::resolve(&r, Mode::DiffAug, self.gen.strengths.clone(), self.gen.mix_gamma, &p)?),
            MethodArg::DiffMix => MethodSettings::Baseline(BaselineSettings::resolve(&r, Mode::DiffMix, self.gen.strengths.clone(), self.gen.mix_gamma, &p)?),
            MethodArg::Txt2img => MethodSettings::Baseline(BaselineSettings::resolve(&r, Mode::Txt2Img, self.gen.strengths.clone(), self.gen.mix_gamma, &p)?),
        };
        Ok((ds, p, s, opts))
    }
}
