//! Multi-head scaled dot-product attention: the fused kernel when inferring, the fused
//! differentiable op ([`super::attention_grad`]) when training on the CPU, candle ops otherwise.
use candle_core::{Tensor, D};

use super::attention_grad;
use super::items;
use super::mode::{Mode, Precision};
use crate::error::Result;
use crate::instrument::flops;
use crate::instrument::profile::{scope, Class};
use crate::kernels;

/// Softmax over the last dim: fused when inferring, differentiable when training.
pub fn softmax_last_dim(x: &Tensor, mode: Mode) -> Result<Tensor> {
    Ok(match mode {
        Mode::Infer => candle_nn::ops::softmax_last_dim(&x.contiguous()?)?,
        Mode::Train => candle_nn::ops::softmax(x, D::Minus1)?,
    })
}

/// Multi-head scaled dot-product attention: q [b, n, h*d], k/v [b, m, h*d] -> [b, n, h*d].
/// `mask`, if given, is added to the scores (broadcast over batch and heads). `precision` is
/// that of the layers around it: in bf16 the fused kernel's two products take bf16 inputs too,
/// on the same kernel (AMX tiles or AVX-512 BF16).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: Option<&Tensor>, mode: Mode, precision: Precision) -> Result<Tensor> {
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
        flops::add(2 * b * n * k.dim(1)? * inner);
        let bf16_kernel = match precision {
            Precision::Bf16(kernel) => Some(kernel),
            Precision::F32 => None,
        };
        return scope(Class::Attention, || kernels::attention(q, k, v, heads, mask, bf16_kernel));
    }
    if mode == Mode::Train && attention_grad::usable(&ts) {
        let (b, n, inner) = q.dims3()?;
        flops::add(2 * b * n * k.dim(1)? * inner);
        return scope(Class::Attention, || attention_grad::attention(q, k, v, heads, mask));
    }
    let (b, n, inner) = q.dims3()?;
    let m = k.dim(1)?;
    let d = inner / heads;
    let split = |t: &Tensor, len: usize| -> Result<Tensor> {
        Ok(t.reshape((b, len, heads, d))?.transpose(1, 2)?.contiguous()?)
    };
    let (qh, kh, vh) = scope(Class::Layout, || -> Result<_> { Ok((split(q, n)?, split(k, m)?, split(v, m)?)) })?;
    flops::add(2 * b * heads * n * m * d);
    let scale = 1.0 / (d as f64).sqrt();
    let out = scope(Class::Attention, || {
        items::per_item_on_gpu(&[&qh, &kh, &vh], |t| {
            let mut scores = (t[0].matmul(&t[1].t()?)? * scale)?;
            if let Some(mask) = mask {
                scores = scores.broadcast_add(mask)?;
            }
            let probs = softmax_last_dim(&scores, mode)?;
            Ok(probs.matmul(&t[2])?)
        })
    })?;
    scope(Class::Layout, || Ok(out.transpose(1, 2)?.reshape((b, n, inner))?))
}
