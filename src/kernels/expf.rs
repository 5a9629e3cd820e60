//! `e^x` in f32 with the bits of the C library's `expf`, 16 values at a time on AVX-512, 8 on
//! AVX2 with FMA.
//!
//! The training ops that replay candle's arithmetic (SiLU and its gradient, QuickGELU, the
//! GELU derivative) call `f32::exp`, which is glibc's `expf`, one scalar call per element: in a
//! SiLU that call is most of the time. glibc's `expf` (the algorithm of ARM's optimized-routines,
//! `sysdeps/ieee754/flt-32/e_expf.c`) works in f64: `z = x·32/ln 2` rounded to an integer `k`
//! by adding and subtracting 1.5·2^52, `r = z − k`, `2^(k/32)` from a 32-entry table with `k/32`
//! added to its exponent bits, times a cubic in `r`, rounded once to f32. The x86-64 build
//! that runs on CPUs with FMA evaluates `r` and the cubic with fused multiply-adds; [`exp_in_place`]
//! does the same in vectors of 8 doubles (4 with AVX2, which looks the table up with a gather
//! instead of permutes) and gives the same bits for every f32 input (checked against `f32::exp`
//! on all 2^32 of them, `cargo test --release --lib expf -- --ignored`; a sample in the ordinary
//! tests). glibc takes its FMA variant on every CPU with AVX2 and FMA, the only CPUs these paths
//! run on (every AVX-512 CPU has both); elsewhere `f32::exp` runs itself.

/// 2^(i/32) with i·2^47 subtracted from its bits (glibc's `__exp2f_data.tab`): adding k·2^47
/// (k = 32·q + i) puts q into the exponent.
const TABLE: [u64; 32] = [
    0x3ff0000000000000, 0x3fefd9b0d3158574, 0x3fefb5586cf9890f, 0x3fef9301d0125b51,
    0x3fef72b83c7d517b, 0x3fef54873168b9aa, 0x3fef387a6e756238, 0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715, 0x3feef1a7373aa9cb, 0x3feedea64c123422, 0x3feece086061892d,
    0x3feebfdad5362a27, 0x3feeb42b569d4f82, 0x3feeab07dd485429, 0x3feea47eb03a5585,
    0x3feea09e667f3bcd, 0x3fee9f75e8ec5f74, 0x3feea11473eb0187, 0x3feea589994cce13,
    0x3feeace5422aa0db, 0x3feeb737b0cdc5e5, 0x3feec49182a3f090, 0x3feed503b23e255d,
    0x3feee89f995ad3ad, 0x3feeff76f2fb5e47, 0x3fef199bdd85529c, 0x3fef3720dcef9069,
    0x3fef5818dcfba487, 0x3fef7c97337b9b5f, 0x3fefa4afa2a490da, 0x3fefd0765b6e4540,
];

/// Table entries per unit of the exponent.
const N: f64 = 32.0;

