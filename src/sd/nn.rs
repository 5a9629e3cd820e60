//! The layers every SD component is built from, with two execution modes.
//!
//! candle's fused `layer_norm` and `softmax_last_dim` are fast but have no backward pass: a
//! gradient through them silently vanishes. [`Mode::Train`] switches those two to compositions
//! of differentiable primitives (same maths, slower); [`Mode::Infer`] uses the fused kernels.
//! GroupNorm, convolution, linear layers and activations are differentiable in both modes.
//!
//! Every layer also adds its multiply-accumulate count to a global FLOP counter when counting
//! is switched on, so benchmarks report GFLOP/s measured from the graph actually run.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use candle_core::{DType, Module, Tensor, D};

use crate::error::Result;
use crate::sd::kernels::profile::{scope, Class};
use crate::sd::attention_grad;
use crate::sd::frozen;
use crate::sd::kernels::{self, ConvInput};
use crate::sd::weights::Weights;

/// Which kernels to use: fused (inference) or differentiable (training, gradient checks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Infer,
    Train,
}

static COUNT_FLOPS: AtomicBool = AtomicBool::new(false);
static FLOPS: AtomicU64 = AtomicU64::new(0);

/// Starts counting floating-point operations of matmuls and convolutions (2 per MAC) from zero.
pub fn flops_start() {
    FLOPS.store(0, Ordering::Relaxed);
    COUNT_FLOPS.store(true, Ordering::Relaxed);
}

/// Stops counting and returns the count since [`flops_start`].
pub fn flops_stop() -> u64 {
    COUNT_FLOPS.store(false, Ordering::Relaxed);
    FLOPS.load(Ordering::Relaxed)
}

pub(crate) fn add_flops(macs: usize) {
    if COUNT_FLOPS.load(Ordering::Relaxed) {
        FLOPS.fetch_add(2 * macs as u64, Ordering::Relaxed);
    }
}

/// `nn.Linear`: y = x W^T + b, for inputs of any rank (the last dim is the feature dim),
/// plus an optional unmerged low-rank adapter.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub adapter: Option<Adapter>,
}

/// An unmerged LoRA update: the layer computes `x W^T + b + scale (x down^T) up^T`. Training
/// needs it unmerged so that `down` / `up` can be variables; inference merges instead
/// ([`crate::sd::lora::apply_lora`]).
#[derive(Clone, Debug)]
pub struct Adapter {
    /// [r, in]
    pub down: Tensor,
    /// [out, r]
    pub up: Tensor,
    pub scale: f64,
}

impl Linear {
    pub fn load(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = w.get(&[out_dim, in_dim], "weight")?;
        let bias = if bias { Some(w.get(&[out_dim], "bias")?) } else { None };
        Ok(Linear { weight, bias, adapter: None })
    }

    /// True when the fused f32 kernels may run: nothing here tracks gradients.
    pub(crate) fn fast(&self, x: &Tensor) -> bool {
        self.adapter.is_none() && self.fast_base(x)
    }

    /// [`fast`](Self::fast) for the layer without its adapter.
    fn fast_base(&self, x: &Tensor) -> bool {
        kernels::fast_ok(&[x, &self.weight]) && self.bias.as_ref().is_none_or(|b| kernels::fast_ok(&[b]))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_residual(x, None)
    }

    /// `forward(x) + residual`, the add fused into the product on the fast path.
    pub(crate) fn forward_residual(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let y = self.forward_base(x, residual)?;
        match &self.adapter {
            Some(a) => {
                let d = a.forward(x)?;
                Ok(scope(Class::Elementwise, || y + d)?)
            }
            None => Ok(y),
        }
    }

    /// `x W^T + b + residual`, without the adapter.
    fn forward_base(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        if self.fast_base(x) && residual.is_none_or(|r| kernels::fast_ok(&[r])) {
            let in_dim = x.dim(candle_core::D::Minus1)?;
            add_flops(x.elem_count() / in_dim.max(1) * in_dim * self.weight.dim(0)?);
            return scope(Class::Linear, || kernels::linear(x, &self.weight, self.bias.as_ref(), residual));
        }
        let y = self.forward_composed(x)?;
        Ok(match residual {
            Some(r) => scope(Class::Elementwise, || y + r)?,
            None => y,
        })
    }

    fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let in_dim = x.dim(D::Minus1)?;
        let (out_dim, _) = self.weight.dims2()?;
        add_flops(x.elem_count() / in_dim * in_dim * out_dim);
        // A 2-D matmul against the transposed weight avoids broadcasting the weight per batch.
        let wt = self.weight.t()?;
        // A frozen weight's gradient is neither computed nor kept (see `sd::frozen`).
        let y = per_item_rows(x, out_dim, |a| {
            if frozen::use_frozen_rhs(a, &wt) {
                frozen::matmul_frozen_rhs(a, &wt)
            } else {
                Ok(a.matmul(&wt)?)
            }
        })?;
        Ok(match &self.bias {
            Some(b) => scope(Class::Elementwise, || y.broadcast_add(b))?,
            None => y,
        })
    }
}

/// Applies the row-wise product `f` ([rows, in] -> [rows, out]) to `x` [..., in] one batch item
/// at a time and returns [..., out]. Each item gets its own product of a fixed shape: gemm may
/// pick a different kernel (and summation order) for a different row count, and a sample's
/// bytes must not depend on what else is in its batch.
fn per_item_rows(x: &Tensor, out_dim: usize, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let in_dim = dims[dims.len() - 1];
    let rows = x.elem_count() / in_dim;
    let x2 = x.reshape((rows, in_dim))?;
    let items = if dims.len() >= 3 { dims[0] } else { rows };
    let per = rows / items.max(1);
    let y = scope(Class::Linear, || -> Result<Tensor> {
        if items <= 1 {
            return f(&x2);
        }
        let parts = (0..items).map(|i| f(&x2.narrow(0, i * per, per)?)).collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    })?;
    let mut out_shape = dims.to_vec();
    *out_shape.last_mut().unwrap() = out_dim;
    Ok(y.reshape(out_shape)?)
}

impl Adapter {
    /// `scale (x down^T) up^T`, one product per batch item like [`Linear`]'s.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let in_dim = x.dim(D::Minus1)?;
        let (out_dim, r) = self.up.dims2()?;
        add_flops(x.elem_count() / in_dim * r * (in_dim + out_dim));
        let (dt, ut) = (self.down.t()?, self.up.t()?);
        let y = per_item_rows(x, out_dim, |a| Ok(a.matmul(&dt)?.matmul(&ut)?))?;
        Ok((y * self.scale)?)
    }
}

/// `nn.Conv2d` with square kernel, stride and symmetric padding.
#[derive(Clone, Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: usize,
    pub padding: usize,
    /// The flipped, transposed kernel that propagates gradients to the input when the weight
    /// is frozen (made on first use, see [`frozen::conv2d_frozen`]).
    pub(crate) grad_kernel: std::sync::Arc<std::sync::OnceLock<Tensor>>,
}

impl Conv2d {
    pub fn load(w: &Weights, cin: usize, cout: usize, k: usize, stride: usize, padding: usize) -> Result<Self> {
        let weight = w.get(&[cout, cin, k, k], "weight")?;
        let bias = Some(w.get(&[cout], "bias")?);
        Ok(Self::new(weight, bias, stride, padding))
    }

    /// A convolution from given tensors (weight [cout, cin, k, k]).
    pub fn new(weight: Tensor, bias: Option<Tensor>, stride: usize, padding: usize) -> Self {
        Conv2d { weight, bias, stride, padding, grad_kernel: Default::default() }
    }

    /// True when the fused f32 kernels may run: nothing here tracks gradients.
    pub(crate) fn fast(&self, x: &Tensor) -> bool {
        kernels::fast_ok(&[x, &self.weight]) && self.bias.as_ref().is_none_or(|b| kernels::fast_ok(&[b]))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let p = self.padding;
        self.forward_ext(x, ConvInput { upsample: None, pad: (p, p, p, p) }, None, None, 1.0)
    }

