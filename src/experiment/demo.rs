//! `diffii demo`: the whole method on real images, from the data and model shipped in the
//! repository, with one command.
//!
//! For each protocol seed: the seed's split of the shipped pool is drawn (few-shot or long
//! tail), one concept token per class is learned from that seed's training images only, and a
//! comparison ([`crate::experiment::compare`]) runs every method with the concepts of that seed
//! — so no generator ever sees an image outside the seed's training split. The per-seed
//! comparisons are then merged into one table, and a self-contained HTML report is written with
//! the accuracy chart, the table, image grids per method beside the real shots, and the time
//! spent in each stage.
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::classify::groups::Groups;
use crate::classify::protocol::split;
use crate::classify::train::ClassifierSettings;
use crate::data::atomic::{write_atomic, write_json_atomic};
use crate::data::dataset::Dataset;
use crate::data::image::{load_rgb8, prepare, ResizePolicy};
use crate::error::{read_json, Error, Result};
use crate::experiment::compare::{self, CompareResults, Generators, MethodSpec, Plan};
use crate::experiment::report::{self, Grid, ReportInput, Stage};
use crate::synth::diffii::SettingsRequest;
use crate::synth::invert::InversionRequest;
use crate::synth::pipeline::{Pipeline, PipelineSpec};
use crate::synth::plan::{Count, Shard};
use crate::train::concepts::{load_model, TrainMode, TrainOptions, TrainRequest, TrainSettings, Trainer, EMBEDS_FILE, LORA_FILE};

/// What the demo runs.
pub struct Demo<'a> {
    pub model: &'a Path,
    /// The real images: the pool the protocol draws training and validation images from.
    pub pool: &'a Dataset,
    pub test: &'a Dataset,
    /// The group of every test image (group-shift protocol).
    pub test_groups: Option<&'a Groups>,
    /// Shown in the report before the method grids (e.g. the test set's groups).
    pub extra_grids: Vec<Grid>,
    pub seeds: &'a [u64],
    pub classifier: &'a ClassifierSettings,
    /// Concept learning (its seed is replaced by each protocol seed); `None` when no method
    /// generates with the model and the plain concept tokens.
    pub concepts: Option<&'a TrainRequest>,
    /// Concept learning with a LoRA, for Diff-AUG (its seed is replaced likewise; it starts from
    /// the seed's plain tokens when those are learned).
    pub lora_concepts: Option<&'a TrainRequest>,
    /// The methods, resolved against a seed's models (model + that seed's concepts, and with
    /// `lora_concepts` model + that seed's LoRA concepts).
    pub methods: &'a dyn Fn(Generators<'_>) -> Result<Vec<MethodSpec>>,
    pub gen_batch: usize,
    /// See [`Plan::filter_min`].
    pub filter_min: Option<f64>,
    pub progress: bool,
    /// Shown at the top of the report.
    pub title: &'a str,
    pub intro: &'a str,
}

/// The concept prompt of the demo world: its captions begin with `an item`.
pub const TEMPLATE: &str = "an item {concept}";

/// Diff-II's stage-1 suffixes in this world: the attribute words the captions used.
pub const SUFFIXES: [&str; 8] = ["dark", "light", "small", "large", "narrow", "wide", "plain", "patterned"];

/// The demo's concept learning: one token per class, each from its class's images
/// (`steps` per class, batch 5, learning rate `lr`), initialised from `item`.
pub fn concept_request(steps: usize, lr: f64) -> TrainRequest {
    TrainRequest {
        official: false,
        class_map: None,
        superclass: String::new(),
        init_word: Some("item".into()),
        init_embeds: None,
        templates: vec![TEMPLATE.to_string()],
        mode: Some(TrainMode::PerClass),
        steps: Some(steps),
        batch: Some(5),
        grad_accum: 1,
        lr: Some(lr),
        weight_decay: 0.0,
        lora_rank: None,
        lora_alpha: None,
        lora_lr: None,
        resolution: None,
        resize: ResizePolicy::Squash,
        flip: false,
        random_crop: false,
        seed: 0,
        checkpoint_every: 100,
    }
}

/// The demo's generation settings: `steps` DDIM steps for inversion and sampling, guidance,
/// Diff-II's strength, the attribute words as stage-1 suffixes, `expansion` images per real one.
pub fn generation_request(steps: usize, guidance: f64, strength: f64, expansion: usize) -> SettingsRequest {
    SettingsRequest {
        inversion: InversionRequest {
            official: false,
            prompt_template: Some(TEMPLATE.to_string()),
            superclass: Some(String::new()),
            size: None,
            resize: None,
            steps: Some(steps),
        },
        suffixes: Some(SUFFIXES.iter().map(|s| s.to_string()).collect()),
        steps: Some(steps),
        guidance: Some(guidance),
        strength: Some(strength),
        stage1_steps: None,
        interp: None,
        count: Some(Count::Expansion(expansion)),
        seed: 0,
        quantize: None,
    }
}

