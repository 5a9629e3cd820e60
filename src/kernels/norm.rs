//! GroupNorm (+ SiLU), one task per (batch element, group); BatchNorm's training statistics and
//! backward, one task per channel or channel plane; a per-channel affine map (+ ReLU), which is
//! BatchNorm's normalisation in training (centred on the batch mean) and in evaluation (a
//! folded scale and shift).
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
        // Closures do not take the target features of the function they are inlined into:
        // without `inline(always)` the vector one was compiled for the baseline x86-64, where
        // every lane's `mul_add` calls the C library's `fmaf`.
        if silu {
            map_into::<V>(s, d, #[inline(always)] |x| silu_v(x.sub(V::splat(mean)).fma(V::splat(a), V::splat(bb))), #[inline(always)] |x| {
                silu_v(x.sub(S1(mean)).fma(S1(a), S1(bb)))
            });
        } else {
            map_into::<V>(s, d, #[inline(always)] |x| x.sub(V::splat(mean)).fma(V::splat(a), V::splat(bb)), #[inline(always)] |x| x.sub(S1(mean)).fma(S1(a), S1(bb)));
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

/// `x` [b, c, h, w] (any rank with the channels second) `* scale[c] + shift[c]`, rounded after
/// the product and after the sum like two broadcast ops, then `max(., 0)` when `relu`
/// ([`channel_affine`] without a centre).
pub fn scale_shift_channels(x: &Tensor, scale: &Tensor, shift: &Tensor, relu: bool) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    if dims.len() < 2 {
        return Err(Error::invalid(format!("scale_shift_channels: input {dims:?} has no channel axis")));
    }
    let c = dims[1];
    check_per_channel("scale_shift_channels", "scale", Some(scale), c)?;
    check_per_channel("scale_shift_channels", "shift", Some(shift), c)?;
    let plane: usize = dims[2..].iter().product();
    let out = with_slices(&[x, scale, shift], |s| channel_affine(s[0], c, plane, None, s[1], s[2], relu))?;
    tensor(out, &dims)
}

/// Lanes of the batch-norm sums: each plane is summed in 4096-element blocks of 16 f32 lanes
/// (the lanes and the tail then added in order, each block's sum accumulated in f64), with
/// separate multiplies and adds, so every CPU gives the same bits.
const BN_LANES: usize = 16;
const BN_BLOCK: usize = 4096;

/// The sum of `f` over the elements of the equally long `inputs`, in the fixed order
/// described at [`BN_LANES`]: `fv` on 16-lane vectors (`V`, 16 lanes), `fs` on the tail's
/// single lanes, both the same arithmetic. One sum per pass: with two accumulators in one loop
/// the compiler paired lane l of each into a vector instead of making vectors of the lanes.
#[inline(always)]
fn bn_sum<V: Vf, const N: usize>(inputs: [&[f32]; N], fv: impl Fn([V; N]) -> V, fs: impl Fn([S1; N]) -> S1) -> f64 {
    assert_eq!(V::N, BN_LANES, "batch-norm sums run on 16-lane vectors");
    let n = inputs[0].len();
    assert!(inputs.iter().all(|x| x.len() == n), "batch-norm sums: inputs of different lengths");
    let mut total = 0f64;
    for start in (0..n).step_by(BN_BLOCK) {
        let end = (start + BN_BLOCK).min(n);
        let body = start + (end - start) / BN_LANES * BN_LANES;
        let mut acc = V::splat(0.0);
        for i in (start..body).step_by(BN_LANES) {
            // SAFETY: i + 16 <= body <= n, the length of every input.
            acc = acc.add(fv(std::array::from_fn(|j| unsafe { V::load(inputs[j].as_ptr().add(i)) })));
        }
        let mut sum = 0f32;
        for u in acc.lanes() {
            sum += u;
        }
        for i in body..end {
            sum += fs(std::array::from_fn(|j| S1(inputs[j][i]))).0;
        }
        total += sum as f64;
    }
    total
}

/// (x - mean)² per lane.
#[inline(always)]
fn centred_square<W: Vf>(x: W, mean: f32) -> W {
    let d = x.sub(W::splat(mean));
    d.mul(d)
}

#[inline(always)]
fn bn_plane_sum_imp<V: Vf>(x: &[f32]) -> f64 {
    bn_sum::<V, 1>(
        [x],
        #[inline(always)]
        |[v]| v,
        #[inline(always)]
        |[v]| v,
    )
}
dispatch!(fn bn_plane_sum(x: &[f32]) -> f64 => bn_plane_sum_imp);

#[inline(always)]
fn bn_plane_squares_imp<V: Vf>(x: &[f32], mean: f32) -> f64 {
    bn_sum::<V, 1>(
        [x],
        #[inline(always)]
        |[v]| centred_square(v, mean),
        #[inline(always)]
        |[v]| centred_square(v, mean),
    )
}
dispatch!(fn bn_plane_squares(x: &[f32], mean: f32) -> f64 => bn_plane_squares_imp);

/// dy, or 0 where `relu` and y <= 0 (y below the smallest positive float: the same lanes, NaN
/// kept).
#[inline(always)]
fn relu_masked<W: Vf>(g: W, y: W, relu: bool) -> W {
    if relu {
        g.zero_where_lt(y, f32::from_bits(1))
    } else {
        g
    }
}

/// The masked dy times (x - mean) per lane.
#[inline(always)]
fn masked_centred<W: Vf>(g: W, x: W, y: W, relu: bool, mean: f32) -> W {
    relu_masked(g, y, relu).mul(x.sub(W::splat(mean)))
}

#[inline(always)]
fn bn_grad_sums_imp<V: Vf>(dy: &[f32], x: &[f32], y: &[f32], relu: bool, mean: f32) -> (f64, f64) {
    // (Σ dy, Σ dy (x - mean)), dy zeroed where the ReLU output is 0.
    let grad = bn_sum::<V, 2>(
        [dy, y],
        #[inline(always)]
        |[g, yv]| relu_masked(g, yv, relu),
        #[inline(always)]
        |[g, yv]| relu_masked(g, yv, relu),
    );
    let centred = bn_sum::<V, 3>(
        [dy, x, y],
        #[inline(always)]
        |[g, xv, yv]| masked_centred(g, xv, yv, relu, mean),
        #[inline(always)]
        |[g, xv, yv]| masked_centred(g, xv, yv, relu, mean),
    );
    (grad, centred)
}
dispatch!(fn bn_grad_sums(dy: &[f32], x: &[f32], y: &[f32], relu: bool, mean: f32) -> (f64, f64) => bn_grad_sums_imp);

/// Per channel of `x` [n, c, hw]: the batch mean (rounded to f32) and the biased variance
/// about it, `Σ (x - mean)² / (n·hw)`. One task per channel; the planes are summed in batch
/// order, so the result does not depend on the thread count.
pub fn batch_norm_stats(x: &[f32], n: usize, c: usize, hw: usize) -> Vec<(f32, f64)> {
    assert_eq!(x.len(), n * c * hw, "batch_norm_stats: input size");
    let count = (n * hw) as f64;
    let planes = |ch: usize| (0..n).map(move |b| &x[(b * c + ch) * hw..][..hw]);
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let mean = (planes(ch).map(bn_plane_sum).sum::<f64>() / count) as f32;
            (mean, planes(ch).map(|p| bn_plane_squares(p, mean)).sum::<f64>() / count)
        })
        .collect()
}

