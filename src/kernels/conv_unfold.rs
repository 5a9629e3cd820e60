//! A 2-D convolution (no dilation, one group) through unfolded inputs: the forward product for
//! convolutions with few input channels (a classifier's), and the gradients — the weight's, for
//! trained convolutions,
//! `dW[co, ci, ky, kx] = Σ_{n, oy, ox} g[n, co, oy, ox] · x[n, ci, oy·s + ky − p, ox·s + kx − p]`
//! (zero outside the image), and the input's for strided convolutions, where the alternative
//! (a stride-1 convolution of the zero-dilated output gradient) would spend s² times the
//! products on zeros.
//!
//! The unfolded input of an image is built transposed (`[cin·k·k, ho·wo]`: each row a shifted
//! copy of one input plane, so the unfolding is row copies rather than a gather per element).
//! The forward is then one product `W [cout, cin·k·k]` by it per image: with 16 input channels
//! that is one product with a depth of 144 instead of nine of depth 16 (as [`super::conv`]
//! runs them), each of which reads and writes the whole output. Where the direct kernel
//! (`kernels::conv_taps`) can sum it as `gemm` does, the unfolded matrix is never built: its
//! rows are read in place as shifted views of the zero-padded image (split into phase planes
//! for strides above 1). The strided input gradient likewise runs, where it keeps the bits, as
//! one stride-1 direct product per input phase instead of a product and a fold. For the weight's gradient,
//! images are taken in fixed groups of [`GROUP`], one rayon task and one small unfolding buffer
//! per group, and the groups' partial sums are added in group order: the result depends on the
//! batch, never on the number of threads. Where `gemm` sums each image's pixels in one depth
//! block, a group's sum runs through the direct kernel (`kernels::conv_taps`) instead, on
//! pixel-major copies, with the same bits. Everything else is one task per image.
use rayon::prelude::*;

use super::conv::Phases;
use super::conv_taps;
use super::gemm;
use super::gemm::sgemm;
use super::io::{uninit, Lines};

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

/// The convolution of `x` (`[b, cin, h, w]`) with `wt` (`[cout, cin, k, k]`), no bias, as
/// `[b, cout, ho, wo]`: per image, one product of the weight with the unfolded input (a 1x1
/// stride-1 convolution multiplies the input itself). Where the direct kernel reproduces that
/// product's bits (`direct_block`), it runs instead, and the unfolded input is never built.
pub fn conv2d_unfolded(x: &[f32], wt: &[f32], sh: ConvShape) -> Vec<f32> {
    match direct_block(sh) {
        Some(block) => conv2d_direct(x, wt, sh, block),
        None => conv2d_gemm(x, wt, sh),
    }
}

/// [`conv2d_unfolded`] through `gemm` over the unfolded input.
fn conv2d_gemm(x: &[f32], wt: &[f32], sh: ConvShape) -> Vec<f32> {
    let ConvShape { b, cin, h, w, cout, k, stride, pad } = sh;
    let (ho, wo) = sh.out_hw();
    let (hw, ckk) = (ho * wo, cin * k * k);
    assert_eq!(x.len(), b * cin * h * w, "unfolded conv: input size");
    assert_eq!(wt.len(), cout * ckk, "unfolded conv: weight size");
    let mut out = uninit(b * cout * hw);
    if out.is_empty() {
        return out;
    }
    let plain = k == 1 && stride == 1 && pad == 0;
    out.par_chunks_mut(cout * hw).zip(x.par_chunks(cin * h * w)).for_each_init(
        || if plain { Vec::new() } else { uninit(ckk * hw) },
        |col, (dst, xn)| {
            let src = if plain {
                xn
            } else {
                unfold_transposed(xn, col, sh, ho, wo, hw);
                &col[..]
            };
            // SAFETY: dst is cout x hw, wt is cout x ckk, src is ckk x hw; distinct buffers.
            unsafe { sgemm(cout, hw, ckk, dst.as_mut_ptr(), hw, 1, false, wt.as_ptr(), ckk, 1, src.as_ptr(), hw, 1, 1.0, 1) };
        },
    );
    out
}

