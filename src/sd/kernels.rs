//! Inference kernels for the CPU in f32: fused attention, GroupNorm(+SiLU), convolution and
//! linear layers with fused bias / residual epilogues, GEGLU; plus a per-op-class wall-time
//! profiler ([`profile`]).
//!
//! The kernels work on contiguous f32 slices and return new tensors that record no backward
//! op: callers use them only where no input tracks gradients, or in [`Mode::Infer`](super::nn::Mode)
//! where candle's fused ops already drop gradients.
//!
//! Determinism: every output element is computed by a sequence of operations that depends only
//! on the layer's shapes per batch element, never on the batch size or on the number of
//! threads. Matrix products go through the `gemm` crate once per batch element (per batch
//! element and head for attention), whose summation order depends only on the product's
//! (m, n, k); reductions (norm statistics, softmax sums) run in a fixed order inside one task.
use candle_core::{CpuStorage, DType, Device, Layout, Storage, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::sd::bf16;

// ---------------------------------------------------------------------------------------------
// Glue: tensors <-> slices
// ---------------------------------------------------------------------------------------------

/// True when the fast kernels may replace candle's ops: f32 on the CPU, and no tensor tracks
/// gradients (the kernels record no backward op).
pub fn fast_ok(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.dtype() == DType::F32 && t.device().is_cpu() && !t.track_op())
}

/// Like [`fast_ok`] but ignores gradient tracking (for [`Mode::Infer`](super::nn::Mode) call
/// sites, where candle's fused kernels already cut the graph).
pub fn fast_dtype_ok(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.dtype() == DType::F32 && t.device().is_cpu())
}

fn slice_of<'a>(s: &'a Storage, l: &Layout) -> Result<&'a [f32]> {
    match s {
        Storage::Cpu(CpuStorage::F32(v)) => match l.contiguous_offsets() {
            Some((a, b)) => Ok(&v[a..b]),
            None => Err(Error::invalid("kernels: non-contiguous input")),
        },
        _ => Err(Error::invalid("kernels: expected an f32 CPU tensor")),
    }
}

/// Runs `f` on the contiguous f32 data of `ts` (made contiguous first if needed).
fn with_slices<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Result<R> {
    let owned: Vec<Tensor> = ts.iter().map(|t| t.contiguous()).collect::<candle_core::Result<_>>()?;
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices: Vec<&[f32]> = Vec::with_capacity(ts.len());
    for (s, l) in &guards {
        slices.push(slice_of(s, l)?);
    }
    Ok(f(&slices))
}

fn tensor(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

/// A custom op's `cpu_fwd` input as a tensor the kernels take (the data is copied: candle hands
/// custom ops storage, not tensors).
pub(crate) fn op_input(s: &CpuStorage, l: &Layout, op: &str) -> candle_core::Result<Tensor> {
    let (CpuStorage::F32(v), Some((a, b))) = (s, l.contiguous_offsets()) else {
        candle_core::bail!("{op}: expected contiguous f32 inputs")
    };
    Tensor::from_vec(v[a..b].to_vec(), l.shape(), &Device::Cpu)
}

/// A kernel's result as a custom op's `cpu_fwd` output.
pub(crate) fn op_output(result: Result<Tensor>, op: &str) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
    let t = result.map_err(|e| candle_core::Error::Msg(format!("{op}: {e}")))?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cs) => Ok((candle_core::backend::BackendStorage::try_clone(cs, layout)?, layout.shape().clone())),
        _ => candle_core::bail!("{op}: expected a CPU result"),
    }
}

/// A `Vec<f32>` of length `n` whose contents the caller overwrites completely.
#[allow(clippy::uninit_vec)]
fn uninit(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: f32 has no invalid bit patterns; every caller writes all n elements before reading.
    unsafe { v.set_len(n) };
    v
}

/// A raw pointer that may cross threads; tasks write disjoint regions.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

// ---------------------------------------------------------------------------------------------
// SIMD: the elementwise / reduction kernels are written once over a 16-lane vector type `V`
// and instantiated with AVX-512 intrinsics (when the CPU has them) or plain arrays. Both
// perform the same IEEE operations lane by lane in the same order (fused multiply-adds in
// both), and tails go through the 1-lane type, so results do not depend on the instantiation.
// ---------------------------------------------------------------------------------------------

const LANES: usize = 16;

trait Vf: Copy {
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

const EXP_ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer

#[inline(always)]
fn pow2_from_bits(tb: u32) -> (f32, f32) {
    let ni = (tb as i32).wrapping_sub(EXP_ROUND.to_bits() as i32);
    let n1 = ni >> 1;
    let n2 = ni - n1;
    (f32::from_bits(((n1 + 127) as u32) << 23), f32::from_bits(((n2 + 127) as u32) << 23))
}

/// One lane (tails).
#[derive(Clone, Copy)]
struct S1(f32);

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
struct A16([f32; LANES]);

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
mod x86 {
    use super::{Vf, EXP_ROUND, LANES};
    use std::arch::x86_64::*;

