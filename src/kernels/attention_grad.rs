//! The backward pass of multi-head attention, `softmax(scale · Q Kᵀ + mask) V`, with the
//! probabilities recomputed from q and k (as FlashAttention does, Dao et al. 2022, §3.1):
//!
//! `P = softmax(S)`, `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ∘ (dP - rowsum(dP ∘ P))`,
//! `dQ = scale · dS K`, `dK = scale · dSᵀ Q`.
//!
//! Every value is rounded exactly as candle's composition of those steps rounds it (one
//! `matmul` per head through `gemm` with the same shapes and strides, candle's softmax and row
//! sums, the scale applied as its `affine`), so training keeps the bits it had when the
//! backward was built from candle ops. Composed, that backward was two dozen tensor ops per
//! batch item on tiny per-head matrices (a head of 8 channels over 64 tokens in the demo
//! world): allocation and dispatch took nearly all of its time.
use candle_core::cpu::kernels::VecOps;
use rayon::prelude::*;

use super::gemm::{sgemm, threads};

/// Sizes of one backward call: `b` items of `n` queries and `m` keys, `heads` heads of `d`
/// channels each (rows of `heads · d` values).
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub b: usize,
    pub n: usize,
    pub m: usize,
    pub heads: usize,
    pub d: usize,
}

/// Gradients `(dq, dk, dv)` of `q` [b, n, heads·d] and `k`, `v` [b, m, heads·d] given the
/// output's gradient `g` [b, n, heads·d]; `mask` [n, m] is the additive mask the forward used.
/// Items and heads run in parallel; the result does not depend on the thread count.
///
/// Panics if a slice is shorter than its shape.
pub fn attention_backward(q: &[f32], k: &[f32], v: &[f32], g: &[f32], mask: Option<&[f32]>, s: AttentionShape) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let AttentionShape { b, n, m, heads, d } = s;
    let inner = heads * d;
    let (qlen, klen) = (n * inner, m * inner);
    assert!(q.len() >= b * qlen && g.len() >= b * qlen && k.len() >= b * klen && v.len() >= b * klen, "attention_backward: inputs shorter than {s:?}");
    assert!(mask.is_none_or(|mk| mk.len() >= n * m), "attention_backward: mask shorter than [{n}, {m}]");
    let (mut dq, mut dk, mut dv) = (vec![0f32; b * qlen], vec![0f32; b * klen], vec![0f32; b * klen]);
    if b * inner == 0 || n == 0 || m == 0 {
        return (dq, dk, dv);
    }
    // One task per item and head (a single item, as in textual inversion, still fills the
    // threads); with fewer tasks than threads, gemm splits each product instead. Neither
    // changes an output's arithmetic.
    let tasks = b * heads;
    let gemm_threads = if tasks >= threads() { 1 } else { threads() };
    let parts: Vec<[Vec<f32>; 3]> = (0..tasks)
        .into_par_iter()
        .map(|t| {
            let (i, h) = (t / heads, t % heads);
            let (qi, gi) = (&q[i * qlen..(i + 1) * qlen], &g[i * qlen..(i + 1) * qlen]);
            let (ki, vi) = (&k[i * klen..(i + 1) * klen], &v[i * klen..(i + 1) * klen]);
            head_backward(qi, ki, vi, gi, mask, s, h, gemm_threads)
        })
        .collect();
    dq.par_chunks_mut(qlen).zip(dk.par_chunks_mut(klen)).zip(dv.par_chunks_mut(klen)).enumerate().for_each(|(i, ((dq, dk), dv))| {
        for (h, [dqh, dkh, dvh]) in parts[i * heads..(i + 1) * heads].iter().enumerate() {
            merge_head(dqh, dq, h, heads, d);
            merge_head(dkh, dk, h, heads, d);
            merge_head(dvh, dv, h, heads, d);
        }
    });
    (dq, dk, dv)
}

/// Head `h` of `t` [len, heads·d] as a contiguous [len, d] matrix (a head of candle's
/// `reshape`, `transpose(1, 2)`, `contiguous`).
fn head_of(t: &[f32], len: usize, h: usize, heads: usize, d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(len * d);
    for r in 0..len {
        out.extend_from_slice(&t[(r * heads + h) * d..][..d]);
    }
    out
}

/// Head `h`'s [len, d] block of `src` into `dst` [len, heads·d] (the inverse of [`head_of`]).
fn merge_head(src: &[f32], dst: &mut [f32], h: usize, heads: usize, d: usize) {
    for (r, row) in src.chunks_exact(d).enumerate() {
        dst[(r * heads + h) * d..][..d].copy_from_slice(row);
    }
}