/// The depth block in which `gemm` sums the product `W [cout, cin·k·k] @ U [cin·k·k, ho·wo]`
/// ([`gemm::depth_block`]), where the direct kernel (AVX-512 or AVX2) reproduces it: depths
/// of one block, and products of at most 64 x 64 (deeper, larger products, whose blocks `gemm`
/// sizes from the L1 cache, stay with `gemm`: the direct kernel's speed on them is not
/// measured). A 1x1 convolution stays with `gemm`: its unfolding is at most a subsampling copy.
fn direct_block(sh: ConvShape) -> Option<usize> {
    let (ho, wo) = sh.out_hw();
    let depth = sh.cin * sh.k * sh.k;
    if sh.k == 1 || !conv_taps::available() || (depth > 512 && (sh.cout > 64 || ho * wo > 64)) {
        return None;
    }
    gemm::depth_block(sh.cout, ho * wo, depth)
}

/// [`conv2d_unfolded`] through the direct kernel ([`conv_taps::conv_rows`]): each image is
/// zero-padded into phase planes ([`Phases`]), and row (ci, ky, kx) of the unfolded input is
/// read in place as a shifted view of them, on an output grid a few columns wider than the
/// output, compacted at the end; or, on small maps with enough output channels, channels-last
/// over the map's pixels alone, transposed at the end.
fn conv2d_direct(x: &[f32], wt: &[f32], sh: ConvShape, block: usize) -> Vec<f32> {
    let ConvShape { b, cin, h, w, cout, k, stride, pad } = sh;
    let (ho, wo) = sh.out_hw();
    let (hw, ckk) = (ho * wo, cin * k * k);
    assert_eq!(x.len(), b * cin * h * w, "unfolded conv: input size");
    assert_eq!(wt.len(), cout * ckk, "unfolded conv: weight size");
    let mut out = uninit(b * cout * hw);
    if out.is_empty() {
        return out;
    }
    let grid = Phases::new(h + 2 * pad, w + 2 * pad, stride, k);
    let n_ext = ho * grid.wq;
    let x_offs: Vec<usize> = (0..ckk).map(|r| (r / (k * k)) * grid.plane + grid.tap(r / k % k, r % k)).collect();
    // From the start of a cache line, as `conv_taps::pack_taps` packs its weights.
    let mut w_rows = Lines::uninit(ckk * cout);
    transpose(wt, cout, ckk, &mut w_rows);
    let (rows, cols): (Vec<usize>, Vec<usize>) = ((0..h).collect(), (0..w).collect());
    // A single image splits its pixels across the threads; a batch runs one image per task.
    let parallel = b == 1;
    let channels_last = hw >= 2 && super::conv::direct_channels_last(cout, n_ext);
    out.par_chunks_mut(cout * hw).zip(x.par_chunks(cin * h * w)).for_each_init(
        // The padded input's border is zeroed once and never written.
        || (vec![0f32; cin * grid.plane + grid.slack], uninit(cout * n_ext)),
        |(xp, ext), (dst, xn)| {
            for (ci, plane) in xp.chunks_exact_mut(grid.plane).take(cin).enumerate() {
                grid.fill(&xn[ci * h * w..][..h * w], w, &rows, &cols, pad, pad, plane);
            }
            if channels_last {
                // Only the map's pixels, as [pixel, cout], then transposed.
                let layout = conv_taps::Layout::ChannelsLastRows { cols: wo, stride: grid.wq };
                conv_taps::conv_rows(&w_rows, cout, &x_offs, block, xp, hw, ext, false, parallel, layout);
                transpose(&ext[..hw * cout], hw, cout, dst);
                return;
            }
            if grid.wq == wo {
                conv_taps::conv_rows(&w_rows, cout, &x_offs, block, xp, n_ext, dst, false, parallel, conv_taps::Layout::Planar);
                return;
            }
            conv_taps::conv_rows(&w_rows, cout, &x_offs, block, xp, n_ext, ext, false, parallel, conv_taps::Layout::Planar);
            for (d, e) in dst.chunks_exact_mut(wo).zip(ext.chunks_exact(grid.wq)) {
                d.copy_from_slice(&e[..wo]);
            }
        },
    );
    out
}