    /// AVX-512 (used only inside functions compiled with the avx512f feature).
    #[derive(Clone, Copy)]
    pub(super) struct Avx512(__m512);

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

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    use std::sync::atomic::{AtomicU8, Ordering};
    static LEVEL: AtomicU8 = AtomicU8::new(255);
    let l = LEVEL.load(Ordering::Relaxed);
    if l != 255 {
        return l == 1;
    }
    let ok = std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma");
    LEVEL.store(ok as u8, Ordering::Relaxed);
    ok
}

/// `fn name(args)` calling `imp::<V>(args)` with the best vector type for this CPU.
macro_rules! dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? => $imp:ident) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { $imp::<x86::Avx512>($($arg),*) }
                if has_avx512() {
                    // SAFETY: the features were detected at run time.
                    return unsafe { v4($($arg),*) };
                }
            }
            $imp::<A16>($($arg),*)
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Vector maths: exp, erf, SiLU, GELU.
// ---------------------------------------------------------------------------------------------

const EXP_LO: f32 = -87.336_54;

/// e^x, max relative error ~2 ulp; exactly 0 below -87.34 (and for -inf), saturates above
/// 88.37 (Cephes expf polynomial after a ln2 range reduction).
#[inline(always)]
fn exp_v<V: Vf>(x0: V) -> V {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x0.max(V::splat(EXP_LO)).min(V::splat(88.376_26));
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

/// erf(x), rational approximation on [-4, 4] (Eigen / XLA's f32 erf), |error| < 1e-6.
#[inline(always)]
fn erf_v<V: Vf>(x: V) -> V {
    let x = x.max(V::splat(-4.0)).min(V::splat(4.0));
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
fn silu_v<V: Vf>(x: V) -> V {
    x.div(V::splat(1.0).add(exp_v(V::splat(0.0).sub(x))))
}

#[inline(always)]
fn gelu_erf_v<V: Vf>(x: V) -> V {
    erf_v(x.mul(V::splat(std::f32::consts::FRAC_1_SQRT_2))).add(V::splat(1.0)).mul(V::splat(0.5)).mul(x)
}

/// Applies `f` to `src` into `dst` (same length), vector body and 1-lane tail.
#[inline(always)]
fn map_into<V: Vf>(src: &[f32], dst: &mut [f32], f: impl Fn(V) -> V, f1: impl Fn(S1) -> S1) {
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

// ---------------------------------------------------------------------------------------------
// gemm
// ---------------------------------------------------------------------------------------------

fn threads() -> usize {
    rayon::current_num_threads()
}

/// dst[m, n] = (accumulate ? dst : 0) + scale * lhs[m, k] @ rhs[k, n], all with explicit
/// (row, column) strides in elements. `threads` > 1 lets gemm split the product across rayon.
///
/// # Safety
/// The pointers must address every element the strides reach; dst must not alias the inputs.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    dst_cs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
    scale: f32,
    threads: usize,
) {
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        scale,
        false,
        false,
        false,
        par,
    )
}

// ---------------------------------------------------------------------------------------------
// Linear: y = x W^T + b (+ residual), one gemm per batch element.
// ---------------------------------------------------------------------------------------------

/// Fills `dst` (rows x cols, row-major) with `residual + bias` (either may be absent), returning
/// whether anything was written (i.e. whether the gemm must accumulate).
fn preload_rows(dst: &mut [f32], cols: usize, bias: Option<&[f32]>, residual: Option<&[f32]>) -> bool {
    match (bias, residual) {
        (None, None) => false,
        (Some(b), None) => {
            for row in dst.chunks_exact_mut(cols) {
                row.copy_from_slice(b);
            }
            true
        }
        (None, Some(r)) => {
            dst.copy_from_slice(r);
            true
        }
        (Some(b), Some(r)) => {
            for (row, rrow) in dst.chunks_exact_mut(cols).zip(r.chunks_exact(cols)) {
                for ((d, &rv), &bv) in row.iter_mut().zip(rrow).zip(b) {
                    *d = rv + bv;
                }
            }
            true
        }
    }
}

/// `x` [items, rows, in] (rank >= 3: items = dim 0) or [rows, in] (rank 2: every row is its
/// own item) times `weight` [out, in]^T, plus `bias` [out] and `residual` (shaped like the
/// output). Inference only (no backward).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, residual: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let in_dim = *dims.last().ok_or_else(|| Error::invalid("linear: scalar input"))?;
    let (out_dim, w_in) = weight.dims2()?;
    if w_in != in_dim {
        return Err(Error::invalid(format!("linear: input dim {in_dim} vs weight {:?}", weight.dims())));
    }
    let total_rows = x.elem_count() / in_dim.max(1);
    let rows = if dims.len() >= 3 { total_rows / dims[0].max(1) } else { 1 };
    let items = if rows == 0 { 0 } else { total_rows / rows };
    let mut out_shape = dims.clone();
    *out_shape.last_mut().unwrap() = out_dim;
    let mut ts: Vec<&Tensor> = vec![x, weight];
    if let Some(b) = bias {
        ts.push(b);
    }
    if let Some(r) = residual {
        if r.dims() != out_shape.as_slice() {
            return Err(Error::invalid(format!("linear: residual {:?} vs output {out_shape:?}", r.dims())));
        }
        ts.push(r);
    }
    let out = with_slices(&ts, |s| {
        let (xs, ws) = (s[0], s[1]);
        let bs = bias.map(|_| s[2]);
        let rs = residual.map(|_| s[s.len() - 1]);
        let mut out = uninit(total_rows * out_dim);
        if total_rows == 0 || out_dim == 0 {
            return out;
        }
        let nt = threads();
        if rows == 1 && items > 1 {
            // Single rows (e.g. the time embedding): rows are independent tasks.
            out.par_chunks_mut(out_dim).enumerate().for_each(|(i, dst)| {
                let acc = preload_rows(dst, out_dim, bs, rs.map(|r| &r[i * out_dim..(i + 1) * out_dim]));
                unsafe {
                    sgemm(1, out_dim, in_dim, dst.as_mut_ptr(), out_dim, 1, acc, xs[i * in_dim..].as_ptr(), in_dim, 1, ws.as_ptr(), 1, in_dim, 1.0, 1)
                };
            });
            return out;
        }
        let packed_w = bf16::enabled().then(|| bf16::cached(weight.id(), || bf16::PairPlanes::from_fn(in_dim, out_dim, |i, o| ws[o * in_dim + i])));
        for i in 0..items {
            let dst = &mut out[i * rows * out_dim..(i + 1) * rows * out_dim];
            let acc = preload_rows(dst, out_dim, bs, rs.map(|r| &r[i * rows * out_dim..(i + 1) * rows * out_dim]));
            if let Some(pw) = &packed_w {
                let xi = &xs[i * rows * in_dim..(i + 1) * rows * in_dim];
                let a = bf16::PackedA::new(rows, 1, in_dim, |r, _, k| xi[r * in_dim + k]);
                bf16::gemm_taps(&a, pw, &[0], out_dim, dst, out_dim, acc).expect("shapes checked above");
                continue;
            }
            unsafe {
                sgemm(
                    rows,
                    out_dim,
                    in_dim,
                    dst.as_mut_ptr(),
                    out_dim,
                    1,
                    acc,
                    xs[i * rows * in_dim..].as_ptr(),
                    in_dim,
                    1,
                    ws.as_ptr(),
                    1,
                    in_dim,
                    1.0,
                    nt,
                )
            };
        }
        out
    })?;
    tensor(out, &out_shape)
}

