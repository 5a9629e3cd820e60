//! `nn.Linear` with fused bias / residual epilogues, an optional unmerged LoRA adapter, bf16
//! products, and the pointwise projections between NCHW maps and token rows.
use std::sync::Arc;

use candle_core::{Tensor, D};

use super::frozen;
use super::mode::Precision;
use super::packed::PackedWeight;
use super::weights::Weights;
use crate::error::Result;
use crate::instrument::flops;
use crate::instrument::profile::{scope, Class};
use crate::kernels::{self, bf16::PackedA, linear::PackedLinear, linear::Panels};

/// `nn.Linear`: y = x W^T + b, for inputs of any rank (the last dim is the feature dim),
/// plus an optional unmerged low-rank adapter.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub adapter: Option<Adapter>,
    pub precision: Precision,
    /// Skip the frozen weight's gradient when training through this layer (see [`frozen`]).
    pub frozen_ops: bool,
    packed: PackedWeight<PackedLinear>,
    /// The weight packed as a 1x1 convolution's, for [`Pointwise::from_tokens`].
    packed_lhs: PackedWeight<PackedA>,
    /// Whether f32 products of few rows read the weight from `panels` (see
    /// [`Linear::with_panels`]).
    use_panels: bool,
    /// The f32 weight packed for inputs of few rows ([`kernels::linear::panels_pay`]), made on
    /// the first such call.
    panels: PackedWeight<Panels>,
}

/// An unmerged LoRA update: the layer computes `x W^T + b + scale (x down^T) up^T`. Training
/// needs it unmerged so that `down` / `up` can be variables; inference merges instead
/// (`crate::sd::lora::apply_lora`).
#[derive(Clone, Debug)]
pub struct Adapter {
    /// [r, in]
    pub down: Tensor,
    /// [out, r]
    pub up: Tensor,
    pub scale: f64,
}

impl Linear {
    /// Loads `weight` [out, in] (and `bias` \[out\]) at the precision of `w`.
    pub fn load(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = w.get(&[out_dim, in_dim], "weight")?;
        let bias = if bias { Some(w.get(&[out_dim], "bias")?) } else { None };
        Ok(Linear { frozen_ops: w.frozen_ops(), ..Linear::new(weight, bias, w.precision()) })
    }

    /// The same layer with its weight stored input-major ([`kernels::linear::in_major`]) when
    /// it is a frozen f32 CPU tensor: for layers whose inputs have many rows per batch item, where
    /// the fast product then reads the weight in place. Other paths see the same values, but
    /// [`Linear::pointwise`] projections and candle's own ops copy it back to the usual layout
    /// on every call: not for layers used that way.
    pub fn in_major(self) -> Result<Self> {
        if self.weight.is_variable() || !kernels::fast_dtype_ok(&[&self.weight]) {
            return Ok(self);
        }
        Ok(Linear { weight: kernels::linear::in_major(&self.weight)?, ..self })
    }

    /// The same layer, whose f32 CPU products of few rows (at most
    /// [`kernels::linear::PANEL_ROWS`] in all) read the weight from panels packed once, on the
    /// first such call, instead of `gemm` packing the whole weight on every call: the same bits,
    /// SD-1.5's text encoder 10-15 % faster, for a second copy of the weight kept beside it. For
    /// layers whose inputs always have few rows (the text encoder's: 77 per prompt); a UNet's
    /// rows grow with the latent, and at 64x64 the copy would buy nothing.
    pub fn with_panels(self) -> Self {
        Linear { use_panels: true, ..self }
    }

    /// Adds `delta` [out, in] to the weight (a merged LoRA update), summed in f32 so that
    /// half-precision weights lose nothing beyond their own rounding. An input-major weight
    /// stays input-major.
    pub fn add_to_weight(&mut self, delta: &Tensor) -> Result<()> {
        let w = &self.weight;
        let merged = (w.to_dtype(candle_core::DType::F32)? + delta)?.to_dtype(w.dtype())?;
        self.weight = if kernels::linear::is_in_major(w) { kernels::linear::in_major(&merged)? } else { merged };
        Ok(())
    }