/// `dW` as `[cout, cin, k, k]` from the input `x` (`[b, cin, h, w]`) and the output gradient
/// `g` (`[b, cout, ho, wo]`), both contiguous.
pub fn conv2d_weight_grad(x: &[f32], g: &[f32], sh: ConvShape) -> Vec<f32> {
    let ConvShape { b, cin, h, w, cout, k, .. } = sh;
    let (ho, wo) = sh.out_hw();
    let (hw, ckk) = (ho * wo, cin * k * k);
    assert_eq!(x.len(), b * cin * h * w, "conv weight grad: input size");
    assert_eq!(g.len(), b * cout * hw, "conv weight grad: gradient size");
    // Where gemm sums the product ([cout, hw] by [hw, ckk]) in one block, the direct kernel
    // gives the same bits without gemm's packing per image.
    if conv_taps::available() && gemm::one_block(cout, ckk, hw) && conv_taps::planar_pays(ckk) {
        return weight_grad_taps(x, g, sh);
    }
    weight_grad_rows_apart(x, g, sh, spread_stride(hw))
}

/// [`conv2d_weight_grad`] through gemm, with the unfolded input's rows `ld` apart (`ld >= ho·wo`).
fn weight_grad_rows_apart(x: &[f32], g: &[f32], sh: ConvShape, ld: usize) -> Vec<f32> {
    let ConvShape { b, cin, h, w, cout, k, .. } = sh;
    let (ho, wo) = sh.out_hw();
    let (hw, ckk) = (ho * wo, cin * k * k);
    let partials: Vec<Vec<f32>> = (0..b.div_ceil(GROUP))
        .into_par_iter()
        .map(|grp| {
            let mut col = uninit(ckk * ld);
            let mut acc = vec![0f32; cout * ckk];
            for (i, n) in (grp * GROUP..b.min((grp + 1) * GROUP)).enumerate() {
                unfold_transposed(&x[n * cin * h * w..][..cin * h * w], &mut col, sh, ho, wo, ld);
                // SAFETY: acc is cout x ckk, g's image n is cout x hw, col is ckk x hw with row
                // stride ld (read transposed); the buffers are distinct.
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
                        ld,
                        1.0,
                        1,
                    );
                }
            }
            acc
        })
        .collect();
    add_in_order(partials, cout * ckk)
}

/// The groups' partial sums added in group order.
fn add_in_order(partials: Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    let mut it = partials.into_iter();
    let mut dw = it.next().unwrap_or_else(|| vec![0f32; len]);
    for p in it {
        dw.iter_mut().zip(&p).for_each(|(d, v)| *d += v);
    }
    dw
}

/// [`weight_grad_rows_apart`]'s sum through [`conv_taps`], each image of a group one of its
/// "taps": per image a fused multiply-add chain over the pixels from zero, added into the
/// group's sum, as gemm does it. Both operands are laid out pixel-major for it: the output
/// gradient transposed to `[hw, cout]`, the input unfolded to `[hw, k·k·cin]`, its columns
/// tap-major so that each is a copy of one channels-last pixel; the result's columns are put
/// back in the weight's order (ci, ky, kx) at the end.
fn weight_grad_taps(x: &[f32], g: &[f32], sh: ConvShape) -> Vec<f32> {
    let ConvShape { b, cin, h, w, cout, k, .. } = sh;
    let (ho, wo) = sh.out_hw();
    let (hw, kk) = (ho * wo, k * k);
    let ckk = cin * kk;
    let partials: Vec<Vec<f32>> = (0..b.div_ceil(GROUP))
        .into_par_iter()
        .map(|grp| {
            let images = grp * GROUP..b.min((grp + 1) * GROUP);
            let mut gt = uninit(images.len() * hw * cout);
            let mut col = uninit(images.len() * hw * ckk);
            let mut xcl = uninit(h * w * cin);
            for (i, n) in images.clone().enumerate() {
                transpose(&g[n * cout * hw..][..cout * hw], cout, hw, &mut gt[i * hw * cout..][..hw * cout]);
                transpose(&x[n * cin * h * w..][..cin * h * w], cin, h * w, &mut xcl);
                unfold_tap_major(&xcl, &mut col[i * hw * ckk..][..hw * ckk], sh, ho, wo);
            }
            let taps = images.len();
            let w_offs: Vec<usize> = (0..taps).map(|t| t * hw * cout).collect();
            let offs: Vec<usize> = (0..taps).map(|t| t * hw * ckk).collect();
            let mut acc = uninit(cout * ckk);
            conv_taps::conv_taps(&gt, &w_offs, cout, hw, &col, ckk, &offs, ckk, &mut acc, false, false, conv_taps::Layout::Planar);
            acc
        })
        .collect();
    let tap_major = add_in_order(partials, cout * ckk);
    let mut dw = uninit(cout * ckk);
    for (d, s) in dw.chunks_exact_mut(ckk).zip(tap_major.chunks_exact(ckk)) {
        for (t, s) in s.chunks_exact(cin).enumerate() {
            for (ci, &v) in s.iter().enumerate() {
                d[ci * kk + t] = v;
            }
        }
    }
    dw
}

