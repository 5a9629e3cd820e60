//! Image-to-image and text-to-image baselines as [`Method`]s of the synthesis driver, on the
//! same model, concepts and output format as Diff-II:
//!
//! - **DA-Fusion** (Trabucco et al., "Effective Data Augmentation With Diffusion Models",
//!   ICLR 2024): a real image of the class, noised to the timestep of a strength drawn from a
//!   set ({0.25, 0.5, 0.75, 1.0} by default), denoised with classifier-free guidance toward the
//!   class's concept prompt — diffusers' img2img schedule (the last int(steps * strength) steps).
//! - **Diff-AUG** (the Diff-II paper's LoRA baseline): the same img2img on a model whose UNet
//!   carries a LoRA learned jointly with the concept tokens (`diffii concepts --lora-rank R`);
//!   a separate mode only so that its records, rows and settings name it and a model without a
//!   LoRA is refused.
//! - **Diff-Mix** (Wang et al., "Enhance Image Classification via Inter-Class Image Mixup with
//!   Diffusion Model", CVPR 2024): the same img2img, but from a real image of a source class
//!   drawn uniformly over all classes (so 1/C of the draws are the target class itself, as in
//!   the official `generate_translations.py`) toward the target class's concept, at strength s
//!   (default 0.7, the official scripts' fixed value). The image belongs to the target class's
//!   folder and carries a soft label: s^gamma for the target and 1 - s^gamma for the source
//!   (gamma 0.8, the official classification script's value).
//! - **Text-to-image** (Real-Guidance style, He et al., "Is synthetic data from generative
//!   models ready for image recognition?", ICLR 2023): pure noise denoised toward the concept
//!   prompt; no real image is used.
//!
//! Every draw (source image, strength, noise) comes from the sample's own seed, so outputs do
//! not depend on batch size, threads or shards.
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::data::dataset::Dataset;
use crate::data::image::{load_for_model, ResizePolicy};
use crate::data::pixels::{u8_to_tensor, Quantize};
use crate::error::{Error, Result};
use crate::rng::seeded_randn;
use crate::schedule::sampling::{ddim_sample_from, img2img_start};
use crate::synth::driver::{self, Method, RunOptions, Summary};
use crate::synth::guidance::guided_eps;
use crate::synth::invert::{check_prompt_template, concept_prompt};
use crate::synth::manifest::Record;
use crate::synth::pipeline::Pipeline;
use crate::synth::plan::{self, Count, Interp, Sample};

/// DA-Fusion's strengths.
pub const DEFAULT_STRENGTHS: [f64; 4] = [0.25, 0.5, 0.75, 1.0];
/// Diff-Mix's translation strength.
pub const DIFF_MIX_STRENGTHS: [f64; 1] = [0.7];
/// Diff-Mix's soft-label exponent.
pub const DIFF_MIX_GAMMA: f64 = 0.8;

/// Which baseline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// From a real image of the class (DA-Fusion).
    Img2Img,
    /// As [`Mode::Img2Img`], on a model with a LoRA learned with the concepts (Diff-AUG).
    DiffAug,
    /// From noise (Real-Guidance).
    Txt2Img,
    /// From a real image of a random class toward the sample's class, with a soft label.
    DiffMix,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Img2Img => "da-fusion",
            Mode::DiffAug => "diff-aug",
            Mode::Txt2Img => "txt2img",
            Mode::DiffMix => "diff-mix",
        }
    }

    /// Whether the sampling starts from a real image.
    fn from_image(self) -> bool {
        matches!(self, Mode::Img2Img | Mode::DiffAug | Mode::DiffMix)
    }
}

