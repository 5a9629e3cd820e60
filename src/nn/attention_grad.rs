//! Differentiable fused attention for training on the CPU.
//!
//! Composed of candle ops, `softmax(Q K^T / sqrt(d) + mask) V` keeps every layer's score and
//! probability tensors ([b, heads, n, m], the largest in the graph) alive until backward, and
//! runs a dozen passes over them. This op runs the fused inference kernel
//! ([`kernels::attention`](fn@crate::kernels::attention)) forward, keeps only q, k, v, and its
//! backward ([`kernels::attention_grad`]) recomputes the probabilities, with the bits of the
//! same steps as candle ops.
//!
//! `tests/train.rs` checks its gradients against the composed path (itself checked against
//! finite differences in f64).
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use crate::error::Result;
use crate::kernels;

/// Multi-head attention `q` [b, n, h*d], `k`/`v` [b, m, h*d] -> [b, n, h*d] with a backward
/// pass. CPU, f32 only (see [`usable`]).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: Option<&Tensor>) -> Result<Tensor> {
    let op = AttentionOp { heads, mask: mask.map(|m| m.detach()) };
    Ok(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

/// Whether [`attention`] can run on these tensors.
pub fn usable(ts: &[&Tensor]) -> bool {
    kernels::fast_dtype_ok(ts)
}

struct AttentionOp {
    heads: usize,
    mask: Option<Tensor>,
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        const OP: &str = "fused attention";
        let qkv = [kernels::io::op_slice(s1, l1, OP)?, kernels::io::op_slice(s2, l2, OP)?, kernels::io::op_slice(s3, l3, OP)?];
        let dims = [kernels::io::op_dims::<3>(l1, OP)?, kernels::io::op_dims::<3>(l2, OP)?, kernels::io::op_dims::<3>(l3, OP)?];
        let out = kernels::attention::attention_on(qkv, dims, self.heads, self.mask.as_ref(), None).map(|v| (v, dims[0]));
        kernels::io::op_result(out, OP)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, n, inner) = q.dims3()?;
        let m = k.dim(1)?;
        let shape = kernels::attention_grad::AttentionShape { b, n, m, heads: self.heads, d: inner / self.heads };
        let mut ts = vec![q, k, v, grad];
        ts.extend(&self.mask);
        let (dq, dk, dv) = kernels::io::with_slices(&ts, |s| kernels::attention_grad::attention_backward(s[0], s[1], s[2], s[3], s.get(4).copied(), shape))
            .map_err(|e| candle_core::Error::Msg(format!("attention backward: {e}")))?;
        let dev = q.device();
        Ok((Some(Tensor::from_vec(dq, (b, n, inner), dev)?), Some(Tensor::from_vec(dk, (b, m, inner), dev)?), Some(Tensor::from_vec(dv, (b, m, inner), dev)?)))
    }
}
