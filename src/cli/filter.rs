//! `diffii filter`: drop the synthetic images a real-data classifier does not recognise, before
//! training on them; the manifest keeps every record and marks each drop with its reason.
use std::path::PathBuf;

use diffii::classify::train::load_model;
use diffii::experiment::filter;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A `generate` output folder (with manifest.jsonl).
    #[arg(long)]
    pub synthetic: PathBuf,
    /// The judge: a seed folder written by `diffii train` on the real images alone.
    #[arg(long)]
    pub judge: PathBuf,
    /// Drop images the judge gives less than this probability for their class.
    #[arg(long)]
    pub min: f64,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let (model, info) = load_model(&a.judge, &candle_core::Device::Cpu)?;
    let f = filter::apply(&a.synthetic, &model, &info, a.min)?;
    println!(
        "kept {} | dropped {} (confidence below {}: {}, blank: {}) | {} updated",
        f.kept,
        f.dropped(),
        a.min,
        f.dropped_low_confidence,
        f.dropped_blank,
        a.synthetic.join("manifest.jsonl").display()
    );
    Ok(())
}