/// `y = (x - centre[ch]) · scale[ch] + shift[ch]` over `x` [n, c, plane] (without `centre`,
/// `x · scale[ch] + shift[ch]`), then `max(y, 0)` when `relu`; one task per plane.
pub fn channel_affine(x: &[f32], c: usize, plane: usize, centre: Option<&[f32]>, scale: &[f32], shift: &[f32], relu: bool) -> Vec<f32> {
    let mut out = uninit(x.len());
    if plane > 0 {
        out.par_chunks_mut(plane).zip(x.par_chunks(plane)).enumerate().for_each(|(p, (dst, src))| {
            let ch = p % c;
            let (m, a, t) = (centre.map(|m| m[ch]), scale[ch], shift[ch]);
            for (d, &v) in dst.iter_mut().zip(src) {
                let y = match m {
                    Some(m) => (v - m) * a + t,
                    None => v * a + t,
                };
                *d = if relu { y.max(0.0) } else { y };
            }
        });
    }
    out
}

/// Batch norm's backward over `x` [n, c, hw] with the statistics of [`batch_norm_stats`]
/// (`rstd = 1 / sqrt(var + eps)`), for the output gradient `dy`, masked where the output `y`
/// is 0 when the layer ends in a ReLU. Returns (dx, dgamma, dbeta):
/// dbeta = Σ dy, dgamma = Σ dy · xhat, dx = gamma · rstd / m · (m dy - dbeta - xhat dgamma)
/// with xhat = (x - mean) rstd and m = n·hw. Sums one task per channel, dx one per plane.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_backward(x: &[f32], dy: &[f32], y: &[f32], relu: bool, n: usize, c: usize, hw: usize, mean: &[f32], rstd: &[f64], gamma: &[f32]) -> (Vec<f32>, Vec<f64>, Vec<f64>) {
    assert!(x.len() == n * c * hw && dy.len() == x.len() && y.len() == x.len(), "batch_norm_backward: sizes");
    let count = (n * hw) as f64;
    let sums: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let (mut dbeta, mut dcentred) = (0f64, 0f64);
            for b in 0..n {
                let r = (b * c + ch) * hw..(b * c + ch + 1) * hw;
                let (s, t) = bn_grad_sums(&dy[r.clone()], &x[r.clone()], &y[r], relu, mean[ch]);
                dbeta += s;
                dcentred += t;
            }
            (dcentred * rstd[ch], dbeta)
        })
        .collect();
    let mut dx = uninit(x.len());
    if hw > 0 {
        dx.par_chunks_mut(hw).enumerate().for_each(|(p, dst)| {
            let ch = p % c;
            let (dgamma, dbeta) = sums[ch];
            let gr = gamma[ch] as f64 * rstd[ch];
            let (a, d, e) = (gr as f32, (gr * rstd[ch] * dgamma / count) as f32, (gr * dbeta / count) as f32);
            let m = mean[ch];
            let r = p * hw..(p + 1) * hw;
            for ((o, (&g, &xv)), &yv) in dst.iter_mut().zip(dy[r.clone()].iter().zip(&x[r.clone()])).zip(&y[r]) {
                let g = if relu && yv <= 0.0 { 0.0 } else { g };
                *o = (a * g - d * (xv - m)) - e;
            }
        });
    }
    let (dgamma, dbeta) = sums.into_iter().unzip();
    (dx, dgamma, dbeta)
}

