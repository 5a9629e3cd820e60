//! `nn.BatchNorm2d` for the classifiers: normalisation of NCHW maps per channel with batch
//! statistics while training and running statistics at evaluation, and the update of those
//! running statistics.
//!
//! Semantics follow PyTorch's `torch.nn.BatchNorm2d(c)` with its defaults (`eps = 1e-5`,
//! `momentum = 0.1`, `affine = True`, `track_running_stats = True`; Ioffe & Szegedy, "Batch
//! Normalization", 2015, Algorithm 1):
//! - training: `y = (x - μ_B) / sqrt(σ²_B + eps) * weight + bias`, with μ_B and the *biased*
//!   variance σ²_B over (N, H, W); then `running_mean ← (1 - m) running_mean + m μ_B` and
//!   `running_var ← (1 - m) running_var + m σ²_B · n / (n - 1)` (the *unbiased* variance, n =
//!   N·H·W), computed from detached values so no graph hangs off the buffers;
//! - evaluation: the same with `running_mean` / `running_var` in place of the batch statistics.
//!
//! On f32 CPU tensors the training path is one custom op, with the ReLU that follows a norm in
//! a ResNet fused into it ([`BatchNorm2d::forward_relu`]): statistics, normalisation and batch
//! norm's backward written out in [`crate::kernels::norm`] (a small network's step is otherwise
//! dominated by candle's strided reductions and broadcasts); evaluation is one scale-and-shift
//! pass. Other dtypes and devices use a composition of
//! candle ops that all have a backward pass (sums, squares, square roots, broadcast
//! arithmetic); `tests/fused_grad.rs` checks the two against each other, values and gradients.
//!
//! The running statistics change during a training forward that only borrows the layer (a
//! model is shared by reference between forward and backward), so they live behind a mutex.
//! `num_batches_tracked` is not kept: it only matters for `momentum = None`, which we do not
//! support.
use std::sync::{Mutex, MutexGuard};

use candle_core::{DType, Tensor};

use super::weights::Weights;
use crate::error::{Error, Result};
use crate::instrument::profile::{scope, Class};

/// `torch.nn.BatchNorm2d` (affine, tracking running statistics).
#[derive(Debug)]
pub struct BatchNorm2d {
    /// γ, `[c]`; a trainable variable's tensor when the weights mark it trainable.
    pub weight: Tensor,
    /// β, `[c]`.
    pub bias: Tensor,
    pub eps: f64,
    /// Weight of the new batch statistic in the running averages (PyTorch's `momentum`).
    pub momentum: f64,
    channels: usize,
    /// (running_mean, running_var), each `[c]`, in the dtype of the weights.
    running: Mutex<(Tensor, Tensor)>,
}

impl BatchNorm2d {
    /// PyTorch's defaults.
    pub const EPS: f64 = 1e-5;
    pub const MOMENTUM: f64 = 0.1;

    /// Loads `weight`, `bias`, `running_mean` and `running_var` (`[c]` each; torchvision's key
    /// names). The buffers are never trainable: they are taken as plain tensors (detached).
    pub fn load(w: &Weights, channels: usize) -> Result<Self> {
        if channels == 0 {
            return Err(Error::invalid(format!("{}: a batch norm needs at least one channel", w.key("weight"))));
        }
        let weight = w.get(&[channels], "weight")?;
        let bias = w.get(&[channels], "bias")?;
        let mean = w.get(&[channels], "running_mean")?.detach();
        let var = w.get(&[channels], "running_var")?.detach();
        Self::new(weight, bias, mean, var)
    }

    /// A layer from given tensors, each `[c]`, with PyTorch's eps and momentum.
    pub fn new(weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor) -> Result<Self> {
        let channels = match weight.dims() {
            [c] if *c > 0 => *c,
            d => return Err(Error::invalid(format!("batch norm weight has shape {d:?}, expected [channels]"))),
        };
        for (name, t) in [("bias", &bias), ("running_mean", &running_mean), ("running_var", &running_var)] {
            if t.dims() != [channels] {
                return Err(Error::invalid(format!(
                    "batch norm {name} has shape {:?}, expected [{channels}] like the weight",
                    t.dims()
                )));
            }
        }
        let dtype = weight.dtype();
        let running = (running_mean.to_dtype(dtype)?.detach(), running_var.to_dtype(dtype)?.detach());
        Ok(BatchNorm2d {
            weight,
            bias,
            eps: Self::EPS,
            momentum: Self::MOMENTUM,
            channels,
            running: Mutex::new(running),
        })
    }

