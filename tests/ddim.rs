//! DDIM schedule, grids and steps against the diffusers reference run (tiny-sd-ref) and against
//! diffusers' formulas worked by hand.
mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{max_abs_diff, ref_tensors, tiny_sd};
use diffii::rng::seeded_randn;
use diffii::schedule::ddim::{
    add_noise, ddim_inverse_step, ddim_step, ddim_step_eta, ddim_variance, denoise_timesteps, inverse_timesteps,
    step_ratio, torch_linspace_f32, Ddim, DdimConfig, TimestepSpacing,
};

fn fixture_ddim() -> Ddim {
    Ddim::from_file(tiny_sd().join("scheduler/scheduler_config.json")).expect("fixture scheduler config")
}

fn i64s(t: &Tensor) -> Vec<usize> {
    t.to_vec1::<i64>().unwrap().into_iter().map(|v| v as usize).collect()
}

#[test]
fn fixture_config_is_sd15() {
    let cfg = DdimConfig::from_file(tiny_sd().join("scheduler/scheduler_config.json")).unwrap();
    assert_eq!(cfg, DdimConfig::sd15());
}

/// Measured: max abs error 0 (bit-identical) over all 1000 values.
#[test]
fn alphas_cumprod_match_torch_bit_for_bit() {
    let r = ref_tensors();
    let reference = r["alphas_cumprod"].to_vec1::<f32>().unwrap();
    let ddim = fixture_ddim();
    let ours = ddim.alphas_cumprod();
    assert_eq!(ours.len(), 1000);
    let max_err = ours.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let differing = ours.iter().zip(&reference).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    eprintln!("alphas_cumprod: max abs error {max_err:e}, {differing} values differ in bits");
    assert_eq!(differing, 0, "max abs error {max_err:e}");
    // set_alpha_to_one = false: the boundary alpha is ac[0] = 1 - 0.00085, not 1.
    assert_eq!(ddim.final_alpha_cumprod(), reference[0]);
    assert_eq!(ddim.initial_alpha_cumprod(), reference[0]);
    assert!((reference[0] - 0.99915).abs() < 1e-7);
    let t = ddim.alphas_cumprod_tensor(&Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(&t, &r["alphas_cumprod"]), 0.0);
}

#[test]
fn torch_linspace_anchors_both_ends() {
    let v = torch_linspace_f32(0.00085f64.sqrt(), 0.012f64.sqrt(), 1000);
    assert_eq!(v[0], 0.00085f64.sqrt() as f32);
    assert_eq!(v[999], 0.012f64.sqrt() as f32);
    assert_eq!(torch_linspace_f32(0.5, 2.0, 1), vec![0.5]);
    assert_eq!(torch_linspace_f32(0.0, 1.0, 5), vec![0.0, 0.25, 0.5, 0.75, 1.0]);
}

#[test]
fn other_beta_schedules_are_sane() {
    let lin = Ddim::new(DdimConfig::default()).unwrap(); // linear 1e-4..0.02, set_alpha_to_one
    let ac = lin.alphas_cumprod();
    assert!((ac[0] - (1.0 - 1e-4)).abs() < 1e-7);
    assert!(ac.windows(2).all(|w| w[1] < w[0]));
    assert_eq!(lin.final_alpha_cumprod(), 1.0);
    let cos = Ddim::new(DdimConfig { beta_schedule: "squaredcos_cap_v2".into(), ..DdimConfig::default() }).unwrap();
    assert!(cos.alphas_cumprod().windows(2).all(|w| w[1] <= w[0]));
    let trained = DdimConfig { num_train_timesteps: 3, trained_betas: Some(vec![0.1, 0.2, 0.5]), ..Default::default() };
    let ac = Ddim::new(trained).unwrap().alphas_cumprod().to_vec();
    assert!((ac[2] - 0.9 * 0.8 * 0.5).abs() < 1e-7, "{ac:?}");
}

#[test]
fn fixture_grids_n50() {
    let r = ref_tensors();
    let ddim = fixture_ddim();
    let den = ddim.set_timesteps(50).unwrap();
    let inv = ddim.set_inverse_timesteps(50).unwrap();
    assert_eq!(den.timesteps, i64s(&r["denoise_timesteps"]));
    assert_eq!(inv.timesteps, i64s(&r["inv_timesteps"]));
    assert_eq!(den.step_ratio, 20);
    assert_eq!(inv.step_ratio, 20);
    assert_eq!(den.timesteps[0], 981);
    assert_eq!(*den.timesteps.last().unwrap(), 1);
}

