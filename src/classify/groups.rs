//! Group-shift evaluation (Waterbirds-style): a file assigns every test image to a group, e.g.
//! (label group x background colour), and accuracy is reported per group, as the unweighted
//! mean of the groups and for the worst group, next to the plain accuracy over all images.
//!
//! The group file has one `<image> <group>` line per test image (`#` starts a comment). The
//! image is named by its path relative to the test set's root, as the test set names it (an
//! ImageFolder's `<class>/<file>`, or the path column of a list file); the group is the last
//! whitespace-separated word, so image paths may contain spaces. The groups are kept apart from
//! the list file so a list file stays `<path> <label>` and paths with spaces stay unambiguous.
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::dataset::{path_word_lines, Dataset};
use crate::error::{Error, Result};

/// Every test image's group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Groups {
    /// Group names, sorted.
    pub names: Vec<String>,
    /// Per test item (in the dataset's item order), its index into `names`.
    pub of_item: Vec<usize>,
}

impl Groups {
    /// Reads `path` for the items of `test`; every item needs exactly one line and every line
    /// must name an item.
    pub fn read(path: &Path, test: &Dataset) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let index: HashMap<&str, usize> = test.items.iter().enumerate().map(|(i, it)| (it.rel.as_str(), i)).collect();
        let mut assigned: Vec<Option<&str>> = vec![None; test.items.len()];
        for (line, image, group) in path_word_lines(path, &text, "group")? {
            let image = image.trim_start_matches("./");
            let Some(&i) = index.get(image) else {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "line {line}: `{image}` is not an image of the test set {} (name images by their path relative to it, e.g. `{}`)",
                        test.root.display(),
                        test.items.first().map_or("<class>/<file>", |it| it.rel.as_str())
                    ),
                ));
            };
            if let Some(previous) = assigned[i].replace(group) {
                return Err(Error::bad_file(path, format!("line {line}: `{image}` is given a group twice (`{previous}`, then `{group}`)")));
            }
        }
        let missing: Vec<&str> = assigned.iter().zip(&test.items).filter(|(g, _)| g.is_none()).map(|(_, it)| it.rel.as_str()).collect();
        if !missing.is_empty() {
            let shown: Vec<&str> = missing.iter().take(3).copied().collect();
            return Err(Error::bad_file(
                path,
                format!("{} of the {} test images have no group (e.g. {}): add a line for each", missing.len(), test.items.len(), shown.join(", ")),
            ));
        }
        let names: Vec<String> = assigned.iter().flatten().copied().collect::<BTreeSet<_>>().into_iter().map(String::from).collect();
        let of_item = assigned.iter().map(|g| names.iter().position(|n| Some(n.as_str()) == *g).unwrap_or(0)).collect();
        Ok(Groups { names, of_item })
    }

    /// A short content hash of the assignment, recorded by runs so that finished results are
    /// never mixed with results measured on other groups.
    pub fn fingerprint(&self) -> String {
        let text: String = self.of_item.iter().map(|&g| format!("{}\n", self.names[g])).collect();
        crate::hash::sha256_bytes(text.as_bytes())
    }

    /// The accuracy per group from whether each test item was classified correctly.
    pub fn accuracy(&self, correct: &[bool]) -> Result<GroupAccuracy> {
        if correct.len() != self.of_item.len() {
            return Err(Error::invalid(format!("{} predictions for {} grouped test images", correct.len(), self.of_item.len())));
        }
        let mut hits = vec![(0usize, 0usize); self.names.len()];
        for (&g, &ok) in self.of_item.iter().zip(correct) {
            hits[g].0 += ok as usize;
            hits[g].1 += 1;
        }
        let groups: Vec<GroupScore> = self
            .names
            .iter()
            .zip(&hits)
            .map(|(name, &(k, n))| GroupScore { name: name.clone(), images: n, accuracy: k as f64 / n.max(1) as f64 })
            .collect();
        let mean = groups.iter().map(|g| g.accuracy).sum::<f64>() / groups.len().max(1) as f64;
        let worst = groups.iter().map(|g| g.accuracy).fold(f64::INFINITY, f64::min);
        Ok(GroupAccuracy { groups, mean, worst })
    }
}

/// One group's test accuracy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupScore {
    pub name: String,
    pub images: usize,
    pub accuracy: f64,
}

/// Test accuracy by group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupAccuracy {
    /// In the order of the sorted group names.
    pub groups: Vec<GroupScore>,
    /// Unweighted mean of the group accuracies (each group counts once, whatever its size).
    pub mean: f64,
    /// The lowest group accuracy.
    pub worst: f64,
}

/// Group accuracies summarised over seeds: (mean, std) of each figure.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupSummary {
    /// Worst-group accuracy at the validation-selected epoch.
    pub worst_selected: (f64, f64),
    /// Unweighted group mean at the validation-selected epoch.
    pub mean_selected: (f64, f64),
    /// Worst-group accuracy at the last epoch.
    pub worst_last: (f64, f64),
    /// Per group (name, accuracy) at the validation-selected epoch.
    pub per_group_selected: Vec<(String, (f64, f64))>,
}

impl GroupSummary {
    /// Summarises the seeds' group accuracies; `None` unless every seed has them.
    pub fn over_seeds(selected: &[Option<&GroupAccuracy>], last: &[Option<&GroupAccuracy>]) -> Option<Self> {
        let selected: Vec<&GroupAccuracy> = selected.iter().copied().collect::<Option<_>>()?;
        let last: Vec<&GroupAccuracy> = last.iter().copied().collect::<Option<_>>()?;
        let first = selected.first()?;
        let ms = |xs: Vec<f64>| crate::classify::stats::mean_std(&xs);
        let per_group_selected = first
            .groups
            .iter()
            .enumerate()
            .map(|(g, s)| (s.name.clone(), ms(selected.iter().map(|a| a.groups.get(g).map_or(f64::NAN, |x| x.accuracy)).collect())))
            .collect();
        Some(GroupSummary {
            worst_selected: ms(selected.iter().map(|a| a.worst).collect()),
            mean_selected: ms(selected.iter().map(|a| a.mean).collect()),
            worst_last: ms(last.iter().map(|a| a.worst).collect()),
            per_group_selected,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_per_group_mean_and_worst() {
        let g = Groups { names: vec!["a".into(), "b".into()], of_item: vec![0, 0, 0, 1] };
        let acc = g.accuracy(&[true, true, false, false]).unwrap();
        assert_eq!(acc.groups[0].images, 3);
        assert!((acc.groups[0].accuracy - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(acc.groups[1].accuracy, 0.0);
        assert!((acc.mean - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(acc.worst, 0.0);
        assert!(g.accuracy(&[true]).is_err());
    }
}
