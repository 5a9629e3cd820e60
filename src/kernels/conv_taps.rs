//! The f32 direct convolution over taps on AVX-512 or AVX2: `dst[co, p] (+)= Σ_t Σ_ci w[w_off[t] +
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
//! at least 2 output channels (1 takes its matrix-vector path) and the CPU has AVX-512 or
//! AVX2 with FMA (its kernels then use fused multiply-adds; the vector width changes which
//! entries run side by side, never an entry's chain). [`applies`] checks exactly that (and
//! that there are enough pixels to gain); elsewhere the caller keeps `gemm`.
//!
//! Why: per tap, `gemm` repacks the shifted input, and with few channels (the VAE's 16 at full
//! resolution, a depth of 16 per tap) its microkernel spends as long loading and storing the
//! output as multiplying. Here a tile of 8 channels x 48 pixels (6 x 16 with AVX2's 16 smaller
//! registers) stays in registers for a whole tap and the input is read in place. With AVX2
//! and deep taps, a tile's chains are held in memory between stretches of 32 input channels
//! (see [`depth_split`]), so that the stretch's inputs stay in L1 across the output channels.

#[cfg(target_arch = "x86_64")]
use super::gemm::{for_tasks, threads};
use super::io::Lines;
#[cfg(target_arch = "x86_64")]
use super::io::SendPtr;
#[cfg(target_arch = "x86_64")]
use std::ops::Range;

/// The register tiles of the instruction set this CPU runs the kernel with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// Output channels per planar tile.
    rows: usize,
    /// Pixels per planar tile.
    tile_px: usize,
    /// Pixels per channels-last tile.
    cl_pixels: usize,
    /// Output channels of a whole channels-last tile.
    cl_channels: usize,
}

/// The tiles for this CPU (each instruction set's [`x86::Isa::TILES`]), `None` where it has
/// neither AVX-512 nor AVX2 with FMA.
fn geometry() -> Option<Geometry> {
    geometries().into_iter().flatten().next()
}

/// The tiles of each instruction set this CPU has, widest first (an AVX-512 CPU also runs the
/// AVX2 tiles, which tests use).
fn geometries() -> [Option<Geometry>; 2] {
    #[cfg(target_arch = "x86_64")]
    let tiles = {
        use x86::Isa;
        [super::simd::has_avx512().then_some(x86::Avx512::TILES), super::simd::has_avx2().then_some(x86::Avx2::TILES)]
    };
    #[cfg(not(target_arch = "x86_64"))]
    let tiles = [None, None];
    tiles
}

/// Whether this CPU runs the direct kernels at all (AVX-512, or AVX2 with FMA).
pub(crate) fn available() -> bool {
    geometry().is_some()
}

/// Whether [`conv_taps`] runs this product on this CPU ([`available`], a depth of 3 to 512, at
/// least 2 rows and columns). It sums each entry in one chain over the depth, as `gemm`'s usual
/// kernels do in one block: `gemm`'s bits wherever it takes those ([`super::gemm::one_block`],
/// which also needs more than 256 outputs).
pub(crate) fn applies(cout: usize, cin: usize, n: usize) -> bool {
    available() && (3..=512).contains(&cin) && cout >= 2 && n >= 2
}

/// Whether `cout` output channels fill at least one whole channels-last tile, so that the
/// layout loses no lanes to the channels.
pub(crate) fn channels_last_fills(cout: usize) -> bool {
    geometry().is_some_and(|g| cout >= g.cl_channels)
}

/// Whether one `gemm` call per tap runs a large map's product of `cin` input channels per tap
/// faster than this kernel's planar tiles, which then give way (the bits are the same). On AVX2
/// a planar tile reads each input channel a plane away from the last, and the 6 x 16 tile
/// cannot hold its chains in registers through a deep tap while its inputs stay in L1; even in
/// the depth-split order (see [`depth_split`]) it ran SD-1.5's 3x3 convolutions of 128-512
/// channels at 45-65 % of a Zen 3 EPYC's FMA peak, where `gemm`, which packs each tap's
/// shifted input into panels, ran them at 60-85 % (README, "Large maps on AVX2 through
/// gemm"). Shallow taps (up to one stretch) keep the tiles, whose advantage there is what they
/// were made for; AVX-512's planar tiles too.
pub(crate) fn gemm_beats_planar(cin: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use x86::Isa;
        geometry() == Some(x86::Avx2::TILES) && cin > SPLIT_ROWS
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = cin;
        false
    }
}

/// Whether the planar layout is worth it: below one tile of pixels (a 4x4 map with AVX-512)
/// `gemm` was as fast; small maps take [`Layout::ChannelsLast`] instead.
pub(crate) fn planar_pays(n: usize) -> bool {
    geometry().is_some_and(|g| n >= g.tile_px)
}

/// How [`conv_taps`] lays out its result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// [cout, n]: pixels along the vector lanes, for large maps.
    Planar,
    /// [n, cout]: output channels along the lanes, every pixel used however small the map.
    ChannelsLast,
    /// [n, cout] as [`Layout::ChannelsLast`], for the `n` pixels of a map `cols` wide whose
    /// input rows are `stride` apart: pixel p reads the input at (p / cols)·stride + p % cols.
    /// A convolution's taps read a grid whose rows run past the map's (its padding); this
    /// skips those junk columns instead of computing and storing them (a third of the work of
    /// a padded 4x4 map).
    ChannelsLastRows { cols: usize, stride: usize },
}

impl Layout {
    /// (cols, stride) of the pixel rows of a channels-last layout of `n` pixels.
    fn rows(self, n: usize) -> Option<(usize, usize)> {
        match self {
            Layout::Planar => None,
            Layout::ChannelsLast => Some((n, n)),
            Layout::ChannelsLastRows { cols, stride } => Some((cols, stride)),
        }
    }

