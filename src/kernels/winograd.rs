//! 3x3 stride-1 f32 convolutions of many channels on large maps by Winograd's minimal filtering
//! F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016):
//! each 2x2 block of outputs comes from the 4x4 block of padded input around it through
//! `Y = Aᵀ [Σ_ci (G g Gᵀ) ⊙ (Bᵀ d B)] A`, 16 multiply-adds per block and (input, output)
//! channel pair in place of 36, 2.25 times fewer. The sum over input channels is, for each of the 16
//! positions ξ of the transformed block, one matrix product `M[ξ] = U[ξ] · V[ξ]`
//! ([cout, cin] by [cin, blocks]) through `gemm`, so the bulk of the work keeps its packed
//! microkernel while the transforms cost a few additions per input and output value.
//!
//! The result is not the direct sum's bits: the transforms round, and the products sum
//! transformed values. Its error stays of the direct sum's order (the transforms only add,
//! subtract and halve; see the unit test's bound against an f64 reference); `conv2d` takes
//! this path only on shapes where it pays ([`pays`]), a choice of the layer's shape alone, so
//! the bytes still do not depend on the batch size, the thread count or the shard.
//!
//! The blocks are processed in bands of block rows ([`band_rows`]), so each band's transformed
//! input and products stay a few MiB; on a single image the bands run in parallel, and with
//! fewer bands than threads each product also splits across the threads (the same arithmetic
//! either way: `gemm` splits outputs, never sums).
use rayon::prelude::*;

use super::gemm::sgemm;
use super::io::{uninit, SendPtr};
use super::simd::dispatch;

/// Input and output channels from which the 2.25x fewer multiply-adds outweigh the transforms.
const MIN_CHANNELS: usize = 128;
/// Output pixels from which the blocks of a band fill `gemm`'s panels.
const MIN_PIXELS: usize = 32 * 32;
/// Blocks per band, about: enough columns for `gemm`'s packed panels, few enough that a
/// band's transformed input (16 x cin x blocks) stays in the last-level cache.
const BAND_BLOCKS: usize = 128;

/// Whether a 3x3 stride-1 f32 convolution of `cin` -> `cout` channels with a `ho` x `wo`
/// output takes this path.
pub(crate) fn pays(cin: usize, cout: usize, ho: usize, wo: usize) -> bool {
    cin >= MIN_CHANNELS && cout >= MIN_CHANNELS && ho * wo >= MIN_PIXELS && ho >= 2 && wo >= 2
}

/// The padded input size the path reads for a `ho` x `wo` output: whole 2x2 blocks, so an
/// odd size gets one more row / column of zeros (which only the dropped outputs read).
pub(crate) fn padded_size(ho: usize, wo: usize) -> (usize, usize) {
    (ho.div_ceil(2) * 2 + 2, wo.div_ceil(2) * 2 + 2)
}

/// Block rows per band for a map of `bh` x `bw` blocks: bands of about [`BAND_BLOCKS`] blocks,
/// all but the last of the same height.
fn band_rows(bh: usize, bw: usize) -> usize {
    let bands = (bh * bw).div_ceil(BAND_BLOCKS).max(1);
    bh.div_ceil(bands)
}