    /// `(conv(prepare(x)) + bias + extra_bias[b] + residual) / out_scale`, where `prepare`
    /// resizes (nearest) and zero-pads per `input` (whose padding replaces `self.padding`) and
    /// `extra_bias` [b, cout] is a per-sample bias (the ResNet time embedding). Fused into one
    /// kernel on the fast path; otherwise composed of differentiable candle ops in this order:
    /// upsample, pad, conv, + bias, + extra bias, residual + y, / scale.
    pub(crate) fn forward_ext(
        &self,
        x: &Tensor,
        input: ConvInput,
        extra_bias: Option<&Tensor>,
        residual: Option<&Tensor>,
        out_scale: f64,
    ) -> Result<Tensor> {
        let extras_fast = extra_bias.is_none_or(|t| kernels::fast_ok(&[t])) && residual.is_none_or(|r| kernels::fast_ok(&[r]));
        if self.fast(x) && extras_fast {
            let (cout, cin, kh, kw) = self.weight.dims4()?;
            let y = scope(Class::Conv, || {
                kernels::conv2d(x, &self.weight, self.bias.as_ref(), extra_bias, self.stride, input, residual, out_scale)
            })?;
            let (b, _, ho, wo) = y.dims4()?;
            add_flops(b * ho * wo * cout * cin * kh * kw);
            return Ok(y);
        }
        let mut x = x.clone();
        if let Some((th, tw)) = input.upsample {
            x = scope(Class::Layout, || x.upsample_nearest2d(th, tw))?;
        }
        let (pt, pl, pb, pr) = input.pad;
        let symmetric = pt == pl && pt == pb && pt == pr;
        let conv = if symmetric && pt == self.padding {
            self.clone()
        } else {
            if pl + pr > 0 {
                x = scope(Class::Layout, || x.pad_with_zeros(3, pl, pr))?;
            }
            if pt + pb > 0 {
                x = scope(Class::Layout, || x.pad_with_zeros(2, pt, pb))?;
            }
            // A new padding: the cached gradient kernel still applies (it does not depend on it).
            Conv2d { padding: 0, ..self.clone() }
        };
        let mut y = conv.forward_composed(&x)?;
        if let Some(t) = extra_bias {
            y = scope(Class::Elementwise, || y.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?))?;
        }
        if let Some(r) = residual {
            y = scope(Class::Elementwise, || r + y)?;
        }
        if out_scale != 1.0 {
            y = scope(Class::Elementwise, || y / out_scale)?;
        }
        Ok(y)
    }

    fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let (cout, cin, kh, kw) = self.weight.dims4()?;
        // A frozen weight's gradient is neither computed nor kept (see `sd::frozen`).
        if frozen::use_frozen_conv(x, self) {
            let y = scope(Class::Conv, || frozen::conv2d_frozen(x, self))?;
            let (b, _, ho, wo) = y.dims4()?;
            add_flops(b * ho * wo * cout * cin * kh * kw);
            return Ok(y);
        }
        let y = scope(Class::Conv, || -> Result<Tensor> { Ok(if kh == 1 && kw == 1 && self.stride == 1 && self.padding == 0 {
            // A 1x1 convolution is a matmul over channels; candle's im2col path would copy.
            let (b, c, h, wd) = x.dims4()?;
            add_flops(b * h * wd * cin * cout);
            let w2 = self.weight.reshape((cout, cin))?;
            w2.broadcast_matmul(&x.reshape((b, c, h * wd))?)?.reshape((b, cout, h, wd))?
        } else {
            let y = x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
            let (b, _, ho, wo) = y.dims4()?;
            add_flops(b * ho * wo * cout * cin * kh * kw);
            y
        }) })?;
        scope(Class::Elementwise, || Ok(match &self.bias {
            Some(bias) => y.broadcast_add(&bias.reshape((1, cout, 1, 1))?)?,
            None => y,
        }))
    }
}

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
        scope(Class::GroupNorm, || self.forward_composed(x))
    }

    /// `act(forward(x))`, fused into one pass on the fast path when `act` is SiLU.
    pub(crate) fn forward_act(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        if act == Activation::Silu && kernels::fast_ok(&[x, &self.weight, &self.bias]) {
            return scope(Class::GroupNorm, || kernels::group_norm(x, self.groups, &self.weight, &self.bias, self.eps, true));
        }
        act.forward(&self.forward(x)?)
    }

    fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let dtype = x.dtype();
        let internal = if matches!(dtype, DType::F16 | DType::BF16) { DType::F32 } else { dtype };
        let n = x.elem_count() / (b * self.groups);
        let xg = x.reshape((b, self.groups, n))?.to_dtype(internal)?;
        let mean = (xg.sum_keepdim(2)? / n as f64)?;
        let xc = xg.broadcast_sub(&mean)?;
        let var = (xc.sqr()?.sum_keepdim(2)? / n as f64)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?.to_dtype(dtype)?.reshape(dims.as_slice())?;
        let mut wshape = vec![1; dims.len()];
        wshape[1] = c;
        Ok(xn.broadcast_mul(&self.weight.reshape(wshape.as_slice())?)?.broadcast_add(&self.bias.reshape(wshape.as_slice())?)?)
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
                let dim = x.dim(D::Minus1)? as f64;
                let mean = (x.sum_keepdim(D::Minus1)? / dim)?;
                let xc = x.broadcast_sub(&mean)?;
                let var = (xc.sqr()?.sum_keepdim(D::Minus1)? / dim)?;
                xc.broadcast_div(&(var + self.eps)?.sqrt()?)?.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?
            }
        })
    }
}

