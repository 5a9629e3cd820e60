//! Elementwise activations: GEGLU, SiLU, QuickGELU.
use candle_core::Tensor;
use rayon::prelude::*;

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
            for (o, &v) in d.iter_mut().zip(src) {
                let z = v * m + 0.0;
                *o = v * ((-z).exp() + 1.0).recip();
            }
        });
        out
    })?;
    tensor(out, &dims)
}