    /// The input offset of the last of `n` pixels (n >= 1).
    fn last_pixel(self, n: usize) -> usize {
        match self.rows(n) {
            Some((cols, stride)) => {
                assert!(cols >= 1 && stride >= cols, "conv_taps: rows of {cols} pixels {stride} apart");
                (n - 1) / cols * stride + (n - 1) % cols
            }
            None => n - 1,
        }
    }
}

/// The weight of tap `t` given as (offset, row stride, column stride) of its [cout, cin] matrix
/// in `w`, gathered as [tap][cin][cout], the order [`conv_taps`] reads it, from the start of a
/// cache line (so that with a multiple of 16 output channels every 16-channel run of a row is
/// one line).
pub(crate) fn pack_taps(w: &[f32], cout: usize, cin: usize, taps: usize, at: impl Fn(usize) -> (usize, usize, usize)) -> Lines {
    let mut out = Lines::uninit(taps * cin * cout);
    if cout == 0 {
        return out;
    }
    let mut rows = out.chunks_exact_mut(cout);
    for t in 0..taps {
        let (off, rs, cs) = at(t);
        for ci in 0..cin {
            let row = rows.next().expect("taps x cin rows of cout");
            row.iter_mut().enumerate().for_each(|(co, v)| *v = w[off + co * rs + ci * cs]);
        }
    }
    out
}

/// `dst` [cout, n] (row stride n; [n, cout] with [`Layout::ChannelsLast`])
/// `= (preloaded ? dst : 0) + Σ_t W_t @ X_t` with `W_t`[co, ci] = `w[w_offs[t] + ci·cout + co]`
/// (from [`pack_taps`], `w_offs[t] = t·cin·cout`) and `X_t`[ci, p] = `x[ci·plane + offs[t] + p]`.
/// With [`Layout::ChannelsLastRows`], `X_t`[ci, p] = `x[ci·plane + offs[t] + (p / cols)·stride +
/// p % cols]`. Pixel blocks are split across rayon's threads when `parallel`; the arithmetic is
/// the same.
///
/// Panics unless [`applies`] holds and `x` holds every element the offsets reach.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_taps(w: &[f32], w_offs: &[usize], cout: usize, cin: usize, x: &[f32], plane: usize, offs: &[usize], n: usize, dst: &mut [f32], preloaded: bool, parallel: bool, layout: Layout) {
    assert!(applies(cout, cin, n), "conv_taps: not applicable to cout {cout}, cin {cin}, n {n}");
    assert!(w_offs.len() == offs.len() && w_offs.iter().all(|&o| o + cin * cout <= w.len()) && dst.len() >= cout * n);
    let reach = offs.iter().max().copied().unwrap_or(0) + (cin - 1) * plane + layout.last_pixel(n) + 1;
    assert!(x.len() >= reach, "conv_taps: input of {} floats, the taps reach {reach}", x.len());
    run(the_geometry(), w, &Taps { w_offs, offs, cout, cin, plane }, cout, x, n, dst, preloaded, parallel, layout);
}

/// `dst` [cout, n] (row stride n; [n, cout] channels-last) `= Σ_b Σ_{r in block b} w[r·cout + co]
/// · x[x_offs[r] + p]` (`p` mapped as in [`conv_taps`] with [`Layout::ChannelsLastRows`]),
/// the depth rows taken in blocks of `block` (the last one shorter), each block one fused
/// multiply-add chain from zero added into the output: the arithmetic of one `gemm` product
/// `W [cout, K] @ U [K, n]` with `U[r, p] = x[x_offs[r] + p]` whose depth blocks are `block`
/// long (see [`super::conv_unfold`], where `U` is an unfolded input that is never built).
/// The caller checks that `gemm` would sum that way; this needs [`available`].
///
/// Panics unless `x` holds every element the offsets reach.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_rows(w: &[f32], cout: usize, x_offs: &[usize], block: usize, x: &[f32], n: usize, dst: &mut [f32], preloaded: bool, parallel: bool, layout: Layout) {
    assert!(available() && cout >= 1 && block >= 1 && n >= 1, "conv_rows: not applicable");
    assert!(w.len() >= x_offs.len() * cout && dst.len() >= cout * n);
    let reach = x_offs.iter().max().copied().unwrap_or(0) + layout.last_pixel(n) + 1;
    assert!(x.len() >= reach, "conv_rows: input of {} floats, the rows reach {reach}", x.len());
    run(the_geometry(), w, &Rows { x_offs, block, cout }, cout, x, n, dst, preloaded, parallel, layout);
}

/// Output channels per panel of [`pack_panels`]: one channels-last tile's width (16 with
/// AVX2, 64 with AVX-512).
pub(crate) fn panel_width() -> usize {
    the_geometry().cl_channels
}

/// A weight `W` [k, cout] (element (r, co) at `w[r·rs + co·cs]`) as panels of
/// [`panel_width`] output channels, each [k, width] and padded with zeros to the full width,
/// from the start of a cache line: the order [`panels`] reads it, one line per depth row of a
/// panel with AVX2 (four with AVX-512), the rows consecutive.
pub(crate) fn pack_panels(w: &[f32], k: usize, cout: usize, (rs, cs): (usize, usize)) -> Lines {
    use rayon::prelude::*;
    let width = panel_width();
    let count = cout.div_ceil(width);
    let mut out = Lines::uninit(count * k * width);
    if out.is_empty() {
        return out;
    }
    // The panels in parallel: a layer packs once, but the text encoder's are 340 MB in all.
    out.par_chunks_exact_mut(k * width).enumerate().for_each(|(j, panel)| {
        let c = (cout - j * width).min(width);
        if cs == 1 {
            for (r, row) in panel.chunks_exact_mut(width).enumerate() {
                let src = &w[r * rs + j * width..][..c];
                row[..c].copy_from_slice(src);
                row[c..].fill(0.0);
            }
        } else {
            // Each output channel's row of the weight is read in order.
            for (i, co) in (j * width..j * width + c).enumerate() {
                for (r, v) in panel.iter_mut().skip(i).step_by(width).enumerate() {
                    *v = w[r * rs + co * cs];
                }
            }
            for row in panel.chunks_exact_mut(width) {
                row[c..].fill(0.0);
            }
        }
    });
    out
}

