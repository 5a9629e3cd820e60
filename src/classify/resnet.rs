//! ResNet classifiers (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016)
//! under torchvision's key names (`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.downsample.0`,
//! `fc`), so a checkpoint written here reads like a torchvision one and a torchvision or timm
//! ResNet-50 checkpoint (saved as safetensors) loads here.
//!
//! The default [`ResNetConfig::small`] is the CIFAR-style network of the paper's §4.2: a 3x3
//! stem without max-pooling, three stages of basic blocks of widths 16 / 32 / 64 (stride 2
//! between stages), global average pooling and a linear head — fast to train from scratch on a
//! CPU at 28-64 px. [`ResNetConfig::resnet50`] is torchvision's `resnet50`: a 7x7 stride-2 stem
//! with 3x3 stride-2 max-pooling and four stages of bottleneck blocks (3, 4, 6, 3; stride on the
//! 3x3 convolution, "ResNet v1.5"), for fine-tuning ImageNet weights at 224 px.
//! Fresh weights follow torchvision's initialisation: convolutions Kaiming-normal (fan-out,
//! ReLU gain), BatchNorm scale 1 and shift 0, the head U(-1/sqrt(in), 1/sqrt(in)).
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::nn::{BatchNorm2d, Conv2d, Linear, Precision, Weights};
use crate::rng::{derive_rng, seeded_randn};

/// The residual block.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Block {
    /// conv3x3-BN-ReLU-conv3x3-BN + skip; a stage's width is its output channels.
    #[default]
    Basic,
    /// conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1-BN + skip; output channels 4 x width.
    Bottleneck,
}

/// The layers before the first stage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stem {
    /// conv3x3 (stride 1) to the first width, BN, ReLU.
    #[default]
    Cifar,
    /// conv7x7 stride 2 to 64 channels, BN, ReLU, max-pool 3x3 stride 2 (padding 1).
    ImageNet,
}

/// How the model reads its [-1, 1] input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InputNorm {
    /// As given.
    #[default]
    Identity,
    /// torchvision's ImageNet normalisation: (x01 - mean) / std per channel, x01 = (x + 1) / 2.
    ImageNet,
}

/// For `skip_serializing_if`: settings at their default stay out of written files, so files
/// written before a setting existed keep their bytes and hashes.
pub(crate) fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// Shape of a ResNet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResNetConfig {
    pub in_channels: usize,
    pub classes: usize,
    /// Basic blocks: the stem's and each stage's output channels. Bottleneck blocks: each
    /// stage's inner width (its output is 4x that).
    pub widths: Vec<usize>,
    /// Blocks per stage.
    pub blocks: Vec<usize>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub block: Block,
    #[serde(default, skip_serializing_if = "is_default")]
    pub stem: Stem,
    #[serde(default, skip_serializing_if = "is_default")]
    pub input_norm: InputNorm,
}

/// ImageNet channel means and standard deviations (torchvision's).
pub const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

/// One block's place: key prefix, input channels, inner width, output channels, stride.
struct BlockSpec {
    prefix: String,
    cin: usize,
    width: usize,
    cout: usize,
    stride: usize,
}

impl BlockSpec {
    /// (input, output, kernel, stride) of each convolution `conv1`, `conv2`, ... of the block.
    fn convs(&self, block: Block) -> Vec<(usize, usize, usize, usize)> {
        match block {
            Block::Basic => vec![(self.cin, self.cout, 3, self.stride), (self.cout, self.cout, 3, 1)],
            Block::Bottleneck => vec![(self.cin, self.width, 1, 1), (self.width, self.width, 3, self.stride), (self.width, self.cout, 1, 1)],
        }
    }

    /// Whether the skip connection needs a projection (`downsample`).
    fn projects(&self) -> bool {
        self.stride != 1 || self.cin != self.cout
    }
}

impl ResNetConfig {
    /// The CIFAR-style ResNet of He et al. §4.2 with `n` blocks per stage (n = 1: 8 layers,
    /// n = 3: ResNet-20).
    pub fn small(classes: usize, n: usize) -> Self {
        ResNetConfig {
            in_channels: 3,
            classes,
            widths: vec![16, 32, 64],
            blocks: vec![n; 3],
            block: Block::Basic,
            stem: Stem::Cifar,
            input_norm: InputNorm::Identity,
        }
    }

