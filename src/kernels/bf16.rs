//! bf16 products with f32 accumulation, used by the convolution and linear kernels when a
//! layer's precision is bf16 (`--precision bf16`) and it hands them its packed weight. Two
//! kernels ([`Kernel`]): AVX-512 BF16 (`vdpbf16ps`, AMD Zen 4 and later, Intel Sapphire Rapids
//! and later), and AMX tiles ([`super::amx`], Intel Sapphire Rapids and later), chosen at run time.
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

use super::amx;
use super::gemm::for_tasks;
use super::io::SendPtr;
#[cfg(target_arch = "x86_64")]
use super::simd::first_lanes;
use crate::error::{Error, Result};

/// Rows of A (output channels / rows) per microkernel call.
pub const MR: usize = 8;
/// Columns of B per microkernel call (two zmm registers of f32).
pub const NR: usize = 32;

/// Which bf16 product kernel a packed operand is laid out for and runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// `vdpbf16ps` on zmm registers: an MR x NR register block.
    Avx512,
    /// AMX tile products: 32 x 32 blocks in four accumulator tiles.
    Amx,
}

impl Kernel {
    /// The fastest kernel this CPU runs (AMX where present), if any.
    pub fn best() -> Option<Kernel> {
        [Kernel::Amx, Kernel::Avx512].into_iter().find(|k| k.available())
    }

    /// Whether this CPU (and OS) can run the kernel.
    pub fn available(self) -> bool {
        match self {
            Kernel::Avx512 => supported(),
            // Every CPU with AMX has AVX-512 BF16, whose conversions and softmax the AMX path
            // shares; a (virtual) CPU that hid it would get neither kernel.
            Kernel::Amx => amx::available() && supported(),
        }
    }

    /// The name in tables and messages.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Avx512 => "avx512-bf16",
            Kernel::Amx => "amx",
        }
    }
}

/// Whether this CPU can run the AVX-512 BF16 kernel.
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // BW and VL for the 16-bit stores and shuffles of the packing; every CPU with AVX-512
        // BF16 has them.
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// `dst[i] = bf16(src[i])`, rounded to nearest even. With AVX-512 BF16 (every CPU that runs a
/// bf16 kernel) 16 values per instruction, which flushes subnormal inputs to zero; both kernels'
/// products treat subnormal bf16 inputs as zero anyway, so the results are the same as with
/// the scalar conversion.
fn to_bf16(src: &[f32], dst: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if supported() {
        // SAFETY: the CPU has AVX-512 F and BF16 (checked).
        unsafe { to_bf16_avx512(src, dst) };
        return;
    }
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = bf16(x);
    }
}

/// `dst[2 i] = bf16(lo[i])`, `dst[2 i + 1] = bf16(hi[i])` (0 without `hi`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn interleave_avx512(lo: &[f32], hi: Option<&[f32]>, dst: &mut [u16]) {
    use std::arch::x86_64::*;
    let n = lo.len().min(dst.len() / 2);
    // Element 2i takes bf16 i of the low half (lo), element 2i + 1 bf16 i of the high half (hi).
    let idx = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0,
    );
    let mut i = 0;
    while i < n {
        let m = first_lanes(n - i);
        let l = _mm512_maskz_loadu_ps(m, lo.as_ptr().add(i));
        let h = match hi {
            Some(hi) => _mm512_maskz_loadu_ps(m, hi.as_ptr().add(i)),
            None => _mm512_setzero_ps(),
        };
        let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(h, l));
        let pairs = _mm512_permutexvar_epi16(idx, both);
        let m2: __mmask32 = if n - i >= 16 { u32::MAX } else { (1u32 << (2 * (n - i))) - 1 };
        _mm512_mask_storeu_epi16(dst.as_mut_ptr().add(2 * i) as *mut i16, m2, pairs);
        i += 16;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn to_bf16_avx512(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let mut i = 0;
    while i < n {
        let m = first_lanes(n - i);
        let v = _mm512_maskz_loadu_ps(m, src.as_ptr().add(i));
        let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
        _mm256_mask_storeu_epi16(dst.as_mut_ptr().add(i) as *mut i16, m, h);
        i += 16;
    }
}

fn pair(lo: f32, hi: f32) -> u32 {
    bf16(lo) as u32 | (bf16(hi) as u32) << 16
}

/// A left operand packed for one [`Kernel`]. For AVX-512: row blocks of MR, then taps, then k
/// pairs, then MR pair values. For AMX: row blocks of 32, then taps, then blocks of 16 k pairs,
/// then 32 rows of 16 pair values (two A tiles). Rows beyond `m`, the odd k and the k pairs
/// beyond `k_pairs` are zero. Or, for AVX-512 and one tap ([`row_major`](Self::row_major)),
/// each row's pairs in order, rows `row_stride` values apart.
pub struct PackedA {
    data: Vec<u32>,
    pub m: usize,
    pub taps: usize,
    pub k_pairs: usize,
    pub kernel: Kernel,
    /// u32 values from one row to the next in the row-major layout; 0 in the blocked one.
    row_stride: usize,
}

impl PackedA {
    /// `get(row, tap, k)` gives the f32 value.
    pub fn new(kernel: Kernel, m: usize, taps: usize, k: usize, get: impl Fn(usize, usize, usize) -> f32 + Sync) -> Self {
        let k_pairs = k.div_ceil(2);
        let value = |row: usize, t: usize, p: usize| {
            let lo = get(row, t, 2 * p);
            let hi = if 2 * p + 1 < k { get(row, t, 2 * p + 1) } else { 0.0 };
            pair(lo, hi)
        };
        let (rows_per_block, block) = Self::block_shape(kernel, taps, k_pairs);
        let kblocks = k_pairs.div_ceil(amx::KB);
        let mut data = vec![0u32; m.div_ceil(rows_per_block) * block];
        data.par_chunks_mut(block).enumerate().for_each(|(mb, blk)| {
            let rows = rows_per_block.min(m - mb * rows_per_block);
            for t in 0..taps {
                for p in 0..k_pairs {
                    for r in 0..rows {
                        let at = match kernel {
                            Kernel::Avx512 => (t * k_pairs + p) * MR + r,
                            Kernel::Amx => ((t * kblocks + p / amx::KB) * amx::BLOCK + r) * amx::KB + p % amx::KB,
                        };
                        blk[at] = value(mb * rows_per_block + r, t, p);
                    }
                }
            }
        });
        PackedA { data, m, taps, k_pairs, kernel, row_stride: 0 }
    }

