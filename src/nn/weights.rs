//! Checkpoint access with the checkpoint's own key names.
//!
//! A [`Weights`] is a view on one safetensors file (memory-mapped) under a key prefix, in the
//! spirit of candle's `VarBuilder`: model code calls `w.pp("down_blocks").pp(0)` and asks for a
//! tensor by its diffusers name and expected shape. Unlike `VarBuilder`, every failure is a typed
//! error that names the file and the key, and two checkpoint dialects are handled here, once:
//! alternative spellings of a key (`text_model.` prefix present or not, old VAE attention names)
//! are tried in order when the canonical key is missing.
//!
//! Weights can also be *synthetic* (deterministic pseudo-random values made on demand) so that
//! benchmarks can build a full-size model without a checkpoint, and selected keys can be
//! returned as trainable [`Var`]s for gradient checks and fine-tuning.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor, Var};

use super::mode::Precision;
use crate::error::{Error, Result};

/// Where tensors come from.
enum Source {
    File { path: PathBuf, st: MmapedSafetensors },
    /// Deterministic N(0, 1/fan_in) values, seeded per key: for benchmarks that only need shapes.
    Synthetic { seed: u64 },
    /// Tensors made in memory (e.g. a freshly initialised model), under their full key names.
    Memory { tensors: HashMap<String, Tensor> },
}

struct Shared {
    source: Source,
    dtype: DType,
    device: Device,
    /// Substring replacements tried, in order, when a key is missing.
    aliases: Vec<(String, String)>,
    /// Keys (full names) to hand out as trainable variables.
    trainable: Vec<String>,
    /// Every tensor is handed out as a trainable variable (training from scratch).
    all_trainable: bool,
    vars: Mutex<Vec<(String, Var)>>,
}

#[derive(Clone)]
pub struct Weights {
    shared: Arc<Shared>,
    prefix: String,
    precision: Precision,
    frozen_ops: bool,
}

