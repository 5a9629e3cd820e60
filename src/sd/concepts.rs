//! Concept tokens learned by textual inversion (TI) and the class → token map that says which
//! token stands for which dataset class.
//!
//! Accepted inputs:
//! - diffusers TI safetensors `{token: row}` (row `[hidden]` or `[1, hidden]`), one file or
//!   several (tokens are merged; a token defined twice is an error);
//! - the Diff-II / Diff-Mix release file `learned_embeds-steps-*.bin`: a `torch.save` zip whose
//!   pickle holds `learned_embeds_dict` `{token: tensor}` and `name2placeholder`
//!   `{class: token}` (other keys are ignored); a plain pickled `{token: tensor}` works too;
//! - a class map JSON, either `{"sparrow": "<cls0>", ...}` or the `concepts.json` shape
//!   `{"name2placeholder": {...}, "order": [...]}`.
//!
//! Pickles are read by a small interpreter that builds plain values and never imports or calls
//! anything: a global other than torch's tensor-rebuild functions, its storage types and
//! `collections.OrderedDict` is an error, so a file that would run code under `torch.load` is
//! refused instead.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{read_json, Error, Result};
use crate::nn::weights::load_all;

#[derive(Deserialize, Debug, Clone, Default)]
pub struct ConceptsJson {
    /// class name -> placeholder token
    #[serde(default)]
    pub name2placeholder: BTreeMap<String, String>,
    /// token order (ids vocab_size + i)
    #[serde(default)]
    pub order: Vec<String>,
}

/// A class → token map with an optional token order, read from JSON or from a `.bin`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClassMap {
    /// (class, token) in the source's order.
    pub entries: Vec<(String, String)>,
    /// Token order (ids vocab_size + i); empty when the source does not fix one.
    pub order: Vec<String>,
}

impl ClassMap {
    /// Reads `{class: token}` or `{"name2placeholder": {class: token}, "order": [token, ...]}`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let v: Value = read_json(path)?;
        let shape_help = "expected {\"class\": \"<token>\", ...} or \
                          {\"name2placeholder\": {\"class\": \"<token>\"}, \"order\": [\"<token>\", ...]}";
        let Value::Object(obj) = v else {
            return Err(Error::bad_file(path, format!("is not a JSON object; {shape_help}")));
        };
        let nested = obj.get("name2placeholder").is_some_and(Value::is_object)
            || obj.get("order").is_some_and(Value::is_array);
        let (map, order) = if nested {
            let map = match obj.get("name2placeholder") {
                Some(Value::Object(m)) => m.clone(),
                None => serde_json::Map::new(),
                Some(_) => return Err(Error::bad_file(path, format!("`name2placeholder` is not an object; {shape_help}"))),
            };
            let order = match obj.get("order") {
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|t| t.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| Error::bad_file(path, "`order` must be a list of token strings"))?,
                None => Vec::new(),
                Some(_) => return Err(Error::bad_file(path, "`order` must be a list of token strings")),
            };
            (map, order)
        } else {
            (obj, Vec::new())
        };
        let mut entries = Vec::with_capacity(map.len());
        for (class, tok) in map {
            let Some(tok) = tok.as_str() else {
                return Err(Error::bad_file(path, format!("class `{class}` maps to {tok}, not a token string; {shape_help}")));
            };
            entries.push((class, tok.to_string()));
        }
        if entries.is_empty() && order.is_empty() {
            return Err(Error::bad_file(path, format!("holds no class → token entries; {shape_help}")));
        }
        Ok(ClassMap { entries, order })
    }
}

/// What one concept file holds, tokens in the file's natural order.
struct ConceptFile {
    rows: Vec<(String, Tensor)>,
    class_map: Option<ClassMap>,
}

/// Placeholder tokens and their embedding rows, in id order.
#[derive(Clone, Debug)]
pub struct Concepts {
    pub tokens: Vec<String>,
    /// [k, hidden]
    pub rows: Tensor,
    pub class_to_token: BTreeMap<String, String>,
}

impl Concepts {
    /// Reads `learned_embeds.safetensors`; the order comes from `concepts.json` in the same
    /// folder when present, else tokens are sorted by name.
    pub fn load(embeds: &Path, hidden: usize, device: &Device) -> Result<Self> {
        Self::from_files(&[embeds.to_path_buf()], None, hidden, device)
    }