    /// From `m` contiguous rows of `k` values (one tap), rows `row_stride` apart in `src`: the
    /// same result as [`new`](Self::new), packed faster: each row is converted 16 values at a
    /// time (see `to_bf16` on subnormals), then its pairs are placed.
    pub fn from_rows(kernel: Kernel, m: usize, k: usize, src: &[f32], row_stride: usize) -> Self {
        let k_pairs = k.div_ceil(2);
        let kblocks = k_pairs.div_ceil(amx::KB);
        let (rows_per_block, block) = Self::block_shape(kernel, 1, k_pairs);
        let mut data = vec![0u32; m.div_ceil(rows_per_block) * block];
        data.par_chunks_mut(block).enumerate().for_each(|(mb, blk)| {
            let mut row = vec![0u32; kblocks * amx::KB];
            place_rows(kernel, blk, mb * rows_per_block, m, k, &mut row, &mut |r, halves| to_bf16(&src[r * row_stride..][..k], halves));
        });
        PackedA { data, m, taps: 1, k_pairs, kernel, row_stride: 0 }
    }

    /// [`from_rows`](Self::from_rows) on the calling thread (inside one attention task), running
    /// `prepare(r, row)` on each f32 row just before it is converted, while it is in the L1 cache
    /// (attention's softmax). `buf` is storage to reuse (see [`into_storage`](Self::into_storage));
    /// every value of the layout is written, so it is not cleared.
    pub fn from_rows_prepared(kernel: Kernel, m: usize, k: usize, src: &mut [f32], row_stride: usize, mut buf: Vec<u32>, mut prepare: impl FnMut(usize, &mut [f32])) -> Self {
        let k_pairs = k.div_ceil(2);
        let kblocks = k_pairs.div_ceil(amx::KB);
        let (rows_per_block, block) = Self::block_shape(kernel, 1, k_pairs);
        let len = m.div_ceil(rows_per_block) * block;
        buf.resize(len, 0);
        let mut row = vec![0u32; kblocks * amx::KB];
        for (mb, blk) in buf.chunks_mut(block.max(1)).enumerate() {
            place_rows(kernel, blk, mb * rows_per_block, m, k, &mut row, &mut |r, halves| {
                let x = &mut src[r * row_stride..][..k];
                prepare(r, x);
                to_bf16(x, halves);
            });
        }
        PackedA { data: buf, m, taps: 1, k_pairs, kernel, row_stride: 0 }
    }

    /// From a tap-major `src` ([taps, k, m]: a convolution weight stored `[kh, kw, cin, cout]`,
    /// or an NCHW map read as token rows, per call for a transformer's input projection): the
    /// same result as [`new`](Self::new) with `get(row, t, kk) = src[(t * k + kk) * m + row]`.
    /// A block's rows for one tap and k pair are consecutive in two source rows, interleaved 16
    /// values at a time (see `to_bf16` on subnormals), then placed: side by side in the AVX-512
    /// layout, a tile row (16 pairs) apart in the AMX one.
    pub fn from_tap_major(kernel: Kernel, m: usize, taps: usize, k: usize, src: &[f32]) -> Self {
        #[cfg(target_arch = "x86_64")]
        if supported() {
            let k_pairs = k.div_ceil(2);
            let kblocks = k_pairs.div_ceil(amx::KB);
            let (rows_per_block, block) = Self::block_shape(kernel, taps, k_pairs);
            let mut data = vec![0u32; m.div_ceil(rows_per_block) * block];
            data.par_chunks_mut(block).enumerate().for_each(|(mb, blk)| {
                let (r0, rows) = (mb * rows_per_block, rows_per_block.min(m - mb * rows_per_block));
                let mut pairs = [0u32; amx::BLOCK];
                for t in 0..taps {
                    for p in 0..k_pairs {
                        let row = |kk: usize| &src[(t * k + kk) * m + r0..][..rows];
                        let hi = (2 * p + 1 < k).then(|| row(2 * p + 1));
                        // SAFETY: a u32 array viewed as twice as many u16 values; the CPU has
                        // AVX-512 F, BW and BF16 (checked).
                        let dst = unsafe { std::slice::from_raw_parts_mut(pairs.as_mut_ptr() as *mut u16, 2 * amx::BLOCK) };
                        unsafe { interleave_avx512(row(2 * p), hi, dst) };
                        match kernel {
                            Kernel::Avx512 => blk[(t * k_pairs + p) * MR..][..rows].copy_from_slice(&pairs[..rows]),
                            Kernel::Amx => {
                                let first = ((t * kblocks + p / amx::KB) * amx::BLOCK) * amx::KB + p % amx::KB;
                                for (r, &v) in pairs[..rows].iter().enumerate() {
                                    blk[first + r * amx::KB] = v;
                                }
                            }
                        }
                    }
                }
            });
            return PackedA { data, m, taps, k_pairs, kernel, row_stride: 0 };
        }
        Self::new(kernel, m, taps, k, |row, t, kk| src[(t * k + kk) * m + row])
    }

    /// `m` rows of `k` values, rows `src_stride` apart in `src`, for the AVX-512 kernel without
    /// the blocked layout's interleaving: each row is converted to bf16 in place of its pairs,
    /// 16 values at a time, and the kernel broadcasts from MR row streams, so no value is
    /// scattered one at a time. `buf` is storage to reuse (see
    /// [`into_storage`](Self::into_storage)). Products have the bits of the blocked layout's.
    /// `parallel` converts blocks of rows on all threads (for a product that is split across
    /// them); the bytes do not depend on it.
    pub fn row_major(m: usize, k: usize, src: &[f32], src_stride: usize, buf: Vec<u32>, parallel: bool) -> Self {
        const ROWS: usize = 64;
        let (mut a, row_stride) = Self::row_major_storage(m, k, buf);
        let convert = |(c, rows): (usize, &mut [u32])| {
            for (i, row) in rows.chunks_exact_mut(row_stride).enumerate() {
                let r = c * ROWS + i;
                Self::convert_row(row, k, |halves| to_bf16(&src[r * src_stride..][..k], halves));
            }
        };
        let data = &mut a.data[..m * row_stride];
        if parallel {
            data.par_chunks_mut(row_stride * ROWS).enumerate().for_each(convert);
        } else {
            data.chunks_mut(row_stride * ROWS).enumerate().for_each(convert);
        }
        a
    }

    /// [`row_major`](Self::row_major), running `prepare(r, row)` on each f32 row just before it
    /// is converted, while it is in the L1 cache (attention's softmax).
    pub fn row_major_prepared(m: usize, k: usize, src: &mut [f32], src_stride: usize, buf: Vec<u32>, mut prepare: impl FnMut(usize, &mut [f32])) -> Self {
        let (mut a, row_stride) = Self::row_major_storage(m, k, buf);
        for (r, row) in a.data[..m * row_stride].chunks_exact_mut(row_stride).enumerate() {
            Self::convert_row(row, k, |halves| {
                let x = &mut src[r * src_stride..][..k];
                prepare(r, x);
                to_bf16(x, halves);
            });
        }
        a
    }

