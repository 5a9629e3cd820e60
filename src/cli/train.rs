//! `diffii train`: train a classifier on real images (plus an optional synthetic set) for each
//! seed and report test accuracy at the validation-selected and at the last epoch.
use std::path::PathBuf;

use clap::ValueEnum;
use diffii::classify::data::{synthetic_dataset, Augment};
use diffii::classify::groups::{GroupSummary, Groups};
use diffii::classify::mix::ClassDraw;
use diffii::classify::protocol::SplitSpec;
use diffii::classify::train::{train_seed, Arch, ClassifierSettings, Results, RunData, SeedResult};
use diffii::data::atomic::{write_json_atomic, write_or_match_settings};
use diffii::data::dataset::Dataset;
use diffii::data::lock::{lock_output, Scope};

use super::common::{DataArgs, ResizeArg};

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClassDrawArg {
    /// A replacement has the real sample's class (few-shot).
    Same,
    /// A replacement's class is drawn with probability proportional to 1 / (n_c + 1) (long tail).
    InverseFrequency,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub data: DataArgs,
    /// Synthetic images: a `generate` output folder (its manifest.jsonl lists them) or any
    /// ImageFolder whose class folders are training classes.
    #[arg(long)]
    pub synthetic: Option<PathBuf>,
    /// Test images (ImageFolder or list file with the training classes).
    #[arg(long)]
    pub test: Option<PathBuf>,
    /// Group shift: a file of `<test image> <group>` lines giving every test image a group
    /// (image paths relative to the test set); adds per-group, group-mean and worst-group accuracy.
    #[arg(long, requires = "test")]
    pub test_groups: Option<PathBuf>,
    /// Output folder: seed-<s>/ (model, history) per seed and results.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Seeds, comma-separated: one run each; results give mean +- std over them.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub seeds: Vec<u64>,
    #[command(flatten)]
    pub classifier: ClassifierArgs,
    /// Where to train: cpu, cuda or cuda:N (CUDA needs a `--features cuda` build; the same bytes
    /// for any thread count hold on the CPU).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Hide progress bars.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArchArg {
    Small,
    Resnet50,
}

/// The classifier's settings (shared by `train` and `compare`).
#[derive(clap::Args, Debug, Clone)]
pub struct ClassifierArgs {
    /// Passes over the real training images (default 30; `demo`: 60).
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 32)]
    pub size: usize,
    /// How to make a non-square image square.
    #[arg(long, value_enum, default_value = "squash")]
    pub resize: ResizeArg,
    /// The network: the small ResNet trained from scratch, or torchvision's ResNet-50 (with
    /// --pretrained: fine-tuned from ImageNet weights; use --size 224).
    #[arg(long, value_enum, default_value = "small")]
    pub arch: ArchArg,
    /// ResNet-50 weights to start from: a torchvision or timm checkpoint saved as safetensors
    /// (the head is replaced when the class count differs).
    #[arg(long)]
    pub pretrained: Option<PathBuf>,
    /// Basic blocks per stage of the small ResNet (1: 8 layers; 3: ResNet-20).
    #[arg(long, default_value_t = 1)]
    pub depth: usize,
    /// Peak learning rate (SGD).
    #[arg(long, default_value_t = 0.1)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// Plain momentum instead of Nesterov's.
    #[arg(long)]
    pub no_nesterov: bool,
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.1)]
    pub label_smoothing: f64,
    /// Epochs of linear learning-rate warm-up before the cosine decay.
    #[arg(long, default_value_t = 2)]
    pub warmup_epochs: usize,
    /// Random horizontal flips (only if mirroring preserves the label).
    #[arg(long)]
    pub flip: bool,
    /// Add the classic augmentation: random rotation (up to 15 degrees) and colour jitter.
    #[arg(long)]
    pub classic: bool,
    /// Smallest area fraction of the random resized crop (1 = no cropping).
    #[arg(long, default_value_t = 0.35)]
    pub crop_scale: f64,
    /// Validation images per class, taken from the training data: they select the epoch.
    #[arg(long, default_value_t = 5)]
    pub val_per_class: usize,
    /// Few-shot: train on k images per class, drawn per seed from the rest.
    #[arg(long)]
    pub shots: Option<usize>,
    /// Long tail: class c keeps m * r^(c / (C - 1)) images (e.g. 0.01).
    #[arg(long)]
    pub imbalance: Option<f64>,
    /// Probability that a real draw is replaced by a synthetic image.
    #[arg(long, default_value_t = 0.5)]
    pub syn_p: f64,
    /// The class of a replacement (default: `inverse-frequency` for a long tail, i.e. with
    /// --imbalance, else `same`).
    #[arg(long, value_enum)]
    pub class_draw: Option<ClassDrawArg>,
}

impl ClassifierArgs {
    /// `--class-draw`, or its default for a long-tailed (`long_tail`) or other split.
    pub fn class_draw(&self, long_tail: bool) -> ClassDraw {
        match self.class_draw {
            Some(ClassDrawArg::Same) => ClassDraw::Same,
            Some(ClassDrawArg::InverseFrequency) => ClassDraw::InverseFrequency,
            None if long_tail => ClassDraw::InverseFrequency,
            None => ClassDraw::Same,
        }
    }