#[test]
fn leading_grids_by_hand() {
    // diffusers: r = 1000 // n; (arange(n) * r)[::-1] + steps_offset.
    let d = denoise_timesteps(1000, 25, TimestepSpacing::Leading, 1).unwrap();
    let expect: Vec<usize> = (0..25).rev().map(|i| i * 40 + 1).collect();
    assert_eq!(d, expect);
    assert_eq!(d[0], 961);
    assert_eq!(d[1], 921);
    assert_eq!(*d.last().unwrap(), 1);
    // 1000 // 3 = 333: [667, 334, 1].
    assert_eq!(denoise_timesteps(1000, 3, TimestepSpacing::Leading, 1).unwrap(), vec![667, 334, 1]);
    assert_eq!(inverse_timesteps(1000, 3, TimestepSpacing::Leading, 1).unwrap(), vec![1, 334, 667]);
    assert_eq!(denoise_timesteps(1000, 1, TimestepSpacing::Leading, 1).unwrap(), vec![1]);
    assert_eq!(inverse_timesteps(1000, 200, TimestepSpacing::Leading, 1).unwrap()[..3], [1, 6, 11]);
    let all = denoise_timesteps(1000, 1000, TimestepSpacing::Leading, 0).unwrap();
    assert_eq!(all, (0..1000).rev().collect::<Vec<_>>());
    // With steps_offset 1 the top timestep would be 1000: not a training timestep.
    assert!(denoise_timesteps(1000, 1000, TimestepSpacing::Leading, 1).is_err());
    assert!(inverse_timesteps(1000, 1000, TimestepSpacing::Leading, 1).is_err());
}

#[test]
fn trailing_grids_by_hand() {
    // diffusers: round(arange(1000, 0, -1000 / n)) - 1 (numpy rounds half to even).
    let d50 = denoise_timesteps(1000, 50, TimestepSpacing::Trailing, 1).unwrap();
    assert_eq!(d50, (0..50).map(|i| 999 - 20 * i).collect::<Vec<_>>());
    // 1000/3 = 333.33: 1000, 666.67, 333.33 -> 999, 666, 332.
    assert_eq!(denoise_timesteps(1000, 3, TimestepSpacing::Trailing, 1).unwrap(), vec![999, 666, 332]);
    // The grid diffusers prints for n = 13 (diffusers issue #9261).
    let d13 = vec![999, 922, 845, 768, 691, 614, 537, 461, 384, 307, 230, 153, 76];
    assert_eq!(denoise_timesteps(1000, 13, TimestepSpacing::Trailing, 1).unwrap(), d13);
    let mut i13 = d13.clone();
    i13.reverse();
    assert_eq!(inverse_timesteps(1000, 13, TimestepSpacing::Trailing, 1).unwrap(), i13);
    // n = 400: step 2.5, 997.5 -> 998 and 992.5 -> 992 (half to even), minus 1.
    let d400 = denoise_timesteps(1000, 400, TimestepSpacing::Trailing, 0).unwrap();
    assert_eq!(d400[..5], [999, 997, 994, 991, 989]);
    assert_eq!(*d400.last().unwrap(), 1); // 1000 - 399 * 2.5 = 2.5 -> 2 -> 1
    assert_eq!(denoise_timesteps(1000, 1, TimestepSpacing::Trailing, 0).unwrap(), vec![999]);
    // n = 61: numpy's arange yields 62 values here (the last rounds to -1); we keep the 61 real ones.
    let d61 = denoise_timesteps(1000, 61, TimestepSpacing::Trailing, 0).unwrap();
    assert_eq!(d61.len(), 61);
    assert_eq!(d61[..4], [999, 983, 966, 950]);
    assert_eq!(d61[59..], [32, 15]);
}

