//! Elementwise activations: GEGLU, SiLU, QuickGELU.
use candle_core::Tensor;
use rayon::prelude::*;

use super::erff;
use super::expf;
use super::simd::{dispatch, gelu_erf_v, map_into, silu_v, Vf, S1};
use super::io::{tensor, uninit, with_slices};
use crate::error::{Error, Result};

#[inline(always)]
fn geglu_rows_imp<V: Vf>(h: &[f32], out: &mut [f32], inner: usize) {
    for (orow, hrow) in out.chunks_exact_mut(inner).zip(h.chunks_exact(2 * inner)) {
        let (value, gate) = hrow.split_at(inner);
        let body = inner / V::N * V::N;
        let mut i = 0;
        while i < body {
            unsafe {
                let v = V::load(value.as_ptr().add(i));
                let g = V::load(gate.as_ptr().add(i));
                v.mul(gelu_erf_v(g)).store(orow.as_mut_ptr().add(i));
            }
            i += V::N;
        }
        for j in body..inner {
            orow[j] = S1(value[j]).mul(gelu_erf_v(S1(gate[j]))).0;
        }
    }
}
dispatch!(fn geglu_rows(h: &[f32], out: &mut [f32], inner: usize) => geglu_rows_imp);

/// GEGLU: `h` [..., 2*inner] -> value * gelu_erf(gate), value/gate the two halves of the last
/// dim. Inference only.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let mut dims = h.dims().to_vec();
    let two = *dims.last().ok_or_else(|| Error::invalid("geglu: scalar input"))?;
    if two % 2 != 0 {
        return Err(Error::invalid(format!("geglu: odd last dim {two}")));
    }
    let inner = two / 2;
    *dims.last_mut().unwrap() = inner;
    let out = with_slices(&[h], |s| {
        let rows = if two == 0 { 0 } else { s[0].len() / two };
        let mut out = uninit(rows * inner);
        if inner > 0 {
            // Rows in groups of 64: enough work per task, results independent of the grouping.
            out.par_chunks_mut(64 * inner).zip(s[0].par_chunks(64 * two)).for_each(|(o, hh)| geglu_rows(hh, o, inner));
        }
        out
    })?;
    tensor(out, &dims)
}

/// candle 0.11's `gelu_erf` on one f32, operation for operation, given `erf = erf(v / sqrt 2)`
/// (see [`each_erf_scaled`]): `(erf + 1) * 0.5 * v`.
#[inline(always)]
fn gelu_from_erf(v: f32, erf: f32) -> f32 {
    (erf + 1.) * 0.5 * v
}

/// The derivative of [`gelu_from_erf`] as candle 0.11's backward computes it, one candle op per
/// line there (`backprop.rs`, `UnaryOp::GeluErf`): `0.5 + 0.398942 exp(-x²/2) x + 0.5
/// erf(x / sqrt 2)`, where each scalar-tensor product or sum is an affine `v * mul + add` in
/// f32 and `x / sqrt 2` multiplies by `(1 / sqrt 2)` rounded from f64.
///
/// `erf` is `erf(x / sqrt 2)` from [`each_erf_scaled`]: candle's argument `x * (1 / sqrt 2) + 0` is the same number
/// (the constant rounds to the same f32, checked by a test) except that it turns -0 into +0,
/// whose erf, halved and plus zero, is +0 either way.
/// `exp` is `e^`[`neg_half_square`]`(x)`.
#[inline(always)]
fn gelu_erf_grad_exact(x: f32, erf: f32, exp: f32) -> f32 {
    let scaled_exp_arg = (exp * 0.398942f64 as f32 + 0.0) * x;
    let erf_scaled_sqrt = erf * 0.5 + 0.0;
    (scaled_exp_arg * 1.0 + 0.5) + erf_scaled_sqrt
}

/// `-x²/2` as candle's GELU derivative computes it, before its exponential.
#[inline(always)]
fn neg_half_square(x: f32) -> f32 {
    (-(x * x)) * 0.5 + 0.0
}