    /// Loads concepts from one or more files (`.safetensors`, or a `torch.save` `.bin`/`.pt`;
    /// recognised by content when the extension says neither).
    ///
    /// The class map is `class_map` when given; otherwise each `.bin`'s `name2placeholder`, or a
    /// `concepts.json` beside a file. Token ids follow the class map's `order` when it has one;
    /// the remaining tokens follow, file by file in the order of `paths`: a `.bin`'s own order,
    /// a safetensors file's tokens sorted by name.
    pub fn from_files(paths: &[PathBuf], class_map: Option<&Path>, hidden: usize, device: &Device) -> Result<Self> {
        if paths.is_empty() {
            return Err(Error::invalid("no concept files given: pass learned_embeds.safetensors or a learned_embeds-steps-*.bin"));
        }
        let mut rows: Vec<(String, Tensor, PathBuf)> = Vec::new();
        let mut defined: HashMap<String, usize> = HashMap::new();
        let mut maps: Vec<(PathBuf, ClassMap)> = Vec::new();
        for path in paths {
            let file = read_concept_file(path, device)?;
            for (tok, t) in file.rows {
                if let Some(&i) = defined.get(&tok) {
                    return Err(Error::bad_file(
                        path,
                        format!("token `{tok}` is also defined in {}; each concept token must come from one file", rows[i].2.display()),
                    ));
                }
                let row = check_row(path, &tok, &t, hidden)?;
                defined.insert(tok.clone(), rows.len());
                rows.push((tok, row, path.clone()));
            }
            if class_map.is_none() {
                let beside = path.with_file_name("concepts.json");
                if let Some(cm) = file.class_map {
                    maps.push((path.clone(), cm));
                } else if beside.is_file() && !maps.iter().any(|(p, _)| *p == beside) {
                    maps.push((beside.clone(), ClassMap::from_file(&beside)?));
                }
            }
        }
        if let Some(p) = class_map {
            maps = vec![(p.to_path_buf(), ClassMap::from_file(p)?)];
        }
        if rows.is_empty() {
            let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            return Err(Error::invalid(format!("{} hold no concept tokens", names.join(", "))));
        }
        let known = || {
            let mut t: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
            t.sort();
            t.join(", ")
        };

        let mut class_to_token: BTreeMap<String, String> = BTreeMap::new();
        let mut class_source: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut order: Vec<(String, PathBuf)> = Vec::new();
        for (src, cm) in &maps {
            for (class, tok) in &cm.entries {
                if !defined.contains_key(tok) {
                    return Err(Error::bad_file(
                        src,
                        format!("class `{class}` maps to `{tok}`, but no concept file defines that token (defined: {})", known()),
                    ));
                }
                if let Some(prev) = class_to_token.get(class) {
                    if prev != tok {
                        return Err(Error::bad_file(
                            src,
                            format!("class `{class}` maps to `{tok}` but {} maps it to `{prev}`", class_source[class].display()),
                        ));
                    }
                }
                class_to_token.insert(class.clone(), tok.clone());
                class_source.insert(class.clone(), src.clone());
            }
            for tok in &cm.order {
                if !order.iter().any(|(t, _)| t == tok) {
                    order.push((tok.clone(), src.clone()));
                }
            }
        }

        let mut tokens: Vec<String> = Vec::with_capacity(rows.len());
        for (tok, src) in &order {
            if !defined.contains_key(tok) {
                return Err(Error::bad_file(
                    src,
                    format!("`order` lists `{tok}`, but no concept file defines that token (defined: {})", known()),
                ));
            }
            tokens.push(tok.clone());
        }
        for (tok, _, _) in &rows {
            if !tokens.contains(tok) {
                tokens.push(tok.clone());
            }
        }
        let stacked: Vec<Tensor> = tokens.iter().map(|t| rows[defined[t]].1.clone()).collect();
        Ok(Concepts { tokens, rows: Tensor::stack(&stacked, 0)?, class_to_token })
    }

    /// The token of a dataset class. Exact names first; failing that, names compared the way the
    /// official loader normalises them (`/` and `_` read as spaces), when that match is unique.
    pub fn token_for_class(&self, class: &str) -> Option<&str> {
        if let Some(t) = self.class_to_token.get(class) {
            return Some(t);
        }
        let want = normalize_class(class);
        let mut hits = self.class_to_token.iter().filter(|(c, _)| normalize_class(c) == want);
        match (hits.next(), hits.next()) {
            (Some((_, t)), None) => Some(t),
            _ => None,
        }
    }