/// `dst[p, co]` (rows `ld` apart) `= (preloaded ? dst : 0) + Σ_b Σ_{r in block b} W[r, co] ·
/// x[p·x_stride + r]` for the `n` rows `p` of `x`, the weight from [`pack_panels`], the depth
/// `k` taken in blocks of `block` (the last one shorter), each one fused multiply-add chain
/// from zero added into the output in order: the arithmetic of one `gemm` product whose depth
/// blocks are `block` long ([`super::gemm::depth_block`]), with the weight packed once instead
/// of on every call. Per depth block, each panel runs through every row tile while its block of
/// weights stays near the core; the panels are split across rayon's threads when `parallel`
/// (same arithmetic).
///
/// Panics unless [`available`] and the slices hold what the shapes say.
#[allow(clippy::too_many_arguments)]
pub(crate) fn panels(w: &[f32], cout: usize, k: usize, block: usize, x: &[f32], x_stride: usize, n: usize, dst: &mut [f32], ld: usize, preloaded: bool, parallel: bool) {
    assert!(available() && block >= 1 && k >= 1 && x_stride >= k && ld >= cout, "panels: not applicable");
    let width = panel_width();
    let count = cout.div_ceil(width);
    assert!(w.len() >= count * k * width && dst.len() >= n.saturating_sub(1) * ld + cout && x.len() >= n.saturating_sub(1) * x_stride + k);
    if n == 0 || cout == 0 {
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the direct kernel needs AVX-512 or AVX2");
    #[cfg(target_arch = "x86_64")]
    {
        let wide = the_geometry() == <x86::Avx512 as x86::Isa>::TILES;
        let x_offs: Vec<usize> = (0..k).collect();
        let depth = Rows { x_offs: &x_offs, block, cout: width };
        let dst_ptr = SendPtr(dst.as_mut_ptr());
        // Panels per task: a few, so that a task's weights for one block stay in L2.
        let per_task = if parallel { count.div_ceil(threads()).clamp(1, PANELS_PER_TASK) } else { PANELS_PER_TASK };
        for_tasks(count.div_ceil(per_task), parallel, |task| {
            let js = task * per_task..((task + 1) * per_task).min(count);
            for t in 0..depth.blocks() {
                for j in js.clone() {
                    let d = dst_ptr;
                    let c = (cout - j * width).min(width);
                    let wj = &w[j * k * width..(j + 1) * k * width];
                    // SAFETY: the instruction set was detected, the bounds checked above, and
                    // each task writes only its own panels' columns of dst.
                    unsafe {
                        let out = d.0.add(j * width);
                        if wide {
                            x86::block_cl_avx512(wj, &depth, c, ld, x, (1, x_stride), 0, n, out, preloaded, t..t + 1)
                        } else {
                            x86::block_cl_avx2(wj, &depth, c, ld, x, (1, x_stride), 0, n, out, preloaded, t..t + 1)
                        }
                    }
                }
            }
        });
    }
}

/// Panels per task of [`panels`] (its tasks' weights for one depth block of 512 rows: 128 KiB
/// with AVX2's 16-channel panels).
const PANELS_PER_TASK: usize = 4;

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

/// Depth rows a planar AVX2 tile runs at a stretch in [`run`]'s depth-split order. A tile's
/// chains are held between stretches as they stand (stored and reloaded, no rounding), so each
/// output's arithmetic is unchanged.
const SPLIT_ROWS: usize = 32;
/// Pixel tiles per task in the depth-split order. Of 32-64 rows by 8-32 tiles, 32 by 16 ran
/// SD-1.5's VAE convolutions fastest (within 3 % of the others); the held chains, up to 16
/// pixel tiles x 86 output tiles x 96 floats (528 KiB for 512 channels), come back from L2.
const SPLIT_TILES: usize = 16;

/// Whether [`run`] takes the depth-split order: planar AVX2 tiles over blocks deeper than one
/// stretch. There a task runs each depth block [`SPLIT_ROWS`] rows at a time, and each stretch
/// for every output tile over its [`SPLIT_TILES`] pixel tiles, so that the inputs of those rows
/// stay in L1 across the output channels. Running each tile through its whole depth instead,
/// every row brought new input and weight lines from L2 (a tile's input over 128 channels and
/// 3 rows of taps is 48 KiB, the L1 32 KiB on the Zen CPU measured), and the 6 x 16 tile ran
/// SD-1.5's VAE convolutions (128-512 channels) at 40-50 % of the FMA peak; now 61-68 %. On a
/// CPU with twice that FMA rate `gemm` ran them faster still, and `conv2d` now gives them to it
/// ([`gemm_beats_planar`]); this order still serves the other deep planar products here.
fn depth_split<D: Depth>(depth: &D, layout: Layout, wide: bool) -> bool {
    !wide && layout == Layout::Planar && (0..depth.blocks()).any(|t| depth.len(t) > SPLIT_ROWS)
}

/// Output channels per task that passes one depth block at a time, or `None` to keep each tile
/// in registers through every block (few weights per tile, or the channels-last layout);
/// `rows` output channels per tile.
fn tap_outer_group<D: Depth>(depth: &D, cout: usize, layout: Layout, rows_per_tile: usize) -> Option<usize> {
    let rows: usize = (0..depth.blocks()).map(|t| depth.len(t)).sum();
    let per_block = depth.len(0).max(1);
    if layout != Layout::Planar || rows * rows_per_tile * 4 <= TILE_WEIGHT_BYTES {
        return None;
    }
    let most = (GROUP_WEIGHT_BYTES / 4 / per_block / rows_per_tile * rows_per_tile).max(rows_per_tile);
    // Groups of even size (whole tiles), so that they make tasks of even size.
    let groups = cout.div_ceil(most);
    Some((cout.div_ceil(groups).div_ceil(rows_per_tile) * rows_per_tile).min(cout))
}

fn the_geometry() -> Geometry {
    geometry().expect("the direct convolution kernel needs AVX-512 or AVX2 with FMA")
}

/// The product with the tiles `g` (this CPU's, or in tests a narrower instruction set's that
/// it also has).
#[allow(clippy::too_many_arguments)]
fn run<D: Depth>(g: Geometry, w: &[f32], depth: &D, cout: usize, x: &[f32], n: usize, dst: &mut [f32], preloaded: bool, parallel: bool, layout: Layout) {
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the direct convolution kernel needs AVX-512 or AVX2 ({g:?})");
    #[cfg(target_arch = "x86_64")]
    {
        let wide = g == <x86::Avx512 as x86::Isa>::TILES;
        let tile_px = if layout == Layout::Planar { g.tile_px } else { g.cl_pixels };
        let blocks = n.div_ceil(tile_px);
        let dst_ptr = SendPtr(dst.as_mut_ptr());
        let run = |blk: usize, cos: Range<usize>, ts: Range<usize>| {
            let d = dst_ptr;
            let p0 = blk * tile_px;
            let px = (n - p0).min(tile_px);
            // SAFETY: `geometry` detected the instruction set, the callers checked the bounds,
            // and each block writes only its own pixels of dst.
            unsafe {
                if wide {
                    x86::block_avx512(w, depth, x, n, p0, px, d.0, preloaded, cos, ts, None)
                } else {
                    x86::block_avx2(w, depth, x, n, p0, px, d.0, preloaded, cos, ts, None)
                }
            }
        };
        // Channels-last: the tiles `blks`, all output channels.
        let px_rows = layout.rows(n).unwrap_or((n, n));
        let run_cl = |blks: Range<usize>| {
            let d = dst_ptr;
            let (p0, p1) = (blks.start * tile_px, (blks.end * tile_px).min(n));
            // SAFETY: as for `run`.
            unsafe {
                if wide {
                    x86::block_cl_avx512(w, depth, cout, cout, x, px_rows, p0, p1, d.0, preloaded, 0..depth.blocks())
                } else {
                    x86::block_cl_avx2(w, depth, cout, cout, x, px_rows, p0, p1, d.0, preloaded, 0..depth.blocks())
                }
            }
        };
        let nb = depth.blocks();
        if depth_split(depth, layout, wide) {
            // Tasks of a few pixel tiles and a group of output channels, sized so that even
            // one small image makes enough of them. Per depth block, the rows in stretches;
            // per stretch, each output tile over the task's pixel tiles, each tile's chain
            // held in `carry` between stretches.
            let chunks = blocks.div_ceil(SPLIT_TILES);
            let tiles_co = cout.div_ceil(g.rows);
            let want = if parallel { 4 * threads() } else { 1 };
            let co_groups = want.div_ceil(chunks).clamp(1, tiles_co);
            let group = tiles_co.div_ceil(co_groups) * g.rows;
            let groups = cout.div_ceil(group);
            let carry_tile = g.rows * g.tile_px;
            for_tasks(chunks * groups, parallel, |task| {
                let (chunk, gi) = (task / groups, task % groups);
                let blks = chunk * SPLIT_TILES..((chunk + 1) * SPLIT_TILES).min(blocks);
                let cos = gi * group..((gi + 1) * group).min(cout);
                let tiles_here = cos.len().div_ceil(g.rows);
                let mut carry = vec![0f32; blks.len() * tiles_here * carry_tile];
                // The whole pixel tiles in one call, then a partial last one.
                let whole = blks.start..blks.end.min(n / tile_px);
                let runs = [whole.clone(), whole.end.max(blks.start)..blks.end];
                for t in 0..nb {
                    let len = depth.len(t);
                    for r0 in (0..len).step_by(SPLIT_ROWS) {
                        let rows = r0..(r0 + SPLIT_ROWS).min(len);
                        for (k, co) in cos.clone().step_by(g.rows).enumerate() {
                            let co = co..(co + g.rows).min(cos.end);
                            for run in runs.iter().filter(|r| !r.is_empty()) {
                                let d = dst_ptr;
                                let p0 = run.start * tile_px;
                                let px = (n - p0).min(tile_px);
                                let j = run.start - blks.start;
                                let part = x86::Part {
                                    rows: rows.clone(),
                                    tiles: run.len(),
                                    carry: carry[(j * tiles_here + k) * carry_tile..].as_mut_ptr(),
                                    carry_stride: tiles_here * carry_tile,
                                    resume: r0 > 0,
                                    hold: rows.end < len,
                                };
                                // SAFETY: as for `run`; `carry` holds these tiles' chains.
                                unsafe { x86::block_avx2(w, depth, x, n, p0, px, d.0, preloaded, co.clone(), t..t + 1, Some(&part)) }
                            }
                        }
                    }
                }
            });
            return;
        }
        match tap_outer_group(depth, cout, layout, g.rows) {
            None => {
                // Several tiles per task so that a task's input rows stay in cache across
                // channels; each tile runs through every depth block in registers.
                let per_task = if parallel { blocks.div_ceil(4 * threads()).max(1) } else { blocks };
                let task_blocks = |task: usize| task * per_task..((task + 1) * per_task).min(blocks);
                match layout {
                    Layout::Planar => for_tasks(blocks.div_ceil(per_task), parallel, |task| task_blocks(task).for_each(|b| run(b, 0..cout, 0..nb))),
                    Layout::ChannelsLast | Layout::ChannelsLastRows { .. } => for_tasks(blocks.div_ceil(per_task), parallel, |task| run_cl(task_blocks(task))),
                }
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

/// The tiles, written once over [`x86::Isa`] (a vector register and its masked loads and
/// stores) and compiled for AVX-512 and for AVX2 with FMA.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Depth, Geometry};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// One instruction set's vector of `LANES` floats. Every method is only called from
    /// functions compiled with the set's features.
    pub(super) trait Isa {
        const LANES: usize;
        /// The register tiles (planar pixels: `LANES * VECS`).
        const TILES: Geometry;
        /// Vectors along a planar tile's row of pixels.
        const VECS: usize;
        /// Vectors along a channels-last tile's row of output channels.
        const CL_VECS: usize;
        type V: Copy;
        type M: Copy;
        /// The first `lanes` lanes (all from `LANES` up).
        unsafe fn mask(lanes: usize) -> Self::M;
        unsafe fn zero() -> Self::V;
        unsafe fn load(p: *const f32) -> Self::V;
        /// Zero in the lanes outside `m`, which are not read.
        unsafe fn load_masked(m: Self::M, p: *const f32) -> Self::V;
        unsafe fn store(p: *mut f32, v: Self::V);
        unsafe fn store_masked(m: Self::M, p: *mut f32, v: Self::V);
        unsafe fn splat(x: f32) -> Self::V;
        unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
        /// a * b + c, one rounding.
        unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    }

    pub(super) struct Avx512;
    pub(super) struct Avx2;

    /// 8 channels x 3 vectors of 16 pixels (24 of the 32 registers accumulate); channels-last
    /// 6 pixels x up to 4 vectors of 16 channels.
    impl Isa for Avx512 {
        const LANES: usize = 16;
        const TILES: Geometry = Geometry { rows: 8, tile_px: Self::LANES * Self::VECS, cl_pixels: 6, cl_channels: Self::LANES * Self::CL_VECS };
        const VECS: usize = 3;
        const CL_VECS: usize = 4;
        type V = __m512;
        type M = __mmask16;
        #[inline(always)]
        unsafe fn mask(lanes: usize) -> __mmask16 {
            crate::kernels::simd::first_lanes(lanes)
        }
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn load_masked(m: __mmask16, p: *const f32) -> __m512 {
            _mm512_maskz_loadu_ps(m, p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn store_masked(m: __mmask16, p: *mut f32, v: __m512) {
            _mm512_mask_storeu_ps(p, m, v)
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            _mm512_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            _mm512_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
    }

    /// 6 channels x 2 vectors of 8 pixels (12 of the 16 registers accumulate, 2 hold the input
    /// row and 1 the broadcast weight: 3 vectors of pixels would leave no register free, and the
    /// compiler spilled an accumulator through the stack, a store and load on every row's
    /// chain); channels-last 6 pixels x up to 2 vectors of 8 channels.
    impl Isa for Avx2 {
        const LANES: usize = 8;
        const TILES: Geometry = Geometry { rows: 6, tile_px: Self::LANES * Self::VECS, cl_pixels: 6, cl_channels: Self::LANES * Self::CL_VECS };
        const VECS: usize = 2;
        const CL_VECS: usize = 2;
        type V = __m256;
        type M = __m256i;
        #[inline(always)]
        unsafe fn mask(lanes: usize) -> __m256i {
            let n = lanes.min(8) as i32;
            _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
        }
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn load_masked(m: __m256i, p: *const f32) -> __m256 {
            _mm256_maskload_ps(p, m)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn store_masked(m: __m256i, p: *mut f32, v: __m256) {
            _mm256_maskstore_ps(p, m, v)
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            _mm256_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
    }

    /// The entry points, one per instruction set and layout, each compiled with its features
    /// so that the tiles inline into it; each runs the tile sizes of its set's [`Geometry`]
    /// (`$rows` channels by up to `VECS` vectors planar, `$px` pixels by up to `CL_VECS`
    /// vectors channels-last), with or without a partial last vector.
    macro_rules! entries {
        ($isa:ty, $features:literal, $block:ident, $block_cl:ident, [$($r:literal),*], [$($p:literal),*]) => {
            /// Output channels `cos` of the pixels `p0..p0 + px` (px ≤ one tile) through depth
            /// blocks `ts`, written as [cout, n]; with `part`, only its rows of the one block in
            /// `ts`, for its `tiles` tiles from `p0` (whole ones when more than one), `cos` one
            /// tile of channels.
            ///
            /// # Safety
            /// The CPU has the features; the depth's rows, `x` and `dst` cover the tiles, and
            /// `part`'s carry holds each of them.
            #[allow(clippy::too_many_arguments)]
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $block<D: Depth>(w: &[f32], depth: &D, x: &[f32], n: usize, p0: usize, px: usize, dst: *mut f32, preloaded: bool, cos: Range<usize>, ts: Range<usize>, part: Option<&Part>) {
                type I = $isa;
                let vecs = px.div_ceil(I::LANES);
                let masked = px % I::LANES != 0;
                let last = I::mask(px - (vecs - 1) * I::LANES);
                let mut co = cos.start;
                while co < cos.end {
                    let rows = (cos.end - co).min(I::TILES.rows);
                    let args = Tile::<I, D> { w: w.as_ptr().add(co), depth, x: x.as_ptr().add(p0), pix: [0; 8], dst: dst.add(co * n + p0), ld: n, last, preloaded, ts: ts.clone(), part };
                    match (rows, vecs, masked) {
                        $(
                            ($r, 1, false) => tile::<I, D, $r, 1, false>(&args),
                            ($r, 2, false) => tile::<I, D, $r, 2, false>(&args),
                            ($r, _, false) => tile::<I, D, $r, { <$isa>::VECS }, false>(&args),
                            ($r, 1, true) => tile::<I, D, $r, 1, true>(&args),
                            ($r, 2, true) => tile::<I, D, $r, 2, true>(&args),
                            ($r, _, true) => tile::<I, D, $r, { <$isa>::VECS }, true>(&args),
                        )*
                        _ => unreachable!(),
                    }
                    co += rows;
                }
            }

            /// All output channels of the pixels `p0..p1` (in rows of `cols` pixels whose inputs
            /// are `stride` apart), written as [n, cout]: per group of
            /// output channels (one tile wide), every tile of pixels in turn, so that the
            /// group's weights stay in cache across the pixels (over all channels they may not:
            /// 128 channels in and out of a 3x3 convolution are 576 KiB).
            ///
            /// # Safety
            /// As the planar entry.
            #[allow(clippy::too_many_arguments)]
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $block_cl<D: Depth>(w: &[f32], depth: &D, cout: usize, ld: usize, x: &[f32], (cols, stride): (usize, usize), p0: usize, p1: usize, dst: *mut f32, preloaded: bool, ts: Range<usize>) {
                type I = $isa;
                let mut co = 0;
                while co < cout {
                    let lanes = (cout - co).min(I::LANES * I::CL_VECS);
                    let vecs = lanes.div_ceil(I::LANES);
                    let masked = lanes % I::LANES != 0;
                    let last = I::mask(lanes - (vecs - 1) * I::LANES);
                    let mut p = p0;
                    while p < p1 {
                        let px = (p1 - p).min(I::TILES.cl_pixels);
                        let at = |p: usize| p / cols * stride + p % cols;
                        // A tile within one row reads consecutive inputs; one across rows, each
                        // pixel's from `pix`.
                        let split = p % cols + px > cols;
                        let mut pix = [0; 8];
                        if split {
                            for (j, o) in pix.iter_mut().enumerate().take(px) {
                                *o = at(p + j) - at(p);
                            }
                        }
                        let args = Tile::<I, D> { w: w.as_ptr().add(co), depth, x: x.as_ptr().add(at(p)), pix, dst: dst.add(p * ld + co), ld, last, preloaded, ts: ts.clone(), part: None };
                        match (px, vecs, masked, split) {
                            $(
                                ($p, 1, false, false) => tile_cl::<I, D, $p, 1, false, false>(&args),
                                ($p, 2, false, false) => tile_cl::<I, D, $p, 2, false, false>(&args),
                                ($p, 3, false, false) => tile_cl::<I, D, $p, 3, false, false>(&args),
                                ($p, _, false, false) => tile_cl::<I, D, $p, { <$isa>::CL_VECS }, false, false>(&args),
                                ($p, 1, true, false) => tile_cl::<I, D, $p, 1, true, false>(&args),
                                ($p, 2, true, false) => tile_cl::<I, D, $p, 2, true, false>(&args),
                                ($p, 3, true, false) => tile_cl::<I, D, $p, 3, true, false>(&args),
                                ($p, _, true, false) => tile_cl::<I, D, $p, { <$isa>::CL_VECS }, true, false>(&args),
                                ($p, 1, false, true) => tile_cl::<I, D, $p, 1, false, true>(&args),
                                ($p, 2, false, true) => tile_cl::<I, D, $p, 2, false, true>(&args),
                                ($p, 3, false, true) => tile_cl::<I, D, $p, 3, false, true>(&args),
                                ($p, _, false, true) => tile_cl::<I, D, $p, { <$isa>::CL_VECS }, false, true>(&args),
                                ($p, 1, true, true) => tile_cl::<I, D, $p, 1, true, true>(&args),
                                ($p, 2, true, true) => tile_cl::<I, D, $p, 2, true, true>(&args),
                                ($p, 3, true, true) => tile_cl::<I, D, $p, 3, true, true>(&args),
                                ($p, _, true, true) => tile_cl::<I, D, $p, { <$isa>::CL_VECS }, true, true>(&args),
                            )*
                            _ => unreachable!(),
                        }
                        p += px;
                    }
                    co += lanes;
                }
            }
        };
    }
    entries!(Avx512, "avx512f", block_avx512, block_cl_avx512, [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]);
    entries!(Avx2, "avx2,fma", block_avx2, block_cl_avx2, [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]);

    struct Tile<'a, I: Isa, D> {
        /// Weight of this tile's first output channel, before a row's offset.
        w: *const f32,
        depth: &'a D,
        /// Input at this tile's first pixel, before a row's offset.
        x: *const f32,
        /// Channels-last tiles across rows of pixels: each pixel's input offset from `x`.
        pix: [usize; 8],
        /// Output at this tile's first channel and pixel; its rows (channels, or pixels when
        /// channels-last) are `ld` apart and its vectors run along them.
        dst: *mut f32,
        ld: usize,
        /// Lanes of the last vector along an output row (the others are whole).
        last: I::M,
        preloaded: bool,
        /// The depth blocks to run.
        ts: Range<usize>,
        /// Only some rows of one block, the chains held in between (planar tiles).
        part: Option<&'a Part>,
    }

    /// A stretch of one depth block's rows for `tiles` planar tiles side by side, whose chains
    /// are held between stretches: `carry` holds each tile's accumulators as they stand, `rows`
    /// x `VECS` vectors, the tiles `carry_stride` floats apart.
    pub(super) struct Part {
        pub rows: Range<usize>,
        /// Whole tiles (or one partial tile) from the entry's first pixel.
        pub tiles: usize,
        pub carry: *mut f32,
        pub carry_stride: usize,
        /// Start from the held chains (not from zero).
        pub resume: bool,
        /// Hold the chains at the end (the block's rows go on) instead of adding them to the
        /// output.
        pub hold: bool,
    }

    /// Vector `v` of `V` along a row at `p`: whole, or the last one masked if `MASKED`.
    #[inline(always)]
    unsafe fn load_vec<I: Isa, const V: usize, const MASKED: bool>(last: I::M, p: *const f32, v: usize) -> I::V {
        if v + 1 < V || !MASKED {
            I::load(p.add(I::LANES * v))
        } else {
            I::load_masked(last, p.add(I::LANES * v))
        }
    }

    /// Block `t`'s chains added into the output (or stored, for the first block of an output
    /// that was not preloaded): `acc[row][vector]`.
    #[inline(always)]
    unsafe fn finish<I: Isa, D, const A: usize, const V: usize, const MASKED: bool>(a: &Tile<'_, I, D>, dst: *mut f32, t: usize, acc: &[[I::V; V]; A]) {
        let store_only = t == 0 && !a.preloaded;
        for (row, acc) in acc.iter().enumerate() {
            let d = dst.add(row * a.ld);
            for (v, &s) in acc.iter().enumerate() {
                let s = if store_only { s } else { I::add(load_vec::<I, V, MASKED>(a.last, d, v), s) };
                if v + 1 < V || !MASKED {
                    I::store(d.add(I::LANES * v), s);
                } else {
                    I::store_masked(a.last, d.add(I::LANES * v), s);
                }
            }
        }
    }

    /// R output channels x V vectors of pixels (the last one partial if `MASKED`), through every
    /// block.
    #[inline(always)]
    unsafe fn tile<I: Isa, D: Depth, const R: usize, const V: usize, const MASKED: bool>(a: &Tile<'_, I, D>) {
        for k in 0..a.part.map_or(1, |p| p.tiles) {
            let held = a.part.map(|p| (p, p.carry.add(k * p.carry_stride)));
            tile_at::<I, D, R, V, MASKED>(a, a.x.add(k * V * I::LANES), a.dst.add(k * V * I::LANES), held);
        }
    }

    /// One tile of [`tile`] at input `x` and output `dst`; running a [`Part`], its chains held
    /// at `carry`.
    #[inline(always)]
    unsafe fn tile_at<I: Isa, D: Depth, const R: usize, const V: usize, const MASKED: bool>(a: &Tile<'_, I, D>, x: *const f32, dst: *mut f32, held: Option<(&Part, *mut f32)>) {
        for t in a.ts.clone() {
            let mut acc = [[I::zero(); V]; R];
            let rows = match held {
                Some((part, carry)) => {
                    if part.resume {
                        for (r, acc) in acc.iter_mut().enumerate() {
                            for (v, acc) in acc.iter_mut().enumerate() {
                                *acc = I::load(carry.add((r * V + v) * I::LANES));
                            }
                        }
                    }
                    part.rows.clone()
                }
                None => 0..a.depth.len(t),
            };
            for i in rows {
                let (wo, xo) = a.depth.row(t, i);
                let xr = x.add(xo);
                let mut xv = [I::zero(); V];
                for (v, xv) in xv.iter_mut().enumerate() {
                    *xv = load_vec::<I, V, MASKED>(a.last, xr, v);
                }
                let wr = a.w.add(wo);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let b = I::splat(*wr.add(r));
                    for (acc, &xv) in acc.iter_mut().zip(&xv) {
                        *acc = I::fma(b, xv, *acc);
                    }
                }
            }
            if let Some((part, carry)) = held {
                if part.hold {
                    for (r, acc) in acc.iter().enumerate() {
                        for (v, &acc) in acc.iter().enumerate() {
                            I::store(carry.add((r * V + v) * I::LANES), acc);
                        }
                    }
                    continue;
                }
            }
            finish::<I, D, R, V, MASKED>(a, dst, t, &acc);
        }
    }

    /// P pixels x V vectors of output channels (the last one partial if `MASKED`), through
    /// every block; the pixels' inputs consecutive, or at `a.pix` if `SPLIT`.
    #[inline(always)]
    unsafe fn tile_cl<I: Isa, D: Depth, const P: usize, const V: usize, const MASKED: bool, const SPLIT: bool>(a: &Tile<'_, I, D>) {
        for t in a.ts.clone() {
            let mut acc = [[I::zero(); V]; P];
            for i in 0..a.depth.len(t) {
                let (wo, xo) = a.depth.row(t, i);
                let wr = a.w.add(wo);
                let mut wv = [I::zero(); V];
                for (v, wv) in wv.iter_mut().enumerate() {
                    *wv = load_vec::<I, V, MASKED>(a.last, wr, v);
                }
                let xr = a.x.add(xo);
                for (p, acc) in acc.iter_mut().enumerate() {
                    let b = I::splat(*xr.add(if SPLIT { a.pix[p] } else { p }));
                    for (acc, &wv) in acc.iter_mut().zip(&wv) {
                        *acc = I::fma(wv, b, *acc);
                    }
                }
            }
            finish::<I, D, P, V, MASKED>(a, a.dst, t, &acc);
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
        if !available() {
            eprintln!("skipped: this CPU has neither AVX-512 nor AVX2 with FMA, where conv_taps never runs");
            return;
        }
        // (cout, cin, taps, plane, n): tails of rows and pixel vectors, depth 3 and 512 (the
        // limits of one gemm depth block), a single pixel vector, strided taps; one depth block
        // at a time in two channel groups (40 + 30) over two pixel chunks (8 tiles, then one of
        // 16 px).
        // Every instruction set this CPU has: an AVX-512 CPU also runs the AVX2 tiles (and
        // their depth-split order, from 33 input channels), which other CPUs take.
        let tiles: Vec<Geometry> = geometries().into_iter().flatten().collect();
        for &(cout, cin, taps, plane, n, offs_step) in &[(70, 512, 5, 420, 400, 10), (16, 16, 9, 1190, 1088, 34), (3, 16, 9, 300, 288, 18), (19, 3, 9, 120, 80, 10), (2, 512, 4, 40, 18, 7), (9, 37, 1, 70, 50, 0), (64, 64, 9, 100, 24, 6), (130, 64, 9, 40, 23, 6), (70, 5, 9, 40, 13, 6), (17, 20, 3, 200, 161, 1)] {
            let offs: Vec<usize> = (0..taps).map(|t| (t / 3) * offs_step + t % 3).collect();
            let w_offs: Vec<usize> = (0..taps).map(|t| t * cin * cout).collect();
            let x = values(cin * plane + offs.iter().max().unwrap() + n, 1);
            let w = values(taps * cin * cout, 2);
            for preloaded in [false, true] {
                let init = values(cout * n, 3);
                let mut want = init.clone();
                per_tap_gemm(&w, cout, cin, &x, plane, &offs, n, &mut want, preloaded);
                for (parallel, &g) in [false, true].into_iter().flat_map(|p| tiles.iter().map(move |g| (p, g))) {
                    let conv = |n: usize, dst: &mut [f32], layout: Layout| {
                        if g == the_geometry() {
                            conv_taps(&w, &w_offs, cout, cin, &x, plane, &offs, n, dst, preloaded, parallel, layout)
                        } else {
                            run(g, &w, &Taps { w_offs: &w_offs, offs: &offs, cout, cin, plane }, cout, &x, n, dst, preloaded, parallel, layout)
                        }
                    };
                    let mut got = init.clone();
                    conv(n, &mut got, Layout::Planar);
                    let diff = got.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                    assert_eq!(diff, 0, "planar, {g:?}: cout {cout}, cin {cin}, taps {taps}, n {n}, preloaded {preloaded}, parallel {parallel}: {diff} values differ");
                    // The same product written [n, cout]: the same values, transposed.
                    let mut got: Vec<f32> = (0..n * cout).map(|i| init[(i % cout) * n + i / cout]).collect();
                    conv(n, &mut got, Layout::ChannelsLast);
                    let diff = (0..n * cout).filter(|&i| got[i].to_bits() != want[(i % cout) * n + i / cout].to_bits()).count();
                    assert_eq!(diff, 0, "channels last, {g:?}: cout {cout}, cin {cin}, taps {taps}, n {n}, preloaded {preloaded}, parallel {parallel}: {diff} values differ");
                    // Only the pixels of rows `cols` wide, `offs_step` apart (a padded map's grid
                    // without its junk columns), written [pixel, cout]: tiles across rows read
                    // each pixel's input on its own.
                    if offs_step > 2 {
                        let (cols, stride) = (offs_step - 2, offs_step);
                        let at = |p: usize| p / cols * stride + p % cols;
                        let m = (n / stride) * cols + (n % stride).min(cols);
                        let mut got: Vec<f32> = (0..m * cout).map(|i| init[(i % cout) * n + at(i / cout)]).collect();
                        conv(m, &mut got, Layout::ChannelsLastRows { cols, stride });
                        let diff = (0..m * cout).filter(|&i| got[i].to_bits() != want[(i % cout) * n + at(i / cout)].to_bits()).count();
                        assert_eq!(diff, 0, "channels last, rows of {cols}, {g:?}: cout {cout}, cin {cin}, taps {taps}, n {m}, preloaded {preloaded}, parallel {parallel}: {diff} values differ");
                    }
                }
            }
        }
    }

    #[test]
    fn large_tiles_pass_one_block_at_a_time() {
        let taps = |cin: usize, n: usize| Taps { w_offs: &[0; 9][..n], offs: &[0; 9][..n], cout: 512, cin, plane: 1 };
        // A 3x3 kernel: from 228 input channels (over 64 KiB of weights per tile).
        assert_eq!(tap_outer_group(&taps(227, 9), 512, Layout::Planar, 8), None);
        // Groups of at most 128 KiB of weights per block, evened out in whole tiles.
        assert_eq!(tap_outer_group(&taps(228, 9), 512, Layout::Planar, 8), Some(128));
        assert_eq!(tap_outer_group(&taps(512, 9), 512, Layout::Planar, 8), Some(64));
        assert_eq!(tap_outer_group(&taps(512, 5), 70, Layout::Planar, 8), Some(40));
        assert_eq!(tap_outer_group(&taps(320, 9), 320, Layout::Planar, 8), Some(80));
        assert_eq!(tap_outer_group(&taps(512, 5), 20, Layout::Planar, 8), Some(20));
        assert_eq!(tap_outer_group(&taps(512, 9), 512, Layout::ChannelsLast, 8), None);
    }

    #[test]
    fn pack_taps_gathers_tap_channel_output_order() {
        let (cout, cin, taps) = (3, 2, 4);
        let w: Vec<f32> = (0..cout * cin * taps).map(|i| i as f32).collect();
        // [cout, cin, taps] storage: tap t of (co, ci) at co * cin * taps + ci * taps + t.
        let p = pack_taps(&w, cout, cin, taps, |t| (t, cin * taps, taps));
        assert_eq!(p.len(), cout * cin * taps);
        assert_eq!(p.as_ptr() as usize % 64, 0, "the packed weight starts a cache line");
        for t in 0..taps {
            for ci in 0..cin {
                for co in 0..cout {
                    assert_eq!(p[(t * cin + ci) * cout + co], w[co * cin * taps + ci * taps + t]);
                }
            }
        }
    }
}
