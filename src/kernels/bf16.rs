//! bf16 products with f32 accumulation for CPUs with AVX-512 BF16 (`vdpbf16ps`), used by the
//! convolution and linear kernels when a layer's precision is bf16 (`--precision bf16`) and it
//! hands them its packed weight.
//!
//! Operands are rounded to bf16 (round to nearest even, as PyTorch's `.to(torch.bfloat16)`);
//! every product of a pair of bf16 values is exact in f32 and sums are accumulated in f32, so
//! the error is that of rounding the inputs (~2^-9 relative per operand), not of the sums.
//!
//! One microkernel computes an MR x NR block of `C += A B`: A is packed as broadcastable bf16
//! pairs (two consecutive k of one row in a u32), B is read as 16 columns x 2 consecutive k
//! (one zmm register of bf16 pairs) straight from a pair-interleaved layout. For a convolution
//! the padded input is converted once into that layout ([`PairPlanes`]) and every kernel tap is
//! an offset into it, so the taps are summed inside the microkernel without any im2col copy.
//! Each output element is summed in a fixed order (taps, then k pairs) by one task, so results
//! do not depend on the number of threads.
use rayon::prelude::*;

use super::io::SendPtr;
use crate::error::{Error, Result};

/// Rows of A (output channels / rows) per microkernel call.
pub const MR: usize = 8;
/// Columns of B per microkernel call (two zmm registers of f32).
pub const NR: usize = 32;

/// Whether this CPU can run the bf16 kernels.
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

fn pair(lo: f32, hi: f32) -> u32 {
    bf16(lo) as u32 | (bf16(hi) as u32) << 16
}

/// A left operand packed for the microkernel: row blocks of MR, then taps, then k pairs, then
/// MR pair values. Rows beyond `m` and the odd k are zero.
pub struct PackedA {
    data: Vec<u32>,
    pub m: usize,
    pub taps: usize,
    pub k_pairs: usize,
}

impl PackedA {
    /// `get(row, tap, k)` gives the f32 value.
    pub fn new(m: usize, taps: usize, k: usize, get: impl Fn(usize, usize, usize) -> f32 + Sync) -> Self {
        let k_pairs = k.div_ceil(2);
        let block = taps * k_pairs * MR;
        let mut data = vec![0u32; m.div_ceil(MR) * block];
        data.par_chunks_mut(block).enumerate().for_each(|(mb, blk)| {
            for t in 0..taps {
                for p in 0..k_pairs {
                    for r in 0..MR {
                        let row = mb * MR + r;
                        if row >= m {
                            continue;
                        }
                        let lo = get(row, t, 2 * p);
                        let hi = if 2 * p + 1 < k { get(row, t, 2 * p + 1) } else { 0.0 };
                        blk[(t * k_pairs + p) * MR + r] = pair(lo, hi);
                    }
                }
            }
        });
        PackedA { data, m, taps, k_pairs }
    }

    fn block(&self, mb: usize) -> *const u32 {
        self.data[mb * self.taps * self.k_pairs * MR..].as_ptr()
    }
}

/// A right operand in pair-interleaved planes: element (k, pos) at `(k / 2 * plane + pos) * 2
/// + k % 2`, with zeroed slack after the end so that full-width loads never leave the buffer.
pub struct PairPlanes {
    pub data: Vec<u16>,
    pub plane: usize,
    pub k_pairs: usize,
}

impl PairPlanes {
    /// Zeroed planes for `k` rows of `plane` positions.
    pub fn zeros(k: usize, plane: usize) -> Self {
        let k_pairs = k.div_ceil(2);
        PairPlanes { data: vec![0u16; (k_pairs * plane + plane + 2 * NR) * 2], plane, k_pairs }
    }

    /// From `k` rows of `plane` f32 values each, rows `row_stride` apart in `src`.
    pub fn from_rows(src: &[f32], k: usize, plane: usize, row_stride: usize) -> Self {
        Self::from_fn(k, plane, |row, pos| src[row * row_stride + pos])
    }

    /// From a `get(k, pos)` function.
    pub fn from_fn(k: usize, plane: usize, get: impl Fn(usize, usize) -> f32 + Sync) -> Self {
        let mut pp = Self::zeros(k, plane);
        let len = pp.k_pairs * plane * 2;
        pp.data[..len].par_chunks_mut(plane * 2).enumerate().for_each(|(p, dst)| {
            for half in 0..2 {
                let row = 2 * p + half;
                if row >= k {
                    break;
                }
                for pos in 0..plane {
                    dst[pos * 2 + half] = bf16(get(row, pos));
                }
            }
        });
        pp
    }

}