/// Token features from an NCHW map through a pointwise layer: `x` [b, c, h, w], `weight`
/// [cout, c] (or [cout, c, 1, 1]), `bias` [cout] -> [b, h*w, cout]; the transpose is folded
/// into the product's strides. Inference only.
pub fn pointwise_to_tokens(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let cout = weight.dim(0)?;
    if weight.elem_count() != cout * c {
        return Err(Error::invalid(format!("pointwise_to_tokens: input {:?}, weight {:?}", x.dims(), weight.dims())));
    }
    let hw = h * w;
    let mut ts = vec![x, weight];
    ts.extend(bias);
    let out = with_slices(&ts, |s| {
        let (xs, ws) = (s[0], s[1]);
        let bs = bias.map(|_| s[2]);
        let mut out = uninit(b * hw * cout);
        let nt = threads();
        for bi in 0..b {
            let dst = &mut out[bi * hw * cout..(bi + 1) * hw * cout];
            if dst.is_empty() {
                continue;
            }
            let acc = preload_rows(dst, cout, bs, None);
            unsafe { sgemm(hw, cout, c, dst.as_mut_ptr(), cout, 1, acc, xs[bi * c * hw..].as_ptr(), 1, hw, ws.as_ptr(), 1, c, 1.0, nt) };
        }
        out
    })?;
    tensor(out, &[b, hw, cout])
}