    /// A layer from given tensors (weight [out, in]).
    pub fn new(weight: Tensor, bias: Option<Tensor>, precision: Precision) -> Self {
        Linear { weight, bias, adapter: None, precision, frozen_ops: true, packed: PackedWeight::default(), packed_lhs: PackedWeight::default(), use_panels: false, panels: PackedWeight::default() }
    }

    /// The bf16-packed weight when this layer runs its products in bf16.
    fn packed(&self) -> Result<Option<Arc<PackedLinear>>> {
        Ok(match self.precision {
            Precision::F32 => None,
            Precision::Bf16(kernel) => Some(self.packed.get(&self.weight, |w| kernels::linear::pack_weight(w, kernel))?),
        })
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
            let (in_dim, out_dim) = (x.dim(candle_core::D::Minus1)?, self.weight.dim(0)?);
            flops::add(x.elem_count() / in_dim.max(1) * in_dim * out_dim);
            let packed = if kernels::linear::rowwise(x.dims()) { None } else { self.packed()? };
            if self.use_panels && packed.is_none() && kernels::linear::panels_pay(x.dims(), in_dim, out_dim) {
                let panels = self.panels.get(&self.weight, kernels::linear::pack_panels)?;
                return scope(Class::Linear, || kernels::linear::linear_panels(x, &panels, self.bias.as_ref(), residual));
            }
            return scope(Class::Linear, || kernels::linear(x, &self.weight, self.bias.as_ref(), residual, packed.as_deref()));
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
        flops::add(x.elem_count() / in_dim * in_dim * out_dim);
        // A 2-D matmul against the transposed weight avoids broadcasting the weight per batch.
        // Small products take the usual layout whichever way the weight is stored (see
        // `reads_in_major`): their bytes would depend on it.
        let (rows_per_item, items) = kernels::linear::row_blocks(x.dims());
        let wt = if kernels::linear::reads_in_major(rows_per_item, in_dim, out_dim) { self.weight.t()? } else { self.weight.contiguous()?.t()? };
        // A trained weight, or a frozen one under a tracked input: the same products, recorded
        // as one op (see `PerItemProduct`; a frozen weight gets no gradient there either).
        let tracked = wt.track_op() || (self.frozen_ops && x.track_op());
        if tracked && kernels::fast_dtype_ok(&[x, &wt]) && items > 1 && self.bias.as_ref().is_none_or(|b| kernels::fast_dtype_ok(&[b]) && b.elem_count() == out_dim) {
            return per_item_product_op(x, &wt, self.bias.as_ref());
        }
        let y = {
            // A frozen weight's gradient is neither computed nor kept (see `nn::frozen`).
            per_item_rows(x, out_dim, |a| {
                if self.frozen_ops && frozen::use_frozen_rhs(a, &wt) {
                    frozen::matmul_frozen_rhs(a, &wt)
                } else {
                    Ok(a.matmul(&wt)?)
                }
            })?
        };
        Ok(match &self.bias {
            Some(b) => super::channel::add(&y, b, y.rank() - 1)?,
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
    let (per, items) = kernels::linear::row_blocks(dims);
    let rows = items * per;
    let x2 = x.reshape((rows, in_dim))?;
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

/// `x [..., in] · wt [in, out]` (`+ bias` [out]) through [`per_item_rows`] with candle's
/// matmul, the values and gradients to the bit (the weight's only when it tracks one, as
/// [`frozen::matmul_frozen_rhs`] per item would; the bias's as [`super::channel::add`]'s), but
/// recorded as one op. Composed, every item's narrow and product is a graph node, and candle's
/// backward pads each item's input gradient with zeros to the whole batch and adds it into an
/// accumulator: work that grows with the square of the batch and dominated a pretraining step's
/// backward pass. The bias inside the op saves a pass over the output forward and candle's
/// accumulation of the product's gradient backward.
fn per_item_product_op(x: &Tensor, wt: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let (in_dim, out_dim) = wt.dims2()?;
    let (per, items) = kernels::linear::row_blocks(dims);
    let x2 = x.reshape((items * per, in_dim))?.contiguous()?;
    // The op reads the weight in place as stored: row-major, or a transposed view of it.
    let wt = if wt.is_contiguous() || wt.t()?.is_contiguous() { wt.clone() } else { wt.contiguous()? };
    let mut out_shape = dims.to_vec();
    *out_shape.last_mut().unwrap() = out_dim;
    let op = PerItemProduct { items };
    let y = scope(Class::Linear, || -> Result<Tensor> {
        Ok(match bias {
            Some(b) => x2.apply_op3(&wt, &b.contiguous()?, op)?,
            None => x2.apply_op2(&wt, op)?,
        })
    })?;
    Ok(y.reshape(out_shape)?)
}

/// The op of [`per_item_product_op`]: the input rows and the weight, with or without a bias.
/// The backward replays candle's: each item's `grad_i wt^T` for the input, and for the weight
/// each item's `x_i^T grad_i`, added in the order candle's backward visits the items'
/// products (the last item first); for the bias the per-column sums of the gradient.
#[derive(Clone, Copy)]
struct PerItemProduct {
    items: usize,
}

impl PerItemProduct {
    fn forward(&self, s1: &candle_core::CpuStorage, l1: &candle_core::Layout, s2: &candle_core::CpuStorage, l2: &candle_core::Layout, bias: Option<&[f32]>) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        const OP: &str = "per-item-product";
        let x = kernels::io::op_slice(s1, l1, OP)?;
        let (total, k) = l1.shape().dims2()?;
        let (_, n) = l2.shape().dims2()?;
        let candle_core::CpuStorage::F32(w) = s2 else { candle_core::bail!("{OP}: expected an f32 weight") };
        let strides = match l2.stride() {
            &[rs, 1] if rs == n => (n, 1),
            &[1, cs] if cs == k => (1, k),
            other => candle_core::bail!("{OP}: weight strides {other:?} are neither row-major nor a transposed view"),
        };
        let mut y = kernels::linear::item_products_slices(x, &w[l2.start_offset()..], strides, total, k, n, self.items);
        if let Some(b) = bias {
            kernels::channel::channel_add_in_place(&mut y, b, 1);
        }
        Ok((candle_core::CpuStorage::F32(y), candle_core::Shape::from((total, n))))
    }

    fn input_and_weight_grads(&self, x: &Tensor, wt: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (track_x, track_w) = (x.track_op(), wt.track_op());
        let (g, x, wt) = (grad.contiguous()?, x.detach(), wt.detach());
        let err = |e: crate::error::Error| candle_core::Error::Msg(format!("per-item-product backward: {e}"));
        let dx = match track_x {
            true => Some(kernels::linear::item_products(&g, &wt.t()?, self.items).map_err(err)?),
            false => None,
        };
        // A frozen weight's gradient is neither computed nor kept (see `nn::frozen`).
        let dw = match track_w {
            true => Some(kernels::linear::item_products_tn_sum(&x, &g, self.items).map_err(err)?),
            false => None,
        };
        Ok((dx, dw))
    }
}

impl candle_core::CustomOp2 for PerItemProduct {
    fn name(&self) -> &'static str {
        "per-item-product"
    }

    fn cpu_fwd(&self, s1: &candle_core::CpuStorage, l1: &candle_core::Layout, s2: &candle_core::CpuStorage, l2: &candle_core::Layout) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        self.forward(s1, l1, s2, l2, None)
    }

    fn bwd(&self, x: &Tensor, wt: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        self.input_and_weight_grads(x, wt, grad)
    }
}

impl candle_core::CustomOp3 for PerItemProduct {
    fn name(&self) -> &'static str {
        "per-item-product-bias"
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
        self.forward(s1, l1, s2, l2, Some(kernels::io::op_slice(s3, l3, "per-item-product bias")?))
    }

