//! Stage-by-stage timings of the demo world (`diffii bench --demo`): on the shipped mini SD and
//! Fashion-MNIST subset, one pretraining step of each phase at its training batch, one
//! concept-learning step, DDIM inversion and Diff-II generation per image, and one classifier
//! training step — each through the code the commands themselves run (`pretrain`, `concepts`,
//! `generate`, `train`) with the demo's settings, so the numbers are what a user waits for.
//! `scripts/reference/bench_demo.py` does the same work in PyTorch / diffusers.
use std::path::{Path, PathBuf};

use crate::data::bundle;
use crate::data::dataset::Dataset;
use crate::error::{Error, Result};
use crate::experiment::demo::{concept_request, generation_request, subset};
use crate::measure::bench::BenchResult;
use crate::synth::diffii::Settings;
use crate::synth::driver::RunOptions;
use crate::synth::pipeline::{Pipeline, PipelineSpec};
use crate::synth::plan::Shard;
use crate::train::concepts::{load_model, TrainOptions, TrainSettings, Trainer, EMBEDS_FILE};
use crate::train::pretrain::{self, Cadence, PretrainSettings};

/// What to time and where.
pub struct DemoBench<'a> {
    /// The mini SD (diffusers layout) whose concepts, inversion and generation are timed.
    pub model: &'a Path,
    /// The shipped subset (`data/fashion-mnist/subset.safetensors`).
    pub data: &'a Path,
    /// A scratch folder (emptied first).
    pub work: &'a Path,
    pub warmup: usize,
    pub reps: usize,
    /// DDIM steps, guidance, strength and generation batch of the demo.
    pub steps: usize,
    pub guidance: f64,
    pub strength: f64,
    pub gen_batch: usize,
}

/// Images per class the concept, inversion and generation stages use (the demo's 5 shots).
const SHOTS: usize = 5;
/// Images the pretraining steps draw their batches from.
const PRETRAIN_IMAGES: usize = 256;

/// Runs every stage; results are named `demo: <stage>`, per step or per image (inversion: the
/// demo's DDIM steps without guidance; Diff-II: its steps with classifier-free guidance,
/// `gen_batch` samples per UNet call, decoding included).
pub fn run(b: &DemoBench<'_>) -> Result<Vec<BenchResult>> {
    if b.work.exists() {
        std::fs::remove_dir_all(b.work).map_err(|e| Error::io(b.work, e))?;
    }
    let m = bundle::materialize(&bundle::load(b.data)?, &b.work.join("data"))?;
    let (pool, _) = m.open()?;
    let members = pool.class_members();
    let shots: Vec<usize> = members.iter().flat_map(|c| c.iter().take(SHOTS).copied()).collect();
    let shots_ds = subset(&pool, &shots);
    let mut out = pretrain_steps(b, &subset(&pool, &(0..PRETRAIN_IMAGES.min(pool.items.len())).collect::<Vec<_>>()))?;
    let (concept, concepts_file) = concept_step(b, &shots_ds)?;
    out.push(concept);
    out.extend(generation(b, &shots_ds, &concepts_file)?);
    let classifier = crate::classify::resnet::ResNetConfig::small(pool.classes.len(), 1);
    out.extend(crate::measure::bench::resnet_steps("demo: classifier", &classifier, 64, 32, b.warmup, b.reps)?);
    Ok(out)
}

/// A result measured outside `bench::timed`: median and minimum of `times`.
fn result(name: &str, batch: usize, latent: usize, mut times: Vec<f64>) -> Result<BenchResult> {
    if times.is_empty() {
        return Err(Error::invalid(format!("{name}: nothing was timed")));
    }
    times.sort_by(f64::total_cmp);
    Ok(BenchResult::new(name, batch, latent, crate::measure::bench::median(&times), times[0], 0.0))
}

/// `pretrain` with the demo recipe for warmup + reps steps of each phase; the per-step seconds
/// come from its loss logs.
fn pretrain_steps(b: &DemoBench<'_>, ds: &Dataset) -> Result<Vec<BenchResult>> {
    let n = b.warmup + b.reps.max(1);
    let mut s = PretrainSettings::demo();
    s.vae.steps = n;
    s.vae.warmup = 1;
    s.unet.steps = n;
    s.unet.warmup = 1;
    let cadence = Cadence { checkpoint_every: usize::MAX, sample_every: usize::MAX, progress: false, ..Cadence::default() };
    let dir = b.work.join("pretrain");
    pretrain::run(ds, &s, &cadence, &dir)?;
    let side = s.arch.image_size;
    Ok(vec![
        result("demo: pretrain VAE step", s.vae.batch, side, step_seconds(&dir.join("loss-vae.csv"), b.warmup)?)?,
        result("demo: pretrain UNet + text step", s.unet.batch, side / 4, step_seconds(&dir.join("loss-unet.csv"), b.warmup)?)?,
    ])
}

