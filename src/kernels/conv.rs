//! Convolution (NCHW), as k*k accumulated gemms over a zero-padded copy of the input: tap
//! (kh, kw) of output pixel p = oy*We + ox reads padded pixel s*p + kh*Wp + kw, a strided view,
//! so no im2col matrix is built. Outputs are computed on a grid We = Wp/s wide (a few junk
//! columns per row) and compacted, with bias / residual / scale, into NCHW. 3x3 stride-1 f32
//! convolutions of many channels on large maps take Winograd's F(2x2, 3x3) instead
//! (the `winograd` module): not the same bits as the gemms, within their error's order.
use candle_core::Tensor;
use rayon::prelude::*;

use super::bf16::{self, PackedA};
use super::conv_taps;
use super::winograd;
use super::gemm::{per_item, sgemm, threads};
use super::io::{tensor, uninit, with_slices};
use crate::error::{Error, Result};

/// Up to this many output pixels (on the padded grid) a convolution with a tap-major weight, or
/// one the direct kernel runs with enough output channels, runs its f32 products with the
/// output channels along the vector lanes; above it, with the pixels there (no transpose of
/// the result). On SD-1.5 shapes the first is faster at 16x16 and below, the second from 32x32
/// (the VAE's large maps most of all). Both give the same bytes.
const CHANNELS_LAST_MAX_PIXELS: usize = 512;

/// Whether the direct kernel runs a product of `cout` channels over a grid of `n_grid` pixels
/// channels-last ([`conv_taps::Layout::ChannelsLastRows`]): the map is small and its output
/// channels fill the tile. That layout computes only the map's pixels, not the grid's junk
/// columns (a fifth of the grid at 8x8, a third at 4x4), which the planar tile cannot skip.
pub(crate) fn direct_channels_last(cout: usize, n_grid: usize) -> bool {
    n_grid <= CHANNELS_LAST_MAX_PIXELS && conv_taps::channels_last_fills(cout)
}

/// How a convolution's input is prepared: nearest-upsampled to a size first, then padded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvInput {
    /// Nearest-neighbour resize to (h, w) before padding (candle's `upsample_nearest2d` rule).
    pub upsample: Option<(usize, usize)>,
    /// (top, left, bottom, right) zero padding.
    pub pad: (usize, usize, usize, usize),
}

/// A zero-padded input split into stride x stride phase planes of hq x wq,
/// phase (py, px)[i, j] = padded[s·i + py, s·j + px]: tap (ty, tx) of output (oy, ox) is then
/// phase (ty % s, tx % s) at (oy + ty / s, ox + tx / s), a unit-stride view. For stride 1 there
/// is one phase, the padded input itself. Outputs are computed on a grid wq wide.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Phases {
    pub s: usize,
    pub wq: usize,
    /// Floats per phase plane.
    pub phase: usize,
    /// Floats per channel (all its phases).
    pub plane: usize,
    /// Zeros past the last channel, for the taps of the grid's junk columns of the last rows.
    pub slack: usize,
}

impl Phases {
    /// The grid of a `hp` x `wp` padded input for a `k` x `k` kernel at stride `s`.
    pub(crate) fn new(hp: usize, wp: usize, s: usize, k: usize) -> Self {
        let (hq, wq) = (hp.div_ceil(s), wp.div_ceil(s));
        let phase = hq * wq;
        Phases { s, wq, phase, plane: s * s * phase, slack: (k / s + 1) * wq + k }
    }

    /// Offset of kernel tap (ty, tx) within a channel's plane.
    pub(crate) fn tap(&self, ty: usize, tx: usize) -> usize {
        let s = self.s;
        ((ty % s) * s + tx % s) * self.phase + (ty / s) * self.wq + tx / s
    }