/// The transformed weight `U[ξ][co][ci] = (G g Gᵀ)[ξ]` of a 3x3 weight stored [cout, cin, 3,
/// 3] or, `tap_major`, [3, 3, cin, cout]; G = [[1, 0, 0], [½, ½, ½], [½, -½, ½], [0, 0, 1]].
pub(crate) fn transform_weight(w: &[f32], cout: usize, cin: usize, tap_major: bool) -> Vec<f32> {
    assert_eq!(w.len(), cout * cin * 9, "winograd: weight of {} values for {cout} x {cin} x 3 x 3", w.len());
    let mut u = uninit(16 * cout * cin);
    let per = cout * cin;
    let u_ptr = SendPtr(u.as_mut_ptr());
    (0..cout).into_par_iter().for_each(|co| {
        let up = u_ptr;
        for ci in 0..cin {
            let g = |ky: usize, kx: usize| match tap_major {
                true => w[((ky * 3 + kx) * cin + ci) * cout + co],
                false => w[((co * cin + ci) * 3 + ky) * 3 + kx],
            };
            // t = G g (4 x 3), then U = t Gᵀ (4 x 4).
            let cols = [0, 1, 2].map(|kx| {
                let (g0, g1, g2) = (g(0, kx), g(1, kx), g(2, kx));
                [g0, (g0 + g1 + g2) * 0.5, (g0 - g1 + g2) * 0.5, g2]
            });
            let t = [0, 1, 2, 3].map(|r| [cols[0][r], cols[1][r], cols[2][r]]);
            for (r, tr) in t.iter().enumerate() {
                let row = [tr[0], (tr[0] + tr[1] + tr[2]) * 0.5, (tr[0] - tr[1] + tr[2]) * 0.5, tr[2]];
                for (c, v) in row.into_iter().enumerate() {
                    // SAFETY: each (ξ, co, ci) is written by the task of its co alone, within u.
                    unsafe { *up.0.add((r * 4 + c) * per + co * cin + ci) = v };
                }
            }
        }
    });
    u
}

/// What the path adds to the product, as `conv2d`'s epilogue: `((y + bias) + residual) / div`.
#[derive(Clone, Copy)]
pub(crate) struct Finish<'a> {
    /// [cout], bias and per-sample bias already summed.
    pub bias: Option<&'a [f32]>,
    /// [cout, ho, wo].
    pub residual: Option<&'a [f32]>,
    pub div: Option<f32>,
}

/// One image: `dst` [cout, ho, wo] = the convolution of `xp`, `cin` zero-padded planes of
/// [`padded_size`] (rows `wp` wide), by the transformed weight `u`, with `finish`. `threads` > 1
/// runs the bands in parallel.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv(u: &[f32], cout: usize, cin: usize, xp: &[f32], ho: usize, wo: usize, finish: Finish<'_>, dst: &mut [f32], threads: usize) {
    let (hp, wp) = padded_size(ho, wo);
    let (bh, bw) = (ho.div_ceil(2), wo.div_ceil(2));
    assert!(u.len() == 16 * cout * cin && xp.len() >= cin * hp * wp && dst.len() == cout * ho * wo, "winograd: operand sizes");
    assert!(finish.bias.is_none_or(|b| b.len() == cout) && finish.residual.is_none_or(|r| r.len() == dst.len()), "winograd: epilogue sizes");
    let rows = band_rows(bh, bw);
    let bands = bh.div_ceil(rows);
    let gemm_threads = if bands >= threads { 1 } else { threads };
    let dst_ptr = SendPtr(dst.as_mut_ptr());
    let band = |scratch: &mut Scratch, bi: usize| {
        let dp = dst_ptr;
        let (i0, i1) = (bi * rows, ((bi + 1) * rows).min(bh));
        let nb = (i1 - i0) * bw;
        let (v, m, eo, y) = scratch.sized(16 * cin * nb, 16 * cout * nb);
        // V[ξ][ci][block] = (Bᵀ d B)[ξ].
        for ci in 0..cin {
            let plane = &xp[ci * hp * wp..(ci + 1) * hp * wp];
            for i in i0..i1 {
                let rows4 = [0, 1, 2, 3].map(|r| &plane[(2 * i + r) * wp..(2 * i + r + 1) * wp]);
                input_block_row(rows4, bw, eo, &mut v[ci * nb + (i - i0) * bw..], cin * nb);
            }
        }
        // M[ξ] = U[ξ] V[ξ].
        for xi in 0..16 {
            // SAFETY: ξ's blocks of m, u and v are [cout, nb], [cout, cin] and [cin, nb], within
            // the slices (`sized`, the assert above), and m aliases neither input.
            unsafe {
                sgemm(
                    cout,
                    nb,
                    cin,
                    m[xi * cout * nb..].as_mut_ptr(),
                    nb,
                    1,
                    false,
                    u[xi * cout * cin..].as_ptr(),
                    cin,
                    1,
                    v[xi * cin * nb..].as_ptr(),
                    nb,
                    1,
                    1.0,
                    gemm_threads,
                )
            };
        }
        // Y = Aᵀ M A, finished, into the output rows of the band.
        let plane = ho * wo;
        for co in 0..cout {
            for i in i0..i1 {
                let src = &m[co * nb + (i - i0) * bw..];
                let y0 = 2 * i;
                let n_rows = if y0 + 1 < ho { 2 } else { 1 };
                // SAFETY: the band writes its own output rows y0..y0 + n_rows of channel co.
                let out = unsafe { std::slice::from_raw_parts_mut(dp.0.add(co * plane + y0 * wo), n_rows * wo) };
                let res = finish.residual.map(|r| &r[co * plane + y0 * wo..co * plane + (y0 + n_rows) * wo]);
                output_block_row(src, cout * nb, bw, y, wo, out, res, finish.bias.map(|b| b[co]), finish.div);
            }
        }
    };
    if threads > 1 && bands > 1 {
        (0..bands).into_par_iter().for_each_init(Scratch::default, |s, bi| band(s, bi));
    } else {
        let mut s = Scratch::default();
        (0..bands).for_each(|bi| band(&mut s, bi));
    }
}

