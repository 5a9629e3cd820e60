//! `diffii eval`: the accuracy of a classifier trained by `diffii train` on a labelled set,
//! overall and per class.
use std::path::PathBuf;

use diffii::classify::data::ImageSet;
use diffii::classify::train::{evaluate, load_model};
use diffii::data::dataset::Dataset;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A seed folder written by `diffii train` (holds model.safetensors and model.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Labelled images (ImageFolder or list file) with the model's classes.
    #[arg(long)]
    pub data: PathBuf,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let (model, info) = load_model(&a.model)?;
    let ds = Dataset::open(&a.data, None)?;
    if ds.classes != info.classes {
        anyhow::bail!("{}: classes {:?} differ from the model's {:?}", a.data.display(), ds.classes, info.classes);
    }
    let all: Vec<usize> = (0..ds.items.len()).collect();
    let set = ImageSet::load(&ds, &all, info.size, info.resize)?;
    println!("accuracy {:.2} % on {} images", 100.0 * evaluate(&model, &set)?, set.len());
    for (c, idx) in set.by_class(ds.classes.len()).iter().enumerate() {
        if idx.is_empty() {
            continue;
        }
        let sub = ImageSet {
            side: set.side,
            pixels: idx.iter().map(|&i| set.pixels[i].clone()).collect(),
            labels: idx.iter().map(|&i| set.labels[i]).collect(),
            names: Vec::new(),
        };
        println!("  {:<24} {:6.2} % ({} images)", ds.classes[c], 100.0 * evaluate(&model, &sub)?, sub.len());
    }
    Ok(())
}