    /// Every dataset class must have a concept token; otherwise generation would silently use a
    /// prompt without the concept.
    pub fn check_classes(&self, classes: &[String]) -> Result<()> {
        let missing: Vec<&str> =
            classes.iter().filter(|c| self.token_for_class(c).is_none()).map(String::as_str).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let mapped = if self.class_to_token.is_empty() {
            "the concepts come with no class map".to_string()
        } else {
            format!("the class map covers {}", shorten(self.class_to_token.keys().map(String::as_str)))
        };
        Err(Error::invalid(format!(
            "{} of {} dataset classes have no concept token: {}; {mapped}. Pass a class map JSON \
             {{\"class\": \"<token>\"}} that covers every class, or learn concepts for the missing ones",
            missing.len(),
            classes.len(),
            shorten(missing.iter().copied()),
        )))
    }

    /// SHA-256 (hex) of the tokens in id order and their rows as f32 little-endian: identifies
    /// the concepts in manifests independently of file format.
    pub fn sha256(&self) -> String {
        let mut h = Sha256::new();
        let rows = self.rows.to_dtype(DType::F32).and_then(|r| r.flatten_all()).and_then(|r| r.to_vec1::<f32>());
        let rows = rows.unwrap_or_default();
        let hidden = if self.tokens.is_empty() { 0 } else { rows.len() / self.tokens.len() };
        for (i, tok) in self.tokens.iter().enumerate() {
            h.update((tok.len() as u64).to_le_bytes());
            h.update(tok.as_bytes());
            for v in &rows[i * hidden..(i + 1) * hidden] {
                h.update(v.to_le_bytes());
            }
        }
        format!("{:x}", h.finalize())
    }

    /// Writes diffusers' TI format: `{token: [hidden]}` safetensors at `embeds`, and the class
    /// map and token order as `concepts.json` beside it.
    pub fn save(&self, embeds: &Path) -> Result<()> {
        let rows = self.rows.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let tensors = self.tokens.iter().enumerate().map(|(i, tok)| Ok((tok.clone(), rows.get(i)?))).collect::<Result<Vec<_>>>()?;
        crate::nn::weights::save_safetensors(embeds, &tensors, None)?;
        let meta = serde_json::json!({ "name2placeholder": self.class_to_token, "order": self.tokens });
        crate::data::atomic::write_json_atomic(embeds.with_file_name("concepts.json"), &meta)
    }
}

fn normalize_class(s: &str) -> String {
    s.replace(['/', '_'], " ").split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A comma-separated list, cut after 50 names.
fn shorten<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let names: Vec<&str> = names.collect();
    let mut s = names.iter().take(50).map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
    if names.len() > 50 {
        s.push_str(&format!(" and {} more", names.len() - 50));
    }
    s
}

/// One row of `hidden` values as F32 from a stored `[hidden]` or `[1, hidden]` tensor.
fn check_row(path: &Path, tok: &str, t: &Tensor, hidden: usize) -> Result<Tensor> {
    let err = |msg: String| Error::Tensor { path: path.to_path_buf(), key: tok.to_string(), msg };
    match t.dims() {
        [h] | [1, h] if *h == hidden => {
            let row = t.to_dtype(DType::F32)?.reshape(hidden)?;
            crate::error::ensure_finite(&row, || format!("{}: concept token `{tok}`", path.display()))?;
            Ok(row)
        }
        [k, h] if *h == hidden && *k > 1 => Err(err(format!(
            "has {k} vectors of {hidden} (multi-vector textual inversion), which is not supported: \
             the text encoder needs one row per token"
        ))),
        d => Err(err(format!(
            "has shape {d:?}; the text encoder needs one row of {hidden} values ([{hidden}] or [1, {hidden}])"
        ))),
    }
}