impl Weights {
    /// Opens a safetensors file. Tensors are converted to `dtype` on load.
    pub fn from_file(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::bad_file(path, "file not found"));
        }
        // SAFETY: the file is mapped read-only; we never write to it while mapped.
        let st = unsafe { MmapedSafetensors::new(path) }
            .map_err(|e| Error::bad_file(path, format!("not a readable safetensors file: {e}")))?;
        Ok(Self::new(Source::File { path: path.to_path_buf(), st }, dtype, device))
    }

    /// Weights held in memory, keyed by their full names.
    pub fn from_tensors(tensors: HashMap<String, Tensor>, dtype: DType, device: &Device) -> Self {
        Self::new(Source::Memory { tensors }, dtype, device)
    }

    /// Synthetic weights: every requested tensor is made from `seed` and its key.
    pub fn synthetic(seed: u64, dtype: DType, device: &Device) -> Self {
        Self::new(Source::Synthetic { seed }, dtype, device)
    }

    fn new(source: Source, dtype: DType, device: &Device) -> Self {
        let shared = Shared {
            source,
            dtype,
            device: device.clone(),
            aliases: Vec::new(),
            trainable: Vec::new(),
            all_trainable: false,
            vars: Mutex::new(Vec::new()),
        };
        Weights { shared: Arc::new(shared), prefix: String::new(), precision: Precision::F32, frozen_ops: true }
    }

    fn shared_mut(&mut self) -> &mut Shared {
        Arc::get_mut(&mut self.shared).expect("configure Weights before cloning it")
    }

    /// Adds an alternative spelling: when `key` is missing, `key.replacen(from, to, 1)` is tried.
    pub fn with_alias(mut self, from: &str, to: &str) -> Self {
        self.shared_mut().aliases.push((from.to_string(), to.to_string()));
        self
    }

    /// Marks full keys whose tensors are returned as trainable variables.
    pub fn with_trainable(mut self, keys: &[&str]) -> Self {
        self.shared_mut().trainable.extend(keys.iter().map(|k| k.to_string()));
        self
    }

    /// Hands out every tensor as a trainable variable.
    pub fn with_all_trainable(mut self) -> Self {
        self.shared_mut().all_trainable = true;
        self
    }

    /// The variables handed out so far for keys marked trainable.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.shared.vars.lock().unwrap().clone()
    }

    /// The layers loaded from these weights run their products at `precision` (default f32).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Whether the layers loaded from these weights skip their frozen weights' gradients
    /// ([`crate::nn::frozen`]; default on). Off, they back-propagate as candle's own ops do,
    /// which the benchmarks compare against.
    pub fn with_frozen_ops(mut self, on: bool) -> Self {
        self.frozen_ops = on;
        self
    }

    pub fn frozen_ops(&self) -> bool {
        self.frozen_ops
    }

    pub fn dtype(&self) -> DType {
        self.shared.dtype
    }

    pub fn device(&self) -> &Device {
        &self.shared.device
    }

    /// The file behind these weights (for error messages); `<synthetic>` otherwise.
    pub fn path(&self) -> PathBuf {
        match &self.shared.source {
            Source::File { path, .. } => path.clone(),
            Source::Synthetic { .. } => PathBuf::from("<synthetic>"),
            Source::Memory { .. } => PathBuf::from("<memory>"),
        }
    }

    /// A view one level deeper: `pp("conv_in")`, `pp(0)`.
    pub fn pp(&self, name: impl ToString) -> Self {
        let name = name.to_string();
        let prefix = if self.prefix.is_empty() { name } else { format!("{}.{name}", self.prefix) };
        Weights { shared: self.shared.clone(), prefix, precision: self.precision, frozen_ops: self.frozen_ops }
    }

    /// The full checkpoint key of `name` under this prefix.
    pub fn key(&self, name: &str) -> String {
        self.full_key(name)
    }

    fn full_key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The candidate keys for `key`, canonical first.
    fn candidates(&self, key: &str) -> Vec<String> {
        let mut out = vec![key.to_string()];
        for (from, to) in &self.shared.aliases {
            let n = out.len();
            for i in 0..n {
                if out[i].contains(from.as_str()) {
                    let alt = out[i].replacen(from.as_str(), to, 1);
                    if !out.contains(&alt) {
                        out.push(alt);
                    }
                }
            }
        }
        out
    }

    /// Whether the tensor `name` exists under this prefix (in any spelling).
    pub fn contains(&self, name: &str) -> bool {
        match &self.shared.source {
            Source::File { st, .. } => {
                self.candidates(&self.full_key(name)).iter().any(|k| st.get(k).is_ok())
            }
            Source::Synthetic { .. } => true,
            Source::Memory { tensors } => tensors.contains_key(&self.full_key(name)),
        }
    }

    /// The tensor `name` with the expected `shape`, converted to the target dtype and device.
    pub fn get(&self, shape: &[usize], name: &str) -> Result<Tensor> {
        let key = self.full_key(name);
        let t = match &self.shared.source {
            Source::File { path, st } => {
                let found = self.candidates(&key).into_iter().find(|k| st.get(k).is_ok());
                let Some(k) = found else {
                    return Err(Error::Tensor {
                        path: path.clone(),
                        key,
                        msg: "missing from the checkpoint (is this the right model folder?)".into(),
                    });
                };
                let t = st.load(&k, &self.shared.device).map_err(|e| Error::Tensor {
                    path: path.clone(),
                    key: k.clone(),
                    msg: format!("cannot load: {e}"),
                })?;
                let t = fit_shape(t, shape).map_err(|have| Error::Tensor {
                    path: path.clone(),
                    key: k.clone(),
                    msg: format!("has shape {have:?}, the config implies {shape:?}"),
                })?;
                if !t.dtype().is_float() {
                    return Err(Error::Tensor {
                        path: path.clone(),
                        key: k,
                        msg: format!("has dtype {:?}, expected a floating-point tensor", t.dtype()),
                    });
                }
                t.to_dtype(self.shared.dtype)?
            }
            Source::Synthetic { seed } => synthetic_tensor(*seed, &key, shape, self.shared.dtype, &self.shared.device)?,
            Source::Memory { tensors } => {
                let t = tensors.get(&key).ok_or_else(|| Error::Tensor {
                    path: PathBuf::from("<memory>"),
                    key: key.clone(),
                    msg: "missing".into(),
                })?;
                if t.dims() != shape {
                    return Err(Error::Tensor {
                        path: PathBuf::from("<memory>"),
                        key,
                        msg: format!("has shape {:?}, expected {shape:?}", t.dims()),
                    });
                }
                t.to_dtype(self.shared.dtype)?.to_device(&self.shared.device)?
            }
        };
        if self.shared.all_trainable || self.shared.trainable.iter().any(|k| *k == key) {
            let var = Var::from_tensor(&t)?;
            let out = var.as_tensor().clone();
            self.shared.vars.lock().unwrap().push((key, var));
            return Ok(out);
        }
        Ok(t)
    }

    /// Names, shapes and stored dtypes of all tensors in the file (empty for synthetic
    /// weights). A dtype candle cannot hold is an error naming the tensor.
    pub fn tensor_infos(&self) -> Result<Vec<(String, Vec<usize>, DType)>> {
        match &self.shared.source {
            Source::File { st, path } => {
                let mut v = Vec::new();
                for (k, view) in st.tensors() {
                    let dt = DType::try_from(view.dtype()).map_err(|_| Error::Tensor {
                        path: path.clone(),
                        key: k.clone(),
                        msg: format!("stored as {:?}, which is not supported", view.dtype()),
                    })?;
                    v.push((k, view.shape().to_vec(), dt));
                }
                v.sort_by(|a, b| a.0.cmp(&b.0));
                Ok(v)
            }
            Source::Synthetic { .. } => Ok(Vec::new()),
            Source::Memory { tensors } => {
                let mut v: Vec<_> = tensors.iter().map(|(k, t)| (k.clone(), t.dims().to_vec(), t.dtype())).collect();
                v.sort_by(|a, b| a.0.cmp(&b.0));
                Ok(v)
            }
        }
    }
}

