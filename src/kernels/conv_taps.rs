//! The f32 direct convolution over taps on AVX-512: `dst[co, p] (+)= Σ_t Σ_ci w[w_off[t] +
//! ci·cout + co] · x[ci·plane + off[t] + p]`, for the f32 products of [`super::conv`], written
//! planar ([cout, pixel]) or channels-last ([pixel, cout]). The same sum, with a batch item per
//! "tap", is a trained linear layer's weight gradient ([`super::linear::item_products_tn_sum`]).
//!
//! It gives each output element exactly the arithmetic of the product it replaces, one `gemm`
//! call per tap ([`super::gemm::sgemm`], accumulating from the second tap on): for each tap a
//! fused multiply-add chain over the input channels in order, started from zero, then added to
//! the output once (the first tap's chain is stored as it is unless the output was preloaded).
//! That is what `gemm` 0.19 does whenever the depth is 3 to 512 (one depth block, so one chain;
//! depths of 1 or 2 take its `gevv` path, which accumulates into the output directly), there are
//! at least 2 output channels (1 takes its matrix-vector path) and the CPU has AVX-512 (its
//! kernels then use fused multiply-adds). [`applies`] checks exactly that (and that there are
//! enough pixels to gain); elsewhere the caller keeps `gemm`.
//!
//! Why: per tap, `gemm` repacks the shifted input, and with few channels (the VAE's 16 at full
//! resolution, a depth of 16 per tap) its microkernel spends as long loading and storing the
//! output as multiplying. Here a tile of 8 channels x 48 pixels stays in registers for a whole
//! tap and the input is read in place.

#[cfg(target_arch = "x86_64")]
use super::gemm::{for_tasks, threads};
#[cfg(target_arch = "x86_64")]
use super::io::SendPtr;
#[cfg(target_arch = "x86_64")]
use std::ops::Range;

/// Output channels per register tile.
const ROWS: usize = 8;
/// 16-float vectors of pixels per register tile.
const VECS: usize = 3;
/// Pixels per register tile.
const TILE_PX: usize = 16 * VECS;

/// Whether [`conv_taps`] runs this product on this CPU (AVX-512, a depth of 3 to 512, at least
/// 2 rows and columns). It sums each entry in one chain over the depth, as `gemm`'s usual
/// kernels do in one block: `gemm`'s bits wherever it takes those ([`super::gemm::one_block`],
/// which also needs more than 256 outputs).
pub(crate) fn applies(cout: usize, cin: usize, n: usize) -> bool {
    super::simd::has_avx512() && (3..=512).contains(&cin) && cout >= 2 && n >= 2
}

/// Whether the planar layout is worth it: below one tile of pixels (a 4x4 map) `gemm` was as
/// fast; small maps take [`Layout::ChannelsLast`] instead.
pub(crate) fn planar_pays(n: usize) -> bool {
    n >= TILE_PX
}

/// How [`conv_taps`] lays out its result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// [cout, n]: pixels along the vector lanes, for large maps.
    Planar,
    /// [n, cout]: output channels along the lanes, every pixel used however small the map.
    ChannelsLast,
}

/// The weight of tap `t` given as (offset, row stride, column stride) of its [cout, cin] matrix
/// in `w`, gathered as [tap][cin][cout], the order [`conv_taps`] reads it.
pub(crate) fn pack_taps(w: &[f32], cout: usize, cin: usize, taps: usize, at: impl Fn(usize) -> (usize, usize, usize)) -> Vec<f32> {
    let mut out = Vec::with_capacity(taps * cin * cout);
    for t in 0..taps {
        let (off, rs, cs) = at(t);
        for ci in 0..cin {
            out.extend((0..cout).map(|co| w[off + co * rs + ci * cs]));
        }
    }
    out
}