#[test]
fn linspace_grids_by_hand() {
    // diffusers: round(np.linspace(0, 999, n))[::-1]; numpy rounds half to even.
    assert_eq!(
        denoise_timesteps(1000, 10, TimestepSpacing::Linspace, 1).unwrap(),
        vec![999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    );
    assert_eq!(denoise_timesteps(1000, 3, TimestepSpacing::Linspace, 1).unwrap(), vec![999, 500, 0]);
    // step 166.5: 166.5 -> 166, 499.5 -> 500, 832.5 -> 832.
    assert_eq!(
        denoise_timesteps(1000, 7, TimestepSpacing::Linspace, 0).unwrap(),
        vec![999, 832, 666, 500, 333, 166, 0]
    );
    assert_eq!(denoise_timesteps(1000, 1, TimestepSpacing::Linspace, 0).unwrap(), vec![0]);
    // DDIMInverseScheduler has no linspace spacing.
    assert!(inverse_timesteps(1000, 10, TimestepSpacing::Linspace, 0).is_err());
}

#[test]
fn bad_step_counts_are_errors() {
    let ddim = fixture_ddim();
    assert!(ddim.set_timesteps(0).is_err());
    assert!(ddim.set_inverse_timesteps(0).is_err());
    assert!(ddim.set_timesteps(1001).is_err());
    assert!(step_ratio(1000, 0).is_err());
    for s in [TimestepSpacing::Leading, TimestepSpacing::Trailing, TimestepSpacing::Linspace] {
        assert!(denoise_timesteps(1000, 0, s, 0).is_err());
        assert!(denoise_timesteps(1000, 1001, s, 0).is_err());
    }
}

/// Measured: the first inversion step is bit-identical (max abs 0); the first denoising step
/// differs by 2.4e-7 (1-2 ulp on about half the elements). That residue is torch's, not a
/// convention: the fixture is reproduced bit for bit if sqrt(1 - a_981) is taken one ulp above
/// the correctly rounded f32 value we compute (torch's CPU sqrt goes through MKL VML, which need
/// not round correctly); all other scalars and the operation order match exactly.
#[test]
fn teacher_forced_steps_match_fixture() {
    let r = ref_tensors();
    let ddim = fixture_ddim();
    let inv = ddim.set_inverse_timesteps(50).unwrap();
    let traj = &r["inv_traj_a"];
    let x = traj.i(0..1).unwrap();
    let want = traj.i(1..2).unwrap();
    let got = ddim.inverse_step(&r["inv_eps0_a"], 1, &x, &inv).unwrap();
    let e_inv = max_abs_diff(&got, &want);
    // The same through the pure function: from the initial alpha (ac[0]) to ac[1].
    let ac = ddim.alphas_cumprod();
    let got2 = ddim_inverse_step(&r["inv_eps0_a"], &x, ac[0], ac[1]).unwrap();
    assert_eq!(max_abs_diff(&got, &got2), 0.0);

    let den = ddim.set_timesteps(50).unwrap();
    let dtraj = &r["den_traj"];
    let got = ddim.step(&r["den_eps0_cfg"], 981, &dtraj.i(0..1).unwrap(), &den).unwrap();
    let e_den = max_abs_diff(&got, &dtraj.i(1..2).unwrap());
    let got2 = ddim_step(&r["den_eps0_cfg"], &dtraj.i(0..1).unwrap(), ac[981], ac[961]).unwrap();
    assert_eq!(max_abs_diff(&got, &got2), 0.0);
    eprintln!("teacher-forced: inverse step max abs {e_inv:e}, denoise step max abs {e_den:e}");
    assert!(e_inv <= 1e-6, "inverse step error {e_inv}");
    assert!(e_den <= 1e-6, "denoise step error {e_den}");
    // Wrong conventions must be visible: alpha 1.0 instead of ac[0] at the first inversion step.
    let wrong = ddim_inverse_step(&r["inv_eps0_a"], &x, 1.0, ac[1]).unwrap();
    assert!(max_abs_diff(&wrong, &want) > 1e-4);
}

/// Mock epsilon model whose output does not depend on x.
fn mock_eps(base: &Tensor, t: usize) -> Tensor {
    (base * (t as f64).sin()).unwrap()
}

/// Measured max abs error: leading n=50 5.4e-6, n=10 1.2e-6; trailing n=50 9.9e-6, n=10 1.5e-6
/// (float32 rounding amplified by 1/sqrt(a_t) at the noisiest steps; trailing reaches t = 999).
#[test]
fn inversion_then_denoising_round_trips_with_x_independent_eps() {
    let dev = Device::Cpu;
    let z0 = (seeded_randn(1, &[1, 4, 8, 8], &dev).unwrap() * 0.8).unwrap();
    let base = seeded_randn(2, &[1, 4, 8, 8], &dev).unwrap();
    for (spacing, n) in [("leading", 50), ("leading", 10), ("trailing", 50), ("trailing", 10)] {
        let ddim = Ddim::new(DdimConfig { timestep_spacing: spacing.into(), ..DdimConfig::sd15() }).unwrap();
        let inv = ddim.set_inverse_timesteps(n).unwrap();
        let den = ddim.set_timesteps(n).unwrap();
        let mut x = z0.clone();
        // Inverse step k evaluates eps at its target t_k ...
        for &t in &inv.timesteps {
            x = ddim.inverse_step(&mock_eps(&base, t), t, &x, &inv).unwrap();
        }
        assert!(max_abs_diff(&x, &z0) > 0.1, "inversion must move the latent");
        // ... and the denoising step at t_k uses eps(t_k) too, so each undoes the other exactly
        // (in exact arithmetic; float32 leaves rounding error only).
        for &t in &den.timesteps {
            x = ddim.step(&mock_eps(&base, t), t, &x, &den).unwrap();
        }
        let err = max_abs_diff(&x, &z0);
        eprintln!("round trip {spacing} n={n}: max abs error {err:e}");
        assert!(err < 2e-5, "{spacing} n={n}: {err}");
    }
}

#[test]
fn eta_step_matches_formula() {
    let dev = Device::Cpu;
    let ddim = fixture_ddim();
    let grid = ddim.set_timesteps(50).unwrap();
    let x = seeded_randn(3, &[2, 4, 4, 4], &dev).unwrap();
    let eps = seeded_randn(4, &[2, 4, 4, 4], &dev).unwrap();
    let noise = seeded_randn(5, &[2, 4, 4, 4], &dev).unwrap();
    let zeros = x.zeros_like().unwrap();
    let (t, eta) = (501usize, 0.7f32);
    let ac = ddim.alphas_cumprod();
    let (a_t, a_p) = (ac[t] as f64, ac[t - 20] as f64);
    let var = (1.0 - a_p) / (1.0 - a_t) * (1.0 - a_t / a_p);
    assert!((ddim_variance(ac[t], ac[t - 20]) as f64 - var).abs() < 1e-7);
    let std = eta as f64 * var.sqrt();
    let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let ev = eps.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let nv = noise.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let expect = |with_noise: bool| -> Tensor {
        let v: Vec<f32> = (0..xv.len())
            .map(|i| {
                let (x, e) = (xv[i] as f64, ev[i] as f64);
                let x0 = (x - (1.0 - a_t).sqrt() * e) / a_t.sqrt();
                let mut p = a_p.sqrt() * x0 + (1.0 - a_p - std * std).sqrt() * e;
                if with_noise {
                    p += std * nv[i] as f64;
                }
                p as f32
            })
            .collect();
        Tensor::from_vec(v, x.dims(), &dev).unwrap()
    };
    let got0 = ddim.step_with_noise(&eps, t, &x, &grid, eta, &zeros).unwrap();
    let e0 = max_abs_diff(&got0, &expect(false));
    let got1 = ddim.step_with_noise(&eps, t, &x, &grid, eta, &noise).unwrap();
    let e1 = max_abs_diff(&got1, &expect(true));
    let pure = ddim_step_eta(&eps, &x, ac[t], ac[t - 20], eta, &noise).unwrap();
    assert_eq!(max_abs_diff(&pure, &got1), 0.0);
    eprintln!("eta step vs f64 formula: zero noise {e0:e}, with noise {e1:e}");
    assert!(e0 < 1e-5 && e1 < 1e-5, "{e0} {e1}");
    // The noise must matter, and eta = 0 is the deterministic step.
    assert!(max_abs_diff(&got0, &got1) > 1e-2);
    let det = ddim.step_with_noise(&eps, t, &x, &grid, 0.0, &noise).unwrap();
    assert_eq!(max_abs_diff(&det, &ddim.step(&eps, t, &x, &grid).unwrap()), 0.0);
}

#[test]
fn add_noise_and_dtypes() {
    let dev = Device::Cpu;
    let ddim = fixture_ddim();
    let x0 = seeded_randn(6, &[1, 4, 4, 4], &dev).unwrap();
    let n = seeded_randn(7, &[1, 4, 4, 4], &dev).unwrap();
    let a = ddim.alphas_cumprod()[700] as f64;
    let want = ((&x0 * a.sqrt()).unwrap() + (&n * (1.0 - a).sqrt()).unwrap()).unwrap();
    let got = ddim.add_noise(&x0, &n, 700).unwrap();
    assert!(max_abs_diff(&got, &want) < 1e-6);
    assert!(max_abs_diff(&add_noise(&x0, &n, a as f32).unwrap(), &got) == 0.0);
    assert!(ddim.add_noise(&x0, &n, 1000).is_err());
    // f16 eps with an f32 latent: the result stays f32.
    let grid = ddim.set_timesteps(50).unwrap();
    let out = ddim.step(&n.to_dtype(DType::F16).unwrap(), 981, &x0, &grid).unwrap();
    assert_eq!(out.dtype(), DType::F32);
    // Shape mismatch is an error, not a silent broadcast.
    let small = seeded_randn(8, &[4, 4, 4], &dev).unwrap();
    assert!(ddim_step(&small, &x0, 0.5, 0.6).is_err());
}

#[test]
fn seeded_randn_is_deterministic_standard_normal() {
    let dev = Device::Cpu;
    let a = seeded_randn(42, &[4, 64, 64], &dev).unwrap();
    let b = seeded_randn(42, &[4, 64, 64], &dev).unwrap();
    let c = seeded_randn(43, &[4, 64, 64], &dev).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    assert!(max_abs_diff(&a, &c) > 0.1);
    let v = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.05, "mean {mean} var {var}");
    // Same stream whatever the shape: the first values agree.
    let d = seeded_randn(42, &[10], &dev).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(&v[..10], d.as_slice());
}