/// `x` becomes `e^x` for every element, with the bits of `f32::exp`.
pub fn exp_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        // This CPU's widest kernel and its lanes.
        let kernel: Option<(usize, unsafe fn(&mut [f32]))> = if super::simd::has_avx512() {
            Some((16, x86::exp_body))
        } else if super::simd::has_avx2() {
            Some((8, x86::exp_body_avx2))
        } else {
            None
        };
        if let Some((lanes, kernel)) = kernel {
            let body = x.len() / lanes * lanes;
            // SAFETY: each kernel is taken only where its features were detected; the body is
            // whole vectors.
            unsafe { kernel(&mut x[..body]) };
            x[body..].iter_mut().for_each(|v| *v = v.exp());
            return;
        }
    }
    x.iter_mut().for_each(|v| *v = v.exp());
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{N, TABLE};
    use std::arch::x86_64::*;

    /// Above this (0x1.62e42ep6, about ln 2^128) `expf` overflows to +inf.
    const OVERFLOW: u32 = 0x42b1_7217;
    /// Below this (-0x1.9fe368p6, about ln 2^-150) `expf` underflows to +0.
    const UNDERFLOW: u32 = 0xc2cf_f1b4;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_body(x: &mut [f32]) {
        let inv_ln2_n = _mm512_set1_pd(f64::from_bits(0x3ff71547652b82fe) * N);
        let shift = _mm512_set1_pd(f64::from_bits(0x4338000000000000));
        let c0 = _mm512_set1_pd(f64::from_bits(0x3fac6af84b912394) / N / N / N);
        let c1 = _mm512_set1_pd(f64::from_bits(0x3fcebfce50fac4f3) / N / N);
        let c2 = _mm512_set1_pd(f64::from_bits(0x3fe62e42ff0c52d6) / N);
        let one = _mm512_set1_pd(1.0);
        let tab: [__m512i; 4] = std::array::from_fn(|q| _mm512_loadu_si512(TABLE[8 * q..].as_ptr() as *const _));
        let half = |xd: __m512d| -> __m256 {
            let z = _mm512_mul_pd(inv_ln2_n, xd);
            let kd = _mm512_add_pd(z, shift);
            let ki = _mm512_castpd_si512(kd);
            let kd = _mm512_sub_pd(kd, shift);
            // glibc's FMA build contracts z − kd with the product that made z.
            let r = _mm512_fmsub_pd(inv_ln2_n, xd, kd);
            // Table entry ki % 32: two 16-entry permutes, chosen by bit 4.
            let lo = _mm512_permutex2var_epi64(tab[0], ki, tab[1]);
            let hi = _mm512_permutex2var_epi64(tab[2], ki, tab[3]);
            let t = _mm512_mask_blend_epi64(_mm512_test_epi64_mask(ki, _mm512_set1_epi64(16)), lo, hi);
            let s = _mm512_castsi512_pd(_mm512_add_epi64(t, _mm512_slli_epi64::<47>(ki)));
            let p = _mm512_fmadd_pd(c0, r, c1);
            let y = _mm512_fmadd_pd(c2, r, one);
            let y = _mm512_fmadd_pd(p, _mm512_mul_pd(r, r), y);
            _mm512_cvtpd_ps(_mm512_mul_pd(y, s))
        };
        for chunk in x.chunks_exact_mut(16) {
            let v = _mm512_loadu_ps(chunk.as_ptr());
            let lo = half(_mm512_cvtps_pd(_mm512_castps512_ps256(v)));
            let hi = half(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)))));
            let mut y = _mm512_castpd_ps(_mm512_insertf64x4::<1>(_mm512_castps_pd(_mm512_castps256_ps512(lo)), _mm256_castps_pd(hi)));
            // expf's special cases: +inf above the overflow bound (+inf itself included), +0
            // below the underflow bound (-inf included), NaN as x + x.
            y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, _mm512_set1_ps(f32::from_bits(OVERFLOW))), _mm512_set1_ps(f32::INFINITY));
            y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, _mm512_set1_ps(f32::from_bits(UNDERFLOW))), _mm512_setzero_ps());
            y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v), _mm512_add_ps(v, v));
            _mm512_storeu_ps(chunk.as_mut_ptr(), y);
        }
    }

    /// [`exp_body`] with AVX2 and FMA: halves of 4 doubles, the table read by a gather.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_body_avx2(x: &mut [f32]) {
        let inv_ln2_n = _mm256_set1_pd(f64::from_bits(0x3ff71547652b82fe) * N);
        let shift = _mm256_set1_pd(f64::from_bits(0x4338000000000000));
        let c0 = _mm256_set1_pd(f64::from_bits(0x3fac6af84b912394) / N / N / N);
        let c1 = _mm256_set1_pd(f64::from_bits(0x3fcebfce50fac4f3) / N / N);
        let c2 = _mm256_set1_pd(f64::from_bits(0x3fe62e42ff0c52d6) / N);
        let one = _mm256_set1_pd(1.0);
        let low5 = _mm256_set1_epi64x(31);
        let half = |xd: __m256d| -> __m128 {
            let z = _mm256_mul_pd(inv_ln2_n, xd);
            let kd = _mm256_add_pd(z, shift);
            let ki = _mm256_castpd_si256(kd);
            let kd = _mm256_sub_pd(kd, shift);
            let r = _mm256_fmsub_pd(inv_ln2_n, xd, kd);
            let t = _mm256_i64gather_epi64::<8>(TABLE.as_ptr() as *const i64, _mm256_and_si256(ki, low5));
            let s = _mm256_castsi256_pd(_mm256_add_epi64(t, _mm256_slli_epi64::<47>(ki)));
            let p = _mm256_fmadd_pd(c0, r, c1);
            let y = _mm256_fmadd_pd(c2, r, one);
            let y = _mm256_fmadd_pd(p, _mm256_mul_pd(r, r), y);
            _mm256_cvtpd_ps(_mm256_mul_pd(y, s))
        };
        for chunk in x.chunks_exact_mut(8) {
            let v = _mm256_loadu_ps(chunk.as_ptr());
            let lo = half(_mm256_cvtps_pd(_mm256_castps256_ps128(v)));
            let hi = half(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v)));
            let mut y = _mm256_insertf128_ps::<1>(_mm256_castps128_ps256(lo), hi);
            let over = _mm256_cmp_ps::<_CMP_GT_OQ>(v, _mm256_set1_ps(f32::from_bits(OVERFLOW)));
            y = _mm256_blendv_ps(y, _mm256_set1_ps(f32::INFINITY), over);
            let under = _mm256_cmp_ps::<_CMP_LT_OQ>(v, _mm256_set1_ps(f32::from_bits(UNDERFLOW)));
            y = _mm256_blendv_ps(y, _mm256_setzero_ps(), under);
            y = _mm256_blendv_ps(y, _mm256_add_ps(v, v), _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
            _mm256_storeu_ps(chunk.as_mut_ptr(), y);
        }
    }
}

