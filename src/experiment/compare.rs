//! `diffii compare`: every chosen method under one protocol and seed list.
//!
//! For each seed the protocol's split is drawn first; a generating method then makes its
//! synthetic images from that seed's training images only (validation and test images never
//! reach the generator), and a classifier is trained on the real training images with those
//! synthetic images mixed in. `none` trains on the real images alone. Every cell (method, seed)
//! keeps its outputs under `out/<method>/seed-<s>/`, so a rerun resumes: generation through the
//! synthesis driver's records, training through the seed's `result.json`. Seeds and methods can
//! be added to an existing comparison; changing a method's or the classifier's settings in the
//! same folder is refused.
//!
//! Results: `results.json` and `results.md` — per method, test accuracy at the
//! validation-selected and at the last epoch (mean +- std over seeds, and per seed), images
//! generated, the synthetic set's quality judged by the same seed's `none` classifier
//! ([`crate::experiment::quality`]), generation and training time; with a test group file,
//! also the worst-group, group-mean and per-group accuracy ([`crate::classify::groups`]).
//!
//! Cells can be spread over machines by seed (`Plan::shard`); all cells of one seed stay in one
//! shard because a seed's filter and quality figures need that seed's `none` classifier.
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::classify::data::{synthetic_dataset, ImageSet};
use crate::classify::protocol::split;
use crate::classify::groups::{GroupSummary, Groups};
use crate::classify::stats::mean_std;
use crate::classify::train::{group_summary, load_model, train_seed, ClassifierSettings, RunData, SeedResult};
use crate::experiment::filter::FilterSummary;
use crate::experiment::quality::{measure, Quality};
use crate::experiment::sweep::{Candidate, Selection, SweepKey};
use crate::data::atomic::{write_atomic, write_json_atomic, write_or_match_settings};
use crate::data::dataset::Dataset;
use crate::error::{read_json, Error, Result};
use crate::synth::diffii::SettingsRequest;
use crate::synth::driver::RunOptions;
use crate::synth::pipeline::Pipeline;
use crate::synth::plan::Shard;

/// A method to compare, with its resolved settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum MethodSpec {
    /// Real images only.
    None,
    /// Real images only, with the classic augmentation (rotation, colour jitter) on top.
    Classic,
    Diffii(crate::synth::diffii::Settings),
    Baseline(crate::synth::img2img::Settings),
    /// A generating method's images (the very set the method alone trains with) with the
    /// classic augmentation on top, named `<method>+classic`.
    WithClassic { base: Box<MethodSpec> },
    /// One point of a sweep ([`crate::experiment::sweep`]), named `<method>@<label>`: either
    /// the method with swept generation settings (already in `base`; `syn_p` is `None`), or,
    /// around that, its own replacement probability — a training-only variant that trains on
    /// its base's images, as `+classic` does, so a `syn-p` sweep generates each set once.
    Variant { label: String, base: Box<MethodSpec>, syn_p: Option<f64> },
}

/// The methods a comparison knows, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MethodKind {
    /// Real images only.
    None,
    /// Real images with classic augmentation (rotation, colour jitter), no generator.
    Classic,
    /// Diff-II: interpolated inversions, two-stage guided sampling.
    Diffii,
    /// DA-Fusion: img2img from a real image of the class.
    DaFusion,
    /// Diff-Mix: img2img from a real image of a random class toward the class, soft label.
    DiffMix,
    /// Text-to-image from the concept prompt.
    Txt2img,
    /// Diff-AUG: DA-Fusion's img2img on the model with a LoRA learned with the concepts.
    DiffAug,
}

/// The models a comparison generates with: the model with the concept tokens, and for
/// Diff-AUG the model with its own concept tokens and the LoRA learned with them.
#[derive(Clone, Copy, Default)]
pub struct Generators<'a> {
    pub plain: Option<&'a Pipeline>,
    pub lora: Option<&'a Pipeline>,
}

