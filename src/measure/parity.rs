//! Tensor-by-tensor comparison of our implementation with a diffusers reference run.
//!
//! A reference directory (made by `scripts/reference/ref_diffii.py`) holds `ref_diffii.json` (every
//! setting: prompts, token ids, step counts, guidance, strength, interpolation) and
//! `ref_diffii.safetensors` (every intermediate tensor). [`run`] recomputes each stage with our
//! code from the same inputs and reports, per tensor, the max absolute error, the max error
//! relative to the reference's largest magnitude, and the tolerance.
//!
//! Trajectories are checked twice: *teacher-forced* (each step computed from the reference's
//! own input latent, isolating per-step error) and *free-running* (our whole chain, where f32
//! rounding compounds over ~100 UNet calls, so the tolerance is wider).
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use serde::Deserialize;

use crate::data::pixels::{tensor_to_u8, u8_to_tensor, Quantize};
use crate::schedule::sampling::ddim_invert;
use crate::synth::diffii::{sample_two_stage, stage1_steps_for_strength, TwoStage};
use crate::synth::guidance::guided_eps;
use crate::synth::interpolate::{circle, slerp};
use crate::error::{read_json, Error, Result};
use crate::schedule::ddim::Ddim;
use crate::sd::loader::{LoadOptions, StableDiffusion};

/// Single calls (text encoder, UNet, VAE, one scheduler step): f32 ports agree to ~1e-5 of the
/// tensor's scale; this leaves headroom for a different summation order.
pub const TOL_CALL: f64 = 1e-4;
/// Free-running inversion trajectories (50+ chained UNet calls).
pub const TOL_FREE_INVERSION: f64 = 1e-2;
/// Free-running end-to-end latent after inversion + guided sampling (~100 chained calls; CFG
/// 7.5 amplifies rounding differences).
pub const TOL_FREE_FINAL: f64 = 1e-1;
/// Output pixels from the free-running chain, in 8-bit levels.
pub const TOL_FREE_LEVELS: f64 = 4.0;

/// The subset of `ref_diffii.json`'s `config` that drives the recomputation.
#[derive(Deserialize, Debug, Clone)]
pub struct RefConfig {
    pub prompt_uncond: String,
    pub prompt_a_stage1: String,
    pub prompt_b_concept_inversion_stage2: String,
    #[serde(default)]
    pub concept_token_ids: HashMap<String, u32>,
    pub image_size: usize,
    pub latent_size: usize,
    pub inv_steps: usize,
    pub steps: usize,
    pub guidance: f64,
    pub strength: f64,
    pub stage1_steps: usize,
    pub interp: String,
    pub slerp_t: f64,
    #[serde(default = "default_dot")]
    pub slerp_dot_threshold: f64,
    pub circle_alpha: f64,
    #[serde(default = "default_probe_t")]
    pub probe_unet_t: usize,
    #[serde(default)]
    pub dtype: Option<String>,
}

fn default_dot() -> f64 {
    crate::synth::interpolate::DEFAULT_DOT_THRESHOLD
}
fn default_probe_t() -> usize {
    500
}

#[derive(Deserialize)]
struct RefJson {
    config: RefConfig,
}

/// One compared tensor.
#[derive(Debug, Clone)]
pub struct Line {
    pub name: String,
    pub max_abs: f64,
    pub max_rel: f64,
    pub tol: f64,
    pub ok: bool,
    pub note: String,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub lines: Vec<Line>,
}

impl Report {
    pub fn all_ok(&self) -> bool {
        !self.lines.is_empty() && self.lines.iter().all(|l| l.ok)
    }

    pub fn get(&self, name: &str) -> Option<&Line> {
        self.lines.iter().find(|l| l.name == name)
    }

    /// A fixed-width table, one line per tensor.
    pub fn table(&self) -> String {
        let mut s = format!("{:<34} {:>12} {:>12} {:>10}  {}\n", "tensor", "max_abs", "max_rel", "tol", "result");
        for l in &self.lines {
            s.push_str(&format!(
                "{:<34} {:>12.3e} {:>12.3e} {:>10.1e}  {}{}\n",
                l.name,
                l.max_abs,
                l.max_rel,
                l.tol,
                if l.ok { "ok" } else { "FAIL" },
                if l.note.is_empty() { String::new() } else { format!("  ({})", l.note) }
            ));
        }
        s
    }