/// Every setting that affects the pixels (hashed into each record).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub mode: Mode,
    /// With `{concept}` and `{superclass}` placeholders.
    pub prompt_template: String,
    pub superclass: String,
    pub size: usize,
    pub resize: ResizePolicy,
    pub steps: usize,
    pub guidance: f64,
    /// Img2img and Diff-Mix: one is drawn per sample.
    pub strengths: Vec<f64>,
    /// Diff-Mix: the target class's share of the soft label is strength^gamma. Absent for the
    /// other modes (and left out of their settings hash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mix_gamma: Option<f64>,
    pub count: Count,
    pub seed: u64,
    pub quantize: Quantize,
    pub model_sha256: String,
    pub concepts_sha256: String,
    pub lora_sha256: Option<String>,
    pub precision: String,
}

impl Settings {
    /// The concept prompt of a class token.
    pub fn prompt(&self, token: &str) -> String {
        concept_prompt(&self.prompt_template, token, &self.superclass)
    }

    fn check(&self, p: &Pipeline) -> Result<()> {
        if self.size % p.sd.vae.config.spatial_factor() != 0 {
            return Err(Error::invalid(format!("image size {} is not a multiple of the VAE factor {}", self.size, p.sd.vae.config.spatial_factor())));
        }
        if self.steps == 0 || !self.guidance.is_finite() {
            return Err(Error::invalid("--steps must be at least 1 and --guidance finite"));
        }
        if self.mode.from_image() {
            if self.strengths.is_empty() {
                return Err(Error::invalid("--strengths needs at least one value"));
            }
            for &s in &self.strengths {
                img2img_start(&p.sched, self.steps, s)?;
            }
        }
        match (self.mode, self.mix_gamma) {
            (Mode::DiffMix, Some(g)) if g.is_finite() && g > 0.0 => {}
            (Mode::DiffMix, g) => return Err(Error::invalid(format!("--mix-gamma must be finite and > 0, got {g:?}"))),
            (_, Some(_)) => return Err(Error::invalid("--mix-gamma is a diff-mix setting")),
            (_, None) => {}
        }
        check_prompt_template(&self.prompt_template)
    }
}

/// A baseline over a dataset, ready for [`driver::run`].
pub struct Baseline<'a> {
    p: &'a Pipeline,
    ds: &'a Dataset,
    s: &'a Settings,
    tokens: Vec<String>,
    members: Vec<Vec<usize>>,
    samples: Vec<Sample>,
    uncond: Option<Tensor>,
}

impl<'a> Baseline<'a> {
    pub fn new(p: &'a Pipeline, ds: &'a Dataset, s: &'a Settings) -> Result<(Self, Summary)> {
        s.check(p)?;
        let tokens = p.class_tokens(ds)?;
        let members = ds.class_members();
        let counts: Vec<usize> = members.iter().map(|m| m.len()).collect();
        // `pair.0` is the source image; `draw` ~ U(0, 1) picks the strength.
        let samples = plan::plan(&ds.classes, &counts, s.count, Interp::Circle, 0, s.seed)?;
        Ok((Baseline { p, ds, s, tokens, members, samples, uncond: None }, Summary::default()))
    }

    fn strength(&self, x: &Sample) -> f64 {
        match self.s.mode {
            Mode::Img2Img | Mode::DiffAug | Mode::DiffMix => self.s.strengths[((x.draw * self.s.strengths.len() as f64) as usize).min(self.s.strengths.len() - 1)],
            Mode::Txt2Img => 1.0,
        }
    }

    /// The real image a sample starts from: its own class's (DA-Fusion) or, for Diff-Mix, one of
    /// a class drawn uniformly over all classes from the sample's seed. Returns (class, item).
    fn source(&self, x: &Sample) -> (usize, usize) {
        match self.s.mode {
            Mode::DiffMix => {
                let mut rng = crate::rng::derive_rng(&[b"diffii-mix-source\0", &x.seed.to_le_bytes()]);
                let c = rand::Rng::random_range(&mut rng, 0..self.members.len());
                (c, self.members[c][rand::Rng::random_range(&mut rng, 0..self.members[c].len())])
            }
            _ => (x.class, self.members[x.class][x.pair.0]),
        }
    }
}

