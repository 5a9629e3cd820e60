//! The real dataset shipped in the repository: a Fashion-MNIST subset in one safetensors file
//! (made by `scripts/data/make_fashion_mnist.py`; see `data/fashion-mnist/README.md`), read and
//! validated here, and materialised as the ImageFolders the rest of diffii reads.
//!
//! The file keeps labels in Fashion-MNIST's order, while an ImageFolder without a names file
//! sorts its class folders by name (`Ankle_boot` first). So [`materialize`] also writes a
//! `classes.txt` in label order, and the folders must be opened with it (`--class-names`, or
//! [`Materialized::open`]) for class indices to equal the file's labels.
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, ImageEncoder};
use safetensors::{Dtype, SafeTensors};

use crate::data::atomic::write_atomic;
use crate::data::dataset::Dataset;
use crate::error::{Error, Result};

/// The shipped subset: 500 pool and 200 test images per class.
pub const FASHION_MNIST_SUBSET: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/data/fashion-mnist/subset.safetensors");

/// Images are `SIDE` x `SIDE` greyscale.
pub const SIDE: usize = 28;
const PIXELS: usize = SIDE * SIDE;

const REGENERATE: &str =
    "regenerate it with scripts/data/make_fashion_mnist.py (see data/fashion-mnist/README.md)";

/// Images of one split, row-aligned: image `i` has label `labels[i]` and came from index
/// `index[i]` of the official Fashion-MNIST file of that split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    /// Row-major greyscale pixels.
    pub images: Vec<[u8; PIXELS]>,
    /// Index into [`Bundle::classes`].
    pub labels: Vec<usize>,
    pub index: Vec<u32>,
}

/// A subset file's content, as read by [`load`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle {
    /// In label order.
    pub classes: Vec<String>,
    /// Where diffii's protocol draws few-shot training and validation images from.
    pub pool: Split,
    pub test: Split,
}

/// Reads and validates a subset file. Every problem is an error naming the file, never a panic.
pub fn load(path: &Path) -> Result<Bundle> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |msg: String| Error::bad_file(path, format!("{msg}; {REGENERATE}"));
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a readable safetensors file ({e})")))?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a readable safetensors file ({e})")))?;
    let classes_json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("classes"))
        .ok_or_else(|| bad("no `classes` in the metadata".into()))?;
    let classes: Vec<String> = serde_json::from_str(classes_json)
        .map_err(|e| bad(format!("metadata `classes` is not a JSON list of names ({e})")))?;
    check_classes(&classes).map_err(bad)?;
    let split = |name: &str| read_split(&st, name, classes.len()).map_err(&bad);
    Ok(Bundle { pool: split("pool")?, test: split("test")?, classes })
}

fn check_classes(classes: &[String]) -> std::result::Result<(), String> {
    if classes.is_empty() {
        return Err("metadata `classes` is empty".into());
    }
    let mut seen = HashSet::new();
    for c in classes {
        // Names become folder names, and Dataset skips hidden ones.
        let usable = !c.is_empty()
            && !c.starts_with('.')
            && !c.contains(['/', '\\'])
            && !c.chars().any(char::is_control);
        if !usable {
            return Err(format!("class name `{}` cannot be a folder name", c.escape_debug()));
        }
        if !seen.insert(c) {
            return Err(format!("class `{c}` is listed twice"));
        }
    }
    Ok(())
}

fn read_split(st: &SafeTensors, name: &str, n_classes: usize) -> std::result::Result<Split, String> {
    let tensor = |suffix: &str, dtype: Dtype| -> std::result::Result<_, String> {
        let key = format!("{name}_{suffix}");
        let view = st.tensor(&key).map_err(|_| format!("tensor `{key}` is missing"))?;
        if view.dtype() != dtype {
            return Err(format!("tensor `{key}` is {:?}, expected {dtype:?}", view.dtype()));
        }
        Ok((key, view))
    };
    let (images_key, images) = tensor("images", Dtype::U8)?;
    let n = match images.shape() {
        &[n, h, w] if h == SIDE && w == SIDE => n,
        s => return Err(format!("tensor `{images_key}` has shape {s:?}, expected [n, {SIDE}, {SIDE}]")),
    };
    let (labels_key, labels) = tensor("labels", Dtype::U8)?;
    let (index_key, index) = tensor("index", Dtype::U32)?;
    for (key, view) in [(&labels_key, &labels), (&index_key, &index)] {
        if view.shape() != [n] {
            return Err(format!("tensor `{key}` has shape {:?}, expected [{n}] like `{images_key}`", view.shape()));
        }
    }
    let index = index.data().chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let split = Split {
        images: images.data().chunks_exact(PIXELS).map(|px| px.try_into().expect("chunks of PIXELS")).collect(),
        labels: labels.data().iter().map(|&l| l as usize).collect(),
        index,
    };
    check_split(&split, name, n_classes)?;
    Ok(split)
}

