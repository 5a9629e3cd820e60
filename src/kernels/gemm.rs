//! f32 matrix products through the `gemm` crate with explicit strides, and how a batch of
//! them shares the threads.
use rayon::prelude::*;

pub(crate) fn threads() -> usize {
    rayon::current_num_threads()
}

/// Runs `one(i, chunk)` on each of the `items` equal chunks of `out`: in parallel when there
/// are several (each product then single-threaded, so the split never changes the arithmetic).
pub(crate) fn per_item(out: &mut [f32], items: usize, one: impl Fn(usize, &mut [f32]) + Sync) {
    if items > 1 {
        let len = out.len() / items;
        out.par_chunks_mut(len).enumerate().for_each(|(i, dst)| one(i, dst));
    } else {
        one(0, out);
    }
}

/// Runs `f(0..n)`, on the thread pool when `parallel`.
pub(crate) fn for_tasks(n: usize, parallel: bool, f: impl Fn(usize) + Sync + Send) {
    if parallel {
        (0..n).into_par_iter().for_each(f);
    } else {
        (0..n).for_each(f);
    }
}

/// dst[m, n] = (accumulate ? dst : 0) + scale * lhs[m, k] @ rhs[k, n], all with explicit
/// (row, column) strides in elements. `threads` > 1 lets gemm split the product across rayon.
///
/// # Safety
/// The pointers must address every element the strides reach; dst must not alias the inputs.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm(
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
