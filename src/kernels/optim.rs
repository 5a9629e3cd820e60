//! Optimiser updates in one pass over each variable, split across the thread pool: AdamW's
//! step ([`adamw`]) and the exponential moving average of weights ([`ema`]).
//!
//! Written as candle ops, one AdamW step is a dozen element-wise passes, each allocating a new
//! tensor, and candle runs them on the calling thread; in a demo UNet training step (5 M
//! parameters) they kept one of two cores waiting. Every element here goes through the same
//! f32 operations in the same order as those ops (`x * s` is candle's `affine(s, 0)`: a product,
//! then `+ 0.0`, which turns -0 into +0; `x / s` is `affine(1 / s, 0)` with `1 / s` rounded
//! from f64), so the bits are those of the op sequences in [`crate::train::optim`] and the
//! pretraining loop, which stay as the path for other devices and types.
use rayon::prelude::*;

use super::io::uninit;
use super::simd::{dispatch, Vf, S1};

/// Elements per task: a few hundred KiB of operands, enough to outweigh a task's overhead.
const CHUNK: usize = 1 << 14;

/// AdamW's per-step constants, each rounded to f32 as candle rounds an op's scalar.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    /// β1 and 1 - β1.
    pub beta1: f32,
    pub one_minus_beta1: f32,
    /// β2 and 1 - β2.
    pub beta2: f32,
    pub one_minus_beta2: f32,
    /// 1 - lr λ: the decoupled weight decay.
    pub decay: f32,
    /// 1 / (1 - β1^t) and 1 / (1 - β2^t): the bias corrections as the multipliers of candle's
    /// division by a scalar.
    pub inv_correction1: f32,
    pub inv_correction2: f32,
    pub eps: f32,
    pub lr: f32,
}

impl AdamWStep {
    /// The constants of step `t` (counted from 1).
    pub fn new(lr: f64, beta1: f64, beta2: f64, eps: f64, weight_decay: f64, t: usize) -> Self {
        let bc1 = 1.0 - beta1.powi(t as i32);
        let bc2 = 1.0 - beta2.powi(t as i32);
        AdamWStep {
            beta1: beta1 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            decay: (1.0 - lr * weight_decay) as f32,
            inv_correction1: (1.0 / bc1) as f32,
            inv_correction2: (1.0 / bc2) as f32,
            eps: eps as f32,
            lr: lr as f32,
        }
    }
}

/// (θ, m, v) after the step with gradient `g`, lane by lane.
#[inline(always)]
fn adamw_v<V: Vf>(s: &AdamWStep, theta: V, g: V, m: V, v: V) -> (V, V, V) {
    let zero = V::splat(0.0);
    let m = m.mul(V::splat(s.beta1)).add(zero).add(g.mul(V::splat(s.one_minus_beta1)).add(zero));
    let v = v.mul(V::splat(s.beta2)).add(zero).add(g.mul(g).mul(V::splat(s.one_minus_beta2)).add(zero));
    let decayed = theta.mul(V::splat(s.decay)).add(zero);
    let denom = v.mul(V::splat(s.inv_correction2)).add(zero).sqrt().mul(V::splat(1.0)).add(V::splat(s.eps));
    let update = m.mul(V::splat(s.inv_correction1)).add(zero).div(denom);
    (decayed.sub(update.mul(V::splat(s.lr)).add(zero)), m, v)
}

/// One task's operands (`g` empty for a zero gradient) and results, all of one length.
struct Task<'a> {
    theta: &'a [f32],
    g: &'a [f32],
    m: &'a [f32],
    v: &'a [f32],
    theta1: &'a mut [f32],
    m1: &'a mut [f32],
    v1: &'a mut [f32],
}

impl Task<'_> {
    /// Elements `i..i + W::N`.
    ///
    /// # Safety
    /// `i + W::N` must not exceed the task's length.
    #[inline(always)]
    unsafe fn lanes<W: Vf>(&mut self, s: &AdamWStep, i: usize) {
        let g = if self.g.is_empty() { W::splat(0.0) } else { W::load(self.g.as_ptr().add(i)) };
        let (theta, m, v) = (W::load(self.theta.as_ptr().add(i)), W::load(self.m.as_ptr().add(i)), W::load(self.v.as_ptr().add(i)));
        let (theta, m, v) = adamw_v(s, theta, g, m, v);
        theta.store(self.theta1.as_mut_ptr().add(i));
        m.store(self.m1.as_mut_ptr().add(i));
        v.store(self.v1.as_mut_ptr().add(i));
    }
}

/// Whole vectors, then the tail one lane at a time.
#[inline(always)]
fn adamw_imp<V: Vf>(s: &AdamWStep, t: &mut Task<'_>) {
    let n = t.theta.len();
    let full = n / V::N * V::N;
    for i in (0..full).step_by(V::N) {
        // SAFETY: i + V::N <= full <= n.
        unsafe { t.lanes::<V>(s, i) };
    }
    for i in full..n {
        // SAFETY: i < n.
        unsafe { t.lanes::<S1>(s, i) };
    }
}
dispatch!(fn adamw_task(s: &AdamWStep, t: &mut Task<'_>) => adamw_imp);

/// One AdamW step of a variable of `theta.len()` elements: returns the new (θ, m, v). `g` is
/// its gradient, or None where no gradient reached it (a zero gradient, as in PyTorch).
///
/// # Panics
/// If `g`, `m` or `v` is not as long as `theta` (the caller checks the shapes).
pub fn adamw(s: &AdamWStep, theta: &[f32], g: Option<&[f32]>, m: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = theta.len();
    assert!(m.len() == n && v.len() == n && g.is_none_or(|g| g.len() == n), "adamw: operand lengths differ");
    let (mut t1, mut m1, mut v1) = (uninit(n), uninit(n), uninit(n));
    t1.par_chunks_mut(CHUNK).zip(m1.par_chunks_mut(CHUNK)).zip(v1.par_chunks_mut(CHUNK)).enumerate().for_each(|(c, ((t1, m1), v1))| {
        let r = c * CHUNK..c * CHUNK + t1.len();
        let g = g.map_or(&[][..], |g| &g[r.clone()]);
        adamw_task(s, &mut Task { theta: &theta[r.clone()], g, m: &m[r.clone()], v: &v[r], theta1: t1, m1, v1 });
    });
    (t1, m1, v1)
}

/// The moving average `avg · decay + x · (1 - decay)`, each product as candle's multiplication
/// by a scalar (both scalars rounded to f32 from f64).
///
/// # Panics
/// If `avg` and `x` differ in length.
pub fn ema(avg: &[f32], x: &[f32], decay: f64) -> Vec<f32> {
    assert_eq!(avg.len(), x.len(), "ema: operand lengths differ");
    let (d, c) = (decay as f32, (1.0 - decay) as f32);
    let mut out = uninit(avg.len());
    out.par_chunks_mut(CHUNK).zip(avg.par_chunks(CHUNK)).zip(x.par_chunks(CHUNK)).for_each(|((o, a), x)| {
        for ((o, &a), &x) in o.iter_mut().zip(a).zip(x) {
            *o = (a * d + 0.0) + (x * c + 0.0);
        }
    });
    out
}
