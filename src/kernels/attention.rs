//! Attention: softmax(scale * Q K^T + mask) V without materialising all scores. Work is split
//! into (batch, head, block of query rows) tasks; each computes its block's full score rows
//! (block x m, in a per-thread scratch buffer), an exact max-subtracted softmax, and P V.
//! Both products run in f32, or with bf16 inputs (Q, K, the probabilities and V rounded to
//! bf16, f32 accumulation) on a [`bf16::Kernel`]; the softmax is f32 either way.
use candle_core::Tensor;
use rayon::prelude::*;

use super::bf16::{self, PackedA, PairPlanes};
use super::gemm::sgemm;
use super::simd::{dispatch, exp_v, Vf, LANES, S1};
#[cfg(target_arch = "x86_64")]
use super::simd::first_lanes;
use super::io::{tensor, uninit, with_slices, SendPtr};
use crate::error::{Error, Result};

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The bf16 path's packed queries and probabilities, whose storage the AVX-512 layout
    /// ([`PackedA::row_major`]) reuses from call to call.
    static PAIRS: std::cell::RefCell<[Vec<u32>; 2]> = const { std::cell::RefCell::new([Vec::new(), Vec::new()]) };
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
/// With `bf16_kernel` the two products take bf16 inputs. Inference only.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: Option<&Tensor>, bf16_kernel: Option<bf16::Kernel>) -> Result<Tensor> {
    let dims3 = |t: &Tensor| -> Result<[usize; 3]> {
        let (a, b, c) = t.dims3()?;
        Ok([a, b, c])
    };
    let dims = [dims3(q)?, dims3(k)?, dims3(v)?];
    let out = with_slices(&[q, k, v], |s| attention_on([s[0], s[1], s[2]], dims, heads, mask, bf16_kernel))??;
    tensor(out, &dims[0])
}