/// candle's contiguous last-dim sum (`sum_keepdim` over the last dim calls this per row): the
/// same function, so the same order and bits on every CPU.
#[inline(always)]
fn candle_row_sum(row: &[f32]) -> f32 {
    use candle_core::cpu::kernels::VecOps;
    let mut s = 0f32;
    // SAFETY: `row` holds `row.len()` values and `s` is a valid destination.
    unsafe { f32::vec_reduce_sum(row.as_ptr(), &mut s, row.len()) };
    s
}

/// A row's statistics as the composed norms compute them: `mean = sum * (1/n)`, the
/// centred values, `std = sqrt(sum(xc²) * (1/n) + eps)` (each scalar step an f32 affine).
#[inline(always)]
fn exact_row_stats(x: &[f32], xc: &mut [f32], eps: f32) -> f32 {
    let inv_n = (1.0 / x.len() as f64) as f32;
    let mean = candle_row_sum(x) * inv_n + 0.0;
    for (c, &v) in xc.iter_mut().zip(x) {
        *c = v - mean;
    }
    let sq: Vec<f32> = xc.iter().map(|&c| c * c).collect();
    let var = candle_row_sum(&sq) * inv_n + 0.0;
    (var * 1.0 + eps).sqrt()
}

/// The gradient of GroupNorm's normalisation (before the affine) for one row (a batch
/// element's group), given the row's centred values and std ([`exact_row_stats`]) and the
/// output's gradient `g`, into `d`: the bytes of candle 0.11's backward through the composition
/// `nn::GroupNorm::forward_composed` uses (row sums, scalar affines, `sqr`, `sqrt`, a broadcast
/// subtraction and division; `backprop.rs`), step for step. The
/// division gives `grad / std` to the centred values and `-(grad * xc) / (std * std)` to the
/// broadcast std, summed per row; `sqrt` gives `(g / std) * 0.5`; the affines scale by their
/// factor; `sqr` gives `(xc * g) * 2`; the subtraction gives the centred values' gradient to
/// the input and its negation, summed, to the mean. Each accumulation starts from candle's
/// zero tensor (`0 + a`), which also fixes the sign of zero results.
#[inline(always)]
fn normalize_row_backward(xc: &[f32], std: f32, g: &[f32], d: &mut [f32]) {
    let inv_n = (1.0 / xc.len() as f64) as f32;
    let std_sq = std * std;
    // The broadcast std's gradient, then its row sum.
    let mut tmp: Vec<f32> = g.iter().zip(xc).map(|(&g, &c)| 0.0 - (g * c) / std_sq).collect();
    let std_grad = 0.0 + candle_row_sum(&tmp);
    // Back through sqrt, `+ eps` (factor 1) and `* (1/n)` to the squares' row sum.
    let ve_grad = 0.0 + ((std_grad / std) * 0.5 + 0.0);
    let var_grad = 0.0 + (ve_grad * 1.0 + 0.0);
    let sq_sum_grad = 0.0 + (var_grad * inv_n + 0.0);
    // The centred values' gradient (from the division and from the square) in `d`.
    for (((d, &g), &c), t) in d.iter_mut().zip(g).zip(xc).zip(tmp.iter_mut()) {
        *d = (0.0 + g / std) + ((c * sq_sum_grad) * 2.0 + 0.0);
        *t = 0.0 - *d;
    }
    let mean_grad = 0.0 + candle_row_sum(&tmp);
    let sum_grad = 0.0 + (mean_grad * inv_n + 0.0);
    for d in d.iter_mut() {
        *d = (0.0 + *d) + sum_grad;
    }
}

