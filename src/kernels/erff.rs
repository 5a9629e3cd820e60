//! erf(x) in f32 with the bits of the `libm` crate's `erff` (which candle's `erf` calls), 16
//! values at a time on AVX-512 (8 on AVX2) where the argument is below 1.25 in magnitude.
//!
//! The training ops that replay candle's arithmetic (GEGLU and its gradient) call that `erff`
//! once per element. It is FreeBSD's: below 0.84375 in magnitude `x + x·P(x²)/Q(x²)`, up to 1.25
//! `1 − ((1 − erx) − P(s)/Q(s))` with `s = |x| − 1` and the sign of `x`, beyond that rational
//! functions of `1/x²` times two `expf` calls, all in f32 without fused multiply-adds. The
//! first two intervals hold most of a network's pre-activations (|x| < 1.77 before the
//! division by sqrt 2); [`erf_in_place`] evaluates them in vectors with the same operations in
//! the same order, and calls `erff` itself for every other lane (tiny, large, infinite, NaN).
//! Checked against candle's `erf_f32` on all 2^32 inputs (`cargo test --release --lib erff --
//! --ignored`); a sample in the ordinary tests.
// The coefficients are libm's literals, digit for digit.
#![allow(clippy::excessive_precision)]

use candle_core::cpu::erf::erf_f32;

const ERX: f32 = 8.450_629_115e-1;
const PP: [f32; 5] = [1.283_791_661_3e-1, -3.250_420_987_6e-1, -2.848_174_981_8e-2, -5.770_270_247e-3, -2.376_301_745_2e-5];
const QQ: [f32; 5] = [3.979_172_110_6e-1, 6.502_225_25e-2, 5.081_306_211_7e-3, 1.324_947_370_4e-4, -3.960_228_241_3e-6];
const PA: [f32; 7] = [-2.362_118_568_3e-3, 4.148_561_060_4e-1, -3.722_078_800_2e-1, 3.183_466_196_1e-1, -1.108_946_949_2e-1, 3.547_830_507_2e-2, -2.166_375_517_8e-3];
const QA: [f32; 6] = [1.064_208_820_5e-1, 5.403_979_420_7e-1, 7.182_865_589_9e-2, 1.261_712_163_7e-1, 1.363_708_358_3e-2, 1.198_450_010_3e-2];