/// The inverse: `t` [b, h*w, c] through a pointwise layer (`weight` [cout, c] or
/// [cout, c, 1, 1], `bias` [cout]) into NCHW [b, cout, h, w], plus `residual` (NCHW).
/// Inference only.
pub fn pointwise_from_tokens(t: &Tensor, weight: &Tensor, bias: Option<&Tensor>, residual: Option<&Tensor>, h: usize, w: usize) -> Result<Tensor> {
    let (b, hw, c) = t.dims3()?;
    let cout = weight.dim(0)?;
    if weight.elem_count() != cout * c || hw != h * w {
        return Err(Error::invalid(format!("pointwise_from_tokens: tokens {:?}, weight {:?}, {h}x{w}", t.dims(), weight.dims())));
    }
    if let Some(r) = residual {
        if r.dims() != [b, cout, h, w] {
            return Err(Error::invalid(format!("pointwise_from_tokens: residual {:?}", r.dims())));
        }
    }
    let mut ts = vec![t, weight];
    ts.extend(bias);
    ts.extend(residual);
    let out = with_slices(&ts, |s| {
        let (xs, ws) = (s[0], s[1]);
        let bs = bias.map(|_| s[2]);
        let rs = residual.map(|_| s[s.len() - 1]);
        let mut out = uninit(b * cout * hw);
        let nt = threads();
        for bi in 0..b {
            let dst = &mut out[bi * cout * hw..(bi + 1) * cout * hw];
            if dst.is_empty() {
                continue;
            }
            let acc = preload_channels(dst, hw, bs, rs.map(|r| &r[bi * cout * hw..(bi + 1) * cout * hw]));
            unsafe { sgemm(cout, hw, c, dst.as_mut_ptr(), hw, 1, acc, ws.as_ptr(), c, 1, xs[bi * hw * c..].as_ptr(), 1, c, 1.0, nt) };
        }
        out
    })?;
    tensor(out, &[b, cout, h, w])
}

// ---------------------------------------------------------------------------------------------
// Convolution (NCHW), as k*k accumulated gemms over a zero-padded copy of the input: tap
// (kh, kw) of output pixel p = oy*We + ox reads padded pixel s*p + kh*Wp + kw, a strided view,
// so no im2col matrix is built. Outputs are computed on a grid We = Wp/s wide (a few junk
// columns per row) and compacted, with bias / residual / scale, into NCHW.
// ---------------------------------------------------------------------------------------------

/// How a convolution's input is prepared: nearest-upsampled to a size first, then padded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvInput {
    /// Nearest-neighbour resize to (h, w) before padding (candle's `upsample_nearest2d` rule).
    pub upsample: Option<(usize, usize)>,
    /// (top, left, bottom, right) zero padding.
    pub pad: (usize, usize, usize, usize),
}

