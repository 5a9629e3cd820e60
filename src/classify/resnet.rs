//! ResNet classifiers (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016)
//! with basic blocks, under torchvision's key names (`conv1`, `bn1`, `layer1.0.conv1`,
//! `layer1.0.downsample.0`, `fc`), so a checkpoint written here reads like a torchvision one.
//!
//! The default [`ResNetConfig::small`] is the CIFAR-style network of the paper's §4.2: a 3x3
//! stem without max-pooling, three stages of widths 16 / 32 / 64 (stride 2 between stages),
//! global average pooling and a linear head — fast to train from scratch on a CPU at 28-64 px.
//! Fresh weights follow torchvision's initialisation: convolutions Kaiming-normal (fan-out,
//! ReLU gain), BatchNorm scale 1 and shift 0, the head U(-1/sqrt(in), 1/sqrt(in)).
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::nn::{BatchNorm2d, Conv2d, Linear, Precision, Weights};
use crate::rng::{derive_rng, seeded_randn};

/// Shape of a basic-block ResNet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResNetConfig {
    pub in_channels: usize,
    pub classes: usize,
    /// Output channels of the stem and of each stage's blocks.
    pub widths: Vec<usize>,
    /// Basic blocks per stage.
    pub blocks: Vec<usize>,
}

impl ResNetConfig {
    /// The CIFAR-style ResNet of He et al. §4.2 with `n` blocks per stage (n = 1: 8 layers,
    /// n = 3: ResNet-20).
    pub fn small(classes: usize, n: usize) -> Self {
        ResNetConfig { in_channels: 3, classes, widths: vec![16, 32, 64], blocks: vec![n; 3] }
    }

    fn check(&self) -> Result<()> {
        if self.classes < 2 || self.widths.is_empty() || self.widths.len() != self.blocks.len() || self.blocks.contains(&0) {
            return Err(Error::invalid(format!("ResNet config {self:?}: need >= 2 classes and one block count >= 1 per width")));
        }
        Ok(())
    }
}

fn conv(w: &Weights, cin: usize, cout: usize, k: usize, stride: usize) -> Result<Conv2d> {
    let weight = w.get(&[cout, cin, k, k], "weight")?;
    Ok(Conv2d::new(weight, None, stride, k / 2))
}

/// conv3x3-BN-ReLU-conv3x3-BN plus the (projected) input, then ReLU.
struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    downsample: Option<(Conv2d, BatchNorm2d)>,
}

impl BasicBlock {
    fn load(w: &Weights, cin: usize, cout: usize, stride: usize) -> Result<Self> {
        let downsample = if stride != 1 || cin != cout {
            let d = w.pp("downsample");
            Some((conv(&d.pp(0), cin, cout, 1, stride)?, BatchNorm2d::load(&d.pp(1), cout)?))
        } else {
            None
        };
        Ok(BasicBlock {
            conv1: conv(&w.pp("conv1"), cin, cout, 3, stride)?,
            bn1: BatchNorm2d::load(&w.pp("bn1"), cout)?,
            conv2: conv(&w.pp("conv2"), cout, cout, 3, 1)?,
            bn2: BatchNorm2d::load(&w.pp("bn2"), cout)?,
            downsample,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.bn1.forward(&self.conv1.forward(x)?, train)?.relu()?;
        let h = self.bn2.forward(&self.conv2.forward(&h)?, train)?;
        let skip = match &self.downsample {
            Some((c, bn)) => bn.forward(&c.forward(x)?, train)?,
            None => x.clone(),
        };
        Ok((h + skip)?.relu()?)
    }

    fn norms<'a>(&'a self, prefix: &str, out: &mut Vec<(String, &'a BatchNorm2d)>) {
        out.push((format!("{prefix}.bn1"), &self.bn1));
        out.push((format!("{prefix}.bn2"), &self.bn2));
        if let Some((_, bn)) = &self.downsample {
            out.push((format!("{prefix}.downsample.1"), bn));
        }
    }
}

pub struct ResNet {
    pub config: ResNetConfig,
    conv1: Conv2d,
    bn1: BatchNorm2d,
    stages: Vec<Vec<BasicBlock>>,
    fc: Linear,
}

impl ResNet {
    pub fn load(w: &Weights, config: &ResNetConfig) -> Result<Self> {
        config.check()?;
        let c0 = config.widths[0];
        let mut stages = Vec::new();
        let mut cin = c0;
        for (s, (&width, &n)) in config.widths.iter().zip(&config.blocks).enumerate() {
            let lw = w.pp(format!("layer{}", s + 1));
            let mut blocks = Vec::new();
            for b in 0..n {
                let stride = if s > 0 && b == 0 { 2 } else { 1 };
                blocks.push(BasicBlock::load(&lw.pp(b), cin, width, stride)?);
                cin = width;
            }
            stages.push(blocks);
        }
        Ok(ResNet {
            config: config.clone(),
            conv1: conv(&w.pp("conv1"), config.in_channels, c0, 3, 1)?,
            bn1: BatchNorm2d::load(&w.pp("bn1"), c0)?,
            stages,
            fc: Linear::load(&w.pp("fc"), cin, config.classes, true)?,
        })
    }

    /// Penultimate features [b, width]: the globally average-pooled output of the last stage.
    pub fn features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = self.bn1.forward(&self.conv1.forward(x)?, train)?.relu()?;
        for stage in &self.stages {
            for block in stage {
                h = block.forward(&h, train)?;
            }
        }
        Ok(h.mean(D::Minus1)?.mean(D::Minus1)?)
    }

    /// Logits [b, classes] of images [b, 3, h, w]; `train` uses batch statistics in the norms
    /// and updates their running statistics.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.fc.forward(&self.features(x, train)?)
    }

