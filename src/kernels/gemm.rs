//! f32 matrix products through the `gemm` crate with explicit strides.

pub(crate) fn threads() -> usize {
    rayon::current_num_threads()
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
