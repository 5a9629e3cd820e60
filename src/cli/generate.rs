//! `diffii generate`: Diff-II synthesis over a dataset (inverting what the cache lacks).
use super::common::{print_summary, GenerateArgs};
use diffii::synth::diffii::generate;
use diffii::synth::driver::manifest_name;

pub type Args = GenerateArgs;

pub fn run(a: Args) -> anyhow::Result<()> {
    let (ds, p, s, opts) = a.prepare()?;
    let summary = generate(&p, &ds, &s, &opts)?;
    print_summary(&summary);
    println!("images in {} ({})", opts.out.display(), manifest_name(opts.shard));
    Ok(())
}