    /// Writes one channel `src` (rows `w0` wide) into its plane `dstp`, resampled (pixel
    /// (y, x) is `src[src_rows[y], src_cols[x]]`) and placed at (`pt`, `pl`) of the padded
    /// input; the border keeps what `dstp` holds (zeros).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn fill(&self, src: &[f32], w0: usize, src_rows: &[usize], src_cols: &[usize], pt: usize, pl: usize, dstp: &mut [f32]) {
        let (s, wq, w) = (self.s, self.wq, src_cols.len());
        for (y, &sy) in src_rows.iter().enumerate() {
            let srow = &src[sy * w0..(sy + 1) * w0];
            let yy = y + pt;
            if s == 1 {
                let drow = &mut dstp[yy * wq + pl..yy * wq + pl + w];
                if w == w0 {
                    drow.copy_from_slice(srow);
                } else {
                    for (d, &sx) in drow.iter_mut().zip(src_cols) {
                        *d = srow[sx];
                    }
                }
            } else {
                // Column x lands in phase (x + pl) % s at (x + pl) / s: counted, not divided.
                let (py, i) = (yy % s, yy / s);
                let row = &mut dstp[py * s * self.phase + i * wq..];
                let (mut px, mut j) = (pl % s, pl / s);
                for &sx in src_cols {
                    row[px * self.phase + j] = srow[sx];
                    px += 1;
                    if px == s {
                        px = 0;
                        j += 1;
                    }
                }
            }
        }
    }
}

/// A convolution's operands as contiguous f32 data, for [`conv2d_data`].
#[derive(Clone, Copy, Debug)]
pub struct ConvData<'a> {
    /// [b, cin, h, w].
    pub x: &'a [f32],
    pub x_dims: [usize; 4],
    /// [cout, cin, k, k] values, or, with `tap_major`, the same weight stored [k, k, cin, cout]
    /// (see [`tap_major`]).
    pub weight: &'a [f32],
    pub w_dims: [usize; 4],
    pub tap_major: bool,
    /// [cout].
    pub bias: Option<&'a [f32]>,
    /// [b, cout]: a per-sample bias.
    pub extra_bias: Option<&'a [f32]>,
    /// Shaped like the output.
    pub residual: Option<&'a [f32]>,
}

/// `x` [b, cin, h, w], `weight` [cout, cin, k, k], `bias` \[cout\], `extra_bias` [b, cout]:
/// convolution with `stride`, input prepared per `input`, then
/// `(conv + bias + extra_bias + residual) / out_scale`. With `packed` (the weight from
/// [`pack_weight`]) the products take bf16 inputs with f32 accumulation; a weight stored
/// [`tap_major`] is read in place. Inference only.
#[allow(clippy::too_many_arguments)]
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    extra_bias: Option<&Tensor>,
    stride: usize,
    input: ConvInput,
    residual: Option<&Tensor>,
    out_scale: f64,
    packed: Option<&PackedA>,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let epilogue = Epilogue { extra_bias, residual, out_scale };
    let (out, shape) = with_slices(&[x], |s| conv2d_on(s[0], [b, c, h, w], weight, bias, stride, input, epilogue, packed))??;
    tensor(out, &shape)
}

/// What [`conv2d`] adds to the product after the bias: `(+ extra_bias[b] + residual) / out_scale`.
#[derive(Clone, Copy, Debug)]
pub struct Epilogue<'a> {
    pub extra_bias: Option<&'a Tensor>,
    pub residual: Option<&'a Tensor>,
    pub out_scale: f64,
}

impl Epilogue<'_> {
    /// Nothing added, no scale.
    pub const NONE: Epilogue<'static> = Epilogue { extra_bias: None, residual: None, out_scale: 1.0 };
}

