//! `nn.GroupNorm` (fused with SiLU on the fast path) and `nn.LayerNorm` (composed of
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
        scope(Class::GroupNorm, || self.forward_trainable(x))
    }

    /// `act(forward(x))`, fused into one pass on the fast path when `act` is SiLU.
    pub fn forward_act(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        if act == Activation::Silu && kernels::fast_ok(&[x, &self.weight, &self.bias]) {
            return scope(Class::GroupNorm, || kernels::group_norm(x, self.groups, &self.weight, &self.bias, self.eps, true));
        }
        act.forward(&self.forward(x)?)
    }

    /// While `x` tracks gradients (f32 on the CPU): [`forward_composed`](Self::forward_composed)'s
    /// values and gradients to the bit, with the normalisation as one op.
    fn forward_trainable(&self, x: &Tensor) -> Result<Tensor> {
        if !(x.track_op() && kernels::fast_dtype_ok(&[x])) {
            return self.forward_composed(x);
        }
        let n = x.elem_count() / (x.dim(0)? * self.groups);
        let xn = x.contiguous()?.apply_op1(NormalizeRows { n, eps: self.eps })?;
        channel::add(&channel::mul(&xn, &self.weight, 1)?, &self.bias, 1)
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
        channel::add(&channel::mul(&xn, &self.weight, 1)?, &self.bias, 1)
    }
}

/// The normalisation (before the affine) of [`GroupNorm`]'s composition over rows of `n`
/// contiguous values (a batch element's group), as one op on f32 CPU tensors with the
/// composition's bits forward and backward ([`kernels::norm::normalize_exact`]). Composed, it
/// is about a dozen graph nodes, each a pass forward and several backward.
struct NormalizeRows {
    /// Values per (batch element, group).
    n: usize,
    eps: f64,
}

impl candle_core::CustomOp1 for NormalizeRows {
    fn name(&self) -> &'static str {
        "normalize-rows"
    }

    fn cpu_fwd(&self, s: &candle_core::CpuStorage, l: &candle_core::Layout) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = kernels::io::op_slice(s, l, "group norm")?;
        Ok((candle_core::CpuStorage::F32(kernels::norm::normalize_exact(x, self.n, self.eps)), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(kernels::io::op_grad(x, &[x, grad], "group norm", |v| kernels::norm::normalize_exact_backward(v[0], v[1], self.n, self.eps))?))
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
                let last = xn.rank() - 1;
                channel::add(&channel::mul(&xn, &self.weight, last)?, &self.bias, last)?
            }
        })
    }
}
