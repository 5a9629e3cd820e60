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
use crate::sd::weights::load_all;

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
        let mut map = HashMap::new();
        for (i, tok) in self.tokens.iter().enumerate() {
            map.insert(tok.clone(), rows.get(i)?.contiguous()?);
        }
        candle_core::safetensors::save(&map, embeds)
            .map_err(|e| Error::bad_file(embeds, format!("cannot write: {e}")))?;
        let meta = serde_json::json!({ "name2placeholder": self.class_to_token, "order": self.tokens });
        let json_path = embeds.with_file_name("concepts.json");
        let text = serde_json::to_string_pretty(&meta).map_err(|e| Error::invalid(e.to_string()))?;
        std::fs::write(&json_path, text).map_err(|e| Error::io(&json_path, e))
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
        [h] | [1, h] if *h == hidden => Ok(t.to_dtype(DType::F32)?.reshape(hidden)?),
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
    use torch_file::Value as V;
    let bad = |msg: String| Error::bad_file(path, msg);
    let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let file = torch_file::TorchFile::open(&data).map_err(|e| bad(format!("cannot read it as a torch.save file: {e}")))?;
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
    file: &torch_file::TorchFile,
    path: &Path,
    pairs: Vec<(torch_file::Value, torch_file::Value)>,
    device: &Device,
) -> Result<Vec<(String, Tensor)>> {
    use torch_file::Value as V;
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

/// Just enough of PyTorch's zip serialization (a stored zip with `<archive>/data.pkl` and one
/// record per storage) and of pickle protocol 2–5 to read tensors, dicts, lists, strings and
/// numbers. Nothing is imported or called: globals are checked against an allow-list as they
/// are read, and the few allowed ones are interpreted here.
mod torch_file {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::rc::Rc;

    use candle_core::{DType, Device, Tensor};

    type R<T> = std::result::Result<T, String>;

    #[derive(Clone, Debug)]
    pub struct StorageRef {
        pub dtype: Option<DType>,
        pub type_name: String,
        pub key: String,
        pub numel: usize,
    }

    #[derive(Clone, Debug)]
    pub struct TensorRef {
        pub storage: StorageRef,
        pub offset: usize,
        pub size: Vec<usize>,
        pub stride: Vec<usize>,
    }

    /// A pickled value. Containers are shared, as in Python: the memo and the stack may both
    /// refer to a dict that is filled after it was memoised.
    type Shared<T> = Rc<RefCell<Vec<T>>>;

    #[derive(Clone, Debug)]
    pub enum Value {
        None,
        Bool(bool),
        Int(i64),
        Float(f64),
        Str(String),
        Tuple(Vec<Value>),
        List(Shared<Value>),
        Dict(Shared<(Value, Value)>),
        Global(String, String),
        Storage(StorageRef),
        Tensor(TensorRef),
        Mark,
    }

    impl std::fmt::Display for Value {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Value::None => write!(f, "None"),
                Value::Bool(b) => write!(f, "{b}"),
                Value::Int(i) => write!(f, "{i}"),
                Value::Float(x) => write!(f, "{x}"),
                Value::Str(s) => write!(f, "{s:?}"),
                Value::Tuple(_) => write!(f, "a tuple"),
                Value::List(_) => write!(f, "a list"),
                Value::Dict(_) => write!(f, "a dict"),
                Value::Global(m, n) => write!(f, "{m}.{n}"),
                Value::Storage(_) => write!(f, "a storage"),
                Value::Tensor(t) => write!(f, "a tensor of shape {:?}", t.size),
                Value::Mark => write!(f, "a mark"),
            }
        }
    }

    fn storage_dtype(name: &str) -> Option<Option<DType>> {
        Some(match name {
            "FloatStorage" => Some(DType::F32),
            "HalfStorage" => Some(DType::F16),
            "BFloat16Storage" => Some(DType::BF16),
            "DoubleStorage" => Some(DType::F64),
            "LongStorage" => Some(DType::I64),
            "ByteStorage" => Some(DType::U8),
            // Readable as pickle values, but not as concept rows.
            "IntStorage" | "ShortStorage" | "CharStorage" | "BoolStorage" => None,
            _ => return None,
        })
    }

    fn allowed_global(module: &str, name: &str) -> bool {
        matches!(
            (module, name),
            ("collections", "OrderedDict") | ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_parameter")
        ) || (module == "torch" && storage_dtype(name).is_some())
    }

    pub struct TorchFile<'a> {
        zip: Zip<'a>,
        /// `<archive>/` prefix of every record.
        prefix: String,
        root: Value,
    }

    impl<'a> TorchFile<'a> {
        pub fn open(data: &'a [u8]) -> R<Self> {
            let zip = Zip::open(data)?;
            let pkl = zip
                .names()
                .find(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
                .ok_or("no data.pkl record (not a torch.save file)")?
                .to_string();
            let prefix = pkl.strip_suffix("data.pkl").unwrap_or("").to_string();
            if let Some(order) = zip.read(&format!("{prefix}byteorder"))? {
                if order != b"little" {
                    return Err(format!("byte order {:?} is not supported", String::from_utf8_lossy(order)));
                }
            }
            let bytes = zip.read(&pkl)?.ok_or("data.pkl vanished")?;
            let root = Unpickler::new(bytes).run().map_err(|e| format!("{pkl}: {e}"))?;
            Ok(TorchFile { zip, prefix, root })
        }

        pub fn root(&self) -> Value {
            self.root.clone()
        }

        /// The tensor's values from its storage record (contiguous layouts only).
        pub fn tensor(&self, t: &TensorRef, device: &Device) -> R<Tensor> {
            let s = &t.storage;
            let dtype = s.dtype.ok_or_else(|| format!("has storage type {}, not a floating-point tensor", s.type_name))?;
            let name = format!("{}data/{}", self.prefix, s.key);
            let bytes = self.zip.read(&name)?.ok_or_else(|| format!("storage record {name} is missing"))?;
            let too_big = || format!("has an impossible size {:?} at offset {}", t.size, t.offset);
            let numel = t.size.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(too_big)?;
            // Strides of size-1 dims are irrelevant; every other dim must be row-major.
            let mut expect = 1usize;
            for (&d, &st) in t.size.iter().zip(&t.stride).rev() {
                if d != 1 && st != expect {
                    return Err(format!("is stored non-contiguously (shape {:?}, stride {:?})", t.size, t.stride));
                }
                expect = expect.saturating_mul(d);
            }
            let es = dtype.size_in_bytes();
            let stop = t.offset.checked_add(numel).ok_or_else(too_big)?;
            let (start, end) = (t.offset.checked_mul(es).ok_or_else(too_big)?, stop.checked_mul(es).ok_or_else(too_big)?);
            if stop > s.numel || end > bytes.len() {
                return Err(format!(
                    "needs elements {}..{stop} of storage {name}, which holds {} (file truncated?)",
                    t.offset,
                    bytes.len() / es
                ));
            }
            let out = Tensor::from_raw_buffer(&bytes[start..end], dtype, &t.size, device).map_err(|e| e.to_string())?;
            out.to_dtype(DType::F32).map_err(|e| e.to_string())
        }
    }

    // ----------------------------------------------------------------------------------------
    // pickle
    // ----------------------------------------------------------------------------------------

    struct Unpickler<'a> {
        data: &'a [u8],
        pos: usize,
        stack: Vec<Value>,
        memo: HashMap<u64, Value>,
    }

    impl<'a> Unpickler<'a> {
        fn new(data: &'a [u8]) -> Self {
            Unpickler { data, pos: 0, stack: Vec::new(), memo: HashMap::new() }
        }

        fn take(&mut self, n: usize) -> R<&'a [u8]> {
            if n > self.data.len() - self.pos {
                return Err(format!("truncated at byte {} (needs {n} more bytes)", self.pos));
            }
            let s = &self.data[self.pos..self.pos + n];
            self.pos += n;
            Ok(s)
        }

        fn uint(&mut self, n: usize) -> R<u64> {
            let b = self.take(n)?;
            Ok(b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64))
        }

        fn line(&mut self) -> R<String> {
            let rest = &self.data[self.pos..];
            let n = rest.iter().position(|&b| b == b'\n').ok_or("unterminated GLOBAL")?;
            let s = std::str::from_utf8(&rest[..n]).map_err(|_| "non-UTF-8 GLOBAL name")?.to_string();
            self.pos += n + 1;
            Ok(s)
        }

        fn string(&mut self, n: u64) -> R<Value> {
            let n = usize::try_from(n).map_err(|_| "string length overflows")?;
            let b = self.take(n)?;
            Ok(Value::Str(String::from_utf8(b.to_vec()).map_err(|_| "string is not UTF-8")?))
        }

        fn pop(&mut self) -> R<Value> {
            match self.stack.pop() {
                Some(Value::Mark) | None => Err(format!("stack underflow at byte {}", self.pos)),
                Some(v) => Ok(v),
            }
        }

        fn pop_mark(&mut self) -> R<Vec<Value>> {
            let i = self.stack.iter().rposition(|v| matches!(v, Value::Mark)).ok_or("MARK missing")?;
            let items = self.stack.split_off(i + 1);
            self.stack.pop();
            Ok(items)
        }

        fn top_dict(&mut self) -> R<Shared<(Value, Value)>> {
            match self.stack.last() {
                Some(Value::Dict(d)) => Ok(d.clone()),
                _ => Err(format!("SETITEM(S) on a non-dict at byte {}", self.pos)),
            }
        }

        fn top_list(&mut self) -> R<Shared<Value>> {
            match self.stack.last() {
                Some(Value::List(l)) => Ok(l.clone()),
                _ => Err(format!("APPEND(S) on a non-list at byte {}", self.pos)),
            }
        }

        fn global(&mut self, module: String, name: String) -> R<()> {
            if !allowed_global(&module, &name) {
                return Err(format!(
                    "the pickle references `{module}.{name}`, which torch.load would import and may run; \
                     a concept file only needs tensors, dicts, strings and numbers, so this file is not \
                     loaded (it is not a plain checkpoint, or it is malicious)"
                ));
            }
            self.stack.push(Value::Global(module, name));
            Ok(())
        }

        fn run(mut self) -> R<Value> {
            loop {
                let at = self.pos;
                let op = self.uint(1)? as u8;
                match op {
                    0x80 => {
                        let proto = self.uint(1)?;
                        if proto > 5 {
                            return Err(format!("pickle protocol {proto} is not supported"));
                        }
                    }
                    0x95 => {
                        self.uint(8)?; // FRAME: a length hint only
                    }
                    b'.' => return self.pop(),
                    b'(' => self.stack.push(Value::Mark),
                    b'}' => self.stack.push(Value::Dict(Rc::default())),
                    b']' => self.stack.push(Value::List(Rc::default())),
                    b')' => self.stack.push(Value::Tuple(Vec::new())),
                    b'N' => self.stack.push(Value::None),
                    0x88 => self.stack.push(Value::Bool(true)),
                    0x89 => self.stack.push(Value::Bool(false)),
                    b'J' => {
                        let v = self.uint(4)? as u32 as i32;
                        self.stack.push(Value::Int(v as i64));
                    }
                    b'K' => {
                        let v = self.uint(1)?;
                        self.stack.push(Value::Int(v as i64));
                    }
                    b'M' => {
                        let v = self.uint(2)?;
                        self.stack.push(Value::Int(v as i64));
                    }
                    0x8a => {
                        let n = self.uint(1)? as usize;
                        if n > 8 {
                            return Err(format!("integer of {n} bytes at byte {at} is too large"));
                        }
                        let raw = self.uint(n)?;
                        // Two's complement of n bytes.
                        let v = if n > 0 && n < 8 && raw >> (8 * n - 1) & 1 == 1 { raw as i64 - (1i64 << (8 * n)) } else { raw as i64 };
                        self.stack.push(Value::Int(v));
                    }
                    b'G' => {
                        let b = self.take(8)?;
                        self.stack.push(Value::Float(f64::from_be_bytes(b.try_into().expect("8 bytes"))));
                    }
                    b'X' => {
                        let n = self.uint(4)?;
                        let v = self.string(n)?;
                        self.stack.push(v);
                    }
                    0x8c => {
                        let n = self.uint(1)?;
                        let v = self.string(n)?;
                        self.stack.push(v);
                    }
                    0x8d => {
                        let n = self.uint(8)?;
                        let v = self.string(n)?;
                        self.stack.push(v);
                    }
                    b't' => {
                        let items = self.pop_mark()?;
                        self.stack.push(Value::Tuple(items));
                    }
                    0x85..=0x87 => {
                        let n = (op - 0x84) as usize;
                        let mut items = Vec::with_capacity(n);
                        for _ in 0..n {
                            items.push(self.pop()?);
                        }
                        items.reverse();
                        self.stack.push(Value::Tuple(items));
                    }
                    b'l' => {
                        let items = self.pop_mark()?;
                        self.stack.push(Value::List(Rc::new(RefCell::new(items))));
                    }
                    b'd' => {
                        let items = self.pop_mark()?;
                        let pairs = pairs(items)?;
                        self.stack.push(Value::Dict(Rc::new(RefCell::new(pairs))));
                    }
                    b'a' => {
                        let v = self.pop()?;
                        self.top_list()?.borrow_mut().push(v);
                    }
                    b'e' => {
                        let items = self.pop_mark()?;
                        self.top_list()?.borrow_mut().extend(items);
                    }
                    b's' => {
                        let v = self.pop()?;
                        let k = self.pop()?;
                        self.top_dict()?.borrow_mut().push((k, v));
                    }
                    b'u' => {
                        let items = self.pop_mark()?;
                        let p = pairs(items)?;
                        self.top_dict()?.borrow_mut().extend(p);
                    }
                    b'q' | b'r' | 0x94 => {
                        let id = match op {
                            b'q' => self.uint(1)?,
                            b'r' => self.uint(4)?,
                            _ => self.memo.len() as u64,
                        };
                        let top = self.stack.last().ok_or("memo of an empty stack")?.clone();
                        self.memo.insert(id, top);
                    }
                    b'h' | b'j' => {
                        let id = if op == b'h' { self.uint(1)? } else { self.uint(4)? };
                        let v = self.memo.get(&id).ok_or_else(|| format!("memo entry {id} missing at byte {at}"))?.clone();
                        self.stack.push(v);
                    }
                    b'c' => {
                        let module = self.line()?;
                        let name = self.line()?;
                        self.global(module, name)?;
                    }
                    0x93 => {
                        let (name, module) = (self.pop()?, self.pop()?);
                        let (Value::Str(module), Value::Str(name)) = (module, name) else {
                            return Err(format!("STACK_GLOBAL without string names at byte {at}"));
                        };
                        self.global(module, name)?;
                    }
                    b'Q' => {
                        let pid = self.pop()?;
                        let s = persistent_storage(pid)?;
                        self.stack.push(Value::Storage(s));
                    }
                    b'R' => {
                        let args = self.pop()?;
                        let f = self.pop()?;
                        let v = reduce(f, args)?;
                        self.stack.push(v);
                    }
                    b'b' => {
                        let state = self.pop()?;
                        match (self.stack.last(), state) {
                            (Some(_), Value::None) => {}
                            (Some(Value::Dict(d)), Value::Dict(s)) => {
                                let add = s.borrow().clone();
                                d.borrow_mut().extend(add);
                            }
                            (_, s) => return Err(format!("BUILD with state {s} at byte {at} is not supported")),
                        }
                    }
                    other => {
                        return Err(format!(
                            "pickle opcode 0x{other:02x} at byte {at} is not supported by this reader \
                             (it reads tensors, dicts, lists, strings and numbers)"
                        ))
                    }
                }
            }
        }
    }

    fn pairs(items: Vec<Value>) -> R<Vec<(Value, Value)>> {
        if !items.len().is_multiple_of(2) {
            return Err("odd number of dict items".into());
        }
        let mut it = items.into_iter();
        let mut out = Vec::new();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            out.push((k, v));
        }
        Ok(out)
    }

    fn as_usize(v: &Value, what: &str) -> R<usize> {
        match v {
            Value::Int(i) if *i >= 0 => Ok(*i as usize),
            other => Err(format!("{what} is {other}, expected a non-negative integer")),
        }
    }

    fn as_usizes(v: &Value, what: &str) -> R<Vec<usize>> {
        match v {
            Value::Tuple(items) => items.iter().map(|x| as_usize(x, what)).collect(),
            other => Err(format!("{what} is {other}, expected a tuple of integers")),
        }
    }

    /// torch's storage reference: `('storage', torch.<T>Storage, key, location, numel)`.
    fn persistent_storage(pid: Value) -> R<StorageRef> {
        let Value::Tuple(t) = &pid else {
            return Err(format!("persistent id {pid} is not a storage reference"));
        };
        match t.as_slice() {
            [Value::Str(kind), Value::Global(m, ty), Value::Str(key), Value::Str(_location), numel]
                if kind == "storage" && m == "torch" =>
            {
                let dtype = storage_dtype(ty).ok_or_else(|| format!("storage type torch.{ty} is not supported"))?;
                Ok(StorageRef { dtype, type_name: ty.clone(), key: key.clone(), numel: as_usize(numel, "storage size")? })
            }
            _ => Err("persistent id is not torch's ('storage', type, key, location, numel)".into()),
        }
    }

    fn reduce(f: Value, args: Value) -> R<Value> {
        let Value::Global(module, name) = &f else {
            return Err(format!("REDUCE on {f}, which is not a callable"));
        };
        let Value::Tuple(args) = args else {
            return Err(format!("REDUCE of {module}.{name} without an argument tuple"));
        };
        match (module.as_str(), name.as_str()) {
            ("collections", "OrderedDict") if args.is_empty() => Ok(Value::Dict(Rc::default())),
            ("torch._utils", "_rebuild_tensor_v2") => {
                // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
                let [Value::Storage(s), offset, size, stride, ..] = args.as_slice() else {
                    return Err("_rebuild_tensor_v2 arguments are not (storage, offset, size, stride, ...)".into());
                };
                let size = as_usizes(size, "tensor size")?;
                let stride = as_usizes(stride, "tensor stride")?;
                if size.len() != stride.len() {
                    return Err(format!("tensor size {size:?} and stride {stride:?} differ in rank"));
                }
                Ok(Value::Tensor(TensorRef { storage: s.clone(), offset: as_usize(offset, "storage offset")?, size, stride }))
            }
            ("torch._utils", "_rebuild_parameter") => match args.first() {
                Some(t @ Value::Tensor(_)) => Ok(t.clone()),
                _ => Err("_rebuild_parameter without a tensor".into()),
            },
            _ => Err(format!("calling {module}.{name} with these arguments is not supported")),
        }
    }

    // ----------------------------------------------------------------------------------------
    // zip (stored records, as torch writes them)
    // ----------------------------------------------------------------------------------------

    struct Entry {
        name: String,
        method: u16,
        crc: u32,
        comp_size: u64,
        size: u64,
        local_offset: u64,
    }

    struct Zip<'a> {
        data: &'a [u8],
        entries: Vec<Entry>,
    }

    fn rd(data: &[u8], off: u64, n: usize) -> R<u64> {
        let off = usize::try_from(off).map_err(|_| "offset overflows")?;
        let b = data.get(off..off.checked_add(n).ok_or("offset overflows")?).ok_or("zip structure runs past the end of the file")?;
        Ok(b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64))
    }

    impl<'a> Zip<'a> {
        fn open(data: &'a [u8]) -> R<Self> {
            const EOCD: u64 = 0x0605_4b50;
            if data.len() < 22 {
                return Err("too short to be a zip archive".into());
            }
            let last = data.len() - 22;
            let eocd = (last.saturating_sub(65535)..=last)
                .rev()
                .find(|&i| rd(data, i as u64, 4).ok() == Some(EOCD))
                .ok_or("no zip end-of-central-directory record (truncated file?)")? as u64;
            let mut count = rd(data, eocd + 10, 2)?;
            let mut cd_offset = rd(data, eocd + 16, 4)?;
            if count == 0xFFFF || cd_offset == 0xFFFF_FFFF {
                // zip64: the locator sits just before the classic record.
                let loc = eocd.checked_sub(20).ok_or("zip64 locator missing")?;
                if rd(data, loc, 4)? != 0x0706_4b50 {
                    return Err("zip64 locator missing".into());
                }
                let z = rd(data, loc + 8, 8)?;
                if rd(data, z, 4)? != 0x0606_4b50 {
                    return Err("zip64 end-of-central-directory record missing".into());
                }
                count = rd(data, z + 32, 8)?;
                cd_offset = rd(data, z + 48, 8)?;
            }
            let mut entries = Vec::new();
            let mut p = cd_offset;
            for _ in 0..count {
                if rd(data, p, 4)? != 0x0201_4b50 {
                    return Err("corrupt zip central directory".into());
                }
                let method = rd(data, p + 10, 2)? as u16;
                let crc = rd(data, p + 16, 4)? as u32;
                let mut comp_size = rd(data, p + 20, 4)?;
                let mut size = rd(data, p + 24, 4)?;
                let name_len = rd(data, p + 28, 2)?;
                let extra_len = rd(data, p + 30, 2)?;
                let comment_len = rd(data, p + 32, 2)?;
                let mut local_offset = rd(data, p + 42, 4)?;
                let name_start = usize::try_from(p + 46).map_err(|_| "offset overflows")?;
                let name = data
                    .get(name_start..name_start + name_len as usize)
                    .ok_or("zip entry name runs past the end of the file")?;
                let name = String::from_utf8_lossy(name).into_owned();
                // zip64 extra field: 64-bit values for the 32-bit fields that are saturated.
                let mut e = p + 46 + name_len;
                let extra_end = e + extra_len;
                while e + 4 <= extra_end {
                    let (id, len) = (rd(data, e, 2)?, rd(data, e + 2, 2)?);
                    if id == 1 {
                        let mut q = e + 4;
                        for field in [&mut size, &mut comp_size, &mut local_offset] {
                            if *field == 0xFFFF_FFFF {
                                *field = rd(data, q, 8)?;
                                q += 8;
                            }
                        }
                    }
                    e += 4 + len;
                }
                entries.push(Entry { name, method, crc, comp_size, size, local_offset });
                p = extra_end + comment_len;
            }
            Ok(Zip { data, entries })
        }

        fn names(&self) -> impl Iterator<Item = &str> {
            self.entries.iter().map(|e| e.name.as_str())
        }

        /// A record's bytes, CRC-checked; `None` when there is no such record.
        fn read(&self, name: &str) -> R<Option<&'a [u8]>> {
            let Some(e) = self.entries.iter().find(|e| e.name == name) else {
                return Ok(None);
            };
            if e.method != 0 || e.comp_size != e.size {
                return Err(format!("record {name} is compressed (method {}); torch.save stores records uncompressed", e.method));
            }
            if rd(self.data, e.local_offset, 4)? != 0x0403_4b50 {
                return Err(format!("record {name}: corrupt local header"));
            }
            let start = e.local_offset + 30 + rd(self.data, e.local_offset + 26, 2)? + rd(self.data, e.local_offset + 28, 2)?;
            let (start, len) = (usize::try_from(start).map_err(|_| "offset overflows")?, usize::try_from(e.size).map_err(|_| "size overflows")?);
            let bytes = self
                .data
                .get(start..start.checked_add(len).ok_or("size overflows")?)
                .ok_or_else(|| format!("record {name} runs past the end of the file (truncated?)"))?;
            if crc32(bytes) != e.crc {
                return Err(format!("record {name} fails its CRC check (corrupt file)"));
            }
            Ok(Some(bytes))
        }
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
}