fn check_split(split: &Split, name: &str, n_classes: usize) -> std::result::Result<(), String> {
    let n = split.images.len();
    if split.labels.len() != n || split.index.len() != n {
        let (l, i) = (split.labels.len(), split.index.len());
        return Err(format!("the {name} split has {n} images but {l} labels and {i} indices"));
    }
    if let Some(pos) = split.labels.iter().position(|&l| l >= n_classes) {
        let label = split.labels[pos];
        return Err(format!("`{name}_labels`[{pos}] is {label}, but there are only {n_classes} classes"));
    }
    // Indices name the image files, so a repeat would overwrite an image.
    let mut seen = HashSet::new();
    if let Some(&dup) = split.index.iter().find(|&&i| !seen.insert(i)) {
        return Err(format!("`{name}_index` lists index {dup} twice"));
    }
    Ok(())
}

/// The folders written by [`materialize`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Materialized {
    /// `out/pool`: ImageFolder of the pool.
    pub pool: PathBuf,
    /// `out/test`: ImageFolder of the test images.
    pub test: PathBuf,
    /// `out/classes.txt`: the class names in label order; pass it as `--class-names` (or as
    /// `class_names` to [`Dataset::open`]) so that class indices equal the labels.
    pub class_names: PathBuf,
}

impl Materialized {
    /// The pool and test datasets, classes in label order.
    pub fn open(&self) -> Result<(Dataset, Dataset)> {
        let open = |root: &Path| Dataset::image_folder(root, Some(&self.class_names));
        Ok((open(&self.pool)?, open(&self.test)?))
    }
}

/// Writes `out/pool/<class>/<index:05>.png`, `out/test/<class>/<index:05>.png` (greyscale PNGs;
/// the same bundle always gives the same bytes) and `out/classes.txt`.
///
/// Each folder is built under a temporary sibling name and renamed into place when complete, so
/// a killed run leaves no folder that looks finished and the next run simply builds it again.
/// An existing folder is not rewritten: it must hold exactly the expected files, with the
/// expected pixels (which also catches files truncated by a crash after the rename), or the
/// error asks for it to be deleted.
pub fn materialize(bundle: &Bundle, out: &Path) -> Result<Materialized> {
    materialize_with(bundle, out, &|_, split, row| Picture::Grey(split.images[row].to_vec()))
}

/// One image of a materialised folder, [`SIDE`] x [`SIDE`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Picture {
    Grey(Vec<u8>),
    Rgb(Vec<u8>),
}

/// Which split a row being rendered comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitName {
    Pool,
    Test,
}

/// [`materialize`] with each image made by `render(split, its split, row)`: how a variant of the
/// shipped world (e.g. the coloured group-shift one, [`crate::data::shift`]) is written with
/// the same guarantees (temporary folder renamed into place, an existing folder checked pixel
/// by pixel).
pub fn materialize_with(bundle: &Bundle, out: &Path, render: &dyn Fn(SplitName, &Split, usize) -> Picture) -> Result<Materialized> {
    // The fields are public, so a bundle may not come from `load`.
    check_classes(&bundle.classes).map_err(Error::invalid)?;
    for (split, name) in [(&bundle.pool, "pool"), (&bundle.test, "test")] {
        check_split(split, name, bundle.classes.len()).map_err(Error::invalid)?;
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let class_names = out.join("classes.txt");
    let names_text = bundle.classes.iter().map(|c| format!("{c}\n")).collect::<String>();
    match std::fs::read(&class_names) {
        Ok(old) if old == names_text.as_bytes() => {}
        Ok(_) => {
            return Err(Error::bad_file(
                &class_names,
                "lists other classes than this bundle: the folder holds another dataset; delete it \
                 or use another output folder",
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => write_atomic(&class_names, names_text.as_bytes())?,
        Err(e) => return Err(Error::io(&class_names, e)),
    }
    let pool = out.join("pool");
    let test = out.join("test");
    write_split(&bundle.classes, &bundle.pool, &pool, &|row| render(SplitName::Pool, &bundle.pool, row))?;
    write_split(&bundle.classes, &bundle.test, &test, &|row| render(SplitName::Test, &bundle.test, row))?;
    Ok(Materialized { pool, test, class_names })
}

/// `class -> file name -> pixels` of the folder a split becomes.
type Layout<'a> = BTreeMap<&'a str, BTreeMap<String, Picture>>;

fn layout<'a>(classes: &'a [String], split: &Split, render: &dyn Fn(usize) -> Picture) -> Layout<'a> {
    let mut files: Layout = classes.iter().map(|c| (c.as_str(), BTreeMap::new())).collect();
    for (row, (&label, index)) in split.labels.iter().zip(&split.index).enumerate() {
        let class = files.get_mut(classes[label].as_str()).expect("every class has an entry");
        class.insert(format!("{index:05}.png"), render(row));
    }
    files
}

fn write_split(classes: &[String], split: &Split, dir: &Path, render: &dyn Fn(usize) -> Picture) -> Result<()> {
    let files = layout(classes, split, render);
    if dir.exists() {
        return check_folder(dir, &files);
    }
    let (parent, name) = match (dir.parent(), dir.file_name()) {
        (Some(p), Some(n)) => (p, n.to_string_lossy()),
        _ => return Err(Error::invalid(format!("{}: not a folder path", dir.display()))),
    };
    let prefix = format!(".{name}.tmp-");
    remove_stale_dirs(parent, &prefix)?;
    let tmp = parent.join(format!("{prefix}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let built = (|| {
        for (class, images) in &files {
            let class_dir = tmp.join(class);
            std::fs::create_dir_all(&class_dir).map_err(|e| Error::io(&class_dir, e))?;
            for (file, px) in images {
                let path = class_dir.join(file);
                std::fs::write(&path, encode_png(px, &path)?).map_err(|e| Error::io(&path, e))?;
            }
        }
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))
    })();
    if built.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another process may have finished the same folder first; use it if it is right.
        if dir.exists() {
            return check_folder(dir, &files);
        }
    }
    built
}

