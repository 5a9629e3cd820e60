//! The Diff-II method (Wang et al., "Inversion Circle Interpolation: Diffusion-based Image
//! Augmentation for Data-scarce Classification") as a [`Method`] of the synthesis driver:
//! invert every source image with its class's concept prompt, interpolate two inversions of the
//! same class on their great circle, and denoise in two stages — stage 1, the high-noise steps
//! with t >= 1000 (1 - strength), conditioned on the concept prompt plus a scene suffix; stage 2
//! on the plain concept prompt — with classifier-free guidance.
//!
//! [`Settings::resolve`] holds the defaults and the `official` preset; [`generate`] and
//! [`augment`] are the whole runs behind the commands of the same names.
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::data::dataset::Dataset;
use crate::data::image::ResizePolicy;
use crate::data::pixels::Quantize;
use crate::error::{Error, Result};
use crate::hash::{settings_sha256, sha256_file};
use crate::schedule::ddim::Ddim;
use crate::schedule::sampling::{ddim_sample, StepView};
use crate::sd::unet::UNet;
use crate::synth::driver::{self, Method, RunOptions, Summary};
use crate::synth::guidance::guided_eps;
use crate::synth::interpolate::{circle_alpha, cosine, slerp, DEFAULT_DOT_THRESHOLD};
use crate::synth::invert::{concept_prompt, invert_items, shard_items, Inversion, InversionRequest};
use crate::synth::manifest::Record;
use crate::synth::pipeline::Pipeline;
use crate::synth::plan::{self, Count, Interp, Sample};

/// Scene phrases used for stage 1 when no `--suffixes` file is given. The official release
/// had an LLM write ~10 per dataset from image captions; these are generic, class-agnostic
/// contexts in the same style, so any dataset gets diverse backgrounds without an LLM.
pub const BUILTIN_SUFFIXES: [&str; 10] = [
    "in its natural habitat",
    "outdoors on a sunny day",
    "in soft morning light",
    "at dusk with warm light",
    "in the rain",
    "in the snow",
    "against a plain background",
    "surrounded by green foliage",
    "in a close-up shot",
    "seen from a distance",
];

/// Every setting that affects the generated pixels. Its hash is stored in each record, so a
/// resumed run only reuses images made with identical settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Settings {
    /// With `{concept}` and `{superclass}` placeholders.
    pub prompt_template: String,
    pub superclass: String,
    pub suffixes: Vec<String>,
    pub size: usize,
    pub resize: ResizePolicy,
    pub inversion_steps: usize,
    pub steps: usize,
    pub guidance: f64,
    /// Stage 1 = steps with t >= 1000 (1 - strength), unless `stage1_steps` is set.
    pub strength: f64,
    pub stage1_steps: Option<usize>,
    pub interp: Interp,
    pub count: Count,
    pub seed: u64,
    pub quantize: Quantize,
    pub model_sha256: String,
    pub concepts_sha256: String,
    pub lora_sha256: Option<String>,
    /// Product precision of the model's layers: "f32", "bf16" or "bf16-amx" (see [`crate::nn::Precision`]).
    #[serde(default = "default_precision")]
    pub precision: String,
}

fn default_precision() -> String {
    "f32".into()
}

/// Settings as a user gives them: `None` takes the default, or the official preset's value
/// when `inversion.official` is set.
#[derive(Clone, Debug, Default)]
pub struct SettingsRequest {
    pub inversion: InversionRequest,
    /// Scene suffixes; `None` means [`BUILTIN_SUFFIXES`], an empty list no suffix at all.
    pub suffixes: Option<Vec<String>>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub strength: Option<f64>,
    pub stage1_steps: Option<usize>,
    pub interp: Option<Interp>,
    pub count: Option<Count>,
    pub seed: u64,
    pub quantize: Option<Quantize>,
}

impl SettingsRequest {
    /// The request with Diff-II's own fields (inversion steps, suffixes, two-stage strength,
    /// stage-1 steps, interpolation) cleared: what a baseline takes from flags shared by every
    /// method of a comparison.
    pub fn shared(&self) -> SettingsRequest {
        SettingsRequest {
            inversion: InversionRequest { steps: None, ..self.inversion.clone() },
            suffixes: None,
            strength: None,
            stage1_steps: None,
            interp: None,
            ..self.clone()
        }
    }
}

/// Defaults, which are also the released Diff-II settings.
pub const DEFAULT_STEPS: usize = 25;
pub const DEFAULT_GUIDANCE: f64 = 7.5;
pub const DEFAULT_STRENGTH: f64 = 0.3;
pub const DEFAULT_EXPANSION: usize = 5;