    /// The row-major layout in `buf`, with its rows beyond `m` zeroed and the others left to
    /// [`convert_row`](Self::convert_row), and its row stride.
    fn row_major_storage(m: usize, k: usize, mut buf: Vec<u32>) -> (Self, usize) {
        let k_pairs = k.div_ceil(2);
        // Rows an odd number of cache lines apart: at a multiple of 4 KiB (or of 2 KiB, 1 KiB..)
        // the MR streams would share one cache set (or two, four..).
        let row_stride = 16 * (k_pairs.div_ceil(16) | 1);
        // Every value the kernel reads is written here or by convert_row: no clearing of reused
        // storage.
        buf.resize(m.next_multiple_of(MR) * row_stride, 0);
        buf[m * row_stride..].fill(0);
        (PackedA { data: buf, m, taps: 1, k_pairs, kernel: Kernel::Avx512, row_stride }, row_stride)
    }

    /// One row of the row-major layout: `convert` writes its k bf16 values; an odd k's last
    /// pair gets a zero high half.
    fn convert_row(row: &mut [u32], k: usize, convert: impl FnOnce(&mut [u16])) {
        // SAFETY: a u32 row viewed as twice as many u16 values.
        let halves = unsafe { std::slice::from_raw_parts_mut(row.as_mut_ptr() as *mut u16, row.len() * 2) };
        convert(&mut halves[..k]);
        if k % 2 == 1 {
            halves[k] = 0;
        }
    }

    /// The storage, for the next [`row_major`](Self::row_major).
    pub fn into_storage(self) -> Vec<u32> {
        self.data
    }

    /// (rows per block, u32 values per block) of the layout for `kernel`.
    fn block_shape(kernel: Kernel, taps: usize, k_pairs: usize) -> (usize, usize) {
        match kernel {
            Kernel::Avx512 => (MR, taps * k_pairs * MR),
            Kernel::Amx => (amx::BLOCK, taps * k_pairs.div_ceil(amx::KB) * amx::BLOCK * amx::KB),
        }
    }

    fn block(&self, mb: usize) -> *const u32 {
        if self.row_stride > 0 {
            return self.data[mb * MR * self.row_stride..].as_ptr();
        }
        let (_, len) = Self::block_shape(self.kernel, self.taps, self.k_pairs);
        self.data[mb * len..].as_ptr()
    }
}

/// Writes one row block `blk` of the one-tap blocked layout for `kernel`, rows from `first`:
/// `convert(r, halves)` gives row r's k bf16 values (two per u32 of `row`, which is zero beyond
/// them and as long as the row's whole k blocks), and rows at or beyond `m` are zero. Every
/// value of the block is written.
fn place_rows(kernel: Kernel, blk: &mut [u32], first: usize, m: usize, k: usize, row: &mut [u32], convert: &mut impl FnMut(usize, &mut [u16])) {
    let k_pairs = k.div_ceil(2);
    let (rows_per_block, _) = PackedA::block_shape(kernel, 1, k_pairs);
    for r in 0..rows_per_block {
        if first + r < m {
            // SAFETY: a u32 buffer viewed as twice as many u16 values.
            let halves = unsafe { std::slice::from_raw_parts_mut(row.as_mut_ptr() as *mut u16, row.len() * 2) };
            // The odd k's high half stays zero: every row writes the same k halves.
            convert(first + r, &mut halves[..k]);
        } else {
            row.fill(0);
        }
        match kernel {
            Kernel::Amx => {
                for (kb, pairs) in row.chunks_exact(amx::KB).enumerate() {
                    blk[(kb * amx::BLOCK + r) * amx::KB..][..amx::KB].copy_from_slice(pairs);
                }
            }
            Kernel::Avx512 => {
                for (p, &v) in row[..k_pairs].iter().enumerate() {
                    blk[p * MR + r] = v;
                }
            }
        }
    }
}

/// A right operand in pair-interleaved planes: element (k, pos) at `(k / 2 * plane + pos) * 2
/// + k % 2`, with zeroed pair rows up to a multiple of 16 (the k depth of an AMX tile) and
/// zeroed slack after them, so that full-width loads never leave the buffer. Or, after
/// [`into_panels`](Self::into_panels), the same pairs in column panels.
pub struct PairPlanes {
    pub data: Vec<u16>,
    pub plane: usize,
    pub k_pairs: usize,
    /// Column panels of NR positions, each holding all its (zero-padded) pair rows one after
    /// another: element (k, pos) at `((pos / NR * rows + k / 2) * NR + pos % NR) * 2 + k % 2`.
    pub panels: bool,
}

impl PairPlanes {
    /// Zeroed planes for `k` rows of `plane` positions.
    pub fn zeros(k: usize, plane: usize) -> Self {
        let k_pairs = k.div_ceil(2);
        let rows = pair_rows(k_pairs);
        PairPlanes { data: vec![0u16; (rows * plane + plane + 2 * NR) * 2], plane, k_pairs, panels: false }
    }

    /// The same operand in column panels, for a right operand that is read whole (no tap
    /// offsets) many times, such as a layer's weight: a microkernel then reads one contiguous
    /// panel instead of 128 bytes from every pair row. Whole pair rows are a plane apart, and
    /// planes of 768 or 3 072 pairs (3 and 12 KiB) put every row of a column block into the same
    /// few cache sets, so the panel was reloaded from L2 for every row block.
    pub fn into_panels(self) -> Self {
        if self.panels {
            return self;
        }
        Self::panels_with(self.k_pairs, self.plane, |nb, panel| {
            let cols = NR.min(self.plane - nb * NR);
            for p in 0..self.k_pairs {
                let src = &self.data[(p * self.plane + nb * NR) * 2..][..cols * 2];
                panel[p * NR * 2..][..cols * 2].copy_from_slice(src);
            }
        })
    }

    /// Column panels (as [`into_panels`](Self::into_panels)) of B given by position: B's column
    /// `pos` is the `k` values at `src[pos * pos_stride..]` (attention's K^T from K's rows).
    /// Each position's values are converted 16 at a time and their pairs placed in its panel.
    pub fn panels_from_positions(src: &[f32], k: usize, plane: usize, pos_stride: usize) -> Self {
        let k_pairs = k.div_ceil(2);
        Self::panels_with(k_pairs, plane, |nb, panel| {
            let mut pairs = vec![0u32; k_pairs];
            for j in 0..NR.min(plane - nb * NR) {
                // SAFETY: a u32 buffer viewed as twice as many u16 values.
                let halves = unsafe { std::slice::from_raw_parts_mut(pairs.as_mut_ptr() as *mut u16, k_pairs * 2) };
                to_bf16(&src[(nb * NR + j) * pos_stride..][..k], &mut halves[..k]);
                for (p, &v) in pairs.iter().enumerate() {
                    panel[(p * NR + j) * 2] = v as u16;
                    panel[(p * NR + j) * 2 + 1] = (v >> 16) as u16;
                }
            }
        })
    }

    /// Zeroed column panels of `k_pairs` pair rows and `plane` positions, `fill(nb, panel)`
    /// writing panel nb (all its pair rows for positions `nb * NR..`), one task per panel.
    fn panels_with(k_pairs: usize, plane: usize, fill: impl Fn(usize, &mut [u16]) + Sync) -> Self {
        let len = pair_rows(k_pairs) * NR * 2;
        let mut data = vec![0u16; plane.div_ceil(NR) * len];
        data.par_chunks_mut(len).enumerate().for_each(|(nb, panel)| fill(nb, panel));
        PairPlanes { data, plane, k_pairs, panels: true }
    }