/// `dst[c][r] = src[r][c]` for a `rows x cols` matrix `src`.
fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    for (r, row) in src.chunks_exact(cols).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            dst[c * rows + r] = v;
        }
    }
}

/// `col[oy·wo + ox][(ky·k + kx)·cin + ci] = x[iy, ix, ci]` with `(iy, ix) = (oy·s + ky − p,
/// ox·s + kx − p)` (zero outside) for one image stored channels-last (`[h, w, cin]`).
fn unfold_tap_major(xcl: &[f32], col: &mut [f32], sh: ConvShape, ho: usize, wo: usize) {
    let ConvShape { cin, h, w, k, stride: s, pad: p, .. } = sh;
    for (px, row) in col.chunks_exact_mut(k * k * cin).enumerate() {
        let (oy, ox) = (px / wo, px % wo);
        debug_assert!(oy < ho);
        for (t, dst) in row.chunks_exact_mut(cin).enumerate() {
            let iy = (oy * s + t / k) as isize - p as isize;
            let ix = (ox * s + t % k) as isize - p as isize;
            if iy >= 0 && iy < h as isize && ix >= 0 && ix < w as isize {
                dst.copy_from_slice(&xcl[(iy as usize * w + ix as usize) * cin..][..cin]);
            } else {
                dst.fill(0.0);
            }
        }
    }
}

/// A row stride for `[rows, hw]` matrices that gemm reads down the columns (it gathers them
/// into panels of 64 rows, one element per row at a time): an odd number of cache lines, so
/// that consecutive rows fall in different cache sets. At the usual map sizes `hw` is a
/// multiple of 1024 bytes, and rows that far apart all compete for the few ways of one set:
/// the gather then missed the cache on every element (a quarter of a classifier step). The
/// padding is never read.
fn spread_stride(hw: usize) -> usize {
    const LINE: usize = 64 / std::mem::size_of::<f32>();
    (hw.div_ceil(LINE) | 1) * LINE
}

/// The output columns `lo..hi` (of `wo`) whose input column `ox·s + kx − p` lies inside
/// `[0, w)` for kernel column `kx`.
fn inside_cols(sh: ConvShape, kx: usize, wo: usize) -> (usize, usize) {
    let ConvShape { w, stride: s, pad: p, .. } = sh;
    let lo = p.saturating_sub(kx).div_ceil(s).min(wo);
    let hi = if w + p > kx { (w + p - kx - 1) / s + 1 } else { 0 }.clamp(lo, wo);
    (lo, hi)
}

/// `col[(ci·k + ky)·k + kx][oy·wo + ox] = x[ci, oy·s + ky − p, ox·s + kx − p]` for one image,
/// rows `ld` apart.
fn unfold_transposed(x: &[f32], col: &mut [f32], sh: ConvShape, ho: usize, wo: usize, ld: usize) {
    let ConvShape { cin, h, w, k, stride: s, pad: p, .. } = sh;
    if s == 1 && wo == w {
        return unfold_same_width(x, col, sh, ho, ld);
    }
    for ci in 0..cin {
        let plane = &x[ci * h * w..][..h * w];
        for ky in 0..k {
            for kx in 0..k {
                let row = &mut col[((ci * k + ky) * k + kx) * ld..][..ho * wo];
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
                    } else if hi > lo {
                        let ix0 = lo * s + kx - p;
                        for (d, &v) in dst[lo..hi].iter_mut().zip(src[ix0..].iter().step_by(s)) {
                            *d = v;
                        }
                    }
                }
            }
        }
    }
}

