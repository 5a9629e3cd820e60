//! SIMD: the elementwise / reduction kernels are written once over a 16-lane vector type `V`
//! and instantiated with AVX-512 intrinsics (when the CPU has them) or plain arrays (compiled
//! for AVX2 and FMA when the CPU has those, see [`dispatch`]). All
//! perform the same IEEE operations lane by lane in the same order (fused multiply-adds in
//! both), and tails go through the 1-lane type, so results do not depend on the instantiation.

pub(crate) const LANES: usize = 16;

pub(crate) trait Vf: Copy {
    const N: usize;
    /// # Safety
    /// `p` must address `N` readable f32.
    unsafe fn load(p: *const f32) -> Self;
    /// # Safety
    /// `p` must address `N` writable f32.
    unsafe fn store(self, p: *mut f32);
    fn splat(x: f32) -> Self;
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    /// The square root, correctly rounded (IEEE).
    fn sqrt(self) -> Self;
    /// `self > o ? self : o`
    fn max(self, o: Self) -> Self;
    /// `self < o ? self : o`
    fn min(self, o: Self) -> Self;
    /// self * b + c, one rounding.
    fn fma(self, b: Self, c: Self) -> Self;
    /// 2^(n1) and 2^(n2), n = bits(self) - bits(ROUND) split as n1 = n >> 1, n2 = n - n1.
    fn pow2_halves(self) -> (Self, Self);
    /// 0 where `x` < `thr`, else self.
    fn zero_where_lt(self, x: Self, thr: f32) -> Self;
    /// Lane values (the first `N` are meaningful).
    fn lanes(self) -> [f32; LANES];
}

pub(crate) const EXP_ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer

#[inline(always)]
fn pow2_from_bits(tb: u32) -> (f32, f32) {
    let ni = (tb as i32).wrapping_sub(EXP_ROUND.to_bits() as i32);
    let n1 = ni >> 1;
    let n2 = ni - n1;
    (f32::from_bits(((n1 + 127) as u32) << 23), f32::from_bits(((n2 + 127) as u32) << 23))
}

/// One lane (tails).
#[derive(Clone, Copy)]
pub(crate) struct S1(pub(crate) f32);

impl Vf for S1 {
    const N: usize = 1;
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        S1(*p)
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        *p = self.0
    }
    #[inline(always)]
    fn splat(x: f32) -> Self {
        S1(x)
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        S1(self.0 + o.0)
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        S1(self.0 - o.0)
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        S1(self.0 * o.0)
    }
    #[inline(always)]
    fn div(self, o: Self) -> Self {
        S1(self.0 / o.0)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        S1(self.0.sqrt())
    }
    #[inline(always)]
    fn max(self, o: Self) -> Self {
        S1(if self.0 > o.0 { self.0 } else { o.0 })
    }
    #[inline(always)]
    fn min(self, o: Self) -> Self {
        S1(if self.0 < o.0 { self.0 } else { o.0 })
    }
    #[inline(always)]
    fn fma(self, b: Self, c: Self) -> Self {
        S1(self.0.mul_add(b.0, c.0))
    }
    #[inline(always)]
    fn pow2_halves(self) -> (Self, Self) {
        let (a, b) = pow2_from_bits(self.0.to_bits());
        (S1(a), S1(b))
    }
    #[inline(always)]
    fn zero_where_lt(self, x: Self, thr: f32) -> Self {
        S1(if x.0 < thr { 0.0 } else { self.0 })
    }
    #[inline(always)]
    fn lanes(self) -> [f32; LANES] {
        let mut l = [0f32; LANES];
        l[0] = self.0;
        l
    }
}

/// 16 lanes in an array: the portable instantiation.
#[derive(Clone, Copy)]
pub(crate) struct A16([f32; LANES]);

impl A16 {
    #[inline(always)]
    fn map2(self, o: Self, f: impl Fn(f32, f32) -> f32) -> Self {
        let mut r = [0f32; LANES];
        for i in 0..LANES {
            r[i] = f(self.0[i], o.0[i]);
        }
        A16(r)
    }
}

