//! `diffii generate`: synthesis over a dataset with Diff-II (inverting what the cache lacks) or
//! a baseline method.
use super::common::{print_summary, GenerateArgs, MethodSettings};
use diffii::synth::driver::manifest_name;

pub type Args = GenerateArgs;

pub fn run(a: Args) -> anyhow::Result<()> {
    let (ds, p, s, opts) = a.prepare()?;
    let summary = match &s {
        MethodSettings::Diffii(s) => diffii::synth::diffii::generate(&p, &ds, s, &opts)?,
        MethodSettings::Baseline(s) => diffii::synth::img2img::generate(&p, &ds, s, &opts)?,
    };
    print_summary(&summary);
    println!("images in {} ({})", opts.out.display(), manifest_name(opts.shard));
    Ok(())
}
