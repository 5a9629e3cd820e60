//! Images for classifier training and evaluation: decoded once into RGB8 squares of the
//! training size, then augmented per draw (random resized crop, optional horizontal flip) and
//! batched as [-1, 1] NCHW tensors. Every draw comes from a generator the caller seeds, so a run
//! is the same whatever the thread count.
use candle_core::{Device, Tensor};
use rand::Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::dataset::Dataset;
use crate::data::image::{load_for_model, ResizePolicy};
use crate::data::pixels::u8_to_tensor;
use crate::error::{Error, Result};

/// Decoded images (HWC RGB8, `side` x `side`) with their labels.
#[derive(Clone, Debug, Default)]
pub struct ImageSet {
    pub side: usize,
    pub pixels: Vec<Vec<u8>>,
    pub labels: Vec<usize>,
}

impl ImageSet {
    /// Loads the items `indices` of `ds` at `side` pixels (decoded in parallel; order kept).
    pub fn load(ds: &Dataset, indices: &[usize], side: usize, resize: ResizePolicy) -> Result<Self> {
        let pixels = indices
            .par_iter()
            .map(|&i| load_for_model(&ds.items[i].path, side, resize).map(|(px, _)| px))
            .collect::<Result<Vec<_>>>()?;
        Ok(ImageSet {
            side,
            pixels,
            labels: indices.iter().map(|&i| ds.items[i].class).collect(),
        })
    }

    pub fn len(&self) -> usize {
        self.pixels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pixels.is_empty()
    }

    /// Indices of each class's images, for `classes` classes.
    pub fn by_class(&self, classes: usize) -> Vec<Vec<usize>> {
        let mut out = vec![Vec::new(); classes];
        for (i, &c) in self.labels.iter().enumerate() {
            if c < classes {
                out[c].push(i);
            }
        }
        out
    }
}

/// Training-time augmentation, the same for every method.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Augment {
    /// Area fraction range of torchvision's `RandomResizedCrop` (its default is 0.08-1, too
    /// aggressive for 28-64 px images; 0.35-1 keeps the object).
    pub crop_scale: (f64, f64),
    /// Aspect ratio range (torchvision's default 3/4-4/3).
    pub crop_ratio: (f64, f64),
    /// Random horizontal flips: only where mirroring preserves the label.
    pub flip: bool,
    /// The "classic augmentation" baseline on top: a random rotation of up to 15 degrees and
    /// torchvision-style colour jitter (brightness, contrast and saturation factors in
    /// [0.6, 1.4]), no generator involved.
    #[serde(default)]
    pub classic: bool,
}

impl Default for Augment {
    fn default() -> Self {
        Augment { crop_scale: (0.35, 1.0), crop_ratio: (3.0 / 4.0, 4.0 / 3.0), flip: false, classic: false }
    }
}

impl Augment {
    pub fn check(&self) -> Result<()> {
        let (a, b) = self.crop_scale;
        let (r0, r1) = self.crop_ratio;
        if !(a > 0.0 && a <= b && b <= 1.0) || !(r0 > 0.0 && r0 <= r1) || !(a.is_finite() && r1.is_finite()) {
            return Err(Error::invalid(format!("--crop-scale {a} must lie in (0, 1] (crop area {a}..{b}, aspect ratio {r0}..{r1}: need 0 < min <= max, area max <= 1)")));
        }
        Ok(())
    }

    /// One augmented copy of a `side`-square RGB8 image.
    pub fn apply(&self, src: &[u8], side: usize, rng: &mut impl Rng) -> Vec<u8> {
        let (y0, x0, h, w) = crop_box(side, side, self.crop_scale, self.crop_ratio, rng);
        let flip = self.flip && rng.random_bool(0.5);
        let out = resize_bilinear(src, side, (y0, x0, h, w), side, flip);
        if !self.classic {
            return out;
        }
        let angle = rng.random_range(-15.0f64..=15.0).to_radians();
        let factors = [0; 3].map(|_| rng.random_range(0.6..=1.4));
        color_jitter(&rotate_bilinear(&out, side, angle), factors)
    }
}