/// Time spent in one stage of one seed (kept on disk, so a resumed demo reports the original).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct SeedTimes {
    concepts: f64,
    #[serde(default)]
    lora_concepts: f64,
}

/// Runs (or resumes) the demo into `out`: `seed-<s>/` per seed, then `results.json`,
/// `results.md` and `report.html`.
pub fn run(d: &Demo<'_>, out: &Path) -> Result<CompareResults> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut per_seed = Vec::new();
    let mut stages = Vec::new();
    for &seed in d.seeds {
        let dir = out.join(format!("seed-{seed}"));
        let concepts_dir = dir.join("concepts");
        let times_path = dir.join("times.json");
        let mut times: SeedTimes = read_json(&times_path).unwrap_or_default();
        let load = |concepts: PathBuf, lora: Option<PathBuf>| {
            Pipeline::load(&PipelineSpec { model: d.model.to_path_buf(), concepts: vec![concepts], class_map: None, lora, lora_scale: 1.0, device: "cpu".into(), precision: Default::default() })
        };
        let p = match d.concepts {
            None => None,
            Some(request) => {
                if learn_once(d, request, seed, &concepts_dir, EMBEDS_FILE, "one concept token per class", &mut times.concepts)? {
                    write_json_atomic(&times_path, &times)?;
                }
                stages.push(Stage { name: format!("seed {seed}: concept learning"), seconds: times.concepts });
                Some(load(concepts_dir.join(EMBEDS_FILE), None)?)
            }
        };
        let p_lora = match d.lora_concepts {
            None => None,
            Some(request) => {
                let init_embeds = d.concepts.map(|_| concepts_dir.join(EMBEDS_FILE));
                let request = TrainRequest { init_embeds, ..request.clone() };
                let dir = dir.join("concepts-lora");
                if learn_once(d, &request, seed, &dir, LORA_FILE, "concept tokens with a LoRA (Diff-AUG)", &mut times.lora_concepts)? {
                    write_json_atomic(&times_path, &times)?;
                }
                stages.push(Stage { name: format!("seed {seed}: concept + LoRA learning (diff-aug)"), seconds: times.lora_concepts });
                Some(load(dir.join(EMBEDS_FILE), Some(dir.join(LORA_FILE)))?)
            }
        };
        let g = Generators { plain: p.as_ref(), lora: p_lora.as_ref() };
        let methods = (d.methods)(g)?;
        let plan = Plan { methods: &methods, seeds: &[seed], classifier: d.classifier, gen_batch: d.gen_batch, filter_min: d.filter_min, test_groups: d.test_groups, shard: Shard::ALL, device: &candle_core::Device::Cpu, progress: d.progress };
        if d.progress {
            eprintln!("[demo] seed {seed}: generating and training classifiers");
        }
        let r = compare::run(g, d.pool, d.test, &plan, &dir)?;
        for m in &r.methods {
            if m.seconds_generation > 0.0 {
                stages.push(Stage { name: format!("seed {seed}: {} generation", m.method), seconds: m.seconds_generation });
            }
        }
        let training: f64 = r.methods.iter().map(|m| m.seconds_training).sum();
        stages.push(Stage { name: format!("seed {seed}: classifier training ({} runs)", r.methods.len()), seconds: training });
        per_seed.push(r);
    }
    let results = compare::merge(&per_seed)?;
    write_json_atomic(out.join("results.json"), &results)?;
    write_atomic(out.join("results.md"), compare::markdown(&results).as_bytes())?;
    let mut grids = d.extra_grids.clone();
    grids.extend(grids_of_methods(d, out)?);
    let chance = 1.0 / d.pool.classes.len() as f64;
    report::write(
        &out.join("report.html"),
        &ReportInput { title: d.title, intro: d.intro, results: &results, grids: &grids, stages: &stages, chance: Some(chance) },
    )?;
    Ok(results)
}

/// Learns a seed's concepts into `dir` unless its file `done` is already there, timing the run
/// into `seconds`; returns whether it ran.
fn learn_once(d: &Demo<'_>, request: &TrainRequest, seed: u64, dir: &Path, done: &str, what: &str, seconds: &mut f64) -> Result<bool> {
    if dir.join(done).is_file() {
        return Ok(false);
    }
    if d.progress {
        eprintln!("[demo] seed {seed}: learning {what}");
    }
    let t0 = Instant::now();
    learn_concepts(d, request, seed, dir)?;
    *seconds = t0.elapsed().as_secs_f64();
    Ok(true)
}