/// `dst` [cout, n] (row stride n; [n, cout] with [`Layout::ChannelsLast`])
/// `= (preloaded ? dst : 0) + Σ_t W_t @ X_t` with `W_t`[co, ci] = `w[w_offs[t] + ci·cout + co]`
/// (from [`pack_taps`], `w_offs[t] = t·cin·cout`) and `X_t`[ci, p] = `x[ci·plane + offs[t] + p]`.
/// Pixel blocks are split across rayon's threads when `parallel`; the arithmetic is the same.
///
/// Panics unless [`applies`] holds and `x` holds every element the offsets reach.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_taps(w: &[f32], w_offs: &[usize], cout: usize, cin: usize, x: &[f32], plane: usize, offs: &[usize], n: usize, dst: &mut [f32], preloaded: bool, parallel: bool, layout: Layout) {
    assert!(applies(cout, cin, n), "conv_taps: not applicable to cout {cout}, cin {cin}, n {n}");
    assert!(w_offs.len() == offs.len() && w_offs.iter().all(|&o| o + cin * cout <= w.len()) && dst.len() >= cout * n);
    let reach = offs.iter().max().copied().unwrap_or(0) + (cin - 1) * plane + n;
    assert!(x.len() >= reach, "conv_taps: input of {} floats, the taps reach {reach}", x.len());
    run(w, &Taps { w_offs, offs, cout, cin, plane }, cout, x, n, dst, preloaded, parallel, layout);
}

/// `dst` [cout, n] (row stride n) `= Σ_b Σ_{r in block b} w[r·cout + co] · x[x_offs[r] + p]`,
/// the depth rows taken in blocks of `block` (the last one shorter), each block one fused
/// multiply-add chain from zero added into the output: the arithmetic of one `gemm` product
/// `W [cout, K] @ U [K, n]` with `U[r, p] = x[x_offs[r] + p]` whose depth blocks are `block`
/// long (see [`super::conv_unfold`], where `U` is an unfolded input that is never built).
/// The caller checks that `gemm` would sum that way; this needs AVX-512.
///
/// Panics unless `x` holds every element the offsets reach.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_rows(w: &[f32], cout: usize, x_offs: &[usize], block: usize, x: &[f32], n: usize, dst: &mut [f32], parallel: bool) {
    assert!(super::simd::has_avx512() && cout >= 1 && block >= 1 && n >= 1, "conv_rows: not applicable");
    assert!(w.len() >= x_offs.len() * cout && dst.len() >= cout * n);
    let reach = x_offs.iter().max().copied().unwrap_or(0) + n;
    assert!(x.len() >= reach, "conv_rows: input of {} floats, the rows reach {reach}", x.len());
    run(w, &Rows { x_offs, block, cout }, cout, x, n, dst, false, parallel, Layout::Planar);
}

/// The depth rows of a product and how they fall into chains: each block's rows are one
/// fused multiply-add chain, the blocks' chains added into the output in order.
pub(crate) trait Depth: Sync {
    fn blocks(&self) -> usize;
    /// Rows in block `t`.
    fn len(&self, t: usize) -> usize;
    /// (weight offset, input offset) of row `i` of block `t`: the weight row holds one value per
    /// output channel, the input row one per pixel.
    fn row(&self, t: usize, i: usize) -> (usize, usize);
}

/// [`conv_taps`]' rows: per tap, the input channels, `plane` apart.
struct Taps<'a> {
    w_offs: &'a [usize],
    offs: &'a [usize],
    cout: usize,
    cin: usize,
    plane: usize,
}

impl Depth for Taps<'_> {
    fn blocks(&self) -> usize {
        self.offs.len()
    }
    #[inline(always)]
    fn len(&self, _t: usize) -> usize {
        self.cin
    }
    #[inline(always)]
    fn row(&self, t: usize, i: usize) -> (usize, usize) {
        (self.w_offs[t] + i * self.cout, self.offs[t] + i * self.plane)
    }
}

/// [`conv_rows`]' rows: consecutive weight rows, input rows anywhere.
struct Rows<'a> {
    x_offs: &'a [usize],
    block: usize,
    cout: usize,
}

