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
            Activation::Silu if x.track_op() && kernels::fast_dtype_ok(&[x]) => x.contiguous()?.apply_op1(SiluExact)?,
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
/// dim; one fused pass when nothing tracks gradients, a differentiable op with the bytes of
/// [`geglu_composed`] on f32 CPU tensors otherwise.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    if kernels::fast_ok(&[h]) {
        return scope(Class::Elementwise, || kernels::geglu(h));
    }
    geglu_trainable(h)
}

/// [`geglu_composed`]'s values and gradient, to the bit, in one pass each way on f32 CPU
/// tensors (candle's composition takes two narrows, a GELU and a product forward, and about
/// fifteen passes backward: the GELU derivative alone is nine ops); composed elsewhere.
pub fn geglu_trainable(h: &Tensor) -> Result<Tensor> {
    let two = h.dim(candle_core::D::Minus1)?;
    if !kernels::fast_dtype_ok(&[h]) || two % 2 != 0 {
        return geglu_composed(h);
    }
    Ok(scope(Class::Elementwise, || h.contiguous()?.apply_op1(Geglu { inner: two / 2 }))?)
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

/// SiLU with a gradient, one pass each way, with the bits of candle's `silu` and its backward
/// (about eight passes: [`kernels::activation::silu_exact_backward`]).
struct SiluExact;

impl candle_core::CustomOp1 for SiluExact {
    fn name(&self) -> &'static str {
        "silu-exact"
    }

    fn cpu_fwd(&self, s: &candle_core::CpuStorage, l: &candle_core::Layout) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = kernels::io::op_slice(s, l, "silu")?;
        Ok((candle_core::CpuStorage::F32(kernels::activation::silu_exact(x)), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(kernels::io::op_grad(x, &[x, y, grad], "silu", |v| kernels::activation::silu_exact_backward(v[0], v[1], v[2]))?))
    }
}

struct Geglu {
    inner: usize,
}

impl candle_core::CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, s: &candle_core::CpuStorage, l: &candle_core::Layout) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let h = kernels::io::op_slice(s, l, "geglu")?;
        let mut dims = l.dims().to_vec();
        *dims.last_mut().expect("geglu_trainable checked the last dim") = self.inner;
        Ok((candle_core::CpuStorage::F32(kernels::activation::geglu_exact(h, self.inner)), dims.into()))
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(kernels::io::op_grad(h, &[h, grad], "geglu", |v| kernels::activation::geglu_exact_backward(v[0], v[1], self.inner))?))
    }
}

/// `relu(a + b)` (a residual block's end). On f32 CPU tensors one custom op: one pass forward,
/// and backward one masked copy of the gradient shared by both inputs, where candle's add and
/// ReLU would make five passes.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() != b.dims() || !kernels::fast_dtype_ok(&[a, b]) {
        return Ok((a + b)?.relu()?);
    }
    Ok(scope(Class::Elementwise, || a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu))?)
}

struct AddRelu;

impl candle_core::CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "add-relu"
    }

    fn cpu_fwd(&self, s1: &candle_core::CpuStorage, l1: &candle_core::Layout, s2: &candle_core::CpuStorage, l2: &candle_core::Layout) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (a, b) = (kernels::io::op_slice(s1, l1, "add-relu")?, kernels::io::op_slice(s2, l2, "add-relu")?);
        let mut out = kernels::io::uninit(a.len());
        out.par_chunks_mut(1 << 14).zip(a.par_chunks(1 << 14).zip(b.par_chunks(1 << 14))).for_each(|(d, (a, b))| {
            for ((d, &a), &b) in d.iter_mut().zip(a).zip(b) {
                *d = (a + b).max(0.0);
            }
        });
        Ok((candle_core::CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, _a: &Tensor, _b: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // PyTorch's threshold_backward: the gradient passes where the output is positive.
        use rayon::prelude::*;
        let g = kernels::io::op_grad(res, &[res, grad], "add-relu", |v| {
            let mut g = kernels::io::uninit(v[0].len());
            g.par_chunks_mut(1 << 14).zip(v[0].par_chunks(1 << 14).zip(v[1].par_chunks(1 << 14))).for_each(|(d, (y, g))| {
                for ((d, &y), &g) in d.iter_mut().zip(y).zip(g) {
                    *d = if y > 0.0 { g } else { 0.0 };
                }
            });
            g
        })?;
        Ok((Some(g.clone()), Some(g)))
    }
}
