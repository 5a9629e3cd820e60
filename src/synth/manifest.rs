//! The record of how every synthetic image was made, one JSON object per line
//! (`manifest.jsonl`), sorted by class then sample index so that any split of the work into
//! shards, threads or batches produces the same file.
//!
//! While a run is in progress each finished sample leaves its record in
//! `.records/<class>/<id>.json` (written atomically after its image): that is what resume reads,
//! and what [`collect`] assembles into the manifest at the end.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One synthetic image. The fields after `method` up to `lora_sha256` describe how the method
/// made it; a method leaves those it has no use for at their defaults.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// `<class>_<index>`, also the file stem.
    pub id: String,
    /// The synthesis method (`diffii`; records written before the tag existed read as `diffii`).
    #[serde(default = "default_method")]
    pub method: String,
    pub class: String,
    pub class_index: usize,
    pub index: usize,
    /// Image path relative to the output folder.
    pub file: String,
    pub output_sha256: String,
    /// The two source images (dataset-relative paths) and their file hashes.
    pub sources: [String; 2],
    pub source_sha256: [String; 2],
    /// `slerp`, `circle`, or `single-image` (a class with one image: its own inversion).
    pub interp: String,
    /// Slerp parameter (slerp), or the official `-alpha` (circle), as passed to slerp.
    pub t: f64,
    /// Circle: fraction of a full turn drawn; alpha = frac * 2 pi / theta.
    pub frac: Option<f64>,
    pub alpha: Option<f64>,
    pub theta: f64,
    pub cos: f64,
    /// True when slerp fell back to linear interpolation (nearly parallel latents).
    pub lerp: bool,
    /// Stage-2 (and inversion) prompt, and the stage-1 prompt with its scene suffix.
    pub prompt: String,
    pub stage1_prompt: String,
    pub suffix: String,
    pub strength: f64,
    pub stage1_steps: usize,
    pub steps: usize,
    pub inversion_steps: usize,
    pub guidance: f64,
    pub seed: u64,
    pub size: usize,
    pub model_sha256: String,
    pub concepts_sha256: String,
    pub lora_sha256: Option<String>,
    /// The label of an image made from another class's image (Diff-Mix): (class, weight) pairs
    /// summing to 1. Empty when the image is wholly of `class`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub soft_label: Vec<(String, f64)>,
    /// Why a filter pass ([`crate::experiment::filter`]) dropped this image from training;
    /// absent for a kept (or never filtered) image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped: Option<String>,
    /// Hash of every generation setting: a record is only reused by a run with the same one.
    pub run_sha256: String,
}

fn default_method() -> String {
    "diffii".into()
}

pub const MANIFEST: &str = "manifest.jsonl";
pub const RECORDS_DIR: &str = ".records";

/// Where the record of sample `id` of `class_dir` lives.
pub fn record_path(out: &Path, class_dir: &str, id: &str) -> PathBuf {
    out.join(RECORDS_DIR).join(class_dir).join(format!("{id}.json"))
}

/// Reads one record; `None` when absent or unreadable (a run killed mid-write leaves no
/// partial record thanks to atomic writes, but a foreign file must not stop a resume).
pub fn read_record(path: &Path) -> Option<Record> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Sorts records into manifest order.
pub fn sort(records: &mut [Record]) {
    records.sort_by(|a, b| (a.class_index, a.index, &a.id).cmp(&(b.class_index, b.index, &b.id)));
}

/// Serialises records as JSON lines (sorted).
pub fn to_jsonl(records: &[Record]) -> Result<String> {
    let mut recs = records.to_vec();
    sort(&mut recs);
    let mut s = String::new();
    for r in &recs {
        s.push_str(&serde_json::to_string(r).map_err(|e| Error::invalid(e.to_string()))?);
        s.push('\n');
    }
    Ok(s)
}

/// Reads a manifest (or shard manifest) file.
pub fn read_jsonl(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::bad_file(path, format!("line {}: not a manifest record: {e}", i + 1)))
        })
        .collect()
}

/// All records under `out/.records`, sorted.
pub fn collect(out: &Path) -> Result<Vec<Record>> {
    let dir = out.join(RECORDS_DIR);
    let mut recs = Vec::new();
    if !dir.is_dir() {
        return Ok(recs);
    }
    for class in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
        let class = class.map_err(|e| Error::io(&dir, e))?.path();
        if !class.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&class).map_err(|e| Error::io(&class, e))? {
            let p = f.map_err(|e| Error::io(&class, e))?.path();
            if p.extension().is_some_and(|e| e == "json") {
                if let Some(r) = read_record(&p) {
                    recs.push(r);
                }
            }
        }
    }
    sort(&mut recs);
    Ok(recs)
}

/// Merges manifests (e.g. one per shard) into one sorted list; the same sample twice with
/// different content is an error (shards of different runs), the same twice identical is kept once.
pub fn merge(inputs: &[PathBuf]) -> Result<Vec<Record>> {
    let mut all: Vec<Record> = Vec::new();
    for p in inputs {
        all.extend(read_jsonl(p)?);
    }
    sort(&mut all);
    let mut out: Vec<Record> = Vec::with_capacity(all.len());
    for r in all {
        if let Some(last) = out.last() {
            if last.id == r.id && last.class_index == r.class_index {
                if *last != r {
                    return Err(Error::invalid(format!(
                        "sample {} appears twice with different content: the manifests come from different runs",
                        r.id
                    )));
                }
                continue;
            }
        }
        out.push(r);
    }
    Ok(out)
}
