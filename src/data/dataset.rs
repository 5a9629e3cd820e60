//! Labelled image datasets: an ImageFolder tree (`root/<class>/<image>`) or a list file of
//! `path label` lines, with class names taken from the folders / labels or from a names file.
//!
//! Everything downstream (concept learning, inversion caches, pair plans, shards, manifests)
//! indexes images by class and position, so the order here must not depend on the filesystem:
//! classes come from a names file or are sorted, and items are sorted by (class, `rel`). `rel`
//! is the path relative to the dataset root with `/` separators and serves as the stable image id
//! in manifests. Problems are reported all at once where possible, naming the file (and line) to
//! fix, because a bad dataset is usually found before hours of GPU time, not during them.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// File extensions taken as images (compared case-insensitively).
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp", "webp", "tif", "tiff"];

/// Whether `path` has one of [`IMAGE_EXTENSIONS`].
pub fn is_image_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

fn is_hidden(name: &str) -> bool {
    name.starts_with('.')
}

/// One labelled image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    /// Where to read the image.
    pub path: PathBuf,
    /// Path relative to the dataset root (or the list file's folder), `/`-separated: the image's
    /// stable id.
    pub rel: String,
    /// Index into [`Dataset::classes`].
    pub class: usize,
}

/// A labelled image set with a fixed class order and item order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dataset {
    /// The ImageFolder root, or the folder holding the list file.
    pub root: PathBuf,
    pub classes: Vec<String>,
    /// Sorted by (class, rel).
    pub items: Vec<Item>,
}

