//! A trainable per-channel parameter applied by broadcast: `x + p` (a bias), `x * p` (a
//! norm's scale) and both at once (a norm's affine), with `p` holding one value per index of one
//! dim of `x`.
//!
//! candle composes these as a broadcast and a binary op, and its backward sums the gradient
//! over the broadcast dims with a reduction that is slow on the CPU whenever those dims are
//! not the trailing ones (see [`crate::kernels::channel`]). On f32 CPU tensors, while `p`
//! tracks gradients, these are custom ops with the same values and gradients to the bit;
//! otherwise they are candle's composition.
use candle_core::{CpuStorage, Layout, Shape, Tensor};

use crate::error::{Error, Result};
use crate::instrument::profile::{scope, Class};
use crate::kernels;
use crate::kernels::channel::ChannelOp;

/// `x + p` with `p` broadcast along dim `axis` of `x` (`p` holds `x.dim(axis)` values).
pub fn add(x: &Tensor, p: &Tensor, axis: usize) -> Result<Tensor> {
    apply(x, p, axis, ChannelOp::Add)
}

/// `x * p` with `p` broadcast along dim `axis` of `x`.
pub fn mul(x: &Tensor, p: &Tensor, axis: usize) -> Result<Tensor> {
    apply(x, p, axis, ChannelOp::Mul)
}

/// `x * scale + shift` (both broadcast along dim `axis`), with the values and gradients of
/// [`mul`] then [`add`], as one op while both track gradients: one pass forward, and no
/// intermediate whose gradient candle would accumulate backward.
pub fn affine(x: &Tensor, scale: &Tensor, shift: &Tensor, axis: usize) -> Result<Tensor> {
    let dims = x.dims();
    let fused = scale.track_op() && shift.track_op() && kernels::fast_dtype_ok(&[x, scale, shift]);
    if !fused || axis >= dims.len() || scale.elem_count() != dims[axis] || shift.elem_count() != dims[axis] {
        return add(&mul(x, scale, axis)?, shift, axis);
    }
    let inner = dims[axis + 1..].iter().product();
    scope(Class::Elementwise, || Ok(x.contiguous()?.apply_op3(&scale.flatten_all()?.contiguous()?, &shift.flatten_all()?.contiguous()?, Affine { inner })?))
}

fn apply(x: &Tensor, p: &Tensor, axis: usize, op: ChannelOp) -> Result<Tensor> {
    let dims = x.dims();
    if axis >= dims.len() || p.elem_count() != dims[axis] {
        return Err(Error::invalid(format!(
            "per-channel {op:?}: {:?} does not hold one value per index of dim {axis} of {dims:?}",
            p.dims()
        )));
    }
    scope(Class::Elementwise, || {
        if p.track_op() && kernels::fast_dtype_ok(&[x, p]) {
            let inner = dims[axis + 1..].iter().product();
            return Ok(x
                .contiguous()?
                .apply_op2(&p.flatten_all()?.contiguous()?, Channel { op, inner })?);
        }
        let mut shape = vec![1; dims.len()];
        shape[axis] = dims[axis];
        let p = p.reshape(shape)?;
        Ok(match op {
            ChannelOp::Add => x.broadcast_add(&p)?,
            ChannelOp::Mul => x.broadcast_mul(&p)?,
        })
    })
}

struct Channel {
    op: ChannelOp,
    /// Values per channel index and outer index (the product of the dims after the channel dim).
    inner: usize,
}

impl candle_core::CustomOp2 for Channel {
    fn name(&self) -> &'static str {
        "per-channel"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = kernels::io::op_slice(s1, l1, "per-channel")?;
        let p = kernels::io::op_slice(s2, l2, "per-channel")?;
        Ok((
            CpuStorage::F32(kernels::channel::channel_map(x, p, self.inner, self.op)),
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        use kernels::channel::{channel_map, channel_sums, channel_sums_of_products};
        let (channels, inner) = (p.elem_count(), self.inner);
        Ok(match self.op {
            // candle's: the output gradient itself for x, its per-channel sums for p.
            ChannelOp::Add => (Some(grad.clone()), Some(kernels::io::op_grad(p, &[grad], "per-channel", |v| channel_sums(v[0], channels, inner))?)),
            // candle's: grad * p for x; for p the product grad * x, then its per-channel sums.
            ChannelOp::Mul => (
                Some(kernels::io::op_grad(x, &[grad, p], "per-channel", |v| channel_map(v[0], v[1], inner, ChannelOp::Mul))?),
                Some(kernels::io::op_grad(p, &[grad, x], "per-channel", |v| channel_sums_of_products(v[0], v[1], channels, inner))?),
            ),
        })
    }
}

/// The op of [`affine`].
struct Affine {
    /// Values per channel index and outer index.
    inner: usize,
}

impl candle_core::CustomOp3 for Affine {
    fn name(&self) -> &'static str {
        "per-channel-affine"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        const OP: &str = "per-channel affine";
        let (x, scale, shift) = (kernels::io::op_slice(s1, l1, OP)?, kernels::io::op_slice(s2, l2, OP)?, kernels::io::op_slice(s3, l3, OP)?);
        Ok((CpuStorage::F32(kernels::channel::channel_affine(x, scale, shift, self.inner)), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, scale: &Tensor, shift: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use kernels::channel::{channel_map, channel_sums, channel_sums_of_products};
        const OP: &str = "per-channel affine";
        let (channels, inner) = (scale.elem_count(), self.inner);
        // The composition's: the shift gets the sums of the output gradient, which passes on
        // to the product; x gets its products with the scale, the scale their sums with x.
        let dx = kernels::io::op_grad(x, &[grad, scale], OP, |v| channel_map(v[0], v[1], inner, ChannelOp::Mul))?;
        let dscale = kernels::io::op_grad(scale, &[grad, x], OP, |v| channel_sums_of_products(v[0], v[1], channels, inner))?;
        let dshift = kernels::io::op_grad(shift, &[grad], OP, |v| channel_sums(v[0], channels, inner))?;
        Ok((Some(dx), Some(dscale), Some(dshift)))
    }
}