fn read_concept_file(path: &Path, device: &Device) -> Result<ConceptFile> {
    if !path.is_file() {
        return Err(Error::bad_file(path, "file not found"));
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if ext != "safetensors" {
        let mut magic = [0u8; 4];
        {
            use std::io::Read;
            let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            let n = f.read(&mut magic).map_err(|e| Error::io(path, e))?;
            magic[n..].fill(0);
        }
        if &magic == b"PK\x03\x04" || &magic == b"PK\x05\x06" {
            return read_torch_concepts(path, device);
        }
        // Pickle protocol 2 opening torch's legacy magic number (a 10-byte LONG1).
        if magic == [0x80, 0x02, 0x8a, 0x0a] {
            return Err(Error::bad_file(
                path,
                "is a legacy (pre-1.6, non-zip) torch.save file; re-save it with a current torch \
                 (torch.save(torch.load(f), f)) or convert it to safetensors",
            ));
        }
        if matches!(ext.as_str(), "bin" | "pt" | "pth" | "ckpt") {
            return Err(Error::bad_file(
                path,
                "is not a torch.save archive (no zip header): the file is corrupt or not a concept file; \
                 expected learned_embeds-steps-*.bin from the official release or a diffusers TI file",
            ));
        }
    }
    let map = load_all(path, device)?;
    let mut rows: Vec<(String, Tensor)> = map.into_iter().collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(ConceptFile { rows, class_map: None })
}

/// Reads a `torch.save` file holding `{"learned_embeds_dict": {token: tensor},
/// "name2placeholder": {class: token}, ...}` or a plain `{token: tensor}`, without executing it.
fn read_torch_concepts(path: &Path, device: &Device) -> Result<ConceptFile> {
    use crate::formats::torch_pickle::Value as V;
    let bad = |msg: String| Error::bad_file(path, msg);
    let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let file = crate::formats::torch_pickle::TorchFile::open(&data).map_err(|e| bad(format!("cannot read it as a torch.save file: {e}")))?;
    let V::Dict(root) = file.root() else {
        return Err(bad("the pickled object is not a dict; expected {\"learned_embeds_dict\": ..., \"name2placeholder\": ...}".into()));
    };
    let root: Vec<(V, V)> = root.borrow().clone();
    let get = |key: &str| root.iter().find(|(k, _)| matches!(k, V::Str(s) if s == key)).map(|(_, v)| v.clone());
    let embeds = match get("learned_embeds_dict") {
        Some(V::Dict(d)) => d.borrow().clone(),
        Some(v) => return Err(bad(format!("`learned_embeds_dict` is {v}, not a dict of token -> tensor"))),
        // diffusers' textual_inversion.py `learned_embeds.bin`: a bare {token: tensor}.
        None if !root.is_empty() && root.iter().all(|(k, v)| matches!((k, v), (V::Str(_), V::Tensor(_)))) => {
            return Ok(ConceptFile { rows: read_token_tensors(&file, path, root, device)?, class_map: None });
        }
        None => {
            let keys: Vec<String> = root.iter().map(|(k, _)| k.to_string()).collect();
            return Err(bad(format!(
                "has no `learned_embeds_dict` (keys: {}); expected the official Diff-II / Diff-Mix \
                 learned_embeds-steps-*.bin or a pickled {{token: tensor}}",
                keys.join(", ")
            )));
        }
    };
    let rows = read_token_tensors(&file, path, embeds, device)?;
    let class_map = match get("name2placeholder") {
        None => None,
        Some(V::Dict(d)) => {
            let mut entries = Vec::new();
            for (k, v) in d.borrow().iter() {
                match (k, v) {
                    (V::Str(c), V::Str(t)) => entries.push((c.clone(), t.clone())),
                    _ => return Err(bad(format!("`name2placeholder` entry {k} -> {v} is not class name -> token string"))),
                }
            }
            Some(ClassMap { entries, order: Vec::new() })
        }
        Some(v) => return Err(bad(format!("`name2placeholder` is {v}, not a dict of class name -> token"))),
    };
    Ok(ConceptFile { rows, class_map })
}

fn read_token_tensors(
    file: &crate::formats::torch_pickle::TorchFile,
    path: &Path,
    pairs: Vec<(crate::formats::torch_pickle::Value, crate::formats::torch_pickle::Value)>,
    device: &Device,
) -> Result<Vec<(String, Tensor)>> {
    use crate::formats::torch_pickle::Value as V;
    let mut rows = Vec::with_capacity(pairs.len());
    for (k, v) in pairs {
        let (V::Str(tok), V::Tensor(t)) = (&k, &v) else {
            return Err(Error::bad_file(path, format!("learned embedding entry {k} -> {v} is not token -> tensor")));
        };
        let tensor = file
            .tensor(t, device)
            .map_err(|e| Error::Tensor { path: path.to_path_buf(), key: tok.clone(), msg: e })?;
        rows.push((tok.clone(), tensor));
    }
    Ok(rows)
}

