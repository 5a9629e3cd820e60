//! `diffii invert`: DDIM-invert every image of a dataset into the inversion cache.
use std::collections::BTreeSet;

use super::common::{load_dataset, load_pipeline, settings, DataArgs, GenArgs, InvertArgs, ModelArgs, RunArgs};
use diffii::diffii::generate::{invert_items, Summary};

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
    let ds = load_dataset(&a.data)?;
    let p = load_pipeline(&a.model)?;
    let gen = GenArgs::from_invert(a.invert.clone());
    let s = settings(&gen, &p)?;
    let opts = a.run.options();
    // Shards split the images to invert the same way they split samples: by position.
    let wanted: BTreeSet<usize> = (0..ds.items.len()).filter(|i| i % opts.shard.count == opts.shard.index).collect();
    let mut summary = Summary::default();
    invert_items(&p, &ds, &s, &opts, &wanted, &mut summary)?;
    summary.peak_rss_mib = diffii::instrument::peak_rss_mib();
    super::common::print_summary(&summary);
    println!("inversions cached in {}", opts.cache.display());
    Ok(())
}