fn write_config(dir: &std::path::Path, patch: &[(&str, serde_json::Value)]) -> std::path::PathBuf {
    let src = std::fs::read_to_string(tiny_sd().join("scheduler/scheduler_config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&src).unwrap();
    for (k, val) in patch {
        v[*k] = val.clone();
    }
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join("scheduler_config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    p
}

#[test]
fn bad_configs_are_errors_naming_file_and_key() {
    let base = std::env::temp_dir().join(format!("diffii-ddim-test-{}", std::process::id()));
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("prediction_type", "bogus".into(), "prediction_type"),
        ("timestep_spacing", "karras".into(), "timestep_spacing"),
        ("beta_schedule", "sigmoid".into(), "beta_schedule"),
        ("thresholding", true.into(), "thresholding"),
        ("rescale_betas_zero_snr", true.into(), "rescale_betas_zero_snr"),
    ];
    for (i, (key, val, needle)) in cases.into_iter().enumerate() {
        let p = write_config(&base.join(i.to_string()), &[(key, val)]);
        let err = DdimConfig::from_file(&p).unwrap_err().to_string();
        assert!(err.contains(&p.display().to_string()), "{err}");
        assert!(err.contains(needle), "{err}");
        let err = Ddim::from_file(&p).unwrap_err().to_string();
        assert!(err.contains(&p.display().to_string()) && err.contains(needle), "{err}");
    }
    // Not JSON at all.
    let p = base.join("broken.json");
    std::fs::write(&p, "{ not json").unwrap();
    assert!(DdimConfig::from_file(&p).unwrap_err().to_string().contains("broken.json"));
    // Supported alternatives load, unknown keys are ignored.
    let p = write_config(&base.join("ok"), &[("prediction_type", "v_prediction".into()), ("whatever", 3.into())]);
    assert!(Ddim::from_file(&p).is_ok());
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn other_prediction_types_are_consistent_with_epsilon() {
    // For the same underlying (x0, eps), v- and sample-prediction must give the epsilon result.
    let dev = Device::Cpu;
    let mk = |p: &str| Ddim::new(DdimConfig { prediction_type: p.into(), ..DdimConfig::sd15() }).unwrap();
    let (de, dv, ds) = (mk("epsilon"), mk("v_prediction"), mk("sample"));
    let grid = de.set_timesteps(50).unwrap();
    let x = seeded_randn(9, &[1, 4, 4, 4], &dev).unwrap();
    let eps = seeded_randn(10, &[1, 4, 4, 4], &dev).unwrap();
    let t = 481;
    let a = de.alphas_cumprod()[t] as f64;
    let x0 = ((&x - (&eps * (1.0 - a).sqrt()).unwrap()).unwrap() / a.sqrt()).unwrap();
    let v = ((&eps * a.sqrt()).unwrap() - (&x0 * (1.0 - a).sqrt()).unwrap()).unwrap();
    let want = de.step(&eps, t, &x, &grid).unwrap();
    assert!(max_abs_diff(&dv.step(&v, t, &x, &grid).unwrap(), &want) < 1e-5);
    assert!(max_abs_diff(&ds.step(&x0, t, &x, &grid).unwrap(), &want) < 1e-5);
    // clip_sample clamps the predicted x0.
    let dc = Ddim::new(DdimConfig { clip_sample: true, clip_sample_range: 0.1, ..DdimConfig::sd15() }).unwrap();
    assert!(max_abs_diff(&dc.step(&eps, t, &x, &grid).unwrap(), &want) > 1e-3);
}