    pub fn settings(&self) -> ClassifierSettings {
        ClassifierSettings {
            arch: match self.arch {
                ArchArg::Small => Arch::Small,
                ArchArg::Resnet50 => Arch::Resnet50,
            },
            pretrained: self.pretrained.clone(),
            depth: self.depth,
            size: self.size,
            resize: self.resize.into(),
            epochs: self.epochs.unwrap_or(30),
            batch: self.batch,
            lr: self.lr,
            momentum: self.momentum,
            nesterov: !self.no_nesterov,
            weight_decay: self.weight_decay,
            label_smoothing: self.label_smoothing,
            warmup_epochs: self.warmup_epochs,
            augment: Augment { crop_scale: (self.crop_scale, 1.0), flip: self.flip, classic: self.classic, ..Augment::default() },
            split: SplitSpec { val_per_class: self.val_per_class, shots: self.shots, imbalance: self.imbalance },
            syn_p: self.syn_p,
            class_draw: self.class_draw(self.imbalance.is_some()),
        }
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let s = a.classifier.settings();
    s.check()?;
    if a.seeds.is_empty() {
        anyhow::bail!("--seeds needs at least one seed");
    }
    let device = diffii::sd::loader::parse_device(&a.device)?;
    let train = Dataset::open(&a.data.data, a.data.class_names.as_deref())?;
    let synthetic = a.synthetic.as_deref().map(|d| synthetic_dataset(d, &train.classes)).transpose()?;
    let test = a.test.as_deref().map(|t| Dataset::open(t, a.data.class_names.as_deref())).transpose()?;
    let groups = match (&a.test_groups, &test) {
        (Some(path), Some(test)) => Some(Groups::read(path, test)?),
        _ => None,
    };
    let data = RunData { train: &train, synthetic: synthetic.as_ref(), test: test.as_ref(), test_groups: groups.as_ref() };
    let _lock = lock_output(&a.out, Scope::Whole)?;
    write_or_match_settings(a.out.join("train_config.json"), &s, "a classifier run")?;
    // A finished seed's numbers were measured on these groups (or on none).
    write_or_match_settings(a.out.join("test_groups.json"), &groups.as_ref().map(Groups::fingerprint), "a classifier run")?;
    let mut seeds = Vec::new();
    for &seed in &a.seeds {
        let dir = a.out.join(format!("seed-{seed}"));
        let done = dir.join("result.json");
        // A finished seed is kept: its settings are those of train_config.json.
        let r: SeedResult = match diffii::error::read_json(&done) {
            Ok(r) if done.is_file() => {
                eprintln!("[diffii] seed {seed}: already done");
                r
            }
            _ => {
                let r = train_seed(&data, &s, seed, &dir, &device, !a.quiet)?;
                write_json_atomic(&done, &r)?;
                r
            }
        };
        println!(
            "seed {seed}: {} real + {} synthetic images, selected epoch {} (val {}), test {} (last epoch {}), {:.0} s",
            r.train_images,
            r.synthetic_images,
            r.selected_epoch,
            pct(r.val_acc_selected),
            pct(r.test_acc_selected),
            pct(r.test_acc_last),
            r.seconds
        );
        seeds.push(r);
    }
    let results = Results::new(s, [Some(a.data.data.clone()), a.synthetic.clone(), a.test.clone()], seeds);
    write_json_atomic(a.out.join("results.json"), &results)?;
    if a.test.is_some() {
        let ((m, sd), (lm, lsd)) = (results.test_acc_selected, results.test_acc_last);
        println!(
            "test accuracy over {} seed(s): {:.2} +- {:.2} % (validation-selected epoch), {:.2} +- {:.2} % (last epoch)",
            results.seeds.len(),
            100.0 * m,
            100.0 * sd,
            100.0 * lm,
            100.0 * lsd
        );
    }
    if let Some(g) = &results.groups {
        print!("{}", group_lines(g));
    }
    println!("results in {}", a.out.join("results.json").display());
    Ok(())
}

/// Worst-group, group-mean and per-group accuracy, one line each (also used by `eval`).
pub fn group_lines(g: &GroupSummary) -> String {
    let pm = |(m, s): (f64, f64)| format!("{:.2} +- {:.2} %", 100.0 * m, 100.0 * s);
    let mut out = format!("worst-group accuracy {} (validation-selected epoch), {} (last epoch); group mean {}\n", pm(g.worst_selected), pm(g.worst_last), pm(g.mean_selected));
    for (name, acc) in &g.per_group_selected {
        out.push_str(&format!("  group {name:<20} {}\n", pm(*acc)));
    }
    out
}

fn pct(v: Option<f64>) -> String {
    v.map(|v| format!("{:.2} %", 100.0 * v)).unwrap_or_else(|| "-".into())
}