    pub fn channels(&self) -> usize {
        self.channels
    }

    fn lock(&self) -> MutexGuard<'_, (Tensor, Tensor)> {
        // A poisoned lock means a thread panicked mid-update; the buffers are still whole
        // tensors (they are replaced, never written in place), so they remain usable.
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Copies of (running_mean, running_var).
    pub fn running_stats(&self) -> Result<(Tensor, Tensor)> {
        let g = self.lock();
        Ok((g.0.clone(), g.1.clone()))
    }

    /// Replaces the running statistics (restoring a checkpoint); each must be `[c]`.
    pub fn set_running_stats(&self, mean: Tensor, var: Tensor) -> Result<()> {
        for (name, t) in [("running_mean", &mean), ("running_var", &var)] {
            if t.dims() != [self.channels] {
                return Err(Error::invalid(format!(
                    "batch norm {name} of shape {:?} given to a layer of {} channels",
                    t.dims(),
                    self.channels
                )));
            }
        }
        let dtype = self.weight.dtype();
        let device = self.weight.device();
        let new = (
            mean.to_dtype(dtype)?.to_device(device)?.detach(),
            var.to_dtype(dtype)?.to_device(device)?.detach(),
        );
        *self.lock() = new;
        Ok(())
    }

    /// Normalises NCHW `x`: with batch statistics (and a running-statistics update) when
    /// `train`, with the running statistics otherwise.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_act(x, train, false)
    }

    /// `relu(self.forward(x, train))`, in the same pass on f32 CPU tensors.
    pub fn forward_relu(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_act(x, train, true)
    }

    fn forward_act(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        let (n, c, h, w) = match x.dims() {
            [n, c, h, w] => (*n, *c, *h, *w),
            d => return Err(Error::invalid(format!("batch norm expects NCHW input, got shape {d:?}"))),
        };
        if c != self.channels {
            return Err(Error::invalid(format!("batch norm over {} channels got input with {c} channels", self.channels)));
        }
        if !train {
            return scope(Class::Elementwise, || self.forward_eval(x, relu));
        }
        let count = n * h * w;
        if count <= 1 {
            // PyTorch: "Expected more than 1 value per channel when training"; the unbiased
            // variance would divide by zero.
            return Err(Error::invalid(format!(
                "batch norm needs more than 1 value per channel when training, got input of shape {:?}",
                x.dims()
            )));
        }
        if crate::kernels::fast_dtype_ok(&[x, &self.weight, &self.bias]) {
            return scope(Class::Elementwise, || self.forward_train_fused(x, relu));
        }
        let y = scope(Class::Elementwise, || self.forward_train(x, count))?;
        Ok(if relu { y.relu()? } else { y })
    }

    /// The training forward for f32 CPU tensors as one custom op (statistics from
    /// [`crate::kernels::norm::batch_norm_stats`], a backward written out): same maths as
    /// [`Self::forward_train`], then the ReLU when `relu`. The bytes do not depend on the
    /// thread count.
    fn forward_train_fused(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let hw = h * w;
        let count = (n * hw) as f64;
        let stats = crate::kernels::io::with_slices(&[&x.detach()], |v| crate::kernels::norm::batch_norm_stats(v[0], n, c, hw))?;
        let (mean, var): (Vec<f32>, Vec<f64>) = stats.into_iter().unzip();
        let rstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + self.eps).sqrt()).collect();
        let op = FusedTrain { mean: mean.clone(), rstd, relu };
        let y = x.contiguous()?.apply_op3(&self.weight.contiguous()?, &self.bias.contiguous()?, op)?;
        let m = self.momentum;
        let dev = self.weight.device();
        let batch_mean = Tensor::from_vec(mean, c, dev)?;
        let unbiased = Tensor::from_vec(var.iter().map(|&v| (v * count / (count - 1.0)) as f32).collect::<Vec<_>>(), c, dev)?;
        let mut g = self.lock();
        let new_mean = ((&g.0 * (1.0 - m))? + (batch_mean * m)?)?;
        let new_var = ((&g.1 * (1.0 - m))? + (unbiased * m)?)?;
        *g = (new_mean, new_var);
        Ok(y)
    }

    fn channel_shape(&self) -> (usize, usize, usize, usize) {
        (1, self.channels, 1, 1)
    }

    fn forward_train(&self, x: &Tensor, count: usize) -> Result<Tensor> {
        let dtype = x.dtype();
        // Half-precision sums over a whole batch lose too much; PyTorch also accumulates in f32.
        let internal = if matches!(dtype, DType::F16 | DType::BF16) { DType::F32 } else { dtype };
        let xi = x.to_dtype(internal)?;
        let mean = (xi.sum_keepdim((0, 2, 3))? / count as f64)?;
        let xc = xi.broadcast_sub(&mean)?;
        let var = (xc.sqr()?.sum_keepdim((0, 2, 3))? / count as f64)?;
        let xn = xc.broadcast_div(&(&var + self.eps)?.sqrt()?)?.to_dtype(dtype)?;
        let cs = self.channel_shape();
        let y = xn
            .broadcast_mul(&self.weight.to_dtype(dtype)?.reshape(cs)?)?
            .broadcast_add(&self.bias.to_dtype(dtype)?.reshape(cs)?)?;

        let m = self.momentum;
        let wdtype = self.weight.dtype();
        let batch_mean = mean.detach().flatten_all()?.to_dtype(wdtype)?;
        let unbiased = (var.detach().flatten_all()? * (count as f64 / (count - 1) as f64))?.to_dtype(wdtype)?;
        let mut g = self.lock();
        let new_mean = ((&g.0 * (1.0 - m))? + (batch_mean * m)?)?;
        let new_var = ((&g.1 * (1.0 - m))? + (unbiased * m)?)?;
        *g = (new_mean, new_var);
        Ok(y)
    }

    fn forward_eval(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        let (mean, var) = self.running_stats()?;
        let dtype = x.dtype();
        let cs = self.channel_shape();
        // Folded into one scale and shift per channel: one pass over x instead of four.
        let scale = (&self.weight / (var + self.eps)?.sqrt()?)?;
        let shift = (&self.bias - (mean * &scale)?)?;
        if crate::kernels::fast_ok(&[x, &scale, &shift]) {
            // The same two roundings as the broadcast ops below, and the ReLU, in one pass.
            return crate::kernels::norm::scale_shift_channels(x, &scale, &shift, relu);
        }
        let y = x.broadcast_mul(&scale.to_dtype(dtype)?.reshape(cs)?)?.broadcast_add(&shift.to_dtype(dtype)?.reshape(cs)?)?;
        Ok(if relu { y.relu()? } else { y })
    }
}

