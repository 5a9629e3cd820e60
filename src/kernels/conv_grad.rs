//! Gradients of a 2-D convolution (no dilation, one group) through unfolded inputs: the
//! weight's, for trained convolutions such as a classifier's,
//! `dW[co, ci, ky, kx] = Σ_{n, oy, ox} g[n, co, oy, ox] · x[n, ci, oy·s + ky − p, ox·s + kx − p]`
//! (zero outside the image), and the input's for strided convolutions, where the alternative
//! (a stride-1 convolution of the zero-dilated output gradient) would spend s² times the
//! products on zeros.
//!
//! Per image it is one product of the output gradient `[cout, ho·wo]` with the unfolded input,
//! built transposed (`[cin·k·k, ho·wo]`: each row a shifted copy of one input plane, so the
//! unfolding is row copies rather than a gather per element). Images are taken in fixed groups
//! of [`GROUP`], one rayon task and one small unfolding buffer per group, and the groups'
//! partial sums are added in group order: the result depends on the batch, never on the number
//! of threads.
use rayon::prelude::*;

use super::gemm::sgemm;
use super::io::uninit;

/// Images per partial sum.
pub const GROUP: usize = 4;

/// Shapes of a convolution: input `[b, cin, h, w]`, kernel `k`x`k`, stride, padding; the
/// output is `[b, cout, ho, wo]`.
#[derive(Clone, Copy, Debug)]
pub struct ConvShape {
    pub b: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ConvShape {
    pub fn out_hw(&self) -> (usize, usize) {
        let o = |n: usize| (n + 2 * self.pad - self.k) / self.stride + 1;
        (o(self.h), o(self.w))
    }
}

/// `dW` as `[cout, cin, k, k]` from the input `x` (`[b, cin, h, w]`) and the output gradient
/// `g` (`[b, cout, ho, wo]`), both contiguous.
pub fn conv2d_weight_grad(x: &[f32], g: &[f32], sh: ConvShape) -> Vec<f32> {
    let ConvShape { b, cin, h, w, cout, k, .. } = sh;
    let (ho, wo) = sh.out_hw();
    let (hw, ckk) = (ho * wo, cin * k * k);
    assert_eq!(x.len(), b * cin * h * w, "conv weight grad: input size");
    assert_eq!(g.len(), b * cout * hw, "conv weight grad: gradient size");
    let partials: Vec<Vec<f32>> = (0..b.div_ceil(GROUP))
        .into_par_iter()
        .map(|grp| {
            let mut col = uninit(ckk * hw);
            let mut acc = vec![0f32; cout * ckk];
            for (i, n) in (grp * GROUP..b.min((grp + 1) * GROUP)).enumerate() {
                unfold_transposed(&x[n * cin * h * w..][..cin * h * w], &mut col, sh, ho, wo);
                // SAFETY: acc is cout x ckk, g's image n is cout x hw, col is ckk x hw (read
                // transposed); the buffers are distinct.
                unsafe {
                    sgemm(
                        cout,
                        ckk,
                        hw,
                        acc.as_mut_ptr(),
                        ckk,
                        1,
                        i > 0,
                        g[n * cout * hw..].as_ptr(),
                        hw,
                        1,
                        col.as_ptr(),
                        1,
                        hw,
                        1.0,
                        1,
                    );
                }
            }
            acc
        })
        .collect();
    let mut it = partials.into_iter();
    let mut dw = it.next().unwrap_or_else(|| vec![0f32; cout * ckk]);
    for p in it {
        dw.iter_mut().zip(&p).for_each(|(d, v)| *d += v);
    }
    dw
}

/// The output columns `lo..hi` (of `wo`) whose input column `ox·s + kx − p` lies inside
/// `[0, w)` for kernel column `kx`.
fn inside_cols(sh: ConvShape, kx: usize, wo: usize) -> (usize, usize) {
    let ConvShape { w, stride: s, pad: p, .. } = sh;
    let lo = p.saturating_sub(kx).div_ceil(s).min(wo);
    let hi = if w + p > kx { (w + p - kx - 1) / s + 1 } else { 0 }.clamp(lo, wo);
    (lo, hi)
}

/// `col[(ci·k + ky)·k + kx][oy·wo + ox] = x[ci, oy·s + ky − p, ox·s + kx − p]` for one image.
fn unfold_transposed(x: &[f32], col: &mut [f32], sh: ConvShape, ho: usize, wo: usize) {
    let ConvShape { cin, h, w, k, stride: s, pad: p, .. } = sh;
    for ci in 0..cin {
        let plane = &x[ci * h * w..][..h * w];
        for ky in 0..k {
            for kx in 0..k {
                let row = &mut col[((ci * k + ky) * k + kx) * ho * wo..][..ho * wo];
                let (lo, hi) = inside_cols(sh, kx, wo);
                for oy in 0..ho {
                    let dst = &mut row[oy * wo..][..wo];
                    let iy = (oy * s + ky) as isize - p as isize;
                    if iy < 0 || iy >= h as isize {
                        dst.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * w..][..w];
                    dst[..lo].fill(0.0);
                    dst[hi..].fill(0.0);
                    if s == 1 {
                        let ix0 = lo + kx - p;
                        dst[lo..hi].copy_from_slice(&src[ix0..ix0 + (hi - lo)]);
                    } else {
                        for (ox, d) in dst.iter_mut().enumerate().take(hi).skip(lo) {
                            *d = src[ox * s + kx - p];
                        }
                    }
                }
            }
        }
    }
}

/// `dX` as `[b, cin, h, w]` from the weight `wt` (`[cout, cin, k, k]`) and the output gradient
/// `g` (`[b, cout, ho, wo]`): per image, the product `Wᵀ g` (`[cin·k·k, ho·wo]`) folded back
/// onto the input positions each column was read from, in a fixed order. Images are
/// independent tasks, so the result does not depend on the batch or the threads.
pub fn conv2d_input_grad(wt: &[f32], g: &[f32], sh: ConvShape) -> Vec<f32> {
    let ConvShape { b, cin, h, w, cout, k, .. } = sh;
    let (ho, wo) = sh.out_hw();
    let (hw, ckk) = (ho * wo, cin * k * k);
    assert_eq!(wt.len(), cout * ckk, "conv input grad: weight size");
    assert_eq!(g.len(), b * cout * hw, "conv input grad: gradient size");
    let mut dx = vec![0f32; b * cin * h * w];
    if dx.is_empty() {
        return dx;
    }
    dx.par_chunks_mut(cin * h * w).zip(g.par_chunks(cout * hw)).for_each_init(
        || uninit(ckk * hw),
        |col, (dxn, gn)| {
            // SAFETY: col is ckk x hw, wt is read as its transpose (ckk x cout), gn is cout x hw.
            unsafe { sgemm(ckk, hw, cout, col.as_mut_ptr(), hw, 1, false, wt.as_ptr(), 1, ckk, gn.as_ptr(), hw, 1, 1.0, 1) };
            fold(col, dxn, sh, ho, wo);
        },
    );
    dx
}

/// The adjoint of [`unfold_transposed`]: adds every column entry to the input position it
/// was read from.
fn fold(col: &[f32], x: &mut [f32], sh: ConvShape, ho: usize, wo: usize) {
    let ConvShape { cin, h, w, k, stride: s, pad: p, .. } = sh;
    for ci in 0..cin {
        let plane = &mut x[ci * h * w..][..h * w];
        for ky in 0..k {
            for kx in 0..k {
                let row = &col[((ci * k + ky) * k + kx) * ho * wo..][..ho * wo];
                let (lo, hi) = inside_cols(sh, kx, wo);
                for oy in 0..ho {
                    let iy = (oy * s + ky) as isize - p as isize;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    let dst = &mut plane[iy as usize * w..][..w];
                    let src = &row[oy * wo..][..wo];
                    for ox in lo..hi {
                        dst[ox * s + kx - p] += src[ox];
                    }
                }
            }
        }
    }
}