/// The shape of a training GroupNorm's input: `[batch, channels, inner]` (inner = H·W), its
/// channels split into `groups` of consecutive channels.
#[derive(Clone, Copy, Debug)]
pub struct GroupShape {
    pub channels: usize,
    pub groups: usize,
    pub inner: usize,
}

impl GroupShape {
    /// Values per row (one batch element's group).
    fn row(&self) -> usize {
        self.channels / self.groups * self.inner
    }

    /// The first channel of row `r`.
    fn first_channel(&self, r: usize) -> usize {
        r % self.groups * (self.channels / self.groups)
    }
}

/// A row's normalised values `xc / std` (the broadcast division's bits), into `out`.
#[inline(always)]
fn normalize_row(xc: &[f32], std: f32, out: &mut [f32]) {
    for (o, &c) in out.iter_mut().zip(xc) {
        *o = c / std;
    }
}

/// A row's normalised values ([`normalize_row`]; into `xn` too, when given), then the affine
/// `· w[c] + b[c]`, into `a`; each step rounded once, like the broadcast ops it stands for.
#[inline(always)]
fn affine_row(xc: &[f32], std: f32, w: &[f32], b: &[f32], inner: usize, xn: Option<&mut [f32]>, a: &mut [f32]) {
    normalize_row(xc, std, a);
    if let Some(xn) = xn {
        xn.copy_from_slice(a);
    }
    for ((a, &wc), &bc) in a.chunks_exact_mut(inner).zip(w).zip(b) {
        for a in a {
            *a = *a * wc + bc;
        }
    }
}