impl Dataset {
    /// A folder is read as an ImageFolder tree, a file as a list file.
    pub fn open(path: impl AsRef<Path>, class_names: Option<&Path>) -> Result<Self> {
        let path = path.as_ref();
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => Self::image_folder(path, class_names),
            Ok(_) => Self::list_file(path, class_names),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::bad_file(
                path,
                "dataset not found: pass an image folder laid out as <root>/<class>/<image> \
                 or a list file of `<image path> <label>` lines",
            )),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    /// Reads `root/<class>/<image>`; images in nested folders of a class folder belong to that
    /// class (as in torchvision's ImageFolder). Classes are the sorted folder names, or the order
    /// of `class_names`, which must then list exactly the class folders.
    pub fn image_folder(root: impl AsRef<Path>, class_names: Option<&Path>) -> Result<Self> {
        let root = root.as_ref();
        match std::fs::metadata(root) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::bad_file(
                    root,
                    "not a folder: an ImageFolder dataset is a folder of class folders; \
                     for a list file use it as the dataset path instead",
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::bad_file(
                    root,
                    "dataset folder not found: pass a folder laid out as <root>/<class>/<image>",
                ))
            }
            Err(e) => return Err(Error::io(root, e)),
        }

        let mut folders = Vec::new();
        let mut stray_images = 0usize;
        for (name, path, is_dir) in list_dir(root)? {
            if is_dir {
                folders.push(name);
            } else if is_image_path(&path) {
                stray_images += 1;
            }
        }
        if folders.is_empty() {
            let msg = if stray_images > 0 {
                format!(
                    "{stray_images} image(s) lie directly in the dataset folder and there are no \
                     class folders: move each image into a sub-folder named after its class \
                     (<root>/<class>/<image>)"
                )
            } else {
                "no class folders: expected <root>/<class>/<image>".to_string()
            };
            return Err(Error::bad_file(root, msg));
        }

        let classes = match class_names {
            None => {
                folders.sort();
                folders
            }
            Some(names_path) => {
                let names = read_class_names(names_path)?;
                let folder_set: HashSet<&str> = folders.iter().map(String::as_str).collect();
                let name_set: HashSet<&str> = names.iter().map(String::as_str).collect();
                let mut unlisted: Vec<&str> = folders
                    .iter()
                    .map(String::as_str)
                    .filter(|f| !name_set.contains(f))
                    .collect();
                unlisted.sort();
                if !unlisted.is_empty() {
                    return Err(Error::bad_file(
                        names_path,
                        format!(
                            "class folder(s) {} in {} are not listed: add them to this file or \
                             move them out of the dataset folder",
                            quote_list(&unlisted),
                            root.display()
                        ),
                    ));
                }
                let missing: Vec<&str> = names
                    .iter()
                    .map(String::as_str)
                    .filter(|n| !folder_set.contains(n))
                    .collect();
                if !missing.is_empty() {
                    return Err(Error::bad_file(
                        names_path,
                        format!(
                            "listed class(es) {} have no folder in {}: create the folder(s) or \
                             remove the name(s) from this file",
                            quote_list(&missing),
                            root.display()
                        ),
                    ));
                }
                names
            }
        };

        let mut items = Vec::new();
        let mut empty = Vec::new();
        for (class, name) in classes.iter().enumerate() {
            let before = items.len();
            let mut seen = HashSet::new();
            collect_images(&root.join(name), name, class, &mut seen, &mut items)?;
            if items.len() == before {
                empty.push(name.as_str());
            }
        }
        if !empty.is_empty() {
            return Err(Error::bad_file(
                root,
                format!(
                    "class folder(s) {} contain no images (recognised extensions: {}): add \
                     images or remove the folder(s){}",
                    quote_list(&empty),
                    IMAGE_EXTENSIONS.join(", "),
                    if class_names.is_some() {
                        " and their names from the class-names file"
                    } else {
                        ""
                    }
                ),
            ));
        }
        sort_items(&mut items);
        Ok(Dataset {
            root: root.to_path_buf(),
            classes,
            items,
        })
    }

    /// Reads a list file of `<image path> <label>` lines. Paths are relative to the list file's
    /// folder and may contain spaces: the label is the last whitespace-separated field. Blank
    /// lines and lines starting with `#` are ignored.
    ///
    /// With `class_names`, a label is an index into that file (a decimal number) or one of its
    /// names. Without it, labels are class names; classes are the distinct labels sorted, by
    /// numeric value when every label is a decimal number (so `2` precedes `10`), else as text.
    pub fn list_file(list: impl AsRef<Path>, class_names: Option<&Path>) -> Result<Self> {
        let list = list.as_ref();
        let text = read_text(list, "the list file")?;
        let base = match list.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let names = class_names.map(read_class_names).transpose()?;

        struct Entry<'a> {
            line: usize,
            path: &'a str,
            label: &'a str,
        }
        let entries: Vec<Entry> = path_word_lines(list, &text, "label")?.into_iter().map(|(line, path, label)| Entry { line, path, label }).collect();
        if entries.is_empty() {
            return Err(Error::bad_file(
                list,
                "no entries: expected one `<image path> <label>` line per image",
            ));
        }

        let classes: Vec<String> = match &names {
            Some(names) => names.clone(),
            None => {
                for e in &entries {
                    check_class_name(e.label).map_err(|msg| {
                        Error::bad_file(list, format!("line {}: label {msg}", e.line))
                    })?;
                }
                let mut labels: Vec<&str> = entries.iter().map(|e| e.label).collect();
                labels.sort();
                labels.dedup();
                if labels.iter().all(|l| is_decimal(l)) {
                    labels.sort_by(|a, b| {
                        let (ta, tb) = (a.trim_start_matches('0'), b.trim_start_matches('0'));
                        ta.len().cmp(&tb.len()).then(ta.cmp(tb)).then(a.cmp(b))
                    });
                }
                labels.into_iter().map(String::from).collect()
            }
        };
        let index: HashMap<&str, usize> = classes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
        let names_path = class_names
            .map(|p| p.display().to_string())
            .unwrap_or_default();

        let mut items = Vec::with_capacity(entries.len());
        let mut first_line: HashMap<String, usize> = HashMap::new();
        let mut problems = Vec::new();
        for e in &entries {
            let class = if names.is_some() && is_decimal(e.label) {
                let i = e.label.parse::<usize>().ok().filter(|&i| i < classes.len());
                let Some(i) = i else {
                    return Err(Error::bad_file(
                        list,
                        format!(
                            "line {}: label index {} is out of range: {names_path} lists {} \
                             classes (indices 0..={})",
                            e.line,
                            e.label,
                            classes.len(),
                            classes.len() - 1
                        ),
                    ));
                };
                // Numeric class names make an index ambiguous; refuse rather than mislabel.
                if let Some(&j) = index.get(e.label) {
                    if j != i {
                        return Err(Error::bad_file(
                            list,
                            format!(
                                "line {}: label `{}` is ambiguous: it is class index {i} \
                                 (`{}`) and also the name of class {j} in {names_path}; use \
                                 non-numeric class names or labels that are all indices",
                                e.line, e.label, classes[i]
                            ),
                        ));
                    }
                }
                i
            } else {
                match index.get(e.label) {
                    Some(&i) => i,
                    None => {
                        return Err(Error::bad_file(
                            list,
                            format!(
                                "line {}: unknown label `{}`: it is neither a class name nor a \
                                 class index of {names_path}; fix the label or add the class",
                                e.line, e.label
                            ),
                        ))
                    }
                }
            };
            let rel = rel_string(Path::new(e.path));
            if let Some(prev) = first_line.insert(rel.clone(), e.line) {
                return Err(Error::bad_file(
                    list,
                    format!(
                        "line {}: `{}` is already listed on line {prev}: list each image once",
                        e.line, e.path
                    ),
                ));
            }
            let path = base.join(e.path);
            match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => {}
                Ok(_) => problems.push(format!(
                    "line {}: `{}` is not a file ({})",
                    e.line,
                    e.path,
                    path.display()
                )),
                Err(err) => problems.push(format!(
                    "line {}: image `{}` not found ({}: {err})",
                    e.line,
                    e.path,
                    path.display()
                )),
            }
            items.push(Item { path, rel, class });
        }
        if !problems.is_empty() {
            let n = problems.len();
            let shown: Vec<String> = problems.into_iter().take(10).collect();
            return Err(Error::bad_file(
                list,
                format!(
                    "{n} listed image(s) missing — paths are relative to the list file's folder \
                     {}:\n  {}{}",
                    base.display(),
                    shown.join("\n  "),
                    if n > 10 {
                        format!("\n  ... and {} more", n - 10)
                    } else {
                        String::new()
                    }
                ),
            ));
        }

        let mut counts = vec![0usize; classes.len()];
        for it in &items {
            counts[it.class] += 1;
        }
        let empty: Vec<&str> = classes
            .iter()
            .zip(&counts)
            .filter(|(_, &c)| c == 0)
            .map(|(n, _)| n.as_str())
            .collect();
        if !empty.is_empty() {
            return Err(Error::bad_file(
                list,
                format!(
                    "class(es) {} of {names_path} have no images in this list: add images for \
                     them or remove them from the class-names file",
                    quote_list(&empty)
                ),
            ));
        }
        sort_items(&mut items);
        Ok(Dataset {
            root: base,
            classes,
            items,
        })
    }

    /// The items of one class, in dataset order.
    pub fn class_items(&self, class: usize) -> Vec<&Item> {
        self.items.iter().filter(|it| it.class == class).collect()
    }

    /// Item indices (into [`Dataset::items`]) of each class, in dataset order.
    pub fn class_members(&self) -> Vec<Vec<usize>> {
        let mut m = vec![Vec::new(); self.classes.len()];
        for (i, it) in self.items.iter().enumerate() {
            m[it.class].push(i);
        }
        m
    }

    /// Number of images per class, indexed like [`Dataset::classes`].
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0usize; self.classes.len()];
        for it in &self.items {
            counts[it.class] += 1;
        }
        counts
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// The `(line number, path, word)` entries of a file of `<image path> <word>` lines, skipping
/// blank lines and `#` comments. The word is the last whitespace-separated one, so paths may
/// contain spaces; `what` names the word in errors (e.g. `label`).
pub fn path_word_lines<'a>(file: &Path, text: &'a str, what: &str) -> Result<Vec<(usize, &'a str, &'a str)>> {
    let mut entries = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let t = raw.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let Some((pos, ws)) = t.char_indices().rev().find(|(_, c)| c.is_whitespace()) else {
            return Err(Error::bad_file(file, format!("line {line}: expected `<image path> <{what}>`, got `{t}` (no {what})")));
        };
        entries.push((line, t[..pos].trim_end(), &t[pos + ws.len_utf8()..]));
    }
    Ok(entries)
}

