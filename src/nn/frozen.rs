//! Products with a frozen operand whose backward skips that operand's gradient.
//!
//! candle's backward (0.11, `backprop.rs`) computes the gradient of *both* operands of every
//! matmul and convolution once the result is part of a graph that reaches a `Var`, frozen
//! weights included, and keeps every such leaf gradient in the returned `GradStore` until it is
//! dropped. `detach()` does not help: a weight is already a leaf without an op. For textual
//! inversion on SD-1.5 that is one full weight-sized gradient per layer (gigabytes) and a third
//! of the backward FLOPs, spent on numbers nobody reads.
//!
//! The matmul here runs the same forward kernel as candle's own op on the same layouts, so
//! results are bit-identical, and its backward returns `None` for the frozen operand: candle
//! then neither computes nor stores it. The convolution runs our fused f32 kernel forward and
//! computes only the input gradient backward — with the same kernel, as a stride-1 convolution
//! of the padded output gradient with the flipped, transposed weight, or for strided
//! convolutions as a product and fold ([`kernels::conv_unfold`]) — instead of candle's weight gradient plus its slow generic transposed convolution. A convolution whose
//! weight IS trained ([`conv2d_trainable`], e.g. a classifier's) reuses that input gradient and
//! computes the weight's with [`kernels::conv_unfold`]. Layers use these ops unless loaded
//! with `Weights::with_frozen_ops(false)` (benchmarks measure the difference).
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, Layout, MetalStorage, Shape, Tensor};

use std::sync::{Arc, OnceLock};

use crate::error::Result;
use crate::kernels::{self, bf16::PackedA, ConvInput};

/// Whether `lhs.matmul(rhs)` should go through [`matmul_frozen_rhs`]: only the left operand
/// is part of a graph.
pub fn use_frozen_rhs(lhs: &Tensor, rhs: &Tensor) -> bool {
    lhs.track_op() && !rhs.track_op()
}

/// `lhs.matmul(rhs)` (same shapes rules, same kernel, same bits) whose backward only produces
/// the gradient of `lhs`.
pub fn matmul_frozen_rhs(lhs: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    Ok(lhs.apply_op2(rhs, FrozenRhsMatmul)?)
}

struct FrozenRhsMatmul;

impl FrozenRhsMatmul {
    /// (batch, m, n, k) and the output shape, with the checks `Tensor::matmul` makes.
    fn dims(l1: &Layout, l2: &Layout) -> candle_core::Result<((usize, usize, usize, usize), Shape)> {
        let (a, b) = (l1.dims(), l2.dims());
        let r = a.len();
        if r < 2 || b.len() != r {
            candle_core::bail!("frozen matmul: ranks {a:?} and {b:?} do not match");
        }
        let (m, k, k2, n) = (a[r - 2], a[r - 1], b[r - 2], b[r - 1]);
        let batch: usize = a[..r - 2].iter().product();
        if k != k2 || batch != b[..r - 2].iter().product::<usize>() {
            candle_core::bail!("frozen matmul: shapes {a:?} and {b:?} do not multiply");
        }
        let mut out = a[..r - 2].to_vec();
        out.extend([m, n]);
        Ok(((batch, m, n, k), Shape::from(out)))
    }

    fn fwd<S: BackendStorage>(s1: &S, l1: &Layout, s2: &S, l2: &Layout) -> candle_core::Result<(S, Shape)> {
        let (bmnk, shape) = Self::dims(l1, l2)?;
        Ok((s1.matmul(s2, bmnk, l1, l2)?, shape))
    }
}

impl CustomOp2 for FrozenRhsMatmul {
    fn name(&self) -> &'static str {
        "matmul-frozen-rhs"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Self::fwd(s1, l1, s2, l2)
    }

    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        Self::fwd(s1, l1, s2, l2)
    }

    fn metal_fwd(&self, s1: &MetalStorage, l1: &Layout, s2: &MetalStorage, l2: &Layout) -> candle_core::Result<(MetalStorage, Shape)> {
        Self::fwd(s1, l1, s2, l2)
    }

    fn bwd(&self, _lhs: &Tensor, rhs: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // d(lhs rhs)/d lhs = grad rhs^T, as candle's own Matmul backward.
        Ok((Some(grad.matmul(&rhs.t()?)?), None))
    }
}

