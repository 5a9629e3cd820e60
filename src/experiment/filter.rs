//! Filtering a synthetic set before training: a classifier trained on the real images alone
//! judges every synthetic image, and an image is dropped when it gives the intended class less
//! than a minimum confidence (softmax probability), or when the image is blank (a uniform
//! picture: a generator that diverged or decoded nothing). NaN never reaches a PNG: the
//! synthesis driver refuses non-finite images before writing them.
//!
//! The manifest keeps every record and marks each drop with its reason (`dropped`), so what was
//! removed, and why, stays on record; [`crate::classify::data::synthetic_dataset`] leaves
//! dropped images out of training. Filtering is idempotent: a record's decision depends only on
//! its image, the judge and the threshold, and reapplying it rewrites the same manifest.
use std::path::Path;

use candle_core::D;
use serde::{Deserialize, Serialize};

use crate::classify::data::batch_tensor;
use crate::classify::resnet::ResNet;
use crate::classify::train::ModelInfo;
use crate::data::atomic::write_atomic;
use crate::data::image::load_for_model;
use crate::error::{Error, Result};
use crate::synth::manifest::{self, MANIFEST};

/// What a filter pass decided.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FilterSummary {
    pub min_confidence: f64,
    pub kept: usize,
    pub dropped_low_confidence: usize,
    pub dropped_blank: usize,
}

impl FilterSummary {
    pub fn dropped(&self) -> usize {
        self.dropped_low_confidence + self.dropped_blank
    }
}

/// A picture whose pixel values all lie within this many levels of each other is blank.
const BLANK_RANGE: u8 = 2;

/// Judges every record of `dir/manifest.jsonl` with `judge` (trained on the real images of
/// `info.classes`) and rewrites the manifest with each drop marked. `min_confidence` in [0, 1].
pub fn apply(dir: &Path, judge: &ResNet, info: &ModelInfo, min_confidence: f64) -> Result<FilterSummary> {
    if !(0.0..=1.0).contains(&min_confidence) {
        return Err(Error::invalid(format!("--filter-min {min_confidence} must lie in [0, 1]")));
    }
    let path = dir.join(MANIFEST);
    let mut records = manifest::read_jsonl(&path)?;
    let mut summary = FilterSummary { min_confidence, ..FilterSummary::default() };
    for chunk in records.chunks_mut(256) {
        let mut images = Vec::with_capacity(chunk.len());
        for r in chunk.iter() {
            images.push(load_for_model(dir.join(&r.file), info.size, info.resize)?.0);
        }
        let refs: Vec<&[u8]> = images.iter().map(|p| p.as_slice()).collect();
        let logits = judge.forward(&batch_tensor(&refs, info.size, &judge.device())?, false)?;
        let probs: Vec<Vec<f32>> = candle_nn::ops::softmax(&logits, D::Minus1)?.to_vec2()?;
        for ((r, px), p) in chunk.iter_mut().zip(&images).zip(&probs) {
            let class = info.classes.iter().position(|c| *c == r.class).ok_or_else(|| {
                Error::bad_file(&path, format!("{}: class `{}` is not one the judge knows ({})", r.id, r.class, info.classes.join(", ")))
            })?;
            let (lo, hi) = px.iter().fold((u8::MAX, u8::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            r.dropped = if hi - lo <= BLANK_RANGE {
                summary.dropped_blank += 1;
                Some(format!("blank: every pixel within {BLANK_RANGE} levels of {lo}"))
            } else if (p[class] as f64) < min_confidence {
                summary.dropped_low_confidence += 1;
                Some(format!("confidence {:.3} for `{}` is below {min_confidence}", p[class], r.class))
            } else {
                summary.kept += 1;
                None
            };
        }
    }
    write_atomic(&path, manifest::to_jsonl(&records)?.as_bytes())?;
    Ok(summary)
}