impl Method for Baseline<'_> {
    type Settings = Settings;

    fn name(&self) -> &'static str {
        self.s.mode.name()
    }

    fn settings(&self) -> &Settings {
        self.s
    }

    fn samples(&self) -> &[Sample] {
        &self.samples
    }

    fn prepare(&mut self, _pending: &[&Sample], _opts: &RunOptions, _summary: &mut Summary) -> Result<()> {
        self.uncond = Some(self.p.sd.encode_prompt("")?);
        Ok(())
    }

    fn make(&mut self, batch: &[&Sample]) -> Result<(Tensor, Vec<Record>)> {
        let (p, s) = (self.p, self.s);
        let dev = p.sd.unet_device().clone();
        let dtype = p.sd.unet.dtype();
        let uncond = self.uncond.as_ref().ok_or_else(|| Error::invalid("baseline: make() before prepare()"))?;
        let f = p.sd.vae.config.spatial_factor();
        let shape = [1, p.sd.unet.config.in_channels, s.size / f, s.size / f];
        // Each sample's starting latent, text condition and first grid step; samples that start
        // at the same step are then denoised in one UNet batch (the kernels give every sample
        // the same bits whatever the batch, so outputs do not depend on how samples group).
        let mut starts = Vec::with_capacity(batch.len());
        let mut conds = Vec::with_capacity(batch.len());
        let mut records = Vec::with_capacity(batch.len());
        for x in batch {
            let prompt = s.prompt(&self.tokens[x.class]);
            conds.push(p.encode(std::slice::from_ref(&prompt))?);
            let strength = self.strength(x);
            let noise = seeded_randn(x.seed, &shape, &dev)?.to_dtype(dtype)?;
            let mut soft_label = Vec::new();
            let (start, z, sources, source_sha256) = match s.mode {
                Mode::Img2Img | Mode::DiffAug | Mode::DiffMix => {
                    let (source_class, i) = self.source(x);
                    let item = &self.ds.items[i];
                    if let (Mode::DiffMix, Some(gamma)) = (s.mode, s.mix_gamma) {
                        if source_class != x.class {
                            let w = strength.powf(gamma);
                            soft_label = vec![(self.ds.classes[x.class].clone(), w), (self.ds.classes[source_class].clone(), 1.0 - w)];
                        }
                    }
                    let (px, image_sha256) = load_for_model(&item.path, s.size, s.resize)?;
                    let z0 = p.sd.vae.encode_latent(&u8_to_tensor(&px, s.size, s.size, &dev)?.to_dtype(dtype)?)?;
                    let (start, t0) = img2img_start(&p.sched, s.steps, strength)?;
                    (start, p.sched.add_noise(&z0, &noise, t0)?, [item.rel.clone(), String::new()], [image_sha256, String::new()])
                }
                Mode::Txt2Img => (0, noise, [String::new(), String::new()], [String::new(), String::new()]),
            };
            starts.push((start, z));
            records.push(Record {
                sources,
                source_sha256,
                interp: s.mode.name().to_string(),
                t: strength,
                prompt,
                strength,
                steps: s.steps,
                guidance: s.guidance,
                size: s.size,
                model_sha256: p.model_sha256.clone(),
                concepts_sha256: p.concepts_sha256.clone(),
                lora_sha256: p.lora_sha256.clone(),
                soft_label,
                ..Record::default()
            });
        }
        let mut groups: std::collections::BTreeMap<usize, Vec<usize>> = std::collections::BTreeMap::new();
        for (j, (start, _)) in starts.iter().enumerate() {
            groups.entry(*start).or_default().push(j);
        }
        let mut outs: Vec<Option<Tensor>> = vec![None; batch.len()];
        for (start, members) in groups {
            let z = Tensor::cat(&members.iter().map(|&j| starts[j].1.clone()).collect::<Vec<_>>(), 0)?;
            let cond = Tensor::cat(&members.iter().map(|&j| conds[j].clone()).collect::<Vec<_>>(), 0)?;
            let eps = |z: &Tensor, _: usize, t: usize| guided_eps(&p.sd.unet, z, t, uncond, &cond, s.guidance);
            let z = ddim_sample_from(&p.sched, &z, s.steps, start, eps, |_| {})?;
            for (k, &j) in members.iter().enumerate() {
                outs[j] = Some(z.narrow(0, k, 1)?);
            }
        }
        let outs = outs.into_iter().map(|o| o.ok_or_else(|| Error::invalid("baseline: a sample was not denoised"))).collect::<Result<Vec<_>>>()?;
        let z = Tensor::cat(&outs, 0)?;
        Ok((p.sd.vae.decode_latent(&z)?, records))
    }

    fn quantize(&self) -> Quantize {
        self.s.quantize
    }

    fn source_geometry(&self) -> (usize, ResizePolicy) {
        (self.s.size, self.s.resize)
    }
}