impl Depth for Rows<'_> {
    fn blocks(&self) -> usize {
        self.x_offs.len().div_ceil(self.block)
    }
    #[inline(always)]
    fn len(&self, t: usize) -> usize {
        self.block.min(self.x_offs.len() - t * self.block)
    }
    #[inline(always)]
    fn row(&self, t: usize, i: usize) -> (usize, usize) {
        let r = t * self.block + i;
        debug_assert!(r < self.x_offs.len());
        // SAFETY: `len` keeps i within block t, whose rows are all in x_offs.
        (r * self.cout, unsafe { *self.x_offs.get_unchecked(r) })
    }
}

/// The weights of a register tile for the whole depth above which [`conv_taps`] runs one
/// depth block at a time (a 3x3 convolution of more than 227 input channels): they then no
/// longer stay near the core while the tile runs through its depth, and every tile would fetch
/// them again from L3 (from memory on a busy host). On SD-1.5's VAE decoder (512 channels at
/// 64-256 px) this ran the 512-channel convolutions 1.7x as fast.
const TILE_WEIGHT_BYTES: usize = 64 * 1024;
/// The weights of one depth block for a group of output channels, kept in L2 while a few
/// pixel tiles run through them.
const GROUP_WEIGHT_BYTES: usize = 128 * 1024;
/// Pixel tiles per task when passing one block at a time. A task also takes only a group of
/// the output channels (so a single image still makes enough tasks for the threads), and its
/// outputs stay in L2 between blocks: 8 tiles x 48 px x at most 136 channels, 204 KiB.
const CHUNK_TILES: usize = 8;

/// Output channels per task that passes one depth block at a time, or `None` to keep each tile
/// in registers through every block (few weights per tile, or the channels-last layout).
fn tap_outer_group<D: Depth>(depth: &D, cout: usize, layout: Layout) -> Option<usize> {
    let rows: usize = (0..depth.blocks()).map(|t| depth.len(t)).sum();
    let per_block = depth.len(0).max(1);
    if layout != Layout::Planar || rows * ROWS * 4 <= TILE_WEIGHT_BYTES {
        return None;
    }
    let most = (GROUP_WEIGHT_BYTES / 4 / per_block / ROWS * ROWS).max(ROWS);
    // Groups of even size (whole tiles), so that they make tasks of even size.
    let groups = cout.div_ceil(most);
    Some((cout.div_ceil(groups).div_ceil(ROWS) * ROWS).min(cout))
}

