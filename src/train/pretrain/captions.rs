//! Class-agnostic captions computed from pixels, for pretraining a generator that knows a
//! domain but not its labels.
//!
//! Four attributes are measured on each image (brightness of the object, its size, its aspect
//! and its fine-detail energy) and cut at the tertiles of the training set: the lowest third
//! gets the first word of a pair (`dark`, `small`, `narrow`, `plain`), the highest third the
//! second (`light`, `large`, `wide`, `patterned`), the middle third no word. A caption is
//! `an item` followed by the attribute words, each kept with probability `keep`; a share of
//! captions is empty so that the model also learns the unconditional prediction that
//! classifier-free guidance needs. No word names a class: like Stable Diffusion facing a rare
//! species, the generator must be told *which* class by concept learning and inversion.
use rand::Rng;
use serde::{Deserialize, Serialize};

/// The caption's fixed opening.
pub const PREFIX: &str = "an item";

/// (low third, high third) words of each attribute, in [`attributes`]' order.
pub const WORDS: [(&str, &str); 4] = [("dark", "light"), ("small", "large"), ("narrow", "wide"), ("plain", "patterned")];

/// Pixel values (0-255 luminance) above this count as the object rather than the background.
const OBJECT: f64 = 24.0;

/// The four attributes of an image (RGB, `side` x `side`): mean object brightness, object
/// area fraction, bounding-box width / height, mean absolute difference between horizontal
/// and vertical neighbours inside the object.
pub fn attributes(rgb: &[u8], side: usize) -> [f64; 4] {
    let lum: Vec<f64> = rgb.chunks_exact(3).map(|p| (p[0] as f64 + p[1] as f64 + p[2] as f64) / 3.0).collect();
    let (mut sum, mut n, mut detail, mut nd) = (0.0, 0usize, 0.0, 0usize);
    let (mut x0, mut x1, mut y0, mut y1) = (side, 0, side, 0);
    for y in 0..side {
        for x in 0..side {
            let v = lum[y * side + x];
            if v <= OBJECT {
                continue;
            }
            sum += v;
            n += 1;
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
            if x + 1 < side {
                detail += (v - lum[y * side + x + 1]).abs();
                nd += 1;
            }
            if y + 1 < side {
                detail += (v - lum[(y + 1) * side + x]).abs();
                nd += 1;
            }
        }
    }
    if n == 0 {
        return [0.0; 4];
    }
    let aspect = (x1 + 1 - x0) as f64 / (y1 + 1 - y0) as f64;
    [sum / n as f64, n as f64 / (side * side) as f64, aspect, detail / nd.max(1) as f64]
}

/// The tertile cuts of each attribute over a training set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Captioner {
    /// (1/3 quantile, 2/3 quantile) per attribute.
    pub cuts: [(f64, f64); 4],
    /// Probability of keeping each attribute word.
    pub keep: f64,
    /// Share of empty captions.
    pub empty: f64,
}

impl Captioner {
    /// Cuts at the tertiles of `all` (the attributes of every training image).
    pub fn fit(all: &[[f64; 4]], keep: f64, empty: f64) -> Self {
        let mut cuts = [(0.0, 0.0); 4];
        for (a, cut) in cuts.iter_mut().enumerate() {
            let mut v: Vec<f64> = all.iter().map(|x| x[a]).collect();
            v.sort_by(|p, q| p.total_cmp(q));
            let at = |q: f64| if v.is_empty() { 0.0 } else { v[((v.len() - 1) as f64 * q).round() as usize] };
            *cut = (at(1.0 / 3.0), at(2.0 / 3.0));
        }
        Captioner { cuts, keep, empty }
    }

    /// Every attribute word that applies to an image, in a fixed order.
    pub fn words(&self, attrs: &[f64; 4]) -> Vec<&'static str> {
        let mut out = Vec::new();
        for ((&v, &(lo, hi)), &(low, high)) in attrs.iter().zip(&self.cuts).zip(&WORDS) {
            if v < lo {
                out.push(low);
            } else if v > hi {
                out.push(high);
            }
        }
        out
    }

    /// One training caption: empty with probability `empty`, else the prefix and each
    /// applicable word kept with probability `keep`.
    pub fn caption(&self, attrs: &[f64; 4], rng: &mut impl Rng) -> String {
        if rng.random::<f64>() < self.empty {
            return String::new();
        }
        let mut s = PREFIX.to_string();
        for w in self.words(attrs) {
            if rng.random::<f64>() < self.keep {
                s.push(' ');
                s.push_str(w);
            }
        }
        s
    }

    /// The caption with every applicable word (for sample grids).
    pub fn full_caption(&self, attrs: &[f64; 4]) -> String {
        std::iter::once(PREFIX).chain(self.words(attrs)).collect::<Vec<_>>().join(" ")
    }
}

/// Every word a caption can contain.
pub fn vocabulary() -> Vec<&'static str> {
    let mut v: Vec<&str> = PREFIX.split(' ').collect();
    for (a, b) in WORDS {
        v.push(a);
        v.push(b);
    }
    v
}
