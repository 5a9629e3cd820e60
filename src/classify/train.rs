//! Training and evaluating a classifier on real images plus an optional synthetic set, the
//! honest way: the epoch is chosen on a validation split taken from the training data, and the
//! test accuracy is reported at that epoch and at the last one — never the best test epoch.
//!
//! One run per seed: the seed decides the split (few-shot draws differ per seed), the
//! initialisation, the order of every epoch and every augmentation and replacement draw, each
//! from its own generator keyed by what it draws. The optimiser is SGD with momentum (and
//! optionally Nesterov), weight decay, a cosine learning-rate schedule after a linear warm-up,
//! and label-smoothed cross-entropy.
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::classify::data::{batch_tensor, Augment, ImageSet, SyntheticSet};
use crate::classify::groups::{GroupAccuracy, GroupSummary, Groups};
use crate::classify::loss::{correct_flags, cross_entropy, soft_targets};
use crate::classify::mix::{ClassDraw, Mixer, Pick};
use crate::classify::protocol::{split, SplitSpec};
use crate::classify::resnet::{self, ResNet, ResNetConfig};
use crate::classify::stats::mean_std;
use crate::data::atomic::{write_atomic, write_json_atomic};
use crate::data::dataset::Dataset;
use crate::data::image::ResizePolicy;
use crate::error::{Error, Result};
use crate::rng::derive_rng;
use crate::train::lr::cosine_with_warmup;
use crate::train::sgd::{Sgd, SgdParams};

/// The classifier network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    /// The small CIFAR-style ResNet ([`ResNetConfig::small`]), trained from scratch.
    #[default]
    Small,
    /// torchvision's ResNet-50 ([`ResNetConfig::resnet50`]), usually from ImageNet weights.
    Resnet50,
}

impl Arch {
    pub fn config(self, classes: usize, depth: usize) -> ResNetConfig {
        match self {
            Arch::Small => ResNetConfig::small(classes, depth),
            Arch::Resnet50 => ResNetConfig::resnet50(classes),
        }
    }
}

/// Every setting of a classifier run except the seed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassifierSettings {
    #[serde(default, skip_serializing_if = "resnet::is_default")]
    pub arch: Arch,
    /// ResNet-50: a torchvision or timm checkpoint (safetensors) to fine-tune; its head is
    /// replaced when the class count differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretrained: Option<PathBuf>,
    /// Basic blocks per stage of the small ResNet.
    pub depth: usize,
    /// Image side in pixels.
    pub size: usize,
    pub resize: ResizePolicy,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    pub label_smoothing: f64,
    pub warmup_epochs: usize,
    pub augment: Augment,
    pub split: SplitSpec,
    /// Probability of replacing a real draw by a synthetic image.
    pub syn_p: f64,
    pub class_draw: ClassDraw,
}

impl Default for ClassifierSettings {
    fn default() -> Self {
        ClassifierSettings {
            arch: Arch::Small,
            pretrained: None,
            depth: 1,
            size: 32,
            resize: ResizePolicy::Squash,
            epochs: 30,
            batch: 64,
            lr: 0.1,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 5e-4,
            label_smoothing: 0.1,
            warmup_epochs: 2,
            augment: Augment::default(),
            split: SplitSpec { val_per_class: 5, shots: None, imbalance: None },
            syn_p: 0.5,
            class_draw: ClassDraw::Same,
        }
    }
}

impl ClassifierSettings {
    pub fn check(&self) -> Result<()> {
        let finite = [self.lr, self.momentum, self.weight_decay, self.label_smoothing, self.syn_p].iter().all(|v| v.is_finite());
        if !finite || self.lr <= 0.0 || self.momentum < 0.0 || self.weight_decay < 0.0 {
            return Err(Error::invalid("--lr must be > 0; --momentum and --weight-decay >= 0; all finite"));
        }
        if !(0.0..=1.0).contains(&self.syn_p) {
            return Err(Error::invalid(format!("--syn-p {} is a probability: it must lie in [0, 1]", self.syn_p)));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return Err(Error::invalid(format!("--label-smoothing {} must lie in [0, 1)", self.label_smoothing)));
        }
        if self.epochs == 0 || self.batch < 2 || self.size < 8 || self.depth == 0 {
            return Err(Error::invalid("--epochs >= 1, --batch >= 2 (BatchNorm needs two images), --size >= 8, --depth >= 1"));
        }
        if self.pretrained.is_some() && self.arch != Arch::Resnet50 {
            return Err(Error::invalid("--pretrained needs --arch resnet50 (the small ResNet trains from scratch)"));
        }
        self.augment.check()
    }
}