/// [`unfold_transposed`] for stride 1 and an output as wide as the input (`2p = k - 1`):
/// the rows of a kernel tap are then one shifted copy of the plane, whose entries that
/// wrapped around a row edge (one column per unit of `|kx - p|`) are zeroed afterwards.
fn unfold_same_width(x: &[f32], col: &mut [f32], sh: ConvShape, ho: usize, ld: usize) {
    let ConvShape { cin, h, w, k, pad: p, .. } = sh;
    let hw = ho * w;
    for ci in 0..cin {
        let plane = &x[ci * h * w..][..h * w];
        for ky in 0..k {
            for kx in 0..k {
                let row = &mut col[((ci * k + ky) * k + kx) * ld..][..hw];
                // Output rows oy whose input row oy + ky - p lies inside the image.
                let oy_lo = p.saturating_sub(ky).min(ho);
                let oy_hi = (h + p).saturating_sub(ky).clamp(oy_lo, ho);
                row[..oy_lo * w].fill(0.0);
                row[oy_hi * w..].fill(0.0);
                if oy_hi > oy_lo {
                    // dst index oy*w + ox reads src (oy + ky - p)*w + ox + kx - p: one offset.
                    let (dst0, dst1) = (oy_lo * w, oy_hi * w);
                    let shift = (ky * w + kx) as isize - (p * w + p) as isize;
                    // Clip the copy to the plane; the clipped entries are edge columns, zeroed below.
                    let lo = dst0.max((-shift).max(0) as usize);
                    let hi = (dst1 as isize).min((h * w) as isize - shift).max(lo as isize) as usize;
                    row[dst0..lo].fill(0.0);
                    row[hi..dst1].fill(0.0);
                    row[lo..hi].copy_from_slice(&plane[(lo as isize + shift) as usize..(hi as isize + shift) as usize]);
                    let (c_lo, c_hi) = inside_cols(sh, kx, w);
                    for oy in oy_lo..oy_hi {
                        row[oy * w..oy * w + c_lo].fill(0.0);
                        row[oy * w + c_hi..(oy + 1) * w].fill(0.0);
                    }
                }
            }
        }
    }
}

/// `dX` as `[b, cin, h, w]` from the weight `wt` (`[cout, cin, k, k]`) and the output gradient
/// `g` (`[b, cout, ho, wo]`): per image, the product `Wᵀ g` (`[cin·k·k, ho·wo]`) folded back
/// onto the input positions each column was read from, in a fixed order. Images are
/// independent tasks, so the result does not depend on the batch or the threads. Where the
/// direct kernel reproduces those bits (`input_grad_direct_applies`), it runs instead.
pub fn conv2d_input_grad(wt: &[f32], g: &[f32], sh: ConvShape) -> Vec<f32> {
    if input_grad_direct_applies(sh) {
        return input_grad_direct(wt, g, sh);
    }
    input_grad_gemm(wt, g, sh)
}

