//! Slerp / circle interpolation against the reference run and against slerp's invariants.
mod common;

use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, ref_tensors, tiny_ref};
use diffii::synth::interpolate::{circle, circle_alpha, cosine, slerp, SlerpInfo, DEFAULT_DOT_THRESHOLD};
use diffii::rng::seeded_randn;

fn norm(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f64>().unwrap()
}

fn ref_config() -> serde_json::Value {
    let text = std::fs::read_to_string(tiny_ref().join("ref_diffii.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["config"].clone()
}

/// Measured: cos differs from torch's float32 value by ~1e-8; slerp(0.5) max abs ~5e-7.
#[test]
fn slerp_matches_reference() {
    let r = ref_tensors();
    let (a, b) = (&r["inv_latent_a"], &r["inv_latent_b"]);
    let (z, info) = slerp(a, b, 0.5, DEFAULT_DOT_THRESHOLD).unwrap();
    let ref_cos = r["slerp_cos"].to_vec1::<f32>().unwrap()[0] as f64;
    let ref_theta = ref_config()["slerp_theta"].as_f64().unwrap();
    let err = max_abs_diff(&z, &r["interp_slerp"]);
    eprintln!(
        "slerp: cos {} vs ref {ref_cos} (diff {:e}), theta diff {:e}, interp max abs {err:e}",
        info.cos,
        (info.cos - ref_cos).abs(),
        (info.theta - ref_theta).abs()
    );
    assert!((info.cos - ref_cos).abs() < 1e-6);
    assert!((info.theta - ref_theta).abs() < 1e-6);
    assert!(!info.lerp);
    assert!(err <= 1e-5, "{err}");
    // The fixture's chosen latent is the slerp one.
    assert_eq!(max_abs_diff(&r["interp_latent"], &r["interp_slerp"]), 0.0);
}

/// Measured: max abs ~1e-6 against the reference circle point.
#[test]
fn circle_matches_reference() {
    let r = ref_tensors();
    let cfg = ref_config();
    let alpha = cfg["circle_alpha"].as_f64().unwrap();
    assert!((alpha - 1.4840467982636427).abs() < 1e-15);
    let (a, b) = (&r["inv_latent_a"], &r["inv_latent_b"]);
    let (z, info) = circle(a, b, alpha).unwrap();
    let err = max_abs_diff(&z, &r["interp_circle"]);
    eprintln!("circle: max abs {err:e}");
    assert!(err <= 1e-5, "{err}");
    // circle_alpha reproduces the reference's alpha from its theta and frac.
    let frac = cfg["circle_frac"].as_f64().unwrap();
    let theta = cfg["slerp_theta"].as_f64().unwrap();
    assert!((circle_alpha(theta, frac) - alpha).abs() < 1e-12);
    assert!((circle_alpha(info.theta, frac) - alpha).abs() < 1e-5);
    // Far from the short arc: the circle point is not between a and b.
    let (mid, _) = slerp(a, b, 0.5, DEFAULT_DOT_THRESHOLD).unwrap();
    assert!(max_abs_diff(&z, &mid) > 0.1);
}

#[test]
fn endpoints_are_exact_inputs() {
    let r = ref_tensors();
    let (a, b) = (&r["inv_latent_a"], &r["inv_latent_b"]);
    let (z0, _) = slerp(a, b, 0.0, DEFAULT_DOT_THRESHOLD).unwrap();
    let (z1, _) = slerp(a, b, 1.0, DEFAULT_DOT_THRESHOLD).unwrap();
    let (e0, e1) = (max_abs_diff(&z0, a), max_abs_diff(&z1, b));
    eprintln!("endpoints: t=0 {e0:e}, t=1 {e1:e}");
    assert!(e0 < 1e-6 && e1 < 1e-6, "{e0} {e1}");
    // A full turn of the circle (alpha * theta = 2 pi) comes back to a.
    let (_, info) = slerp(a, b, 0.5, DEFAULT_DOT_THRESHOLD).unwrap();
    let (zc, _) = circle(a, b, circle_alpha(info.theta, 1.0)).unwrap();
    assert!(max_abs_diff(&zc, a) < 1e-5);
}

#[test]
fn equal_norm_inputs_keep_their_norm() {
    let dev = Device::Cpu;
    let a = seeded_randn(11, &[1, 4, 16, 16], &dev).unwrap();
    let b0 = seeded_randn(12, &[1, 4, 16, 16], &dev).unwrap();
    let b = (&b0 * (norm(&a) / norm(&b0))).unwrap();
    let na = norm(&a);
    for t in [-1.7, -0.3, 0.1, 0.5, 0.9, 1.4, 3.0] {
        let (z, info) = slerp(&a, &b, t, DEFAULT_DOT_THRESHOLD).unwrap();
        assert!(!info.lerp);
        let rel = (norm(&z) - na).abs() / na;
        assert!(rel < 1e-5, "t={t}: relative norm change {rel}");
        // The angle to a is |t| * theta (mod the circle); check for t in [0, 1].
        if (0.0..=1.0).contains(&t) {
            let c = cosine(&a, &z).unwrap();
            assert!((c.acos() - t * info.theta).abs() < 1e-4, "t={t}");
        }
    }
    for frac in [0.0, 0.25, 0.6, 0.99] {
        let (_, info) = slerp(&a, &b, 0.5, DEFAULT_DOT_THRESHOLD).unwrap();
        let (z, _) = circle(&a, &b, circle_alpha(info.theta, frac)).unwrap();
        assert!((norm(&z) - na).abs() / na < 1e-5, "frac={frac}");
    }
    // Linear interpolation would shrink the midpoint: slerp must not.
    let lerp_mid = ((&a + &b).unwrap() * 0.5).unwrap();
    assert!(norm(&lerp_mid) < 0.8 * na);
}

#[test]
fn nearly_parallel_inputs_use_lerp() {
    let dev = Device::Cpu;
    let a = seeded_randn(13, &[2, 3, 5], &dev).unwrap();
    let tiny = (seeded_randn(14, &[2, 3, 5], &dev).unwrap() * 1e-3).unwrap();
    let b = (&a + &tiny).unwrap();
    let (z, info) = slerp(&a, &b, 0.25, DEFAULT_DOT_THRESHOLD).unwrap();
    assert!(info.lerp, "{info:?}");
    assert!(info.cos > DEFAULT_DOT_THRESHOLD);
    let want = ((&a * 0.75).unwrap() + (&b * 0.25).unwrap()).unwrap();
    assert!(max_abs_diff(&z, &want) < 1e-6);
    // Identical inputs: cos = 1, result = a for any t.
    let (z, info) = slerp(&a, &a, 0.7, DEFAULT_DOT_THRESHOLD).unwrap();
    assert!(info.lerp && (info.cos - 1.0).abs() < 1e-12 && info.theta.abs() < 1e-5);
    assert!(max_abs_diff(&z, &a) < 1e-6);
    // A threshold above 1 forces real slerp even here, and it agrees closely with lerp's direction.
    let (_, info) = slerp(&a, &b, 0.25, 1.1).unwrap();
    assert!(!info.lerp);
}

#[test]
fn bad_inputs_are_errors() {
    let dev = Device::Cpu;
    let a = seeded_randn(15, &[1, 4, 8, 8], &dev).unwrap();
    let b = seeded_randn(16, &[1, 4, 8, 9], &dev).unwrap();
    let err = slerp(&a, &b, 0.5, DEFAULT_DOT_THRESHOLD).unwrap_err().to_string();
    assert!(err.contains("shape"), "{err}");
    let flat = seeded_randn(16, &[256], &dev).unwrap();
    assert!(slerp(&a, &flat, 0.5, DEFAULT_DOT_THRESHOLD).is_err(), "same numel, different shape");
    let zero = a.zeros_like().unwrap();
    let err = slerp(&a, &zero, 0.5, DEFAULT_DOT_THRESHOLD).unwrap_err().to_string();
    assert!(err.contains("zero"), "{err}");
    assert!(slerp(&zero, &a, 0.5, DEFAULT_DOT_THRESHOLD).is_err());
    assert!(circle(&a, &zero, 1.0).is_err());
    let nan = (a.zeros_like().unwrap() + f64::NAN).unwrap();
    assert!(slerp(&a, &nan, 0.5, DEFAULT_DOT_THRESHOLD).is_err());
}

#[test]
fn slerp_info_is_plain_data() {
    let info = SlerpInfo { cos: 0.5, theta: std::f64::consts::FRAC_PI_3, lerp: false };
    assert_eq!(info, info.clone());
}
