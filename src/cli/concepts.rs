//! `diffii concepts`: learn one concept token per class (textual inversion, optionally with a
//! LoRA on the UNet attention projections) from the user's image folder.
use std::path::PathBuf;

use clap::ValueEnum;
use diffii::train::concepts::{
    imagenet_templates, load_model, TrainMode, TrainOptions, TrainRequest, TrainSettings, Trainer, DEFAULT_TEMPLATE,
};
use diffii::data::lock::{lock_output, Scope};

use super::common::{load_dataset, DataArgs, ResizeArg};

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeArg {
    /// All class tokens (and the LoRA) in one run, batches from the whole dataset.
    Joint,
    /// One token at a time, --steps steps each, batches from that class.
    PerClass,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemplatesArg {
    /// One template: --template (default "a photo of a {concept} {superclass}").
    Single,
    /// The standard textual-inversion list ("a rendering of a ...", "a cropped photo of the ...", 27 in all).
    Imagenet,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConceptPreset {
    /// The Diff-Mix recipe of the official Diff-II release: joint, LoRA rank 10, lr 5e-5 for
    /// tokens and LoRA, batch 2, 224 px, 35000 steps.
    Official,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// diffusers SD-1.x model folder (safetensors weights).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    /// Output folder (learned_embeds.safetensors, concepts.json, LoRA, loss.csv, config).
    #[arg(long)]
    pub out: PathBuf,
    /// Apply a named set of settings; explicit flags still override it.
    #[arg(long, value_enum)]
    pub preset: Option<ConceptPreset>,
    /// JSON map from class name to the token to learn for it (default `<class_0>`, `<class_1>`, ...).
    #[arg(long)]
    pub class_map: Option<PathBuf>,
    /// The word naming what every class is (e.g. "bird"); used in prompts and as the default
    /// initialisation.
    #[arg(long, default_value = "")]
    pub superclass: String,
    /// Word whose embedding initialises every token (default: the superclass; several BPE
    /// tokens are averaged).
    #[arg(long)]
    pub init_word: Option<String>,
    /// Initialise the tokens from an earlier run's learned_embeds.safetensors instead of
    /// --init-word (e.g. tokens learned alone, then tuned with --lora-rank)
    #[arg(long)]
    pub init_embeds: Option<PathBuf>,
    /// Prompt template with {concept} and {superclass}.
    #[arg(long, default_value = DEFAULT_TEMPLATE)]
    pub template: String,
    /// Which prompt templates to draw from.
    #[arg(long, value_enum, default_value = "single")]
    pub templates: TemplatesArg,
    /// Train all classes jointly or one at a time (default joint).
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// Optimiser steps (per class in per-class mode) (default 3000; official 35000).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Images per micro-batch (default 1; official 2).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Micro-batches accumulated per optimiser step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Learning rate of the token rows (default 5e-4; official 5e-5).
    #[arg(long)]
    pub lr: Option<f64>,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 1e-2)]
    pub weight_decay: f64,
    /// Also train a LoRA of this rank on the UNet attention projections (0 = off; official 10).
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// LoRA alpha (scale = alpha / rank; default = rank).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Learning rate of the LoRA matrices (default 5e-5).
    #[arg(long)]
    pub lora_lr: Option<f64>,
    /// Training resolution in pixels (default: the model's native size; official 224).
    #[arg(long)]
    pub resolution: Option<usize>,
    /// How to make a non-square image square.
    #[arg(long, value_enum, default_value = "squash")]
    pub resize: ResizeArg,
    /// Random horizontal flips.
    #[arg(long)]
    pub flip: bool,
    /// Random crops (of the image resized to 9/8 of the resolution).
    #[arg(long)]
    pub random_crop: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to run: cpu, cuda or cuda:N (CUDA needs a `--features cuda` build).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Write a resumable checkpoint every N steps (0 = only at the end of each class).
    #[arg(long, default_value_t = 500)]
    pub checkpoint_every: usize,
    /// Continue an interrupted run in --out from its last checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many steps in total (checkpointed; finish later with --resume).
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Hide progress bars.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let ds = load_dataset(&a.data)?;
    eprintln!("[diffii] loading {}", a.model.display());
    let mut sd = load_model(&a.model, &a.device)?;
    let request = TrainRequest {
        official: a.preset == Some(ConceptPreset::Official),
        class_map: a.class_map.clone(),
        superclass: a.superclass.clone(),
        init_word: a.init_word.clone(),
        init_embeds: a.init_embeds.clone(),
        templates: match a.templates {
            TemplatesArg::Single => vec![a.template.clone()],
            TemplatesArg::Imagenet => imagenet_templates(),
        },
        mode: a.mode.map(|m| match m {
            ModeArg::Joint => TrainMode::Joint,
            ModeArg::PerClass => TrainMode::PerClass,
        }),
        steps: a.steps,
        batch: a.batch,
        grad_accum: a.grad_accum,
        lr: a.lr,
        weight_decay: a.weight_decay,
        lora_rank: a.lora_rank,
        lora_alpha: a.lora_alpha,
        lora_lr: a.lora_lr,
        resolution: a.resolution,
        resize: a.resize.into(),
        flip: a.flip,
        random_crop: a.random_crop,
        seed: a.seed,
        checkpoint_every: a.checkpoint_every,
    };
    eprintln!("[diffii] hashing {} images", ds.items.len());
    let settings = TrainSettings::resolve(&request, &sd, &ds)?;
    let mut trainer = Trainer::new(&mut sd, &ds, settings, !a.quiet)?;
    let run = TrainOptions { out: a.out.clone(), resume: a.resume, progress: !a.quiet, stop_after: a.stop_after };
    let _lock = lock_output(&a.out, Scope::Whole)?;
    let s = trainer.run(&run)?;
    for n in &s.notes {
        eprintln!("note: {n}");
    }
    println!(
        "steps {}/{} (resumed at {}), {:.1} s ({:.3} s/step), loss {:.4} -> {:.4} (first / last tenth), peak memory {:.0} MiB",
        s.resumed_from + s.steps_done,
        s.steps_total,
        s.resumed_from,
        s.seconds,
        s.seconds_per_step,
        s.loss_first,
        s.loss_last,
        s.peak_rss_mib
    );
    if s.finished {
        println!("concepts in {} (use: --concepts {})", a.out.display(), a.out.join("learned_embeds.safetensors").display());
    } else {
        println!("stopped early; continue with the same command plus --resume");
    }
    Ok(())
}
