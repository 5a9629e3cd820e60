//! `diffii compare`: run chosen synthesis methods and the classifier under one protocol and
//! seed list; write `results.json` and a markdown table.
use std::path::PathBuf;

use diffii::data::dataset::Dataset;
use diffii::experiment::compare::{self, BaselineOptions, Generators, MethodKind, MethodSpec};
use diffii::train::concepts::{EMBEDS_FILE, LORA_FILE};
use diffii::experiment::sweep::Axis;
use diffii::synth::diffii::{read_suffixes, SettingsRequest};
use diffii::synth::invert::InversionRequest;
use diffii::synth::plan::{Count, Shard};
use diffii::classify::groups::Groups;
use diffii::data::lock::Scope;

use super::common::{load_pipeline, DataArgs, ModelArgs, Preset};
use super::train::ClassifierArgs;

/// Resolves the chosen methods at every point of the sweep (and, with `with_classic`, their
/// `+classic` variants) from one shared request; generating methods need their model in `g`.
pub fn resolve_methods(methods: &[MethodKind], sweep: &[Axis], r: &SettingsRequest, b: &BaselineOptions, with_classic: bool, g: Generators<'_>) -> diffii::error::Result<Vec<MethodSpec>> {
    let mut specs = MethodSpec::resolve_swept(methods, sweep, r, b, g)?;
    if with_classic {
        MethodSpec::add_classic_variants(&mut specs)?;
    }
    Ok(specs)
}

