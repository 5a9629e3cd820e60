//! The f32 multiply-add throughput of this CPU, measured: the reference for `bench`'s %peak
//! column.
//!
//! A peak computed from a datasheet formula (cores x FMA units x lanes x clock) is wrong as
//! often as it is right: AMD's Zen 4 runs a 512-bit FMA through two 256-bit units, so its
//! per-cycle rate is half an Intel core's with two 512-bit units, and a cloud VM's clock is
//! rarely the one its name says. So the peak is timed: every thread of the current pool runs
//! independent chains of the widest vector FMA the CPU has, all at once, for a short while.
use std::time::{Duration, Instant};

/// Independent accumulator chains: enough to cover an FMA's latency (4-5 cycles) times the
/// number of FMA pipes on any current x86 core.
const CHAINS: usize = 12;
/// Loop iterations per timed round (a few ms on a current core).
const ROUND: usize = 1 << 18;

/// The f32 multiply-add throughput of this CPU on the current rayon pool, in GFLOP/s (an FMA
/// counts as two flops): each thread's best round over about `budget`, summed over threads.
/// The widest of AVX-512, AVX2 + FMA and plain (separate multiply and add) arithmetic that
/// the CPU supports.
pub fn fma_peak_gflops(budget: Duration) -> f64 {
    rayon::broadcast(|_| best_round(budget)).into_iter().sum()
}

/// The best round's rate on this thread, GFLOP/s.
fn best_round(budget: Duration) -> f64 {
    let start = Instant::now();
    let mut best = 0f64;
    let mut sink = 0f32;
    while start.elapsed() < budget || best == 0.0 {
        let t0 = Instant::now();
        let (value, flops) = round();
        let rate = flops as f64 / t0.elapsed().as_secs_f64().max(1e-9) / 1e9;
        sink += value;
        best = best.max(rate);
    }
    // Keeps the chains' results alive so the loop cannot be optimised away.
    std::hint::black_box(sink);
    best
}

/// One round with the widest arithmetic available: (a value of the chains, flops done).
fn round() -> (f32, usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected at run time.
            return (unsafe { x86::chains_512(ROUND) }, ROUND * CHAINS * 16 * 2);
        }
        if super::simd::has_avx2() {
            // SAFETY: the features were detected at run time.
            return (unsafe { x86::chains_256(ROUND) }, ROUND * CHAINS * 8 * 2);
        }
    }
    (plain_chains(ROUND / 8), ROUND / 8 * CHAINS * 2)
}

fn plain_chains(iters: usize) -> f32 {
    let mut a = [1f32; CHAINS];
    let (m, c) = std::hint::black_box((0.999_999f32, 1e-7f32));
    for _ in 0..iters {
        for v in a.iter_mut() {
            *v = *v * m + c;
        }
    }
    a.iter().sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::CHAINS;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn chains_512(iters: usize) -> f32 {
        let mut a = [_mm512_set1_ps(1.0); CHAINS];
        let (m, c) = std::hint::black_box((_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7)));
        for _ in 0..iters {
            for v in a.iter_mut() {
                *v = _mm512_fmadd_ps(*v, m, c);
            }
        }
        let mut s = _mm512_setzero_ps();
        for v in a {
            s = _mm512_add_ps(s, v);
        }
        _mm512_reduce_add_ps(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn chains_256(iters: usize) -> f32 {
        let mut a = [_mm256_set1_ps(1.0); CHAINS];
        let (m, c) = std::hint::black_box((_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7)));
        for _ in 0..iters {
            for v in a.iter_mut() {
                *v = _mm256_fmadd_ps(*v, m, c);
            }
        }
        let mut s = _mm256_setzero_ps();
        for v in a {
            s = _mm256_add_ps(s, v);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), s);
        lanes.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chains_compute_what_they_claim() {
        // x -> x·m + c from 1, 3 times, in every chain: the vector paths agree with the plain one
        // (to rounding: FMA rounds once), so the timed work is the stated work.
        let m = 0.999_999f32;
        let mut x = 1f32;
        for _ in 0..3 {
            x = x * m + 1e-7;
        }
        let plain = plain_chains(3);
        assert!((plain - CHAINS as f32 * x).abs() < 1e-5, "{plain}");
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                let v = unsafe { x86::chains_512(3) };
                assert!((v - 16.0 * plain).abs() < 1e-3, "{v}");
            }
            if crate::kernels::simd::has_avx2() {
                let v = unsafe { x86::chains_256(3) };
                assert!((v - 8.0 * plain).abs() < 1e-3, "{v}");
            }
        }
    }

    #[test]
    fn the_peak_is_positive_and_finite() {
        let p = fma_peak_gflops(Duration::from_millis(5));
        assert!(p.is_finite() && p > 0.0, "{p}");
    }
}
