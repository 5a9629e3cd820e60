//! `diffii merge`: combine the shard manifests of a run into one manifest.jsonl.
use std::path::PathBuf;

use anyhow::{bail, Context};
use diffii::diffii::manifest;

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
    let inputs = if a.inputs.is_empty() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&a.out)
            .with_context(|| format!("reading {}", a.out.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("manifest.shard-") && n.ends_with(".jsonl")))
            .collect();
        v.sort();
        v
    } else {
        a.inputs.clone()
    };
    if inputs.is_empty() {
        bail!("{}: no manifest.shard-*.jsonl files to merge", a.out.display());
    }
    // Every shard of an n-way split must be present.
    let counts: std::collections::BTreeSet<String> = inputs
        .iter()
        .filter_map(|p| p.file_name()?.to_str()?.rsplit_once("-of-").map(|(_, n)| n.trim_end_matches(".jsonl").to_string()))
        .collect();
    if let (1, Some(n)) = (counts.len(), counts.iter().next().and_then(|n| n.parse::<usize>().ok())) {
        if inputs.len() != n {
            bail!("found {} of {n} shard manifests in {}: wait for the missing shards or rerun them", inputs.len(), a.out.display());
        }
    }
    let records = manifest::merge(&inputs)?;
    let path = a.out.join(manifest::MANIFEST);
    diffii::data::atomic::write_atomic(&path, manifest::to_jsonl(&records)?.as_bytes())?;
    println!("merged {} manifests: {} records -> {}", inputs.len(), records.len(), path.display());
    Ok(())
}
