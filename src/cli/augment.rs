//! `diffii augment`: the whole pipeline in one command — invert every image of the dataset
//! (cached), then generate the synthetic set.
use super::common::{print_summary, GenerateArgs};
use diffii::synth::diffii::augment;
use diffii::synth::driver::manifest_name;

pub type Args = GenerateArgs;

pub fn run(a: Args) -> anyhow::Result<()> {
    let (ds, p, s, opts) = a.prepare()?;
    let summary = augment(&p, &ds, &s, &opts)?;
    print_summary(&summary);
    println!("images in {} ({})", opts.out.display(), manifest_name(opts.shard));
    Ok(())
}