/// Rows of 2 * `inner` values (value half, gate half) per task, so a task has enough work.
fn geglu_task_rows(inner: usize) -> usize {
    (16384 / inner.max(1)).max(1)
}

/// GEGLU for training: the bytes of candle's composition `value * gelu_erf(gate)` (see
/// [`geglu_exact_backward`]) in one pass. [`geglu`] is faster but uses a vectorised erf with other
/// roundings.
pub fn geglu_exact(h: &[f32], inner: usize) -> Vec<f32> {
    let mut out = uninit(h.len() / 2);
    if inner > 0 {
        let rows = geglu_task_rows(inner);
        out.par_chunks_mut(rows * inner).zip(h.par_chunks(rows * 2 * inner)).for_each(|(o, hh)| {
            for (orow, hrow) in o.chunks_exact_mut(inner).zip(hh.chunks_exact(2 * inner)) {
                let (value, gate) = hrow.split_at(inner);
                each_erf_scaled(inner, |j| gate[j], |j, erf| orow[j] = value[j] * gelu_from_erf(gate[j], erf));
            }
        });
    }
    out
}

/// The gradient of [`geglu_exact`] with respect to `h`, given the output's gradient `grad`,
/// in one pass, with the bytes candle's backward of the composition gives: the value half
/// `grad * gelu_erf(gate)`, the gate half `(grad * value) * gelu_erf'(gate)`. (Where the
/// composition's gradient is +0.0 this may be -0.0; candle adds every gradient into a zero
/// tensor, which makes it +0.0 for both.)
pub fn geglu_exact_backward(h: &[f32], grad: &[f32], inner: usize) -> Vec<f32> {
    let mut dh = uninit(h.len());
    if inner > 0 {
        let rows = geglu_task_rows(inner);
        dh.par_chunks_mut(rows * 2 * inner).zip(h.par_chunks(rows * 2 * inner)).zip(grad.par_chunks(rows * inner)).for_each(|((d, hh), gg)| {
            for ((drow, hrow), grow) in d.chunks_exact_mut(2 * inner).zip(hh.chunks_exact(2 * inner)).zip(gg.chunks_exact(inner)) {
                let (value, gate) = hrow.split_at(inner);
                let (dvalue, dgate) = drow.split_at_mut(inner);
                // The gate half holds e^(-g²/2) until the second pass replaces it.
                each_exp(inner, |j| neg_half_square(gate[j]), |j, e| dgate[j] = e);
                each_erf_scaled(inner, |j| gate[j], |j, erf| {
                    let (v, g, dy) = (value[j], gate[j], grow[j]);
                    dvalue[j] = dy * gelu_from_erf(g, erf);
                    dgate[j] = (dy * v) * gelu_erf_grad_exact(g, erf, dgate[j]);
                });
            }
        });
    }
    dh
}

/// Calls `f(i, map(arg(i)))` for `i` in `0..n`, where `map` works in place on slices
/// ([`expf::exp_in_place`], [`erff::erf_in_place`]: the bits of the scalar functions candle's
/// ops call per element, vectorised), 256 arguments at a time.
#[inline(always)]
fn each_mapped(n: usize, arg: impl Fn(usize) -> f32, map: fn(&mut [f32]), mut f: impl FnMut(usize, f32)) {
    const BLOCK: usize = 256;
    let mut buf = [0f32; BLOCK];
    for start in (0..n).step_by(BLOCK) {
        let e = &mut buf[..BLOCK.min(n - start)];
        for (j, e) in e.iter_mut().enumerate() {
            *e = arg(start + j);
        }
        map(e);
        for (j, &e) in e.iter().enumerate() {
            f(start + j, e);
        }
    }
}

/// [`each_mapped`] with e^x.
#[inline(always)]
fn each_exp(n: usize, arg: impl Fn(usize) -> f32, f: impl FnMut(usize, f32)) {
    each_mapped(n, arg, expf::exp_in_place, f)
}

