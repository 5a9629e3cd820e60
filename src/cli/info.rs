//! `diffii info`: what is in a model folder.
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// diffusers SD-1.x model folder.
    #[arg(long)]
    pub model: PathBuf,
}

pub fn run(_a: Args) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