/// [`conv2d`] of an input given as contiguous data `x` of shape `x_dims` (a custom op's
/// storage: no copy in), returning the output's values and shape [b, cout, ho, wo] (no copy
/// out).
#[allow(clippy::too_many_arguments)]
pub fn conv2d_on(x: &[f32], x_dims: [usize; 4], weight: &Tensor, bias: Option<&Tensor>, stride: usize, input: ConvInput, epilogue: Epilogue<'_>, packed: Option<&PackedA>) -> Result<(Vec<f32>, [usize; 4])> {
    let Epilogue { extra_bias, residual, out_scale } = epilogue;
    let (co, ci, kh, kw) = weight.dims4()?;
    let w_dims = [co, ci, kh, kw];
    // The bias's length is checked with the data's (`conv2d_data`), the shapes here.
    if let Some(e) = extra_bias {
        if e.dims() != [x_dims[0], co] {
            return Err(Error::invalid(format!("conv2d: extra bias {:?} vs [{}, {co}]", e.dims(), x_dims[0])));
        }
    }
    if let Some(r) = residual {
        if ci == x_dims[1] && kh == kw {
            let want = output_shape(x_dims, w_dims, stride, input)?;
            if r.dims() != want {
                return Err(Error::invalid(format!("conv2d: residual {:?} vs output {want:?}", r.dims())));
            }
        }
    }
    // A tap-major weight (see [`tap_major`]) is read through its storage order, [k, k, cin, cout].
    let hwio = tap_major_storage(weight)?;
    let mut ts: Vec<&Tensor> = vec![hwio.as_ref().unwrap_or(weight)];
    ts.extend(bias);
    ts.extend(extra_bias);
    ts.extend(residual);
    with_slices(&ts, |s| {
        let mut rest = s[1..].iter().copied();
        let data = ConvData {
            x,
            x_dims,
            weight: s[0],
            w_dims,
            tap_major: hwio.is_some(),
            bias: bias.and_then(|_| rest.next()),
            extra_bias: extra_bias.and_then(|_| rest.next()),
            residual: residual.and_then(|_| rest.next()),
        };
        conv2d_data(&data, stride, input, out_scale, packed)
    })?
}

/// The output shape [b, cout, ho, wo] of [`conv2d`].
fn output_shape(x_dims: [usize; 4], w_dims: [usize; 4], stride: usize, input: ConvInput) -> Result<[usize; 4]> {
    let k = w_dims[2];
    let (h, w) = input.upsample.unwrap_or((x_dims[2], x_dims[3]));
    let (pt, pl, pb, pr) = input.pad;
    let (hp, wp) = (h + pt + pb, w + pl + pr);
    if stride == 0 {
        return Err(Error::invalid("conv2d: stride 0"));
    }
    if hp < k || wp < k {
        return Err(Error::invalid(format!("conv2d: padded input {hp}x{wp} smaller than kernel {k}")));
    }
    Ok([x_dims[0], w_dims[0], (hp - k) / stride + 1, (wp - k) / stride + 1])
}