    /// torchvision's `resnet50(num_classes = classes)`, reading images with ImageNet
    /// normalisation (as its pretrained weights expect).
    pub fn resnet50(classes: usize) -> Self {
        ResNetConfig {
            in_channels: 3,
            classes,
            widths: vec![64, 128, 256, 512],
            blocks: vec![3, 4, 6, 3],
            block: Block::Bottleneck,
            stem: Stem::ImageNet,
            input_norm: InputNorm::ImageNet,
        }
    }

    fn stem_channels(&self) -> usize {
        match self.stem {
            Stem::Cifar => self.widths[0],
            Stem::ImageNet => 64,
        }
    }

    /// Kernel and stride of the stem convolution.
    fn stem_conv(&self) -> (usize, usize) {
        match self.stem {
            Stem::Cifar => (3, 1),
            Stem::ImageNet => (7, 2),
        }
    }

    fn expansion(&self) -> usize {
        match self.block {
            Block::Basic => 1,
            Block::Bottleneck => 4,
        }
    }

    /// Every block in order (stride 2 at the first block of every stage but the first).
    fn layout(&self) -> Vec<BlockSpec> {
        let mut out = Vec::new();
        let mut cin = self.stem_channels();
        for (s, (&width, &n)) in self.widths.iter().zip(&self.blocks).enumerate() {
            for b in 0..n {
                let cout = width * self.expansion();
                out.push(BlockSpec { prefix: format!("layer{}.{b}", s + 1), cin, width, cout, stride: if s > 0 && b == 0 { 2 } else { 1 } });
                cin = cout;
            }
        }
        out
    }

    /// Channels of the penultimate features.
    pub fn feature_channels(&self) -> usize {
        self.widths.last().map_or(0, |w| w * self.expansion())
    }

    fn check(&self) -> Result<()> {
        if self.classes < 2 || self.widths.is_empty() || self.widths.len() != self.blocks.len() || self.blocks.contains(&0) {
            return Err(Error::invalid(format!("ResNet config {self:?}: need >= 2 classes and one block count >= 1 per width")));
        }
        Ok(())
    }
}

/// A bias-free k x k convolution with padding k / 2 (torchvision's).
fn conv(w: &Weights, cin: usize, cout: usize, k: usize, stride: usize) -> Result<Conv2d> {
    let weight = w.get(&[cout, cin, k, k], "weight")?;
    Ok(Conv2d::new(weight, None, stride, k / 2).unfolded())
}

/// PyTorch's `MaxPool2d(3, stride=2, padding=1)` of a non-negative (post-ReLU) tensor, as the
/// elementwise maximum of its nine strided taps: candle's own max-pool has no backward pass for
/// overlapping windows, and a maximum of taps does. Zero padding equals PyTorch's -inf padding
/// here because every value is >= 0.
fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (oh, ow) = ((h + 2 - 3) / 2 + 1, (w + 2 - 3) / 2 + 1);
    // One extra zero row and column at the end leaves room for every tap's 2 * out span.
    let p = x.pad_with_zeros(2, 1, 2 * oh + 1 - h)?.pad_with_zeros(3, 1, 2 * ow + 1 - w)?;
    let mut out: Option<Tensor> = None;
    for dy in 0..3 {
        let rows = p.narrow(2, dy, 2 * oh)?.reshape((b, c, oh, 2, 2 * ow + 2))?.narrow(3, 0, 1)?.squeeze(3)?;
        for dx in 0..3 {
            let tap = rows.narrow(3, dx, 2 * ow)?.reshape((b, c, oh, ow, 2))?.narrow(4, 0, 1)?.squeeze(4)?;
            out = Some(match out {
                None => tap,
                Some(m) => m.maximum(&tap)?,
            });
        }
    }
    out.ok_or_else(|| Error::invalid("max-pool of an empty window"))
}

/// A residual block: its convolutions and norms in order (two for a basic block, three for a
/// bottleneck), the skip projection, then ReLU of the sum.
struct ResBlock {
    layers: Vec<(Conv2d, BatchNorm2d)>,
    downsample: Option<(Conv2d, BatchNorm2d)>,
}

