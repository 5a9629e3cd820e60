//! The bf16 block product on Intel AMX tile units (TMUL, `tdpbf16ps`), for CPUs that have them
//! (Sapphire Rapids and later); chosen at run time by [`available`], never at build time.
//!
//! One call computes a 32 x 32 f32 block `C = sum over taps t and k blocks of A_t,kb B_t,kb`
//! in four 16 x 16 accumulator tiles (a 2 x 2 blocking uses all eight tile registers: four
//! accumulators, two A tiles, two B tiles). A tile is 16 rows of 16 bf16 pairs (64 bytes), the
//! layout [`super::bf16::PackedA`] packs for this kernel; B tiles are read straight from
//! [`super::bf16::PairPlanes`], 16 columns of a pair row being 64 bytes: whole pair rows a plane
//! apart (a convolution's input, each tap an offset into it) or column panels, 128 bytes per
//! pair row (weights and attention's K^T, read whole).
//! The instructions are written as inline assembly because Rust's AMX intrinsics are not
//! stable. Each output is summed in a fixed order (taps, then k blocks, then the hardware's
//! order inside a tile product), so the result does not depend on the number of threads.
use std::sync::OnceLock;

/// Rows (and columns) of the block one [`block`] call computes.
pub const BLOCK: usize = 32;
/// bf16 pairs of k per tile product.
pub const KB: usize = 16;