/// [`conv2d`] on contiguous data: the output's values and its shape [b, cout, ho, wo].
pub fn conv2d_data(d: &ConvData<'_>, stride: usize, input: ConvInput, out_scale: f64, packed: Option<&PackedA>) -> Result<(Vec<f32>, [usize; 4])> {
    let [b, cin, h0, w0] = d.x_dims;
    let [cout, wcin, kh, kw] = d.w_dims;
    if wcin != cin || kh != kw || stride == 0 {
        return Err(Error::invalid(format!("conv2d: input {:?}, weight {:?}, stride {stride}", d.x_dims, d.w_dims)));
    }
    let k = kh;
    let sizes = [("input", Some(d.x.len()), b * cin * h0 * w0), ("weight", Some(d.weight.len()), cout * cin * k * k)];
    let per_channel = [("bias", d.bias.map(<[f32]>::len), cout), ("extra bias", d.extra_bias.map(<[f32]>::len), b * cout)];
    for (what, len, want) in sizes.into_iter().chain(per_channel) {
        if len.is_some_and(|n| n != want) {
            return Err(Error::invalid(format!("conv2d: {what} holds {} values, not {want}", len.unwrap_or(0))));
        }
    }
    let out_shape = output_shape(d.x_dims, d.w_dims, stride, input)?;
    let [_, _, ho, wo] = out_shape;
    let (h, w) = input.upsample.unwrap_or((h0, w0));
    let (pt, pl, pb, pr) = input.pad;
    let (hp, wp_real) = (h + pt + pb, w + pl + pr);
    if let Some(r) = d.residual {
        if r.len() != b * cout * ho * wo {
            return Err(Error::invalid(format!("conv2d: residual of {} values vs output {out_shape:?}", r.len())));
        }
    }
    if let Some(pw) = packed {
        if (pw.m, pw.taps, pw.k_pairs) != (cout, k * k, cin.div_ceil(2)) {
            return Err(Error::invalid(format!("conv2d: packed weight does not match {:?}", d.w_dims)));
        }
    }
    let direct = k == 1 && stride == 1 && input.upsample.is_none() && input.pad == (0, 0, 0, 0);
    let tap_major = d.tap_major;
    // The f32 product of a tap-major weight runs channel-major when the image has few pixels and
    // leaves its result as [pixel, cout] (see below). So does the direct kernel, for any weight
    // layout, on maps too small for its planar layout to pay, and where
    // [`direct_channels_last`] holds.
    let n_ext = ho * wp_real.div_ceil(stride);
    let taps_fit = packed.is_none() && !direct && conv_taps::applies(cout, cin, n_ext);
    let channels_last = packed.is_none()
        && n_ext <= CHANNELS_LAST_MAX_PIXELS
        && (tap_major || (taps_fit && (!conv_taps::planar_pays(n_ext) || direct_channels_last(cout, n_ext))));
    // Where `gemm` runs a planar product faster (see [`conv_taps::gemm_beats_planar`]) it takes
    // it: the same bits either way.
    let use_taps = taps_fit && (channels_last || !conv_taps::gemm_beats_planar(cin));
    // Many channels on a large map: Winograd's F(2x2, 3x3), 2.25x fewer multiply-adds (see
    // [`winograd`]); a choice of the shape alone, like the others.
    let wino = packed.is_none() && !direct && k == 3 && stride == 1 && winograd::pays(cin, cout, ho, wo);
    let skip_junk = channels_last && use_taps && ho * wo >= 2;
    // Pixels of the product's result, and the distance of its rows.
    let (n_res, res_row) = if skip_junk { (ho * wo, wo) } else { (n_ext, wp_real.div_ceil(stride)) };
    let inv_scale = out_scale != 1.0;
    // A closure, for the early returns of the paths that finish sooner.
    let out = (|| {
        let (xs, ws) = (d.x, d.weight);
        let (bias_s, extra_s, rs) = (d.bias, d.extra_bias, d.residual);
        // Per-sample bias: bias + extra_bias[bi] (the sum rounded once, before the product).
        let sample_bias = |bi: usize| -> Option<Vec<f32>> {
            match (bias_s, extra_s) {
                (None, None) => None,
                (Some(bv), None) => Some(bv.to_vec()),
                (None, Some(e)) => Some(e[bi * cout..(bi + 1) * cout].to_vec()),
                (Some(bv), Some(e)) => Some(bv.iter().zip(&e[bi * cout..(bi + 1) * cout]).map(|(a, b)| a + b).collect()),
            }
        };
        let in_plane = h0 * w0;
        let out_plane = ho * wo;
        let mut out = uninit(b * cout * out_plane);
        if out.is_empty() {
            return out;
        }
        // A batch runs one image per task, each product on one thread; a single image splits
        // its products across the threads instead. Either way an image's arithmetic is the same.
        let nt = if b > 1 { 1 } else { threads() };
        let res_of = |bi: usize| rs.map(|r| &r[bi * cout * out_plane..(bi + 1) * cout * out_plane]);
        if direct {
            let one = |bi: usize, dst: &mut [f32]| {
                let bvec = sample_bias(bi);
                let start = bf16::Start::Fill { bias: bvec.as_deref().map(bf16::Bias::Rows), residual: res_of(bi) };
                match packed {
                    Some(pw) => {
                        let xb = bf16::PairPlanes::from_rows(&xs[bi * cin * in_plane..], cin, in_plane, in_plane);
                        bf16::gemm_taps(pw, &xb, &[0], out_plane, dst, out_plane, start, nt > 1).expect("shapes checked above");
                    }
                    None => unsafe {
                        let acc = start.preload(dst, out_plane, nt > 1);
                        sgemm(cout, out_plane, cin, dst.as_mut_ptr(), out_plane, 1, acc, ws.as_ptr(), cin, 1, xs[bi * cin * in_plane..].as_ptr(), in_plane, 1, 1.0, nt)
                    },
                }
                if inv_scale {
                    divide_slice(dst, out_scale as f32);
                }
            };
            per_item(&mut out, b, one);
            return out;
        }
        let grid = match wino {
            true => {
                let (hw, ww) = winograd::padded_size(ho, wo);
                Phases::new(hw, ww, 1, k)
            }
            false => Phases::new(hp, wp_real, stride, k),
        };
        let (wq, plane, slack) = (grid.wq, grid.plane, grid.slack);
        let we = wq;
        // Exactly candle's nearest rule: src = min(src_len - 1, floor(i * (src_len / dst_len))).
        let (sh, sw) = (h0 as f64 / h as f64, w0 as f64 / w as f64);
        let src_rows: Vec<usize> = (0..h).map(|i| ((i as f64 * sh) as usize).min(h0 - 1)).collect();
        let src_cols: Vec<usize> = (0..w).map(|i| ((i as f64 * sw) as usize).min(w0 - 1)).collect();
        let kk = k * k;
        let tap_off = |t: usize| grid.tap(t / k, t % k);
        let offs: Vec<usize> = (0..kk).map(tap_off).collect();
        // (offset of tap t, row stride, column stride) of its [cout, cin] weight matrix.
        let w_at = |t: usize| if tap_major { (t * cin * cout, 1, cout) } else { (t, cin * kk, kk) };
        // The f32 product goes through the direct kernel where it gives gemm's bits and is the
        // faster of the two.
        let taps_w = (use_taps && !wino).then(|| conv_taps::pack_taps(ws, cout, cin, kk, w_at));
        let wino_u = wino.then(|| winograd::transform_weight(ws, cout, cin, tap_major));
        let w_offs: Vec<usize> = (0..kk).map(|t| t * cin * cout).collect();
        let taps_layout = match (channels_last, skip_junk) {
            (false, _) => conv_taps::Layout::Planar,
            (true, false) => conv_taps::Layout::ChannelsLast,
            (true, true) => conv_taps::Layout::ChannelsLastRows { cols: wo, stride: we },
        };
        // Scratch per task: the padded input (its zero border is set once and never written)
        // and the product on the wq-wide grid.
        let scratch = || (vec![0f32; cin * plane + slack], uninit(if wino { 0 } else { cout * n_ext }));
        let one = |bi: usize, dst: &mut [f32], (xp, ext): &mut (Vec<f32>, Vec<f32>)| {
            let xb = &xs[bi * cin * in_plane..(bi + 1) * cin * in_plane];
            let pad_plane = |(ci, dstp): (usize, &mut [f32])| grid.fill(&xb[ci * in_plane..(ci + 1) * in_plane], w0, &src_rows, &src_cols, pt, pl, dstp);
            if nt > 1 {
                xp[..cin * plane].par_chunks_mut(plane).enumerate().for_each(pad_plane);
            } else {
                xp[..cin * plane].chunks_mut(plane).enumerate().for_each(pad_plane);
            }
            let bvec = sample_bias(bi);
            if let Some(u) = &wino_u {
                let finish = winograd::Finish { bias: bvec.as_deref(), residual: res_of(bi), div: inv_scale.then_some(out_scale as f32) };
                winograd::conv(u, cout, cin, &xp[..cin * plane], ho, wo, finish, dst, nt);
                return;
            }
            // The bias per output channel: per row of the planar result, per column of the
            // channels-last one ([pixel, cout]).
            let bias = bvec.as_deref().map(|b| if channels_last { bf16::Bias::Columns(b) } else { bf16::Bias::Rows(b) });
            let start = bf16::Start::Fill { bias, residual: None };
            if let Some(pw) = packed {
                let xb = bf16::PairPlanes::from_rows(xp, cin, plane, plane);
                bf16::gemm_taps(pw, &xb, &offs, n_ext, ext, n_ext, start, nt > 1).expect("shapes checked above");
            } else {
                let acc = match channels_last {
                    true => start.preload(&mut ext[..n_res * cout], cout, nt > 1),
                    false => start.preload(&mut ext[..cout * n_ext], n_ext, nt > 1),
                };
                if let Some(wt) = &taps_w {
                    conv_taps::conv_taps(wt, &w_offs, cout, cin, xp, plane, &offs, n_res, ext, acc, nt > 1, taps_layout);
                } else {
                    // Channel-major, the result is [pixel, cout]: the output channels run along the
                    // vector lanes and the pixels are broadcast, so each tap's weight is read once, in
                    // order, however few the pixels, and no lane idles on a 2x2 map. Each output
                    // element sees the same operations in the same order either way: same bytes.
                    let (d_rs, d_cs) = if channels_last { (1, cout) } else { (n_ext, 1) };
                    for (t, &off) in offs.iter().enumerate() {
                        let (w_off, w_rs, w_cs) = w_at(t);
                        unsafe {
                            sgemm(
                                cout,
                                n_ext,
                                cin,
                                ext.as_mut_ptr(),
                                d_rs,
                                d_cs,
                                acc || t > 0,
                                ws[w_off..].as_ptr(),
                                w_rs,
                                w_cs,
                                xp[off..].as_ptr(),
                                plane,
                                1,
                                1.0,
                                nt,
                            )
                        };
                    }
                }
            }
            // Compact into NCHW with the epilogue.
            let res = res_of(bi);
            let ext_ref = &*ext;
            if channels_last {
                // Blocks of CB channels: each pixel's CB values are one cache line of the result.
                const CB: usize = 16;
                let compact_t = |(blk, dblk): (usize, &mut [f32])| {
                    let c0 = blk * CB;
                    let cn = dblk.len() / out_plane;
                    for oy in 0..ho {
                        for ox in 0..wo {
                            let e = &ext_ref[(oy * res_row + ox) * cout + c0..][..cn];
                            let o = oy * wo + ox;
                            for (c, &ev) in e.iter().enumerate() {
                                let mut v = match res {
                                    Some(r) => r[(c0 + c) * out_plane + o] + ev,
                                    None => ev,
                                };
                                if inv_scale {
                                    v /= out_scale as f32;
                                }
                                dblk[c * out_plane + o] = v;
                            }
                        }
                    }
                };
                if nt > 1 {
                    dst.par_chunks_mut(CB * out_plane).enumerate().for_each(compact_t);
                } else {
                    dst.chunks_mut(CB * out_plane).enumerate().for_each(compact_t);
                }
                return;
            }
            let compact = |(co, dplane): (usize, &mut [f32])| {
                let eplane = &ext_ref[co * n_ext..(co + 1) * n_ext];
                for oy in 0..ho {
                    let d = &mut dplane[oy * wo..(oy + 1) * wo];
                    let e = &eplane[oy * we..oy * we + wo];
                    match res {
                        Some(r) => {
                            let r = &r[co * out_plane + oy * wo..co * out_plane + (oy + 1) * wo];
                            for ((dv, &ev), &rv) in d.iter_mut().zip(e).zip(r) {
                                *dv = rv + ev;
                            }
                        }
                        None => d.copy_from_slice(e),
                    }
                    if inv_scale {
                        for dv in d.iter_mut() {
                            *dv /= out_scale as f32;
                        }
                    }
                }
            };
            if nt > 1 {
                dst.par_chunks_mut(out_plane).enumerate().for_each(compact);
            } else {
                dst.chunks_mut(out_plane).enumerate().for_each(compact);
            }
        };
        if b > 1 {
            out.par_chunks_mut(cout * out_plane).enumerate().for_each_init(scratch, |sc, (bi, dst)| one(bi, dst, sc));
        } else {
            one(0, &mut out, &mut scratch());
        }
        out
    })();
    Ok((out, out_shape))
}