impl ResBlock {
    fn load(w: &Weights, block: Block, b: &BlockSpec) -> Result<Self> {
        let downsample = if b.projects() {
            let d = w.pp("downsample");
            Some((conv(&d.pp(0), b.cin, b.cout, 1, b.stride)?, BatchNorm2d::load(&d.pp(1), b.cout)?))
        } else {
            None
        };
        let layers = b
            .convs(block)
            .into_iter()
            .enumerate()
            .map(|(i, (cin, cout, k, stride))| Ok((conv(&w.pp(format!("conv{}", i + 1)), cin, cout, k, stride)?, BatchNorm2d::load(&w.pp(format!("bn{}", i + 1)), cout)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(ResBlock { layers, downsample })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, (c, bn)) in self.layers.iter().enumerate() {
            let y = c.forward(&h)?;
            // A ReLU follows every norm but the last, which comes after the skip is added.
            h = if i + 1 < self.layers.len() { bn.forward_relu(&y, train)? } else { bn.forward(&y, train)? };
        }
        let skip = match &self.downsample {
            Some((c, bn)) => bn.forward(&c.forward(x)?, train)?,
            None => x.clone(),
        };
        crate::nn::activation::add_relu(&h, &skip)
    }

    fn norms<'a>(&'a self, prefix: &str, out: &mut Vec<(String, &'a BatchNorm2d)>) {
        for (i, (_, bn)) in self.layers.iter().enumerate() {
            out.push((format!("{prefix}.bn{}", i + 1), bn));
        }
        if let Some((_, bn)) = &self.downsample {
            out.push((format!("{prefix}.downsample.1"), bn));
        }
    }
}

pub struct ResNet {
    pub config: ResNetConfig,
    conv1: Conv2d,
    bn1: BatchNorm2d,
    blocks: Vec<(String, ResBlock)>,
    fc: Linear,
}

impl ResNet {
    pub fn load(w: &Weights, config: &ResNetConfig) -> Result<Self> {
        config.check()?;
        let stem = config.stem_channels();
        let blocks = config.layout().into_iter().map(|b| Ok((b.prefix.clone(), ResBlock::load(&w.pp(&b.prefix), config.block, &b)?))).collect::<Result<Vec<_>>>()?;
        let (k, stride) = config.stem_conv();
        Ok(ResNet {
            config: config.clone(),
            conv1: conv(&w.pp("conv1"), config.in_channels, stem, k, stride)?,
            bn1: BatchNorm2d::load(&w.pp("bn1"), stem)?,
            blocks,
            fc: Linear::load(&w.pp("fc"), config.feature_channels(), config.classes, true)?,
        })
    }

    /// Penultimate features [b, channels]: the globally average-pooled output of the last stage.
    pub fn features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = match self.config.input_norm {
            InputNorm::Identity => x.clone(),
            InputNorm::ImageNet => {
                // x01 = (x + 1) / 2, then (x01 - mean) / std: one scale and shift per channel.
                let scale: Vec<f32> = IMAGENET_STD.iter().map(|s| (0.5 / s) as f32).collect();
                let shift: Vec<f32> = IMAGENET_MEAN.iter().zip(IMAGENET_STD).map(|(m, s)| ((0.5 - m) / s) as f32).collect();
                let dev = x.device();
                let scale = Tensor::from_vec(scale, (1, 3, 1, 1), dev)?.to_dtype(x.dtype())?;
                let shift = Tensor::from_vec(shift, (1, 3, 1, 1), dev)?.to_dtype(x.dtype())?;
                x.broadcast_mul(&scale)?.broadcast_add(&shift)?
            }
        };
        let mut h = self.bn1.forward_relu(&self.conv1.forward(&x)?, train)?;
        if self.config.stem == Stem::ImageNet {
            h = max_pool_3x3_s2(&h)?;
        }
        for (_, block) in &self.blocks {
            h = block.forward(&h, train)?;
        }
        Ok(h.mean(D::Minus1)?.mean(D::Minus1)?)
    }

    /// Where the model's weights are.
    pub fn device(&self) -> Device {
        self.conv1.weight.device().clone()
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
        for (prefix, block) in &self.blocks {
            block.norms(prefix, &mut out);
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
    let stem = config.stem_channels();
    conv(&mut t, "conv1".into(), config.in_channels, stem, config.stem_conv().0)?;
    bn(&mut t, "bn1", stem)?;
    for b in config.layout() {
        let p = &b.prefix;
        for (i, (cin, cout, k, _)) in b.convs(config.block).into_iter().enumerate() {
            conv(&mut t, format!("{p}.conv{}", i + 1), cin, cout, k)?;
            bn(&mut t, &format!("{p}.bn{}", i + 1), cout)?;
        }
        if b.projects() {
            conv(&mut t, format!("{p}.downsample.0"), b.cin, b.cout, 1)?;
            bn(&mut t, &format!("{p}.downsample.1"), b.cout)?;
        }
    }
    let cin = config.feature_channels();
    let bound = 1.0 / (cin as f64).sqrt();
    let mut rng = derive_rng(&[b"diffii-resnet-init\0", &seed.to_le_bytes(), b"fc"]);
    let mut uniform = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-bound..bound) as f32).collect() };
    t.insert("fc.weight".into(), Tensor::from_vec(uniform(config.classes * cin), (config.classes, cin), &dev)?);
    t.insert("fc.bias".into(), Tensor::from_vec(uniform(config.classes), config.classes, &dev)?);
    Ok(t)
}

