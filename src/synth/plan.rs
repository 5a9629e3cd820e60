//! Sample planning: which synthetic samples a run makes, what each one draws, and which shard
//! makes it.
//!
//! Every sample is identified by (class name, index) and all of its randomness — the source
//! pair, the interpolation parameter, the scene suffix — comes from a generator seeded by
//! (run seed, class name, index) alone. So the output does not depend on thread count, batch
//! size, processing order or sharding, and `--shard i/n` runs can be merged byte for byte.
use std::str::FromStr;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How the two inverted latents of a pair are combined.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "mode")]
pub enum Interp {
    /// Standard slerp on the short arc, t ~ U(t_min, t_max).
    Slerp { t_min: f64, t_max: f64 },
    /// The official Diff-II draw: a uniformly random point on the whole great circle,
    /// alpha ~ U(0, 2 pi / theta), i.e. frac ~ U(0, 1) of a full turn.
    Circle,
}

/// How many samples each class gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Count {
    /// `k` synthetic images per real image of the class (the paper's expansion rate).
    Expansion(usize),
    /// A fixed number per class.
    PerClass(usize),
}

/// One planned sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub class: usize,
    pub index: usize,
    /// Position in the whole run's ordered sample list (decides the shard).
    pub global: usize,
    pub seed: u64,
    /// Indices into the class's (sorted) images. Equal when the class has one image.
    pub pair: (usize, usize),
    /// t for slerp, the fraction of a full turn for circle.
    pub draw: f64,
    /// Index into the suffix list.
    pub suffix: usize,
}

impl Sample {
    pub fn single_image(&self) -> bool {
        self.pair.0 == self.pair.1
    }

    /// A stable file-name id: `<class>_<index>`.
    pub fn id(&self, class_name: &str) -> String {
        format!("{}_{:05}", sanitize(class_name), self.index)
    }
}

/// Class names become folder and file names: keep them readable but safe.
pub fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| if c.is_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' })
        .collect();
    if s.is_empty() || s.starts_with('.') {
        format!("_{s}")
    } else {
        s
    }
}

/// The seed of sample `index` of class `class_name` in a run seeded with `run_seed`.
pub fn sample_seed(run_seed: u64, class_name: &str, index: usize) -> u64 {
    crate::rng::derive_u64(&[b"diffii-sample\0", &run_seed.to_le_bytes(), class_name.as_bytes(), &[0], &(index as u64).to_le_bytes()])
}

/// Plans every sample of a run, ordered by (class, index). `images_per_class[c]` must be > 0.
pub fn plan(
    class_names: &[String],
    images_per_class: &[usize],
    count: Count,
    interp: Interp,
    n_suffixes: usize,
    run_seed: u64,
) -> Result<Vec<Sample>> {
    if class_names.len() != images_per_class.len() {
        return Err(Error::invalid("one image count per class is required"));
    }
    if let Interp::Slerp { t_min, t_max } = interp {
        if !(t_min.is_finite() && t_max.is_finite() && t_min <= t_max) {
            return Err(Error::invalid(format!("slerp range {t_min}..{t_max} is empty or not finite")));
        }
    }
    let mut out = Vec::new();
    for (class, (name, &n_img)) in class_names.iter().zip(images_per_class).enumerate() {
        if n_img == 0 {
            return Err(Error::invalid(format!("class `{name}` has no images")));
        }
        let n = match count {
            Count::Expansion(k) => k * n_img,
            Count::PerClass(k) => k,
        };
        for index in 0..n {
            let seed = sample_seed(run_seed, name, index);
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let pair = if n_img == 1 {
                (0, 0)
            } else {
                let a = rng.random_range(0..n_img);
                let b = rng.random_range(0..n_img - 1);
                (a, if b >= a { b + 1 } else { b })
            };
            let draw = match interp {
                Interp::Slerp { t_min, t_max } => t_min + (t_max - t_min) * rng.random::<f64>(),
                Interp::Circle => rng.random::<f64>(),
            };
            let suffix = if n_suffixes > 0 { rng.random_range(0..n_suffixes) } else { 0 };
            out.push(Sample { class, index, global: out.len(), seed, pair, draw, suffix });
        }
    }
    Ok(out)
}

/// `--shard i/n`: this process makes the samples whose global position is i modulo n.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    pub fn contains(&self, s: &Sample) -> bool {
        s.global % self.count == self.index
    }

    pub fn is_all(&self) -> bool {
        self.count == 1
    }
}

impl FromStr for Shard {
    type Err = String;
    /// `i/n` with 0 <= i < n (0-based, like Slurm array and Kubernetes indexed-Job indices).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (i, n) = s.split_once('/').ok_or_else(|| format!("shard `{s}` is not of the form i/n"))?;
        let index: usize = i.trim().parse().map_err(|_| format!("shard index `{i}` is not a number"))?;
        let count: usize = n.trim().parse().map_err(|_| format!("shard count `{n}` is not a number"))?;
        if count == 0 || index >= count {
            return Err(format!("shard {index}/{count}: need 0 <= i < n"));
        }
        Ok(Shard { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_is_deterministic_and_pairs_are_distinct() {
        let names = vec!["a".to_string(), "b".to_string(), "solo".to_string()];
        let p1 = plan(&names, &[3, 5, 1], Count::Expansion(2), Interp::Circle, 4, 7).unwrap();
        let p2 = plan(&names, &[3, 5, 1], Count::Expansion(2), Interp::Circle, 4, 7).unwrap();
        assert_eq!(p1, p2);
        assert_eq!(p1.len(), 6 + 10 + 2);
        for s in &p1 {
            if s.class == 2 {
                assert!(s.single_image());
            } else {
                assert_ne!(s.pair.0, s.pair.1);
            }
            assert!((0.0..1.0).contains(&s.draw) && s.suffix < 4);
        }
        // A sample's draws depend on (seed, class name, index) only, not on other classes.
        let q = plan(&names[1..2], &[5], Count::Expansion(2), Interp::Circle, 4, 7).unwrap();
        assert_eq!((q[3].pair, q[3].draw, q[3].seed), (p1[9].pair, p1[9].draw, p1[9].seed));
        let other = plan(&names, &[3, 5, 1], Count::Expansion(2), Interp::Circle, 4, 8).unwrap();
        assert_ne!(p1[0].seed, other[0].seed);
    }

    #[test]
    fn shards_partition_the_plan() {
        let names = vec!["a".to_string()];
        let p = plan(&names, &[4], Count::PerClass(10), Interp::Slerp { t_min: 0.2, t_max: 0.8 }, 0, 1).unwrap();
        let shards: Vec<Shard> = (0..3).map(|i| format!("{i}/3").parse().unwrap()).collect();
        for s in &p {
            assert_eq!(shards.iter().filter(|sh| sh.contains(s)).count(), 1);
            assert!((0.2..0.8).contains(&s.draw));
        }
        assert!("3/3".parse::<Shard>().is_err());
        assert!("x".parse::<Shard>().is_err());
        assert!("1/0".parse::<Shard>().is_err());
    }
}