/// GroupNorm with its affine, then SiLU when `silu`, for training: the bits of the candle ops
/// `nn::GroupNorm::forward_composed` is made of (row sums, scalar affines, `sqr`, `sqrt`, a
/// broadcast subtraction and division), a per-channel product and sum
/// ([`super::channel::channel_map`]) and [`super::activation::silu_exact`] in sequence, in one
/// pass per (batch element, group).
pub fn group_norm_exact(x: &[f32], w: &[f32], b: &[f32], shape: GroupShape, eps: f64, silu: bool) -> Vec<f32> {
    let n = shape.row();
    let mut out = uninit(x.len());
    if n == 0 {
        return out;
    }
    out.par_chunks_mut(n).zip(x.par_chunks(n)).enumerate().for_each(|(r, (o, x))| {
        let c0 = shape.first_channel(r);
        exact_row(x, &w[c0..], &b[c0..], shape.inner, eps as f32, silu, o);
    });
    out
}

/// One row of [`group_norm_exact`] into `o`.
#[inline(always)]
fn exact_row_imp<V: Vf>(x: &[f32], w: &[f32], b: &[f32], inner: usize, eps: f32, silu: bool, o: &mut [f32]) {
    let n = x.len();
    let mut xc = vec![0f32; n];
    let std = exact_row_stats(x, &mut xc, eps);
    if silu {
        let mut a = uninit(n);
        affine_row(&xc, std, w, b, inner, None, &mut a);
        super::activation::silu_exact_into(&a, o);
    } else {
        affine_row(&xc, std, w, b, inner, None, o);
    }
}
// Compiled for the CPU's vector width (the loops are plain per-element arithmetic, so any width
// gives the same bits; the default build had them in 4-lane SSE).
dispatch!(fn exact_row(x: &[f32], w: &[f32], b: &[f32], inner: usize, eps: f32, silu: bool, o: &mut [f32]) => exact_row_imp);

/// The input's gradient and, when asked for, the weight's and the bias's.
pub type GroupNormGrads = (Vec<f32>, Option<(Vec<f32>, Vec<f32>)>);

/// The gradients of [`group_norm_exact`] (output `y`, output gradient `grad`): the input's, and
/// the weight's and bias's when `params`, with the bits of the composition's backward in
/// candle 0.11 — including its accumulation of every intermediate gradient into a zero tensor
/// (`0 + g`, which turns -0 into +0) — so the layer trains to the same bytes as the four ops it
/// replaces.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_exact_backward(x: &[f32], y: &[f32], grad: &[f32], w: &[f32], b: &[f32], shape: GroupShape, eps: f64, silu: bool, params: bool) -> GroupNormGrads {
    let n = shape.row();
    let mut dx = uninit(x.len());
    if n == 0 {
        return (dx, params.then(|| (vec![0.0; w.len()], vec![0.0; b.len()])));
    }
    // The gradient reaching the affine's output (through SiLU when there is one) and the
    // normalised values, whole, for the weight's and bias's sums over the batch.
    let mut ga = if silu && params { uninit(x.len()) } else { Vec::new() };
    let mut xn = if params { uninit(x.len()) } else { Vec::new() };
    let (ga_rows, xn_rows) = (ga.par_chunks_mut(n), xn.par_chunks_mut(n));
    let rows = dx.par_chunks_mut(n).zip(x.par_chunks(n).zip(y.par_chunks(n)).zip(grad.par_chunks(n))).enumerate();
    let body = |r: usize, d: &mut [f32], x: &[f32], y: &[f32], g: &[f32], ga: Option<&mut [f32]>, xn: Option<&mut [f32]>| {
        let c0 = shape.first_channel(r);
        exact_row_backward(x, y, g, &w[c0..], &b[c0..], shape.inner, eps as f32, silu, d, ga, xn);
    };
    match (params, silu) {
        (true, true) => rows.zip(ga_rows.zip(xn_rows)).for_each(|((r, (d, ((x, y), g))), (ga, xn))| body(r, d, x, y, g, Some(ga), Some(xn))),
        (true, false) => rows.zip(xn_rows).for_each(|((r, (d, ((x, y), g))), xn)| body(r, d, x, y, g, None, Some(xn))),
        (false, _) => rows.for_each(|(r, (d, ((x, y), g)))| body(r, d, x, y, g, None, None)),
    }
    let sums = params.then(|| {
        let ga: &[f32] = if silu { &ga } else { grad };
        (super::channel::channel_sums_of_products(ga, &xn, shape.channels, shape.inner), super::channel::channel_sums(ga, shape.channels, shape.inner))
    });
    (dx, sums)
}