impl Settings {
    /// Resolves a request against the model: explicit value > official preset > default. The
    /// official preset is the released code's: 512 px and truncated 8-bit output; its other
    /// values (200 inversion steps, 25 steps, CFG 7.5, strength 0.3, circle, expansion 5) are
    /// the defaults.
    pub fn resolve(r: &SettingsRequest, p: &Pipeline) -> Result<Self> {
        let inv = Inversion::resolve(&r.inversion, p)?;
        let official = r.inversion.official;
        let strength = r.strength.unwrap_or(DEFAULT_STRENGTH);
        if !(0.0..=1.0).contains(&strength) {
            return Err(Error::invalid(format!("--strength {strength} must lie in [0, 1]")));
        }
        let guidance = r.guidance.unwrap_or(DEFAULT_GUIDANCE);
        if !guidance.is_finite() {
            return Err(Error::invalid(format!("--guidance {guidance} must be a finite number (7.5 is SD's usual scale)")));
        }
        let steps = r.steps.unwrap_or(DEFAULT_STEPS);
        if steps == 0 {
            return Err(Error::invalid("--steps must be at least 1"));
        }
        if let Some(Interp::Slerp { t_min, t_max }) = r.interp {
            if !(t_min.is_finite() && t_max.is_finite() && t_min <= t_max) {
                return Err(Error::invalid(format!("--t-min {t_min} / --t-max {t_max}: need finite values with t-min <= t-max")));
            }
        }
        if matches!(r.count, Some(Count::Expansion(0)) | Some(Count::PerClass(0))) {
            return Err(Error::invalid("--expansion / --per-class must be at least 1"));
        }
        Ok(Settings {
            prompt_template: inv.prompt_template,
            superclass: inv.superclass,
            suffixes: r.suffixes.clone().unwrap_or_else(|| BUILTIN_SUFFIXES.iter().map(|s| s.to_string()).collect()),
            size: inv.size,
            resize: inv.resize,
            inversion_steps: inv.steps,
            steps,
            guidance,
            strength,
            stage1_steps: r.stage1_steps,
            interp: r.interp.unwrap_or(Interp::Circle),
            count: r.count.unwrap_or(Count::Expansion(DEFAULT_EXPANSION)),
            seed: r.seed,
            quantize: r.quantize.unwrap_or(if official { Quantize::Truncate } else { Quantize::Round }),
            model_sha256: p.model_sha256.clone(),
            concepts_sha256: p.concepts_sha256.clone(),
            lora_sha256: p.lora_sha256.clone(),
            precision: inv.precision,
        })
    }

    /// The hash every record of the run carries.
    pub fn run_sha256(&self) -> String {
        settings_sha256(self)
    }

    /// The settings that decide the inversions.
    pub fn inversion(&self) -> Inversion {
        Inversion {
            prompt_template: self.prompt_template.clone(),
            superclass: self.superclass.clone(),
            size: self.size,
            resize: self.resize,
            steps: self.inversion_steps,
            precision: self.precision.clone(),
        }
    }

    /// The concept prompt of a class token.
    pub fn prompt(&self, token: &str) -> String {
        concept_prompt(&self.prompt_template, token, &self.superclass)
    }

    /// Stage-1 prompt: concept prompt + scene suffix.
    pub fn stage1_prompt(&self, token: &str, suffix: &str) -> String {
        if suffix.is_empty() {
            self.prompt(token)
        } else {
            format!("{} {}", self.prompt(token), suffix.trim())
        }
    }
}

/// Reads a suffix file: one scene phrase per line; blank lines and `#` comments are skipped.
pub fn read_suffixes(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    Ok(text.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty() && !l.starts_with('#')).collect())
}

/// Number of leading steps of a descending grid that belong to stage 1 for Diff-II's
/// `strength`: those with t >= num_train_timesteps * (1 - strength) (the official code switches
/// to the concept prompt when `t < 1000 * (1 - strength)`).
pub fn stage1_steps_for_strength(timesteps: &[usize], num_train_timesteps: usize, strength: f64) -> usize {
    let thr = num_train_timesteps as f64 * (1.0 - strength);
    timesteps.iter().take_while(|&&t| !((t as f64) < thr)).count()
}

/// Number of stage-1 steps for the settings.
pub fn stage1_steps(sched: &Ddim, s: &Settings) -> Result<usize> {
    let grid = sched.set_timesteps(s.steps)?;
    Ok(match s.stage1_steps {
        Some(k) if k > s.steps => return Err(Error::invalid(format!("--stage1-steps {k} exceeds --steps {}", s.steps))),
        Some(k) => k,
        None => stage1_steps_for_strength(&grid.timesteps, sched.num_train_timesteps(), s.strength),
    })
}