/// A band's buffers, reused across the bands a task runs.
#[derive(Default)]
struct Scratch {
    v: Vec<f32>,
    m: Vec<f32>,
    /// Even and odd columns of four input rows.
    eo: Vec<f32>,
    /// Four output values per block of a row.
    y: Vec<f32>,
}

impl Scratch {
    fn sized(&mut self, nv: usize, nm: usize) -> (&mut [f32], &mut [f32], &mut Vec<f32>, &mut Vec<f32>) {
        if self.v.len() < nv {
            self.v = uninit(nv);
        }
        if self.m.len() < nm {
            self.m = uninit(nm);
        }
        (&mut self.v[..nv], &mut self.m[..nm], &mut self.eo, &mut self.y)
    }
}

dispatch!(fn input_block_row(rows: [&[f32]; 4], bw: usize, eo: &mut Vec<f32>, v: &mut [f32], xi_stride: usize) => input_block_row_imp);

/// The transformed input of one row of `bw` blocks from its four padded input rows:
/// `v[ξ · xi_stride + j]` for block j. Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0],
/// [0, 1, 0, -1]]; the columns first, then the rows. `V` only picks the instantiation: the loops
/// are plain, vectorised by the compiler for the features [`dispatch`] enables.
fn input_block_row_imp<V: super::simd::Vf>(rows: [&[f32]; 4], bw: usize, eo: &mut Vec<f32>, v: &mut [f32], xi_stride: usize) {
    let n = bw + 1;
    eo.resize(8 * n, 0.0);
    // Block j's columns 0..4 are even[j], odd[j], even[j + 1], odd[j + 1].
    for (r, row) in rows.iter().enumerate() {
        let (e, o) = eo[2 * r * n..(2 * r + 2) * n].split_at_mut(n);
        for ((ev, ov), pair) in e.iter_mut().zip(o.iter_mut()).zip(row.chunks_exact(2)) {
            *ev = pair[0];
            *ov = pair[1];
        }
    }
    let eo = &eo[..];
    let (e, o) = (|r: usize| &eo[2 * r * n..(2 * r + 1) * n], |r: usize| &eo[(2 * r + 1) * n..(2 * r + 2) * n]);
    let (e0, e1, e2, e3) = (e(0), e(1), e(2), e(3));
    let (o0, o1, o2, o3) = (o(0), o(1), o(2), o(3));
    // Column transform `k` of a row at a block, from the block's four columns (a, b, c, d).
    fn col(k: usize, a: f32, b: f32, c: f32, d: f32) -> f32 {
        match k {
            0 => a - c,
            1 => b + c,
            2 => c - b,
            _ => b - d,
        }
    }
    for k in 0..4 {
        for j in 0..bw {
            let x0 = col(k, e0[j], o0[j], e0[j + 1], o0[j + 1]);
            let x1 = col(k, e1[j], o1[j], e1[j + 1], o1[j + 1]);
            let x2 = col(k, e2[j], o2[j], e2[j + 1], o2[j + 1]);
            let x3 = col(k, e3[j], o3[j], e3[j + 1], o3[j + 1]);
            v[k * xi_stride + j] = x0 - x2;
            v[(4 + k) * xi_stride + j] = x1 + x2;
            v[(8 + k) * xi_stride + j] = x2 - x1;
            v[(12 + k) * xi_stride + j] = x1 - x3;
        }
    }
}

