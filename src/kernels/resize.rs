//! Nearest-neighbour upsampling of NCHW planes by a whole factor, and its gradient, for
//! training (inference resizes inside the convolution's input copy, [`super::conv`]).
use rayon::prelude::*;

use super::io::uninit;

/// Each of `planes` planes of `h` x `w` values, scaled by `s` in both directions: output pixel
/// (y, x) is input pixel (y / s, x / s) (candle's `upsample_nearest2d` for a whole factor).
pub fn upsample_nearest(x: &[f32], planes: usize, h: usize, w: usize, s: usize) -> Vec<f32> {
    assert_eq!(x.len(), planes * h * w, "upsample_nearest: input size");
    let (ho, wo) = (h * s, w * s);
    let mut out = uninit(planes * ho * wo);
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(ho * wo).zip(x.par_chunks(h * w)).for_each(|(dst, src)| {
        for (y, row) in dst.chunks_exact_mut(wo).enumerate() {
            let src = &src[y / s * w..][..w];
            for (d, &v) in row.chunks_exact_mut(s).zip(src) {
                d.fill(v);
            }
        }
    });
    out
}

/// The gradient of [`upsample_nearest`]: per input pixel, the sum of its `s` x `s` output
/// pixels' gradients, added in row-major order into a zero. That is the order and rounding of
/// candle 0.11's backward, a convolution of the gradient with a kernel of ones (stride `s`, one
/// group per channel), whose product adds the kernel's taps row by row.
pub fn upsample_nearest_backward(g: &[f32], planes: usize, h: usize, w: usize, s: usize) -> Vec<f32> {
    let (ho, wo) = (h * s, w * s);
    assert_eq!(g.len(), planes * ho * wo, "upsample_nearest_backward: gradient size");
    let mut dx = uninit(planes * h * w);
    if dx.is_empty() {
        return dx;
    }
    dx.par_chunks_mut(h * w).zip(g.par_chunks(ho * wo)).for_each(|(dst, src)| {
        for (y, row) in dst.chunks_exact_mut(w).enumerate() {
            for (x, d) in row.iter_mut().enumerate() {
                let mut sum = 0f32;
                for dy in 0..s {
                    for &v in &src[(y * s + dy) * wo + x * s..][..s] {
                        sum += v;
                    }
                }
                *d = sum;
            }
        }
    });
    dx
}