/// One epoch's numbers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Epoch {
    pub epoch: usize,
    pub loss: f64,
    pub val_acc: Option<f64>,
    /// Test accuracy, measured at the selected (first best-validation) epoch and the last.
    pub test_acc: Option<f64>,
}

/// What one seed's run measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SeedResult {
    pub seed: u64,
    pub train_images: usize,
    pub val_images: usize,
    pub synthetic_images: usize,
    /// The epoch with the best validation accuracy (the first of equals); the last epoch when
    /// there is no validation split.
    pub selected_epoch: usize,
    pub test_acc_selected: Option<f64>,
    pub test_acc_last: Option<f64>,
    pub val_acc_selected: Option<f64>,
    /// Test accuracy per group (with a group file) at the selected and the last epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups_selected: Option<GroupAccuracy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups_last: Option<GroupAccuracy>,
    pub seconds: f64,
    pub history: Vec<Epoch>,
}

/// The data of a run: the real training dataset, an optional synthetic set with the same
/// classes, an optional test set.
pub struct RunData<'a> {
    pub train: &'a Dataset,
    pub synthetic: Option<&'a SyntheticSet>,
    pub test: Option<&'a Dataset>,
    /// The group of every test image, for group-shift evaluation.
    pub test_groups: Option<&'a Groups>,
}

/// Checks that the synthetic and test sets name the training classes in the same order.
pub fn check_classes(data: &RunData<'_>) -> Result<()> {
    if data.train.classes.len() < 2 {
        return Err(Error::invalid(format!(
            "{}: one class ({:?}); a classifier needs at least two: add a class folder",
            data.train.root.display(),
            data.train.classes
        )));
    }
    for (what, ds) in [("synthetic", data.synthetic.map(|s| &s.dataset)), ("test", data.test)] {
        if let Some(ds) = ds {
            if ds.classes != data.train.classes {
                return Err(Error::invalid(format!(
                    "the {what} set's classes {:?} differ from the training classes {:?}; pass the same --class-names to both",
                    ds.classes, data.train.classes
                )));
            }
        }
    }
    Ok(())
}

/// Accuracy of `model` on `set` (eval mode, batches of 256).
pub fn evaluate(model: &ResNet, set: &ImageSet) -> Result<f64> {
    Ok(scores(model, set, None)?.0)
}

/// Per image of `images` (RGB8, `side` px), whether `model` labels it as `labels` says (eval mode).
pub fn correct_each(model: &ResNet, images: &[Vec<u8>], labels: &[usize], side: usize) -> Result<Vec<bool>> {
    let mut correct = Vec::with_capacity(images.len());
    for (imgs, labels) in images.chunks(256).zip(labels.chunks(256)) {
        let refs: Vec<&[u8]> = imgs.iter().map(|p| p.as_slice()).collect();
        let logits = model.forward(&batch_tensor(&refs, side, &model.device())?, false)?;
        correct.extend(correct_flags(&logits, labels)?);
    }
    Ok(correct)
}

/// Accuracy over all images of `test`, and per group when it has groups.
fn scores(model: &ResNet, test: &ImageSet, groups: Option<&Groups>) -> Result<(f64, Option<GroupAccuracy>)> {
    if test.is_empty() {
        return Err(Error::invalid("no images to evaluate"));
    }
    let correct = correct_each(model, &test.pixels, &test.labels, test.side)?;
    let acc = correct.iter().filter(|&&ok| ok).count() as f64 / correct.len() as f64;
    Ok((acc, groups.map(|g| g.accuracy(&correct)).transpose()?))
}