/// Softmax over the last dim: fused when inferring, differentiable when training.
pub fn softmax_last_dim(x: &Tensor, mode: Mode) -> Result<Tensor> {
    Ok(match mode {
        Mode::Infer => candle_nn::ops::softmax_last_dim(&x.contiguous()?)?,
        Mode::Train => candle_nn::ops::softmax(x, D::Minus1)?,
    })
}

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
            Activation::QuickGelu => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
        })
    }
}

impl Module for Activation {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Activation::forward(self, x).map_err(candle_core::Error::wrap)
    }
}

static FUSED_TRAIN_ATTENTION: AtomicBool = AtomicBool::new(true);

/// Switches the fused, differentiable attention of [`Mode::Train`] on or off (on by default;
/// off = attention composed of candle ops, for comparison).
pub fn set_fused_train_attention(on: bool) {
    FUSED_TRAIN_ATTENTION.store(on, Ordering::Relaxed);
}

/// Multi-head scaled dot-product attention: q [b, n, h*d], k/v [b, m, h*d] -> [b, n, h*d].
/// `mask`, if given, is added to the scores (broadcast over batch and heads).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: Option<&Tensor>, mode: Mode) -> Result<Tensor> {
    // The fused kernel records no backward: use it when inferring (candle's fused softmax
    // drops gradients there anyway) or when nothing tracks gradients.
    let mut ts = vec![q, k, v];
    ts.extend(mask);
    let fast = match mode {
        Mode::Infer => kernels::fast_dtype_ok(&ts),
        Mode::Train => kernels::fast_ok(&ts),
    };
    if fast {
        let (b, n, inner) = q.dims3()?;
        add_flops(2 * b * n * k.dim(1)? * inner);
        return scope(Class::Attention, || kernels::attention(q, k, v, heads, mask));
    }
    if mode == Mode::Train && FUSED_TRAIN_ATTENTION.load(Ordering::Relaxed) && attention_grad::usable(&ts) {
        let (b, n, inner) = q.dims3()?;
        add_flops(2 * b * n * k.dim(1)? * inner);
        return scope(Class::Attention, || attention_grad::attention(q, k, v, heads, mask));
    }
    let (b, n, inner) = q.dims3()?;
    let m = k.dim(1)?;
    let d = inner / heads;
    let split = |t: &Tensor, len: usize| -> Result<Tensor> {
        Ok(t.reshape((b, len, heads, d))?.transpose(1, 2)?.contiguous()?)
    };
    let (qh, kh, vh) = scope(Class::Layout, || -> Result<_> { Ok((split(q, n)?, split(k, m)?, split(v, m)?)) })?;
    add_flops(2 * b * heads * n * m * d);
    let scale = 1.0 / (d as f64).sqrt();
    let out = scope(Class::Attention, || -> Result<Tensor> {
        let mut scores = (qh.matmul(&kh.t()?)? * scale)?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        let probs = softmax_last_dim(&scores, mode)?;
        Ok(probs.matmul(&vh)?)
    })?;
    scope(Class::Layout, || Ok(out.transpose(1, 2)?.reshape((b, n, inner))?))
}
