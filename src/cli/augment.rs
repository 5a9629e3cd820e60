//! `diffii augment`: the whole pipeline in one command — for Diff-II, invert every image of the
//! dataset (cached), then generate the synthetic set; a baseline just generates.
use super::common::{print_summary, GenerateArgs, MethodSettings};
use diffii::synth::driver::manifest_name;

pub type Args = GenerateArgs;

pub fn run(a: Args) -> anyhow::Result<()> {
    let (ds, p, s, opts) = a.prepare()?;
    let summary = match &s {
        MethodSettings::Diffii(s) => diffii::synth::diffii::augment(&p, &ds, s, &opts)?,
        MethodSettings::Baseline(s) => diffii::synth::img2img::generate(&p, &ds, s, &opts)?,
    };
    print_summary(&summary);
    println!("images in {} ({})", opts.out.display(), manifest_name(opts.shard));
    Ok(())
}
