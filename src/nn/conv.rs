//! `nn.Conv2d` with fused input preparation (nearest upsampling, asymmetric padding) and
//! epilogues (bias, per-sample bias, residual, output scale), bf16 products, and a backward that
//! skips the gradient of a frozen weight.
use std::sync::Arc;

use candle_core::Tensor;

use super::linear::Pointwise;
use super::frozen;
use super::items;
use super::mode::Precision;
use super::packed::PackedWeight;
use super::weights::Weights;
use crate::error::Result;
use crate::instrument::flops;
use crate::instrument::profile::{scope, Class};
use crate::kernels::{self, bf16::PackedA, linear::PackedLinear};

pub use crate::kernels::ConvInput;

/// `nn.Conv2d` with square kernel, stride and symmetric padding.
#[derive(Clone, Debug)]
pub struct Conv2d {
    /// [cout, cin, k, k]; a frozen f32 CPU weight of kernel > 1 is loaded stored tap-major
    /// ([`kernels::conv::tap_major`]), which the fast convolution reads in place.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: usize,
    pub padding: usize,
    pub precision: Precision,
    /// Skip the frozen weight's gradient when training through this layer (see [`frozen`]).
    pub frozen_ops: bool,
    /// Run the f32 product as one product per image over the unfolded input
    /// ([`kernels::conv_unfold`]) instead of one product per kernel tap: the classifiers' choice,
    /// where few input channels make each tap's product shallow. The two sum in different
    /// orders.
    pub unfold: bool,
    packed: PackedWeight<PackedA>,
    /// The weight of a 1x1 layer packed as a linear layer's, for [`Pointwise::to_tokens`].
    packed_rhs: PackedWeight<PackedLinear>,
    /// The flipped, transposed kernel that propagates gradients to the input when the weight
    /// is frozen (made on first use, see [`frozen::conv2d_frozen`]).
    grad_kernel: frozen::GradKernel,
}

impl Conv2d {
    pub fn load(w: &Weights, cin: usize, cout: usize, k: usize, stride: usize, padding: usize) -> Result<Self> {
        let mut weight = w.get(&[cout, cin, k, k], "weight")?;
        if k > 1 && !weight.is_variable() && kernels::fast_dtype_ok(&[&weight]) {
            weight = kernels::conv::tap_major(&weight)?;
        }
        let bias = Some(w.get(&[cout], "bias")?);
        Ok(Conv2d { frozen_ops: w.frozen_ops(), ..Self::new(weight, bias, stride, padding).with_precision(w.precision()) })
    }

    /// A convolution from given tensors (weight [cout, cin, k, k]), products in f32.
    pub fn new(weight: Tensor, bias: Option<Tensor>, stride: usize, padding: usize) -> Self {
        Conv2d {
            weight,
            bias,
            stride,
            padding,
            precision: Precision::F32,
            frozen_ops: true,
            unfold: false,
            packed: PackedWeight::default(),
            packed_rhs: PackedWeight::default(),
            grad_kernel: Default::default(),
        }
    }

    /// The same layer with its products at `precision`.
    pub fn with_precision(self, precision: Precision) -> Self {
        Conv2d { precision, ..self }
    }

    /// The same layer with its f32 products over the unfolded input (see [`Conv2d::unfold`]).
    pub fn unfolded(self) -> Self {
        Conv2d { unfold: true, ..self }
    }

    /// The bf16-packed weight when this layer runs its products in bf16.
    fn packed(&self) -> Result<Option<Arc<PackedA>>> {
        Ok(match self.precision {
            Precision::F32 => None,
            Precision::Bf16(kernel) => Some(self.packed.get(&self.weight, |w| kernels::conv::pack_weight(w, kernel))?),
        })
    }

    /// The parts the frozen-weight convolution needs.
    fn frozen_parts(&self) -> Result<frozen::ConvParts> {
        Ok(frozen::ConvParts {
            weight: self.weight.clone(),
            bias: self.bias.clone(),
            stride: self.stride,
            padding: self.padding,
            packed: self.packed()?,
            grad_kernel: self.grad_kernel.clone(),
        })
    }

