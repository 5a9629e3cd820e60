//! `diffii info`: what is in a model folder, read from its configs and safetensors headers
//! (no weights are loaded, so this is instant even for a full-size model).
use std::path::PathBuf;

use diffii::sd::inspect::inspect;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// diffusers SD-1.x model folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Print the description as JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    // Library errors already name the offending file or folder.
    let info = inspect(&a.model)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        print!("{info}");
    }
    Ok(())
}