/// Divides rather than multiplies by the inverse: diffusers divides by `output_scale_factor`,
/// and the two differ in the last bit.
fn divide_slice(x: &mut [f32], div: f32) {
    for v in x.iter_mut() {
        *v /= div;
    }
}

/// The same weight [cout, cin, k, k] stored tap-major, as [k, k, cin, cout] in memory (a
/// permuted view, so every op still sees the usual shape). [`conv2d`] then runs its f32
/// products with the output channels along the vector lanes and reads each tap's weights in
/// order: at small latents, where a convolution has few pixels per weight, this is what bounds
/// it. The results are the same bytes as with the usual layout. Candle's own ops copy such a
/// tensor to the usual layout each call, so it suits frozen weights on the fast path only.
pub fn tap_major(weight: &Tensor) -> Result<Tensor> {
    weight.dims4()?;
    Ok(weight.permute((2, 3, 1, 0))?.contiguous()?.permute((3, 2, 0, 1))?)
}

/// The storage of a weight made by [`tap_major`] (more than one tap), as the contiguous
/// [kh, kw, cin, cout] tensor it is; `None` for any other layout.
fn tap_major_storage(weight: &Tensor) -> Result<Option<Tensor>> {
    let (_, _, kh, kw) = weight.dims4()?;
    let hwio = weight.permute((2, 3, 1, 0))?;
    Ok((kh * kw > 1 && hwio.is_contiguous()).then_some(hwio))
}