    fn bwd(&self, x: &Tensor, wt: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = self.input_and_weight_grads(x, wt, grad)?;
        let db = match b.track_op() {
            true => {
                let out = b.elem_count();
                Some(kernels::io::op_grad(b, &[grad], "per-item-product bias", |v| kernels::channel::channel_sums(v[0], out, 1))?)
            }
            false => None,
        };
        Ok((dx, dw, db))
    }
}

impl Adapter {
    /// `scale (x down^T) up^T`, one product per batch item like [`Linear`]'s.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let in_dim = x.dim(D::Minus1)?;
        let (out_dim, r) = self.up.dims2()?;
        flops::add(x.elem_count() / in_dim * r * (in_dim + out_dim));
        let (dt, ut) = (self.down.t()?, self.up.t()?);
        // Trained: the two products as two ops, with the bits of the per-item composition.
        let y = if dt.track_op() && ut.track_op() && kernels::fast_dtype_ok(&[x, &dt, &ut]) && kernels::linear::row_blocks(x.dims()).1 > 1 {
            per_item_product_op(&per_item_product_op(x, &dt, None)?, &ut, None)?
        } else {
            per_item_rows(x, out_dim, |a| Ok(a.matmul(&dt)?.matmul(&ut)?))?
        };
        Ok((y * self.scale)?)
    }
}