impl<'a> Generators<'a> {
    /// The model `kind` generates with.
    fn for_kind(&self, kind: MethodKind) -> Result<&'a Pipeline> {
        match kind {
            MethodKind::DiffAug => self.lora.ok_or_else(|| {
                Error::invalid("diff-aug needs concepts learned with a LoRA: pass --diff-aug-concepts (a `diffii concepts --lora-rank R` output folder)")
            }),
            _ => self.plain.ok_or_else(|| Error::invalid("generating methods need a model (--model)")),
        }
    }

    /// The model the synthesis settings `m` generate with.
    fn for_spec(&self, m: &MethodSpec) -> Result<&'a Pipeline> {
        match m {
            MethodSpec::Baseline(s) if s.mode == crate::synth::img2img::Mode::DiffAug => self.for_kind(MethodKind::DiffAug),
            _ => self.for_kind(MethodKind::Diffii),
        }
    }
}

impl MethodKind {
    pub const ALL: [MethodKind; 7] =
        [MethodKind::None, MethodKind::Classic, MethodKind::Diffii, MethodKind::DaFusion, MethodKind::DiffAug, MethodKind::DiffMix, MethodKind::Txt2img];

    /// The name a user types, which is also the method's results row.
    pub fn name(self) -> &'static str {
        match self {
            MethodKind::None => "none",
            MethodKind::Classic => "classic",
            MethodKind::Diffii => "diffii",
            MethodKind::DaFusion => "da-fusion",
            MethodKind::DiffMix => "diff-mix",
            MethodKind::Txt2img => "txt2img",
            MethodKind::DiffAug => "diff-aug",
        }
    }

    /// Whether a swept setting changes what this method does.
    pub fn swept_by(self, key: SweepKey) -> bool {
        let generating = !matches!(self, MethodKind::None | MethodKind::Classic);
        match key {
            SweepKey::Strength => self == MethodKind::Diffii,
            _ => generating,
        }
    }
}

impl std::str::FromStr for MethodKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        MethodKind::ALL.into_iter().find(|k| k.name() == s.trim()).ok_or_else(|| {
            format!("unknown method `{s}`; choose from {}", MethodKind::ALL.map(|k| k.name()).join(", "))
        })
    }
}

/// The baselines' own settings in a comparison (`None`: the method's default).
#[derive(Clone, Debug, Default)]
pub struct BaselineOptions {
    /// DA-Fusion's strengths.
    pub strengths: Option<Vec<f64>>,
    /// Diff-Mix's strengths.
    pub mix_strengths: Option<Vec<f64>>,
    pub mix_gamma: Option<f64>,
}

impl MethodSpec {
    /// `kind` with its settings resolved from one request shared by every method (Diff-II's own
    /// fields reach Diff-II only) and the baselines' options. Generating methods need their model
    /// in `g`.
    pub fn resolve(kind: MethodKind, r: &SettingsRequest, b: &BaselineOptions, g: Generators<'_>) -> Result<Self> {
        use crate::synth::img2img::{Mode, Settings as Baseline};
        let model = || g.for_kind(kind);
        Ok(match kind {
            MethodKind::None => MethodSpec::None,
            MethodKind::Classic => MethodSpec::Classic,
            MethodKind::Diffii => MethodSpec::Diffii(crate::synth::diffii::Settings::resolve(r, model()?)?),
            MethodKind::DaFusion => MethodSpec::Baseline(Baseline::resolve(&r.shared(), Mode::Img2Img, b.strengths.clone(), None, model()?)?),
            MethodKind::DiffAug => MethodSpec::Baseline(Baseline::resolve(&r.shared(), Mode::DiffAug, b.strengths.clone(), None, model()?)?),
            MethodKind::DiffMix => MethodSpec::Baseline(Baseline::resolve(&r.shared(), Mode::DiffMix, b.mix_strengths.clone(), b.mix_gamma, model()?)?),
            MethodKind::Txt2img => MethodSpec::Baseline(Baseline::resolve(&r.shared(), Mode::Txt2Img, None, None, model()?)?),
        })
    }