/// Replaces the fresh weights `init` with a checkpoint's (torchvision or timm key names,
/// safetensors): every tensor but the head must be in the file with the same shape; the head
/// (`fc.*`) is taken from the file only when its shape fits the classes here, else it stays
/// fresh — fine-tuning on new classes. Returns whether the head was taken.
pub fn load_pretrained(init: &mut HashMap<String, Tensor>, path: &std::path::Path) -> Result<bool> {
    let file = crate::nn::weights::load_all(path, &Device::Cpu)?;
    let mut head = true;
    // In name order, so that the first problem reported is the same on every run.
    let mut entries: Vec<(&String, &mut Tensor)> = init.iter_mut().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    for (k, t) in entries {
        match file.get(k) {
            Some(f) if f.dims() == t.dims() => *t = f.to_dtype(DType::F32)?,
            Some(_) | None if k.starts_with("fc.") => head = false,
            Some(f) => {
                return Err(Error::bad_file(path, format!("tensor `{k}` has shape {:?}; the model needs {:?}", f.dims(), t.dims())));
            }
            None => {
                return Err(Error::bad_file(path, format!("has no tensor `{k}`: is it a torchvision or timm checkpoint of this architecture, saved as safetensors?")));
            }
        }
    }
    Ok(head)
}

/// Whether `key` is a learned parameter (not a BatchNorm running statistic).
pub fn is_parameter(key: &str) -> bool {
    !(key.ends_with("running_mean") || key.ends_with("running_var") || key.ends_with("num_batches_tracked"))
}

/// A model over `tensors` whose parameters are trainable variables (see [`Weights::vars`]), on
/// `device` (off the CPU the layers use candle's own differentiable ops).
pub fn trainable(tensors: HashMap<String, Tensor>, config: &ResNetConfig, device: &Device) -> Result<(ResNet, Weights)> {
    let mut keys: Vec<String> = tensors.keys().filter(|k| is_parameter(k)).cloned().collect();
    keys.sort();
    let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let w = Weights::from_tensors(tensors, DType::F32, device).with_trainable(&key_refs).with_precision(Precision::F32);
    let model = ResNet::load(&w, config)?;
    Ok((model, w))
}

/// An evaluation model from a saved or snapshotted state (see [`state`]): parameters and the
/// norms' running statistics, on `device`.
pub fn from_state(state: HashMap<String, Tensor>, config: &ResNetConfig, device: &Device) -> Result<ResNet> {
    let w = Weights::from_tensors(state, DType::F32, device).with_precision(Precision::F32);
    let model = ResNet::load(&w, config)?;
    for (prefix, bn) in model.norms() {
        let c = bn.channels();
        bn.set_running_stats(w.get(&[c], &format!("{prefix}.running_mean"))?, w.get(&[c], &format!("{prefix}.running_var"))?)?;
    }
    Ok(model)
}

/// The model as it stands, for evaluation: the same parameters and running statistics (shared,
/// not copied) as plain tensors, so that nothing records a backward graph and the forward takes
/// the fused inference kernels (PyTorch's `no_grad`). Its logits are the trainable model's
/// `forward(x, false)` to the bit.
pub fn inference_copy(model: &ResNet, w: &Weights) -> Result<ResNet> {
    from_state(state(model, w)?.into_iter().collect(), &model.config, &model.device())
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