/// `x * scale + 0`: candle's `affine(scale, 0)`, which turns a negative zero positive.
fn scale_in_place(x: &mut [f32], scale: f32) {
    x.iter_mut().for_each(|v| *v = *v * scale + 0.0);
}

/// dst [rows, cols] = lhs · rhs over depth `k`, operands given by (row, column) strides: one
/// `gemm` call with the arguments of candle's `matmul` on such views.
#[allow(clippy::too_many_arguments)]
fn product(dst: &mut [f32], rows: usize, cols: usize, k: usize, lhs: &[f32], lhs_strides: (usize, usize), rhs: &[f32], rhs_strides: (usize, usize), threads: usize) {
    debug_assert!(dst.len() >= rows * cols);
    // SAFETY: the callers pass matrices whose strides stay within their slices.
    unsafe { sgemm(rows, cols, k, dst.as_mut_ptr(), cols, 1, false, lhs.as_ptr(), lhs_strides.0, lhs_strides.1, rhs.as_ptr(), rhs_strides.0, rhs_strides.1, 1.0, threads) };
}

/// candle's `softmax_last_dim` of one row, in place.
fn softmax_row(row: &mut [f32]) {
    let mut max = f32::NEG_INFINITY;
    // SAFETY: the pointers cover `row`, which is not empty.
    unsafe { f32::vec_reduce_max(row.as_ptr(), &mut max, row.len()) };
    row.iter_mut().for_each(|v| *v -= max);
    // `f32::exp`'s bits, in vectors.
    super::expf::exp_in_place(row);
    let mut sum = 0f32;
    unsafe { f32::vec_reduce_sum(row.as_ptr(), &mut sum, row.len()) };
    row.iter_mut().for_each(|v| *v /= sum);
}

/// (dq, dk, dv) of head `h` of one item, each [len, d].
#[allow(clippy::too_many_arguments)]
fn head_backward(q: &[f32], k: &[f32], v: &[f32], g: &[f32], mask: Option<&[f32]>, s: AttentionShape, h: usize, threads: usize) -> [Vec<f32>; 3] {
    let AttentionShape { n, m, heads, d, .. } = s;
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    let (qh, kh, vh, gh) = (head_of(q, n, h, heads, d), head_of(k, m, h, heads, d), head_of(v, m, h, heads, d), head_of(g, n, h, heads, d));
    let (mut p, mut dp, mut prod) = (vec![0f32; n * m], vec![0f32; n * m], vec![0f32; m]);
    let (mut dqh, mut dkh, mut dvh) = (vec![0f32; n * d], vec![0f32; m * d], vec![0f32; m * d]);
    // S = Q Kᵀ (Kᵀ a transposed view: strides (1, d)), scaled, masked; P = softmax(S).
    product(&mut p, n, m, d, &qh, (d, 1), &kh, (1, d), threads);
    scale_in_place(&mut p, scale);
    if let Some(mask) = mask {
        p.iter_mut().zip(mask).for_each(|(s, &mv)| *s += mv);
    }
    p.chunks_exact_mut(m).for_each(softmax_row);
    // dV = Pᵀ dO, dP = dO Vᵀ.
    product(&mut dvh, m, d, n, &p, (1, m), &gh, (d, 1), threads);
    product(&mut dp, n, m, d, &gh, (d, 1), &vh, (1, d), threads);
    // dS = P ∘ (dP - rowsum(dP ∘ P)), in dp's place: the product is a tensor of its own in
    // candle, summed row by row.
    for (dp_row, p_row) in dp.chunks_exact_mut(m).zip(p.chunks_exact(m)) {
        prod.iter_mut().zip(dp_row.iter()).zip(p_row).for_each(|((t, &a), &b)| *t = a * b);
        let mut row = 0f32;
        // SAFETY: `prod` holds m values.
        unsafe { f32::vec_reduce_sum(prod.as_ptr(), &mut row, m) };
        dp_row.iter_mut().zip(p_row).for_each(|(a, &b)| *a = b * (*a - row));
    }
    let ds = &dp;
    product(&mut dqh, n, d, m, ds, (m, 1), &kh, (d, 1), threads);
    scale_in_place(&mut dqh, scale);
    product(&mut dkh, m, d, n, ds, (1, m), &qh, (d, 1), threads);
    scale_in_place(&mut dkh, scale);
    [dqh, dkh, dvh]
}
