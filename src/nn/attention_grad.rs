//! Differentiable fused attention for training on the CPU.
//!
//! Composed of candle ops, `softmax(Q K^T / sqrt(d) + mask) V` keeps every layer's score and
//! probability tensors ([b, heads, n, m], the largest in the graph) alive until backward, and
//! runs a dozen passes over them. This op runs the fused inference kernel
//! ([`kernels::attention`](fn@crate::kernels::attention)) forward, keeps only q, k, v, and recomputes the probabilities in
//! its backward (as FlashAttention does, Dao et al. 2022, §3.1):
//!
//! `P = softmax(S)`, `dV = P^T dO`, `dP = dO V^T`, `dS = P ∘ (dP - rowsum(dP ∘ P))`,
//! `dQ = dS K / sqrt(d)`, `dK = dS^T Q / sqrt(d)`.
//!
//! `tests/train.rs` checks its gradients against the composed path (itself checked against
//! finite differences in f64).
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, D};
use rayon::prelude::*;

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
        let (q, k, v) = (kernels::io::op_input(s1, l1, OP)?, kernels::io::op_input(s2, l2, OP)?, kernels::io::op_input(s3, l3, OP)?);
        kernels::io::op_output(kernels::attention(&q, &k, &v, self.heads, self.mask.as_ref(), None), OP)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let b = q.dim(0)?;
        // One task per batch item: every op below treats the items apart (a product per item
        // and head, a softmax and a sum per row), so the split leaves the bits as they are and
        // lets the many small products run on all threads.
        let parts = (0..b)
            .into_par_iter()
            .map(|i| {
                let item = |t: &Tensor| t.narrow(0, i, 1);
                self.item_grads(&item(q)?, &item(k)?, &item(v)?, &item(grad)?)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let cat = |f: fn(&(Tensor, Tensor, Tensor)) -> &Tensor| Tensor::cat(&parts.iter().map(f).collect::<Vec<_>>(), 0);
        let (dq, dk, dv) = (cat(|p| &p.0)?, cat(|p| &p.1)?, cat(|p| &p.2)?);
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

impl AttentionOp {
    /// The gradients (dq, dk, dv) of `q` [b, n, h*d], `k`/`v` [b, m, h*d] given the output's
    /// gradient, composed of candle's ops.
    fn item_grads(&self, q: &Tensor, k: &Tensor, v: &Tensor, grad: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (b, n, inner) = q.dims3()?;
        let m = k.dim(1)?;
        let h = self.heads;
        let d = inner / h;
        let scale = 1.0 / (d as f64).sqrt();
        let split = |t: &Tensor, len: usize| t.reshape((b, len, h, d))?.transpose(1, 2)?.contiguous();
        let merge = |t: Tensor, len: usize| t.transpose(1, 2)?.contiguous()?.reshape((b, len, inner));
        let (qh, kh, vh, gh) = (split(q, n)?, split(k, m)?, split(v, m)?, split(grad, n)?);
        let mut s = (qh.matmul(&kh.t()?)? * scale)?;
        // The mask is [n, m] (see `kernels::attention`), the same for every item.
        if let Some(mask) = &self.mask {
            s = s.broadcast_add(mask)?;
        }
        let p = candle_nn::ops::softmax_last_dim(&s)?;
        drop(s);
        let dv = p.t()?.matmul(&gh)?;
        let dp = gh.matmul(&vh.t()?)?;
        let row = (&dp * &p)?.sum_keepdim(D::Minus1)?;
        let ds = (p * dp.broadcast_sub(&row)?)?;
        let dq = (ds.matmul(&kh)? * scale)?;
        let dk = (ds.t()?.matmul(&qh)? * scale)?;
        Ok((merge(dq, n)?, merge(dk, m)?, merge(dv, m)?))
    }
}
