//! Spherical interpolation of inverted latents (Diff-II step 3).
//!
//! [`slerp`] is Shoemake's spherical linear interpolation (K. Shoemake, "Animating rotation with
//! quaternion curves", SIGGRAPH 1985) applied to the whole latent as one flattened vector:
//!
//! ```text
//! theta = arccos(<a, b> / (|a| |b|))
//! slerp(a, b, t) = sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b
//! ```
//!
//! It falls back to linear interpolation when `|cos theta|` exceeds a threshold (0.9995, as the
//! reference and most diffusion code do), where `sin(theta)` is too small to divide by. `t` may lie
//! outside [0, 1]: the formula then walks further along the same great circle (for unit vectors
//! of equal norm the result keeps the norm).
//!
//! Diff-II's official code interpolates with `rand_slerp`: it draws `alpha ~ U(0, 2 pi / theta)`
//! and returns `sin((1 + alpha) theta) / sin(theta) * a - sin(alpha theta) / sin(theta) * b`,
//! which is `slerp(a, b, -alpha)`: a uniformly random point on the WHOLE great circle through a
//! and b, not only the short arc between them. [`circle`] is that map for a given alpha and
//! [`circle_alpha`] turns a fraction `frac ~ U(0, 1)` into the official alpha, so the draw can be
//! made by a seeded caller and recorded.
//!
//! Dot products and norms are accumulated in f64 on the CPU (a latent is small) so the angle does
//! not depend on the device's reduction order; the blend itself runs in the inputs' dtype.
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// `|cos theta|` above which [`slerp`] falls back to linear interpolation.
pub const DEFAULT_DOT_THRESHOLD: f64 = 0.9995;

/// How a [`slerp`] was computed, for the manifest.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlerpInfo {
    /// `<a, b> / (|a| |b|)`.
    pub cos: f64,
    /// `arccos(cos)` (cos clamped to [-1, 1]), in radians.
    pub theta: f64,
    /// True when the linear fallback was used.
    pub lerp: bool,
}

fn to_f64_vec(x: &Tensor) -> Result<Vec<f64>> {
    // Moving to the CPU first keeps this working on devices without f64 support.
    Ok(x.flatten_all()?.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// The cosine of the angle between `a` and `b` (all elements, f64 accumulation).
pub fn cosine(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.dims() != b.dims() {
        return Err(Error::invalid(format!(
            "cannot interpolate latents of different shapes {:?} and {:?}",
            a.dims(),
            b.dims()
        )));
    }
    let (va, vb) = (to_f64_vec(a)?, to_f64_vec(b)?);
    let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in va.iter().zip(&vb) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    let (na, nb) = (na.sqrt(), nb.sqrt());
    for (norm, name) in [(na, "first"), (nb, "second")] {
        if !norm.is_finite() {
            return Err(Error::invalid(format!("the {name} latent has non-finite values")));
        }
        if norm == 0.0 {
            return Err(Error::invalid(format!("the {name} latent is all zeros: its direction is undefined")));
        }
    }
    Ok(dot / (na * nb))
}

/// `c_a * a + c_b * b` in `a`'s dtype.
fn blend(a: &Tensor, b: &Tensor, c_a: f64, c_b: f64) -> Result<Tensor> {
    let b = b.to_dtype(a.dtype())?;
    let s = |v: f64| -> Result<Tensor> { Ok(Tensor::new(v as f32, a.device())?.to_dtype(a.dtype())?) };
    Ok(a.broadcast_mul(&s(c_a)?)?.add(&b.broadcast_mul(&s(c_b)?)?)?)
}

/// Spherical linear interpolation (Shoemake 1985) of `a` towards `b` over all elements, with a
/// linear fallback when `|cos theta| > dot_threshold`. `t = 0` gives `a`, `t = 1` gives `b`; other
/// values of `t`, including negative ones, move along the same great circle. Errors when the
/// shapes differ or a latent is zero (or not finite).
pub fn slerp(a: &Tensor, b: &Tensor, t: f64, dot_threshold: f64) -> Result<(Tensor, SlerpInfo)> {
    let cos = cosine(a, b)?;
    let theta = cos.clamp(-1.0, 1.0).acos();
    if cos.abs() > dot_threshold {
        let out = blend(a, b, 1.0 - t, t)?;
        return Ok((out, SlerpInfo { cos, theta, lerp: true }));
    }
    let s = theta.sin();
    let out = blend(a, b, ((1.0 - t) * theta).sin() / s, (t * theta).sin() / s)?;
    Ok((out, SlerpInfo { cos, theta, lerp: false }))
}

/// Diff-II's official `rand_slerp` for a given `alpha`: `slerp(a, b, -alpha)` with the default
/// threshold, a point on the full great circle through `a` and `b` (the official code draws
/// `alpha ~ U(0, 2 pi / theta)`; see [`circle_alpha`]).
pub fn circle(a: &Tensor, b: &Tensor, alpha: f64) -> Result<(Tensor, SlerpInfo)> {
    slerp(a, b, -alpha, DEFAULT_DOT_THRESHOLD)
}

/// The official circle angle parameter for a fraction of a full turn:
/// `alpha = frac * 2 pi / theta` (the official draw is `frac ~ U(0, 1)`), so `alpha * theta`
/// sweeps `frac` of the circle.
pub fn circle_alpha(theta: f64, frac: f64) -> f64 {
    frac * 2.0 * std::f64::consts::PI / theta
}