/// `x` [b, cin, h, w], `weight` [cout, cin, k, k], `bias` [cout], `extra_bias` [b, cout]:
/// convolution with `stride`, input prepared per `input`, then
/// `(conv + bias + extra_bias + residual) / out_scale`. Inference only.
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
) -> Result<Tensor> {
    let (b, cin, h0, w0) = x.dims4()?;
    let (cout, wcin, kh, kw) = weight.dims4()?;
    if wcin != cin || kh != kw || stride == 0 {
        return Err(Error::invalid(format!("conv2d: input {:?}, weight {:?}, stride {stride}", x.dims(), weight.dims())));
    }
    let k = kh;
    let (h, w) = input.upsample.unwrap_or((h0, w0));
    let (pt, pl, pb, pr) = input.pad;
    let (hp, wp_real) = (h + pt + pb, w + pl + pr);
    if hp < k || wp_real < k {
        return Err(Error::invalid(format!("conv2d: padded input {hp}x{wp_real} smaller than kernel {k}")));
    }
    let ho = (hp - k) / stride + 1;
    let wo = (wp_real - k) / stride + 1;
    let out_shape = [b, cout, ho, wo];
    if let Some(r) = residual {
        if r.dims() != out_shape {
            return Err(Error::invalid(format!("conv2d: residual {:?} vs output {out_shape:?}", r.dims())));
        }
    }
    if let Some(e) = extra_bias {
        if e.dims() != [b, cout] {
            return Err(Error::invalid(format!("conv2d: extra bias {:?} vs [{b}, {cout}]", e.dims())));
        }
    }
    let direct = k == 1 && stride == 1 && input.upsample.is_none() && input.pad == (0, 0, 0, 0);
    let mut ts: Vec<&Tensor> = vec![x, weight];
    ts.extend(bias);
    ts.extend(extra_bias);
    ts.extend(residual);
    let inv_scale = out_scale != 1.0;
    let out = with_slices(&ts, |s| {
        let (xs, ws) = (s[0], s[1]);
        let mut next = 2;
        let mut take = |present: bool| {
            present.then(|| {
                next += 1;
                s[next - 1]
            })
        };
        let bias_s = take(bias.is_some());
        let extra_s = take(extra_bias.is_some());
        let rs = take(residual.is_some());
        // Per-sample bias: bias + extra_bias[bi] (the sum rounded once, before the product).
        let sample_bias = |bi: usize| -> Option<Vec<f32>> {
            match (bias_s, extra_s) {
                (None, None) => None,
                (Some(bv), None) => Some(bv.to_vec()),
                (None, Some(e)) => Some(e[bi * cout..(bi + 1) * cout].to_vec()),
                (Some(bv), Some(e)) => Some(bv.iter().zip(&e[bi * cout..(bi + 1) * cout]).map(|(a, b)| a + b).collect()),
            }
        };
        let nt = threads();
        let in_plane = h0 * w0;
        let out_plane = ho * wo;
        let mut out = uninit(b * cout * out_plane);
        if out.is_empty() {
            return out;
        }
        let packed_w = bf16::enabled().then(|| {
            bf16::cached(weight.id(), || bf16::PackedA::new(cout, kh * kw, cin, |co, t, ci| ws[(co * cin + ci) * kh * kw + t]))
        });
        if direct {
            for bi in 0..b {
                let dst = &mut out[bi * cout * out_plane..(bi + 1) * cout * out_plane];
                let bvec = sample_bias(bi);
                let acc = preload_channels(dst, out_plane, bvec.as_deref(), rs.map(|r| &r[bi * cout * out_plane..(bi + 1) * cout * out_plane]));
                match &packed_w {
                    Some(pw) => {
                        let xb = bf16::PairPlanes::from_rows(&xs[bi * cin * in_plane..], cin, in_plane, in_plane);
                        bf16::gemm_taps(pw, &xb, &[0], out_plane, dst, out_plane, acc).expect("shapes checked above");
                    }
                    None => unsafe {
                        sgemm(cout, out_plane, cin, dst.as_mut_ptr(), out_plane, 1, acc, ws.as_ptr(), cin, 1, xs[bi * cin * in_plane..].as_ptr(), in_plane, 1, 1.0, nt)
                    },
                }
                if inv_scale {
                    scale_slice(dst, (1.0 / out_scale) as f32, out_scale as f32);
                }
            }
            return out;
        }
        // The padded input is split into stride x stride phase planes of hq x wq,
        // phase (py, px)[i, j] = padded[s*i + py, s*j + px]: tap (ty, tx) of output (oy, ox) is
        // then phase (ty % s, tx % s) at (oy + ty / s, ox + tx / s), a unit-stride view. For
        // stride 1 there is one phase, the padded input itself. Outputs use a grid wq wide.
        let s_ = stride;
        let (hq, wq) = (hp.div_ceil(s_), wp_real.div_ceil(s_));
        let phase = hq * wq;
        let plane = s_ * s_ * phase;
        let we = wq;
        let n_ext = ho * we;
        let slack = (k / s_ + 1) * wq + k;
        let mut xp = vec![0f32; cin * plane + slack];
        let mut ext = uninit(cout * n_ext);
        // Exactly candle's nearest rule: src = min(src_len - 1, floor(i * (src_len / dst_len))).
        let (sh, sw) = (h0 as f64 / h as f64, w0 as f64 / w as f64);
        let src_rows: Vec<usize> = (0..h).map(|i| ((i as f64 * sh) as usize).min(h0 - 1)).collect();
        let src_cols: Vec<usize> = (0..w).map(|i| ((i as f64 * sw) as usize).min(w0 - 1)).collect();
        let kk = k * k;
        for bi in 0..b {
            let xb = &xs[bi * cin * in_plane..(bi + 1) * cin * in_plane];
            // Padded (and resized) copy; the zero border was set once and is never written.
            xp[..cin * plane].par_chunks_mut(plane).enumerate().for_each(|(ci, dstp)| {
                let src = &xb[ci * in_plane..(ci + 1) * in_plane];
                for (y, &sy) in src_rows.iter().enumerate() {
                    let srow = &src[sy * w0..(sy + 1) * w0];
                    let yy = y + pt;
                    if s_ == 1 {
                        let drow = &mut dstp[yy * wq + pl..yy * wq + pl + w];
                        if w == w0 {
                            drow.copy_from_slice(srow);
                        } else {
                            for (d, &sx) in drow.iter_mut().zip(&src_cols) {
                                *d = srow[sx];
                            }
                        }
                    } else {
                        let (py, i) = (yy % s_, yy / s_);
                        for (x, &sx) in src_cols.iter().enumerate() {
                            let xx = x + pl;
                            let (px, j) = (xx % s_, xx / s_);
                            dstp[(py * s_ + px) * phase + i * wq + j] = srow[sx];
                        }
                    }
                }
            });
            let bvec = sample_bias(bi);
            let acc = match bvec.as_deref() {
                Some(bv) => {
                    for (row, &bv) in ext.chunks_exact_mut(n_ext).zip(bv) {
                        row.fill(bv);
                    }
                    true
                }
                None => false,
            };
            let tap_off = |t: usize| {
                let (ty, tx) = (t / k, t % k);
                ((ty % s_) * s_ + tx % s_) * phase + (ty / s_) * wq + tx / s_
            };
            if let Some(pw) = &packed_w {
                let xb = bf16::PairPlanes::from_rows(&xp, cin, plane, plane);
                let offs: Vec<usize> = (0..kk).map(tap_off).collect();
                bf16::gemm_taps(pw, &xb, &offs, n_ext, &mut ext, n_ext, acc).expect("shapes checked above");
            } else {
                for t in 0..kk {
                    let off = tap_off(t);
                    unsafe {
                        sgemm(
                            cout,
                            n_ext,
                            cin,
                            ext.as_mut_ptr(),
                            n_ext,
                            1,
                            acc || t > 0,
                            ws[t..].as_ptr(),
                            cin * kk,
                            kk,
                            xp[off..].as_ptr(),
                            plane,
                            1,
                            1.0,
                            nt,
                        )
                    };
                }
            }
            // Compact into NCHW with the epilogue.
            let dst = &mut out[bi * cout * out_plane..(bi + 1) * cout * out_plane];
            let res = rs.map(|r| &r[bi * cout * out_plane..(bi + 1) * cout * out_plane]);
            let ext_ref = &ext;
            dst.par_chunks_mut(out_plane).enumerate().for_each(|(co, dplane)| {
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
            });
        }
        out
    })?;
    tensor(out, &out_shape)
}