/// The flipped, transposed kernel of a frozen convolution, made on first use and kept by the
/// layer (shared by its clones).
pub type GradKernel = Arc<OnceLock<Tensor>>;

/// What the frozen-weight convolution needs of a `Conv2d` layer.
pub struct ConvParts {
    /// [cout, cin, k, k]
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: usize,
    pub padding: usize,
    /// The weight packed for bf16 products (forward only), when the layer runs in bf16.
    pub packed: Option<Arc<PackedA>>,
    pub grad_kernel: GradKernel,
}

/// Whether a convolution of `x` with this weight should go through [`conv2d_frozen`]: only the
/// input is part of a graph, on the CPU in f32, with padding the gradient convolution can
/// express.
pub fn use_frozen_conv(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize) -> bool {
    let k = weight.dim(3).unwrap_or(0);
    x.track_op()
        && !weight.track_op()
        && bias.is_none_or(|b| !b.track_op())
        && kernels::fast_dtype_ok(&[x, weight])
        && weight.dim(2).ok() == Some(k)
        && padding < k
        && stride >= 1
}

/// `conv(x) + bias` whose backward produces only the gradient of `x`.
pub fn conv2d_frozen(x: &Tensor, conv: ConvParts) -> Result<Tensor> {
    let op = FrozenConv { conv };
    Ok(x.contiguous()?.apply_op1(op)?)
}

struct FrozenConv {
    conv: ConvParts,
}

impl FrozenConv {
    /// [cin, cout, k, k]: the weight with in/out channels swapped and both spatial axes reversed.
    fn grad_kernel(&self) -> candle_core::Result<Tensor> {
        if let Some(k) = self.conv.grad_kernel.get() {
            return Ok(k.clone());
        }
        let flipped = flip_kernel(&self.conv.weight)?;
        Ok(self.conv.grad_kernel.get_or_init(|| flipped).clone())
    }
}

fn to_msg(e: crate::error::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl CustomOp1 for FrozenConv {
    fn name(&self) -> &'static str {
        "conv2d-frozen-weight"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        const OP: &str = "frozen conv";
        let (x, x_dims) = (kernels::io::op_slice(s, l, OP)?, kernels::io::op_dims::<4>(l, OP)?);
        let c = &self.conv;
        let p = c.padding;
        let input = ConvInput { upsample: None, pad: (p, p, p, p) };
        kernels::io::op_result(kernels::conv::conv2d_on(x, x_dims, &c.weight, c.bias.as_ref(), c.stride, input, kernels::conv::Epilogue::NONE, c.packed.as_deref()), OP)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let c = &self.conv;
        Ok(Some(input_grad(x.dims4()?, grad, &c.weight, || self.grad_kernel(), c.stride, c.padding)?))
    }
}

/// The flipped, transposed kernel [cin, cout, k, k] of a weight [cout, cin, k, k] (f32, CPU).
fn flip_kernel(w: &Tensor) -> candle_core::Result<Tensor> {
    let (cout, cin, k, _) = w.dims4()?;
    let v = kernels::io::with_slices(&[w], |v| kernels::conv::flipped_transposed(v[0], cout, cin, k)).map_err(to_msg)?;
    Tensor::from_vec(v, (cin, cout, k, k), w.device())
}