/// Reads a class-names file: one name per line, in class-index order; blank lines and lines
/// starting with `#` are ignored, surrounding whitespace is trimmed.
pub fn read_class_names(path: &Path) -> Result<Vec<String>> {
    let text = read_text(path, "the class-names file")?;
    let mut names = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let name = raw.trim();
        if name.is_empty() || name.starts_with('#') {
            continue;
        }
        check_class_name(name)
            .map_err(|msg| Error::bad_file(path, format!("line {line}: class name {msg}")))?;
        if let Some(prev) = seen.insert(name.to_string(), line) {
            return Err(Error::bad_file(
                path,
                format!("line {line}: duplicate class name `{name}` (also on line {prev}): list each class once"),
            ));
        }
        names.push(name.to_string());
    }
    if names.is_empty() {
        return Err(Error::bad_file(
            path,
            "no class names: expected one class name per line",
        ));
    }
    Ok(names)
}

/// Class names become output folder names, so they must be usable as one path component.
fn check_class_name(name: &str) -> std::result::Result<(), String> {
    if name == "."
        || name == ".."
        || name.contains(['/', '\\'])
        || name.chars().any(char::is_control)
    {
        return Err(format!(
            "`{}` cannot be used: class names become folder names, so they must not be `.`, `..` \
             or contain `/`, `\\` or control characters",
            name.escape_debug()
        ));
    }
    Ok(())
}

