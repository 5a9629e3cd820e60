//! `diffii invert`: DDIM-invert every image of a dataset into the inversion cache.
use super::common::{load_dataset, load_pipeline, DataArgs, InvertArgs, ModelArgs, RunArgs};
use diffii::synth::invert::{invert_dataset, Inversion};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub invert: InvertArgs,
    #[command(flatten)]
    pub run: RunArgs,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let opts = a.run.options()?;
    let ds = load_dataset(&a.data)?;
    let p = load_pipeline(&a.model)?;
    let inv = Inversion::resolve(&a.invert.request(), &p)?;
    let summary = invert_dataset(&p, &ds, &inv, &opts)?;
    super::common::print_summary(&summary);
    println!("inversions cached in {}", opts.cache.display());
    Ok(())
}