    /// Compares two tensors of the same shape; the tolerance is `tol` times the reference's
    /// largest magnitude (at least 1), so large-valued tensors are judged relative to scale.
    fn compare(&mut self, name: &str, ours: &Tensor, reference: &Tensor, tol: f64) -> Result<()> {
        let (max_abs, ref_max) = diff_stats(name, ours, reference)?;
        let tol = tol * ref_max.max(1.0);
        self.push(name, max_abs, max_abs / ref_max.max(f64::MIN_POSITIVE), tol, "");
        Ok(())
    }

    /// Compares with an absolute tolerance (integers, pixel levels).
    fn compare_abs(&mut self, name: &str, ours: &Tensor, reference: &Tensor, tol: f64, note: &str) -> Result<()> {
        let (max_abs, ref_max) = diff_stats(name, ours, reference)?;
        self.push(name, max_abs, max_abs / ref_max.max(f64::MIN_POSITIVE), tol, note);
        Ok(())
    }

    fn push(&mut self, name: &str, max_abs: f64, max_rel: f64, tol: f64, note: &str) {
        let ok = max_abs.is_finite() && max_abs <= tol;
        self.lines.push(Line { name: name.into(), max_abs, max_rel, tol, ok, note: note.into() });
    }
}

fn f64s(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?)
}

/// (max |ours - ref|, max |ref|); a shape mismatch is an infinite error.
fn diff_stats(name: &str, ours: &Tensor, reference: &Tensor) -> Result<(f64, f64)> {
    if ours.elem_count() != reference.elem_count() {
        return Err(Error::invalid(format!("{name}: shape {:?} vs reference {:?}", ours.dims(), reference.dims())));
    }
    let (a, b) = (f64s(ours)?, f64s(reference)?);
    let max_abs = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, |m: f64, d| if d.is_nan() { f64::INFINITY } else { m.max(d) });
    let ref_max = b.iter().fold(0.0f64, |m, y| m.max(y.abs()));
    Ok((max_abs, ref_max))
}

/// Options for [`run`].
#[derive(Clone, Debug)]
pub struct Options {
    /// Skip the teacher-forced trajectories (half the UNet calls).
    pub skip_teacher_forced: bool,
    /// Product precision of the model's layers.
    pub precision: crate::nn::Precision,
    /// Where the model runs (the reference tensors are loaded there too; comparisons are made
    /// in f64 on the CPU).
    pub device: Device,
    /// The model's weight and activation type. F64 on the CPU sends every layer through
    /// candle's own ops instead of the fused f32 kernels: the code a GPU runs, checkable here.
    pub dtype: DType,
}

impl Default for Options {
    fn default() -> Self {
        Options { skip_teacher_forced: false, precision: Default::default(), device: Device::Cpu, dtype: DType::F32 }
    }
}

