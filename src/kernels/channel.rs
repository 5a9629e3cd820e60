//! Per-channel broadcast arithmetic for training: `x + p[c]` and `x * p[c]` over a tensor viewed
//! as (outer, channels, inner) — a bias or a norm's scale over NCHW's channel dim (inner = H·W)
//! or over the last dim of a token matrix (inner = 1) — and the per-channel sums that their
//! backward needs.
//!
//! candle's backward of a broadcast sums the gradient over the broadcast dims. When those are
//! not the trailing dims, its CPU reduction computes a div/mod index per element, on one
//! thread; that dominated a pretraining step. It adds the elements, in the source's row-major
//! order, into an accumulator that starts at zero. [`channel_sums`] adds them in that same
//! order per channel (each channel's sum stays one sequential chain), so the bits are
//! candle's; it only runs several channels' chains side by side, and blocks of channels in
//! parallel.
use rayon::prelude::*;

use super::io::uninit;

/// How `p` combines with `x` in [`channel_map`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelOp {
    Add,
    Mul,
}

/// `x[o, c, i] op p[c]` for x of `outer * p.len() * inner` values.
pub fn channel_map(x: &[f32], p: &[f32], inner: usize, op: ChannelOp) -> Vec<f32> {
    match op {
        ChannelOp::Add => map(x, p.len(), inner, |s, c| s + p[c]),
        ChannelOp::Mul => map(x, p.len(), inner, |s, c| s * p[c]),
    }
}

/// `x[o, c, i] * scale[c] + shift[c]`, rounded after the product and after the sum: the
/// values of [`channel_map`]'s `Mul` then `Add`, in one pass.
pub fn channel_affine(x: &[f32], scale: &[f32], shift: &[f32], inner: usize) -> Vec<f32> {
    assert_eq!(scale.len(), shift.len(), "channel_affine: scale and shift differ in length");
    map(x, scale.len(), inner, |s, c| s * scale[c] + shift[c])
}

/// `f(x[o, c, i], c)` for every element.
fn map(x: &[f32], channels: usize, inner: usize, f: impl Fn(f32, usize) -> f32 + Sync) -> Vec<f32> {
    let mut out = uninit(x.len());
    if x.is_empty() {
        return out;
    }
    // Whole (c, inner) rows per task, about 16 Ki values each.
    let row = channels * inner;
    let rows = (16384 / row.max(1)).max(1);
    out.par_chunks_mut(rows * row)
        .zip(x.par_chunks(rows * row))
        .for_each(|(d, s)| {
            for (d, s) in d.chunks_exact_mut(row).zip(s.chunks_exact(row)) {
                if inner == 1 {
                    // Token rows: the channels run along the row.
                    d.iter_mut().zip(s).enumerate().for_each(|(c, (d, &s))| *d = f(s, c));
                    continue;
                }
                for (c, (d, s)) in d.chunks_exact_mut(inner).zip(s.chunks_exact(inner)).enumerate() {
                    d.iter_mut().zip(s).for_each(|(d, &s)| *d = f(s, c));
                }
            }
        });
    out
}

/// `x[o, c, i] += p[c]` in place: [`channel_map`]'s [`ChannelOp::Add`] without a new buffer.
pub fn channel_add_in_place(x: &mut [f32], p: &[f32], inner: usize) {
    let channels = p.len();
    if inner == 0 || channels == 0 {
        return;
    }
    if inner == 1 {
        // Token rows (a linear layer's bias): a row per task, not a value.
        x.par_chunks_mut(channels).for_each(|row| row.iter_mut().zip(p).for_each(|(d, &pc)| *d += pc));
        return;
    }
    x.par_chunks_mut(inner).enumerate().for_each(|(i, d)| {
        let pc = p[i % channels];
        d.iter_mut().for_each(|d| *d += pc);
    });
}

/// Per channel, the sum of `g` over (outer, inner), added in row-major order into a zero
/// (candle's `sum_keepdim` over the broadcast dims, to the bit).
pub fn channel_sums(g: &[f32], channels: usize, inner: usize) -> Vec<f32> {
    sums(g, None, channels, inner)
}