/// Learns the concept tokens (and LoRA, if `request` asks for one) of one seed from that
/// seed's training split.
fn learn_concepts(d: &Demo<'_>, request: &TrainRequest, seed: u64, dir: &Path) -> Result<()> {
    let sp = split(d.pool, &d.classifier.split, seed)?;
    let subset = subset(d.pool, &sp.train);
    let mut sd = load_model(d.model, "cpu")?;
    let request = TrainRequest { seed, ..request.clone() };
    let settings = TrainSettings::resolve(&request, &sd, &subset)?;
    let resume = dir.join("checkpoint.safetensors").is_file();
    let mut trainer = Trainer::new(&mut sd, &subset, settings, d.progress)?;
    let s = trainer.run(&TrainOptions { out: dir.to_path_buf(), resume, progress: d.progress, stop_after: None })?;
    if !s.finished {
        return Err(Error::invalid(format!("concept learning in {} did not finish", dir.display())));
    }
    Ok(())
}

/// The items `idx` of `ds`, as a dataset of their own.
pub fn subset(ds: &Dataset, idx: &[usize]) -> Dataset {
    Dataset { root: ds.root.clone(), classes: ds.classes.clone(), items: idx.iter().map(|&i| ds.items[i].clone()).collect() }
}

/// Synthetic tiles per class in a grid row.
const PER_ROW: usize = 8;

/// One grid per generating method (first seed): each row a class, its real training images
/// on the left, the method's images of that class on the right; and one of the real images
/// alone when nothing generates.
fn grids_of_methods(d: &Demo<'_>, out: &Path) -> Result<Vec<Grid>> {
    let Some(&seed) = d.seeds.first() else { return Ok(Vec::new()) };
    let sp = split(d.pool, &d.classifier.split, seed)?;
    let shots = subset(d.pool, &sp.train);
    let classes = d.pool.classes.join(", ");
    let mut grids = Vec::new();
    let seed_dir = out.join(format!("seed-{seed}"));
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&seed_dir).map_err(|e| Error::io(&seed_dir, e))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for method_dir in entries {
        let syn = method_dir.join(format!("seed-{seed}")).join("synthetic");
        if !syn.join("manifest.jsonl").is_file() {
            continue;
        }
        let ds = crate::classify::data::synthetic_dataset(&syn, &d.pool.classes)?;
        let name = method_dir.file_name().and_then(|n| n.to_str()).unwrap_or("?").to_string();
        grids.push(Grid {
            title: format!("{name} (seed {seed}): real training images | synthetic images; rows: {classes}"),
            png: class_grid(&shots, Some(&ds.dataset))?,
        });
    }
    if grids.is_empty() {
        grids.push(Grid { title: format!("real training images (seed {seed}); rows: {classes}"), png: class_grid(&shots, None)? });
    }
    Ok(grids)
}

/// A PNG with one row per class: the real images of `real` (as many as the largest class
/// has, up to `PER_ROW`), a gap, then up to `PER_ROW` images of `synthetic`.
pub fn class_grid(real: &Dataset, synthetic: Option<&Dataset>) -> Result<Vec<u8>> {
    const SIDE: usize = 32;
    const GAP: usize = 12;
    let real_members = real.class_members();
    let left = real_members.iter().map(Vec::len).max().unwrap_or(0).min(PER_ROW);
    let syn_members = synthetic.map(|s| s.class_members());
    let width = left * SIDE + if synthetic.is_some() { GAP + PER_ROW * SIDE } else { 0 };
    let rows = real.classes.len();
    let mut sheet = image::RgbImage::from_pixel(width as u32, (rows * SIDE) as u32, image::Rgb([255, 255, 255]));
    let mut put = |ds: &Dataset, i: usize, x: usize, row: usize| -> Result<()> {
        let tile = prepare(&load_rgb8(&ds.items[i].path)?, SIDE, ResizePolicy::Squash);
        image::imageops::replace(&mut sheet, &tile, x as i64, (row * SIDE) as i64);
        Ok(())
    };
    for c in 0..rows {
        for (k, &i) in real_members[c].iter().take(left).enumerate() {
            put(real, i, k * SIDE, c)?;
        }
        if let (Some(s), Some(m)) = (synthetic, &syn_members) {
            for (k, &i) in m.get(c).map(|v| v.as_slice()).unwrap_or(&[]).iter().take(PER_ROW).enumerate() {
                put(s, i, left * SIDE + GAP + k * SIDE, c)?;
            }
        }
    }
    crate::data::atomic::encode_png(sheet.as_raw(), sheet.width() as usize, sheet.height() as usize)
}