/// The gradient of a convolution's input of shape `x_dims` from the output gradient `grad`:
/// a transposed convolution. Stride 1: the convolution of the output gradient, padded by k-1-p
/// (plus the rows / columns the forward's floor division dropped), with the flipped kernel
/// (`flipped`, see [`flip_kernel`]). Larger strides: [`kernels::conv_unfold::conv2d_input_grad`]
/// with the weight itself. Always f32.
fn input_grad(
    x_dims: (usize, usize, usize, usize),
    grad: &Tensor,
    weight: &Tensor,
    flipped: impl FnOnce() -> candle_core::Result<Tensor>,
    s: usize,
    p: usize,
) -> candle_core::Result<Tensor> {
    let (b, cin, h, w) = x_dims;
    let (cout, k) = (weight.dim(0)?, weight.dim(3)?);
    if s > 1 {
        let shape = kernels::conv_unfold::ConvShape { b, cin, h, w, cout, k, stride: s, pad: p };
        let (wt, g) = (weight.to_dtype(candle_core::DType::F32)?, grad.to_dtype(candle_core::DType::F32)?);
        let dx = kernels::io::with_slices(&[&wt, &g], |v| kernels::conv_unfold::conv2d_input_grad(v[0], v[1], shape)).map_err(to_msg)?;
        return Tensor::from_vec(dx, (b, cin, h, w), grad.device());
    }
    let flipped = flipped()?;
    let g = grad.contiguous()?;
    let (_, _, gh, gw) = g.dims4()?;
    let q = k - 1 - p;
    // Output size of the padded convolution: gh + 2q + extra - k + 1 must equal h.
    let (eh, ew) = ((h + k - 1) - (gh + 2 * q), (w + k - 1) - (gw + 2 * q));
    kernels::conv2d(&g, &flipped, None, None, 1, ConvInput { upsample: None, pad: (q, q, q + eh, q + ew) }, None, 1.0, None).map_err(to_msg)
}

