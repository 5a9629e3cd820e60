//! `diffii eval`: the accuracy of a classifier trained by `diffii train` on a labelled set,
//! overall and per class.
use std::path::PathBuf;

use diffii::classify::data::ImageSet;
use diffii::classify::train::{count_correct, load_model};
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
    // One pass per class (items are sorted by class); the overall figure is their sum.
    let mut per_class = Vec::new();
    for (c, items) in ds.class_members().iter().enumerate() {
        if items.is_empty() {
            continue;
        }
        let set = ImageSet::load(&ds, items, info.size, info.resize)?;
        per_class.push((c, count_correct(&model, &set.pixels, &set.labels, set.side)?, set.len()));
    }
    let (correct, total) = per_class.iter().fold((0, 0), |(a, b), &(_, c, n)| (a + c, b + n));
    if total == 0 {
        anyhow::bail!("{}: no images to evaluate", a.data.display());
    }
    println!("accuracy {:.2} % on {total} images", 100.0 * correct as f64 / total as f64);
    for (c, k, n) in per_class {
        println!("  {:<24} {:6.2} % ({n} images)", ds.classes[c], 100.0 * k as f64 / n as f64);
    }
    Ok(())
}