/// The `seconds` column of a pretraining loss log, without its first `skip` rows.
fn step_seconds(log: &Path, skip: usize) -> Result<Vec<f64>> {
    let text = std::fs::read_to_string(log).map_err(|e| Error::io(log, e))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let col = header.iter().position(|h| *h == "seconds").ok_or_else(|| Error::bad_file(log, "has no `seconds` column"))?;
    lines
        .skip(skip)
        .map(|l| l.split(',').nth(col).and_then(|v| v.parse::<f64>().ok()).ok_or_else(|| Error::bad_file(log, format!("bad row `{l}`"))))
        .collect()
}

/// Concept learning as the demo runs it (per class, batch 5) for warmup + reps steps per class;
/// returns the mean seconds per step over the run and the learned tokens, which the generation
/// stages use.
fn concept_step(b: &DemoBench<'_>, shots: &Dataset) -> Result<(BenchResult, PathBuf)> {
    let dir = b.work.join("concepts");
    let mut sd = load_model(b.model, "cpu")?;
    let settings = TrainSettings::resolve(&concept_request(b.warmup + b.reps.max(1), 0.03), &sd, shots)?;
    let batch = settings.batch;
    let summary = Trainer::new(&mut sd, shots, settings, false)?.run(&TrainOptions { out: dir.clone(), resume: false, progress: false, stop_after: None })?;
    let r = result("demo: concept step", batch, 0, vec![summary.seconds_per_step])?;
    Ok((r, dir.join(EMBEDS_FILE)))
}

/// Diff-II with the demo's settings on the shots (one synthetic image per real one): DDIM
/// inversion and generation seconds per image, batched as the demo batches them.
fn generation(b: &DemoBench<'_>, shots: &Dataset, concepts: &Path) -> Result<Vec<BenchResult>> {
    let p = Pipeline::load(&PipelineSpec {
        model: b.model.to_path_buf(),
        concepts: vec![concepts.to_path_buf()],
        class_map: None,
        lora: None,
        lora_scale: 1.0,
        device: "cpu".into(),
        precision: Default::default(),
    })?;
    let s = Settings::resolve(&generation_request(b.steps, b.guidance, b.strength, 1), &p)?;
    let (mut inv, mut gen) = (Vec::new(), Vec::new());
    for i in 0..b.warmup + b.reps.max(1) {
        let out = b.work.join(format!("generate-{i}"));
        let sum = crate::synth::diffii::generate(&p, shots, &s, &RunOptions::new(out, None, b.gen_batch, Shard::ALL, false))?;
        if i >= b.warmup {
            inv.push(sum.seconds_inversion / sum.inverted.max(1) as f64);
            gen.push(sum.seconds_generation / sum.written.max(1) as f64);
        }
    }
    let latent = p.native_size() / 4;
    Ok(vec![
        result("demo: inversion per image", b.gen_batch, latent, inv)?,
        result("demo: Diff-II per image", b.gen_batch, latent, gen)?,
    ])
}

/// PyTorch timings from `scripts/reference/bench_demo.py --json`: (case name, median seconds,
/// median seconds per image where the case has one).
pub fn read_torch_json(path: &Path) -> Result<Vec<(String, f64, Option<f64>)>> {
    let v: serde_json::Value = crate::error::read_json(path)?;
    let cases = v.get("cases").and_then(|c| c.as_array()).ok_or_else(|| Error::bad_file(path, "has no `cases` list"))?;
    let mut out = Vec::new();
    for c in cases.iter().filter_map(|c| c.as_str()) {
        let d = v.get(c).ok_or_else(|| Error::bad_file(path, format!("lists case `{c}` without its results")))?;
        let median = d.get("median_s").and_then(|s| s.as_f64()).ok_or_else(|| Error::bad_file(path, format!("case `{c}` has no median_s")))?;
        out.push((c.to_string(), median, d.get("median_s_per_image").and_then(|s| s.as_f64())));
    }
    Ok(out)
}

/// The PyTorch figure for our result `name`: the same stage, per step or per image as ours.
pub fn torch_seconds(torch: &[(String, f64, Option<f64>)], name: &str) -> Option<f64> {
    let (case, per_image) = match name {
        "demo: pretrain VAE step" => ("vae train step", false),
        "demo: pretrain UNet + text step" => ("unet train step", false),
        "demo: concept step" => ("concept step", false),
        "demo: inversion per image" => ("ddim inversion", true),
        "demo: Diff-II per image" => ("diffii generation", true),
        _ => return None,
    };
    let (_, median, per) = torch.iter().find(|(c, ..)| c == case)?;
    if per_image {
        *per
    } else {
        Some(*median)
    }
}
