//! Concept tokens learned by textual inversion, in diffusers' format: a safetensors file
//! `{token: row}` (row [hidden] or [1, hidden]), optionally with a `concepts.json` beside it
//! that fixes the token order and maps class names to tokens.
use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

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
        let map = load_all(embeds, device)?;
        let meta_path = embeds.with_file_name("concepts.json");
        let meta: ConceptsJson = if meta_path.is_file() { read_json(&meta_path)? } else { ConceptsJson::default() };
        let tokens: Vec<String> = if meta.order.is_empty() {
            map.keys().cloned().collect::<std::collections::BTreeSet<_>>().into_iter().collect()
        } else {
            meta.order.clone()
        };
        if tokens.is_empty() {
            return Err(Error::bad_file(embeds, "holds no concept tokens"));
        }
        let mut rows = Vec::with_capacity(tokens.len());
        for tok in &tokens {
            let Some(t) = map.get(tok) else {
                return Err(Error::Tensor {
                    path: embeds.to_path_buf(),
                    key: tok.clone(),
                    msg: format!("listed in {} but missing from the file", meta_path.display()),
                });
            };
            let n = t.elem_count();
            if n != hidden {
                return Err(Error::Tensor {
                    path: embeds.to_path_buf(),
                    key: tok.clone(),
                    msg: format!(
                        "has shape {:?}; the text encoder needs one row of {hidden} values \
                         (multi-vector concepts are not supported)",
                        t.dims()
                    ),
                });
            }
            rows.push(t.to_dtype(DType::F32)?.reshape(hidden)?);
        }
        for (class, tok) in &meta.name2placeholder {
            if !tokens.contains(tok) {
                return Err(Error::bad_file(&meta_path, format!("class `{class}` maps to `{tok}`, which has no row")));
            }
        }
        Ok(Concepts { tokens, rows: Tensor::stack(&rows, 0)?, class_to_token: meta.name2placeholder })
    }
}
