//! The whole Diff-II flow against the diffusers reference on the tiny fixture model, through
//! the library and through the `diffii parity` command, and proof that parity can fail.
mod common;

use std::process::Command;

use candle_core::Tensor;
use diffii::measure::parity::{self, Options};

#[test]
fn every_stage_matches_the_diffusers_reference() {
    let rep = parity::run(&common::tiny_sd(), &common::tiny_ref(), &Options::default(), |_| {}).unwrap();
    eprintln!("{}", rep.table());
    assert!(rep.all_ok(), "parity failed:\n{}", rep.table());
    // Beyond the pass/fail tolerances, pin what a correct f32 port reaches (fixtures README).
    let abs = |name: &str| rep.get(name).unwrap_or_else(|| panic!("no line {name}")).max_abs;
    for exact in ["input_ids_a", "input_ids_b", "input_ids_uncond", "inv_timesteps", "denoise_timesteps", "denoise_stage1_mask"] {
        assert_eq!(abs(exact), 0.0, "{exact}");
    }
    for single in ["text_emb_a", "text_emb_b", "vae_mean_a", "vae_logvar_a", "probe_unet_out", "probe_vae_decode_out", "inv_eps0_a", "den_eps0_cfg"] {
        assert!(abs(single) < 1e-4, "{single}: {}", abs(single));
    }
    assert!(abs("inv_traj_a (teacher-forced)") < 1e-5);
    assert!(abs("den_traj (teacher-forced)") < 1e-4);
    assert!(abs("final_latent") < 1e-1);
    assert!(abs("image_u8") <= 4.0);
    assert!(rep.lines.len() >= 40, "every tensor of the reference is compared");
}

#[test]
fn candle_ops_path_matches_the_reference_in_f64() {
    // In f64 no fused f32 kernel applies: every layer runs the candle ops a GPU runs.
    let opts = Options { skip_teacher_forced: true, dtype: candle_core::DType::F64, ..Options::default() };
    let rep = parity::run(&common::tiny_sd(), &common::tiny_ref(), &opts, |_| {}).unwrap();
    eprintln!("{}", rep.table());
    assert!(rep.all_ok(), "parity in f64 failed:\n{}", rep.table());
    let abs = |name: &str| rep.get(name).unwrap_or_else(|| panic!("no line {name}")).max_abs;
    for single in ["text_emb_a", "vae_mean_a", "probe_unet_out", "probe_vae_decode_out", "inv_eps0_a", "den_eps0_text"] {
        assert!(abs(single) < 1e-5, "{single}: {}", abs(single));
    }
    assert!(abs("image_u8") <= 4.0);
}

#[test]
fn parity_command_reports_a_corrupted_reference() {
    // Copy the reference and shift one tensor: that line must FAIL and the exit code be non-zero.
    let dir = std::env::temp_dir().join(format!("diffii-parity-corrupt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(common::tiny_ref().join("ref_diffii.json"), dir.join("ref_diffii.json")).unwrap();
    let mut t = common::ref_tensors();
    let shifted = (&t["vae_mean_a"] + 0.01).unwrap();
    t.insert("vae_mean_a".into(), shifted);
    let t: std::collections::HashMap<String, Tensor> = t;
    candle_core::safetensors::save(&t, dir.join("ref_diffii.safetensors")).unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_diffii"))
        .args(["parity", "--skip-teacher-forced", "--model"])
        .arg(common::tiny_sd())
        .arg("--reference")
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must fail:\n{stdout}");
    let line = stdout.lines().find(|l| l.starts_with("vae_mean_a")).expect("a vae_mean_a line");
    assert!(line.ends_with("FAIL"), "{line}");
    assert!(stdout.lines().filter(|l| l.ends_with("FAIL")).count() == 1, "only the shifted tensor fails:\n{stdout}");
    assert!(stderr.contains("outside tolerance"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn parity_command_names_a_missing_reference() {
    let out = Command::new(env!("CARGO_BIN_EXE_diffii"))
        .args(["parity", "--model"])
        .arg(common::tiny_sd())
        .args(["--reference", "/nonexistent/ref-dir"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/ref-dir/ref_diffii.json"), "{stderr}");
}