/// The kernel of a convolution's stride-1 input gradient: `w` ([cout, cin, k, k]) with its two
/// channel dims swapped and both spatial dims reversed, as [cin, cout, k, k] values. Reversing
/// both spatial dims reverses each contiguous `k·k` block, so this is one pass of block copies
/// (as a transpose and two index selects it was three copies and two gathers, 3 % of a ResNet-50
/// training step).
pub fn flipped_transposed(w: &[f32], cout: usize, cin: usize, k: usize) -> Vec<f32> {
    let kk = k * k;
    assert_eq!(w.len(), cout * cin * kk, "flipped kernel: weight size");
    let mut out = vec![0f32; w.len()];
    for (ci, dst) in out.chunks_exact_mut(cout * kk).enumerate() {
        for (co, d) in dst.chunks_exact_mut(kk).enumerate() {
            let src = &w[(co * cin + ci) * kk..][..kk];
            d.iter_mut().zip(src.iter().rev()).for_each(|(d, s)| *d = *s);
        }
    }
    out
}

/// `weight` [cout, cin, k, k] packed for the bf16 path of [`conv2d`] on `kernel` (done once per
/// layer).
pub fn pack_weight(weight: &Tensor, kernel: bf16::Kernel) -> Result<PackedA> {
    let (cout, cin, kh, kw) = weight.dims4()?;
    let kk = kh * kw;
    // A tap-major weight is read in its storage order: through the [cout, cin, k, k] view,
    // `with_slices` would first copy it element by element.
    if let Some(hwio) = tap_major_storage(weight)? {
        return with_slices(&[&hwio], |s| PackedA::from_tap_major(kernel, cout, kk, cin, s[0]));
    }
    if kk == 1 {
        // A 1x1 weight is `cout` rows of `cin` values.
        return with_slices(&[weight], |s| PackedA::from_rows(kernel, cout, cin, s[0], cin));
    }
    with_slices(&[weight], |s| PackedA::new(kernel, cout, kk, cin, |co, t, ci| s[0][(co * cin + ci) * kk + t]))
}