    /// Where column block `nb` (NR positions from `nb * NR`) of the tap at offset `off` starts in
    /// `data`, and the distance from one pair row to the next, both in u16 values.
    fn column_block(&self, off: usize, nb: usize) -> (usize, usize) {
        if self.panels {
            (nb * pair_rows(self.k_pairs) * NR * 2, NR * 2)
        } else {
            ((off + nb * NR) * 2, self.plane * 2)
        }
    }

    /// From `k` rows of `plane` f32 values each, rows `row_stride` apart in `src`: the same
    /// result as [`from_fn`](Self::from_fn), two rows interleaved per 16 columns by AVX-512
    /// where the CPU has it (see `to_bf16` on subnormals).
    pub fn from_rows(src: &[f32], k: usize, plane: usize, row_stride: usize) -> Self {
        #[cfg(target_arch = "x86_64")]
        if supported() {
            let mut pp = Self::zeros(k, plane);
            let len = pp.k_pairs * plane * 2;
            pp.data[..len].par_chunks_mut(plane * 2).enumerate().for_each(|(p, dst)| {
                let lo = &src[2 * p * row_stride..][..plane];
                let hi = (2 * p + 1 < k).then(|| &src[(2 * p + 1) * row_stride..][..plane]);
                // SAFETY: the CPU has AVX-512 F, BW and BF16 (checked); slices as sized.
                unsafe { interleave_avx512(lo, hi, dst) };
            });
            return pp;
        }
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

/// Pair rows of a right operand with `k_pairs` of them, zero-padded to whole AMX k blocks.
fn pair_rows(k_pairs: usize) -> usize {
    k_pairs.next_multiple_of(amx::KB)
}

#[derive(Clone, Copy)]
struct Ptr<T>(*const T);
unsafe impl<T> Send for Ptr<T> {}
unsafe impl<T> Sync for Ptr<T> {}

/// What the sums of a product are added to: of [`gemm_taps`], or of an f32 product that
/// cannot start from bias and residual itself ([`Start::preload`]).
#[derive(Clone, Copy, Debug)]
pub enum Start<'a> {
    /// Zero.
    Zero,
    /// What `dst` holds.
    Dst,
    /// `residual + bias`, or whichever of the two is given (neither: zero). Each task starts
    /// its own output block from these values (in registers, or in the block while it is in
    /// the cache): the bits of filling the whole of `dst` first, without a separate pass over
    /// it (a pass on one thread, over up to 42 MB for SD-1.5's widest feed-forward output, took
    /// a fifth of that layer's time). `residual` is laid out as `dst`.
    Fill { bias: Option<Bias<'a>>, residual: Option<&'a [f32]> },
}

/// A bias of [`Start::Fill`]: one value per output column (a linear layer's outputs) or per
/// output row (a convolution's output channels).
#[derive(Clone, Copy, Debug)]
pub enum Bias<'a> {
    Columns(&'a [f32]),
    Rows(&'a [f32]),
}

impl Start<'_> {
    /// Whether the sums are added to values (read from `dst` or set by [`fill`](Self::fill)).
    fn adds(&self) -> bool {
        !matches!(self, Start::Zero | Start::Fill { bias: None, residual: None })
    }

    /// Sets `rows x cols` values at `c` (rows `c_rs` apart), output row `r0` and column `j0`
    /// onwards, to their [`Start::Fill`] values (`dst_rs`: the rows' distance in a residual);
    /// the AMX kernel's start, whose tiles load from memory. Nothing for the other starts.
    ///
    /// # Safety
    /// `c` must address the block; the fill's slices must cover it (checked by `gemm_taps`).
    #[allow(clippy::too_many_arguments)]
    unsafe fn fill(&self, c: *mut f32, c_rs: usize, dst_rs: usize, r0: usize, j0: usize, rows: usize, cols: usize) {
        let Start::Fill { bias, residual } = *self else { return };
        for r in 0..rows {
            let out = std::slice::from_raw_parts_mut(c.add(r * c_rs), cols);
            let res = residual.map(|x| &x[(r0 + r) * dst_rs + j0..][..cols]);
            match (bias, res) {
                (None, None) => {}
                (None, Some(x)) => out.copy_from_slice(x),
                (Some(Bias::Columns(b)), None) => out.copy_from_slice(&b[j0..j0 + cols]),
                (Some(Bias::Rows(b)), None) => out.fill(b[r0 + r]),
                (Some(Bias::Columns(b)), Some(x)) => {
                    for ((o, &xv), &bv) in out.iter_mut().zip(x).zip(&b[j0..]) {
                        *o = xv + bv;
                    }
                }
                (Some(Bias::Rows(b)), Some(x)) => {
                    let bv = b[r0 + r];
                    for (o, &xv) in out.iter_mut().zip(x) {
                        *o = xv + bv;
                    }
                }
            }
        }
    }

    /// Sets `dst` (whole rows of `cols` values, residual rows `cols` apart too) to its
    /// [`Start::Fill`] values, returning whether the product must add to it: the start of a
    /// product that cannot begin from them itself (`gemm`'s f32 ones). `parallel` spreads
    /// blocks of rows over the threads (a product split across them would otherwise wait for
    /// one thread's pass over its whole output). Nothing written for the other starts.
    pub fn preload(&self, dst: &mut [f32], cols: usize, parallel: bool) -> bool {
        if !matches!(self, Start::Fill { .. }) || !self.adds() || cols == 0 {
            return self.adds();
        }
        let rows = ((1 << 14) / cols).max(1);
        // SAFETY: each chunk is whole rows of dst; fill reads bias and residual through
        // bounds-checked slices.
        let fill = |(c, d): (usize, &mut [f32])| unsafe { self.fill(d.as_mut_ptr(), cols, cols, c * rows, 0, d.len() / cols, cols) };
        if parallel {
            dst.par_chunks_mut(rows * cols).enumerate().for_each(fill);
        } else {
            dst.chunks_mut(rows * cols).enumerate().for_each(fill);
        }
        self.adds()
    }

    /// Whether the fill's slices cover an `m x n` output with rows `dst_rs` apart.
    fn covers(&self, m: usize, n: usize, dst_rs: usize) -> bool {
        let Start::Fill { bias, residual } = *self else { return true };
        let bias_ok = match bias {
            None => true,
            Some(Bias::Columns(b)) => b.len() >= n,
            Some(Bias::Rows(b)) => b.len() >= m,
        };
        bias_ok && residual.is_none_or(|x| x.len() >= (m - 1) * dst_rs + n)
    }
}

/// `dst[r, j] = start + sum over taps t and k of A[r, t, k] * B[k, offs[t] + j]` for r < a.m
/// and j < n, with B in `b`'s pair planes and dst rows `dst_rs` apart. `parallel` spreads the
/// blocks over the threads; callers that already run one product per thread pass false (the
/// result is the same either way).
#[allow(clippy::too_many_arguments)]
pub fn gemm_taps(a: &PackedA, b: &PairPlanes, offs: &[usize], n: usize, dst: &mut [f32], dst_rs: usize, start: Start<'_>, parallel: bool) -> Result<()> {
    if offs.len() != a.taps || b.k_pairs != a.k_pairs {
        return Err(Error::invalid(format!("bf16 gemm: {} taps / {} k pairs vs {} offsets / {} k pairs", a.taps, a.k_pairs, offs.len(), b.k_pairs)));
    }
    if a.m == 0 || n == 0 {
        return Ok(());
    }
    let max_off = offs.iter().copied().max().unwrap_or(0);
    let b_fits = if b.panels { max_off == 0 && n <= b.plane } else { max_off + n.div_ceil(NR) * NR <= 2 * b.plane + NR * 2 };
    if !b_fits || dst.len() < (a.m - 1) * dst_rs + n || !start.covers(a.m, n, dst_rs) {
        return Err(Error::invalid("bf16 gemm: operands too small for the requested block"));
    }
    // Unit tests on a CPU without AMX run the AMX layouts through the scalar tile product, so
    // that its callers (attention, convolution, linear) are tested everywhere.
    #[cfg(test)]
    if a.kernel == Kernel::Amx && !a.kernel.available() {
        gemm_taps_amx(&tests::Emulated, a, b, offs, n, dst, dst_rs, start, parallel);
        return Ok(());
    }
    if !a.kernel.available() {
        return Err(Error::invalid(format!("bf16 products with the {} kernel need a CPU that has it; use f32", a.kernel.name())));
    }
    if a.kernel == Kernel::Amx {
        gemm_taps_amx(&AmxUnits, a, b, offs, n, dst, dst_rs, start, parallel);
        return Ok(());
    }
    const ROW_GROUP: usize = 16;
    let (mbs, nbs) = (a.m.div_ceil(MR), n.div_ceil(NR));
    let dptr = SendPtr(dst.as_mut_ptr());
    let bptr = Ptr(b.data.as_ptr());
    for_tasks(mbs * nbs, parallel, |task| {
        let (bptr, d) = (bptr, dptr);
        // Row blocks in groups of ROW_GROUP: within a group the column blocks run in order, and
        // each column block's B panel serves every row block of the group from the cache.
        let group = task / (ROW_GROUP * nbs);
        let in_group = ROW_GROUP.min(mbs - group * ROW_GROUP);
        let w = task - group * ROW_GROUP * nbs;
        let (mb, nb) = (group * ROW_GROUP + w % in_group, w / in_group);
        let rows = MR.min(a.m - mb * MR);
        let cols = NR.min(n - nb * NR);
        let (at, stride) = b.column_block(0, nb);
        // SAFETY: tasks write disjoint (row block, column block) regions of dst; every read of
        // A and B stays inside the packed buffers (checked above, plus their zeroed slack).
        #[cfg(target_arch = "x86_64")]
        unsafe {
            let (ap, bp, dp) = (a.block(mb), bptr.0.add(at), d.0.add(mb * MR * dst_rs + nb * NR));
            let init = match start {
                _ if !start.adds() => MicroInit::Zero,
                Start::Fill { bias, residual } => MicroInit::Set {
                    cols: if let Some(Bias::Columns(b)) = bias { b.as_ptr().add(nb * NR) } else { std::ptr::null() },
                    rows: if let Some(Bias::Rows(b)) = bias { b.as_ptr().add(mb * MR) } else { std::ptr::null() },
                    residual: residual.map_or(std::ptr::null(), |x| x.as_ptr().add(mb * MR * dst_rs + nb * NR)),
                },
                _ => MicroInit::Dst,
            };
            let args = (a.taps, a.k_pairs, offs, stride, dst_rs, rows, cols, init);
            // A last column block of at most 16 columns needs one register per row, not two.
            match (cols <= 16, a.row_stride > 0) {
                (false, false) => micro_avx512::<2, false>(ap, a.row_stride, bp, dp, args),
                (true, false) => micro_avx512::<1, false>(ap, a.row_stride, bp, dp, args),
                (false, true) => micro_avx512::<2, true>(ap, a.row_stride, bp, dp, args),
                (true, true) => micro_avx512::<1, true>(ap, a.row_stride, bp, dp, args),
            }
        };
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (at, stride, d, rows, cols);
            unreachable!("bf16 kernels are enabled only where supported()")
        }
    });
    Ok(())
}

