//! `diffii compare`: run chosen synthesis methods and the classifier under one protocol and
//! seed list; write `results.json` and a markdown table.
use std::path::PathBuf;

use clap::ValueEnum;
use diffii::data::dataset::Dataset;
use diffii::experiment::compare::{self, MethodSpec};
use diffii::synth::diffii::{read_suffixes, Settings, SettingsRequest};
use diffii::synth::img2img::{Mode, Settings as BaselineSettings};
use diffii::synth::invert::InversionRequest;
use diffii::synth::plan::Count;

use super::common::{load_pipeline, DataArgs, ModelArgs, Preset};
use super::train::ClassifierArgs;

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompareMethod {
    /// Real images only.
    None,
    /// Real images with classic augmentation (rotation, colour jitter), no generator.
    Classic,
    Diffii,
    DaFusion,
    Txt2img,
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
    /// Output folder: <method>/seed-<s>/ cells, results.json, results.md.
    #[arg(long)]
    pub out: PathBuf,
    /// Methods to compare, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "none,diffii")]
    pub methods: Vec<CompareMethod>,
    /// Protocol seeds (split, classifier; mixed into generation).
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    pub seeds: Vec<u64>,
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
    let generating = a.methods.iter().any(|m| !matches!(m, CompareMethod::None | CompareMethod::Classic));
    let p = if generating { Some(load_pipeline(&a.model)?) } else { None };
    let g = &a.gen;
    let request = |diffii_only: bool| -> anyhow::Result<SettingsRequest> {
        Ok(SettingsRequest {
            inversion: InversionRequest {
                official: g.preset == Some(Preset::Official),
                prompt_template: Some(g.prompt_template.clone()),
                superclass: Some(g.superclass.clone()),
                size: g.gen_size,
                resize: None,
                steps: if diffii_only { g.inversion_steps } else { None },
            },
            suffixes: match (&g.suffixes, diffii_only) {
                (Some(path), true) => Some(read_suffixes(path)?),
                _ => None,
            },
            steps: g.steps,
            guidance: g.guidance,
            strength: if diffii_only { g.strength } else { None },
            stage1_steps: None,
            interp: None,
            count: match (g.per_class, g.expansion) {
                (Some(n), _) => Some(Count::PerClass(n)),
                (None, Some(k)) => Some(Count::Expansion(k)),
                (None, None) => None,
            },
            seed: g.gen_seed,
            quantize: None,
        })
    };
    let mut methods = Vec::new();
    for m in &a.methods {
        if matches!(m, CompareMethod::None | CompareMethod::Classic) {
            methods.push(if *m == CompareMethod::None { MethodSpec::None } else { MethodSpec::Classic });
            continue;
        }
        let p = p.as_ref().ok_or_else(|| anyhow::anyhow!("generating methods need --model"))?;
        methods.push(match m {
            CompareMethod::Diffii => MethodSpec::Diffii(Settings::resolve(&request(true)?, p)?),
            CompareMethod::DaFusion => MethodSpec::Baseline(BaselineSettings::resolve(&request(false)?, Mode::Img2Img, g.strengths.clone(), p)?),
            _ => MethodSpec::Baseline(BaselineSettings::resolve(&request(false)?, Mode::Txt2Img, None, p)?),
        });
    }
    if a.with_classic {
        MethodSpec::add_classic_variants(&mut methods)?;
    }
    let plan = compare::Plan { methods: &methods, seeds: &a.seeds, classifier: &classifier, gen_batch: g.gen_batch, progress: !a.quiet };
    let _lock = diffii::data::lock::lock_output(&a.out, diffii::data::lock::Scope::Whole)?;
    let results = compare::run(p.as_ref(), &train, &test, &plan, &a.out)?;
    print!("{}", compare::markdown(&results));
    println!("results in {} (results.json, results.md)", a.out.display());
    Ok(())
}