/// Fills `dst` [c, plane] with `residual + bias[c]`; returns whether anything was written.
fn preload_channels(dst: &mut [f32], plane: usize, bias: Option<&[f32]>, residual: Option<&[f32]>) -> bool {
    match (bias, residual) {
        (None, None) => false,
        (Some(b), None) => {
            for (row, &bv) in dst.chunks_exact_mut(plane).zip(b) {
                row.fill(bv);
            }
            true
        }
        (None, Some(r)) => {
            dst.copy_from_slice(r);
            true
        }
        (Some(b), Some(r)) => {
            for ((row, rrow), &bv) in dst.chunks_exact_mut(plane).zip(r.chunks_exact(plane)).zip(b) {
                for (d, &rv) in row.iter_mut().zip(rrow) {
                    *d = rv + bv;
                }
            }
            true
        }
    }
}

fn scale_slice(x: &mut [f32], _inv: f32, div: f32) {
    for v in x.iter_mut() {
        *v /= div;
    }
}

// ---------------------------------------------------------------------------------------------
// Attention: softmax(scale * Q K^T + mask) V without materialising all scores. Work is split
// into (batch, head, block of query rows) tasks; each computes its block's full score rows
// (block x m, in a per-thread scratch buffer), an exact max-subtracted softmax, and P V.
// ---------------------------------------------------------------------------------------------

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Row max, then e^(x - max) in place, returning the row sum. Fixed order: 16 strided lanes,
/// then the lanes in order, then the tail.
#[inline(always)]
fn softmax_row<V: Vf>(row: &mut [f32]) -> f32 {
    let n = row.len();
    let body = n / LANES * LANES;
    let p = row.as_mut_ptr();
    let mut vmax = V::splat(f32::NEG_INFINITY);
    let mut i = 0;
    while i < body {
        // SAFETY: i + 16 <= body <= n (V::N is 16 for the vector types used here).
        vmax = vmax.max(unsafe { V::load(p.add(i)) });
        i += V::N;
    }
    let mut m = f32::NEG_INFINITY;
    for &v in vmax.lanes()[..V::N].iter().chain(&row[body..]) {
        m = if v > m { v } else { m };
    }
    if m == f32::NEG_INFINITY {
        m = 0.0;
    }
    let vm = V::splat(m);
    let mut vsum = V::splat(0.0);
    let mut i = 0;
    while i < body {
        unsafe {
            let e = exp_v(V::load(p.add(i)).sub(vm));
            e.store(p.add(i));
            vsum = vsum.add(e);
        }
        i += V::N;
    }
    let mut sum = 0f32;
    for &l in &vsum.lanes()[..V::N] {
        sum += l;
    }
    for v in &mut row[body..] {
        *v = exp_v(S1(*v).sub(S1(m))).0;
        sum += *v;
    }
    sum
}

#[inline(always)]
fn softmax_rows_imp<V: Vf>(s: &mut [f32], cols: usize, sums: &mut [f32]) {
    for (row, sum) in s.chunks_exact_mut(cols).zip(sums.iter_mut()) {
        *sum = softmax_row::<V>(row);
    }
}
dispatch!(fn softmax_rows(s: &mut [f32], cols: usize, sums: &mut [f32]) => softmax_rows_imp);

fn add_mask(s: &mut [f32], mask: &[f32]) {
    for (v, &mv) in s.iter_mut().zip(mask) {
        *v += mv;
    }
}

/// In-place softmax over the last dim of contiguous rows of `cols` (inference only; same
/// maths as the attention kernel).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let cols = *dims.last().ok_or_else(|| Error::invalid("softmax: scalar input"))?;
    let out = with_slices(&[x], |s| {
        let mut out = s[0].to_vec();
        if cols > 0 {
            out.par_chunks_mut(cols).for_each(|row| {
                let mut sum = [0f32];
                softmax_rows(row, cols, &mut sum);
                let inv = sum[0];
                for v in row.iter_mut() {
                    *v /= inv;
                }
            });
        }
        out
    })?;
    tensor(out, &dims)
}