fn is_decimal(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn read_text(path: &Path, what: &str) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        Error::bad_file(
            path,
            format!("{what} is not UTF-8 text ({e}); save it as UTF-8"),
        )
    })?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(t) => t.to_string(),
        None => text,
    })
}

/// `(name, path, is_dir)` of the visible entries of `dir`, following symlinks.
fn list_dir(dir: &Path) -> Result<Vec<(String, PathBuf, bool)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(String::from) else {
            return Err(Error::bad_file(
                &path,
                "name is not valid UTF-8: rename it (names are used as ids in manifests)",
            ));
        };
        if is_hidden(&name) {
            continue;
        }
        // A dangling symlink is neither: skip it like any other non-image entry.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        out.push((name, path, meta.is_dir()));
    }
    Ok(out)
}

fn collect_images(
    dir: &Path,
    rel_dir: &str,
    class: usize,
    seen: &mut HashSet<PathBuf>,
    items: &mut Vec<Item>,
) -> Result<()> {
    // Guards against symlink cycles.
    let canon = std::fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?;
    if !seen.insert(canon) {
        return Ok(());
    }
    for (name, path, is_dir) in list_dir(dir)? {
        let rel = format!("{rel_dir}/{name}");
        if is_dir {
            collect_images(&path, &rel, class, seen, items)?;
        } else if is_image_path(&path) {
            items.push(Item { path, rel, class });
        }
    }
    Ok(())
}

/// `/`-joined components, without `.` components.
fn rel_string(p: &Path) -> String {
    let mut parts = Vec::new();
    let mut absolute = false;
    for c in p.components() {
        match c {
            Component::RootDir | Component::Prefix(_) => absolute = true,
            Component::CurDir => {}
            Component::ParentDir => parts.push("..".to_string()),
            Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
        }
    }
    let joined = parts.join("/");
    if absolute {
        format!("/{joined}")
    } else {
        joined
    }
}

fn sort_items(items: &mut [Item]) {
    items.sort_by(|a, b| a.class.cmp(&b.class).then_with(|| a.rel.cmp(&b.rel)));
}

fn quote_list(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}