    /// The BatchNorm layers under their key prefixes (their running statistics are saved with
    /// the parameters).
    pub fn norms(&self) -> Vec<(String, &BatchNorm2d)> {
        let mut out = vec![("bn1".to_string(), &self.bn1)];
        for (s, stage) in self.stages.iter().enumerate() {
            for (b, block) in stage.iter().enumerate() {
                block.norms(&format!("layer{}.{b}", s + 1), &mut out);
            }
        }
        out
    }
}

/// Fresh weights for `config` (torchvision's initialisation), drawn from `seed`: every tensor
/// from its own generator keyed by its name, so the draw does not depend on creation order.
pub fn init_weights(config: &ResNetConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    config.check()?;
    let dev = Device::Cpu;
    let mut t = HashMap::new();
    let key_seed = |key: &str| crate::rng::derive_u64(&[b"diffii-resnet-init\0", &seed.to_le_bytes(), key.as_bytes()]);
    let conv = |t: &mut HashMap<String, Tensor>, key: String, cin: usize, cout: usize, k: usize| -> Result<()> {
        let std = (2.0 / (cout * k * k) as f64).sqrt();
        let w = (seeded_randn(key_seed(&key), &[cout, cin, k, k], &dev)? * std)?;
        t.insert(format!("{key}.weight"), w);
        Ok(())
    };
    let bn = |t: &mut HashMap<String, Tensor>, key: &str, c: usize| -> Result<()> {
        t.insert(format!("{key}.weight"), Tensor::ones(c, DType::F32, &dev)?);
        t.insert(format!("{key}.bias"), Tensor::zeros(c, DType::F32, &dev)?);
        t.insert(format!("{key}.running_mean"), Tensor::zeros(c, DType::F32, &dev)?);
        t.insert(format!("{key}.running_var"), Tensor::ones(c, DType::F32, &dev)?);
        Ok(())
    };
    let c0 = config.widths[0];
    conv(&mut t, "conv1".into(), config.in_channels, c0, 3)?;
    bn(&mut t, "bn1", c0)?;
    let mut cin = c0;
    for (s, (&width, &n)) in config.widths.iter().zip(&config.blocks).enumerate() {
        for b in 0..n {
            let p = format!("layer{}.{b}", s + 1);
            let stride = if s > 0 && b == 0 { 2 } else { 1 };
            conv(&mut t, format!("{p}.conv1"), cin, width, 3)?;
            bn(&mut t, &format!("{p}.bn1"), width)?;
            conv(&mut t, format!("{p}.conv2"), width, width, 3)?;
            bn(&mut t, &format!("{p}.bn2"), width)?;
            if stride != 1 || cin != width {
                conv(&mut t, format!("{p}.downsample.0"), cin, width, 1)?;
                bn(&mut t, &format!("{p}.downsample.1"), width)?;
            }
            cin = width;
        }
    }
    let bound = 1.0 / (cin as f64).sqrt();
    let mut rng = derive_rng(&[b"diffii-resnet-init\0", &seed.to_le_bytes(), b"fc"]);
    let mut uniform = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-bound..bound) as f32).collect() };
    t.insert("fc.weight".into(), Tensor::from_vec(uniform(config.classes * cin), (config.classes, cin), &dev)?);
    t.insert("fc.bias".into(), Tensor::from_vec(uniform(config.classes), config.classes, &dev)?);
    Ok(t)
}

/// Whether `key` is a learned parameter (not a BatchNorm running statistic).
pub fn is_parameter(key: &str) -> bool {
    !(key.ends_with("running_mean") || key.ends_with("running_var") || key.ends_with("num_batches_tracked"))
}

/// A model over `tensors` whose parameters are trainable variables (see [`Weights::vars`]).
pub fn trainable(tensors: HashMap<String, Tensor>, config: &ResNetConfig) -> Result<(ResNet, Weights)> {
    let mut keys: Vec<String> = tensors.keys().filter(|k| is_parameter(k)).cloned().collect();
    keys.sort();
    let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let w = Weights::from_tensors(tensors, DType::F32, &Device::Cpu).with_trainable(&key_refs).with_precision(Precision::F32);
    let model = ResNet::load(&w, config)?;
    Ok((model, w))
}

/// An evaluation model from a saved or snapshotted state (see [`state`]): parameters and the
/// norms' running statistics.
pub fn from_state(state: HashMap<String, Tensor>, config: &ResNetConfig) -> Result<ResNet> {
    let w = Weights::from_tensors(state, DType::F32, &Device::Cpu).with_precision(Precision::F32);
    let model = ResNet::load(&w, config)?;
    for (prefix, bn) in model.norms() {
        let c = bn.channels();
        bn.set_running_stats(w.get(&[c], &format!("{prefix}.running_mean"))?, w.get(&[c], &format!("{prefix}.running_var"))?)?;
    }
    Ok(model)
}

/// Every tensor of the model as it stands (parameters from `w`'s variables, running
/// statistics from the norms), for saving.
pub fn state(model: &ResNet, w: &Weights) -> Result<Vec<(String, Tensor)>> {
    let mut out: Vec<(String, Tensor)> = w.vars().into_iter().map(|(k, v)| (k, v.as_tensor().detach())).collect();
    for (prefix, bn) in model.norms() {
        let (m, v) = bn.running_stats()?;
        out.push((format!("{prefix}.running_mean"), m));
        out.push((format!("{prefix}.running_var"), v));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}
