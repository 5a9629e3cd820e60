//! `diffii eval`: the accuracy of a classifier trained by `diffii train` on a labelled set,
//! overall, per class and, with a group file, per group.
use std::path::PathBuf;

use diffii::classify::data::ImageSet;
use diffii::classify::groups::Groups;
use diffii::classify::train::{correct_each, load_model};
use diffii::data::dataset::Dataset;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A seed folder written by `diffii train` (holds model.safetensors and model.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Labelled images (ImageFolder or list file) with the model's classes.
    #[arg(long)]
    pub data: PathBuf,
    /// Group shift: a file of `<image> <group>` lines giving every image of --data a group
    /// (paths relative to it); adds per-group, group-mean and worst-group accuracy.
    #[arg(long)]
    pub groups: Option<PathBuf>,
    /// Where to run: cpu, cuda or cuda:N (CUDA needs a `--features cuda` build).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let (model, info) = load_model(&a.model, &diffii::sd::loader::parse_device(&a.device)?)?;
    let ds = Dataset::open(&a.data, None)?;
    if ds.classes != info.classes {
        anyhow::bail!("{}: classes {:?} differ from the model's {:?}", a.data.display(), ds.classes, info.classes);
    }
    let groups = a.groups.as_deref().map(|g| Groups::read(g, &ds)).transpose()?;
    // One pass per class (items are sorted by class, so the flags follow the item order).
    let mut per_class = Vec::new();
    let mut correct = Vec::with_capacity(ds.items.len());
    for (c, items) in ds.class_members().iter().enumerate() {
        if items.is_empty() {
            continue;
        }
        let set = ImageSet::load(&ds, items, info.size, info.resize)?;
        let flags = correct_each(&model, &set.pixels, &set.labels, set.side)?;
        per_class.push((c, flags.iter().filter(|&&ok| ok).count(), set.len()));
        correct.extend(flags);
    }
    let total = correct.len();
    if total == 0 {
        anyhow::bail!("{}: no images to evaluate", a.data.display());
    }
    let hits = correct.iter().filter(|&&ok| ok).count();
    println!("accuracy {:.2} % on {total} images", 100.0 * hits as f64 / total as f64);
    for (c, k, n) in per_class {
        println!("  {:<24} {:6.2} % ({n} images)", ds.classes[c], 100.0 * k as f64 / n as f64);
    }
    if let Some(g) = groups {
        let acc = g.accuracy(&correct)?;
        println!("worst-group accuracy {:.2} %, group mean {:.2} %", 100.0 * acc.worst, 100.0 * acc.mean);
        for s in &acc.groups {
            println!("  group {:<18} {:6.2} % ({} images)", s.name, 100.0 * s.accuracy, s.images);
        }
    }
    Ok(())
}