/// Recomputes every stage of the reference run at `reference` with the model at `model` and
/// compares. `progress` receives a short label before each stage.
pub fn run(model: &Path, reference: &Path, opts: &Options, mut progress: impl FnMut(&str)) -> Result<Report> {
    let cfg_path = reference.join("ref_diffii.json");
    let st_path = reference.join("ref_diffii.safetensors");
    let cfg = read_json::<RefJson>(&cfg_path)?.config;
    let dev = opts.device.clone();
    let r = candle_core::safetensors::load(&st_path, &dev)
        .map_err(|e| Error::bad_file(&st_path, format!("not a readable safetensors file: {e}")))?;
    // Float reference tensors in the model's type, as the model's inputs would be.
    let get = |k: &str| -> Result<Tensor> {
        let t = r.get(k).ok_or_else(|| Error::Tensor { path: st_path.clone(), key: k.into(), msg: "missing from the reference".into() })?;
        Ok(if t.dtype().is_float() { t.to_dtype(opts.dtype)? } else { t.clone() })
    };
    let mut rep = Report::default();

    progress("load model");
    let sd = StableDiffusion::load(model, &LoadOptions { precision: opts.precision, device: dev.clone(), dtype: opts.dtype, ..LoadOptions::default() })?;
    let sched = Ddim::new(sd.scheduler.clone())?;

    // ---- tokens and concept rows --------------------------------------------------------
    progress("text");
    // In id order, so the report lists them the same way every run.
    let mut concept_ids: Vec<(&String, &u32)> = cfg.concept_token_ids.iter().collect();
    concept_ids.sort_by_key(|(_, id)| **id);
    for (tok, id) in concept_ids {
        let ours = sd.tokenizer.token_id(tok);
        if ours != Some(*id) {
            return Err(Error::invalid(format!(
                "concept token {tok}: reference id {id}, ours {ours:?} (does {} hold the same concepts/?)",
                model.display()
            )));
        }
        let rows = sd.concept_rows()?.ok_or_else(|| Error::invalid("reference uses concept tokens but the model has no concepts/"))?;
        let vocab = sd.text_encoder.config.vocab_size as u32;
        rep.compare_abs(&format!("concept_row_{id}"), &rows.i((*id - vocab) as usize)?, &get(&format!("concept_row_{id}"))?, 0.0, "exact")?;
    }
    let mut emb = HashMap::new();
    for (key, prompt) in [("uncond", &cfg.prompt_uncond), ("a", &cfg.prompt_a_stage1), ("b", &cfg.prompt_b_concept_inversion_stage2)] {
        let ids = sd.tokenizer.encode(prompt)?;
        let n = ids.len();
        let ids_t = Tensor::from_vec(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), (1, n), &dev)?;
        rep.compare_abs(&format!("input_ids_{key}"), &ids_t, &get(&format!("input_ids_{key}"))?, 0.0, "exact")?;
        let e = sd.text_encoder.forward(&ids_t.to_dtype(DType::U32)?, sd.concept_rows()?.as_ref())?;
        rep.compare(&format!("text_emb_{key}"), &e, &get(&format!("text_emb_{key}"))?, TOL_CALL)?;
        emb.insert(key, e);
    }
    let (emb_u, emb_a, emb_b) = (&emb["uncond"], &emb["a"], &emb["b"]);

    // ---- scheduler --------------------------------------------------------------------
    let ac = Tensor::new(sched.alphas_cumprod(), &dev)?;
    rep.compare_abs("alphas_cumprod", &ac, &get("alphas_cumprod")?, 1e-7, "")?;
    let inv_grid = sched.set_inverse_timesteps(cfg.inv_steps)?;
    let den_grid = sched.set_timesteps(cfg.steps)?;
    let as_i64 = |v: &[usize]| Tensor::new(v.iter().map(|&t| t as i64).collect::<Vec<_>>().as_slice(), &dev);
    rep.compare_abs("inv_timesteps", &as_i64(&inv_grid.timesteps)?, &get("inv_timesteps")?, 0.0, "exact")?;
    rep.compare_abs("denoise_timesteps", &as_i64(&den_grid.timesteps)?, &get("denoise_timesteps")?, 0.0, "exact")?;
    let k_strength = stage1_steps_for_strength(&den_grid.timesteps, sched.num_train_timesteps(), cfg.strength);
    // The reference records the stage-1 count either from its strength or from an explicit
    // `--stage1-steps`; both select a prefix of the grid.
    let (k, note) = if k_strength == cfg.stage1_steps {
        (k_strength, "from strength")
    } else {
        (cfg.stage1_steps, "explicit stage-1 steps")
    };
    let mask: Vec<u8> = (0..cfg.steps).map(|i| (i < k) as u8).collect();
    rep.compare_abs("denoise_stage1_mask", &Tensor::new(mask.as_slice(), &dev)?, &get("denoise_stage1_mask")?, 0.0, note)?;

    // ---- VAE encode -------------------------------------------------------------------
    progress("vae encode");
    let s = cfg.image_size;
    let img = |k: &str| -> Result<Tensor> {
        let u8s: Vec<u8> = get(k)?.flatten_all()?.to_vec1()?;
        Ok(u8_to_tensor(&u8s, s, s, &dev)?.to_dtype(opts.dtype)?)
    };
    let (x_a, x_b) = (img("image_a_u8")?, img("image_b_u8")?);
    rep.compare("image_a", &x_a, &get("image_a")?, TOL_CALL)?;
    let sf = sd.vae.config.scaling_factor;
    let (mean_a, logvar_a) = sd.vae.encode(&x_a)?;
    let (mean_b, _) = sd.vae.encode(&x_b)?;
    rep.compare("vae_mean_a", &mean_a, &get("vae_mean_a")?, TOL_CALL)?;
    rep.compare("vae_logvar_a", &logvar_a, &get("vae_logvar_a")?, TOL_CALL)?;
    rep.compare("vae_mean_b", &mean_b, &get("vae_mean_b")?, TOL_CALL)?;
    let z0_a = (mean_a * sf)?;
    let z0_b = (mean_b * sf)?;
    rep.compare("z0_a", &z0_a, &get("z0_a")?, TOL_CALL)?;
    rep.compare("z0_b", &z0_b, &get("z0_b")?, TOL_CALL)?;

    // ---- probes -----------------------------------------------------------------------
    progress("probes");
    let probe_x = get("probe_unet_x")?;
    let ctx_ub = Tensor::cat(&[emb_u, emb_b], 0)?;
    let probe = sd.unet.forward_t(&probe_x, cfg.probe_unet_t, &ctx_ub)?;
    rep.compare("probe_unet_out", &probe, &get("probe_unet_out")?, TOL_CALL)?;
    let probe_dec = sd.vae.decode(&probe_x.i(0..1)?)?;
    rep.compare("probe_vae_decode_out", &probe_dec, &get("probe_vae_decode_out")?, TOL_CALL)?;

    // ---- inversion --------------------------------------------------------------------
    let eps0 = sd.unet.forward_t(&get("z0_a")?, inv_grid.timesteps[0], emb_b)?;
    rep.compare("inv_eps0_a", &eps0, &get("inv_eps0_a")?, TOL_CALL)?;
    for (which, z0) in [("a", &z0_a), ("b", &z0_b)] {
        let traj_ref = get(&format!("inv_traj_{which}"))?;
        if !opts.skip_teacher_forced {
            progress(&format!("inversion {which} (teacher-forced)"));
            let mut worst = (0.0f64, 0.0f64);
            for (i, &t) in inv_grid.timesteps.iter().enumerate() {
                let x = traj_ref.i(i..i + 1)?;
                let eps = sd.unet.forward_t(&x, t, emb_b)?;
                let next = sched.inverse_step(&eps, t, &x, &inv_grid)?;
                let (d, m) = diff_stats("inv step", &next, &traj_ref.i(i + 1..i + 2)?)?;
                worst = (worst.0.max(d), worst.1.max(m));
            }
            rep.push(&format!("inv_traj_{which} (teacher-forced)"), worst.0, worst.0 / worst.1, TOL_CALL * worst.1.max(1.0), "worst step");
        }
        progress(&format!("inversion {which} (free-running)"));
        let mut lat = vec![z0.clone()];
        let z_t = ddim_invert(&sched, z0, cfg.inv_steps, |x, _, t| sd.unet.forward_t(x, t, emb_b), |v| lat.push(v.latent.clone()))?;
        rep.compare(&format!("inv_traj_{which}"), &Tensor::cat(&lat, 0)?, &traj_ref, TOL_FREE_INVERSION)?;
        rep.compare(&format!("inv_latent_{which}"), &z_t, &get(&format!("inv_latent_{which}"))?, TOL_FREE_INVERSION)?;
    }

    // ---- interpolation (from the reference's inverted latents) ----------------------------
    progress("interpolation");
    let (ia, ib) = (get("inv_latent_a")?, get("inv_latent_b")?);
    let (z_slerp, info) = slerp(&ia, &ib, cfg.slerp_t, cfg.slerp_dot_threshold)?;
    rep.compare("slerp_cos", &Tensor::new(&[info.cos as f32], &dev)?, &get("slerp_cos")?, TOL_CALL)?;
    rep.compare("interp_slerp", &z_slerp, &get("interp_slerp")?, TOL_CALL)?;
    let (z_circle, _) = circle(&ia, &ib, cfg.circle_alpha)?;
    rep.compare("interp_circle", &z_circle, &get("interp_circle")?, TOL_CALL)?;
    let z = match cfg.interp.as_str() {
        "slerp" => z_slerp,
        "circle" => z_circle,
        other => return Err(Error::bad_file(&cfg_path, format!("unknown interp `{other}`"))),
    };
    rep.compare("interp_latent", &z, &get("interp_latent")?, TOL_CALL)?;

    // ---- two-stage guided sampling ----------------------------------------------------
    progress("denoise eps0");
    let z_ref = get("interp_latent")?;
    let t0 = den_grid.timesteps[0];
    let first_cond = if k > 0 { emb_a } else { emb_b };
    let out = sd.unet.forward_t(&Tensor::cat(&[&z_ref, &z_ref], 0)?, t0, &Tensor::cat(&[emb_u, first_cond], 0)?)?;
    rep.compare("den_eps0_uncond", &out.i(0..1)?, &get("den_eps0_uncond")?, TOL_CALL)?;
    rep.compare("den_eps0_text", &out.i(1..2)?, &get("den_eps0_text")?, TOL_CALL)?;
    let cfg_eps = guided_eps(&sd.unet, &z_ref, t0, emb_u, first_cond, cfg.guidance)?;
    rep.compare("den_eps0_cfg", &cfg_eps, &get("den_eps0_cfg")?, TOL_CALL)?;
    let den_ref = get("den_traj")?;
    if !opts.skip_teacher_forced {
        progress("denoise (teacher-forced)");
        let mut worst = (0.0f64, 0.0f64);
        for (i, &t) in den_grid.timesteps.iter().enumerate() {
            let x = den_ref.i(i..i + 1)?;
            let c = if i < k { emb_a } else { emb_b };
            let eps = guided_eps(&sd.unet, &x, t, emb_u, c, cfg.guidance)?;
            let next = sched.step(&eps, t, &x, &den_grid)?;
            let (d, m) = diff_stats("den step", &next, &den_ref.i(i + 1..i + 2)?)?;
            // Judge each step relative to its own scale: late latents reach |x| ~ 20.
            let rel = d / m.max(1.0);
            if rel > worst.0 / worst.1.max(1.0) || worst == (0.0, 0.0) {
                worst = (d, m);
            }
        }
        rep.push("den_traj (teacher-forced)", worst.0, worst.0 / worst.1, TOL_CALL * worst.1.max(1.0), "worst step");
    }
    progress("denoise (free-running)");
    let cond = TwoStage { uncond: emb_u, stage1: emb_a, stage2: emb_b, stage1_steps: k, guidance: cfg.guidance };
    let mut lat = vec![z.clone()];
    let final_latent = sample_two_stage(&sd.unet, &sched, &z, &cond, cfg.steps, |v| lat.push(v.latent.clone()))?;
    rep.compare("den_traj", &Tensor::cat(&lat, 0)?, &den_ref, TOL_FREE_FINAL)?;
    rep.compare("final_latent", &final_latent, &get("final_latent")?, TOL_FREE_FINAL)?;

    // ---- decode -----------------------------------------------------------------------
    progress("vae decode");
    let decoded_tf = sd.vae.decode_latent(&get("final_latent")?)?;
    rep.compare("decoded (teacher-forced)", &decoded_tf, &get("decoded")?, TOL_CALL)?;
    let to_u8 = |x: &Tensor, q: Quantize| -> Result<Tensor> {
        let (v, h, w) = tensor_to_u8(x, q)?;
        Ok(Tensor::from_vec(v, (h, w, 3), &dev)?)
    };
    rep.compare_abs("image_u8 (teacher-forced)", &to_u8(&decoded_tf, Quantize::Round)?, &get("image_u8")?, 1.0, "levels")?;
    rep.compare_abs("image_u8_trunc (teacher-forced)", &to_u8(&decoded_tf, Quantize::Truncate)?, &get("image_u8_trunc")?, 1.0, "levels")?;
    let decoded = sd.vae.decode_latent(&final_latent)?;
    rep.compare("decoded", &decoded, &get("decoded")?, TOL_FREE_FINAL)?;
    rep.compare_abs("image_u8", &to_u8(&decoded, Quantize::Round)?, &get("image_u8")?, TOL_FREE_LEVELS, "levels")?;
    Ok(rep)
}
