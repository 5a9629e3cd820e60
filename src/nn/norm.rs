//! `nn.GroupNorm` (fused with SiLU on the fast path; one custom op with its backward written
//! out when training on the CPU) and `nn.LayerNorm` (composed of differentiable ops in
//! [`Mode::Train`]).
use candle_core::{DType, Tensor, D};

use super::activation::Activation;
use super::mode::Mode;
use super::weights::Weights;
use crate::error::Result;
use crate::instrument::profile::{scope, Class};
use crate::kernels;

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
        if kernels::fast_dtype_ok(&[x, &self.weight, &self.bias]) && x.rank() >= 2 {
            let op = GroupNormTrain { groups: self.groups, eps: self.eps };
            return scope(Class::GroupNorm, || Ok(x.contiguous()?.apply_op3(&self.weight.contiguous()?, &self.bias.contiguous()?, op)?));
        }
        scope(Class::GroupNorm, || self.forward_composed(x))
    }

    /// `act(forward(x))`, fused into one pass on the fast path when `act` is SiLU.
    pub fn forward_act(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
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

/// Group norm of f32 CPU tensors whose input, scale or shift track gradients, as one custom op:
/// statistics per (image, group) with f64 sums and the backward written out, instead of
/// the composed ops' strided reductions and broadcasts (a small model's training step was
/// dominated by them). Same maths as [`GroupNorm::forward_composed`].
struct GroupNormTrain {
    groups: usize,
    eps: f64,
}

/// (mean, 1 / std) of each of the `groups` contiguous blocks of `x` (one image's group).
fn block_stats(x: &[f32], eps: f64) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl candle_core::CustomOp3 for GroupNormTrain {
    fn name(&self) -> &'static str {
        "group-norm-train"
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
        use rayon::prelude::*;
        const OP: &str = "group norm";
        use crate::kernels::io::op_slice;
        let (xs, gamma, beta) = (op_slice(s1, l1, OP)?, op_slice(s2, l2, OP)?, op_slice(s3, l3, OP)?);
        let dims = l1.shape().dims();
        let (b, c) = (dims[0], dims[1]);
        let hw = xs.len() / (b * c).max(1);
        let block = c / self.groups * hw;
        let mut out = vec![0f32; xs.len()];
        if !out.is_empty() {
            out.par_chunks_mut(block).zip(xs.par_chunks(block)).enumerate().for_each(|(i, (o, x))| {
                let (mean, rstd) = block_stats(x, self.eps);
                let c0 = (i % self.groups) * (c / self.groups);
                for (j, (ov, &xv)) in o.iter_mut().zip(x).enumerate() {
                    let ch = c0 + j / hw;
                    *ov = ((xv as f64 - mean) * rstd * gamma[ch] as f64 + beta[ch] as f64) as f32;
                }
            });
        }
        Ok((candle_core::CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, gamma: &Tensor, _beta: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use rayon::prelude::*;
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let dy = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let g = gamma.to_vec1::<f32>()?;
        let hw = xs.len() / (b * c).max(1);
        let cpg = c / self.groups;
        let block = cpg * hw;
        let mut dx = vec![0f32; xs.len()];
        // Per block: dx, and its channels' contributions to dγ and dβ (summed over images below,
        // in image order, so the result does not depend on the threads).
        let parts: Vec<(Vec<f64>, Vec<f64>)> = if dx.is_empty() {
            Vec::new()
        } else {
            dx.par_chunks_mut(block)
                .zip(xs.par_chunks(block).zip(dy.par_chunks(block)))
                .enumerate()
                .map(|(i, (dxb, (x, d)))| {
                    let (mean, rstd) = block_stats(x, self.eps);
                    let c0 = (i % self.groups) * cpg;
                    let (mut dg, mut db) = (vec![0f64; cpg], vec![0f64; cpg]);
                    let (mut sum_dxhat, mut sum_dxhat_xhat) = (0f64, 0f64);
                    for (j, (&xv, &dv)) in x.iter().zip(d).enumerate() {
                        let xhat = (xv as f64 - mean) * rstd;
                        let dxhat = dv as f64 * g[c0 + j / hw] as f64;
                        dg[j / hw] += dv as f64 * xhat;
                        db[j / hw] += dv as f64;
                        sum_dxhat += dxhat;
                        sum_dxhat_xhat += dxhat * xhat;
                    }
                    let n = x.len() as f64;
                    let (m1, m2) = (sum_dxhat / n, sum_dxhat_xhat / n);
                    for (j, ((o, &xv), &dv)) in dxb.iter_mut().zip(x).zip(d).enumerate() {
                        let xhat = (xv as f64 - mean) * rstd;
                        let dxhat = dv as f64 * g[c0 + j / hw] as f64;
                        *o = (rstd * (dxhat - m1 - xhat * m2)) as f32;
                    }
                    (dg, db)
                })
                .collect()
        };
        let (mut dgamma, mut dbeta) = (vec![0f64; c], vec![0f64; c]);
        for (i, (dg, db)) in parts.iter().enumerate() {
            let c0 = (i % self.groups) * cpg;
            for k in 0..cpg {
                dgamma[c0 + k] += dg[k];
                dbeta[c0 + k] += db[k];
            }
        }
        let dev = x.device();
        let to = |v: Vec<f64>| Tensor::from_vec(v.into_iter().map(|x| x as f32).collect::<Vec<_>>(), c, dev);
        Ok((Some(Tensor::from_vec(dx, dims, dev)?), Some(to(dgamma)?), Some(to(dbeta)?)))
    }
}
