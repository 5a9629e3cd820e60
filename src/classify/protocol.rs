//! Evaluation protocols: which real images a run trains and validates on.
//!
//! Per class, the images are shuffled with a generator seeded by (run seed, class name); the
//! first `val_per_class` become the validation split, which selects the epoch (test accuracy is
//! never used to choose anything); from the rest the training images are taken: all of them,
//! `shots` of them (few-shot: a different draw per seed from the larger pool), or, with
//! `imbalance` r, an exponential long-tail profile where class c keeps
//! round(m r^(c / (C - 1))) images (at least one), m being the smallest class pool.
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::data::dataset::Dataset;
use crate::error::{Error, Result};
use crate::rng::derive_rng;

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitSpec {
    pub val_per_class: usize,
    pub shots: Option<usize>,
    pub imbalance: Option<f64>,
}

/// Dataset item indices of the two splits, each sorted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    pub train: Vec<usize>,
    pub val: Vec<usize>,
}

pub fn split(ds: &Dataset, spec: &SplitSpec, seed: u64) -> Result<Split> {
    if spec.shots == Some(0) {
        return Err(Error::invalid("--shots must be at least 1"));
    }
    if let Some(r) = spec.imbalance {
        if !(r > 0.0 && r <= 1.0) {
            return Err(Error::invalid(format!("--imbalance {r} must lie in (0, 1]")));
        }
    }
    let members = ds.class_members();
    let mut pools = Vec::new();
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (c, m) in members.iter().enumerate() {
        let name = &ds.classes[c];
        let need = spec.val_per_class + spec.shots.unwrap_or(1);
        if m.len() < need {
            return Err(Error::invalid(format!(
                "class `{name}` has {} images; this protocol needs {need} ({} for validation, {} for training)",
                m.len(),
                spec.val_per_class,
                spec.shots.unwrap_or(1)
            )));
        }
        let mut order = m.clone();
        order.shuffle(&mut derive_rng(&[b"diffii-split\0", &seed.to_le_bytes(), name.as_bytes()]));
        val.extend_from_slice(&order[..spec.val_per_class]);
        pools.push(order[spec.val_per_class..].to_vec());
    }
    let smallest = pools.iter().map(|p| p.len()).min().unwrap_or(0);
    let n_classes = pools.len();
    for (c, pool) in pools.iter().enumerate() {
        let base = spec.shots.unwrap_or(pool.len()).min(pool.len());
        let n = match spec.imbalance {
            Some(r) if n_classes > 1 => {
                let m = spec.shots.unwrap_or(smallest).min(smallest) as f64;
                ((m * r.powf(c as f64 / (n_classes - 1) as f64)).round() as usize).clamp(1, base)
            }
            _ => base,
        };
        train.extend_from_slice(&pool[..n]);
    }
    train.sort_unstable();
    val.sort_unstable();
    Ok(Split { train, val })
}