/// Trains one seed on `device`; writes `model.safetensors`, `model.json` and `history.csv` into
/// `out`. The CPU gives the same bytes for any thread count; another device gives its own.
pub fn train_seed(data: &RunData<'_>, s: &ClassifierSettings, seed: u64, out: &Path, device: &Device, progress: bool) -> Result<SeedResult> {
    s.check()?;
    check_classes(data)?;
    let t0 = Instant::now();
    let classes = data.train.classes.len();
    let sp = split(data.train, &s.split, seed)?;
    let real = ImageSet::load(data.train, &sp.train, s.size, s.resize)?;
    let val = ImageSet::load(data.train, &sp.val, s.size, s.resize)?;
    let syn = match data.synthetic {
        Some(d) => ImageSet::load(&d.dataset, &(0..d.dataset.items.len()).collect::<Vec<_>>(), s.size, s.resize)?,
        None => ImageSet { side: s.size, ..Default::default() },
    };
    let test = match data.test {
        Some(d) => Some(ImageSet::load(d, &(0..d.items.len()).collect::<Vec<_>>(), s.size, s.resize)?),
        None => None,
    };
    let real_counts: Vec<usize> = real.by_class(classes).iter().map(|v| v.len()).collect();
    let mixer = Mixer::new(if syn.is_empty() { 0.0 } else { s.syn_p }, s.class_draw, &real_counts, syn.by_class(classes))?;

    let config = s.arch.config(classes, s.depth);
    let mut init = resnet::init_weights(&config, seed)?;
    if let Some(path) = &s.pretrained {
        resnet::load_pretrained(&mut init, path)?;
    }
    let (model, weights) = resnet::trainable(init, &config, device)?;
    let vars: Vec<_> = weights.vars().into_iter().map(|(_, v)| v).collect();
    let mut opt = Sgd::new(vars.clone(), SgdParams { lr: s.lr, momentum: s.momentum, dampening: 0.0, weight_decay: s.weight_decay, nesterov: s.nesterov })?;
    let steps_per_epoch = real.len().div_ceil(s.batch);
    let total = steps_per_epoch * s.epochs;
    let warmup = steps_per_epoch * s.warmup_epochs.min(s.epochs);

    let pb = crate::progress::bar(total, &format!("train seed {seed}"), progress);
    let mut history = Vec::new();
    let mut best: Option<(usize, std::collections::HashMap<String, Tensor>)> = None;
    let mut step = 0;
    for epoch in 0..s.epochs {
        let mut order: Vec<usize> = (0..real.len()).collect();
        rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut derive_rng(&[b"diffii-epoch\0", &seed.to_le_bytes(), &(epoch as u64).to_le_bytes()]));
        let mut loss_sum = 0.0;
        for (b, chunk) in order.chunks(s.batch).enumerate() {
            if chunk.len() < 2 {
                continue; // BatchNorm cannot normalise a batch of one image.
            }
            let mut images = Vec::with_capacity(chunk.len());
            let mut targets = Vec::with_capacity(chunk.len());
            for (j, &i) in chunk.iter().enumerate() {
                let pos = (b * s.batch + j) as u64;
                let mut rng = derive_rng(&[b"diffii-draw\0", &seed.to_le_bytes(), &(epoch as u64).to_le_bytes(), &pos.to_le_bytes()]);
                let (px, target) = match mixer.pick(i, real.labels[i], &mut rng) {
                    Pick::Real(i) => (&real.pixels[i], vec![(real.labels[i], 1.0)]),
                    // An inter-class image (Diff-Mix) trains with its manifest's soft label.
                    Pick::Synthetic(k, c) => (&syn.pixels[k], data.synthetic.and_then(|d| d.soft_labels[k].clone()).unwrap_or_else(|| vec![(c, 1.0)])),
                };
                images.push(s.augment.apply(px, s.size, &mut rng));
                targets.push(target);
            }
            let refs: Vec<&[u8]> = images.iter().map(|p| p.as_slice()).collect();
            let x = batch_tensor(&refs, s.size, device)?;
            opt.set_lr(cosine_with_warmup(step, total, warmup, s.lr, 0.0));
            let logits = model.forward(&x, true)?;
            let loss = cross_entropy(&logits, &soft_targets(&targets, classes, device)?, s.label_smoothing)?;
            let l = loss.to_scalar::<f32>()? as f64;
            if !l.is_finite() {
                return Err(Error::invalid(format!("seed {seed}: the loss became {l} at epoch {}, step {step}; lower --lr", epoch + 1)));
            }
            loss_sum += l * chunk.len() as f64;
            let grads = loss.backward()?;
            let g: Vec<Option<Tensor>> = vars.iter().map(|v| grads.get(v.as_tensor()).cloned()).collect();
            opt.step(&g)?;
            step += 1;
            pb.inc(1);
            pb.set_message(format!("loss {l:.3}"));
        }
        let val_acc = if val.is_empty() { None } else { Some(evaluate(&resnet::inference_copy(&model, &weights)?, &val)?) };
        // The test set is only needed at the selected epoch (the first best validation
        // accuracy) and the last one: a copy of the model at each new best is kept and both are
        // evaluated once at the end, instead of a test pass at every improvement.
        if val_acc.is_some() && history.iter().all(|e: &Epoch| e.val_acc < val_acc) {
            let snapshot = resnet::state(&model, &weights)?.into_iter().map(|(k, t)| Ok((k, t.copy()?))).collect::<Result<_>>()?;
            best = Some((epoch, snapshot));
        }
        history.push(Epoch { epoch: epoch + 1, loss: loss_sum / real.len() as f64, val_acc, test_acc: None });
    }
    pb.finish_and_clear();

    // The first epoch with the best validation accuracy; the last one without a validation split.
    let selected = best.as_ref().map_or(history.len() - 1, |b| b.0);
    let (mut groups_selected, mut groups_last) = (None, None);
    if let Some(t) = &test {
        let last = history.len() - 1;
        let (acc, groups) = scores(&resnet::inference_copy(&model, &weights)?, t, data.test_groups)?;
        history[last].test_acc = Some(acc);
        groups_last = groups;
        groups_selected = groups_last.clone();
        if let Some((epoch, snapshot)) = best.filter(|b| b.0 != last) {
            let (acc, groups) = scores(&resnet::from_state(snapshot, &config, device)?, t, data.test_groups)?;
            history[epoch].test_acc = Some(acc);
            groups_selected = groups;
        }
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    crate::nn::weights::save_safetensors(&out.join("model.safetensors"), &resnet::state(&model, &weights)?, None)?;
    write_json_atomic(out.join("model.json"), &ModelInfo { config, classes: data.train.classes.clone(), size: s.size, resize: s.resize })?;
    let mut csv = String::from("epoch,loss,val_acc,test_acc\n");
    let opt_num = |v: Option<f64>| v.map(|v| format!("{v:.6}")).unwrap_or_default();
    for e in &history {
        csv.push_str(&format!("{},{:.6},{},{}\n", e.epoch, e.loss, opt_num(e.val_acc), opt_num(e.test_acc)));
    }
    write_atomic(out.join("history.csv"), csv.as_bytes())?;
    Ok(SeedResult {
        seed,
        train_images: real.len(),
        val_images: val.len(),
        synthetic_images: syn.len(),
        selected_epoch: selected + 1,
        test_acc_selected: history[selected].test_acc,
        test_acc_last: history.last().and_then(|e| e.test_acc),
        val_acc_selected: history[selected].val_acc,
        groups_selected,
        groups_last,
        seconds: t0.elapsed().as_secs_f64(),
        history,
    })
}