/// [`attention`] of queries, keys and values given as contiguous data with their shapes
/// `[q, k, v]` (a custom op's storage: no copies in or out); the output is shaped like q.
pub fn attention_on(qkv: [&[f32]; 3], dims: [[usize; 3]; 3], heads: usize, mask: Option<&Tensor>, bf16_kernel: Option<bf16::Kernel>) -> Result<Vec<f32>> {
    let [[b, n, inner], [bk, m, inner_k], v_dims] = dims;
    if bk != b || inner_k != inner || v_dims != dims[1] || heads == 0 || inner % heads != 0 {
        return Err(Error::invalid(format!("attention: q {:?}, k {:?}, v {:?}, {heads} heads", dims[0], dims[1], dims[2])));
    }
    for (t, d) in qkv.iter().zip(&dims) {
        if t.len() != d.iter().product::<usize>() {
            return Err(Error::invalid(format!("attention: {} values for shape {d:?}", t.len())));
        }
    }
    if let Some(mk) = mask {
        if mk.dims() != [n, m] {
            return Err(Error::invalid(format!("attention: mask {:?}, expected [{n}, {m}]", mk.dims())));
        }
    }
    let d = inner / heads;
    let scale = 1.0 / (d as f32).sqrt();
    // Query block: enough rows for an efficient gemm, the score block within ~4 MiB. Every
    // f32 block packs its head's K and V again, so taller blocks pack less: at 4096 keys, 64
    // rows instead of 32 made a self-attention call 15 % faster, and 256 instead of 64 another
    // 8 % with SD-1.5's 40-wide heads and 38 % with the VAE's single 512-wide head (timed
    // alone; bf16 17 % alone, level inside the UNet). The block depends on the shapes alone, so
    // the bits do not depend on the threads or the batch.
    let bq = ((1 << 20) / m.max(1)).clamp(16, 256).min(n.max(1));
    let nblocks = n.div_ceil(bq);
    let ts: Vec<&Tensor> = mask.into_iter().collect();
    with_slices(&ts, |s| {
        let [qs, ks, vs] = qkv;
        let ms = s.first().copied();
        let mut out = uninit(b * n * inner);
        if out.is_empty() || m == 0 {
            out.fill(0.0);
            return out;
        }
        if let Some(kernel) = bf16_kernel {
            attention_bf16(kernel, qs, ks, vs, ms, &mut out, (b, n, m, heads, d), bq, scale);
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
    })
}

/// The bf16 products of [`attention`]: K^T and V of each (batch, head) are packed once as the
/// right operands; each query block packs its Q rows and, after the f32 softmax, its
/// probabilities as the left operands, each row's softmax (with [`softmax_row_bf16`]'s e^x)
/// and conversion in one pass. Same task split as the f32 path.
#[allow(clippy::too_many_arguments)]
fn attention_bf16(
    kernel: bf16::Kernel,
    qs: &[f32],
    ks: &[f32],
    vs: &[f32],
    ms: Option<&[f32]>,
    out: &mut [f32],
    (b, n, m, heads, d): (usize, usize, usize, usize, usize),
    bq: usize,
    scale: f32,
) {
    let inner = heads * d;
    let nblocks = n.div_ceil(bq);
    let planes: Vec<(PairPlanes, PairPlanes)> = (0..b * heads)
        .into_par_iter()
        .map(|bh| {
            let (bi, hi) = (bh / heads, bh % heads);
            let at = |key: usize, c: usize| (bi * m + key) * inner + hi * d + c;
            // In rows, K^T's pair rows would be a plane of m keys apart: at 4096 keys 16 KiB,
            // all in one cache set; both kernels read panels (the same bits).
            let kt = PairPlanes::panels_from_positions(&ks[at(0, 0)..], d, m, inner);
            let vp = PairPlanes::from_rows(&vs[at(0, 0)..], m, d, inner);
            (kt, vp)
        })
        .collect();
    let optr = SendPtr(out.as_mut_ptr());
    (0..b * heads * nblocks).into_par_iter().for_each(|task| {
        let optr = optr;
        let (bh, blk) = (task / nblocks, task % nblocks);
        let (bi, hi) = (bh / heads, bh % heads);
        let (kt, vp) = &planes[bh];
        let q0 = blk * bq;
        let rows = bq.min(n - q0);
        SCRATCH.with(|sc| {
            let mut sc = sc.borrow_mut();
            if sc.len() < rows * m + rows + rows * d {
                sc.resize(rows * m + rows + rows * d, 0.0);
            }
            let (sbuf, rest) = sc.split_at_mut(rows * m);
            let (sums, obuf) = rest.split_at_mut(rows);
            let (sums, obuf) = (&mut sums[..rows], &mut obuf[..rows * d]);
            // The scale is applied to Q before rounding (as a bf16 model's scaled query would be).
            let q = &qs[(bi * n + q0) * inner + hi * d..];
            PAIRS.with(|pairs| {
                let [qp, pp] = &mut *pairs.borrow_mut();
                // The scaled queries go through obuf, which the output overwrites later.
                for (r, row) in obuf.chunks_exact_mut(d).enumerate() {
                    for (o, &x) in row.iter_mut().zip(&q[r * inner..r * inner + d]) {
                        *o = x * scale;
                    }
                }
                let a = match kernel {
                    bf16::Kernel::Avx512 => PackedA::row_major(rows, d, obuf, d, std::mem::take(qp), false),
                    bf16::Kernel::Amx => PackedA::from_rows_prepared(kernel, rows, d, obuf, d, std::mem::take(qp), |_, _| {}),
                };
                bf16::gemm_taps(&a, kt, &[0], m, sbuf, m, bf16::Start::Zero, false).expect("packed to these shapes");
                *qp = a.into_storage();
                if let Some(mk) = ms {
                    add_mask(sbuf, &mk[q0 * m..(q0 + rows) * m]);
                }
                // Each row's softmax, then its conversion, while the row is in L1.
                // SAFETY: both kernels run only on CPUs with AVX-512 BF16, hence F.
                let softmax = |r: usize, row: &mut [f32]| sums[r] = unsafe { softmax_row_bf16(row) };
                let p = match kernel {
                    bf16::Kernel::Avx512 => PackedA::row_major_prepared(rows, m, sbuf, m, std::mem::take(pp), softmax),
                    bf16::Kernel::Amx => PackedA::from_rows_prepared(kernel, rows, m, sbuf, m, std::mem::take(pp), softmax),
                };
                bf16::gemm_taps(&p, vp, &[0], d, obuf, d, bf16::Start::Zero, false).expect("packed to these shapes");
                *pp = p.into_storage();
            });
            for (r, &sum) in sums.iter().enumerate() {
                // SAFETY: row r of this task's (batch, head, block) lies inside `out`; tasks
                // write disjoint (row, head) ranges.
                let row = unsafe { std::slice::from_raw_parts_mut(optr.0.add((bi * n + q0 + r) * inner + hi * d), d) };
                for (x, &o) in row.iter_mut().zip(&obuf[r * d..(r + 1) * d]) {
                    *x = o / sum;
                }
            }
        });
    });
}

/// Softmax numerators of a row for the bf16 paths (both kernels): the row max, then e^(x - max) in
/// place, the row sum returned. Its e^x is cheaper than [`exp_v`]: 2^f by a degree-5 Taylor
/// polynomial on [-1/2, 1/2] (relative error 2.4e-6) scaled by 2^k with `vscalefps`, the
/// argument's product with log2(e) rounded to f32 (up to 5e-6 more at the far end); exactly 0
/// below -87.34 and for -inf, as [`exp_v`]. The numerators are rounded to bf16 right after, a
/// relative step of 2^-9, so the full-precision exp bought nothing here while it was a quarter
/// of an attention call; the f32 path keeps [`softmax_rows`]. The order of every sum
/// is fixed.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_row_bf16(row: &mut [f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = row.len();
    let p = row.as_mut_ptr();
    let mut vmax = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i < n {
        let m = first_lanes(n - i);
        vmax = _mm512_mask_max_ps(vmax, m, vmax, _mm512_maskz_loadu_ps(m, p.add(i)));
        i += 16;
    }
    let mut mx = _mm512_reduce_max_ps(vmax);
    if mx == f32::NEG_INFINITY {
        mx = 0.0;
    }
    let (vm, lo, log2e) = (_mm512_set1_ps(mx), _mm512_set1_ps(-87.336_54), _mm512_set1_ps(std::f32::consts::LOG2_E));
    // ln(2)^j / j!
    let c = [1.333_355_8e-3, 9.618_129e-3, 5.550_411e-2, 2.402_265e-1, 6.931_472e-1, 1.0].map(|v: f32| _mm512_set1_ps(v));
    let mut vsum = _mm512_setzero_ps();
    let mut i = 0;
    while i < n {
        let m = first_lanes(n - i);
        let x = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(i)), vm);
        // Not below the range; a NaN score stays NaN.
        let kept = _mm512_mask_cmp_ps_mask::<_CMP_NLT_UQ>(m, x, lo);
        let t = _mm512_mul_ps(x, log2e);
        let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
        let f = _mm512_sub_ps(t, k);
        let mut q = c[0];
        for &cj in &c[1..] {
            q = _mm512_fmadd_ps(q, f, cj);
        }
        // Zero below the range (and in the tail's unused lanes).
        let e = _mm512_maskz_scalef_ps(kept, q, k);
        _mm512_mask_storeu_ps(p.add(i), m, e);
        vsum = _mm512_add_ps(vsum, e);
        i += 16;
    }
    _mm512_reduce_add_ps(vsum)
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_bf16_paths_softmax_is_close_to_the_exact_one() {
        if crate::kernels::testing::without_bf16() {
            return;
        }
        // A tail of 13 lanes, a masked key, the far left of the range, a row of only -inf.
        let mut row: Vec<f32> = (0..77).map(|i| ((i as f32 * 0.37).sin() * 30.0) - if i == 5 { 90.0 } else { 0.0 }).collect();
        row[9] = f32::NEG_INFINITY;
        let exact: Vec<f64> = {
            let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            row.iter().map(|&x| (x as f64 - mx).exp()).collect()
        };
        let mut ours = row.clone();
        let sum = unsafe { super::softmax_row_bf16(&mut ours) };
        for (i, (&o, &e)) in ours.iter().zip(&exact).enumerate() {
            assert!((o as f64 - e).abs() <= 1e-5 * e + 1e-30, "element {i}: {o} vs {e}");
        }
        assert_eq!(ours[9], 0.0);
        let esum: f64 = exact.iter().sum();
        assert!((sum as f64 - esum).abs() < 1e-5 * esum, "{sum} vs {esum}");
        // A NaN score is not hidden.
        let mut bad = row.clone();
        bad[40] = f32::NAN;
        assert!(unsafe { super::softmax_row_bf16(&mut bad) }.is_nan());
        // A row masked whole sums to 0, as with the f32 path.
        let mut empty = vec![f32::NEG_INFINITY; 20];
        assert_eq!(unsafe { super::softmax_row_bf16(&mut empty) }, 0.0);
        assert!(empty.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn the_amx_layouts_attention_matches_the_avx512_ones() {
        // Where the CPU has no AMX the tile product is emulated (see `bf16::gemm_taps`), so the
        // AMX path's packing, softmax and scaling are checked on every CPU with AVX-512 BF16.
        use super::bf16::Kernel;
        if crate::kernels::testing::without_bf16() {
            return;
        }
        use crate::kernels::testing::{rel_l2 as rel, values as vals, wave};
        let t = |seed: usize, shape: &[usize]| wave(seed, shape, 2.0);
        // Masked cross-attention shape; 300 keys: two chunks of k blocks in P V and two query
        // blocks (the last partial).
        for (n, m, heads, d, masked) in [(45, 77, 3, 13, true), (150, 300, 2, 40, false)] {
            let (q, k, v) = (t(1, &[2, n, heads * d]), t(2, &[2, m, heads * d]), t(3, &[2, m, heads * d]));
            let mask = masked.then(|| t(4, &[n, m]));
            let run = |kr| vals(&super::attention(&q, &k, &v, heads, mask.as_ref(), kr).unwrap());
            let (amx, avx, f32s) = (run(Some(Kernel::Amx)), run(Some(Kernel::Avx512)), run(None));
            // The same rounded inputs and the same softmax: only the order of f32 sums differs.
            let (e, e32) = (rel(&amx, &avx), rel(&amx, &f32s));
            eprintln!("{n}x{m}, {heads} heads of {d}: AMX layout vs AVX-512 {e:.2e}, vs f32 {e32:.2e}");
            assert!(e < 1e-4, "AMX vs AVX-512 bf16 attention: {e}");
            assert!(e32 > 1e-5 && e32 < 3e-2, "AMX bf16 vs f32 attention: {e32}");
        }
    }
}