dispatch!(#[allow(clippy::too_many_arguments)] fn output_block_row(m: &[f32], xi_stride: usize, bw: usize, y: &mut Vec<f32>, wo: usize, out: &mut [f32], res: Option<&[f32]>, bias: Option<f32>, div: Option<f32>) => output_block_row_imp);

/// One row of `bw` blocks of the output from the products `m[ξ · xi_stride + j]`: Aᵀ = [[1, 1,
/// 1, 0], [0, 1, -1, -1]], the rows first, then the columns; then the bias, the residual and
/// the division, into `out`'s one or two rows `wo` wide.
#[allow(clippy::too_many_arguments)]
fn output_block_row_imp<V: super::simd::Vf>(m: &[f32], xi_stride: usize, bw: usize, y: &mut Vec<f32>, wo: usize, out: &mut [f32], res: Option<&[f32]>, bias: Option<f32>, div: Option<f32>) {
    y.resize(4 * bw, 0.0);
    let (y0, rest) = y.split_at_mut(bw);
    let (y1, rest) = rest.split_at_mut(bw);
    let (y2, y3) = rest.split_at_mut(bw);
    let mm = |xi: usize| &m[xi * xi_stride..xi * xi_stride + bw];
    let ms: [&[f32]; 16] = std::array::from_fn(mm);
    for j in 0..bw {
        let mut s0 = [0f32; 4];
        let mut s1 = [0f32; 4];
        for c in 0..4 {
            s0[c] = ms[c][j] + ms[4 + c][j] + ms[8 + c][j];
            s1[c] = ms[4 + c][j] - ms[8 + c][j] - ms[12 + c][j];
        }
        y0[j] = s0[0] + s0[1] + s0[2];
        y1[j] = s0[1] - s0[2] - s0[3];
        y2[j] = s1[0] + s1[1] + s1[2];
        y3[j] = s1[1] - s1[2] - s1[3];
    }
    let n_rows = out.len() / wo;
    for r in 0..n_rows {
        let (ya, yb) = if r == 0 { (&*y0, &*y1) } else { (&*y2, &*y3) };
        let row = &mut out[r * wo..(r + 1) * wo];
        for (x, o) in row.iter_mut().enumerate() {
            let mut val = if x % 2 == 0 { ya[x / 2] } else { yb[x / 2] };
            if let Some(bias) = bias {
                val += bias;
            }
            if let Some(res) = res {
                val += res[r * wo + x];
            }
            if let Some(div) = div {
                val /= div;
            }
            *o = val;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic value in [-1, 1).
    fn val(seed: usize, i: usize) -> f32 {
        let h = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (seed as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        let h = (h ^ (h >> 31)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((h >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Every output of `conv` against the direct sum in f64, on sizes odd and even, one block
    /// and several bands, with each part of the epilogue, on one thread and on several (the
    /// same bits): the error, relative to the sum of the products' magnitudes, stays within a
    /// small multiple of f32's rounding, and a wrong transform entry would give errors of the
    /// order of the values themselves.
    #[test]
    fn transforms_give_the_direct_sum() {
        let mut worst = 0f64;
        for (case, &(cin, cout, ho, wo)) in [(3, 2, 2, 2), (5, 3, 3, 5), (4, 6, 7, 2), (2, 3, 31, 33), (9, 4, 18, 16)].iter().enumerate() {
            let (hp, wp) = padded_size(ho, wo);
            // The input proper is (ho + 2) x (wo + 2); padded_size's extra row / column stays 0.
            let mut xp = vec![0f32; cin * hp * wp];
            for ci in 0..cin {
                for y in 0..ho + 2 {
                    for x in 0..wo + 2 {
                        xp[(ci * hp + y) * wp + x] = val(case, (ci * hp + y) * wp + x) * 3.0;
                    }
                }
            }
            let w: Vec<f32> = (0..cout * cin * 9).map(|i| val(100 + case, i)).collect();
            let bias: Vec<f32> = (0..cout).map(|i| val(200 + case, i)).collect();
            let res: Vec<f32> = (0..cout * ho * wo).map(|i| val(300 + case, i) * 2.0).collect();
            let u = transform_weight(&w, cout, cin, false);
            for (use_bias, use_res, div) in [(false, false, None), (true, false, None), (true, true, Some(0.18215f32)), (false, true, Some(3.0))] {
                let finish = Finish { bias: use_bias.then_some(&bias[..]), residual: use_res.then_some(&res[..]), div };
                let mut one = vec![f32::NAN; cout * ho * wo];
                conv(&u, cout, cin, &xp, ho, wo, finish, &mut one, 1);
                let mut two = vec![f32::NAN; cout * ho * wo];
                conv(&u, cout, cin, &xp, ho, wo, finish, &mut two, 2);
                let same = one.iter().zip(&two).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "case {case}: 1 and 2 threads differ");
                for co in 0..cout {
                    for y in 0..ho {
                        for x in 0..wo {
                            let (mut sum, mut mag) = (0f64, 0f64);
                            for ci in 0..cin {
                                for ky in 0..3 {
                                    for kx in 0..3 {
                                        let p = w[((co * cin + ci) * 3 + ky) * 3 + kx] as f64 * xp[(ci * hp + y + ky) * wp + x + kx] as f64;
                                        sum += p;
                                        mag += p.abs();
                                    }
                                }
                            }
                            let o = (co * ho + y) * wo + x;
                            if use_bias {
                                sum += bias[co] as f64;
                                mag += (bias[co] as f64).abs();
                            }
                            if use_res {
                                sum += res[o] as f64;
                                mag += (res[o] as f64).abs();
                            }
                            let d = div.map_or(1.0, |d| d as f64);
                            let err = (one[o] as f64 - sum / d).abs() / (mag / d.abs() * f32::EPSILON as f64);
                            assert!(err.is_finite() && err <= 32.0, "case {case} ({cin} -> {cout}, {ho}x{wo}) at ({co}, {y}, {x}): {} vs {} ({err:.1} roundings)", one[o], sum / d);
                            worst = worst.max(err);
                        }
                    }
                }
            }
        }
        eprintln!("winograd: worst error {worst:.2} roundings of the products' magnitude");
    }

    /// The weight read [cout, cin, 3, 3] and tap-major [3, 3, cin, cout] transforms alike.
    #[test]
    fn tap_major_weight_transforms_alike() {
        let (cout, cin) = (5, 3);
        let w: Vec<f32> = (0..cout * cin * 9).map(|i| val(7, i)).collect();
        let mut t = vec![0f32; w.len()];
        for co in 0..cout {
            for ci in 0..cin {
                for tap in 0..9 {
                    t[(tap * cin + ci) * cout + co] = w[(co * cin + ci) * 9 + tap];
                }
            }
        }
        let (a, b) = (transform_weight(&w, cout, cin, false), transform_weight(&t, cout, cin, true));
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}