/// Test support for the vectorised scalar functions: every `step`-th f32 bit pattern from
/// `start` through `map` (in blocks) and `reference` (one by one); the count of results whose
/// bits differ and the first input that differs.
#[cfg(test)]
pub(crate) fn mismatches(map: fn(&mut [f32]), reference: fn(f32) -> f32, start: u64, step: u64) -> (u64, Option<f32>) {
    let mut bad = (0, None);
    let mut buf = Vec::with_capacity(4096);
    let mut bits = start;
    while bits <= u32::MAX as u64 {
        buf.clear();
        while buf.len() < 4096 && bits <= u32::MAX as u64 {
            buf.push(f32::from_bits(bits as u32));
            bits += step;
        }
        let mut got = buf.clone();
        map(&mut got);
        for (&x, &y) in buf.iter().zip(&got) {
            if y.to_bits() != reference(x).to_bits() {
                bad.0 += 1;
                bad.1.get_or_insert(x);
            }
        }
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_bits_as_the_c_library_on_a_sample_and_the_edges() {
        if !crate::kernels::simd::has_avx2() {
            eprintln!("skipped: this CPU has neither AVX-512 nor AVX2 with FMA, where f32::exp itself runs");
        }
        // A prime stride through every sign, exponent and NaN payload class.
        assert_eq!(mismatches(exp_in_place, f32::exp, 0, 65_521), (0, None));
        // Around the overflow and underflow bounds, zero, the infinities and NaNs.
        let mut edges: Vec<f32> = [f32::from_bits(0x42b1_7217), f32::from_bits(0xc2cf_f1b4), 88.0, -88.0, -87.336_55, 0.0, 1e-30, -1e-30]
            .iter()
            .flat_map(|&v: &f32| (-40i32..=40).map(move |d| f32::from_bits((v.to_bits() as i64 + d as i64) as u32)))
            .collect();
        edges.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -f32::NAN, f32::MAX, f32::MIN, f32::MIN_POSITIVE, -0.0]);
        let mut got = edges.clone();
        exp_in_place(&mut got);
        for (&x, &y) in edges.iter().zip(&got) {
            assert_eq!(y.to_bits(), x.exp().to_bits(), "exp({x:e}) = {y:e}, the C library's {:e}", x.exp());
        }
    }

    #[test]
    #[ignore = "exhaustive: all 2^32 inputs, a few minutes in release"]
    fn same_bits_as_the_c_library_for_every_input() {
        assert_eq!(mismatches(exp_in_place, f32::exp, 0, 1), (0, None));
    }
}