/// Per channel, the sum of the rounded products `g * x` over (outer, inner), in
/// [`channel_sums`]' order (candle's gradient of a broadcast product's per-channel operand:
/// the product tensor, then its sum).
pub fn channel_sums_of_products(g: &[f32], x: &[f32], channels: usize, inner: usize) -> Vec<f32> {
    assert_eq!(
        g.len(),
        x.len(),
        "channel_sums_of_products: operands differ in length"
    );
    sums(g, Some(x), channels, inner)
}

/// Channels whose chains advance side by side in one task.
const BLOCK: usize = 16;

fn sums(g: &[f32], x: Option<&[f32]>, channels: usize, inner: usize) -> Vec<f32> {
    let mut acc = vec![0f32; channels];
    if g.is_empty() || channels == 0 || inner == 0 {
        return acc;
    }
    let outer = g.len() / (channels * inner);
    let value = |j: usize| match x {
        Some(x) => g[j] * x[j],
        None => g[j],
    };
    // Contiguous (vectorisable) chains when inner = 1.
    if inner == 1 {
        acc.par_chunks_mut(256).enumerate().for_each(|(bi, a)| {
            let c0 = bi * 256;
            for o in 0..outer {
                let base = o * channels + c0;
                for (k, a) in a.iter_mut().enumerate() {
                    *a += value(base + k);
                }
            }
        });
        return acc;
    }
    acc.par_chunks_mut(BLOCK).enumerate().for_each(|(bi, a)| {
        let c0 = bi * BLOCK;
        #[cfg(target_arch = "x86_64")]
        if super::simd::has_avx512() {
            // SAFETY: AVX-512 is present; the block's indices lie inside g (and x).
            unsafe { x86::block(g, x, &value, channels, inner, outer, c0, a) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if super::simd::has_avx2() {
            // SAFETY: AVX2 is present; the block's indices lie inside g (and x).
            unsafe { x86::block_avx2(g, x, &value, channels, inner, outer, c0, a) };
            return;
        }
        for o in 0..outer {
            for i in 0..inner {
                let base = (o * channels + c0) * inner + i;
                for (k, a) in a.iter_mut().enumerate() {
                    *a += value(base + k * inner);
                }
            }
        }
    });
    acc
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::BLOCK;
    use std::arch::x86_64::*;

    /// The chains of channels `c0..c0 + a.len()` (at most 16), one per vector lane: 16
    /// consecutive values of each channel are loaded and transposed, so that adding the 16
    /// vectors in turn adds each channel's values in their order. Reading 64 bytes per channel
    /// plane at a time also spares the cache the 16 interleaved streams, 4 KiB apart at 32x32,
    /// that the scalar loop reads one value at a time. `value(j)` is element j's value (`g[j]`,
    /// or `g[j] * x[j]`), for the tail of a plane that fills no whole vector.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block(g: &[f32], x: Option<&[f32]>, value: &impl Fn(usize) -> f32, channels: usize, inner: usize, outer: usize, c0: usize, a: &mut [f32]) {
        let nc = a.len();
        let full = inner / BLOCK * BLOCK;
        let mut lanes = [0f32; BLOCK];
        lanes[..nc].copy_from_slice(a);
        let mut acc = _mm512_loadu_ps(lanes.as_ptr());
        let (gp, xp) = (g.as_ptr(), x.map(|x| x.as_ptr()));
        for o in 0..outer {
            let base = (o * channels + c0) * inner;
            for i0 in (0..full).step_by(BLOCK) {
                let mut r = [_mm512_setzero_ps(); BLOCK];
                for (k, r) in r.iter_mut().enumerate().take(nc) {
                    let p = base + k * inner + i0;
                    *r = _mm512_loadu_ps(gp.add(p));
                    if let Some(xp) = xp {
                        *r = _mm512_mul_ps(*r, _mm512_loadu_ps(xp.add(p)));
                    }
                }
                transpose16(&mut r);
                for r in r {
                    acc = _mm512_add_ps(acc, r);
                }
            }
            if full < inner {
                _mm512_storeu_ps(lanes.as_mut_ptr(), acc);
                for i in full..inner {
                    for (k, l) in lanes.iter_mut().enumerate().take(nc) {
                        *l += value(base + k * inner + i);
                    }
                }
                acc = _mm512_loadu_ps(lanes.as_ptr());
            }
        }
        _mm512_storeu_ps(lanes.as_mut_ptr(), acc);
        a.copy_from_slice(&lanes[..nc]);
    }

    /// [`block`] with AVX2's 8 lanes: the block's channels in groups of 8, each group's chains
    /// advanced over all of its planes before the next group's.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn block_avx2(g: &[f32], x: Option<&[f32]>, value: &impl Fn(usize) -> f32, channels: usize, inner: usize, outer: usize, c0: usize, a: &mut [f32]) {
        const L: usize = 8;
        let full = inner / L * L;
        let (gp, xp) = (g.as_ptr(), x.map(|x| x.as_ptr()));
        for (h, a) in a.chunks_mut(L).enumerate() {
            let c0 = c0 + h * L;
            let nc = a.len();
            let mut lanes = [0f32; L];
            lanes[..nc].copy_from_slice(a);
            let mut acc = _mm256_loadu_ps(lanes.as_ptr());
            for o in 0..outer {
                let base = (o * channels + c0) * inner;
                for i0 in (0..full).step_by(L) {
                    let mut r = [_mm256_setzero_ps(); L];
                    for (k, r) in r.iter_mut().enumerate().take(nc) {
                        let p = base + k * inner + i0;
                        *r = _mm256_loadu_ps(gp.add(p));
                        if let Some(xp) = xp {
                            *r = _mm256_mul_ps(*r, _mm256_loadu_ps(xp.add(p)));
                        }
                    }
                    transpose8(&mut r);
                    for r in r {
                        acc = _mm256_add_ps(acc, r);
                    }
                }
                if full < inner {
                    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
                    for i in full..inner {
                        for (k, l) in lanes.iter_mut().enumerate().take(nc) {
                            *l += value(base + k * inner + i);
                        }
                    }
                    acc = _mm256_loadu_ps(lanes.as_ptr());
                }
            }
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
            a.copy_from_slice(&lanes[..nc]);
        }
    }

    /// r[k][j] becomes r[j][k] for 8 x 8.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn transpose8(r: &mut [__m256; 8]) {
        // Pairs of rows interleaved; then u[4g + j] holds rows 4g..4g+4 at columns j and j+4
        // (one 128-bit lane each); last the two row groups of one column side by side.
        let mut t = [_mm256_setzero_ps(); 8];
        for i in 0..4 {
            t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        let mut u = [_mm256_setzero_ps(); 8];
        for q in 0..2 {
            u[4 * q] = _mm256_shuffle_ps::<0x44>(t[4 * q], t[4 * q + 2]);
            u[4 * q + 1] = _mm256_shuffle_ps::<0xee>(t[4 * q], t[4 * q + 2]);
            u[4 * q + 2] = _mm256_shuffle_ps::<0x44>(t[4 * q + 1], t[4 * q + 3]);
            u[4 * q + 3] = _mm256_shuffle_ps::<0xee>(t[4 * q + 1], t[4 * q + 3]);
        }
        for j in 0..4 {
            r[j] = _mm256_permute2f128_ps::<0x20>(u[j], u[4 + j]);
            r[j + 4] = _mm256_permute2f128_ps::<0x31>(u[j], u[4 + j]);
        }
    }

    /// r[k][j] becomes r[j][k].
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose16(r: &mut [__m512; 16]) {
        // Pairs of rows interleaved, then pairs of pairs: u[4g + j] holds rows 4g..4g+4 at
        // columns j, j+4, j+8, j+12 (one 128-bit lane each).
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        let mut u = [_mm512_setzero_ps(); 16];
        for q in 0..4 {
            let (lo0, hi0, lo1, hi1) = (_mm512_castps_pd(t[4 * q]), _mm512_castps_pd(t[4 * q + 1]), _mm512_castps_pd(t[4 * q + 2]), _mm512_castps_pd(t[4 * q + 3]));
            u[4 * q] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo0, lo1));
            u[4 * q + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo0, lo1));
            u[4 * q + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(hi0, hi1));
            u[4 * q + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(hi0, hi1));
        }
        // Then 128-bit lanes: rows 0-7 and 8-15 at columns (j, j+8) and (j+4, j+12), and last
        // the four row groups of one column side by side.
        for j in 0..4 {
            let v0 = _mm512_shuffle_f32x4::<0x88>(u[j], u[4 + j]);
            let w0 = _mm512_shuffle_f32x4::<0xdd>(u[j], u[4 + j]);
            let v1 = _mm512_shuffle_f32x4::<0x88>(u[8 + j], u[12 + j]);
            let w1 = _mm512_shuffle_f32x4::<0xdd>(u[8 + j], u[12 + j]);
            r[j] = _mm512_shuffle_f32x4::<0x88>(v0, v1);
            r[j + 8] = _mm512_shuffle_f32x4::<0xdd>(v0, v1);
            r[j + 4] = _mm512_shuffle_f32x4::<0x88>(w0, w1);
            r[j + 12] = _mm512_shuffle_f32x4::<0xdd>(w0, w1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The order candle's reduction uses: every element in row-major order into its channel.
    fn row_major_sums(v: &[f32], channels: usize, inner: usize) -> Vec<f32> {
        let mut acc = vec![0f32; channels];
        for (j, &x) in v.iter().enumerate() {
            acc[(j / inner) % channels] += x;
        }
        acc
    }

    fn values(n: usize) -> Vec<f32> {
        // Magnitudes spread over many binades, so a changed order changes the bits.
        (0..n)
            .map(|i| {
                ((i * 7919 % 1013) as f32 - 506.0)
                    * (1.0 + (i % 13) as f32 * 37.5).powi((i % 5) as i32 - 2)
            })
            .collect()
    }

    #[test]
    fn sums_follow_row_major_order_to_the_bit() {
        for &(outer, channels, inner) in
            &[(3, 5, 7), (2, 300, 1), (4, 33, 16), (1, 1, 1), (5, 17, 1), (3, 20, 37), (2, 16, 64), (2, 28, 19), (3, 12, 8)]
        {
            let g = values(outer * channels * inner);
            let x: Vec<f32> = values(g.len() + 3)[3..].to_vec();
            let want = row_major_sums(&g, channels, inner);
            let got = channel_sums(&g, channels, inner);
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            let prods: Vec<f32> = g.iter().zip(&x).map(|(a, b)| a * b).collect();
            let want = row_major_sums(&prods, channels, inner);
            let got = channel_sums_of_products(&g, &x, channels, inner);
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn transpose16_transposes() {
        if !crate::kernels::simd::has_avx512() {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        use std::arch::x86_64::*;
        let m: Vec<f32> = (0..256).map(|i| i as f32).collect();
        // SAFETY: AVX-512 checked above; every load and store stays within m / out.
        let out = unsafe {
            let mut r = [_mm512_setzero_ps(); 16];
            for (k, r) in r.iter_mut().enumerate() {
                *r = _mm512_loadu_ps(m.as_ptr().add(16 * k));
            }
            super::x86::transpose16(&mut r);
            let mut out = vec![0f32; 256];
            for (k, r) in r.iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add(16 * k), *r);
            }
            out
        };
        for k in 0..16 {
            for j in 0..16 {
                assert_eq!(out[16 * j + k], m[16 * k + j], "element ({k}, {j})");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn transpose8_transposes() {
        if !crate::kernels::simd::has_avx2() {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        use std::arch::x86_64::*;
        let m: Vec<f32> = (0..64).map(|i| i as f32).collect();
        // SAFETY: AVX2 checked above; every load and store stays within m / out.
        let out = unsafe {
            let mut r = [_mm256_setzero_ps(); 8];
            for (k, r) in r.iter_mut().enumerate() {
                *r = _mm256_loadu_ps(m.as_ptr().add(8 * k));
            }
            super::x86::transpose8(&mut r);
            let mut out = vec![0f32; 64];
            for (k, r) in r.iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add(8 * k), *r);
            }
            out
        };
        for k in 0..8 {
            for j in 0..8 {
                assert_eq!(out[8 * j + k], m[8 * k + j], "element ({k}, {j})");
            }
        }
    }

    #[test]
    fn map_applies_the_channel_value() {
        let (outer, channels, inner) = (3, 4, 5);
        let x = values(outer * channels * inner);
        let p = [1.5f32, -2.0, 0.25, 3.0];
        let add = channel_map(&x, &p, inner, ChannelOp::Add);
        let mul = channel_map(&x, &p, inner, ChannelOp::Mul);
        for j in 0..x.len() {
            let c = (j / inner) % channels;
            assert_eq!(add[j].to_bits(), (x[j] + p[c]).to_bits());
            assert_eq!(mul[j].to_bits(), (x[j] * p[c]).to_bits());
        }
    }
}