/// One 32 x 32 block product of [`gemm_taps_amx`] with its per-thread setup: the tile units
/// ([`AmxUnits`]), or in tests a scalar emulation, so that the driver's addressing is tested on
/// every CPU.
trait TileBlock: Sync {
    type Thread;
    /// Called once per task, on the thread that runs it.
    fn begin(&self) -> Self::Thread;
    /// [`amx::block`]'s contract.
    ///
    /// # Safety
    /// As [`amx::block`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(&self, thread: &Self::Thread, a: *const u32, nk: usize, b: *const u8, b_row_bytes: usize, c: *mut f32, c_row_bytes: usize, load: bool);
}

/// The AMX tile units ([`amx::block`]); only where [`amx::available`].
struct AmxUnits;

#[cfg(target_arch = "x86_64")]
impl TileBlock for AmxUnits {
    type Thread = amx::Tiles;
    fn begin(&self) -> amx::Tiles {
        // SAFETY: gemm_taps reaches the AMX kernel only where it is available (checked there).
        unsafe { amx::Tiles::configure() }
    }
    unsafe fn block(&self, tiles: &amx::Tiles, a: *const u32, nk: usize, b: *const u8, b_row_bytes: usize, c: *mut f32, c_row_bytes: usize, load: bool) {
        amx::block(tiles, a, nk, b, b_row_bytes, c, c_row_bytes, load);
    }
}

#[cfg(not(target_arch = "x86_64"))]
impl TileBlock for AmxUnits {
    type Thread = ();
    fn begin(&self) {}
    unsafe fn block(&self, _: &(), _: *const u32, _: usize, _: *const u8, _: usize, _: *mut f32, _: usize, _: bool) {
        unreachable!("AMX is x86-64 only")
    }
}