/// Multi-head attention on token-major inputs: `q` [b, n, heads*d], `k`/`v` [b, m, heads*d],
/// optional additive `mask` [n, m] (broadcast over batch and heads). Returns [b, n, heads*d].
/// Inference only.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: Option<&Tensor>) -> Result<Tensor> {
    let (b, n, inner) = q.dims3()?;
    let (bk, m, inner_k) = k.dims3()?;
    if bk != b || inner_k != inner || v.dims() != k.dims() || heads == 0 || inner % heads != 0 {
        return Err(Error::invalid(format!("attention: q {:?}, k {:?}, v {:?}, {heads} heads", q.dims(), k.dims(), v.dims())));
    }
    if let Some(mk) = mask {
        if mk.dims() != [n, m] {
            return Err(Error::invalid(format!("attention: mask {:?}, expected [{n}, {m}]", mk.dims())));
        }
    }
    let d = inner / heads;
    let scale = 1.0 / (d as f32).sqrt();
    // Query block: enough rows for an efficient gemm, the score block within ~512 KiB.
    let bq = ((128 * 1024) / m.max(1)).clamp(16, 128).min(n.max(1));
    let nblocks = n.div_ceil(bq);
    let mut ts: Vec<&Tensor> = vec![q, k, v];
    if let Some(mk) = mask {
        ts.push(mk);
    }
    let out = with_slices(&ts, |s| {
        let (qs, ks, vs) = (s[0], s[1], s[2]);
        let ms = mask.map(|_| s[3]);
        let mut out = uninit(b * n * inner);
        if out.is_empty() || m == 0 {
            out.fill(0.0);
            return out;
        }
        let optr = SendPtr(out.as_mut_ptr());
        (0..b * heads * nblocks).into_par_iter().for_each(|task| {
            let optr = optr;
            let blk = task % nblocks;
            let bh = task / nblocks;
            let (bi, hi) = (bh / heads, bh % heads);
            let q0 = blk * bq;
            let rows = bq.min(n - q0);
            SCRATCH.with(|sc| {
                let mut sc = sc.borrow_mut();
                if sc.len() < rows * m + rows {
                    sc.resize(rows * m + rows, 0.0);
                }
                let (sbuf, sums) = sc.split_at_mut(rows * m);
                let sums = &mut sums[..rows];
                unsafe {
                    // S = scale * Q_blk K^T
                    sgemm(
                        rows,
                        m,
                        d,
                        sbuf.as_mut_ptr(),
                        m,
                        1,
                        false,
                        qs[(bi * n + q0) * inner + hi * d..].as_ptr(),
                        inner,
                        1,
                        ks[bi * m * inner + hi * d..].as_ptr(),
                        1,
                        inner,
                        scale,
                        1,
                    );
                }
                if let Some(mk) = ms {
                    add_mask(sbuf, &mk[q0 * m..(q0 + rows) * m]);
                }
                softmax_rows(sbuf, m, sums);
                // O_blk = P V, then divide each row by its sum.
                let o = unsafe { optr.0.add((bi * n + q0) * inner + hi * d) };
                unsafe {
                    sgemm(rows, d, m, o, inner, 1, false, sbuf.as_ptr(), m, 1, vs[bi * m * inner + hi * d..].as_ptr(), inner, 1, 1.0, 1);
                }
                for (r, &sum) in sums.iter().enumerate() {
                    let row = unsafe { std::slice::from_raw_parts_mut(o.add(r * inner), d) };
                    for x in row.iter_mut() {
                        *x /= sum;
                    }
                }
            });
        });
        out
    })?;
    tensor(out, &[b, n, inner])
}

// ---------------------------------------------------------------------------------------------
// GroupNorm (+ SiLU), one task per (batch element, group).
// ---------------------------------------------------------------------------------------------

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
        if silu {
            map_into::<V>(s, d, |x| silu_v(x.sub(V::splat(mean)).fma(V::splat(a), V::splat(bb))), |x| {
                silu_v(x.sub(S1(mean)).fma(S1(a), S1(bb)))
            });
        } else {
            map_into::<V>(s, d, |x| x.sub(V::splat(mean)).fma(V::splat(a), V::splat(bb)), |x| x.sub(S1(mean)).fma(S1(a), S1(bb)));
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

// ---------------------------------------------------------------------------------------------
// Elementwise: GEGLU, SiLU.
// ---------------------------------------------------------------------------------------------

#[inline(always)]
fn geglu_rows_imp<V: Vf>(h: &[f32], out: &mut [f32], inner: usize) {
    for (orow, hrow) in out.chunks_exact_mut(inner).zip(h.chunks_exact(2 * inner)) {
        let (value, gate) = hrow.split_at(inner);
        let body = inner / V::N * V::N;
        let mut i = 0;
        while i < body {
            unsafe {
                let v = V::load(value.as_ptr().add(i));
                let g = V::load(gate.as_ptr().add(i));
                v.mul(gelu_erf_v(g)).store(orow.as_mut_ptr().add(i));
            }
            i += V::N;
        }
        for j in body..inner {
            orow[j] = S1(value[j]).mul(gelu_erf_v(S1(gate[j]))).0;
        }
    }
}
dispatch!(fn geglu_rows(h: &[f32], out: &mut [f32], inner: usize) => geglu_rows_imp);

/// GEGLU: `h` [..., 2*inner] -> value * gelu_erf(gate), value/gate the two halves of the last
/// dim. Inference only.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let mut dims = h.dims().to_vec();
    let two = *dims.last().ok_or_else(|| Error::invalid("geglu: scalar input"))?;
    if two % 2 != 0 {
        return Err(Error::invalid(format!("geglu: odd last dim {two}")));
    }
    let inner = two / 2;
    *dims.last_mut().unwrap() = inner;
    let out = with_slices(&[h], |s| {
        let rows = if two == 0 { 0 } else { s[0].len() / two };
        let mut out = uninit(rows * inner);
        if inner > 0 {
            // Rows in groups of 64: enough work per task, results independent of the grouping.
            out.par_chunks_mut(64 * inner).zip(s[0].par_chunks(64 * two)).for_each(|(o, hh)| geglu_rows(hh, o, inner));
        }
        out
    })?;
    tensor(out, &dims)
}