    /// This 1x1 convolution as a [`Pointwise`] projection.
    pub fn pointwise(&self) -> Pointwise<'_> {
        Pointwise { weight: &self.weight, bias: self.bias.as_ref(), precision: self.precision, as_rhs: &self.packed_rhs, as_lhs: &self.packed }
    }

    /// True when the fused f32 kernels may run: nothing here tracks gradients.
    pub fn fast(&self, x: &Tensor) -> bool {
        kernels::fast_ok(&[x, &self.weight]) && self.bias.as_ref().is_none_or(|b| kernels::fast_ok(&[b]))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_ext(x, self.plain_input(), None, None, 1.0)
    }

    /// The layer's own symmetric padding, no resizing.
    fn plain_input(&self) -> ConvInput {
        let p = self.padding;
        ConvInput { upsample: None, pad: (p, p, p, p) }
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        Ok(match &self.bias {
            Some(bias) => super::channel::add(&y, bias, 1)?,
            None => y,
        })
    }

    /// `(conv(prepare(x)) + bias + extra_bias[b] + residual) / out_scale`, where `prepare`
    /// resizes (nearest) and zero-pads per `input` (whose padding replaces `self.padding`) and
    /// `extra_bias` [b, cout] is a per-sample bias (the ResNet time embedding). Fused into one
    /// kernel on the fast path; otherwise composed of differentiable candle ops in this order:
    /// upsample, pad, conv, + bias, + extra bias, residual + y, / scale.
    pub fn forward_ext(
        &self,
        x: &Tensor,
        input: ConvInput,
        extra_bias: Option<&Tensor>,
        residual: Option<&Tensor>,
        out_scale: f64,
    ) -> Result<Tensor> {
        let extras_fast = extra_bias.is_none_or(|t| kernels::fast_ok(&[t])) && residual.is_none_or(|r| kernels::fast_ok(&[r]));
        let plain = extra_bias.is_none() && residual.is_none() && out_scale == 1.0 && input == self.plain_input();
        if self.fast(x) && extras_fast && self.unfold && plain && self.precision == Precision::F32 {
            let y = scope(Class::Conv, || frozen::conv2d_unfolded(x, &self.weight, self.stride, self.padding))?;
            let (b, cout, ho, wo) = y.dims4()?;
            let (_, cin, kh, kw) = self.weight.dims4()?;
            flops::add(b * ho * wo * cout * cin * kh * kw);
            return scope(Class::Elementwise, || self.add_bias(y));
        }
        if self.fast(x) && extras_fast {
            let (cout, cin, kh, kw) = self.weight.dims4()?;
            let packed = self.packed()?;
            let y = scope(Class::Conv, || {
                kernels::conv2d(x, &self.weight, self.bias.as_ref(), extra_bias, self.stride, input, residual, out_scale, packed.as_deref())
            })?;
            let (b, _, ho, wo) = y.dims4()?;
            flops::add(b * ho * wo * cout * cin * kh * kw);
            return Ok(y);
        }
        let mut x = x.clone();
        if let Some((th, tw)) = input.upsample {
            x = upsample_nearest(&x, th, tw)?;
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
        // A frozen weight's gradient is neither computed nor kept (see `nn::frozen`).
        if self.frozen_ops && frozen::use_frozen_conv(x, &self.weight, self.bias.as_ref(), self.stride, self.padding) {
            let parts = self.frozen_parts()?;
            let y = scope(Class::Conv, || frozen::conv2d_frozen(x, parts))?;
            let (b, _, ho, wo) = y.dims4()?;
            flops::add(b * ho * wo * cout * cin * kh * kw);
            return Ok(y);
        }
        if self.frozen_ops && frozen::use_trainable_conv(x, &self.weight, self.stride, self.padding) {
            let y = scope(Class::Conv, || frozen::conv2d_trainable(x, &self.weight, self.bias.as_ref(), self.stride, self.padding, self.unfold))?;
            let (b, _, ho, wo) = y.dims4()?;
            flops::add(b * ho * wo * cout * cin * kh * kw);
            return Ok(y);
        }
        let y = scope(Class::Conv, || {
            items::per_item_on_gpu(&[x], |t| {
                let x = &t[0];
                Ok(if kh == 1 && kw == 1 && self.stride == 1 && self.padding == 0 {
                    // A 1x1 convolution is a matmul over channels; candle's im2col path would copy.
                    let (b, c, h, wd) = x.dims4()?;
                    flops::add(b * h * wd * cin * cout);
                    let w2 = self.weight.reshape((cout, cin))?;
                    w2.broadcast_matmul(&x.reshape((b, c, h * wd))?)?.reshape((b, cout, h, wd))?
                } else {
                    let y = x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
                    let (b, _, ho, wo) = y.dims4()?;
                    flops::add(b * ho * wo * cout * cin * kh * kw);
                    y
                })
            })
        })?;
        scope(Class::Elementwise, || self.add_bias(y))
    }
}

/// `x.upsample_nearest2d(th, tw)` for NCHW `x`. While `x` tracks gradients (f32 on the CPU) and
/// the factor is the same power of two both ways, one op on the pool with candle's bits forward and
/// backward ([`kernels::resize`]): candle's forward runs on one thread, and its backward is a
/// grouped convolution with a kernel of ones.
pub fn upsample_nearest(x: &Tensor, th: usize, tw: usize) -> Result<Tensor> {
    scope(Class::Layout, || {
        let (_, _, h, w) = x.dims4()?;
        // A power of two, so that candle's source index, `(y as f64 * (h / th)) as usize`, is
        // exactly `y / s` (for other factors `h / th` is rounded).
        let s = if h > 0 && w > 0 && th.is_multiple_of(h) && tw.is_multiple_of(w) && th / h == tw / w { th / h } else { 0 };
        if !s.is_power_of_two() || !x.track_op() || !kernels::fast_dtype_ok(&[x]) {
            return Ok(x.upsample_nearest2d(th, tw)?);
        }
        Ok(x.contiguous()?.apply_op1(UpsampleNearest { s })?)
    })
}

struct UpsampleNearest {
    /// The whole scale factor, both ways.
    s: usize,
}

impl candle_core::CustomOp1 for UpsampleNearest {
    fn name(&self) -> &'static str {
        "upsample-nearest"
    }

    fn cpu_fwd(&self, st: &candle_core::CpuStorage, l: &candle_core::Layout) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = kernels::io::op_slice(st, l, "upsample")?;
        let (b, c, h, w) = l.shape().dims4()?;
        let y = kernels::resize::upsample_nearest(x, b * c, h, w, self.s);
        Ok((candle_core::CpuStorage::F32(y), (b, c, h * self.s, w * self.s).into()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (b, c, h, w) = x.dims4()?;
        Ok(Some(kernels::io::op_grad(x, &[grad], "upsample", |v| kernels::resize::upsample_nearest_backward(v[0], b * c, h, w, self.s))?))
    }
}