/// Generation settings of the compared methods (each method uses those it knows).
#[derive(clap::Args, Debug, Clone)]
pub struct CompareGenArgs {
    /// Apply a named set of generation settings; explicit flags still override it.
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    #[arg(long, default_value = "a photo of a {concept} {superclass}")]
    pub prompt_template: String,
    #[arg(long, default_value = "")]
    pub superclass: String,
    /// Generation image side (default: the model's native size).
    #[arg(long)]
    pub gen_size: Option<usize>,
    /// Diff-II: DDIM inversion steps (default 200).
    #[arg(long)]
    pub inversion_steps: Option<usize>,
    /// DDIM sampling steps (default 25).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale (default 7.5).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Diff-II: stage 1 covers steps with t >= 1000 (1 - strength) (default 0.3).
    #[arg(long)]
    pub strength: Option<f64>,
    /// da-fusion: strengths drawn per image (default 0.25,0.5,0.75,1).
    #[arg(long, value_delimiter = ',')]
    pub strengths: Option<Vec<f64>>,
    /// diff-mix: strengths drawn per image (default 0.7).
    #[arg(long, value_delimiter = ',')]
    pub mix_strengths: Option<Vec<f64>>,
    /// diff-mix: the target class's soft-label weight is strength^gamma (default 0.8).
    #[arg(long)]
    pub mix_gamma: Option<f64>,
    /// Diff-II: scene suffixes, one per line.
    #[arg(long)]
    pub suffixes: Option<PathBuf>,
    /// Synthetic images per real training image of each class, for every method (default 5).
    #[arg(long, conflicts_with = "per_class")]
    pub expansion: Option<usize>,
    /// A fixed number of synthetic images per class, for every method.
    #[arg(long)]
    pub per_class: Option<usize>,
    /// Generation seed (mixed with each protocol seed).
    #[arg(long, default_value_t = 0)]
    pub gen_seed: u64,
    /// Samples per UNet call.
    #[arg(long, default_value_t = 1)]
    pub gen_batch: usize,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// Test images (ImageFolder or list file with the training classes).
    #[arg(long)]
    pub test: PathBuf,
    /// Group shift: a file of `<test image> <group>` lines giving every test image a group
    /// (image paths relative to the test set); adds a table of per-group, group-mean and
    /// worst-group accuracy.
    #[arg(long)]
    pub test_groups: Option<PathBuf>,
    /// Run only part i of n of the seeds (0-based, e.g. `--shard $SLURM_ARRAY_TASK_ID/$N`; seed
    /// k of --seeds goes to shard k mod n) into the same --out; when every shard has finished, the
    /// same command without --shard assembles results.json without recomputing any cell.
    #[arg(long, default_value = "0/1")]
    pub shard: Shard,
    /// Output folder: <method>/seed-<s>/ cells, results.json, results.md.
    #[arg(long)]
    pub out: PathBuf,
    /// Methods to compare, comma-separated: none (real images only), classic (rotation and
    /// colour jitter, no generator), diffii, da-fusion, diff-aug (needs --diff-aug-concepts),
    /// diff-mix, txt2img.
    #[arg(long, value_delimiter = ',', default_value = "none,diffii")]
    pub methods: Vec<MethodKind>,
    /// Protocol seeds (split, classifier; mixed into generation).
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    pub seeds: Vec<u64>,
    /// Diff-AUG's concept tokens and LoRA: the output folder of `diffii concepts --lora-rank R`
    /// (learned_embeds.safetensors, pytorch_lora_weights.safetensors) on the same model.
    #[arg(long)]
    pub diff_aug_concepts: Option<PathBuf>,
    /// Drop synthetic images that each seed's `none` classifier gives less than this confidence
    /// for their class (and blank ones) before training; the manifest records each drop.
    #[arg(long)]
    pub filter_min: Option<f64>,
    /// Run every generating method at each value of a setting, e.g. `--sweep guidance=1.5,3,7.5
    /// --sweep strength=0.1,0.3` (keys: guidance, strength, steps, expansion, syn-p; repeat for
    /// a grid); each method family's best variant is chosen on validation accuracy.
    #[arg(long)]
    pub sweep: Vec<Axis>,
    /// Also run every generating method with the classic augmentation on top
    /// (`<method>+classic`, trained on the same synthetic images).
    #[arg(long)]
    pub with_classic: bool,
    #[command(flatten)]
    pub gen: CompareGenArgs,
    #[command(flatten)]
    pub classifier: ClassifierArgs,
    /// Hide progress bars.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let classifier = a.classifier.settings();
    classifier.check()?;
    let train = Dataset::open(&a.data.data, a.data.class_names.as_deref())?;
    let test = Dataset::open(&a.test, a.data.class_names.as_deref())?;
    // The classifiers train where the generator runs (--device).
    let device = diffii::sd::loader::parse_device(&a.model.device)?;
    let groups = a.test_groups.as_deref().map(|g| Groups::read(g, &test)).transpose()?;
    let generating = a.methods.iter().any(|m| !matches!(m, MethodKind::None | MethodKind::Classic | MethodKind::DiffAug));
    let p = if generating { Some(load_pipeline(&a.model)?) } else { None };
    let p_lora = match (&a.diff_aug_concepts, a.methods.contains(&MethodKind::DiffAug)) {
        (Some(dir), true) => {
            let model = ModelArgs { concepts: vec![dir.join(EMBEDS_FILE)], lora: Some(dir.join(LORA_FILE)), class_map: None, ..a.model.clone() };
            Some(load_pipeline(&model)?)
        }
        (Some(_), false) => anyhow::bail!("--diff-aug-concepts is only used by the diff-aug method: add it to --methods"),
        (None, _) => None,
    };
    let generators = Generators { plain: p.as_ref(), lora: p_lora.as_ref() };
    let g = &a.gen;
    let request = SettingsRequest {
        inversion: InversionRequest {
            official: g.preset == Some(Preset::Official),
            prompt_template: Some(g.prompt_template.clone()),
            superclass: Some(g.superclass.clone()),
            size: g.gen_size,
            resize: None,
            steps: g.inversion_steps,
        },
        suffixes: g.suffixes.as_deref().map(read_suffixes).transpose()?,
        steps: g.steps,
        guidance: g.guidance,
        strength: g.strength,
        stage1_steps: None,
        interp: None,
        count: match (g.per_class, g.expansion) {
            (Some(n), _) => Some(Count::PerClass(n)),
            (None, Some(k)) => Some(Count::Expansion(k)),
            (None, None) => None,
        },
        seed: g.gen_seed,
        quantize: None,
    };
    let baselines = BaselineOptions { strengths: g.strengths.clone(), mix_strengths: g.mix_strengths.clone(), mix_gamma: g.mix_gamma };
    let methods = resolve_methods(&a.methods, &a.sweep, &request, &baselines, a.with_classic, generators)?;
    let plan = compare::Plan { methods: &methods, seeds: &a.seeds, classifier: &classifier, gen_batch: g.gen_batch, filter_min: a.filter_min, test_groups: groups.as_ref(), shard: a.shard, device: &device, progress: !a.quiet };
    let scope = if a.shard.is_all() { Scope::Whole } else { Scope::Shard { index: a.shard.index, count: a.shard.count } };
    let _lock = diffii::data::lock::lock_output(&a.out, scope)?;
    let results = compare::run(generators, &train, &test, &plan, &a.out)?;
    print!("{}", compare::markdown(&results));
    if a.shard.is_all() {
        println!("results in {} (results.json, results.md)", a.out.display());
    } else {
        let (i, n) = (a.shard.index, a.shard.count);
        println!("shard {i}/{n} done: {}; when every shard is done, run the same command without --shard to write results.json", a.out.join(format!("results.shard-{i}-of-{n}.json")).display());
    }
    Ok(())
}
