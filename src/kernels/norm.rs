//! GroupNorm (+ SiLU), one task per (batch element, group).
use candle_core::Tensor;
use rayon::prelude::*;

use super::simd::{dispatch, map_into, silu_v, Vf, LANES, S1};
use super::io::{check_per_channel, tensor, uninit, with_slices};
use crate::error::{Error, Result};

/// Sum of a slice in a fixed order: 16 strided f32 lanes per 4096-element block, the lanes
/// then the tail summed in order, the block sums accumulated in f64.
#[inline(always)]
fn sum_f64<V: Vf>(x: &[f32], mean: Option<f32>) -> f64 {
    let mut total = 0f64;
    for block in x.chunks(4096) {
        let body = block.len() / LANES * LANES;
        let mut acc = V::splat(0.0);
        let mut i = 0;
        match mean {
            None => {
                while i < body {
                    acc = acc.add(unsafe { V::load(block.as_ptr().add(i)) });
                    i += V::N;
                }
            }
            Some(mu) => {
                let vm = V::splat(mu);
                while i < body {
                    let d = unsafe { V::load(block.as_ptr().add(i)) }.sub(vm);
                    acc = d.fma(d, acc);
                    i += V::N;
                }
            }
        }
        let mut s = 0f32;
        for &l in &acc.lanes()[..V::N] {
            s += l;
        }
        for &v in &block[body..] {
            match mean {
                None => s += v,
                Some(mu) => {
                    let d = v - mu;
                    s = d.mul_add(d, s);
                }
            }
        }
        total += s as f64;
    }
    total
}

#[inline(always)]
fn group_norm_task_imp<V: Vf>(src: &[f32], dst: &mut [f32], hw: usize, gamma: &[f32], beta: &[f32], eps: f64, silu: bool) {
    let n = src.len();
    let mean = (sum_f64::<V>(src, None) / n as f64) as f32;
    let var = sum_f64::<V>(src, Some(mean)) / n as f64;
    let rstd = (1.0 / (var + eps).sqrt()) as f32;
    for (c, (s, d)) in src.chunks_exact(hw).zip(dst.chunks_exact_mut(hw)).enumerate() {
        let a = rstd * gamma[c];
        let bb = beta[c];
        if silu {
            map_into::<V>(s, d, |x| silu_v(x.sub(V::splat(mean)).fma(V::splat(a), V::splat(bb))), |x| {
                silu_v(x.sub(S1(mean)).fma(S1(a), S1(bb)))
            });
        } else {
            map_into::<V>(s, d, |x| x.sub(V::splat(mean)).fma(V::splat(a), V::splat(bb)), |x| x.sub(S1(mean)).fma(S1(a), S1(bb)));
        }
    }
}
dispatch!(fn group_norm_task(src: &[f32], dst: &mut [f32], hw: usize, gamma: &[f32], beta: &[f32], eps: f64, silu: bool) => group_norm_task_imp);

/// `nn.GroupNorm` over NCHW (or any [b, c, ...]) input, optionally followed by SiLU.
/// Inference only.
pub fn group_norm(x: &Tensor, groups: usize, gamma: &Tensor, beta: &Tensor, eps: f64, silu: bool) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    if dims.len() < 2 || groups == 0 || dims[1] % groups != 0 {
        return Err(Error::invalid(format!("group_norm: input {dims:?}, {groups} groups")));
    }
    let (b, c) = (dims[0], dims[1]);
    check_per_channel("group_norm", "gamma", Some(gamma), c)?;
    check_per_channel("group_norm", "beta", Some(beta), c)?;
    let hw: usize = dims[2..].iter().product();
    let cpg = c / groups;
    let out = with_slices(&[x, gamma, beta], |s| {
        let (xs, gs, bs) = (s[0], s[1], s[2]);
        let mut out = uninit(b * c * hw);
        let chunk = cpg * hw;
        if chunk == 0 {
            return out;
        }
        out.par_chunks_mut(chunk).zip(xs.par_chunks(chunk)).enumerate().for_each(|(i, (d, src))| {
            let g = i % groups;
            group_norm_task(src, d, hw, &gs[g * cpg..(g + 1) * cpg], &bs[g * cpg..(g + 1) * cpg], eps, silu);
        });
        out
    })?;
    tensor(out, &dims)
}
