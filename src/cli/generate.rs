//! `diffii generate`: Diff-II synthesis over a dataset (inverting what the cache lacks).
use super::common::{load_dataset, load_pipeline, print_summary, settings, DataArgs, GenArgs, ModelArgs, RunArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub gen: GenArgs,
    #[command(flatten)]
    pub run: RunArgs,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let ds = load_dataset(&a.data)?;
    let p = load_pipeline(&a.model)?;
    let s = settings(&a.gen, &p)?;
    let opts = a.run.options();
    let summary = diffii::diffii::generate::generate(&p, &ds, &s, &opts)?;
    print_summary(&summary);
    println!(
        "images in {} ({})",
        opts.out.display(),
        diffii::diffii::generate::manifest_name(opts.shard)
    );
    Ok(())
}