/// Generates the baseline's samples of `opts.shard` that are not done yet.
pub fn generate(p: &Pipeline, ds: &Dataset, s: &Settings, opts: &RunOptions) -> Result<Summary> {
    let (mut m, notes) = Baseline::new(p, ds, s)?;
    driver::run(&mut m, ds, opts, notes)
}

impl Settings {
    /// The baseline's settings from the same request as Diff-II's (prompt, size, steps,
    /// guidance, count, seed, quantisation and their defaults), plus its own strengths
    /// (default [`DEFAULT_STRENGTHS`]). Diff-II's own fields (suffixes, two-stage strength,
    /// interpolation) must not be set: they would be silently unused.
    pub fn resolve(r: &crate::synth::diffii::SettingsRequest, mode: Mode, strengths: Option<Vec<f64>>, mix_gamma: Option<f64>, p: &Pipeline) -> Result<Self> {
        let unused = [
            ("--suffixes", r.suffixes.is_some()),
            ("--strength", r.strength.is_some()),
            ("--stage1-steps", r.stage1_steps.is_some()),
            ("--interp", r.interp.is_some()),
            ("--inversion-steps", r.inversion.steps.is_some()),
        ];
        if let Some((flag, _)) = unused.iter().find(|(_, set)| *set) {
            return Err(Error::invalid(format!("{flag} is a Diff-II setting; the {} baseline does not use it", mode.name())));
        }
        if mode == Mode::Txt2Img && strengths.is_some() {
            return Err(Error::invalid("--strengths is an img2img setting; txt2img starts from noise"));
        }
        if mode != Mode::DiffMix && mix_gamma.is_some() {
            return Err(Error::invalid(format!("--mix-gamma is a diff-mix setting; {} gives hard labels", mode.name())));
        }
        if let Some(g) = mix_gamma.filter(|g| !(g.is_finite() && *g > 0.0)) {
            return Err(Error::invalid(format!("--mix-gamma must be finite and > 0, got {g}")));
        }
        if mode == Mode::DiffAug && p.lora_sha256.is_none() {
            return Err(Error::invalid(
                "diff-aug samples from a model with a LoRA learned together with the concept tokens: pass the LoRA of a \
                 `diffii concepts --lora-rank R` run (and its concepts)",
            ));
        }
        let d = crate::synth::diffii::Settings::resolve(r, p)?;
        Ok(Settings {
            mode,
            prompt_template: d.prompt_template,
            superclass: d.superclass,
            size: d.size,
            resize: d.resize,
            steps: d.steps,
            guidance: d.guidance,
            strengths: match mode {
                Mode::Img2Img | Mode::DiffAug => strengths.unwrap_or_else(|| DEFAULT_STRENGTHS.to_vec()),
                Mode::DiffMix => strengths.unwrap_or_else(|| DIFF_MIX_STRENGTHS.to_vec()),
                Mode::Txt2Img => Vec::new(),
            },
            mix_gamma: (mode == Mode::DiffMix).then(|| mix_gamma.unwrap_or(DIFF_MIX_GAMMA)),
            count: d.count,
            seed: d.seed,
            quantize: d.quantize,
            model_sha256: d.model_sha256,
            concepts_sha256: d.concepts_sha256,
            lora_sha256: d.lora_sha256,
            precision: d.precision,
        })
    }
}