    pub fn name(&self) -> String {
        match self {
            MethodSpec::None => "none".into(),
            MethodSpec::Classic => "classic".into(),
            MethodSpec::Diffii(_) => "diffii".into(),
            MethodSpec::Baseline(s) => s.mode.name().into(),
            MethodSpec::WithClassic { base } => format!("{}+classic", base.name()),
            MethodSpec::Variant { label, base, .. } => match **base {
                MethodSpec::Variant { .. } => format!("{},{label}", base.name()),
                _ => format!("{}@{label}", base.name()),
            },
        }
    }

    /// Every method of `kinds` at every point of the sweep `axes` that applies to it (a method
    /// no axis applies to appears once, unlabelled).
    pub fn resolve_swept(kinds: &[MethodKind], axes: &[crate::experiment::sweep::Axis], r: &SettingsRequest, b: &BaselineOptions, g: Generators<'_>) -> Result<Vec<Self>> {
        use crate::experiment::sweep::{apply, label, points};
        let mut out = Vec::new();
        for &kind in kinds {
            for point in points(axes, |k| kind.swept_by(k))? {
                let (request, syn_p) = apply(&point, r);
                let mut spec = MethodSpec::resolve(kind, &request, b, g)?;
                let (training, generation): (Vec<_>, Vec<_>) = point.into_iter().partition(|(k, _)| *k == SweepKey::SynP);
                if !generation.is_empty() {
                    spec = MethodSpec::Variant { label: label(&generation), base: Box::new(spec), syn_p: None };
                }
                if !training.is_empty() {
                    spec = MethodSpec::Variant { label: label(&training), base: Box::new(spec), syn_p };
                }
                out.push(spec);
            }
        }
        Ok(out)
    }

    /// The replacement probability this method trains with, when it sets its own.
    pub fn syn_p(&self) -> Option<f64> {
        match self {
            MethodSpec::Variant { syn_p, base, .. } => syn_p.or_else(|| base.syn_p()),
            MethodSpec::WithClassic { base } => base.syn_p(),
            _ => None,
        }
    }

    /// The synthesis settings behind this method (through variants and `+classic`), if it
    /// generates.
    fn synthesis(&self) -> Option<&MethodSpec> {
        match self {
            MethodSpec::Diffii(_) | MethodSpec::Baseline(_) => Some(self),
            MethodSpec::Variant { base, .. } | MethodSpec::WithClassic { base } => base.synthesis(),
            MethodSpec::None | MethodSpec::Classic => None,
        }
    }

    /// This method with the classic augmentation added (`none` becomes `classic`); an error
    /// for a method that already has it.
    pub fn with_classic(self) -> Result<Self> {
        match self {
            MethodSpec::None => Ok(MethodSpec::Classic),
            MethodSpec::Classic | MethodSpec::WithClassic { .. } => Err(Error::invalid(format!("{} already uses the classic augmentation", self.name()))),
            m => Ok(MethodSpec::WithClassic { base: Box::new(m) }),
        }
    }

    /// Appends `<method>+classic` for every generating method of `methods`.
    pub fn add_classic_variants(methods: &mut Vec<MethodSpec>) -> Result<()> {
        let extra: Vec<MethodSpec> = methods.iter().filter(|m| m.generator().is_some()).cloned().collect();
        for m in extra {
            methods.push(m.with_classic()?);
        }
        Ok(())
    }

    /// The method that makes the synthetic images this one trains with (its cell holds them),
    /// if any.
    pub fn generator(&self) -> Option<&MethodSpec> {
        match self {
            MethodSpec::None | MethodSpec::Classic => None,
            MethodSpec::WithClassic { base } | MethodSpec::Variant { base, syn_p: Some(_), .. } => base.generator(),
            m => m.synthesis().map(|_| m),
        }
    }

    /// Whether the classifier adds the classic augmentation.
    pub fn classic(&self) -> bool {
        match self {
            MethodSpec::Classic | MethodSpec::WithClassic { .. } => true,
            MethodSpec::Variant { base, .. } => base.classic(),
            _ => false,
        }
    }
}