/// Rotation of a `side`-square RGB8 image about its centre by `angle` radians (bilinear,
/// black outside the source, as torchvision's `RandomRotation` fills with 0).
pub fn rotate_bilinear(src: &[u8], side: usize, angle: f64) -> Vec<u8> {
    let (s, c) = angle.sin_cos();
    let mid = (side as f64 - 1.0) / 2.0;
    let mut dst = vec![0u8; src.len()];
    let px = |y: isize, x: isize, ch: usize| -> f64 {
        if y < 0 || x < 0 || y >= side as isize || x >= side as isize {
            0.0
        } else {
            src[(y as usize * side + x as usize) * 3 + ch] as f64
        }
    };
    for oy in 0..side {
        for ox in 0..side {
            // Inverse map: where in the source this output pixel comes from.
            let (dy, dx) = (oy as f64 - mid, ox as f64 - mid);
            let (sy, sx) = (c * dy - s * dx + mid, s * dy + c * dx + mid);
            let (y0, x0) = (sy.floor(), sx.floor());
            let (ty, tx) = (sy - y0, sx - x0);
            let (y0, x0) = (y0 as isize, x0 as isize);
            for ch in 0..3 {
                let v = (px(y0, x0, ch) * (1.0 - tx) + px(y0, x0 + 1, ch) * tx) * (1.0 - ty)
                    + (px(y0 + 1, x0, ch) * (1.0 - tx) + px(y0 + 1, x0 + 1, ch) * tx) * ty;
                dst[(oy * side + ox) * 3 + ch] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    dst
}

/// Colour jitter with fixed factors [brightness, contrast, saturation], applied in that order
/// as torchvision's `adjust_*` functions do: brightness scales, contrast blends with the mean
/// grey level, saturation blends with each pixel's grey value (ITU-R 601 luma).
pub fn color_jitter(src: &[u8], [b, c, s]: [f64; 3]) -> Vec<u8> {
    let luma = |p: &[f64]| 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2];
    let mut px: Vec<f64> = src.iter().map(|&v| (v as f64 * b).clamp(0.0, 255.0)).collect();
    let mean = px.chunks_exact(3).map(luma).sum::<f64>() / (px.len() / 3).max(1) as f64;
    for v in px.iter_mut() {
        *v = (mean + c * (*v - mean)).clamp(0.0, 255.0);
    }
    for p in px.chunks_exact_mut(3) {
        let g = luma(p);
        for v in p.iter_mut() {
            *v = (g + s * (*v - g)).clamp(0.0, 255.0);
        }
    }
    px.iter().map(|v| v.round() as u8).collect()
}

/// torchvision's `RandomResizedCrop.get_params`: up to 10 draws of an area fraction and a
/// log-uniform aspect ratio that fit, else the central crop with the ratio clamped into range.
/// Returns (top, left, height, width).
pub fn crop_box(height: usize, width: usize, scale: (f64, f64), ratio: (f64, f64), rng: &mut impl Rng) -> (usize, usize, usize, usize) {
    let area = (height * width) as f64;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0..=scale.1);
        let aspect = if lr1 > lr0 { rng.random_range(lr0..lr1).exp() } else { ratio.0 };
        let w = (target * aspect).sqrt().round() as usize;
        let h = (target / aspect).sqrt().round() as usize;
        if w > 0 && h > 0 && w <= width && h <= height {
            let i = rng.random_range(0..=height - h);
            let j = rng.random_range(0..=width - w);
            return (i, j, h, w);
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (h, w) = if in_ratio < ratio.0 {
        (((width as f64) / ratio.0).round() as usize, width)
    } else if in_ratio > ratio.1 {
        (height, ((height as f64) * ratio.1).round() as usize)
    } else {
        (height, width)
    };
    ((height - h) / 2, (width - w) / 2, h, w)
}

/// The box (top, left, h, w) of a `side`-square RGB8 image resized to `out` x `out` with
/// bilinear interpolation (half-pixel centres, as `align_corners=False`), optionally mirrored.
pub fn resize_bilinear(src: &[u8], side: usize, (y0, x0, h, w): (usize, usize, usize, usize), out: usize, mirror: bool) -> Vec<u8> {
    let mut dst = vec![0u8; out * out * 3];
    let (sy, sx) = (h as f64 / out as f64, w as f64 / out as f64);
    for oy in 0..out {
        let fy = ((oy as f64 + 0.5) * sy - 0.5).clamp(0.0, (h - 1) as f64);
        let (y_lo, ty) = (fy.floor() as usize, fy - fy.floor());
        let y_hi = (y_lo + 1).min(h - 1);
        for ox in 0..out {
            let oxm = if mirror { out - 1 - ox } else { ox };
            let fx = ((oxm as f64 + 0.5) * sx - 0.5).clamp(0.0, (w - 1) as f64);
            let (x_lo, tx) = (fx.floor() as usize, fx - fx.floor());
            let x_hi = (x_lo + 1).min(w - 1);
            for c in 0..3 {
                let p = |y: usize, x: usize| src[((y0 + y) * side + x0 + x) * 3 + c] as f64;
                let top = p(y_lo, x_lo) * (1.0 - tx) + p(y_lo, x_hi) * tx;
                let bottom = p(y_hi, x_lo) * (1.0 - tx) + p(y_hi, x_hi) * tx;
                dst[(oy * out + ox) * 3 + c] = (top * (1.0 - ty) + bottom * ty).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    dst
}

/// A batch [b, 3, side, side] in [-1, 1] of RGB8 images.
pub fn batch_tensor(images: &[&[u8]], side: usize, device: &Device) -> Result<Tensor> {
    if images.is_empty() {
        return Err(Error::invalid("an empty batch"));
    }
    let ts = images.iter().map(|px| u8_to_tensor(px, side, side, device)).collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&ts, 0)?)
}

/// A synthetic set ready for training: its images as a dataset over the training classes and,
/// item by item, the soft label its manifest gives (`None`: wholly the item's class).
#[derive(Clone, Debug)]
pub struct SyntheticSet {
    pub dataset: Dataset,
    /// (class index, weight) pairs, parallel to `dataset.items`.
    pub soft_labels: Vec<Option<Vec<(usize, f64)>>>,
}

/// A synthetic set over the training `classes`: the images its `manifest.jsonl` lists and no
/// filter dropped (previews and caches of a generator's output folder are not images to train
/// on) with their soft labels, or, without a manifest, any ImageFolder whose class folders are training
/// classes.
pub fn synthetic_dataset(dir: &std::path::Path, classes: &[String]) -> Result<SyntheticSet> {
    let index = |name: &str, what: &std::path::Path| {
        classes.iter().position(|c| c == name).ok_or_else(|| {
            Error::bad_file(what, format!("class `{name}` is not a training class ({})", classes.join(", ")))
        })
    };
    let manifest = dir.join(crate::synth::manifest::MANIFEST);
    let mut items = Vec::new();
    if manifest.is_file() {
        // Images a filter pass dropped stay on record in the manifest but are not trained on.
        for r in crate::synth::manifest::read_jsonl(&manifest)?.into_iter().filter(|r| r.dropped.is_none()) {
            let path = dir.join(&r.file);
            if !path.is_file() {
                return Err(Error::bad_file(&manifest, format!("lists {} but the file is missing", r.file)));
            }
            let soft = if r.soft_label.is_empty() {
                None
            } else {
                let pairs = r.soft_label.iter().map(|(c, w)| Ok((index(c, &manifest)?, *w))).collect::<Result<Vec<_>>>()?;
                let total: f64 = pairs.iter().map(|p| p.1).sum();
                if pairs.iter().any(|p| !(0.0..=1.0).contains(&p.1)) || (total - 1.0).abs() > 1e-6 {
                    return Err(Error::bad_file(&manifest, format!("{}: soft label {:?} is not a set of weights in [0, 1] summing to 1", r.id, r.soft_label)));
                }
                Some(pairs)
            };
            items.push((crate::data::dataset::Item { path, rel: r.file.clone(), class: index(&r.class, &manifest)? }, soft));
        }
    } else {
        let ds = Dataset::image_folder(dir, None)?;
        for it in ds.items {
            items.push((crate::data::dataset::Item { class: index(&ds.classes[it.class], dir)?, ..it }, None));
        }
    }
    items.sort_by(|a, b| (a.0.class, &a.0.rel).cmp(&(b.0.class, &b.0.rel)));
    let (items, soft_labels) = items.into_iter().unzip();
    Ok(SyntheticSet { dataset: Dataset { root: dir.to_path_buf(), classes: classes.to_vec(), items }, soft_labels })
}
