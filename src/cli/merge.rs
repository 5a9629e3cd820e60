//! `diffii merge`: combine the shard manifests of a run into one manifest.jsonl.
use std::path::PathBuf;

use diffii::synth::driver::merge_shards;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The output folder the shards wrote into (holds manifest.shard-*-of-*.jsonl).
    #[arg(long)]
    pub out: PathBuf,
    /// Shard manifests to merge (default: every manifest.shard-*.jsonl in --out).
    #[arg(long, num_args = 1..)]
    pub inputs: Vec<PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let (inputs, n) = merge_shards(&a.out, &a.inputs)?;
    println!("merged {} manifests: {} records -> {}", inputs.len(), n, a.out.join(diffii::synth::manifest::MANIFEST).display());
    Ok(())
}