/// Accepts a stored tensor whose shape equals `want`, or differs only by trailing 1x1 spatial
/// dims (old checkpoints store some linear layers as 1x1 convolutions and vice versa).
fn fit_shape(t: Tensor, want: &[usize]) -> std::result::Result<Tensor, Vec<usize>> {
    let have = t.dims().to_vec();
    if have == want {
        return Ok(t);
    }
    let strip = |s: &[usize]| -> Vec<usize> {
        let mut s = s.to_vec();
        while s.len() > 2 && s[s.len() - 1] == 1 && s[s.len() - 2] == 1 {
            s.truncate(s.len() - 2);
        }
        s
    };
    if strip(&have) == strip(want) {
        return t.reshape(want).map_err(|_| have);
    }
    Err(have)
}

/// Deterministic N(0, 1/fan_in) tensor for key `key` (norm weights: 1, biases: 0), so that
/// activations of a synthetic model stay in a normal range. Values are drawn in fixed-size
/// chunks, each from its own seeded stream, so filling is parallel yet independent of threads.
fn synthetic_tensor(seed: u64, key: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let n: usize = shape.iter().product();
    let is_norm = key.contains("norm") && shape.len() == 1;
    if key.ends_with("bias") {
        return Ok(Tensor::zeros(shape, dtype, device)?);
    }
    if is_norm {
        return Ok(Tensor::ones(shape, dtype, device)?);
    }
    let fan_in: usize = if shape.len() >= 2 { shape[1..].iter().product() } else { shape[0] };
    let std = 1.0 / (fan_in.max(1) as f32).sqrt();
    let mut h = seed ^ 0x9E37_79B9_7F4A_7C15;
    for b in key.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01B3);
    }
    let normal = rand_distr::Normal::new(0f32, std).expect("valid std");
    let mut data = vec![0f32; n];
    data.par_chunks_mut(CHUNK).enumerate().for_each(|(i, chunk)| {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(h.wrapping_add(i as u64));
        for v in chunk.iter_mut() {
            *v = normal.sample(&mut rng);
        }
    });
    Ok(Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?)
}

/// Reads every tensor of a safetensors file (small files: concepts, LoRA).
pub fn load_all(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    if !path.is_file() {
        return Err(Error::bad_file(path, "file not found"));
    }
    candle_core::safetensors::load(path, device)
        .map_err(|e| Error::bad_file(path, format!("not a readable safetensors file: {e}")))
}

/// Writes tensors (converted to f32 on the CPU) and string metadata as a safetensors file,
/// atomically (temporary file + rename) and reproducibly: the header's JSON keys are sorted, so
/// equal inputs give equal bytes (the `safetensors` crate writes metadata in hash-map order,
/// which changes from process to process).
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)], metadata: Option<HashMap<String, String>>) -> Result<()> {
    let cpu = tensors
        .iter()
        .map(|(k, t)| Ok((k.as_str(), t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<Vec<_>>>()?;
    let mut bytes = safetensors::serialize(cpu.iter().map(|(k, t)| (*k, t)), metadata)
        .map_err(|e| Error::bad_file(path, format!("cannot serialise: {e}")))?;
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value = serde_json::from_slice(bytes[8..8 + n].trim_ascii_end())
        .map_err(|e| Error::bad_file(path, format!("cannot serialise: {e}")))?;
    let mut canon = String::with_capacity(n);
    canonical_json(&header, &mut canon);
    // Same keys and values in another order: the same length; pad as the writer did.
    if canon.len() > n {
        return Err(Error::bad_file(path, "cannot serialise: header grew when sorted"));
    }
    // Padded by hand: format! widths stop at 65 535, and big checkpoints' headers are longer.
    let header = &mut bytes[8..8 + n];
    header[..canon.len()].copy_from_slice(canon.as_bytes());
    header[canon.len()..].fill(b' ');
    crate::data::atomic::write_atomic(path, &bytes)
}

/// Compact JSON with object keys in sorted order.
fn canonical_json(v: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String((*k).clone()).to_string());
                out.push(':');
                canonical_json(&m[k.as_str()], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(x, out);
            }
            out.push(']');
        }
        leaf => out.push_str(&leaf.to_string()),
    }
}