/// One method's row.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MethodResult {
    pub method: String,
    pub seeds: Vec<SeedResult>,
    pub synthetic_images: usize,
    pub seconds_generation: f64,
    pub seconds_training: f64,
    /// Synthetic images a filter pass dropped (summed over seeds); `None` when none ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synthetic_dropped: Option<usize>,
    pub test_acc_selected: (f64, f64),
    pub test_acc_last: (f64, f64),
    /// Synthetic-set quality (mean over seeds) by the `none` cell's classifier of each seed;
    /// absent for methods that generate nothing or when `none` is not compared.
    pub quality: Option<Quality>,
    /// Per-group, group-mean and worst-group test accuracy (with a group file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<GroupSummary>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CompareResults {
    pub classifier: ClassifierSettings,
    pub seeds: Vec<u64>,
    pub methods: Vec<MethodResult>,
    /// Per swept method family, the variant chosen on validation accuracy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub selected: Vec<Selection>,
}

/// What a generation cell did, kept so a resumed compare reports the original time.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct GenerationCell {
    images: usize,
    seconds: f64,
}

/// What to compare and how.
pub struct Plan<'a> {
    pub methods: &'a [MethodSpec],
    pub seeds: &'a [u64],
    pub classifier: &'a ClassifierSettings,
    /// Samples per UNet call while generating.
    pub gen_batch: usize,
    /// Drop synthetic images the seed's `none` classifier gives less than this confidence for
    /// their class (and blank ones) before training ([`crate::experiment::filter`]).
    pub filter_min: Option<f64>,
    /// The group of every test image (group-shift evaluation).
    pub test_groups: Option<&'a Groups>,
    /// Run only the seeds at positions `index`, `index + count`, ... of `seeds`: every cell a
    /// seed's cells depend on (its `none` judge, its generated images) has that seed, so shards
    /// never wait for each other. A shard writes `results.shard-<i>-of-<n>.{json,md}`; the same
    /// command without a shard then finds every cell done and writes `results.json`.
    pub shard: Shard,
    /// Where the classifiers train (generation runs where its model was loaded).
    pub device: &'a Device,
    pub progress: bool,
}

