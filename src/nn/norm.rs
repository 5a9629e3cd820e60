//! `nn.GroupNorm` (fused with SiLU, for inference and for training) and `nn.LayerNorm` (composed of
//! differentiable ops in [`Mode::Train`]).
use candle_core::{DType, Tensor, D};

use super::activation::Activation;
use super::channel;
use super::mode::Mode;
use super::weights::Weights;
use crate::error::Result;
use crate::instrument::profile::{scope, Class};
use crate::kernels;

/// `nn.GroupNorm` over (C, H, W) of NCHW input, statistics in f32 or wider.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: usize,
    pub eps: f64,
}

impl GroupNorm {
    pub fn load(w: &Weights, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || channels % groups != 0 {
            return Err(crate::error::Error::Tensor {
                path: w.path(),
                key: w.key("weight"),
                msg: format!("{channels} channels cannot be split into {groups} norm groups"),
            });
        }
        Ok(GroupNorm { weight: w.get(&[channels], "weight")?, bias: w.get(&[channels], "bias")?, groups, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if kernels::fast_ok(&[x, &self.weight, &self.bias]) {
            return scope(Class::GroupNorm, || kernels::group_norm(x, self.groups, &self.weight, &self.bias, self.eps, false));
        }
        scope(Class::GroupNorm, || self.forward_trainable(x, false))
    }

    /// `act(forward(x))`, fused into one pass on the fast path, and into one op while `x`
    /// tracks gradients (f32 on the CPU), when `act` is SiLU.
    pub fn forward_act(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        if act != Activation::Silu {
            return act.forward(&self.forward(x)?);
        }
        if kernels::fast_ok(&[x, &self.weight, &self.bias]) {
            return scope(Class::GroupNorm, || kernels::group_norm(x, self.groups, &self.weight, &self.bias, self.eps, true));
        }
        scope(Class::GroupNorm, || self.forward_trainable(x, true))
    }

    /// While `x` tracks gradients (f32 on the CPU): [`forward_composed`](Self::forward_composed)'s
    /// values and gradients (then SiLU's when `silu`) to the bit, as one op.
    fn forward_trainable(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let c = x.dims().get(1).copied().unwrap_or(0);
        let fits = c > 0 && self.groups > 0 && c.is_multiple_of(self.groups) && self.weight.elem_count() == c && self.bias.elem_count() == c;
        if !(x.track_op() && kernels::fast_dtype_ok(&[x, &self.weight, &self.bias]) && fits) {
            let y = self.forward_composed(x)?;
            return if silu { Activation::Silu.forward(&y) } else { Ok(y) };
        }
        let shape = kernels::norm::GroupShape { channels: c, groups: self.groups, inner: x.dims()[2..].iter().product() };
        let op = GroupNormExact { shape, eps: self.eps, silu };
        Ok(x.contiguous()?.apply_op3(&self.weight.contiguous()?, &self.bias.contiguous()?, op)?)
    }

    /// Composed of differentiable candle ops (statistics in f32 for half-precision input).
    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let b = dims[0];
        let dtype = x.dtype();
        let internal = if matches!(dtype, DType::F16 | DType::BF16) { DType::F32 } else { dtype };
        let n = x.elem_count() / (b * self.groups);
        let xg = x.reshape((b, self.groups, n))?.to_dtype(internal)?;
        let mean = (xg.sum_keepdim(2)? / n as f64)?;
        let xc = xg.broadcast_sub(&mean)?;
        let var = (xc.sqr()?.sum_keepdim(2)? / n as f64)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?.to_dtype(dtype)?.reshape(dims.as_slice())?;
        channel::affine(&xn, &self.weight, &self.bias, 1)
    }
}

/// [`GroupNorm`]'s composition (normalisation, per-channel scale and shift) and optionally
/// SiLU as one op on f32 CPU tensors, with the composition's bits forward and backward
/// ([`kernels::norm::group_norm_exact`]). As candle ops it is a dozen graph nodes, each a pass
/// forward and several backward plus candle's accumulation of its gradient.
struct GroupNormExact {
    shape: kernels::norm::GroupShape,
    eps: f64,
    silu: bool,
}

impl candle_core::CustomOp3 for GroupNormExact {
    fn name(&self) -> &'static str {
        "group-norm"
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
        let x = kernels::io::op_slice(s1, l1, "group norm")?;
        let w = kernels::io::op_slice(s2, l2, "group norm")?;
        let b = kernels::io::op_slice(s3, l3, "group norm")?;
        let y = kernels::norm::group_norm_exact(x, w, b, self.shape, self.eps, self.silu);
        Ok((candle_core::CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let params = w.track_op() || b.track_op();
        let (dx, sums) = kernels::io::with_slices(&[x, y, grad, w, b], |v| {
            kernels::norm::group_norm_exact_backward(v[0], v[1], v[2], v[3], v[4], self.shape, self.eps, self.silu, params)
        })
        .map_err(|e| candle_core::Error::Msg(format!("group norm backward: {e}")))?;
        let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
        Ok(match sums {
            Some((dw, db)) => (Some(dx), Some(Tensor::from_vec(dw, w.shape(), w.device())?), Some(Tensor::from_vec(db, b.shape(), b.device())?)),
            None => (Some(dx), None, None),
        })
    }
}

/// `nn.LayerNorm` over the last dim.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
    pub mode: Mode,
}

impl LayerNorm {
    pub fn load(w: &Weights, dim: usize, eps: f64, mode: Mode) -> Result<Self> {
        Ok(LayerNorm { weight: w.get(&[dim], "weight")?, bias: w.get(&[dim], "bias")?, eps, mode })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        scope(Class::LayerNorm, || self.forward_inner(x))
    }

    fn forward_inner(&self, x: &Tensor) -> Result<Tensor> {
        // The fused kernel handles f32 / f16 / bf16 only.
        let fused = self.mode == Mode::Infer && x.dtype() != DType::F64;
        Ok(match fused {
            true => candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps as f32)?,
            false => {
                // Composition of differentiable ops (candle_nn::ops::layer_norm has no backward).
                // Not the one-op normalisation of `GroupNorm`: `x` feeds two of these ops and
                // usually a residual too, and candle adds the three gradients in an order that
                // one op's single gradient cannot reproduce to the bit.
                let dim = x.dim(D::Minus1)? as f64;
                let mean = (x.sum_keepdim(D::Minus1)? / dim)?;
                let xc = x.broadcast_sub(&mean)?;
                let var = (xc.sqr()?.sum_keepdim(D::Minus1)? / dim)?;
                let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
                channel::affine(&xn, &self.weight, &self.bias, xn.rank() - 1)?
            }
        })
    }
}