/// [`each_mapped`] with `erf(x / sqrt 2)` as candle computes it: its `erf_f32` (libm's `erff`)
/// of `x` times `1 / sqrt 2` (for GELU and its derivative, which share it).
#[inline(always)]
fn each_erf_scaled(n: usize, x: impl Fn(usize) -> f32, f: impl FnMut(usize, f32)) {
    each_mapped(n, |i| x(i) * std::f32::consts::FRAC_1_SQRT_2, erff::erf_in_place, f)
}

/// SiLU for training: candle's f32 `x / (1 + exp(-x))` with the same `expf`, so the same bits.
pub fn silu_exact(x: &[f32]) -> Vec<f32> {
    let mut out = uninit(x.len());
    out.par_chunks_mut(16384).zip(x.par_chunks(16384)).for_each(|(d, s)| silu_exact_into(s, d));
    out
}

/// [`silu_exact`] of `s` into `d` (one task's share).
#[inline(always)]
pub(super) fn silu_exact_into(s: &[f32], d: &mut [f32]) {
    each_exp(s.len(), |i| -s[i], |i, e| d[i] = s[i] / (1.0 + e));
}

/// The gradient of [`silu_exact`] given its input `x`, output `y` and the output's gradient,
/// with the bytes of candle 0.11's backward (`backprop.rs`, `UnaryOp::Silu`), one candle op per
/// step there: `s = recip(exp(-x) + 1)`, `grad * (s * (1 - y) + y)`, where a scalar sum is an
/// affine `v * 1 + 1` and `1 - y` is the affine `y * -1 + 1`.
pub fn silu_exact_backward(x: &[f32], y: &[f32], grad: &[f32]) -> Vec<f32> {
    let mut dx = uninit(x.len());
    dx.par_chunks_mut(16384)
        .zip(x.par_chunks(16384).zip(y.par_chunks(16384)).zip(grad.par_chunks(16384)))
        .for_each(|(d, ((x, y), g))| silu_exact_backward_into(x, y, g, d));
    dx
}

/// [`silu_exact_backward`] of one task's share into `d`.
#[inline(always)]
pub(super) fn silu_exact_backward_into(x: &[f32], y: &[f32], g: &[f32], d: &mut [f32]) {
    each_exp(x.len(), |i| -x[i], |i, e| {
        let s = 1.0 / (e * 1.0 + 1.0);
        d[i] = g[i] * (s * (y[i] * -1.0 + 1.0) + y[i]);
    });
}

#[inline(always)]
fn silu_slices_imp<V: Vf>(src: &[f32], dst: &mut [f32]) {
    map_into::<V>(src, dst, silu_v, silu_v);
}
dispatch!(fn silu_slices(src: &[f32], dst: &mut [f32]) => silu_slices_imp);

/// x * sigmoid(x). Inference only.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let out = with_slices(&[x], |s| {
        let mut out = uninit(s[0].len());
        out.par_chunks_mut(16384).zip(s[0].par_chunks(16384)).for_each(|(d, src)| silu_slices(src, d));
        out
    })?;
    tensor(out, &dims)
}

/// QuickGELU, x * sigmoid(1.702 x), in one pass with exactly the arithmetic of candle's
/// composition (`x * sigmoid(x * 1.702)`: an affine `x * 1.702 + 0`, sigmoid as
/// `1 / (exp(-z) + 1)` with the same `expf`, a product), so the bytes are candle's.
/// Inference only.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let m = 1.702f64 as f32;
    let out = with_slices(&[x], |s| {
        let mut out = uninit(s[0].len());
        out.par_chunks_mut(16384).zip(s[0].par_chunks(16384)).for_each(|(d, src)| {
            each_exp(src.len(), |i| -(src[i] * m + 0.0), |i, e| d[i] = src[i] * (e + 1.0).recip());
        });
        out
    })?;
    tensor(out, &dims)
}

#[cfg(test)]
mod tests {
    #[test]
    fn gelu_derivative_scales_by_the_same_constant_as_gelu() {
        // gelu_erf_grad_exact reuses gelu's erf(x / sqrt 2): candle writes the constant two ways.
        assert_eq!(((1. / 2f64.sqrt()) as f32).to_bits(), std::f32::consts::FRAC_1_SQRT_2.to_bits());
    }
}