/// Runs (or resumes) every (method, seed) cell into `out`; generating methods need their model
/// in `g`.
pub fn run(g: Generators<'_>, train: &Dataset, test: &Dataset, plan: &Plan<'_>, out: &Path) -> Result<CompareResults> {
    let Plan { methods, seeds, classifier, gen_batch, filter_min, test_groups, shard, device, progress } = *plan;
    classifier.check()?;
    if methods.is_empty() || seeds.is_empty() {
        return Err(Error::invalid("compare needs at least one method and one seed"));
    }
    if let Some(m) = filter_min.filter(|m| !(0.0..=1.0).contains(m)) {
        return Err(Error::invalid(format!("--filter-min {m} must lie in [0, 1]")));
    }
    if filter_min.is_some() && !methods.contains(&MethodSpec::None) {
        return Err(Error::invalid("--filter-min judges synthetic images with each seed's `none` classifier: add none to the methods"));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    // Seeds and methods may be added to a comparison later; what a cell's numbers depend on may
    // not change under it.
    write_or_match_settings(out.join("classifier_config.json"), classifier, "a comparison")?;
    for m in methods {
        write_or_match_settings(out.join(m.name()).join("method.json"), m, "this method")?;
        if let Some(g) = m.generator() {
            write_or_match_settings(out.join(g.name()).join("method.json"), g, "this method")?;
        }
    }
    write_or_match_settings(out.join("filter_config.json"), &filter_min, "a comparison")?;
    write_or_match_settings(out.join("test_groups.json"), &test_groups.map(Groups::fingerprint), "a comparison")?;
    let seeds: Vec<u64> = seeds.iter().enumerate().filter(|(k, _)| k % shard.count == shard.index).map(|(_, &s)| s).collect();
    if seeds.is_empty() {
        return Err(Error::invalid(format!("shard {}/{} has no seeds: use at most {} shards for {} seeds", shard.index, shard.count, plan.seeds.len(), plan.seeds.len())));
    }
    // The filter's judge is the `none` classifier: its cells run first.
    let mut order: Vec<usize> = (0..methods.len()).collect();
    order.sort_by_key(|&i| methods[i] != MethodSpec::None);
    let mut rows = Vec::new();
    for &i in &order {
        let m = &methods[i];
        let name = m.name();
        let (mut seed_results, mut images, mut gen_s, mut train_s) = (Vec::new(), 0, 0.0, 0.0);
        let mut dropped = None;
        for &seed in &seeds {
            let cell = out.join(&name).join(format!("seed-{seed}"));
            let mut syn = None;
            if let Some(gen) = m.generator() {
                // A `+classic` variant trains with its generator's own cell's images.
                let synthetic_dir = out.join(gen.name()).join(format!("seed-{seed}")).join("synthetic");
                let p = g.for_spec(gen.synthesis().unwrap_or(gen))?;
                let g = generate_cell(p, train, classifier, gen, seed, gen_batch, &synthetic_dir, progress)?;
                images += g.images;
                gen_s += g.seconds;
                if let Some(min) = filter_min {
                    let f = filter_cell(train, seed, min, &synthetic_dir, out, device)?;
                    *dropped.get_or_insert(0) += f.dropped();
                }
                syn = Some(synthetic_dataset(&synthetic_dir, &train.classes)?);
            }
            let done = cell.join("result.json");
            let r: SeedResult = if done.is_file() {
                read_json(&done)?
            } else {
                let data = RunData { train, synthetic: syn.as_ref(), test: Some(test), test_groups };
                let mut settings = classifier.clone();
                settings.augment.classic |= m.classic();
                settings.syn_p = m.syn_p().unwrap_or(settings.syn_p);
                let r = train_seed(&data, &settings, seed, &cell.join("classifier"), device, progress)?;
                write_json_atomic(&done, &r)?;
                r
            };
            train_s += r.seconds;
            seed_results.push(r);
        }
        let mut row = MethodResult::new(name, seed_results, images, gen_s, train_s, None);
        row.synthetic_dropped = dropped;
        rows.push((i, row));
    }
    rows.sort_by_key(|(i, _)| *i);
    let mut rows: Vec<MethodResult> = rows.into_iter().map(|(_, r)| r).collect();
    // Quality needs the real-data classifiers, which exist once every cell has run.
    for (m, row) in methods.iter().zip(rows.iter_mut()) {
        let Some(gen) = m.generator() else { continue };
        let mut per_seed = Vec::new();
        for &seed in &seeds {
            if let Some(q) = quality_cell(train, classifier, &gen.name(), seed, out, device)? {
                per_seed.push(q);
            }
        }
        row.quality = mean_quality(&per_seed);
    }
    let results = CompareResults { classifier: classifier.clone(), seeds, selected: select(&rows), methods: rows };
    let stem = if shard.is_all() { "results".to_string() } else { format!("results.shard-{}-of-{}", shard.index, shard.count) };
    write_json_atomic(out.join(format!("{stem}.json")), &results)?;
    write_atomic(out.join(format!("{stem}.md")), markdown(&results).as_bytes())?;
    Ok(results)
}

impl MethodResult {
    /// A row from its seeds' results (accuracies summarised as mean +- std over seeds).
    pub fn new(method: String, seeds: Vec<SeedResult>, synthetic_images: usize, seconds_generation: f64, seconds_training: f64, quality: Option<Quality>) -> Self {
        let sel: Vec<f64> = seeds.iter().filter_map(|r| r.test_acc_selected).collect();
        let last: Vec<f64> = seeds.iter().filter_map(|r| r.test_acc_last).collect();
        MethodResult {
            method,
            synthetic_images,
            seconds_generation,
            seconds_training,
            synthetic_dropped: None,
            test_acc_selected: mean_std(&sel),
            test_acc_last: mean_std(&last),
            groups: group_summary(&seeds),
            seeds,
            quality,
        }
    }
}

/// Per swept method family, the variant with the best mean validation accuracy over seeds
/// (see [`crate::experiment::sweep::select`]).
pub fn select(rows: &[MethodResult]) -> Vec<Selection> {
    let candidates: Vec<Candidate<'_>> = rows
        .iter()
        .map(|r| {
            let v: Vec<f64> = r.seeds.iter().filter_map(|s| s.val_acc_selected).collect();
            let val_acc = if v.is_empty() { f64::NEG_INFINITY } else { v.iter().sum::<f64>() / v.len() as f64 };
            Candidate { method: &r.method, val_acc, test_acc_selected: r.test_acc_selected }
        })
        .collect();
    crate::experiment::sweep::select(&candidates)
}

/// The mean quality over seeds; `None` when no seed has one.
fn mean_quality(qs: &[Quality]) -> Option<Quality> {
    if qs.is_empty() {
        return None;
    }
    let n = qs.len() as f64;
    Some(Quality {
        faithfulness: qs.iter().map(|q| q.faithfulness).sum::<f64>() / n,
        diversity: qs.iter().map(|q| q.diversity).sum::<f64>() / n,
        novelty: qs.iter().map(|q| q.novelty).sum::<f64>() / n,
    })
}

/// One table from comparisons of the same methods and classifier over different seeds (e.g.
/// one per seed, each with that seed's concepts). Quality is averaged over the parts that
/// measured it.
pub fn merge(parts: &[CompareResults]) -> Result<CompareResults> {
    let first = parts.first().ok_or_else(|| Error::invalid("nothing to merge"))?;
    let mut rows = Vec::new();
    for m in &first.methods {
        let (mut seeds, mut images, mut gen_s, mut train_s, mut qs, mut dropped) = (Vec::new(), 0, 0.0, 0.0, Vec::new(), None);
        for p in parts {
            if p.classifier != first.classifier {
                return Err(Error::invalid("cannot merge comparisons made with different classifier settings"));
            }
            let row = p.methods.iter().find(|r| r.method == m.method).ok_or_else(|| Error::invalid(format!("method {} is missing from a comparison to merge", m.method)))?;
            seeds.extend(row.seeds.iter().cloned());
            images += row.synthetic_images;
            gen_s += row.seconds_generation;
            train_s += row.seconds_training;
            qs.extend(row.quality);
            if let Some(d) = row.synthetic_dropped {
                *dropped.get_or_insert(0) += d;
            }
        }
        let mut row = MethodResult::new(m.method.clone(), seeds, images, gen_s, train_s, mean_quality(&qs));
        row.synthetic_dropped = dropped;
        rows.push(row);
    }
    let seeds = parts.iter().flat_map(|p| p.seeds.iter().copied()).collect();
    Ok(CompareResults { classifier: first.classifier.clone(), seeds, selected: select(&rows), methods: rows })
}

/// The quality of one cell's synthetic set, by the same seed's `none` classifier (cached in
/// the cell's `quality.json`); `None` when that classifier does not exist.
fn quality_cell(train: &Dataset, classifier: &ClassifierSettings, method: &str, seed: u64, out: &Path, device: &Device) -> Result<Option<Quality>> {
    let cell = out.join(method).join(format!("seed-{seed}"));
    let cached = cell.join("quality.json");
    if cached.is_file() {
        return Ok(Some(read_json(&cached)?));
    }
    let judge = out.join("none").join(format!("seed-{seed}")).join("classifier");
    if !judge.join("model.safetensors").is_file() {
        return Ok(None);
    }
    let (model, info) = load_model(&judge, device)?;
    let sp = split(train, &classifier.split, seed)?;
    let real = ImageSet::load(train, &sp.train, info.size, info.resize)?;
    let syn_ds = synthetic_dataset(&cell.join("synthetic"), &train.classes)?.dataset;
    let syn = ImageSet::load(&syn_ds, &(0..syn_ds.items.len()).collect::<Vec<_>>(), info.size, info.resize)?;
    let q = measure(&model, &real, &syn, train.classes.len())?;
    write_json_atomic(&cached, &q)?;
    Ok(Some(q))
}

/// Filters one cell's synthetic set with the seed's `none` classifier (once: the decision is
/// kept in `filter.json` beside the manifest).
fn filter_cell(train: &Dataset, seed: u64, min: f64, dir: &Path, out: &Path, device: &Device) -> Result<FilterSummary> {
    let record = dir.join("filter.json");
    if let Ok(f) = read_json::<FilterSummary>(&record) {
        if f.min_confidence == min {
            return Ok(f);
        }
    }
    let judge = out.join("none").join(format!("seed-{seed}")).join("classifier");
    let (model, info) = load_model(&judge, device)?;
    if info.classes != train.classes {
        return Err(Error::bad_file(judge.join("model.json"), "the judge's classes differ from the training classes"));
    }
    let f = crate::experiment::filter::apply(dir, &model, &info, min)?;
    write_json_atomic(&record, &f)?;
    Ok(f)
}

/// Generates one cell's synthetic set from the seed's training split only.
#[allow(clippy::too_many_arguments)]
fn generate_cell(
    p: &Pipeline,
    train: &Dataset,
    classifier: &ClassifierSettings,
    m: &MethodSpec,
    seed: u64,
    batch: usize,
    dir: &Path,
    progress: bool,
) -> Result<GenerationCell> {
    let record = dir.join("generation.json");
    if let Ok(g) = read_json::<GenerationCell>(&record) {
        return Ok(g);
    }
    let sp = split(train, &classifier.split, seed)?;
    let subset = Dataset { root: train.root.clone(), classes: train.classes.clone(), items: sp.train.iter().map(|&i| train.items[i].clone()).collect() };
    let opts = RunOptions::new(PathBuf::from(dir), None, batch, Shard::ALL, progress);
    let t0 = Instant::now();
    let summary = match m.synthesis() {
        None => return Ok(GenerationCell::default()),
        // Each cell draws its own samples: the generation seed is mixed with the protocol seed.
        Some(MethodSpec::Diffii(s)) => crate::synth::diffii::generate(p, &subset, &crate::synth::diffii::Settings { seed: s.seed ^ seed, ..s.clone() }, &opts)?,
        Some(MethodSpec::Baseline(s)) => crate::synth::img2img::generate(p, &subset, &crate::synth::img2img::Settings { seed: s.seed ^ seed, ..s.clone() }, &opts)?,
        Some(_) => return Err(Error::invalid(format!("{}: no synthesis settings", m.name()))),
    };
    let g = GenerationCell { images: summary.planned, seconds: t0.elapsed().as_secs_f64() };
    write_json_atomic(&record, &g)?;
    Ok(g)
}

/// The results table's column headings, in the order of [`RowText::cells`].
pub const COLUMNS: [&str; 11] = [
    "method",
    "test acc, val-selected epoch (%)",
    "test acc, last epoch (%)",
    "per seed (val-selected)",
    "synthetic images",
    "dropped by filter",
    "faithfulness (%)",
    "diversity",
    "novelty",
    "generation s",
    "training s",
];

/// One method's numbers formatted as every results table shows them (`results.md`, the HTML
/// report), so the tables can never disagree: accuracies in % with two decimals (per-seed
/// values with one), `-` for what was not measured.
#[derive(Clone, Debug, PartialEq)]
pub struct RowText {
    pub method: String,
    /// (mean, std) over seeds, test accuracy at the validation-selected epoch.
    pub acc_selected: (String, String),
    /// (mean, std) over seeds, test accuracy at the last epoch.
    pub acc_last: (String, String),
    pub per_seed: Vec<String>,
    pub synthetic_images: String,
    pub dropped: String,
    pub faithfulness: String,
    pub diversity: String,
    pub novelty: String,
    pub seconds_generation: String,
    pub seconds_training: String,
}

impl RowText {
    pub fn new(m: &MethodResult) -> Self {
        let pct = |(mean, std): (f64, f64)| (format!("{:.2}", 100.0 * mean), format!("{:.2}", 100.0 * std));
        RowText {
            method: m.method.clone(),
            acc_selected: pct(m.test_acc_selected),
            acc_last: pct(m.test_acc_last),
            per_seed: m.seeds.iter().map(|s| s.test_acc_selected.map_or("-".into(), |v| format!("{:.1}", 100.0 * v))).collect(),
            synthetic_images: m.synthetic_images.to_string(),
            dropped: m.synthetic_dropped.map_or("-".into(), |d| d.to_string()),
            faithfulness: m.quality.map_or("-".into(), |q| format!("{:.1}", 100.0 * q.faithfulness)),
            diversity: m.quality.map_or("-".into(), |q| format!("{:.2}", q.diversity)),
            novelty: m.quality.map_or("-".into(), |q| format!("{:.2}", q.novelty)),
            seconds_generation: format!("{:.1}", m.seconds_generation),
            seconds_training: format!("{:.1}", m.seconds_training),
        }
    }

    /// The cells under [`COLUMNS`], mean and std joined by `plus_minus` (plain text: no escaping).
    pub fn cells(&self, plus_minus: &str) -> [String; 11] {
        let pm = |(m, s): &(String, String)| format!("{m} {plus_minus} {s}");
        [
            self.method.clone(),
            pm(&self.acc_selected),
            pm(&self.acc_last),
            self.per_seed.join(" / "),
            self.synthetic_images.clone(),
            self.dropped.clone(),
            self.faithfulness.clone(),
            self.diversity.clone(),
            self.novelty.clone(),
            self.seconds_generation.clone(),
            self.seconds_training.clone(),
        ]
    }
}

/// The results as a markdown table (accuracy in %, mean +- std over seeds; per-seed values).
pub fn markdown(r: &CompareResults) -> String {
    let mut out = format!("| {} |\n|{}\n", COLUMNS.join(" | "), "---|".repeat(COLUMNS.len()));
    for m in &r.methods {
        out.push_str(&format!("| {} |\n", RowText::new(m).cells("+-").join(" | ")));
    }
    if r.methods.iter().any(|m| m.groups.is_some()) {
        out.push_str(&format!("\nBy test group (val-selected epoch unless marked):\n\n{}", group_markdown(&r.methods)));
    }
    if !r.selected.is_empty() {
        out.push_str("\nSelected on validation accuracy (mean over seeds; the test set never chooses):\n\n");
        out.push_str("| method | chosen setting | of | val acc (%) | test acc, val-selected epoch (%) |\n|---|---|---|---|---|\n");
        for s in &r.selected {
            let (m, sd) = s.test_acc_selected;
            out.push_str(&format!("| {} | {} | {} | {:.2} | {:.2} +- {:.2} |\n", s.family, s.method, s.variants, 100.0 * s.val_acc, 100.0 * m, 100.0 * sd));
        }
    }
    out
}

/// The group-shift columns: all images, group mean, worst group (val-selected and last epoch),
/// then each group; empty when no method has group accuracies.
pub fn group_columns(rows: &[MethodResult]) -> Vec<String> {
    let Some(g) = rows.iter().find_map(|m| m.groups.as_ref()) else { return Vec::new() };
    let mut cols: Vec<String> = ["method", "all images (%)", "group mean (%)", "worst group (%)", "worst group, last epoch (%)"].map(String::from).to_vec();
    cols.extend(g.per_group_selected.iter().map(|(name, _)| format!("{name} (%)")));
    cols
}

/// One method's cells under [`group_columns`] (`-` where not measured), mean and std joined by
/// `plus_minus`.
pub fn group_cells(m: &MethodResult, groups: usize, plus_minus: &str) -> Vec<String> {
    let pm = |(mean, std): (f64, f64)| format!("{:.2} {plus_minus} {:.2}", 100.0 * mean, 100.0 * std);
    let mut cells = vec![m.method.clone(), pm(m.test_acc_selected)];
    match &m.groups {
        Some(g) => {
            cells.extend([pm(g.mean_selected), pm(g.worst_selected), pm(g.worst_last)]);
            cells.extend(g.per_group_selected.iter().map(|(_, a)| pm(*a)));
        }
        None => cells.extend(std::iter::repeat_n("-".to_string(), 3 + groups)),
    }
    cells
}

fn group_markdown(rows: &[MethodResult]) -> String {
    let cols = group_columns(rows);
    let mut out = format!("| {} |\n|{}\n", cols.join(" | "), "---|".repeat(cols.len()));
    for m in rows {
        out.push_str(&format!("| {} |\n", group_cells(m, cols.len() - 5, "+-").join(" | ")));
    }
    out
}