/// `y = (x - mean) rstd gamma + beta` per channel with the batch statistics given, then
/// `max(y, 0)` when `relu`; its backward is batch norm's, including the statistics'
/// dependence on x, applied to the gradient masked where the ReLU output is 0 (PyTorch's
/// `threshold_backward`); see [`crate::kernels::norm::batch_norm_backward`].
struct FusedTrain {
    mean: Vec<f32>,
    rstd: Vec<f64>,
    relu: bool,
}

impl candle_core::CustomOp3 for FusedTrain {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        const OP: &str = "batch norm";
        use crate::kernels::io::op_slice;
        let (xs, gamma, beta) = (op_slice(s1, l1, OP)?, op_slice(s2, l2, OP)?, op_slice(s3, l3, OP)?);
        let (_, c, h, w) = l1.shape().dims4()?;
        let scale: Vec<f32> = (0..c).map(|ch| (self.rstd[ch] * gamma[ch] as f64) as f32).collect();
        let out = crate::kernels::norm::channel_affine(xs, c, h * w, Some(&self.mean), &scale, beta, self.relu);
        Ok((candle_core::CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, gamma: &Tensor, _beta: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c, h, w) = x.dims4()?;
        let to_msg = |e: crate::error::Error| candle_core::Error::Msg(format!("batch norm backward: {e}"));
        let (dx, dgamma, dbeta) = crate::kernels::io::with_slices(&[x, grad, res, gamma], |v| {
            crate::kernels::norm::batch_norm_backward(v[0], v[1], v[2], self.relu, n, c, h * w, &self.mean, &self.rstd, v[3])
        })
        .map_err(to_msg)?;
        let dev = x.device();
        let to = |v: Vec<f64>| Tensor::from_vec(v.into_iter().map(|x| x as f32).collect::<Vec<_>>(), c, dev);
        Ok((Some(Tensor::from_vec(dx, (n, c, h, w), dev)?), Some(to(dgamma)?), Some(to(dbeta)?)))
    }
}
