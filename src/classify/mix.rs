//! Mixing synthetic images into classifier training, as Diff-II, DA-Fusion and Diff-Mix do:
//! every real sample drawn in an epoch is replaced, with probability `p`, by a synthetic image
//! chosen at random — of the same class (few-shot; the label is kept), or, for long-tailed
//! data, of a class drawn with probability proportional to 1 / (n_c + 1), n_c being that
//! class's number of real training images, whose label is then used (Diff-Mix's re-balancing).
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How the class of a replacement is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClassDraw {
    /// The real sample's own class.
    Same,
    /// A class drawn with probability proportional to 1 / (n_c + 1).
    InverseFrequency,
}

/// What one training draw uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    /// The real image itself (index into the real set).
    Real(usize),
    /// A synthetic image (index into the synthetic set) and its class.
    Synthetic(usize, usize),
}

pub struct Mixer {
    p: f64,
    draw: ClassDraw,
    /// Synthetic image indices of each class.
    synthetic: Vec<Vec<usize>>,
    /// Cumulative inverse-frequency weights over the classes that have synthetic images.
    cumulative: Vec<(f64, usize)>,
}

impl Mixer {
    /// `real_counts[c]`: real training images of class c; `synthetic[c]`: indices of its
    /// synthetic images (a class without any is never replaced into).
    pub fn new(p: f64, draw: ClassDraw, real_counts: &[usize], synthetic: Vec<Vec<usize>>) -> Result<Self> {
        if !(0.0..=1.0).contains(&p) {
            return Err(Error::invalid(format!("--syn-p {p} must lie in [0, 1]")));
        }
        if real_counts.len() != synthetic.len() {
            return Err(Error::invalid("one synthetic list per class is required"));
        }
        let mut cumulative = Vec::new();
        let mut total = 0.0;
        for (c, (&n, s)) in real_counts.iter().zip(&synthetic).enumerate() {
            if !s.is_empty() {
                total += 1.0 / (n as f64 + 1.0);
                cumulative.push((total, c));
            }
        }
        Ok(Mixer { p, draw, synthetic, cumulative })
    }

    /// The draw for a real sample `real` of class `class`. Always consumes the same random
    /// numbers in the same order for a given outcome, so runs are reproducible.
    pub fn pick(&self, real: usize, class: usize, rng: &mut impl Rng) -> Pick {
        if self.p == 0.0 || !rng.random_bool(self.p) {
            return Pick::Real(real);
        }
        let c = match self.draw {
            ClassDraw::Same => class,
            ClassDraw::InverseFrequency => {
                let Some(&(total, _)) = self.cumulative.last() else { return Pick::Real(real) };
                let u = rng.random::<f64>() * total;
                self.cumulative.iter().find(|(cum, _)| u < *cum).map_or(self.cumulative[self.cumulative.len() - 1].1, |x| x.1)
            }
        };
        match self.synthetic.get(c) {
            Some(imgs) if !imgs.is_empty() => Pick::Synthetic(imgs[rng.random_range(0..imgs.len())], c),
            _ => Pick::Real(real),
        }
    }
}