/// [`gemm_taps`] on AMX tiles. A task is a group of 32-row blocks times a run of 32-column
/// blocks. The (tap, k block) sequence is cut into chunks of at most KC k blocks, whose A tiles
/// (KC * 2 KiB) stay in the L1 cache while the chunk is applied to every column block of the
/// run; each output block is stored after a chunk and loaded again for the next, which is
/// exact, so the order of additions is that of one pass (taps, then k blocks). Full blocks
/// accumulate in place in `dst`; edge blocks go through a zero-padded copy, one pass each.
/// amx::BLOCK == NR, so the slack that covers the AVX-512 kernel's column blocks covers these.
#[allow(clippy::too_many_arguments)]
fn gemm_taps_amx<K: TileBlock>(kernel: &K, a: &PackedA, b: &PairPlanes, offs: &[usize], n: usize, dst: &mut [f32], dst_rs: usize, start: Start<'_>, parallel: bool) {
    const { assert!(amx::BLOCK == NR) };
    const ROW_GROUP: usize = 4;
    const KC: usize = 8;
    let (mbs, nbs) = (a.m.div_ceil(amx::BLOCK), n.div_ceil(amx::BLOCK));
    let kblocks = a.k_pairs.div_ceil(amx::KB);
    // (tap, first k block, k blocks) of each chunk.
    let chunks: Vec<(usize, usize, usize)> =
        (0..offs.len()).flat_map(|t| (0..kblocks).step_by(KC).map(move |k0| (t, k0, KC.min(kblocks - k0)))).collect();
    let groups = mbs.div_ceil(ROW_GROUP);
    let threads = if parallel { rayon::current_num_threads() } else { 1 };
    // Column runs: enough tasks to balance the threads, each as long as that allows, but no
    // longer than keeps a run's B in L2 (RUN_BYTES, half of a Sapphire-Rapids core's): every
    // row block of the group, and the next groups' tasks of the run, read it again. A run
    // reads 2 KiB of B per column block and k block and row of taps (a 3x3 kernel's taps of
    // one row read the same lines); a layer's whole weight is up to 26 MB (SD-1.5's widest
    // feed-forward input at 1280 channels), which came from L3 once per 32 rows.
    const RUN_BYTES: usize = 1 << 20;
    let per_column_block = kblocks * 2048 * offs.len().min(3);
    let max_run = (RUN_BYTES / per_column_block.max(1)).max(1);
    let runs = if threads > 1 { (4 * threads).div_ceil(groups).clamp(1, nbs) } else { 1 };
    let runs = runs.max(nbs.div_ceil(max_run));
    let run_len = nbs.div_ceil(runs);
    let runs = nbs.div_ceil(run_len);
    let dptr = SendPtr(dst.as_mut_ptr());
    let bptr = Ptr(b.data.as_ptr());
    // u32 values per (tap, k block): two A tiles of 16 rows x 16 pairs.
    let tile_pair = amx::BLOCK * amx::KB;
    for_tasks(groups * runs, parallel, |task| {
        let (bptr, d) = (bptr, dptr);
        // Run-major: rayon hands each thread a contiguous range of tasks, and a range then holds
        // every row group (a short last group included) of its runs, so the ranges carry equal
        // work; the tasks of one run, next to each other, share its B panels in the cache.
        let (group, run) = (task % groups, task / groups);
        let cols_of = |nb: usize| amx::BLOCK.min(n - nb * amx::BLOCK);
        let nb_range = run * run_len..nbs.min((run + 1) * run_len);
        let mut edge = [0f32; amx::BLOCK * amx::BLOCK];
        // SAFETY (the unsafe blocks below): the kernel runs here (checked by the caller); A
        // holds taps * kblocks tile pairs per row block; B's pair rows are padded with zeros to
        // whole k blocks, and its slack (or, in panels, its whole last panel) covers the
        // columns (checked by the caller); full blocks lie inside dst. Tasks write disjoint
        // blocks of dst.
        let thread = kernel.begin();
        let apply = |mb: usize, nb: usize, &(t, k0, nk): &(usize, usize, usize), c: *mut f32, c_rs: usize, load: bool| unsafe {
            let a_at = a.block(mb).add((t * kblocks + k0) * tile_pair);
            let (at, stride) = b.column_block(offs[t], nb);
            let b_row_bytes = stride * 2;
            let b_at = (bptr.0.add(at) as *const u8).add(k0 * amx::KB * b_row_bytes);
            kernel.block(&thread, a_at, nk, b_at, b_row_bytes, c, c_rs * 4, load);
        };
        for mb in group * ROW_GROUP..mbs.min((group + 1) * ROW_GROUP) {
            let rows = amx::BLOCK.min(a.m - mb * amx::BLOCK);
            let corner = |nb: usize| unsafe { d.0.add(mb * amx::BLOCK * dst_rs + nb * amx::BLOCK) };
            if rows == amx::BLOCK {
                for (ci, chunk) in chunks.iter().enumerate() {
                    for nb in nb_range.clone().filter(|&nb| cols_of(nb) == amx::BLOCK) {
                        if ci == 0 {
                            unsafe { start.fill(corner(nb), dst_rs, dst_rs, mb * amx::BLOCK, nb * amx::BLOCK, rows, amx::BLOCK) };
                        }
                        apply(mb, nb, chunk, corner(nb), dst_rs, start.adds() || ci > 0);
                    }
                }
            }
            for nb in nb_range.clone().filter(|&nb| rows < amx::BLOCK || cols_of(nb) < amx::BLOCK) {
                let cols = cols_of(nb);
                edge.fill(0.0);
                if let Start::Dst = start {
                    for r in 0..rows {
                        let src = unsafe { std::slice::from_raw_parts(corner(nb).add(r * dst_rs), cols) };
                        edge[r * amx::BLOCK..r * amx::BLOCK + cols].copy_from_slice(src);
                    }
                }
                unsafe { start.fill(edge.as_mut_ptr(), amx::BLOCK, dst_rs, mb * amx::BLOCK, nb * amx::BLOCK, rows, cols) };
                for (ci, chunk) in chunks.iter().enumerate() {
                    apply(mb, nb, chunk, edge.as_mut_ptr(), amx::BLOCK, start.adds() || ci > 0);
                }
                for r in 0..rows {
                    let out = unsafe { std::slice::from_raw_parts_mut(corner(nb).add(r * dst_rs), cols) };
                    out.copy_from_slice(&edge[r * amx::BLOCK..r * amx::BLOCK + cols]);
                }
            }
        }
    });
}

/// Arguments of [`micro_avx512`] besides its pointers: taps, k pairs, tap offsets, B's pair
/// stride, dst's row stride, valid rows and columns, and whether to add to dst.
type MicroArgs<'a> = (usize, usize, &'a [usize], usize, usize, usize, usize, MicroInit);

/// What [`micro_avx512`]'s sums start from: zero, dst, or [`Start::Fill`]'s values, set in
/// registers (each pointer at the block's first row / column, null where absent; a residual's
/// rows dst's row stride apart).
#[derive(Clone, Copy)]
enum MicroInit {
    Zero,
    Dst,
    Set { cols: *const f32, rows: *const f32, residual: *const f32 },
}