/// What `diffii eval` needs to rebuild a trained model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub config: ResNetConfig,
    pub classes: Vec<String>,
    pub size: usize,
    pub resize: ResizePolicy,
}

/// Loads a model written by [`train_seed`] from its folder onto `device`.
pub fn load_model(dir: &Path, device: &Device) -> Result<(ResNet, ModelInfo)> {
    let info: ModelInfo = crate::error::read_json(&dir.join("model.json"))?;
    let state = crate::nn::weights::load_all(&dir.join("model.safetensors"), device)?;
    Ok((resnet::from_state(state, &info.config, device)?, info))
}

/// Results of every seed and their summary, as `results.json` holds them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Results {
    pub settings: ClassifierSettings,
    pub train_data: PathBuf,
    pub synthetic_data: Option<PathBuf>,
    pub test_data: Option<PathBuf>,
    pub seeds: Vec<SeedResult>,
    /// Mean and standard deviation over seeds of the test accuracy at the validation-selected
    /// epoch and at the last epoch.
    pub test_acc_selected: (f64, f64),
    pub test_acc_last: (f64, f64),
    /// Per-group, group-mean and worst-group test accuracy over seeds (with a group file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<GroupSummary>,
}

impl Results {
    pub fn new(settings: ClassifierSettings, paths: [Option<PathBuf>; 3], seeds: Vec<SeedResult>) -> Self {
        let sel: Vec<f64> = seeds.iter().filter_map(|r| r.test_acc_selected).collect();
        let last: Vec<f64> = seeds.iter().filter_map(|r| r.test_acc_last).collect();
        let [train, synthetic, test] = paths;
        Results {
            settings,
            train_data: train.unwrap_or_default(),
            synthetic_data: synthetic,
            test_data: test,
            test_acc_selected: mean_std(&sel),
            test_acc_last: mean_std(&last),
            groups: group_summary(&seeds),
            seeds,
        }
    }
}

/// The seeds' group accuracies summarised; `None` unless every seed was evaluated by group.
pub fn group_summary(seeds: &[SeedResult]) -> Option<GroupSummary> {
    let selected: Vec<_> = seeds.iter().map(|s| s.groups_selected.as_ref()).collect();
    let last: Vec<_> = seeds.iter().map(|s| s.groups_last.as_ref()).collect();
    GroupSummary::over_seeds(&selected, &last)
}