/// Whether [`conv2d_trainable`] applies: a trainable f32 CPU weight (square kernel, padding the
/// gradient convolution can express).
pub fn use_trainable_conv(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> bool {
    let k = weight.dim(3).unwrap_or(0);
    weight.track_op() && kernels::fast_dtype_ok(&[x, weight]) && weight.dim(2).ok() == Some(k) && padding < k && stride >= 1
}

/// `conv(x, weight) + bias` whose backward computes every gradient with the fused kernels:
/// the input's as in [`conv2d_frozen`], the weight's as one product per batch element of the
/// output gradient with the unfolded input ([`kernels::conv_unfold`]), the bias's as
/// [`super::channel::add`]'s. candle's own backward uses a slow generic transposed convolution
/// for the input. With `unfold`, the forward is [`kernels::conv_unfold::conv2d_unfolded`].
/// An f32 bias is added inside the op, after the product (the bits of a separate
/// [`super::channel::add`], one graph node fewer).
pub fn conv2d_trainable(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize, unfold: bool) -> Result<Tensor> {
    let conv = TrainableConv { stride, padding, unfold };
    let (x, w) = (x.contiguous()?, weight.contiguous()?);
    Ok(match bias {
        Some(b) if kernels::fast_dtype_ok(&[b]) && b.elem_count() == w.dim(0)? => x.apply_op3(&w, &b.contiguous()?, WithBias(conv))?,
        Some(b) => super::channel::add(&x.apply_op2(&w, conv)?, b, 1)?,
        None => x.apply_op2(&w, conv)?,
    })
}

/// `conv(x, weight)` (no bias, symmetric `padding`) over the unfolded input
/// ([`kernels::conv_unfold::conv2d_unfolded`]), f32 CPU tensors, inference only.
pub fn conv2d_unfolded(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let shape = unfold_shape(x.dims(), weight.dims(), stride, padding)?;
    let (ho, wo) = shape.out_hw();
    let y = kernels::io::with_slices(&[x, weight], |v| kernels::conv_unfold::conv2d_unfolded(v[0], v[1], shape))?;
    kernels::io::tensor(y, &[shape.b, shape.cout, ho, wo])
}

fn unfold_shape(x: &[usize], w: &[usize], stride: usize, pad: usize) -> Result<kernels::conv_unfold::ConvShape> {
    match (x, w) {
        (&[b, cin, h, wd], &[cout, wcin, k, kw]) if wcin == cin && kw == k && stride > 0 && h + 2 * pad >= k && wd + 2 * pad >= k => {
            Ok(kernels::conv_unfold::ConvShape { b, cin, h, w: wd, cout, k, stride, pad })
        }
        _ => Err(crate::error::Error::invalid(format!("conv2d: input {x:?}, weight {w:?}, stride {stride}, padding {pad}"))),
    }
}

struct TrainableConv {
    stride: usize,
    padding: usize,
    unfold: bool,
}

impl CustomOp2 for TrainableConv {
    fn name(&self) -> &'static str {
        "conv2d-trainable"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        const OP: &str = "trainable conv";
        let p = self.padding;
        if self.unfold {
            // Straight from candle's storage to ours: no copies in or out.
            let shape = unfold_shape(l1.dims(), l2.dims(), self.stride, p).map_err(to_msg)?;
            let (ho, wo) = shape.out_hw();
            let y = kernels::conv_unfold::conv2d_unfolded(kernels::io::op_slice(s1, l1, OP)?, kernels::io::op_slice(s2, l2, OP)?, shape);
            return Ok((CpuStorage::F32(y), Shape::from((shape.b, shape.cout, ho, wo))));
        }
        let data = kernels::conv::ConvData {
            x: kernels::io::op_slice(s1, l1, OP)?,
            x_dims: kernels::io::op_dims::<4>(l1, OP)?,
            weight: kernels::io::op_slice(s2, l2, OP)?,
            w_dims: kernels::io::op_dims::<4>(l2, OP)?,
            tap_major: false,
            bias: None,
            extra_bias: None,
            residual: None,
        };
        let input = ConvInput { upsample: None, pad: (p, p, p, p) };
        kernels::io::op_result(kernels::conv::conv2d_data(&data, self.stride, input, 1.0, None), OP)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (b, cin, h, wd) = x.dims4()?;
        let (cout, _, k, _) = w.dims4()?;
        let (s, p) = (self.stride, self.padding);
        // A network's input (the images) needs no gradient.
        let dx = if !x.track_op() {
            None
        } else if self.unfold && s == 1 && 2 * p + 1 == k {
            // The stride-1 input gradient is the same-size convolution of the output gradient
            // with the flipped kernel, here through the same unfolded product as the forward.
            Some(conv2d_unfolded(&grad.contiguous()?, &flip_kernel(w)?, 1, k - 1 - p).map_err(to_msg)?)
        } else {
            Some(input_grad((b, cin, h, wd), grad, w, || flip_kernel(w), s, p)?)
        };
        let shape = kernels::conv_unfold::ConvShape { b, cin, h, w: wd, cout, k, stride: s, pad: p };
        let (x, g) = (x.to_dtype(candle_core::DType::F32)?, grad.to_dtype(candle_core::DType::F32)?);
        let dw = kernels::io::with_slices(&[&x, &g], |v| kernels::conv_unfold::conv2d_weight_grad(v[0], v[1], shape)).map_err(to_msg)?;
        let dw = Tensor::from_vec(dw, (cout, cin, k, k), w.device())?.to_dtype(w.dtype())?;
        Ok((dx, Some(dw)))
    }
}

/// [`TrainableConv`] followed by a per-channel bias.
struct WithBias(TrainableConv);

impl CustomOp3 for WithBias {
    fn name(&self) -> &'static str {
        "conv2d-trainable-bias"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (y, shape) = self.0.cpu_fwd(s1, l1, s2, l2)?;
        let CpuStorage::F32(mut y) = y else { candle_core::bail!("trainable conv: expected an f32 result") };
        let bias = kernels::io::op_slice(s3, l3, "trainable conv bias")?;
        let (_, _, ho, wo) = shape.dims4()?;
        kernels::channel::channel_add_in_place(&mut y, bias, ho * wo);
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = self.0.bwd(x, w, res, grad)?;
        let db = if b.track_op() {
            let (_, cout, ho, wo) = grad.dims4()?;
            Some(kernels::io::op_grad(b, &[grad], "trainable conv bias", |v| kernels::channel::channel_sums(v[0], cout, ho * wo))?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}