/// A pointwise projection (a linear layer, or a 1x1 convolution: the same product) between an
/// NCHW map and token rows, with the transpose folded into the product's strides. Inference
/// only: callers check [`super::fast_ok`] first. At bf16 precision the weight is packed for
/// the direction it is used in (the right operand of [`to_tokens`](Self::to_tokens), as a
/// linear layer's; the left one of [`from_tokens`](Self::from_tokens), as a 1x1
/// convolution's), on first use, and kept by the layer.
pub struct Pointwise<'a> {
    /// [cout, c] or [cout, c, 1, 1].
    pub weight: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub precision: Precision,
    pub(crate) as_rhs: &'a PackedWeight<PackedLinear>,
    pub(crate) as_lhs: &'a PackedWeight<PackedA>,
}

impl Pointwise<'_> {
    /// `x` [b, c, h, w] -> tokens [b, h*w, cout].
    pub fn to_tokens(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let cout = self.weight.dim(0)?;
        flops::add(b * h * w * c * cout);
        let packed = match self.precision {
            Precision::F32 => None,
            Precision::Bf16(kernel) => {
                Some(self.as_rhs.get(self.weight, |w| kernels::linear::pack_weight(&w.reshape((cout, c))?, kernel))?)
            }
        };
        scope(Class::Linear, || kernels::pointwise_to_tokens(x, self.weight, self.bias, packed.as_deref()))
    }

    /// Tokens `t` [b, h*w, c] -> [b, cout, h, w], plus `residual` (NCHW).
    pub fn from_tokens(&self, t: &Tensor, h: usize, w: usize, residual: Option<&Tensor>) -> Result<Tensor> {
        let (b, _, c) = t.dims3()?;
        let cout = self.weight.dim(0)?;
        flops::add(b * h * w * c * cout);
        let packed = match self.precision {
            Precision::F32 => None,
            Precision::Bf16(kernel) => {
                Some(self.as_lhs.get(self.weight, |w| kernels::conv::pack_weight(&w.reshape((cout, c, 1, 1))?, kernel))?)
            }
        };
        scope(Class::Linear, || kernels::pointwise_from_tokens(t, self.weight, self.bias, residual, h, w, packed.as_deref()))
    }
}

impl Linear {
    /// This layer as a [`Pointwise`] projection (the adapter is not included).
    pub fn pointwise(&self) -> Pointwise<'_> {
        Pointwise { weight: &self.weight, bias: self.bias.as_ref(), precision: self.precision, as_rhs: &self.packed, as_lhs: &self.packed_lhs }
    }
}