#[allow(clippy::too_many_arguments)]
fn run<D: Depth>(w: &[f32], depth: &D, cout: usize, x: &[f32], n: usize, dst: &mut [f32], preloaded: bool, parallel: bool, layout: Layout) {
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the direct convolution kernel needs AVX-512");
    #[cfg(target_arch = "x86_64")]
    {
        let tile_px = if layout == Layout::Planar { TILE_PX } else { x86::CL_PIXELS };
        let blocks = n.div_ceil(tile_px);
        let dst_ptr = SendPtr(dst.as_mut_ptr());
        let run = |blk: usize, cos: Range<usize>, ts: Range<usize>| {
            let d = dst_ptr;
            let p0 = blk * tile_px;
            let px = (n - p0).min(tile_px);
            // SAFETY: the callers checked AVX-512 and the bounds, and each block writes only its
            // own pixels of dst.
            unsafe {
                match layout {
                    Layout::Planar => x86::block(w, depth, x, n, p0, px, d.0, preloaded, cos, ts),
                    Layout::ChannelsLast => x86::block_cl(w, depth, cout, x, p0, px, d.0, preloaded),
                }
            }
        };
        let nb = depth.blocks();
        match tap_outer_group(depth, cout, layout) {
            None => {
                // Several tiles per task so that a task's input rows stay in cache across
                // channels; each tile runs through every depth block in registers.
                let per_task = if parallel { blocks.div_ceil(4 * threads()).max(1) } else { blocks };
                for_tasks(blocks.div_ceil(per_task), parallel, |task| (task * per_task..((task + 1) * per_task).min(blocks)).for_each(|b| run(b, 0..cout, 0..nb)));
            }
            Some(group) => {
                // Tasks of a few pixel tiles and a group of output channels each, running one
                // depth block at a time: the group's weights for that block stay in L2 across
                // the tiles, and the tiles' outputs between blocks. Each output still sees its
                // blocks' chains added in order, so the arithmetic is the same.
                let groups = cout.div_ceil(group);
                let per_task = CHUNK_TILES.min(blocks);
                for_tasks(blocks.div_ceil(per_task) * groups, parallel, |task| {
                    let (chunk, g) = (task / groups, task % groups);
                    let blks = chunk * per_task..((chunk + 1) * per_task).min(blocks);
                    let cos = g * group..((g + 1) * group).min(cout);
                    for t in 0..nb {
                        blks.clone().for_each(|b| run(b, cos.clone(), t..t + 1));
                    }
                });
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Depth, ROWS};
    use crate::kernels::simd::first_lanes;
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// 16-float vectors in the widest register tile (either layout).
    const MAX_VECS: usize = 4;
    /// Pixels per channels-last register tile.
    pub(super) const CL_PIXELS: usize = 6;

    /// Masks for the first `lanes` of `MAX_VECS` vectors.
    fn masks(lanes: usize) -> [__mmask16; MAX_VECS] {
        std::array::from_fn(|v| first_lanes(lanes.saturating_sub(16 * v)))
    }

    /// Output channels `cos` of the pixels `p0..p0 + px` (px ≤ 48) through depth blocks `ts`,
    /// written as [cout, n].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block<D: Depth>(w: &[f32], depth: &D, x: &[f32], n: usize, p0: usize, px: usize, dst: *mut f32, preloaded: bool, cos: Range<usize>, ts: Range<usize>) {
        let vecs = px.div_ceil(16);
        let mut co = cos.start;
        while co < cos.end {
            let rows = (cos.end - co).min(ROWS);
            let args = Tile { w: w.as_ptr().add(co), depth, x: x.as_ptr().add(p0), dst: dst.add(co * n + p0), ld: n, masks: masks(px), preloaded, ts: ts.clone() };
            macro_rules! dispatch {
                ($($r:literal),*) => {
                    match (rows, vecs) {
                        $(($r, 1) => tile::<D, $r, 1>(&args), ($r, 2) => tile::<D, $r, 2>(&args), ($r, _) => tile::<D, $r, 3>(&args),)*
                        _ => unreachable!(),
                    }
                };
            }
            dispatch!(1, 2, 3, 4, 5, 6, 7, 8);
            co += rows;
        }
    }

    /// All output channels of the pixels `p0..p0 + px` (px ≤ 6), written as [n, cout].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block_cl<D: Depth>(w: &[f32], depth: &D, cout: usize, x: &[f32], p0: usize, px: usize, dst: *mut f32, preloaded: bool) {
        let mut co = 0;
        while co < cout {
            let lanes = (cout - co).min(16 * MAX_VECS);
            let args = Tile { w: w.as_ptr().add(co), depth, x: x.as_ptr().add(p0), dst: dst.add(p0 * cout + co), ld: cout, masks: masks(lanes), preloaded, ts: 0..depth.blocks() };
            macro_rules! dispatch {
                ($($p:literal),*) => {
                    match (px, lanes.div_ceil(16)) {
                        $(($p, 1) => tile_cl::<D, $p, 1>(&args), ($p, 2) => tile_cl::<D, $p, 2>(&args), ($p, 3) => tile_cl::<D, $p, 3>(&args), ($p, _) => tile_cl::<D, $p, 4>(&args),)*
                        _ => unreachable!(),
                    }
                };
            }
            dispatch!(1, 2, 3, 4, 5, 6);
            co += lanes;
        }
    }

    struct Tile<'a, D> {
        /// Weight of this tile's first output channel, before a row's offset.
        w: *const f32,
        depth: &'a D,
        /// Input at this tile's first pixel, before a row's offset.
        x: *const f32,
        /// Output at this tile's first channel and pixel; its rows (channels, or pixels when
        /// channels-last) are `ld` apart and its vectors run along them.
        dst: *mut f32,
        ld: usize,
        /// Lanes of each vector along an output row.
        masks: [__mmask16; MAX_VECS],
        preloaded: bool,
        /// The depth blocks to run.
        ts: Range<usize>,
    }

    /// Block `t`'s chains added into the output (or stored, for the first block of an output
    /// that was not preloaded): `acc[row][vector]`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn finish<D, const A: usize, const V: usize>(a: &Tile<'_, D>, t: usize, acc: &[[__m512; V]; A]) {
        let store_only = t == 0 && !a.preloaded;
        for (row, acc) in acc.iter().enumerate() {
            let d = a.dst.add(row * a.ld);
            for (v, &s) in acc.iter().enumerate() {
                let (dv, m) = (d.add(16 * v), a.masks[v]);
                let s = if store_only { s } else { _mm512_add_ps(_mm512_maskz_loadu_ps(m, dv), s) };
                _mm512_mask_storeu_ps(dv, m, s);
            }
        }
    }

    /// R output channels x V vectors of pixels, through every block.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<D: Depth, const R: usize, const V: usize>(a: &Tile<'_, D>) {
        for t in a.ts.clone() {
            let mut acc = [[_mm512_setzero_ps(); V]; R];
            for i in 0..a.depth.len(t) {
                let (wo, xo) = a.depth.row(t, i);
                let xr = a.x.add(xo);
                let mut xv = [_mm512_setzero_ps(); V];
                for (v, xv) in xv.iter_mut().enumerate() {
                    *xv = _mm512_maskz_loadu_ps(a.masks[v], xr.add(16 * v));
                }
                let wr = a.w.add(wo);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let b = _mm512_set1_ps(*wr.add(r));
                    for (acc, &xv) in acc.iter_mut().zip(&xv) {
                        *acc = _mm512_fmadd_ps(b, xv, *acc);
                    }
                }
            }
            finish(a, t, &acc);
        }
    }

    /// P pixels x V vectors of output channels, through every block.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_cl<D: Depth, const P: usize, const V: usize>(a: &Tile<'_, D>) {
        for t in a.ts.clone() {
            let mut acc = [[_mm512_setzero_ps(); V]; P];
            for i in 0..a.depth.len(t) {
                let (wo, xo) = a.depth.row(t, i);
                let wr = a.w.add(wo);
                let mut wv = [_mm512_setzero_ps(); V];
                for (v, wv) in wv.iter_mut().enumerate() {
                    *wv = _mm512_maskz_loadu_ps(a.masks[v], wr.add(16 * v));
                }
                let xr = a.x.add(xo);
                for (p, acc) in acc.iter_mut().enumerate() {
                    let b = _mm512_set1_ps(*xr.add(p));
                    for (acc, &wv) in acc.iter_mut().zip(&wv) {
                        *acc = _mm512_fmadd_ps(wv, b, *acc);
                    }
                }
            }
            finish(a, t, &acc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gemm::sgemm;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        // Magnitudes spread over many binades, so any change of order or rounding shows.
        (0..n).map(|i| ((i * 7919 + seed * 104729) % 1013) as f32 / 506.0 - 1.0).map(|v| v * (1.0 + (v * 9.0).abs()).powi(3)).collect()
    }

    /// The product this kernel replaces: one gemm per tap, accumulating from the second on.
    #[allow(clippy::too_many_arguments)]
    fn per_tap_gemm(w: &[f32], cout: usize, cin: usize, x: &[f32], plane: usize, offs: &[usize], n: usize, dst: &mut [f32], preloaded: bool) {
        for (t, &off) in offs.iter().enumerate() {
            // SAFETY: the test's buffers cover every index.
            unsafe { sgemm(cout, n, cin, dst.as_mut_ptr(), n, 1, preloaded || t > 0, w[t * cin * cout..].as_ptr(), 1, cout, x[off..].as_ptr(), plane, 1, 1.0, 1) };
        }
    }

    #[test]
    fn same_bits_as_one_gemm_per_tap() {
        if !crate::kernels::simd::has_avx512() {
            eprintln!("skipped: this CPU has no AVX-512, where conv_taps never runs");
            return;
        }
        // (cout, cin, taps, plane, n): tails of rows and pixel vectors, depth 3 and 512 (the
        // limits of one gemm depth block), a single pixel vector, strided taps; one depth block
        // at a time in two channel groups (40 + 30) over two pixel chunks (8 tiles, then one of
        // 16 px).
        for &(cout, cin, taps, plane, n, offs_step) in &[(70, 512, 5, 420, 400, 10), (16, 16, 9, 1190, 1088, 34), (3, 16, 9, 300, 288, 18), (19, 3, 9, 120, 80, 10), (2, 512, 4, 40, 18, 7), (9, 37, 1, 70, 50, 0), (64, 64, 9, 100, 24, 6), (130, 64, 9, 40, 23, 6), (70, 5, 9, 40, 13, 6), (17, 20, 3, 200, 161, 1)] {
            let offs: Vec<usize> = (0..taps).map(|t| (t / 3) * offs_step + t % 3).collect();
            let w_offs: Vec<usize> = (0..taps).map(|t| t * cin * cout).collect();
            let x = values(cin * plane + offs.iter().max().unwrap() + n, 1);
            let w = values(taps * cin * cout, 2);
            for preloaded in [false, true] {
                let init = values(cout * n, 3);
                let mut want = init.clone();
                per_tap_gemm(&w, cout, cin, &x, plane, &offs, n, &mut want, preloaded);
                for parallel in [false, true] {
                    let mut got = init.clone();
                    conv_taps(&w, &w_offs, cout, cin, &x, plane, &offs, n, &mut got, preloaded, parallel, Layout::Planar);
                    let diff = got.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                    assert_eq!(diff, 0, "planar: cout {cout}, cin {cin}, taps {taps}, n {n}, preloaded {preloaded}, parallel {parallel}: {diff} values differ");
                    // The same product written [n, cout]: the same values, transposed.
                    let mut got: Vec<f32> = (0..n * cout).map(|i| init[(i % cout) * n + i / cout]).collect();
                    conv_taps(&w, &w_offs, cout, cin, &x, plane, &offs, n, &mut got, preloaded, parallel, Layout::ChannelsLast);
                    let diff = (0..n * cout).filter(|&i| got[i].to_bits() != want[(i % cout) * n + i / cout].to_bits()).count();
                    assert_eq!(diff, 0, "channels last: cout {cout}, cin {cin}, taps {taps}, n {n}, preloaded {preloaded}, parallel {parallel}: {diff} values differ");
                }
            }
        }
    }

    #[test]
    fn large_tiles_pass_one_block_at_a_time() {
        let taps = |cin: usize, n: usize| Taps { w_offs: &[0; 9][..n], offs: &[0; 9][..n], cout: 512, cin, plane: 1 };
        // A 3x3 kernel: from 228 input channels (over 64 KiB of weights per tile).
        assert_eq!(tap_outer_group(&taps(227, 9), 512, Layout::Planar), None);
        // Groups of at most 128 KiB of weights per block, evened out in whole tiles.
        assert_eq!(tap_outer_group(&taps(228, 9), 512, Layout::Planar), Some(128));
        assert_eq!(tap_outer_group(&taps(512, 9), 512, Layout::Planar), Some(64));
        assert_eq!(tap_outer_group(&taps(512, 5), 70, Layout::Planar), Some(40));
        assert_eq!(tap_outer_group(&taps(320, 9), 320, Layout::Planar), Some(80));
        assert_eq!(tap_outer_group(&taps(512, 5), 20, Layout::Planar), Some(20));
        assert_eq!(tap_outer_group(&taps(512, 9), 512, Layout::ChannelsLast), None);
    }

    #[test]
    fn pack_taps_gathers_tap_channel_output_order() {
        let (cout, cin, taps) = (3, 2, 4);
        let w: Vec<f32> = (0..cout * cin * taps).map(|i| i as f32).collect();
        // [cout, cin, taps] storage: tap t of (co, ci) at co * cin * taps + ci * taps + t.
        let p = pack_taps(&w, cout, cin, taps, |t| (t, cin * taps, taps));
        for t in 0..taps {
            for ci in 0..cin {
                for co in 0..cout {
                    assert_eq!(p[(t * cin + ci) * cout + co], w[co * cin * taps + ci * taps + t]);
                }
            }
        }
    }
}
