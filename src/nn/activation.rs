//! Activation functions named in diffusers / transformers configs, and GEGLU.
use candle_core::{Module, Tensor};

use crate::error::Result;
use crate::instrument::profile::{scope, Class};
use crate::kernels;

/// Activation functions named in diffusers / transformers configs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// Exact (erf) GELU, torch's `F.gelu` default.
    Gelu,
    /// tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// CLIP's x * sigmoid(1.702 x).
    QuickGelu,
}

impl Activation {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "quick_gelu" => Activation::QuickGelu,
            _ => return None,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        scope(Class::Elementwise, || self.forward_inner(x))
    }

    fn forward_inner(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Silu => x.silu()?,
            Activation::Gelu => x.gelu_erf()?,
            Activation::GeluTanh => x.gelu()?,
            Activation::QuickGelu if kernels::fast_ok(&[x]) => kernels::activation::quick_gelu(x)?,
            Activation::QuickGelu => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
        })
    }
}

impl Module for Activation {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Activation::forward(self, x).map_err(candle_core::Error::wrap)
    }
}

/// GEGLU: `h` [..., 2*inner] -> value * gelu_erf(gate), value / gate the two halves of the last
/// dim; one fused pass when nothing tracks gradients, differentiable ops otherwise.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    if kernels::fast_ok(&[h]) {
        return scope(Class::Elementwise, || kernels::geglu(h));
    }
    geglu_composed(h)
}

/// [`geglu`] always composed of differentiable candle ops (exact erf GELU).
pub fn geglu_composed(h: &Tensor) -> Result<Tensor> {
    let half = h.dim(candle_core::D::Minus1)? / 2;
    scope(Class::Elementwise, || -> Result<Tensor> {
        let value = h.narrow(candle_core::D::Minus1, 0, half)?;
        let gate = h.narrow(candle_core::D::Minus1, half, half)?;
        Ok((value * gate.gelu_erf()?)?)
    })
}
