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
#[cfg(test)]
use candle_core::D;

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

#[cfg(test)]
mod tests {
    use super::*;

    /// The backward as candle ops, one batch item at a time: the arithmetic
    /// [`kernels::attention_grad`] reproduces.
    fn composed_item_grads(q: &Tensor, k: &Tensor, v: &Tensor, grad: &Tensor, heads: usize, mask: Option<&Tensor>) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (b, n, inner) = q.dims3()?;
        let m = k.dim(1)?;
        let h = heads;
        let d = inner / h;
        let scale = 1.0 / (d as f64).sqrt();
        let split = |t: &Tensor, len: usize| t.reshape((b, len, h, d))?.transpose(1, 2)?.contiguous();
        let merge = |t: Tensor, len: usize| t.transpose(1, 2)?.contiguous()?.reshape((b, len, inner));
        let (qh, kh, vh, gh) = (split(q, n)?, split(k, m)?, split(v, m)?, split(grad, n)?);
        let mut s = (qh.matmul(&kh.t()?)? * scale)?;
        if let Some(mask) = mask {
            s = s.broadcast_add(mask)?;
        }
        let p = candle_nn::ops::softmax_last_dim(&s)?;
        let dv = p.t()?.matmul(&gh)?;
        let dp = gh.matmul(&vh.t()?)?;
        let row = (&dp * &p)?.sum_keepdim(D::Minus1)?;
        let ds = (p * dp.broadcast_sub(&row)?)?;
        let dq = (ds.matmul(&kh)? * scale)?;
        let dk = (ds.t()?.matmul(&qh)? * scale)?;
        Ok((merge(dq, n)?, merge(dk, m)?, merge(dv, m)?))
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn backward_has_the_bits_of_the_composed_ops() {
        let dev = candle_core::Device::Cpu;
        // (b, n, m, heads, d, causal mask): the demo UNet's self- and cross-attention at both
        // levels, the text encoder's causal self-attention, and odd sizes on every axis.
        for &(b, n, m, heads, d, masked) in &[(3, 64, 64, 8, 8, false), (2, 64, 16, 8, 8, false), (2, 16, 16, 8, 16, false), (2, 16, 16, 4, 16, true), (1, 37, 23, 3, 5, false), (2, 300, 77, 2, 40, false), (1, 5, 5, 1, 3, true)] {
            let r = |seed: u64, len: usize| crate::rng::seeded_randn(seed, &[b, len, heads * d], &dev).unwrap();
            let (q, k, v, g) = (r(1, n), r(2, m), r(3, m), r(4, n));
            let mask = masked.then(|| {
                let vals: Vec<f32> = (0..n * m).map(|i| if i % m > i / m { f32::NEG_INFINITY } else { 0.0 }).collect();
                Tensor::from_vec(vals, (n, m), &dev).unwrap()
            });
            let item = |t: &Tensor, i: usize| t.narrow(0, i, 1).unwrap();
            let parts: Vec<_> = (0..b).map(|i| composed_item_grads(&item(&q, i), &item(&k, i), &item(&v, i), &item(&g, i), heads, mask.as_ref()).unwrap()).collect();
            let cat = |f: fn(&(Tensor, Tensor, Tensor)) -> &Tensor| Tensor::cat(&parts.iter().map(f).collect::<Vec<_>>(), 0).unwrap();
            let want = [cat(|p| &p.0), cat(|p| &p.1), cat(|p| &p.2)];
            // Through the op, as training calls it.
            let (qv, kv, vv) = (candle_core::Var::from_tensor(&q).unwrap(), candle_core::Var::from_tensor(&k).unwrap(), candle_core::Var::from_tensor(&v).unwrap());
            let y = attention(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), heads, mask.as_ref()).unwrap();
            let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, var, want) in [("q", &qv, &want[0]), ("k", &kv, &want[1]), ("v", &vv, &want[2])] {
                let got = grads.get(var.as_tensor()).unwrap();
                let (a, e) = (bits(got), bits(want));
                let diff = a.iter().zip(&e).filter(|(x, y)| x != y).count();
                assert_eq!(diff, 0, "d{name} of b {b}, n {n}, m {m}, heads {heads}, d {d}, mask {masked}: {diff} of {} values differ", e.len());
            }
        }
    }
}