impl Vf for A16 {
    const N: usize = LANES;
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        A16(std::ptr::read_unaligned(p as *const [f32; LANES]))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        std::ptr::write_unaligned(p as *mut [f32; LANES], self.0)
    }
    #[inline(always)]
    fn splat(x: f32) -> Self {
        A16([x; LANES])
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        self.map2(o, |a, b| a + b)
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        self.map2(o, |a, b| a - b)
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        self.map2(o, |a, b| a * b)
    }
    #[inline(always)]
    fn div(self, o: Self) -> Self {
        self.map2(o, |a, b| a / b)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        self.map2(self, |a, _| a.sqrt())
    }
    #[inline(always)]
    fn max(self, o: Self) -> Self {
        self.map2(o, |a, b| if a > b { a } else { b })
    }
    #[inline(always)]
    fn min(self, o: Self) -> Self {
        self.map2(o, |a, b| if a < b { a } else { b })
    }
    #[inline(always)]
    fn fma(self, b: Self, c: Self) -> Self {
        let mut r = [0f32; LANES];
        for i in 0..LANES {
            r[i] = self.0[i].mul_add(b.0[i], c.0[i]);
        }
        A16(r)
    }
    #[inline(always)]
    fn pow2_halves(self) -> (Self, Self) {
        let (mut a, mut b) = ([0f32; LANES], [0f32; LANES]);
        for i in 0..LANES {
            (a[i], b[i]) = pow2_from_bits(self.0[i].to_bits());
        }
        (A16(a), A16(b))
    }
    #[inline(always)]
    fn zero_where_lt(self, x: Self, thr: f32) -> Self {
        self.map2(x, |v, xv| if xv < thr { 0.0 } else { v })
    }
    #[inline(always)]
    fn lanes(self) -> [f32; LANES] {
        self.0
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::{Vf, EXP_ROUND, LANES};
    use std::arch::x86_64::*;

    /// AVX-512 (used only inside functions compiled with the avx512f feature).
    #[derive(Clone, Copy)]
    pub(crate) struct Avx512(__m512);

    impl Vf for Avx512 {
        const N: usize = LANES;
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Avx512(_mm512_loadu_ps(p))
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm512_storeu_ps(p, self.0)
        }
        #[inline(always)]
        fn splat(x: f32) -> Self {
            unsafe { Avx512(_mm512_set1_ps(x)) }
        }
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            unsafe { Avx512(_mm512_add_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn sub(self, o: Self) -> Self {
            unsafe { Avx512(_mm512_sub_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn mul(self, o: Self) -> Self {
            unsafe { Avx512(_mm512_mul_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn div(self, o: Self) -> Self {
            unsafe { Avx512(_mm512_div_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn sqrt(self) -> Self {
            unsafe { Avx512(_mm512_sqrt_ps(self.0)) }
        }
        #[inline(always)]
        fn max(self, o: Self) -> Self {
            // self > o ? self : o, as the scalar versions.
            unsafe {
                let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(self.0, o.0);
                Avx512(_mm512_mask_blend_ps(gt, o.0, self.0))
            }
        }
        #[inline(always)]
        fn min(self, o: Self) -> Self {
            unsafe {
                let lt = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(self.0, o.0);
                Avx512(_mm512_mask_blend_ps(lt, o.0, self.0))
            }
        }
        #[inline(always)]
        fn fma(self, b: Self, c: Self) -> Self {
            unsafe { Avx512(_mm512_fmadd_ps(self.0, b.0, c.0)) }
        }
        #[inline(always)]
        fn pow2_halves(self) -> (Self, Self) {
            unsafe {
                let ni = _mm512_sub_epi32(_mm512_castps_si512(self.0), _mm512_set1_epi32(EXP_ROUND.to_bits() as i32));
                let n1 = _mm512_srai_epi32::<1>(ni);
                let n2 = _mm512_sub_epi32(ni, n1);
                let bias = _mm512_set1_epi32(127);
                let a = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(n1, bias)));
                let b = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(n2, bias)));
                (Avx512(a), Avx512(b))
            }
        }
        #[inline(always)]
        fn zero_where_lt(self, x: Self, thr: f32) -> Self {
            unsafe {
                let lt = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x.0, _mm512_set1_ps(thr));
                Avx512(_mm512_mask_blend_ps(lt, self.0, _mm512_setzero_ps()))
            }
        }
        #[inline(always)]
        fn lanes(self) -> [f32; LANES] {
            let mut l = [0f32; LANES];
            unsafe { _mm512_storeu_ps(l.as_mut_ptr(), self.0) };
            l
        }
    }
}

/// The mask of a 16-lane vector's first `n` lanes (all 16 from 16 up): the tail of a slice
/// whose length is not a multiple of 16, in masked loads and stores.
#[cfg(target_arch = "x86_64")]
pub(crate) fn first_lanes(n: usize) -> u16 {
    ((1u32 << n.min(16)) - 1) as u16
}

/// `detect()`, run once and kept in `level` (255 until then).
#[cfg(target_arch = "x86_64")]
fn detected_once(level: &std::sync::atomic::AtomicU8, detect: fn() -> bool) -> bool {
    use std::sync::atomic::Ordering;
    let l = level.load(Ordering::Relaxed);
    if l != 255 {
        return l == 1;
    }
    let ok = detect();
    level.store(ok as u8, Ordering::Relaxed);
    ok
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    static LEVEL: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(255);
    detected_once(&LEVEL, || std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma"))
}

/// Whether the CPU has AVX2 and FMA (every x86-64 CPU with AVX-512 does too).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2() -> bool {
    static LEVEL: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(255);
    detected_once(&LEVEL, || std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"))
}

/// `fn name(args)` calling `imp::<V>(args)` with the best vector type for this CPU: AVX-512
/// intrinsics, else the portable arrays compiled for AVX2 and FMA (the compiler turns their
/// lane loops into 8-float vectors and `mul_add` into one instruction instead of a call of
/// the C library's `fmaf`), else the portable arrays for the baseline x86-64 (or any other
/// target). `imp` must be `#[inline(always)]`, so that it is compiled with the features.
macro_rules! dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? => $imp:ident) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { $imp::<$crate::kernels::simd::x86::Avx512>($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { $imp::<$crate::kernels::simd::A16>($($arg),*) }
                if $crate::kernels::simd::has_avx512() {
                    // SAFETY: the features were detected at run time.
                    return unsafe { v4($($arg),*) };
                }
                if $crate::kernels::simd::has_avx2() {
                    // SAFETY: the features were detected at run time.
                    return unsafe { v3($($arg),*) };
                }
            }
            $imp::<$crate::kernels::simd::A16>($($arg),*)
        }
    };
}
pub(crate) use dispatch;

// ---------------------------------------------------------------------------------------------
// Vector maths: exp, erf, SiLU, GELU.
// ---------------------------------------------------------------------------------------------

const EXP_LO: f32 = -87.336_54;

/// e^x, max relative error ~2 ulp; exactly 0 below -87.34 (and for -inf), saturates above
/// 88.37 (Cephes expf polynomial after a ln2 range reduction); NaN for NaN.
#[inline(always)]
pub(crate) fn exp_v<V: Vf>(x0: V) -> V {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // The bound is the first operand so a NaN lane (every comparison false) stays NaN.
    let x = V::splat(88.376_26).min(V::splat(EXP_LO).max(x0));
    let t = x.fma(V::splat(LOG2E), V::splat(EXP_ROUND));
    let n = t.sub(V::splat(EXP_ROUND));
    let r = n.fma(V::splat(-LN2_HI), x);
    let r = n.fma(V::splat(-LN2_LO), r);
    let mut p = V::splat(1.987_569_1e-4);
    p = p.fma(r, V::splat(1.398_199_9e-3));
    p = p.fma(r, V::splat(8.333_452e-3));
    p = p.fma(r, V::splat(4.166_579_6e-2));
    p = p.fma(r, V::splat(1.666_666_5e-1));
    p = p.fma(r, V::splat(5e-1));
    let r2 = r.mul(r);
    let p = p.fma(r2, r).add(V::splat(1.0));
    // 2^n as two factors so n = 128 and n = -126 stay representable.
    let (a, b) = t.pow2_halves();
    p.mul(a).mul(b).zero_where_lt(x0, EXP_LO)
}

/// erf(x), rational approximation on [-4, 4] (Eigen / XLA's f32 erf), |error| < 1e-6; NaN for
/// NaN.
#[inline(always)]
pub(crate) fn erf_v<V: Vf>(x: V) -> V {
    // As in `exp_v`, the bounds come first so NaN stays NaN.
    let x = V::splat(4.0).min(V::splat(-4.0).max(x));
    let x2 = x.mul(x);
    let mut p = V::splat(-2.726_142_3e-10);
    p = p.fma(x2, V::splat(2.770_681_4e-8));
    p = p.fma(x2, V::splat(-2.101_024e-6));
    p = p.fma(x2, V::splat(-5.692_506_4e-5));
    p = p.fma(x2, V::splat(-7.349_906_3e-4));
    p = p.fma(x2, V::splat(-2.954_600_2e-3));
    p = p.fma(x2, V::splat(-1.609_603_3e-2));
    let mut q = V::splat(-1.456_607_2e-5);
    q = q.fma(x2, V::splat(-2.133_740_6e-4));
    q = q.fma(x2, V::splat(-1.682_827e-3));
    q = q.fma(x2, V::splat(-7.373_329e-3));
    q = q.fma(x2, V::splat(-1.426_474e-2));
    x.mul(p).div(q)
}

#[inline(always)]
pub(crate) fn silu_v<V: Vf>(x: V) -> V {
    x.div(V::splat(1.0).add(exp_v(V::splat(0.0).sub(x))))
}

#[inline(always)]
pub(crate) fn gelu_erf_v<V: Vf>(x: V) -> V {
    erf_v(x.mul(V::splat(std::f32::consts::FRAC_1_SQRT_2))).add(V::splat(1.0)).mul(V::splat(0.5)).mul(x)
}

/// Applies `f` to `src` into `dst` (same length), vector body and 1-lane tail.
#[inline(always)]
pub(crate) fn map_into<V: Vf>(src: &[f32], dst: &mut [f32], f: impl Fn(V) -> V, f1: impl Fn(S1) -> S1) {
    let n = src.len().min(dst.len());
    let body = n / V::N * V::N;
    let mut i = 0;
    while i < body {
        unsafe { f(V::load(src.as_ptr().add(i))).store(dst.as_mut_ptr().add(i)) };
        i += V::N;
    }
    for j in body..n {
        dst[j] = f1(S1(src[j])).0;
    }
}

#[inline(always)]
fn exp_slice_imp<V: Vf>(x: &mut [f32]) {
    let src = x.to_vec();
    map_into::<V>(&src, x, exp_v, exp_v);
}
dispatch!(
    /// In place e^x over a slice (exposed for tests).
    pub fn exp_slice(x: &mut [f32]) => exp_slice_imp
);

#[inline(always)]
fn erf_slice_imp<V: Vf>(x: &mut [f32]) {
    let src = x.to_vec();
    map_into::<V>(&src, x, erf_v, erf_v);
}
dispatch!(
    /// In place erf over a slice (exposed for tests).
    pub fn erf_slice(x: &mut [f32]) => erf_slice_imp
);

#[cfg(test)]
mod tests {
    use super::*;

    /// Every instantiation keeps NaN through exp and erf (their clamps put the bound first) and
    /// clamps the infinities as before.
    fn nan_stays_nan<V: Vf>() {
        let lanes = |v: V| v.lanes()[..V::N].to_vec();
        for f in [exp_v::<V> as fn(V) -> V, erf_v::<V>] {
            assert!(lanes(f(V::splat(f32::NAN))).iter().all(|v| v.is_nan()));
        }
        assert!(lanes(exp_v(V::splat(f32::NEG_INFINITY))).iter().all(|&v| v == 0.0));
        assert!(lanes(exp_v(V::splat(f32::INFINITY))).iter().all(|&v| v > 1e38));
        assert!(lanes(erf_v(V::splat(f32::NEG_INFINITY))).iter().all(|&v| v < -0.9999));
        assert!(lanes(erf_v(V::splat(f32::INFINITY))).iter().all(|&v| v > 0.9999));
    }

    #[test]
    fn nan_stays_nan_in_every_instantiation() {
        nan_stays_nan::<S1>();
        nan_stays_nan::<A16>();
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512() {
                nan_stays_nan::<x86::Avx512>();
            }
            // SAFETY: AVX-512F was detected.
            unsafe { avx512() };
        }
    }
}