#[inline(always)]
fn silu_slices_imp<V: Vf>(src: &[f32], dst: &mut [f32]) {
    map_into::<V>(src, dst, silu_v, silu_v);
}
dispatch!(fn silu_slices(src: &[f32], dst: &mut [f32]) => silu_slices_imp);

/// x * sigmoid(x). Inference only.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let out = with_slices(&[x], |s| {
        let mut out = uninit(s[0].len());
        out.par_chunks_mut(16384).zip(s[0].par_chunks(16384)).for_each(|(d, src)| silu_slices(src, d));
        out
    })?;
    tensor(out, &dims)
}

/// Wall time per op class, exclusive (a nested scope pauses its parent), for `diffii bench
/// --profile`. Off by default; when off a scope costs one relaxed atomic load.
pub mod profile {
    use std::cell::RefCell;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Instant;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Class {
        Conv,
        Linear,
        Attention,
        GroupNorm,
        LayerNorm,
        Elementwise,
        Layout,
    }

    pub const CLASSES: [Class; 7] =
        [Class::Conv, Class::Linear, Class::Attention, Class::GroupNorm, Class::LayerNorm, Class::Elementwise, Class::Layout];

    impl Class {
        pub fn name(self) -> &'static str {
            match self {
                Class::Conv => "conv",
                Class::Linear => "matmul/linear",
                Class::Attention => "attention",
                Class::GroupNorm => "group norm",
                Class::LayerNorm => "layer norm",
                Class::Elementwise => "elementwise",
                Class::Layout => "copies/layout",
            }
        }
    }

    static ENABLED: AtomicBool = AtomicBool::new(false);
    static NANOS: [AtomicU64; 7] = [const { AtomicU64::new(0) }; 7];
    static CALLS: [AtomicU64; 7] = [const { AtomicU64::new(0) }; 7];

    thread_local! {
        // (class, start of its current uninterrupted stretch) for each open scope.
        static STACK: RefCell<Vec<(Class, Instant)>> = const { RefCell::new(Vec::new()) };
    }

    /// Resets the counters and starts recording.
    pub fn start() {
        for i in 0..7 {
            NANOS[i].store(0, Ordering::Relaxed);
            CALLS[i].store(0, Ordering::Relaxed);
        }
        ENABLED.store(true, Ordering::Relaxed);
    }

    /// Stops recording; returns (class, seconds, calls) per class.
    pub fn stop() -> Vec<(Class, f64, u64)> {
        ENABLED.store(false, Ordering::Relaxed);
        CLASSES
            .iter()
            .enumerate()
            .map(|(i, &c)| (c, NANOS[i].load(Ordering::Relaxed) as f64 * 1e-9, CALLS[i].load(Ordering::Relaxed)))
            .collect()
    }

    fn add(c: Class, since: Instant, now: Instant) {
        NANOS[c as usize].fetch_add((now - since).as_nanos() as u64, Ordering::Relaxed);
    }

    /// Runs `f`, charging its time (minus nested scopes) to `class`.
    #[inline]
    pub fn scope<T>(class: Class, f: impl FnOnce() -> T) -> T {
        if !ENABLED.load(Ordering::Relaxed) {
            return f();
        }
        CALLS[class as usize].fetch_add(1, Ordering::Relaxed);
        STACK.with(|s| {
            let now = Instant::now();
            let mut s = s.borrow_mut();
            if let Some((parent, since)) = s.last() {
                add(*parent, *since, now);
            }
            s.push((class, Instant::now()));
        });
        let out = f();
        STACK.with(|s| {
            let now = Instant::now();
            let mut s = s.borrow_mut();
            let (c, since) = s.pop().expect("balanced profile scopes");
            add(c, since, now);
            if let Some(top) = s.last_mut() {
                top.1 = Instant::now();
            }
        });
        out
    }
}
