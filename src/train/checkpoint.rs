//! Resumable training checkpoints, one safetensors file: named tensors (what is being
//! trained), the AdamW moments and step count of each optimiser, the position to continue from
//! (e.g. phase and step), and the hash of the run's settings, so a checkpoint is only ever
//! resumed by the run that wrote it.
//!
//! Layout: tensors under their own names plus `adam.<optimiser>.<i>.m` / `.v`; metadata
//! `config_sha256`, `data_sha256` (over every tensor's name and f32 values, in name order: a
//! corrupted file is refused, never resumed from), one entry per position key, and
//! `adam.<optimiser>.t`.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::train::optim::AdamW;

/// Moments m and v of each variable, and the step count.
pub type AdamState = (Vec<Tensor>, Vec<Tensor>, usize);

/// Writes a checkpoint atomically. Optimisers given as `None` are left out (e.g. at the end of a
/// phase, whose optimiser is not continued).
pub fn write(
    path: &Path,
    settings_sha256: &str,
    position: &[(&str, usize)],
    mut tensors: Vec<(String, Tensor)>,
    optimizers: &[(&str, Option<&AdamW>)],
) -> Result<()> {
    let mut meta: HashMap<String, String> = position.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    meta.insert("config_sha256".into(), settings_sha256.into());
    for (name, opt) in optimizers {
        if let Some(o) = opt {
            let (m, v) = o.moments();
            for (i, (m, v)) in m.iter().zip(v).enumerate() {
                tensors.push((format!("adam.{name}.{i}.m"), m.clone()));
                tensors.push((format!("adam.{name}.{i}.v"), v.clone()));
            }
            meta.insert(format!("adam.{name}.t"), o.t.to_string());
        }
    }
    meta.insert("data_sha256".into(), data_sha256(tensors.iter().map(|(k, t)| (k.as_str(), t)))?);
    crate::nn::weights::save_safetensors(path, &tensors, Some(meta))
}

/// SHA-256 over (name, f32 little-endian values) of every tensor, in name order.
fn data_sha256<'a>(tensors: impl Iterator<Item = (&'a str, &'a Tensor)>) -> Result<String> {
    use sha2::Digest;
    let mut sorted: Vec<(&str, &Tensor)> = tensors.collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut h = sha2::Sha256::new();
    for (k, t) in sorted {
        h.update(k.as_bytes());
        h.update([0]);
        for v in t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()? {
            h.update(v.to_le_bytes());
        }
    }
    Ok(crate::hash::hex(&h.finalize()))
}

/// A checkpoint read back.
pub struct Checkpoint {
    path: PathBuf,
    meta: HashMap<String, String>,
    tensors: HashMap<String, Tensor>,
}

impl Checkpoint {
    /// Reads `path` onto `device`; an error unless it was written with `settings_sha256`.
    pub fn read(path: &Path, device: &Device, settings_sha256: &str) -> Result<Self> {
        let bad = |m: String| Error::bad_file(path, m);
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (_, md) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(format!("not a checkpoint: {e}")))?;
        let meta = md.metadata().clone().unwrap_or_default();
        if meta.get("config_sha256").map(String::as_str) != Some(settings_sha256) {
            return Err(bad("this checkpoint belongs to a run with other settings; delete it or use another --out".into()));
        }
        let tensors = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| bad(format!("cannot read tensors: {e}")))?;
        if meta.get("data_sha256") != Some(&data_sha256(tensors.iter().map(|(k, t)| (k.as_str(), t)))?) {
            return Err(bad("this checkpoint is corrupted (its tensors do not match the checksum written with them); delete it to restart the run".into()));
        }
        Ok(Checkpoint { path: path.to_path_buf(), meta, tensors })
    }

    /// A position entry (e.g. `step`).
    pub fn position(&self, key: &str) -> Result<usize> {
        self.meta
            .get(key)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Error::bad_file(&self.path, format!("checkpoint metadata lacks `{key}`")))
    }

    /// A tensor by name.
    pub fn tensor(&self, key: &str) -> Result<Tensor> {
        self.tensors.get(key).cloned().ok_or_else(|| Error::bad_file(&self.path, format!("checkpoint lacks tensor `{key}`")))
    }

    /// The state of optimiser `name` over `n` variables, if it was saved.
    pub fn optimizer(&self, name: &str, n: usize) -> Result<Option<AdamState>> {
        let key = format!("adam.{name}.t");
        if !self.meta.contains_key(&key) {
            return Ok(None);
        }
        let m = (0..n).map(|i| self.tensor(&format!("adam.{name}.{i}.m"))).collect::<Result<Vec<_>>>()?;
        let v = (0..n).map(|i| self.tensor(&format!("adam.{name}.{i}.v"))).collect::<Result<Vec<_>>>()?;
        Ok(Some((m, v, self.position(&key)?)))
    }
}
