//! A trainable per-channel parameter applied by broadcast: `x + p` (a bias) and `x * p` (a
//! norm's scale), with `p` holding one value per index of one dim of `x`.
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