/// Whether this CPU and kernel can run AMX bf16 tiles. Linux gives a process the (8 KiB) tile
/// state only on request, made here once (`arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)`).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    use std::arch::x86_64::{__cpuid_count, _xgetbv};
    // SAFETY: cpuid leaf 7 exists on every x86-64 CPU that reports max leaf >= 7 (checked);
    // xgetbv is valid once cpuid reports OSXSAVE.
    unsafe {
        if __cpuid_count(0, 0).eax < 7 {
            return false;
        }
        let leaf7 = __cpuid_count(7, 0);
        let (amx_bf16, amx_tile) = (leaf7.edx & (1 << 22) != 0, leaf7.edx & (1 << 24) != 0);
        let osxsave = __cpuid_count(1, 0).ecx & (1 << 27) != 0;
        if !(amx_bf16 && amx_tile && osxsave) {
            return false;
        }
        // XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA): the kernel saves the tile state.
        if _xgetbv(0) & (0b11 << 17) != 0b11 << 17 {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// The tile configuration (palette 1): eight tiles of 16 rows x 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// The tile registers configured for [`block`] on this thread; released when dropped.
pub struct Tiles(());

impl Tiles {
    /// Loads the tile configuration.
    ///
    /// # Safety
    /// [`available`] must be true.
    #[cfg(target_arch = "x86_64")]
    pub unsafe fn configure() -> Tiles {
        std::arch::asm!("ldtilecfg [{0}]", in(reg) &CONFIG as *const TileConfig, options(nostack, readonly));
        Tiles(())
    }
}

#[cfg(target_arch = "x86_64")]
impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured by this thread (a `Tiles` is not Send).
        unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// `C (+)= sum over kb < nk of A[kb] B[kb]` for one 32 x 32 block of f32 `c`, rows
/// `c_row_bytes` apart: C starts from its current values when `load`, else from zero, and the
/// products are added in k-block order. `a` points at the first k block's two A tiles (32 rows
/// of 16 u32 pairs each, k blocks consecutive); `b` at B's first pair row and first column, pair
/// rows `b_row_bytes` apart, each k block reading 16 rows of 32 columns. Storing C and loading
/// it again is exact, so a product split into several calls sums in the same order.
///
/// # Safety
/// The tiles must be configured on this thread; every access must stay inside the operands
/// (nk * 2 KiB of A; 16 * nk rows of 128 bytes of B; 32 rows of 128 bytes of C).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn block(_tiles: &Tiles, a: *const u32, nk: usize, b: *const u8, b_row_bytes: usize, c: *mut f32, c_row_bytes: usize, load: bool) {
    use std::arch::asm;
    let row = 64usize;
    let c = c as *mut u8;
    let (c00, c01, c10, c11) = (c, c.add(64), c.add(16 * c_row_bytes), c.add(16 * c_row_bytes + 64));
    if load {
        asm!(
            "tileloadd tmm0, [{c00} + {s}*1]",
            "tileloadd tmm1, [{c01} + {s}*1]",
            "tileloadd tmm2, [{c10} + {s}*1]",
            "tileloadd tmm3, [{c11} + {s}*1]",
            c00 = in(reg) c00, c01 = in(reg) c01, c10 = in(reg) c10, c11 = in(reg) c11, s = in(reg) c_row_bytes,
            options(nostack, readonly),
        );
    } else {
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
    }
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let (mut ap, mut bp) = (a, b);
    let b_end = b.wrapping_add(nk * KB * b_row_bytes);
    for _ in 0..nk {
        asm!(
            "tileloadd tmm4, [{a0} + {row}*1]",
            "tileloadd tmm5, [{a1} + {row}*1]",
            "tileloadd tmm6, [{b0} + {bs}*1]",
            "tileloadd tmm7, [{b1} + {bs}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) ap,
            a1 = in(reg) ap.add(16 * KB),
            b0 = in(reg) bp,
            b1 = in(reg) bp.add(64),
            row = in(reg) row,
            bs = in(reg) b_row_bytes,
            options(nostack, readonly),
        );
        ap = ap.wrapping_add(2 * 16 * KB);
        bp = bp.wrapping_add(KB * b_row_bytes);
        if bp < b_end {
            // The next k block's B rows into L1 while these products run: B is read once per
            // block from L2 (or, a plane apart in a convolution's input, from rows no hardware
            // prefetcher follows), and a tile load waits for all 16 of its rows.
            for r in 0..KB {
                let p = bp.add(r * b_row_bytes) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(p);
                _mm_prefetch::<_MM_HINT_T0>(p.add(64));
                _mm_prefetch::<_MM_HINT_T0>(p.add(127));
            }
        }
    }
    asm!(
        "tilestored [{c00} + {s}*1], tmm0",
        "tilestored [{c01} + {s}*1], tmm1",
        "tilestored [{c10} + {s}*1], tmm2",
        "tilestored [{c11} + {s}*1], tmm3",
        c00 = in(reg) c00, c01 = in(reg) c01, c10 = in(reg) c10, c11 = in(reg) c11, s = in(reg) c_row_bytes,
        options(nostack),
    );
}

/// What [`block`] computes, in scalar code that runs on any CPU (each tile product summed in
/// pair order here, so the bits may differ from the hardware's in the last place): tests run
/// the callers' addressing through it where the CPU has no AMX.
///
/// # Safety
/// As [`block`]'s operands.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn block_emulated(a: *const u32, nk: usize, b: *const u8, b_row_bytes: usize, c: *mut f32, c_row_bytes: usize, load: bool) {
    let half = |v: u32, hi: bool| f32::from_bits(if hi { v & 0xffff_0000 } else { v << 16 });
    let c = c as *mut u8;
    let at_c = |r: usize, j: usize| c.add(r * c_row_bytes + j * 4) as *mut f32;
    let mut acc = [[0f32; BLOCK]; BLOCK];
    for (r, row) in acc.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = if load { at_c(r, j).read_unaligned() } else { 0.0 };
        }
    }
    for kb in 0..nk {
        let (ak, bk) = (a.add(kb * 2 * 16 * KB), b.add(kb * KB * b_row_bytes));
        for (r, row) in acc.iter_mut().enumerate() {
            // Rows 16..32 are the second A tile, KB pairs per row.
            let ar = ak.add((r / 16) * 16 * KB + (r % 16) * KB);
            for (j, v) in row.iter_mut().enumerate() {
                // Columns 16..32 are the second B tile, 64 bytes on.
                let bj = bk.add((j / 16) * 64 + (j % 16) * 4);
                for p in 0..KB {
                    let (x, y) = (ar.add(p).read_unaligned(), (bj.add(p * b_row_bytes) as *const u32).read_unaligned());
                    *v += half(x, false) * half(y, false) + half(x, true) * half(y, true);
                }
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            at_c(r, j).write_unaligned(v);
        }
    }
}
