//! `diffii pretrain`: train a small SD-1.x model from scratch on an image folder.
use std::path::PathBuf;

use diffii::data::dataset::Dataset;
use diffii::train::pretrain::{Architecture, Cadence, PretrainSettings};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Training images: an ImageFolder (root/<any folder>/<image>) or a list file. Labels are
    /// ignored: captions are computed from the pixels and never name a class.
    #[arg(long)]
    pub data: PathBuf,
    /// Output folder: checkpoints, loss logs, sample grids, and the model in OUT/model/.
    #[arg(long)]
    pub out: PathBuf,
    /// Network sizes: `demo` (32 px, 5 M parameters) or `tiny` (16 px, for tests).
    #[arg(long, default_value = "demo")]
    pub arch: String,
    /// UNet widths per level, e.g. `64,128` (overrides the preset).
    #[arg(long, value_delimiter = ',')]
    pub unet_channels: Option<Vec<usize>>,
    /// Attention heads of the UNet (overrides the preset).
    #[arg(long)]
    pub unet_heads: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// VAE optimisation steps.
    #[arg(long)]
    pub vae_steps: Option<usize>,
    #[arg(long)]
    pub vae_batch: Option<usize>,
    #[arg(long)]
    pub vae_lr: Option<f64>,
    /// UNet + text-encoder optimisation steps.
    #[arg(long)]
    pub unet_steps: Option<usize>,
    #[arg(long)]
    pub unet_batch: Option<usize>,
    #[arg(long)]
    pub unet_lr: Option<f64>,
    /// Learning-rate warm-up steps of the UNet phase.
    #[arg(long)]
    pub unet_warmup: Option<usize>,
    /// EMA decay of the exported UNet and text encoder.
    #[arg(long)]
    pub ema_decay: Option<f64>,
    /// Screen-blend every image with a colour drawn per image from the group-shift world's six
    /// background colours (after its caption is computed, so captions never mention colour):
    /// trains the RGB generator of `diffii demo --protocol ood`.
    #[arg(long)]
    pub coloured_backgrounds: bool,
    /// Save a resumable checkpoint every N steps (a killed run continues from the last one).
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: usize,
    /// Write a sample grid every N UNet steps (OUT/grids/).
    #[arg(long, default_value_t = 250)]
    pub sample_every: usize,
    /// Classifier-free guidance of the sample grids.
    #[arg(long, default_value_t = 2.0)]
    pub sample_guidance: f64,
    /// Stop after N steps of the current phase (resume later with the same command).
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Hide progress bars.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut s = PretrainSettings::demo();
    s.arch = Architecture::preset(&a.arch)?;
    s.seed = a.seed;
    if let Some(c) = a.unet_channels {
        s.arch.unet_channels = c;
    }
    s.arch.unet_heads = a.unet_heads.unwrap_or(s.arch.unet_heads);
    s.vae.steps = a.vae_steps.unwrap_or(s.vae.steps);
    s.vae.batch = a.vae_batch.unwrap_or(s.vae.batch);
    s.vae.lr = a.vae_lr.unwrap_or(s.vae.lr);
    s.unet.steps = a.unet_steps.unwrap_or(s.unet.steps);
    s.unet.batch = a.unet_batch.unwrap_or(s.unet.batch);
    s.unet.lr = a.unet_lr.unwrap_or(s.unet.lr);
    s.unet.warmup = a.unet_warmup.unwrap_or(s.unet.warmup).min(s.unet.steps);
    s.vae.warmup = s.vae.warmup.min(s.vae.steps);
    s.ema_decay = a.ema_decay.unwrap_or(s.ema_decay);
    if a.coloured_backgrounds {
        s.background_colours = diffii::data::shift::palette();
    }
    if a.checkpoint_every == 0 || a.sample_every == 0 {
        anyhow::bail!("--checkpoint-every and --sample-every must be at least 1");
    }
    let cadence = Cadence {
        checkpoint_every: a.checkpoint_every,
        sample_every: a.sample_every,
        sample_guidance: a.sample_guidance,
        progress: !a.quiet,
        stop_after: a.stop_after,
        ..Cadence::default()
    };
    let ds = Dataset::open(&a.data, None)?;
    eprintln!("pretraining on {} images from {}", ds.items.len(), a.data.display());
    let _lock = diffii::data::lock::lock_output(&a.out, diffii::data::lock::Scope::Whole)?;
    let r = diffii::train::pretrain::run(&ds, &s, &cadence, &a.out)?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    if !r.finished {
        eprintln!("stopped early; rerun the same command to continue");
    }
    Ok(())
}