/// Text conditions for two-stage guided sampling. All are [1 or b, tokens, dim].
pub struct TwoStage<'a> {
    pub uncond: &'a Tensor,
    /// Concept prompt + suffix (stage 1).
    pub stage1: &'a Tensor,
    /// Concept prompt (stage 2).
    pub stage2: &'a Tensor,
    /// How many leading steps use `stage1`.
    pub stage1_steps: usize,
    pub guidance: f64,
}

impl TwoStage<'_> {
    /// The condition of step `index`.
    pub fn at(&self, index: usize) -> &Tensor {
        if index < self.stage1_steps {
            self.stage1
        } else {
            self.stage2
        }
    }
}

/// Samples from `x_t` [b, c, h, w] down the `steps`-step DDIM grid (eta 0), with the condition
/// of each step chosen by `cond`.
pub fn sample_two_stage(
    unet: &UNet,
    sched: &Ddim,
    x_t: &Tensor,
    cond: &TwoStage<'_>,
    steps: usize,
    observe: impl FnMut(StepView<'_>),
) -> Result<Tensor> {
    ddim_sample(sched, x_t, steps, |x, index, t| guided_eps(unet, x, t, cond.uncond, cond.at(index), cond.guidance), observe)
}

/// Diff-II over a dataset, ready for [`driver::run`].
pub struct DiffIi<'a> {
    p: &'a Pipeline,
    ds: &'a Dataset,
    s: &'a Settings,
    tokens: Vec<String>,
    /// Dataset item indices of each class's images.
    members: Vec<Vec<usize>>,
    samples: Vec<Sample>,
    stage1_steps: usize,
    latents: HashMap<usize, Tensor>,
    uncond: Option<Tensor>,
}

impl<'a> DiffIi<'a> {
    /// Checks the settings against the model and dataset and plans the run; the summary holds
    /// notes for the user (classes with one image, no suffixes).
    pub fn new(p: &'a Pipeline, ds: &'a Dataset, s: &'a Settings) -> Result<(Self, Summary)> {
        let mut summary = Summary::default();
        if s.size % p.sd.vae.config.spatial_factor() != 0 {
            return Err(Error::invalid(format!(
                "image size {} is not a multiple of the VAE factor {}",
                s.size,
                p.sd.vae.config.spatial_factor()
            )));
        }
        let tokens = p.class_tokens(ds)?;
        // Every prompt of the run, checked before any inversion or image is made.
        for t in &tokens {
            p.sd.tokenizer.check_fits(&s.prompt(t))?;
            for suffix in &s.suffixes {
                p.sd.tokenizer.check_fits(&s.stage1_prompt(t, suffix))?;
            }
        }
        let members = ds.class_members();
        let counts: Vec<usize> = members.iter().map(|m| m.len()).collect();
        let samples = plan::plan(&ds.classes, &counts, s.count, s.interp, s.suffixes.len(), s.seed)?;
        for (c, n) in counts.iter().enumerate() {
            if *n == 1 {
                summary.notes.push(format!(
                    "class `{}` has one image: its samples re-generate that image's own inversion with the two-stage prompts (no pair to interpolate)",
                    ds.classes[c]
                ));
            }
        }
        if s.suffixes.is_empty() {
            summary.notes.push("no scene suffixes: stage 1 uses the plain concept prompt".into());
        }
        let stage1_steps = stage1_steps(&p.sched, s)?;
        let m = DiffIi { p, ds, s, tokens, members, samples, stage1_steps, latents: HashMap::new(), uncond: None };
        Ok((m, summary))
    }

    fn sources(&self, x: &Sample) -> (usize, usize) {
        (self.members[x.class][x.pair.0], self.members[x.class][x.pair.1])
    }
}

