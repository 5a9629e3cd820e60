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

/// The depth block in which `gemm` 0.19 sums each entry of an `m x k` by `k x n` product
/// (the last block shorter). Its usual kernels (at least 2 rows and 2 columns, a depth of at
/// least 3, more than 256 outputs) run one fused multiply-add chain per depth block, from
/// zero, and add the blocks in order: a depth up to 512 is one block, products of at most
/// 64 x 64 take blocks of 512 at any depth, and other deeper products the block its
/// `cache::kernel_params` sizes from the CPU's L1 cache and the microkernel's rows (64 with
/// AVX-512, 16 with AVX2 and FMA; 6 columns), k split evenly (768 -> 2 x 384 on the CPUs
/// measured, 3072 -> 6 x 512), whatever `m` and `n` (`None` for those on other CPUs). Its other kernels (`gevv` for a depth of 1-2,
/// `gemv` for one row or column, the "horizontal" ones for at most 256 outputs) sum in orders
/// of their own: `None` for those. Our direct kernels, which sum the same way, give `gemm`'s
/// bits exactly where this is `Some` (tested against `gemm` at depths 768 and 3072).
pub(crate) fn depth_block(m: usize, n: usize, k: usize) -> Option<usize> {
    if m < 2 || n < 2 || k < 3 || m * n <= 256 {
        None
    } else if k <= 512 {
        Some(k)
    } else if m <= 64 && n <= 64 {
        Some(512)
    } else {
        microkernel_rows().map(|mr| gemm_common::cache::kernel_params(m, n, k, mr, 6, 4).kc)
    }
}

/// Rows of the f32 microkernel `gemm` dispatches to on this CPU (its own test: AVX-512F, else
/// FMA); `None` on other CPUs, whose kernels are not reproduced here.
fn microkernel_rows() -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return Some(64);
        }
        if std::is_x86_feature_detected!("fma") {
            return Some(16);
        }
    }
    None
}

/// Whether `gemm` sums each entry of the product in one chain over the whole depth (see
/// [`depth_block`]).
pub(crate) fn one_block(m: usize, n: usize, k: usize) -> bool {
    depth_block(m, n, k) == Some(k)
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