/// `x` becomes `erf(x)` for every element, with the bits of candle's `erf_f32`.
pub fn erf_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        // This CPU's widest kernel and its lanes.
        let kernel: Option<(usize, unsafe fn(&mut [f32]))> = if super::simd::has_avx512() {
            Some((16, x86::erf_body))
        } else if super::simd::has_avx2() {
            Some((8, x86::erf_body_avx2))
        } else {
            None
        };
        if let Some((lanes, kernel)) = kernel {
            let body = x.len() / lanes * lanes;
            // SAFETY: each kernel is taken only where its features were detected; the body is
            // whole vectors.
            unsafe { kernel(&mut x[..body]) };
            x[body..].iter_mut().for_each(|v| *v = erf_f32(*v));
            return;
        }
    }
    x.iter_mut().for_each(|v| *v = erf_f32(*v));
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{erf_f32, ERX, PA, PP, QA, QQ};
    use std::arch::x86_64::*;

    /// `c[0] + t·(c[1] + t·(…))`, each product and sum rounded, innermost first.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn horner(t: __m512, c: &[f32]) -> __m512 {
        let mut acc = _mm512_set1_ps(c[c.len() - 1]);
        for &ci in c[..c.len() - 1].iter().rev() {
            acc = _mm512_add_ps(_mm512_set1_ps(ci), _mm512_mul_ps(t, acc));
        }
        acc
    }

    /// `1 + t·(c[0] + t·(c[1] + …))`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn one_plus(t: __m512, c: &[f32]) -> __m512 {
        _mm512_add_ps(_mm512_set1_ps(1.0), _mm512_mul_ps(t, horner(t, c)))
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn erf_body(x: &mut [f32]) {
        let abs_mask = _mm512_set1_epi32(0x7fff_ffff);
        for chunk in x.chunks_exact_mut(16) {
            let v = _mm512_loadu_ps(chunk.as_ptr());
            let ix = _mm512_and_si512(_mm512_castps_si512(v), abs_mask);
            // |x| < 2^-28, or not below 1.25 (NaN and infinities included): erff itself.
            let scalar = _mm512_cmplt_epi32_mask(ix, _mm512_set1_epi32(0x3180_0000)) | _mm512_cmpge_epi32_mask(ix, _mm512_set1_epi32(0x3fa0_0000));
            // |x| < 0.84375: x + x·(r / s).
            let z = _mm512_mul_ps(v, v);
            let small = _mm512_add_ps(v, _mm512_mul_ps(v, _mm512_div_ps(horner(z, &PP), one_plus(z, &QQ))));
            // 0.84375 <= |x| < 1.25: ±(1 − ((1 − erx) − p / q)), s = |x| − 1.
            let s = _mm512_sub_ps(_mm512_castsi512_ps(ix), _mm512_set1_ps(1.0));
            let erfc = _mm512_sub_ps(_mm512_set1_ps(1.0 - ERX), _mm512_div_ps(horner(s, &PA), one_plus(s, &QA)));
            let y = _mm512_sub_ps(_mm512_set1_ps(1.0), erfc);
            let sign = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(i32::MIN));
            let mid = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(y), sign));
            let r = _mm512_mask_blend_ps(_mm512_cmplt_epi32_mask(ix, _mm512_set1_epi32(0x3f58_0000)), mid, small);
            let mut m = scalar;
            let mut orig = [0f32; 16];
            if m != 0 {
                _mm512_storeu_ps(orig.as_mut_ptr(), v);
            }
            _mm512_storeu_ps(chunk.as_mut_ptr(), r);
            while m != 0 {
                let lane = m.trailing_zeros() as usize;
                chunk[lane] = erf_f32(orig[lane]);
                m &= m - 1;
            }
        }
    }

    /// [`horner`] in 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn horner8(t: __m256, c: &[f32]) -> __m256 {
        let mut acc = _mm256_set1_ps(c[c.len() - 1]);
        for &ci in c[..c.len() - 1].iter().rev() {
            acc = _mm256_add_ps(_mm256_set1_ps(ci), _mm256_mul_ps(t, acc));
        }
        acc
    }

    /// [`one_plus`] in 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn one_plus8(t: __m256, c: &[f32]) -> __m256 {
        _mm256_add_ps(_mm256_set1_ps(1.0), _mm256_mul_ps(t, horner8(t, c)))
    }

    /// [`erf_body`] in vectors of 8 (AVX2 compares give lane masks instead of bit masks).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn erf_body_avx2(x: &mut [f32]) {
        let abs_mask = _mm256_set1_epi32(0x7fff_ffff);
        for chunk in x.chunks_exact_mut(8) {
            let v = _mm256_loadu_ps(chunk.as_ptr());
            let ix = _mm256_and_si256(_mm256_castps_si256(v), abs_mask);
            // |x| < 2^-28, or not below 1.25: erff itself (ix is non-negative, so the signed
            // compares order it as the magnitudes).
            let tiny = _mm256_cmpgt_epi32(_mm256_set1_epi32(0x3180_0000), ix);
            let below = _mm256_cmpgt_epi32(_mm256_set1_epi32(0x3fa0_0000), ix);
            let scalar = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_or_si256(tiny, _mm256_xor_si256(below, _mm256_set1_epi32(-1)))));
            let z = _mm256_mul_ps(v, v);
            let small = _mm256_add_ps(v, _mm256_mul_ps(v, _mm256_div_ps(horner8(z, &PP), one_plus8(z, &QQ))));
            let s = _mm256_sub_ps(_mm256_castsi256_ps(ix), _mm256_set1_ps(1.0));
            let erfc = _mm256_sub_ps(_mm256_set1_ps(1.0 - ERX), _mm256_div_ps(horner8(s, &PA), one_plus8(s, &QA)));
            let y = _mm256_sub_ps(_mm256_set1_ps(1.0), erfc);
            let sign = _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(i32::MIN));
            let mid = _mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(y), sign));
            let is_small = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(0x3f58_0000), ix));
            let r = _mm256_blendv_ps(mid, small, is_small);
            let mut m = scalar as u32;
            let mut orig = [0f32; 8];
            if m != 0 {
                _mm256_storeu_ps(orig.as_mut_ptr(), v);
            }
            _mm256_storeu_ps(chunk.as_mut_ptr(), r);
            while m != 0 {
                let lane = m.trailing_zeros() as usize;
                chunk[lane] = erf_f32(orig[lane]);
                m &= m - 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::expf::mismatches;

    #[test]
    fn same_bits_as_candles_erf_on_a_sample_and_the_interval_edges() {
        if !crate::kernels::simd::has_avx2() {
            eprintln!("skipped: this CPU has neither AVX-512 nor AVX2, where erf_f32 itself runs");
        }
        assert_eq!(mismatches(erf_in_place, erf_f32, 0, 65_521), (0, None));
        // Every value within 1e-3 of the interval bounds, of both signs, and around zero.
        for bound in [0.84375f32, 1.25, 2f32.powi(-28)] {
            for sign in [1.0f32, -1.0] {
                let (lo, hi) = ((sign * bound * 0.999).to_bits(), (sign * bound * 1.001).to_bits());
                let (lo, hi) = (lo.min(hi), lo.max(hi));
                let xs: Vec<f32> = (lo..=hi).map(f32::from_bits).collect();
                let mut got = xs.clone();
                erf_in_place(&mut got);
                for (&x, &y) in xs.iter().zip(&got) {
                    assert_eq!(y.to_bits(), erf_f32(x).to_bits(), "erf({x:e}) = {y:e}, candle's {:e}", erf_f32(x));
                }
            }
        }
    }

    #[test]
    #[ignore = "exhaustive: all 2^32 inputs, about a minute in release"]
    fn same_bits_as_candles_erf_for_every_input() {
        assert_eq!(mismatches(erf_in_place, erf_f32, 0, 1), (0, None));
    }
}