/// [`conv2d_input_grad`] through `gemm` and [`fold`].
fn input_grad_gemm(wt: &[f32], g: &[f32], sh: ConvShape) -> Vec<f32> {
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

/// Whether [`input_grad_direct`] has the bits of [`input_grad_gemm`]: where `gemm` sums each
/// entry of `Wᵀ g` ([cin·k·k, cout] by [cout, ho·wo]) in one chain over the output channels
/// ([`gemm::one_block`]), which [`fold`] then adds up tap by tap in kernel order, from zero
/// (AVX-512 or AVX2, at least 2 input channels).
fn input_grad_direct_applies(sh: ConvShape) -> bool {
    let (ho, wo) = sh.out_hw();
    conv_taps::available() && sh.cin >= 2 && gemm::one_block(sh.cin * sh.k * sh.k, ho * wo, sh.cout)
}

/// [`conv2d_input_grad`] through the direct kernel, per phase of the input: the input
/// positions `(s·a + qy, s·b + qx)` receive the taps `(ky, kx)` with `ky ≡ qy + p` and
/// `kx ≡ qx + p` (mod s), from the output gradient at `(a + (qy + p − ky) / s, b + …)`: a
/// stride-1 product over those taps, in kernel order, on a zero-padded copy of the gradient.
fn input_grad_direct(wt: &[f32], g: &[f32], sh: ConvShape) -> Vec<f32> {
    let ConvShape { b, cin, h, w, cout, k, stride: s, pad: p } = sh;
    let (ho, wo) = sh.out_hw();
    let hw = ho * wo;
    assert_eq!(wt.len(), cout * cin * k * k, "conv input grad: weight size");
    assert_eq!(g.len(), b * cout * hw, "conv input grad: gradient size");
    let mut dx = vec![0f32; b * cin * h * w];
    if dx.is_empty() {
        return dx;
    }
    // Per phase: its size, its taps (ky, kx, dy, dx) with the output offset (dy, dx).
    struct Phase {
        q: (usize, usize),
        size: (usize, usize),
        taps: Vec<(usize, usize, isize, isize)>,
    }
    let shift = |q: usize, t: usize| (q as isize + p as isize - t as isize).rem_euclid(s as isize) == 0;
    let offset = |q: usize, t: usize| (q as isize + p as isize - t as isize).div_euclid(s as isize);
    let phases: Vec<Phase> = (0..s * s)
        .map(|i| {
            let q = (i / s, i % s);
            let size = (h.saturating_sub(q.0).div_ceil(s), w.saturating_sub(q.1).div_ceil(s));
            let taps = (0..k * k)
                .map(|t| (t / k, t % k))
                .filter(|&(ky, kx)| shift(q.0, ky) && shift(q.1, kx))
                .map(|(ky, kx)| (ky, kx, offset(q.0, ky), offset(q.1, kx)))
                .collect();
            Phase { q, size, taps }
        })
        .collect();
    // One zero-padded gradient grid serves every phase.
    let (lo_y, lo_x) = phases.iter().flat_map(|ph| &ph.taps).fold((0, 0), |(y, x), t| (y.min(t.2), x.min(t.3)));
    let (hi_y, hi_x) = phases.iter().flat_map(|ph| ph.taps.iter().map(move |t| (ph.size.0 as isize + t.2, ph.size.1 as isize + t.3))).fold((0, 0), |(y, x), t| (y.max(t.0), x.max(t.1)));
    let (top, left) = ((-lo_y) as usize, (-lo_x) as usize);
    let (gh, gw) = (top + (ho as isize).max(hi_y) as usize, left + (wo as isize).max(hi_x) as usize);
    // A stride-1 grid: one phase, the padded gradient itself.
    let grid = Phases::new(gh, gw, 1, k);
    let (rows, cols): (Vec<usize>, Vec<usize>) = ((0..ho).collect(), (0..wo).collect());
    // Per phase: its packed weight, and each tap's weight and gradient offsets.
    let products: Vec<(Lines, Vec<usize>, Vec<usize>)> = phases
        .iter()
        .map(|ph| {
            let packed = conv_taps::pack_taps(wt, cin, cout, ph.taps.len(), |t| (ph.taps[t].0 * k + ph.taps[t].1, k * k, cin * k * k));
            let w_offs = (0..ph.taps.len()).map(|t| t * cout * cin).collect();
            let offs = ph.taps.iter().map(|t| grid.tap((top as isize + t.2) as usize, (left as isize + t.3) as usize)).collect();
            (packed, w_offs, offs)
        })
        .collect();
    let n_max = phases.iter().map(|ph| ph.size.0 * gw).max().unwrap_or(0);
    dx.par_chunks_mut(cin * h * w).zip(g.par_chunks(cout * hw)).for_each_init(
        // The padded gradient's border is zeroed once and never written.
        || (vec![0f32; cout * grid.plane + grid.slack], uninit(cin * n_max)),
        |(gp, ext), (dxn, gn)| {
            for (src, plane) in gn.chunks_exact(hw).zip(gp.chunks_exact_mut(grid.plane)) {
                grid.fill(src, wo, &rows, &cols, top, left, plane);
            }
            for (ph, (wp, w_offs, offs)) in phases.iter().zip(&products) {
                let (ha, wb) = ph.size;
                if ha == 0 || wb == 0 || ph.taps.is_empty() {
                    continue;
                }
                let n = ha * gw;
                conv_taps::conv_taps(wp, w_offs, cin, cout, gp, grid.plane, offs, n, &mut ext[..cin * n], false, false, conv_taps::Layout::Planar);
                for (ci, e) in ext[..cin * n].chunks_exact(n).enumerate() {
                    let dplane = &mut dxn[ci * h * w..][..h * w];
                    for a in 0..ha {
                        let row = &mut dplane[(s * a + ph.q.0) * w..][..w];
                        for (bb, &v) in e[a * gw..a * gw + wb].iter().enumerate() {
                            row[s * bb + ph.q.1] = v;
                        }
                    }
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        // Magnitudes over several binades, so a changed order of summation changes the bits.
        (0..n)
            .map(|i| {
                let j = i * 7919 + seed * 104_729;
                ((j % 1013) as f32 - 506.0) * (1.0 + (j % 13) as f32 * 3.7).powi((j % 5) as i32 - 2)
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn shape(b: usize, cin: usize, h: usize, w: usize, cout: usize, k: usize, stride: usize, pad: usize) -> ConvShape {
        ConvShape { b, cin, h, w, cout, k, stride, pad }
    }

    /// On a CPU with AVX-512 or AVX2: `run(shape)` gives (whether the direct kernel takes the shape, the
    /// result, gemm's result); the first must match each case's flag, the others every bit.
    fn assert_direct_bits(what: &str, cases: &[(ConvShape, bool)], run: impl Fn(ConvShape) -> (bool, Vec<f32>, Vec<f32>)) {
        if !conv_taps::available() {
            eprintln!("skipped: this CPU has neither AVX-512 nor AVX2 with FMA, where the direct {what} never runs");
            return;
        }
        for &(sh, direct) in cases {
            let (applies, got, want) = run(sh);
            assert_eq!(applies, direct, "{what}, {sh:?}: whether the direct kernel applies");
            assert_eq!(got.len(), want.len());
            let diff = got.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            assert_eq!(diff, 0, "{what}, {sh:?}: {diff} of {} values differ from gemm's", got.len());
        }
    }

    #[test]
    fn direct_product_has_the_bits_of_gemm_over_the_unfolded_input() {
        let s = shape;
        // (shape, whether the direct kernel takes it)
        let cases = [
            // A small ResNet's convolutions: the stem (depth 27), a stage, the strided and the
            // 1x1 shortcut convolution (which stays with gemm), and a 64-channel 8x8 map whose
            // depth of 576 gemm sums in blocks of 512 and 64.
            (s(3, 3, 32, 32, 16, 3, 1, 1), true),
            (s(2, 16, 32, 32, 16, 3, 1, 1), true),
            (s(2, 16, 32, 32, 32, 3, 2, 1), true),
            (s(2, 16, 32, 32, 32, 1, 2, 0), false),
            (s(2, 64, 8, 8, 64, 3, 1, 1), true),
            (s(1, 64, 8, 8, 64, 3, 1, 1), true),
            // 2 160 rows in blocks of 512 (and 112), over 64 KiB of weights per register tile:
            // the kernel runs one block at a time.
            (s(1, 240, 8, 8, 20, 3, 1, 1), true),
            // Odd sizes, a 7x7 stride-2 stem, an output grid as wide as the output (no
            // padding, stride 2), and products gemm takes elsewhere: 1x1, one output channel,
            // at most 256 outputs.
            (s(2, 5, 7, 13, 5, 3, 1, 1), true),
            (s(2, 3, 23, 24, 8, 7, 2, 3), true),
            (s(1, 4, 9, 9, 6, 3, 1, 0), true),
            (s(2, 6, 24, 24, 8, 2, 2, 0), true),
            (s(1, 3, 1, 257, 2, 1, 1, 0), false),
            (s(1, 4, 9, 9, 5, 3, 1, 0), false),
            (s(1, 3, 3, 259, 1, 3, 1, 1), false),
            (s(2, 2, 2, 129, 2, 1, 2, 0), false),
            (s(2, 3, 4, 65, 2, 3, 1, 1), true),
            // Beyond 64 x 64 and 512 deep gemm's blocks depend on the cache: gemm stays.
            (s(1, 64, 16, 16, 64, 3, 1, 1), false),
            (s(1, 1, 1, 512, 64, 1, 1, 0), false),
        ];
        assert_direct_bits("product", &cases, |sh| {
            let x = values(sh.b * sh.cin * sh.h * sh.w, 3);
            let wt = values(sh.cout * sh.cin * sh.k * sh.k, 4);
            (direct_block(sh).is_some(), conv2d_unfolded(&x, &wt, sh), conv2d_gemm(&x, &wt, sh))
        });
    }

    #[test]
    fn direct_input_gradient_has_the_bits_of_gemm_and_fold() {
        let s = shape;
        let cases = [
            // A small ResNet's strided and 1x1 shortcut convolutions, at even and odd sizes.
            (s(2, 16, 32, 32, 32, 3, 2, 1), true),
            (s(2, 32, 16, 16, 64, 3, 2, 1), true),
            (s(2, 16, 32, 32, 32, 1, 2, 0), true),
            (s(1, 8, 15, 13, 12, 3, 2, 1), true),
            (s(2, 5, 17, 16, 6, 1, 2, 0), true),
            // A 7x7 stride-2 stem, stride 3, stride 1 without padding.
            (s(1, 3, 24, 23, 8, 7, 2, 3), true),
            (s(1, 4, 20, 20, 5, 3, 3, 1), true),
            (s(1, 4, 12, 12, 5, 3, 1, 0), true),
            // gemm's other kernels: 2 output channels (too shallow), few entries.
            (s(1, 4, 16, 16, 2, 3, 2, 1), false),
            (s(1, 2, 4, 4, 4, 3, 2, 1), false),
        ];
        assert_direct_bits("input gradient", &cases, |sh| {
            let (ho, wo) = sh.out_hw();
            let wt = values(sh.cout * sh.cin * sh.k * sh.k, 5);
            let g = values(sh.b * sh.cout * ho * wo, 6);
            (input_grad_direct_applies(sh), conv2d_input_grad(&wt, &g, sh), input_grad_gemm(&wt, &g, sh))
        });
    }

    #[test]
    fn weight_gradient_is_the_same_bits_as_the_row_layout_and_close_to_the_sum() {
        let shapes = [
            // A stem (depth 27, not a multiple of the vector width), strided and 1x1 layers,
            // and a ResNet-50-sized map whose row stride is not a power of two.
            ConvShape { b: 5, cin: 3, h: 32, w: 32, cout: 16, k: 3, stride: 1, pad: 1 },
            ConvShape { b: 9, cin: 16, h: 32, w: 32, cout: 32, k: 3, stride: 2, pad: 1 },
            ConvShape { b: 4, cin: 32, h: 16, w: 16, cout: 64, k: 1, stride: 2, pad: 0 },
            ConvShape { b: 2, cin: 64, h: 56, w: 56, cout: 64, k: 3, stride: 1, pad: 1 },
            ConvShape { b: 3, cin: 8, h: 7, w: 5, cout: 5, k: 3, stride: 1, pad: 1 },
            // The direct kernel's shapes (a depth of 3 to 512 pixels): a UNet's 4x4 and 8x8
            // maps in a partial group, the largest depth, and a product of at most 256
            // outputs, which gemm sums in other kernels and so stays with gemm.
            ConvShape { b: 6, cin: 128, h: 4, w: 4, cout: 128, k: 3, stride: 1, pad: 1 },
            ConvShape { b: 5, cin: 64, h: 8, w: 8, cout: 24, k: 3, stride: 1, pad: 1 },
            ConvShape { b: 2, cin: 6, h: 16, w: 32, cout: 9, k: 3, stride: 1, pad: 1 },
            ConvShape { b: 3, cin: 6, h: 6, w: 6, cout: 4, k: 3, stride: 1, pad: 1 },
        ];
        for sh in shapes {
            let (ho, wo) = sh.out_hw();
            let x = values(sh.b * sh.cin * sh.h * sh.w, 1);
            let g = values(sh.b * sh.cout * ho * wo, 2);
            let got = conv2d_weight_grad(&x, &g, sh);
            // gemm over contiguous rows, as the gradient was first written: neither the padding
            // of the rows nor the direct kernel may change a bit.
            let want = weight_grad_rows_apart(&x, &g, sh, ho * wo);
            assert!(
                got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{sh:?}: weight gradient bits differ from gemm's over contiguous rows"
            );
            // And the value itself, summed in f64 straight from the definition.
            let (s, p, k) = (sh.stride as isize, sh.pad as isize, sh.k);
            for co in [0, sh.cout - 1] {
                for ci in [0, sh.cin / 2] {
                    for (ky, kx) in [(0, 0), (k / 2, k - 1)] {
                        let mut sum = 0f64;
                        let mut mag = 0f64;
                        for n in 0..sh.b {
                            for oy in 0..ho {
                                for ox in 0..wo {
                                    let iy = oy as isize * s + ky as isize - p;
                                    let ix = ox as isize * s + kx as isize - p;
                                    if iy < 0 || ix < 0 || iy >= sh.h as isize || ix >= sh.w as isize {
                                        continue;
                                    }
                                    let xv = x[((n * sh.cin + ci) * sh.h + iy as usize) * sh.w + ix as usize] as f64;
                                    let gv = g[((n * sh.cout + co) * ho + oy) * wo + ox] as f64;
                                    sum += xv * gv;
                                    mag += (xv * gv).abs();
                                }
                            }
                        }
                        let v = got[((co * sh.cin + ci) * k + ky) * k + kx] as f64;
                        assert!((v - sum).abs() <= 1e-5 * mag + 1e-30, "{sh:?} dW[{co},{ci},{ky},{kx}] = {v}, sum {sum}");
                    }
                }
            }
        }
    }
}
