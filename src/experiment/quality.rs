//! How good a synthetic set is, judged by a classifier trained on the real images alone and
//! its penultimate features:
//!
//! - **faithfulness**: the classifier's accuracy on the synthetic images with their intended
//!   labels (does an image show its class?);
//! - **diversity**: the mean pairwise feature distance within a class, synthetic over real
//!   (1 = as varied as the real images; near 0 = near-copies of each other);
//! - **novelty**: the mean distance from a synthetic image to its nearest real training image,
//!   over the same figure between real images (each to its nearest other real image); copies
//!   of training images score 0.
use serde::{Deserialize, Serialize};


use crate::classify::data::{batch_tensor, ImageSet};
use crate::classify::resnet::ResNet;
use crate::classify::train::evaluate;
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Quality {
    pub faithfulness: f64,
    pub diversity: f64,
    pub novelty: f64,
}

fn features(model: &ResNet, set: &ImageSet) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(set.len());
    for imgs in set.pixels.chunks(256) {
        let refs: Vec<&[u8]> = imgs.iter().map(|p| p.as_slice()).collect();
        let f = model.features(&batch_tensor(&refs, set.side, &model.device())?, false)?;
        out.extend(f.to_vec2::<f32>()?);
    }
    Ok(out)
}

fn dist(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt()
}

/// Mean pairwise distance within each class, averaged over classes with two or more images.
fn within_class(f: &[Vec<f32>], labels: &[usize], classes: usize) -> Option<f64> {
    let mut per = Vec::new();
    for c in 0..classes {
        let idx: Vec<usize> = (0..f.len()).filter(|&i| labels[i] == c).collect();
        if idx.len() < 2 {
            continue;
        }
        let (mut s, mut n) = (0.0, 0usize);
        for (k, &i) in idx.iter().enumerate() {
            for &j in &idx[k + 1..] {
                s += dist(&f[i], &f[j]);
                n += 1;
            }
        }
        per.push(s / n as f64);
    }
    (!per.is_empty()).then(|| per.iter().sum::<f64>() / per.len() as f64)
}

/// The three figures of `synthetic` against the `real` training images, by `model`.
pub fn measure(model: &ResNet, real: &ImageSet, synthetic: &ImageSet, classes: usize) -> Result<Quality> {
    if real.len() < 2 || synthetic.is_empty() {
        return Err(Error::invalid("quality needs at least two real and one synthetic image"));
    }
    let faithfulness = evaluate(model, synthetic)?;
    let (fr, fs) = (features(model, real)?, features(model, synthetic)?);
    let diversity = match (within_class(&fs, &synthetic.labels, classes), within_class(&fr, &real.labels, classes)) {
        (Some(s), Some(r)) if r > 0.0 => s / r,
        _ => f64::NAN,
    };
    let nearest = |f: &[f32], skip: Option<usize>| {
        fr.iter().enumerate().filter(|(i, _)| Some(*i) != skip).map(|(_, r)| dist(f, r)).fold(f64::INFINITY, f64::min)
    };
    let syn_nn = fs.iter().map(|f| nearest(f, None)).sum::<f64>() / fs.len() as f64;
    let real_nn = fr.iter().enumerate().map(|(i, f)| nearest(f, Some(i))).sum::<f64>() / fr.len() as f64;
    let novelty = if real_nn > 0.0 { syn_nn / real_nn } else { f64::NAN };
    Ok(Quality { faithfulness, diversity, novelty })
}
