//! `diffii demo`: the whole method on the real images and the mini SD model shipped in the
//! repository; no arguments needed.
use std::path::PathBuf;

use diffii::classify::protocol::SplitSpec;
use diffii::classify::groups::Groups;
use diffii::data::bundle;
use diffii::data::shift::{self, ShiftSpec};
use diffii::experiment::report::Grid;
use diffii::experiment::compare::{BaselineOptions, Generators, MethodKind};
use diffii::experiment::demo::{concept_request, generation_request, run, Demo};
use diffii::train::concepts::{TrainMode, TrainRequest};

use super::compare::resolve_methods;
use super::train::ClassifierArgs;

/// The shipped mini SD model.
pub const DEMO_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/fashion-mini-sd");
/// The shipped RGB mini SD model of the group-shift world (trained on coloured backgrounds).
pub const DEMO_MODEL_RGB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/fashion-mini-sd-rgb");

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// `--shots` real images per class (default 5), drawn per seed from the pool.
    FewShot,
    /// Every pool image, thinned to a long tail (`--imbalance`, default 0.01).
    LongTail,
    /// Group shift (Waterbirds-style): few-shot on the coloured world, where a background colour
    /// agrees with the label group in 95 % of the training images and is independent of it at
    /// test; reports per-group, group-mean and worst-group accuracy.
    Ood,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output folder (a rerun resumes it).
    #[arg(long, default_value = "demo-out")]
    pub out: PathBuf,
    /// The model (default: the shipped mini SD trained by `diffii pretrain` on Fashion-MNIST;
    /// with `--protocol ood` its RGB sibling trained on coloured backgrounds).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The real images: the shipped Fashion-MNIST subset (pool and test set).
    #[arg(long, default_value = bundle::FASHION_MNIST_SUBSET)]
    pub data: PathBuf,
    #[arg(long, value_enum, default_value = "few-shot")]
    pub protocol: Protocol,
    /// Protocol seeds.
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    pub seeds: Vec<u64>,
    /// Methods, comma-separated (default: none, classic, diffii, da-fusion, diff-aug, diff-mix,
    /// txt2img; diff-aug adds a concept + LoRA learning run per seed).
    #[arg(long, value_delimiter = ',')]
    pub methods: Option<Vec<MethodKind>>,
    /// Concept-learning steps per class.
    #[arg(long, default_value_t = 40)]
    pub concept_steps: usize,
    #[arg(long, default_value_t = 3e-2)]
    pub concept_lr: f64,
    /// DDIM steps of inversion and sampling.
    #[arg(long, default_value_t = 25)]
    pub steps: usize,
    /// Classifier-free guidance.
    #[arg(long, default_value_t = 1.5)]
    pub guidance: f64,
    /// Diff-II: stage 1 covers steps with t >= 1000 (1 - strength).
    #[arg(long, default_value_t = 0.3)]
    pub strength: f64,
    /// Synthetic images per real training image.
    #[arg(long, default_value_t = 5)]
    pub expansion: usize,
    /// Samples per UNet call.
    #[arg(long, default_value_t = 16)]
    pub gen_batch: usize,
    /// Run every generating method at each value of a setting (as `compare --sweep`), e.g.
    /// `--sweep guidance=1,1.5,3`; each family's best variant is chosen on validation accuracy.
    #[arg(long)]
    pub sweep: Vec<diffii::experiment::sweep::Axis>,
    /// Drop synthetic images that each seed's real-data classifier gives less than this
    /// confidence for their class (and blank ones) before training.
    #[arg(long)]
    pub filter_min: Option<f64>,
    /// Every method, each also with the classic augmentation on top (`<method>+classic`).
    #[arg(long, conflicts_with = "quick")]
    pub full: bool,
    /// Smoke test: one seed, 10 concept steps per class, 10 DDIM steps, 2 synthetic images per
    /// real one, 20 epochs, none + Diff-II only.
    #[arg(long)]
    pub quick: bool,
    #[command(flatten)]
    pub classifier: ClassifierArgs,
    /// Hide progress bars.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run_demo(mut a: Args) -> anyhow::Result<()> {
    if a.quick {
        a.seeds.truncate(1);
        a.concept_steps = a.concept_steps.min(10);
        a.steps = a.steps.min(10);
        a.expansion = a.expansion.min(2);
        a.classifier.epochs.get_or_insert(20);
        a.methods.get_or_insert_with(|| vec![MethodKind::None, MethodKind::Diffii]);
    }
    a.classifier.epochs.get_or_insert(60);
    let methods = a.methods.clone().unwrap_or_else(|| {
        MethodKind::ALL.to_vec()
    });
    // Generation settings are resolved per seed after concept learning: check them up front.
    if !a.guidance.is_finite() || !(0.0..=1.0).contains(&a.strength) {
        anyhow::bail!("--guidance {} must be finite and --strength {} lie in [0, 1]", a.guidance, a.strength);
    }
    let ood = a.protocol == Protocol::Ood;
    let model = a.model.clone().unwrap_or_else(|| PathBuf::from(if ood { DEMO_MODEL_RGB } else { DEMO_MODEL }));
    let b = bundle::load(&a.data)?;
    let (m, groups_file) = if ood {
        let w = shift::materialize(&b, &ShiftSpec::default(), &a.out.join("data-ood"))?;
        (w.folders, Some(w.test_groups))
    } else {
        (bundle::materialize(&b, &a.out.join("data"))?, None)
    };
    let (pool, test) = m.open()?;
    let groups = groups_file.as_deref().map(|g| Groups::read(g, &test)).transpose()?;
    let mut classifier = a.classifier.settings();
    // Few-shot: 5 shots unless --shots says otherwise; long tail: --imbalance 0.01 by default.
    classifier.split = SplitSpec {
        val_per_class: a.classifier.val_per_class,
        shots: (a.protocol != Protocol::LongTail).then_some(a.classifier.shots.unwrap_or(5)),
        imbalance: (a.protocol == Protocol::LongTail).then_some(a.classifier.imbalance.unwrap_or(0.01)),
    };
    classifier.class_draw = a.classifier.class_draw(a.protocol == Protocol::LongTail);
    classifier.check()?;
    let needs_plain = methods.iter().any(|m| !matches!(m, MethodKind::None | MethodKind::Classic | MethodKind::DiffAug));
    let concepts = concept_request(a.concept_steps, a.concept_lr);
    let request = generation_request(a.steps, a.guidance, a.strength, a.expansion);
    // Diff-AUG tunes the tokens of all classes jointly with a rank-4 LoRA of the UNet's
    // attention projections. Starting from the seed's learned tokens (when the plain methods
    // learn them), half the per-class runs' image draws suffice; from the init word it gets as
    // many as they saw in all.
    let lora_steps = if needs_plain { a.concept_steps * pool.classes.len() / 2 } else { a.concept_steps * pool.classes.len() };
    let lora_concepts = methods.contains(&MethodKind::DiffAug).then(|| TrainRequest {
        mode: Some(TrainMode::Joint),
        steps: Some(lora_steps.max(1)),
        lora_rank: Some(4),
        lora_alpha: Some(4.0),
        lora_lr: Some(1e-3),
        ..concepts.clone()
    });
    let full = a.full;
    let resolve = |g: Generators<'_>| resolve_methods(&methods, &a.sweep, &request, &BaselineOptions::default(), full, g);
    let protocol = match a.protocol {
        Protocol::FewShot => format!("{} real training images per class", classifier.split.shots.unwrap_or(0)),
        Protocol::LongTail => format!("a long tail (imbalance {})", classifier.split.imbalance.unwrap_or(0.0)),
        Protocol::Ood => format!(
            "group shift — every image on a coloured background, warm for label group A (T-shirt/top, Pullover, Dress, Sandal, Bag) \
             and cool for group B (Trouser, Coat, Shirt, Sneaker, Ankle boot) in 95 % of the pool, independent of the label at test \
             (four test groups, A/B x warm/cool, 500 images each) — with {} real training images per class",
            classifier.split.shots.unwrap_or(0)
        ),
    };
    let intro = format!(
        "Fashion-MNIST (Zalando, MIT): {protocol} and {} validation images per class drawn per seed from a pool of {} images, \
         tested on {} images. Model: {} — a small SD-1.x model trained from scratch by `diffii pretrain` on 55 000 other \
         Fashion-MNIST images with captions that never name a class. Seeds: {:?}. Diff-II: {} DDIM steps, guidance {}, strength {}, \
         {} synthetic images per real one.",
        classifier.split.val_per_class,
        pool.items.len(),
        test.items.len(),
        model.strip_prefix(env!("CARGO_MANIFEST_DIR")).unwrap_or(&model).display(),
        a.seeds,
        a.steps,
        a.guidance,
        a.strength,
        a.expansion
    );
    let extra_grids = if ood { vec![test_colour_grid(&test, groups.as_ref())?] } else { Vec::new() };
    let demo = Demo {
        model: &model,
        pool: &pool,
        test: &test,
        test_groups: groups.as_ref(),
        extra_grids,
        seeds: &a.seeds,
        classifier: &classifier,
        concepts: needs_plain.then_some(&concepts),
        lora_concepts: lora_concepts.as_ref(),
        methods: &resolve,
        gen_batch: a.gen_batch,
        filter_min: a.filter_min,
        progress: !a.quiet,
        title: if ood { "diffii demo: group shift on coloured Fashion-MNIST" } else { "diffii demo: Diff-II on Fashion-MNIST" },
        intro: &intro,
    };
    let results = run(&demo, &a.out)?;
    print!("{}", diffii::experiment::compare::markdown(&results));
    println!("report: {}", a.out.join("report.html").display());
    Ok(())
}

/// The group-shift test set at a glance: per class, warm-background images | cool ones.
fn test_colour_grid(test: &diffii::data::dataset::Dataset, groups: Option<&Groups>) -> anyhow::Result<Grid> {
    let g = groups.ok_or_else(|| anyhow::anyhow!("the group-shift test set has no groups"))?;
    let pick = |colour: &str| {
        let idx: Vec<usize> = (0..test.items.len()).filter(|&i| g.names[g.of_item[i]].ends_with(colour)).collect();
        diffii::experiment::demo::subset(test, &idx)
    };
    let png = diffii::experiment::demo::class_grid(&pick("-warm"), Some(&pick("-cool")))?;
    Ok(Grid { title: format!("test images: warm backgrounds | cool backgrounds; rows: {}", test.classes.join(", ")), png })
}
