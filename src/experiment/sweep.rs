//! Settings sweeps for a comparison, selected on validation accuracy: every generating method
//! runs once per point of the grid of the swept settings that apply to it (a variant named
//! `<method>@<key>=<value>,...`), and each method family's variant with the best mean
//! validation accuracy over seeds is reported as that family's selection, with its test
//! accuracy — the test set never chooses. SD's guidance of 7.5, or any other default, is not
//! right for every model and dataset; a sweep finds out on the data at hand.
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::synth::diffii::SettingsRequest;
use crate::synth::plan::Count;

/// A setting a sweep can vary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SweepKey {
    /// Classifier-free guidance (every generating method).
    Guidance,
    /// Diff-II's two-stage strength.
    Strength,
    /// DDIM sampling steps (every generating method).
    Steps,
    /// Synthetic images per real one (every generating method).
    Expansion,
    /// The classifier's replacement probability (every generating method).
    SynP,
}

impl SweepKey {
    pub fn name(self) -> &'static str {
        match self {
            SweepKey::Guidance => "guidance",
            SweepKey::Strength => "strength",
            SweepKey::Steps => "steps",
            SweepKey::Expansion => "expansion",
            SweepKey::SynP => "syn-p",
        }
    }

}

/// One axis: a key and its values (`guidance=1.5,3,7.5`).
#[derive(Clone, Debug, PartialEq)]
pub struct Axis {
    pub key: SweepKey,
    pub values: Vec<f64>,
}

impl FromStr for Axis {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (k, v) = s.split_once('=').ok_or_else(|| format!("sweep `{s}` is not of the form key=v1,v2"))?;
        let key = [SweepKey::Guidance, SweepKey::Strength, SweepKey::Steps, SweepKey::Expansion, SweepKey::SynP]
            .into_iter()
            .find(|key| key.name() == k.trim())
            .ok_or_else(|| format!("sweep key `{k}` is not one of guidance, strength, steps, expansion, syn-p"))?;
        let values = v
            .split(',')
            .map(|x| x.trim().parse::<f64>().map_err(|_| format!("sweep {k}: `{x}` is not a number")))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        if values.is_empty() || values.iter().any(|x| !x.is_finite()) {
            return Err(format!("sweep {k}: values must be finite numbers"));
        }
        let whole = matches!(key, SweepKey::Steps | SweepKey::Expansion);
        if whole && values.iter().any(|x| x.fract() != 0.0 || *x < 1.0) {
            return Err(format!("sweep {k}: values must be whole numbers >= 1"));
        }
        Ok(Axis { key, values })
    }
}

/// One grid point: a value per applying key.
pub type Point = Vec<(SweepKey, f64)>;

/// The grid points over the `axes` that `applies` to a method; one empty point when none does.
pub fn points(axes: &[Axis], applies: impl Fn(SweepKey) -> bool) -> Result<Vec<Point>> {
    let mut seen = std::collections::BTreeSet::new();
    for a in axes {
        if !seen.insert(a.key.name()) {
            return Err(Error::invalid(format!("--sweep {} is given twice", a.key.name())));
        }
    }
    let mut grid: Vec<Point> = vec![Vec::new()];
    for a in axes.iter().filter(|a| applies(a.key)) {
        grid = grid.into_iter().flat_map(|p| a.values.iter().map(move |&v| [p.clone(), vec![(a.key, v)]].concat())).collect();
    }
    Ok(grid)
}

/// The label of a point: `guidance=3,strength=0.1`.
pub fn label(p: &Point) -> String {
    p.iter().map(|(k, v)| format!("{}={v}", k.name())).collect::<Vec<_>>().join(",")
}

/// `r` with the point's generation settings, and the point's replacement probability, if any.
pub fn apply(p: &Point, r: &SettingsRequest) -> (SettingsRequest, Option<f64>) {
    let mut r = r.clone();
    let mut syn_p = None;
    for &(k, v) in p {
        match k {
            SweepKey::Guidance => r.guidance = Some(v),
            SweepKey::Strength => r.strength = Some(v),
            SweepKey::Steps => r.steps = Some(v as usize),
            SweepKey::Expansion => r.count = Some(Count::Expansion(v as usize)),
            SweepKey::SynP => syn_p = Some(v),
        }
    }
    (r, syn_p)
}

/// A family's choice: the variant with the best mean validation accuracy over seeds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    /// The method without its sweep label (e.g. `diffii`, `diffii+classic`).
    pub family: String,
    /// The chosen variant's full name.
    pub method: String,
    /// Mean over seeds of the validation accuracy at each seed's selected epoch.
    pub val_acc: f64,
    /// The chosen variant's test accuracy (mean, std over seeds), at the validation-selected epoch.
    pub test_acc_selected: (f64, f64),
    /// How many variants were tried.
    pub variants: usize,
}

/// The family of a method name: the name without its `@...` sweep label.
pub fn family(name: &str) -> String {
    match name.split_once('@') {
        Some((base, rest)) => match rest.split_once('+') {
            Some((_, suffix)) => format!("{base}+{suffix}"),
            None => base.to_string(),
        },
        None => name.to_string(),
    }
}

/// A method's result as a sweep sees it.
pub struct Candidate<'a> {
    pub method: &'a str,
    /// Mean over seeds of the validation accuracy at each seed's selected epoch.
    pub val_acc: f64,
    pub test_acc_selected: (f64, f64),
}

/// For each family with more than one variant, the one with the best mean validation accuracy
/// (the first listed of equals), in the order the families first appear.
pub fn select(rows: &[Candidate<'_>]) -> Vec<Selection> {
    let mut families: Vec<String> = Vec::new();
    for r in rows {
        let f = family(r.method);
        if !families.contains(&f) {
            families.push(f);
        }
    }
    let mut out = Vec::new();
    for f in families {
        let members: Vec<&Candidate<'_>> = rows.iter().filter(|r| family(r.method) == f).collect();
        if members.len() < 2 {
            continue;
        }
        let mut best = members[0];
        for m in &members[1..] {
            if m.val_acc > best.val_acc {
                best = m;
            }
        }
        out.push(Selection { family: f, method: best.method.to_string(), val_acc: best.val_acc, test_acc_selected: best.test_acc_selected, variants: members.len() });
    }
    out
}