fn encode_png(picture: &Picture, path: &Path) -> Result<Vec<u8>> {
    let (px, colour) = match picture {
        Picture::Grey(px) => (px, ExtendedColorType::L8),
        Picture::Rgb(px) => (px, ExtendedColorType::Rgb8),
    };
    let mut bytes = Vec::new();
    // Fixed settings and no ancillary chunks: the same pixels always give the same bytes.
    PngEncoder::new_with_quality(&mut bytes, CompressionType::Default, FilterType::Adaptive)
        .write_image(px, SIDE as u32, SIDE as u32, colour)
        .map_err(|e| Error::bad_file(path, format!("cannot encode PNG: {e}")))?;
    Ok(bytes)
}

/// An existing folder is taken as complete only if it holds exactly `files`, with their pixels.
fn check_folder(dir: &Path, files: &Layout) -> Result<()> {
    let wrong = |what: String| {
        Error::bad_file(
            dir,
            format!("exists but does not hold this bundle's images ({what}); delete the folder and run again"),
        )
    };
    let entries = |d: &Path| -> Result<BTreeSet<String>> {
        let mut names = BTreeSet::new();
        for e in std::fs::read_dir(d).map_err(|e| Error::io(d, e))? {
            names.insert(e.map_err(|e| Error::io(d, e))?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    };
    let expected: BTreeSet<String> = files.keys().map(|c| c.to_string()).collect();
    if let Some(diff) = describe_difference(&expected, &entries(dir)?) {
        return Err(wrong(diff));
    }
    for (class, images) in files {
        let class_dir = dir.join(class);
        let expected: BTreeSet<String> = images.keys().cloned().collect();
        if let Some(diff) = describe_difference(&expected, &entries(&class_dir)?) {
            return Err(wrong(format!("in `{class}`: {diff}")));
        }
        for (file, px) in images {
            let path = class_dir.join(file);
            let decoded = image::open(&path).ok().map(|im| match px {
                Picture::Grey(_) => Picture::Grey(im.into_luma8().into_raw()),
                Picture::Rgb(_) => Picture::Rgb(im.into_rgb8().into_raw()),
            });
            if decoded.as_ref() != Some(px) {
                return Err(wrong(format!("`{class}/{file}` is unreadable or has other pixels")));
            }
        }
    }
    Ok(())
}

fn describe_difference(expected: &BTreeSet<String>, found: &BTreeSet<String>) -> Option<String> {
    let missing = expected.difference(found).next();
    let extra = found.difference(expected).next();
    match (missing, extra) {
        (None, None) => None,
        (Some(m), _) => Some(format!("`{m}` is missing")),
        (None, Some(x)) => Some(format!("`{x}` is not expected")),
    }
}

/// Removes `dir/<prefix><pid>` folders whose process no longer runs (left by a killed run);
/// where liveness cannot be checked (no `/proc`), nothing is removed.
fn remove_stale_dirs(dir: &Path, prefix: &str) -> Result<()> {
    if !Path::new("/proc/self").exists() {
        return Ok(());
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    for e in entries.flatten() {
        let name = e.file_name();
        let pid = name.to_str().and_then(|n| n.strip_prefix(prefix)).and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let p = e.path();
            std::fs::remove_dir_all(&p).map_err(|err| Error::io(&p, err))?;
        }
    }
    Ok(())
}
