//! `diffii augment`: the whole pipeline in one command — invert every image of the dataset
//! (cached), then generate the synthetic set.
use std::collections::BTreeSet;

use super::common::{print_summary, GenerateArgs};
use diffii::diffii::generate::{generate, invert_items, manifest_name, Summary};

pub type Args = GenerateArgs;

pub fn run(a: Args) -> anyhow::Result<()> {
    let (ds, p, s, opts) = a.prepare()?;
    // Invert this shard's share of all images up front so a later `generate` with other
    // sampling settings (more samples, another seed) finds every inversion cached.
    let all: BTreeSet<usize> = (0..ds.items.len()).filter(|i| i % opts.shard.count == opts.shard.index).collect();
    let mut first = Summary::default();
    invert_items(&p, &ds, &s, &opts, &all, &mut first)?;
    let mut summary = generate(&p, &ds, &s, &opts)?;
    summary.inverted += first.inverted;
    summary.inversion_cache_hits = first.inversion_cache_hits;
    summary.inversion_cache_stale += first.inversion_cache_stale;
    summary.seconds_inversion += first.seconds_inversion;
    summary.notes.splice(0..0, first.notes);
    print_summary(&summary);
    println!("images in {} ({})", opts.out.display(), manifest_name(opts.shard));
    Ok(())
}
