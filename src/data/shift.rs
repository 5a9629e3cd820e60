//! The group-shift world: the shipped Fashion-MNIST subset with coloured backgrounds whose colour
//! is spuriously tied to the label in training and independent of it at test, the structure of
//! Waterbirds (birds on land or water backgrounds) built deterministically from the shipped
//! images, with no new data.
//!
//! - **Label groups.** The ten classes are split into two groups so that the most confusable
//!   pairs straddle them: A = T-shirt/top, Pullover, Dress, Sandal, Bag; B = Trouser, Coat, Shirt,
//!   Sneaker, Ankle boot (T-shirt vs Shirt, Pullover vs Coat, Sandal vs Sneaker are each split).
//!   A colour that tells A from B therefore helps exactly where the shapes are hard, so a
//!   classifier is tempted to learn the colour instead of the shape.
//! - **Colours.** Two colour groups of three colours each, `warm` and `cool`; an image is
//!   screen-blended with one colour ([`screen`]), so its black background takes the colour and
//!   the garment stays light. The shade within a group is drawn per image.
//! - **Training (pool).** Per class, a fixed `agree` share of the images (95 % by default,
//!   rounded) gets its label group's colour group (A: warm, B: cool), the rest the other one;
//!   which images are the minority is a deterministic shuffle per class. Validation images come
//!   from this pool too, so model selection sees the same bias (no group labels are used).
//! - **Test.** Per class, exactly half the images get each colour group, so colour carries no
//!   information about the label. Every test image belongs to one of four groups,
//!   `A-warm`, `A-cool`, `B-warm`, `B-cool` (Waterbirds' test00/01/10/11), written as a group file
//!   ([`crate::classify::groups`]).
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::Rng;

use crate::data::atomic::write_atomic;
use crate::data::bundle::{self, Bundle, Materialized, Picture, SplitName};
use crate::error::{Error, Result};
use crate::rng::derive_rng;

/// The two colour groups: name and three RGB shades each.
pub const COLOURS: [(&str, [[u8; 3]; 3]); 2] = [
    ("warm", [[200, 60, 40], [215, 125, 30], [185, 50, 115]]),
    ("cool", [[40, 85, 200], [30, 140, 150], [55, 140, 60]]),
];

/// Every colour of [`COLOURS`] (the palette a coloured pretraining run draws from).
pub fn palette() -> Vec<[u8; 3]> {
    COLOURS.iter().flat_map(|(_, shades)| shades.iter().copied()).collect()
}

/// Label group (0 = A, 1 = B) of each class of the shipped subset, in label order.
pub const LABEL_GROUPS: [usize; 10] = [0, 1, 0, 0, 1, 0, 1, 1, 0, 1];
pub const LABEL_GROUP_NAMES: [&str; 2] = ["A", "B"];

/// Screen blend of RGB pixels with one colour: 255 - (255 - p)(255 - c) / 255 per channel, so
/// black becomes the colour and white stays white.
pub fn screen(rgb: &[u8], colour: [u8; 3]) -> Vec<u8> {
    rgb.iter().enumerate().map(|(i, &p)| (255 - ((255 - p as u32) * (255 - colour[i % 3] as u32) + 127) / 255) as u8).collect()
}

/// One image's colour: its colour group and shade, drawn from (`what`, image id).
fn shade(group: usize, what: &str, index: u32) -> [u8; 3] {
    let k = derive_rng(&[b"diffii-shift-shade\0", what.as_bytes(), &index.to_le_bytes()]).random_range(0..3);
    COLOURS[group].1[k]
}

/// How the group-shift world is built.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ShiftSpec {
    /// Share of each class's pool images whose colour group agrees with its label group.
    pub agree: f64,
}

impl Default for ShiftSpec {
    fn default() -> Self {
        ShiftSpec { agree: 0.95 }
    }
}

/// The colour group of every row of the pool and of the test split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub pool: Vec<usize>,
    pub test: Vec<usize>,
}

/// Draws the colour groups (see the module documentation).
pub fn assign(b: &Bundle, spec: &ShiftSpec) -> Result<Assignment> {
    if b.classes.len() != LABEL_GROUPS.len() {
        return Err(Error::invalid(format!("the group-shift world is defined for the 10 Fashion-MNIST classes, not {}", b.classes.len())));
    }
    if !(0.0..=1.0).contains(&spec.agree) {
        return Err(Error::invalid(format!("the colour agreement {} must lie in [0, 1]", spec.agree)));
    }
    let per_class = |labels: &[usize], share: f64, what: &str, majority: &dyn Fn(usize) -> usize| {
        let mut colour = vec![0; labels.len()];
        for c in 0..b.classes.len() {
            let mut rows: Vec<usize> = (0..labels.len()).filter(|&r| labels[r] == c).collect();
            rows.shuffle(&mut derive_rng(&[b"diffii-shift\0", what.as_bytes(), &(c as u64).to_le_bytes()]));
            let keep = (share * rows.len() as f64).round() as usize;
            for (k, &r) in rows.iter().enumerate() {
                colour[r] = if k < keep { majority(c) } else { 1 - majority(c) };
            }
        }
        colour
    };
    Ok(Assignment {
        pool: per_class(&b.pool.labels, spec.agree, "pool", &|c| LABEL_GROUPS[c]),
        // Half of each class per colour group: the "majority" here is just the first half.
        test: per_class(&b.test.labels, 0.5, "test", &|_| 0),
    })
}

/// The folders of the group-shift world.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShiftWorld {
    pub folders: Materialized,
    /// `out/test_groups.txt`: `<class>/<file> <label group>-<colour group>` per test image.
    pub test_groups: PathBuf,
}

/// Writes the coloured pool and test folders (as [`bundle::materialize`] does for the plain
/// ones) and the test group file into `out`.
pub fn materialize(b: &Bundle, spec: &ShiftSpec, out: &Path) -> Result<ShiftWorld> {
    let a = assign(b, spec)?;
    let render = |split: SplitName, s: &bundle::Split, row: usize| {
        let (colours, what) = match split {
            SplitName::Pool => (&a.pool, "pool"),
            SplitName::Test => (&a.test, "test"),
        };
        let grey = &s.images[row];
        let rgb: Vec<u8> = grey.iter().flat_map(|&v| [v, v, v]).collect();
        Picture::Rgb(screen(&rgb, shade(colours[row], what, s.index[row])))
    };
    let folders = bundle::materialize_with(b, out, &render)?;
    let mut lines = String::from("# <test image> <label group>-<colour group>; see diffii::data::shift\n");
    for (row, (&label, index)) in b.test.labels.iter().zip(&b.test.index).enumerate() {
        let group = format!("{}-{}", LABEL_GROUP_NAMES[LABEL_GROUPS[label]], COLOURS[a.test[row]].0);
        lines.push_str(&format!("{}/{index:05}.png {group}\n", b.classes[label]));
    }
    let test_groups = out.join("test_groups.txt");
    write_atomic(&test_groups, lines.as_bytes())?;
    Ok(ShiftWorld { folders, test_groups })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn screen_maps_black_to_the_colour_and_keeps_white() {
        assert_eq!(screen(&[0, 0, 0, 255, 255, 255], [200, 60, 40]), vec![200, 60, 40, 255, 255, 255]);
        let mid = screen(&[128, 128, 128], [200, 60, 40]);
        assert!(mid.iter().zip([200u8, 60, 40]).all(|(&m, c)| m >= 128 && m >= c), "{mid:?}");
    }
}