#[derive(Clone, Copy)]
struct Ptr<T>(*const T);
unsafe impl<T> Send for Ptr<T> {}
unsafe impl<T> Sync for Ptr<T> {}

/// `dst[r, j] (+)= sum over taps t and k of A[r, t, k] * B[k, offs[t] + j]` for r < a.m and
/// j < n, with B in `b`'s pair planes and dst rows `dst_rs` apart.
pub fn gemm_taps(a: &PackedA, b: &PairPlanes, offs: &[usize], n: usize, dst: &mut [f32], dst_rs: usize, accumulate: bool) -> Result<()> {
    if offs.len() != a.taps || b.k_pairs != a.k_pairs {
        return Err(Error::invalid(format!("bf16 gemm: {} taps / {} k pairs vs {} offsets / {} k pairs", a.taps, a.k_pairs, offs.len(), b.k_pairs)));
    }
    if a.m == 0 || n == 0 {
        return Ok(());
    }
    if !supported() {
        return Err(Error::invalid("bf16 products need a CPU with AVX-512 BF16; use f32"));
    }
    let max_off = offs.iter().copied().max().unwrap_or(0);
    if max_off + n.div_ceil(NR) * NR > 2 * b.plane + NR * 2 || dst.len() < (a.m - 1) * dst_rs + n {
        return Err(Error::invalid("bf16 gemm: operands too small for the requested block"));
    }
    let (mbs, nbs) = (a.m.div_ceil(MR), n.div_ceil(NR));
    let dptr = SendPtr(dst.as_mut_ptr());
    let bptr = Ptr(b.data.as_ptr());
    (0..mbs * nbs).into_par_iter().for_each(|task| {
        let (bptr, d) = (bptr, dptr);
        let (mb, nb) = (task / nbs, task % nbs);
        let rows = MR.min(a.m - mb * MR);
        let cols = NR.min(n - nb * NR);
        let bases: Vec<Ptr<u16>> = offs.iter().map(|&o| Ptr(unsafe { bptr.0.add((o + nb * NR) * 2) })).collect();
        // SAFETY: tasks write disjoint (row block, column block) regions of dst; every read of
        // A and B stays inside the packed buffers (checked above, plus their zeroed slack).
        #[cfg(target_arch = "x86_64")]
        unsafe {
            micro_avx512(a.block(mb), a.taps, a.k_pairs, &bases, b.plane * 2, d.0.add(mb * MR * dst_rs + nb * NR), dst_rs, rows, cols, accumulate)
        };
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (bases, d, rows, cols);
            unreachable!("bf16 kernels are enabled only where supported()")
        }
    });
    Ok(())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_avx512(
    a: *const u32,
    taps: usize,
    k_pairs: usize,
    b: &[Ptr<u16>],
    b_pair_stride: usize,
    dst: *mut f32,
    dst_rs: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let m0: __mmask16 = if cols >= 16 { 0xffff } else { ((1u32 << cols) - 1) as u16 };
    let m1: __mmask16 = if cols >= 32 { 0xffff } else if cols > 16 { ((1u32 << (cols - 16)) - 1) as u16 } else { 0 };
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    if accumulate {
        for (r, accr) in acc.iter_mut().enumerate().take(rows) {
            let d = dst.add(r * dst_rs);
            accr[0] = _mm512_maskz_loadu_ps(m0, d);
            accr[1] = _mm512_maskz_loadu_ps(m1, d.add(16));
        }
    }
    for (t, bt) in b.iter().enumerate().take(taps) {
        let mut ap = a.add(t * k_pairs * MR);
        let mut bp = bt.0;
        for _ in 0..k_pairs {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp as *const _));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(32) as *const _));
            for (r, accr) in acc.iter_mut().enumerate() {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(r) as i32));
                accr[0] = _mm512_dpbf16_ps(accr[0], av, b0);
                accr[1] = _mm512_dpbf16_ps(accr[1], av, b1);
            }
            ap = ap.add(MR);
            bp = bp.add(b_pair_stride);
        }
    }
    for (r, accr) in acc.iter().enumerate().take(rows) {
        let d = dst.add(r * dst_rs);
        _mm512_mask_storeu_ps(d, m0, accr[0]);
        _mm512_mask_storeu_ps(d.add(16), m1, accr[1]);
    }
}