/// One row of [`group_norm_exact_backward`]: the input's gradient into `d`, and when given,
/// the gradient reaching the affine's output into `ga` and the normalised values into `xn`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn exact_row_backward_imp<V: Vf>(
    x: &[f32],
    y: &[f32],
    g: &[f32],
    w: &[f32],
    b: &[f32],
    inner: usize,
    eps: f32,
    silu: bool,
    d: &mut [f32],
    ga: Option<&mut [f32]>,
    xn: Option<&mut [f32]>,
) {
    let n = x.len();
    let mut xc = vec![0f32; n];
    let std = exact_row_stats(x, &mut xc, eps);
    // The gradient reaching the affine's output: through SiLU, from the affine's output
    // recomputed (candle accumulates it into a zero: `+ 0`), or straight from the output.
    let mut row = uninit(n);
    if silu {
        let mut a = uninit(n);
        affine_row(&xc, std, w, b, inner, xn, &mut a);
        super::activation::silu_exact_backward_into(&a, y, g, &mut row);
        row.iter_mut().for_each(|v| *v += 0.0);
    } else {
        if let Some(xn) = xn {
            normalize_row(&xc, std, xn);
        }
        row.copy_from_slice(g);
    }
    if let Some(ga) = ga {
        ga.copy_from_slice(&row);
    }
    // Through the product: the normalised values' gradient, accumulated into a zero.
    for (ch, v) in row.chunks_exact_mut(inner).enumerate() {
        let wc = w[ch];
        v.iter_mut().for_each(|v| *v = 0.0 + *v * wc);
    }
    normalize_row_backward(&xc, std, &row, d);
}
dispatch!(#[allow(clippy::too_many_arguments)] fn exact_row_backward(x: &[f32], y: &[f32], g: &[f32], w: &[f32], b: &[f32], inner: usize, eps: f32, silu: bool, d: &mut [f32], ga: Option<&mut [f32]>, xn: Option<&mut [f32]>) => exact_row_backward_imp);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::simd::A16;

    /// The order documented at [`BN_LANES`], one scalar at a time.
    fn reference(n: usize, f: impl Fn(usize) -> (f32, f32)) -> (f64, f64) {
        let mut total = (0f64, 0f64);
        for start in (0..n).step_by(BN_BLOCK) {
            let end = (start + BN_BLOCK).min(n);
            let body = start + (end - start) / BN_LANES * BN_LANES;
            let (mut a, mut b) = ([0f32; BN_LANES], [0f32; BN_LANES]);
            for i in start..body {
                let (u, v) = f(i);
                a[i % BN_LANES] += u;
                b[i % BN_LANES] += v;
            }
            let (mut sa, mut sb) = (0f32, 0f32);
            for l in 0..BN_LANES {
                sa += a[l];
                sb += b[l];
            }
            for i in body..end {
                let (u, v) = f(i);
                sa += u;
                sb += v;
            }
            total.0 += sa as f64;
            total.1 += sb as f64;
        }
        total
    }

    /// Values over several binades, so that any change of order shows in the bits.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed.wrapping_mul(40_503));
                ((h >> 8) as f32 / (1 << 24) as f32 - 0.5) * (1.0 + (h % 7) as f32 * 10.0)
            })
            .collect()
    }

    #[test]
    fn training_group_norm_rows_give_the_same_bits_on_every_instantiation() {
        // A row of 2 channels x 37 values (vector body and tail), offset so that the centring is
        // lossy: the dispatched instantiation (AVX2 or AVX-512 where present) against the
        // portable one compiled for the baseline x86-64.
        let (inner, n) = (37, 74);
        let x: Vec<f32> = values(n, 4).iter().map(|v| v * 3.0 + 5.0).collect();
        let (w, b, y, g) = (values(2, 5), values(2, 6), values(n, 7), values(n, 8));
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for silu in [false, true] {
            let (mut got, mut want) = (vec![0f32; n], vec![0f32; n]);
            exact_row(&x, &w, &b, inner, 1e-5, silu, &mut got);
            exact_row_imp::<A16>(&x, &w, &b, inner, 1e-5, silu, &mut want);
            assert_eq!(bits(&got), bits(&want), "forward, silu {silu}");
            let mut got = [vec![0f32; n], vec![0f32; n], vec![0f32; n]];
            let mut want = got.clone();
            let [d, ga, xn] = &mut got;
            exact_row_backward(&x, &y, &g, &w, &b, inner, 1e-5, silu, d, Some(ga), Some(xn));
            let [d, ga, xn] = &mut want;
            exact_row_backward_imp::<A16>(&x, &y, &g, &w, &b, inner, 1e-5, silu, d, Some(ga), Some(xn));
            for (what, got, want) in [("dx", &got[0], &want[0]), ("affine grad", &got[1], &want[1]), ("normalised", &got[2], &want[2])] {
                assert_eq!(bits(got), bits(want), "backward {what}, silu {silu}");
            }
        }
    }

    #[test]
    fn batch_norm_sums_follow_the_documented_order_to_the_bit() {
        let bits = |(a, b): (f64, f64)| (a.to_bits(), b.to_bits());
        for n in [0, 1, 15, 16, 17, 100, 4096, 4096 + 37, 10_000] {
            let (dy, x) = (values(n, 1), values(n, 2));
            let mut y = values(n, 3);
            // The ReLU mask's edge cases: zeros of both signs, the smallest positive float.
            for (i, v) in y.iter_mut().enumerate() {
                match i % 5 {
                    0 => *v = 0.0,
                    1 => *v = -0.0,
                    2 => *v = f32::from_bits(1),
                    _ => {}
                }
            }
            let mean = 0.37;
            for relu in [false, true] {
                let want = bits(reference(n, |i| {
                    let d = if relu && y[i] <= 0.0 { 0.0 } else { dy[i] };
                    (d, d * (x[i] - mean))
                }));
                assert_eq!(bits(bn_grad_sums(&dy, &x, &y, relu, mean)), want, "gradient sums, n {n}, relu {relu}");
                assert_eq!(bits(bn_grad_sums_imp::<A16>(&dy, &x, &y, relu, mean)), want, "portable gradient sums, n {n}, relu {relu}");
            }
            let want = bits(reference(n, |i| (x[i], (x[i] - mean) * (x[i] - mean))));
            assert_eq!((bn_plane_sum(&x).to_bits(), bn_plane_squares(&x, mean).to_bits()), want, "plane sums, n {n}");
            assert_eq!((bn_plane_sum_imp::<A16>(&x).to_bits(), bn_plane_squares_imp::<A16>(&x, mean).to_bits()), want, "portable plane sums, n {n}");
        }
    }
}