impl Method for DiffIi<'_> {
    type Settings = Settings;

    fn name(&self) -> &'static str {
        "diffii"
    }

    fn settings(&self) -> &Settings {
        self.s
    }

    fn samples(&self) -> &[Sample] {
        &self.samples
    }

    fn prepare(&mut self, pending: &[&Sample], opts: &RunOptions, summary: &mut Summary) -> Result<()> {
        let wanted: BTreeSet<usize> = pending.iter().flat_map(|x| <[usize; 2]>::from(self.sources(x))).collect();
        self.latents = invert_items(self.p, self.ds, &self.s.inversion(), opts, &wanted, summary)?;
        self.uncond = Some(self.p.sd.encode_prompt("")?);
        Ok(())
    }

    fn make(&mut self, batch: &[&Sample]) -> Result<(Tensor, Vec<Record>)> {
        let s = self.s;
        let mut zs = Vec::new();
        let mut records = Vec::new();
        let (mut p1, mut p2) = (Vec::new(), Vec::new());
        for x in batch {
            let (ia, ib) = self.sources(x);
            let (a, b) = (&self.latents[&ia], &self.latents[&ib]);
            let (z, info, t, frac, alpha, mode) = if x.single_image() {
                (a.clone(), None, 0.0, None, None, "single-image")
            } else {
                match s.interp {
                    Interp::Slerp { .. } => {
                        let (z, info) = slerp(a, b, x.draw, DEFAULT_DOT_THRESHOLD)?;
                        (z, Some(info), x.draw, None, None, "slerp")
                    }
                    Interp::Circle => {
                        let theta = cosine(a, b)?.clamp(-1.0, 1.0).acos();
                        let alpha = circle_alpha(theta.max(1e-12), x.draw);
                        let (z, info) = slerp(a, b, -alpha, DEFAULT_DOT_THRESHOLD)?;
                        (z, Some(info), -alpha, Some(x.draw), Some(alpha), "circle")
                    }
                }
            };
            let token = &self.tokens[x.class];
            let suffix = if s.suffixes.is_empty() { String::new() } else { s.suffixes[x.suffix].clone() };
            p1.push(s.stage1_prompt(token, &suffix));
            p2.push(s.prompt(token));
            zs.push(z);
            let (ra, rb) = (&self.ds.items[ia], &self.ds.items[ib]);
            records.push(Record {
                sources: [ra.rel.clone(), rb.rel.clone()],
                source_sha256: [sha256_file(&ra.path)?, sha256_file(&rb.path)?],
                interp: mode.to_string(),
                t,
                frac,
                alpha,
                theta: info.map(|i| i.theta).unwrap_or(0.0),
                cos: info.map(|i| i.cos).unwrap_or(1.0),
                lerp: info.map(|i| i.lerp).unwrap_or(false),
                prompt: p2.last().cloned().unwrap_or_default(),
                stage1_prompt: p1.last().cloned().unwrap_or_default(),
                suffix,
                strength: s.strength,
                stage1_steps: self.stage1_steps,
                steps: s.steps,
                inversion_steps: s.inversion_steps,
                guidance: s.guidance,
                size: s.size,
                model_sha256: self.p.model_sha256.clone(),
                concepts_sha256: self.p.concepts_sha256.clone(),
                lora_sha256: self.p.lora_sha256.clone(),
                ..Record::default()
            });
        }
        let z = Tensor::cat(&zs, 0)?;
        let (e1, e2) = (self.p.encode(&p1)?, self.p.encode(&p2)?);
        let uncond = self.uncond.as_ref().ok_or_else(|| Error::invalid("diffii: make() before prepare()"))?;
        let cond = TwoStage { uncond, stage1: &e1, stage2: &e2, stage1_steps: self.stage1_steps, guidance: s.guidance };
        let mut bad = None;
        let out = sample_two_stage(&self.p.sd.unet, &self.p.sched, &z, &cond, s.steps, |v| {
            if bad.is_none() && crate::error::ensure_finite(v.latent, String::new).is_err() {
                bad = Some((v.index, v.t));
            }
        })?;
        if let Some((index, t)) = bad {
            let ids: Vec<String> = batch.iter().map(|x| x.id(&self.ds.classes[x.class])).collect();
            return Err(Error::invalid(format!(
                "diffii: sampling step {} of {} (t = {t}) gave NaN or infinite latents for sample(s) {}",
                index + 1,
                s.steps,
                ids.join(", ")
            )));
        }
        Ok((self.p.sd.vae.decode_latent(&out)?, records))
    }

    fn quantize(&self) -> Quantize {
        self.s.quantize
    }

    fn source_geometry(&self) -> (usize, ResizePolicy) {
        (self.s.size, self.s.resize)
    }
}

/// `diffii generate`: makes the samples of `opts.shard` that are not done yet, inverting the
/// sources the cache lacks.
pub fn generate(p: &Pipeline, ds: &Dataset, s: &Settings, opts: &RunOptions) -> Result<Summary> {
    let (mut m, notes) = DiffIi::new(p, ds, s)?;
    driver::run(&mut m, ds, opts, notes)
}

/// `diffii augment`: inverts this shard's share of ALL images first (so a later `generate` with
/// other sampling settings finds every inversion cached), then generates.
pub fn augment(p: &Pipeline, ds: &Dataset, s: &Settings, opts: &RunOptions) -> Result<Summary> {
    // Held across both steps, so that no other process writes the folder in between.
    let _lock = crate::data::lock::lock_output(&opts.out, driver::lock_scope(opts.shard))?;
    let mut first = Summary::default();
    invert_items(p, ds, &s.inversion(), opts, &shard_items(ds, opts.shard), &mut first)?;
    let mut summary = generate(p, ds, s, opts)?;
    summary.inverted += first.inverted;
    summary.inversion_cache_hits = first.inversion_cache_hits;
    summary.inversion_cache_stale += first.inversion_cache_stale;
    summary.seconds_inversion += first.seconds_inversion;
    summary.notes.splice(0..0, first.notes);
    Ok(summary)
}