/// One MR x (16 NV) block. A is at `a`: blocked (`ROWS` false: per tap and k pair MR values),
/// or row-major (`ROWS` true, one tap: row r's pairs from `a + r a_rs`). `b` is the column
/// block's start in B for a tap offset of 0 (see [`PairPlanes::column_block`]); tap t reads
/// `offs[t]` positions further on, and pair rows are `b_pair_stride` u16 values apart. Every
/// output element is one chain of `vdpbf16ps` over (tap, k pair) in order, whatever NV and the
/// layout of A.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn micro_avx512<const NV: usize, const ROWS: bool>(
    a: *const u32,
    a_rs: usize,
    b: *const u16,
    dst: *mut f32,
    (taps, k_pairs, offs, b_pair_stride, dst_rs, rows, cols, init): MicroArgs<'_>,
) {
    use std::arch::x86_64::*;
    let masks = [first_lanes(cols), first_lanes(cols.saturating_sub(16))];
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    match init {
        MicroInit::Zero => {}
        MicroInit::Dst => {
            for (r, accr) in acc.iter_mut().enumerate().take(rows) {
                let d = dst.add(r * dst_rs);
                for (v, x) in accr.iter_mut().enumerate() {
                    *x = _mm512_maskz_loadu_ps(masks[v], d.add(16 * v));
                }
            }
        }
        MicroInit::Set { cols: bias_cols, rows: bias_rows, residual } => {
            // Residual + bias with one rounding, or either alone as it is: Start::Fill's values.
            for (r, accr) in acc.iter_mut().enumerate().take(rows) {
                for (v, x) in accr.iter_mut().enumerate() {
                    let bias = if !bias_cols.is_null() {
                        Some(_mm512_maskz_loadu_ps(masks[v], bias_cols.add(16 * v)))
                    } else if !bias_rows.is_null() {
                        Some(_mm512_set1_ps(*bias_rows.add(r)))
                    } else {
                        None
                    };
                    *x = match (residual.is_null(), bias) {
                        (true, Some(b)) => b,
                        (false, None) => _mm512_maskz_loadu_ps(masks[v], residual.add(r * dst_rs + 16 * v)),
                        (false, Some(b)) => _mm512_add_ps(_mm512_maskz_loadu_ps(masks[v], residual.add(r * dst_rs + 16 * v)), b),
                        (true, None) => _mm512_setzero_ps(),
                    };
                }
            }
        }
    }
    let mut rp = [a; MR];
    if ROWS {
        for (r, p) in rp.iter_mut().enumerate() {
            *p = a.add(r * a_rs);
        }
    }
    let zero: __m512bh = std::mem::transmute(_mm512_setzero_si512());
    for (t, &off) in offs.iter().enumerate().take(taps) {
        let at = a.add(t * k_pairs * MR);
        let mut bp = b.add(off * 2);
        for p in 0..k_pairs {
            let mut bv = [zero; NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp.add(32 * v) as *const _));
            }
            for (r, accr) in acc.iter_mut().enumerate() {
                let src = if ROWS { rp[r].add(p) } else { at.add(p * MR + r) };
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*src as i32));
                for (x, &bx) in accr.iter_mut().zip(&bv) {
                    *x = _mm512_dpbf16_ps(*x, av, bx);
                }
            }
            bp = bp.add(b_pair_stride);
        }
    }
    for (r, accr) in acc.iter().enumerate().take(rows) {
        let d = dst.add(r * dst_rs);
        for (v, &x) in accr.iter().enumerate() {
            _mm512_mask_storeu_ps(d.add(16 * v), masks[v], x);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 * 0.7311).sin() * 3.0) * if i % 7 == 0 { 1e-3 } else { 1.0 }).collect()
    }

    #[test]
    fn fast_packings_equal_the_generic_ones() {
        // Odd k (a zero high half), a plane that is not a multiple of 16, rows with a stride.
        let (k, plane, stride) = (7, 37, 41);
        let src = data(k * stride);
        let fast = PairPlanes::from_rows(&src, k, plane, stride);
        let generic = PairPlanes::from_fn(k, plane, |r, p| src[r * stride + p]);
        assert_eq!(fast.data, generic.data);
        // By position (B transposed in memory), straight into panels.
        let by_pos = PairPlanes::panels_from_positions(&src, k, plane, 1);
        let generic = PairPlanes::from_fn(k, plane, |r, p| src[p + r]).into_panels();
        assert_eq!(by_pos.data, generic.data);
        for kernel in [Kernel::Avx512, Kernel::Amx] {
            let (m, k) = (45, 67);
            let src = data(m * 70);
            let fast = PackedA::from_rows(kernel, m, k, &src, 70);
            let generic = PackedA::new(kernel, m, 1, k, |r, _, kk| src[r * 70 + kk]);
            assert_eq!(fast.data, generic.data, "{kernel:?}");
            // On one thread, each row prepared just before it is packed, into reused storage
            // holding other values (the last row block's padding rows included).
            let mut prepared_src = src.clone();
            let mut seen = vec![];
            let prepared = PackedA::from_rows_prepared(kernel, m, k, &mut prepared_src, 70, vec![u32::MAX; 3 * fast.data.len()], |r, row| {
                seen.push(r);
                row[0] = -row[0];
            });
            assert_eq!(seen, (0..m).collect::<Vec<_>>());
            let negated = PackedA::new(kernel, m, 1, k, |r, _, kk| if kk == 0 { -src[r * 70] } else { src[r * 70 + kk] });
            assert_eq!(prepared.data, negated.data, "{kernel:?} prepared");
            // Tap-major: 3 taps, odd k, a partial last row block.
            let taps = 3;
            let src = data(taps * k * m);
            let fast = PackedA::from_tap_major(kernel, m, taps, k, &src);
            let generic = PackedA::new(kernel, m, taps, k, |r, t, kk| src[(t * k + kk) * m + r]);
            assert_eq!(fast.data, generic.data, "{kernel:?} tap-major");
        }
    }

    /// The tile product in scalar code ([`amx::block_emulated`]), on any CPU.
    pub(super) struct Emulated;

    impl TileBlock for Emulated {
        type Thread = ();
        fn begin(&self) {}
        unsafe fn block(&self, _: &(), a: *const u32, nk: usize, b: *const u8, b_row_bytes: usize, c: *mut f32, c_row_bytes: usize, load: bool) {
            amx::block_emulated(a, nk, b, b_row_bytes, c, c_row_bytes, load);
        }
    }

    #[test]
    fn amx_driver_reads_rows_and_panels_alike() {
        // The AMX driver's addressing (row blocks, column blocks, taps, k chunks of KC blocks,
        // edge blocks, accumulation) through the emulated tile product, on every CPU: against
        // the exact product of the rounded inputs, and B in whole rows against B in panels.
        let r = |v: f32| half::bf16::from_f32(v).to_f32() as f64;
        // (rows, taps and their offsets, k, columns, plane): a linear layer's shape with three
        // k chunks and partial blocks both ways; a convolution's taps with odd k; two row
        // groups, the second short, over several column runs;
        // and a deep product whose B exceeds a run's L2 budget (several runs on one thread too).
        for (m, offs, k, n, plane) in
            [(77, vec![0], 600, 100, 100), (40, vec![0, 1, 9], 37, 50, 60), (150, vec![0], 40, 130, 130), (8, vec![0], 8192, 100, 100)]
        {
            let taps = offs.len();
            let (x, w) = (data(m * taps * k), data(k * plane));
            let a = PackedA::new(Kernel::Amx, m, taps, k, |row, t, kk| x[(row * taps + t) * k + kk]);
            let rows = PairPlanes::from_rows(&w, k, plane, plane);
            let start: Vec<f32> = data(m * n + 5).into_iter().skip(5).collect();
            for accumulate in [false, true] {
                let run = |b: &PairPlanes, parallel: bool| {
                    let mut out = if accumulate { start.clone() } else { vec![f32::NAN; m * n] };
                    let from = if accumulate { Start::Dst } else { Start::Zero };
                    gemm_taps_amx(&Emulated, &a, b, &offs, n, &mut out, n, from, parallel);
                    out
                };
                let got = run(&rows, true);
                assert!(got.iter().zip(run(&rows, false)).all(|(p, q)| p.to_bits() == q.to_bits()), "threads change the bits");
                if taps == 1 {
                    let panels = PairPlanes::from_rows(&w, k, plane, plane).into_panels();
                    assert!(got.iter().zip(run(&panels, true)).all(|(p, q)| p.to_bits() == q.to_bits()), "{m}x{k}x{n}: panels differ from rows");
                }
                for (i, j) in [(0, 0), (m - 1, n - 1), (m / 2, 33), (31, 31), (32, 32), (m - 1, 64)].into_iter().filter(|&(i, j)| i < m && j < n) {
                    let mut exact = if accumulate { start[i * n + j] as f64 } else { 0.0 };
                    for (t, &o) in offs.iter().enumerate() {
                        exact += (0..k).map(|kk| r(x[(i * taps + t) * k + kk]) * r(w[kk * plane + o + j])).sum::<f64>();
                    }
                    let e = (got[i * n + j] as f64 - exact).abs();
                    assert!(e < 1e-5 * (1.0 + exact.abs()), "{m}x{k}x{n} taps {taps} ({i}, {j}): {} vs {exact}", got[i * n + j]);
                }
            }
        }
    }

    #[test]
    fn row_major_and_panels_give_the_blocked_layouts_bits() {
        if crate::kernels::testing::without_bf16() {
            return;
        }
        // Partial row and column blocks, a last column block of at most 16 (one register per
        // row), odd k, and k pairs a multiple of 1024 (row-major rows padded apart).
        for (m, k, n) in [(13, 41, 40), (8, 2048, 33), (21, 7, 16), (64, 77, 77)] {
            let (x, w) = (data(m * (k + 3)), data(k * n));
            let blocked = PackedA::from_rows(Kernel::Avx512, m, k, &x, k + 3);
            let mut xs = x.clone();
            let mut seen = vec![];
            let rows = PackedA::row_major_prepared(m, k, &mut xs, k + 3, vec![7; 3], |r, _| seen.push(r));
            assert_eq!(seen, (0..m).collect::<Vec<_>>());
            assert_eq!(rows.data, PackedA::row_major(m, k, &x, k + 3, Vec::new(), true).data);
            let planes = PairPlanes::from_rows(&w, k, n, n);
            let mut reference = vec![0f32; m * n];
            gemm_taps(&blocked, &planes, &[0], n, &mut reference, n, Start::Zero, true).unwrap();
            let panels = PairPlanes::from_rows(&w, k, n, n).into_panels();
            for (a, b) in [(&rows, &planes), (&blocked, &panels), (&rows, &panels)] {
                let mut out = vec![0f32; m * n];
                gemm_taps(a, b, &[0], n, &mut out, n, Start::Zero, true).unwrap();
                assert!(out.iter().zip(&reference).all(|(p, q)| p.to_bits() == q.to_bits()), "{m}x{k}x{n}");
            }
            // Exact to f32 summation against the rounded inputs, so a misread layout cannot hide.
            let r = |v: f32| half::bf16::from_f32(v).to_f32() as f64;
            let exact: f64 = (0..k).map(|kk| r(x[(m - 1) * (k + 3) + kk]) * r(w[kk * n + n - 1])).sum();
            assert!((reference[m * n - 1] as f64 - exact).abs() < 1e-4 * (1.0 + exact.abs()), "{m}x{k}x{n}");
        }
    }

    #[test]
    fn filled_starts_equal_filling_dst_first() {
        // Each task setting its block from bias and residual gives the bits of a product added
        // to a dst filled beforehand, on both kernels (AMX through the scalar tile product where
        // the CPU has none), with partial row and column blocks and a dst wider than n.
        let (m, k, n, dst_rs) = (45, 67, 70, 75);
        let x = data(m * k);
        let planes = PairPlanes::from_rows(&data(k * n), k, n, n).into_panels();
        let (cols, rows_b, residual) = (data(n + 3), data(m + 1), data(m * dst_rs));
        let kernels = if supported() { vec![Kernel::Avx512, Kernel::Amx] } else { vec![Kernel::Amx] };
        for kernel in kernels {
            let a = PackedA::from_rows(kernel, m, k, &x, k);
            for bias in [None, Some(Bias::Columns(&cols[..n])), Some(Bias::Rows(&rows_b[..m]))] {
                for res in [None, Some(&residual[..])] {
                    let mut filled = vec![f32::NAN; m * dst_rs];
                    for r in 0..m {
                        for j in 0..n {
                            let bv = match bias {
                                None => None,
                                Some(Bias::Columns(b)) => Some(b[j]),
                                Some(Bias::Rows(b)) => Some(b[r]),
                            };
                            filled[r * dst_rs + j] = match (bv, res) {
                                (None, None) => 0.0,
                                (Some(b), None) => b,
                                (None, Some(x)) => x[r * dst_rs + j],
                                (Some(b), Some(x)) => x[r * dst_rs + j] + b,
                            };
                        }
                    }
                    let mut expected = filled.clone();
                    gemm_taps(&a, &planes, &[0], n, &mut expected, dst_rs, Start::Dst, true).unwrap();
                    let mut got = vec![f32::NAN; m * dst_rs];
                    gemm_taps(&a, &planes, &[0], n, &mut got, dst_rs, Start::Fill { bias, residual: res }, true).unwrap();
                    for r in 0..m {
                        let (g, e) = (&got[r * dst_rs..][..n], &expected[r * dst_rs..][..n]);
                        assert!(g.iter().zip(e).all(|(p, q)| p.to_bits() == q.to_bits()), "{kernel:?} {bias:?} residual {}: row {r}", res.is_some());
                    }
                    // Columns beyond n are not written.
                    assert!(got[n..dst_rs].iter().all(|v| v.is_nan()));
                }
            }
            // A bias or residual too short for the output is refused, not read past.
            let mut out = vec![0f32; m * dst_rs];
            let short = Start::Fill { bias: Some(Bias::Columns(&cols[..n - 1])), residual: None };
            assert!(gemm_taps(&a, &planes, &[0], n, &mut out, dst_rs, short, true).is_err());
        }
    }
}
