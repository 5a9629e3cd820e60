//! The inversion cache: one safetensors file per source image holding its DDIM-inverted
//! latent, with metadata describing exactly how it was made (image hash, model and concept
//! hashes, prompt, steps, size, resize policy, dtype) and the SHA-256 of the latent's bytes. An
//! entry is reused only if every field matches and the latent still has its checksum; anything
//! else (a corrupted file included) is recomputed and overwritten, never silently reused.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Everything an inverted latent depends on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InversionKey {
    pub image_sha256: String,
    pub model_sha256: String,
    pub concepts_sha256: String,
    pub lora_sha256: String,
    pub prompt: String,
    pub steps: usize,
    pub size: usize,
    pub resize: String,
    /// The UNet's dtype and product precision, and `/gpu` for inversions made on a GPU.
    pub dtype: String,
}

impl InversionKey {
    fn to_metadata(&self) -> HashMap<String, String> {
        let v = serde_json::to_value(self).expect("serialisable");
        let mut m = HashMap::new();
        if let serde_json::Value::Object(o) = v {
            for (k, v) in o {
                m.insert(k, match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                });
            }
        }
        m.insert("format".into(), "diffii-inversion-1".into());
        m
    }

    /// The first field that differs from a stored entry's metadata, for the log.
    fn mismatch(&self, stored: &HashMap<String, String>) -> Option<String> {
        let want: BTreeMap<_, _> = self.to_metadata().into_iter().collect();
        for (k, v) in &want {
            match stored.get(k) {
                Some(s) if s == v => {}
                Some(s) => return Some(format!("{k}: cached {s:?}, now {v:?}")),
                None => return Some(format!("{k}: missing")),
            }
        }
        None
    }
}

/// Cache file for a dataset-relative image path.
pub fn entry_path(cache_dir: &Path, image_rel: &str) -> PathBuf {
    cache_dir.join(format!("{image_rel}.inv.safetensors"))
}

/// Outcome of a lookup.
pub enum Lookup {
    Hit(Tensor),
    Miss,
    /// An entry exists but was made differently; the reason names the first differing field.
    Stale(String),
}

/// Looks up the latent for `key` at `path`.
pub fn load(path: &Path, key: &InversionKey, device: &Device) -> Result<Lookup> {
    if !path.is_file() {
        return Ok(Lookup::Miss);
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let parsed = (|| -> std::result::Result<(HashMap<String, String>, Tensor), String> {
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| e.to_string())?;
        let meta = meta.metadata().clone().unwrap_or_default();
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| e.to_string())?;
        let view = st.tensor("latent").map_err(|e| e.to_string())?;
        if view.dtype() != safetensors::Dtype::F32 {
            return Err("latent is not f32".into());
        }
        if meta.get("latent_sha256") != Some(&crate::hash::sha256_bytes(view.data())) {
            return Err("its latent does not match the checksum stored with it: corrupted".into());
        }
        let data: Vec<f32> = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let t = Tensor::from_vec(data, view.shape(), device).map_err(|e| e.to_string())?;
        Ok((meta, t))
    })();
    match parsed {
        Err(e) => Ok(Lookup::Stale(format!("unreadable cache entry ({e})"))),
        Ok((meta, t)) => match key.mismatch(&meta) {
            Some(reason) => Ok(Lookup::Stale(reason)),
            None => Ok(Lookup::Hit(t)),
        },
    }
}

/// Stores `latent` for `key` at `path` (atomically; the header is written in a canonical
/// order, so the same latent and key give the same bytes).
pub fn store(path: &Path, key: &InversionKey, latent: &Tensor) -> Result<()> {
    let values = latent.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut meta = key.to_metadata();
    meta.insert("latent_sha256".into(), crate::hash::sha256_bytes(&bytes));
    crate::nn::weights::save_safetensors(path, &[("latent".to_string(), latent.clone())], Some(meta))
}
