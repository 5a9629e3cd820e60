//! DDIM sampling and DDIM inversion, ported from diffusers' `DDIMScheduler` and
//! `DDIMInverseScheduler` (diffusers 0.42) so that a Rust run reproduces a diffusers run step for
//! step.
//!
//! The method is DDIM, Song, Meng & Ermon, "Denoising Diffusion Implicit Models", ICLR 2021
//! (arXiv:2010.02502), eq. 12:
//!
//! ```text
//! x_prev = sqrt(a_prev) * (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)
//!        + sqrt(1 - a_prev - sigma_t^2) * eps + sigma_t * z,
//! sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
//! ```
//!
//! where `a` is the cumulative product of `1 - beta` ("alphas_cumprod"). Inversion runs the same
//! deterministic (eta 0) map with the roles of the two timesteps swapped.
//!
//! Conventions (each one matters for matching the reference tensors):
//! * `alphas_cumprod` is computed as torch does on the CPU: betas from a float32 `linspace` (first
//!   half `start + step * i`, second half `end - step * (N - 1 - i)`, each a fused multiply-add in
//!   the AVX2/AVX-512 build of torch), squared in float32 for `scaled_linear`, `alphas = 1 - betas`
//!   in float32, and a cumulative product accumulated in float64 (torch's CPU accumulate type for
//!   float) and rounded to float32 after every factor. This is bit-identical to the fixture.
//! * `set_alpha_to_one = false` (SD-1.x) means the alpha used "before t = 0" (the final alpha of
//!   sampling, the initial alpha of inversion) is `alphas_cumprod[0]` = 0.99915, not 1.0.
//! * Sampling: the step at `t` goes to `t - N / n` (integer division, diffusers' stride formula,
//!   for every timestep spacing), using the final alpha when that is negative.
//! * Inversion (`DDIMInverseScheduler.step(eps, t, x)`): the UNet is evaluated at the TARGET
//!   timestep `t` on a latent that sits at `t - N / n`; so the first inversion step of SD-1.5 with
//!   50 steps evaluates the UNet at t = 1 and moves from "alpha of t = -19" (the initial alpha) to
//!   `alphas_cumprod[1]`. Consequently inverse step k and the sampling step at the same `t_k` use
//!   the UNet at the same timestep and are exact algebraic inverses for equal eps.
//! * Scalar alpha arithmetic is done in float32 (torch's 0-dim float32 tensors), then applied with
//!   tensor ops in the order diffusers writes them, so float32 results are bit-identical to
//!   diffusers on the CPU. Tensors keep the dtype of the latent `x`.
//! * candle's CPU RNG cannot be seeded, so noise comes from [`crate::rng::seeded_randn`].
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::error::{Error, Result};

// ---------------------------------------------------------------------------------------------
// configuration
// ---------------------------------------------------------------------------------------------

fn d_num_train_timesteps() -> usize {
    1000
}
fn d_beta_start() -> f64 {
    0.0001
}
fn d_beta_end() -> f64 {
    0.02
}
fn d_beta_schedule() -> String {
    "linear".into()
}
fn d_true() -> bool {
    true
}
fn d_prediction_type() -> String {
    "epsilon".into()
}
fn d_one() -> f64 {
    1.0
}
fn d_timestep_spacing() -> String {
    "leading".into()
}

/// The fields of a diffusers `scheduler_config.json` that DDIM uses, with diffusers' names and
/// `DDIMScheduler.__init__` defaults. Unknown keys (`_class_name`, PNDM's `skip_prk_steps`, ...)
/// are ignored, so SD-1.5's PNDM config loads too.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DdimConfig {
    #[serde(default = "d_num_train_timesteps")]
    pub num_train_timesteps: usize,
    #[serde(default = "d_beta_start")]
    pub beta_start: f64,
    #[serde(default = "d_beta_end")]
    pub beta_end: f64,
    /// "linear", "scaled_linear" or "squaredcos_cap_v2".
    #[serde(default = "d_beta_schedule")]
    pub beta_schedule: String,
    /// Overrides `beta_schedule` when present (length must be `num_train_timesteps`).
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    /// Clamp the predicted x0 to `[-clip_sample_range, clip_sample_range]` (diffusers default true).
    #[serde(default = "d_true")]
    pub clip_sample: bool,
    #[serde(default = "d_one")]
    pub clip_sample_range: f64,
    #[serde(default = "d_true")]
    pub set_alpha_to_one: bool,
    #[serde(default)]
    pub steps_offset: usize,
    /// "epsilon", "v_prediction" or "sample".
    #[serde(default = "d_prediction_type")]
    pub prediction_type: String,
    /// Dynamic thresholding (Imagen); not supported, must be false.
    #[serde(default)]
    pub thresholding: bool,
    /// Zero-terminal-SNR rescaling (Lin et al. 2023); not supported, must be false.
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// "leading", "trailing" or "linspace".
    #[serde(default = "d_timestep_spacing")]
    pub timestep_spacing: String,
}

impl Default for DdimConfig {
    /// diffusers' `DDIMScheduler()` defaults (not SD's settings; see [`DdimConfig::sd15`]).
    fn default() -> Self {
        serde_json::from_str("{}").expect("all fields have defaults")
    }
}

/// How the inference timesteps are spread over the training timesteps (diffusers'
/// `timestep_spacing`; see Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps
/// are Flawed", table 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// What the model output means (diffusers' `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredcosCapV2,
}

impl DdimConfig {
    /// The SD-1.x settings (same as the fixture's `scheduler_config.json`).
    pub fn sd15() -> Self {
        DdimConfig {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            clip_sample: false,
            set_alpha_to_one: false,
            steps_offset: 1,
            ..Default::default()
        }
    }

    /// Reads and checks a diffusers `scheduler_config.json`; errors name the file and the key.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let cfg: DdimConfig = crate::error::read_json(path)?;
        cfg.check().map_err(|msg| Error::bad_file(path, msg))?;
        Ok(cfg)
    }

    /// Checks every setting; the message names the offending key.
    pub fn check(&self) -> std::result::Result<(), String> {
        self.parse().map(|_| ())
    }

    pub fn spacing(&self) -> std::result::Result<TimestepSpacing, String> {
        match self.timestep_spacing.as_str() {
            "leading" => Ok(TimestepSpacing::Leading),
            "trailing" => Ok(TimestepSpacing::Trailing),
            "linspace" => Ok(TimestepSpacing::Linspace),
            s => Err(format!("timestep_spacing {s:?} is not supported (expected leading, trailing or linspace)")),
        }
    }

    pub fn prediction(&self) -> std::result::Result<PredictionType, String> {
        match self.prediction_type.as_str() {
            "epsilon" => Ok(PredictionType::Epsilon),
            "v_prediction" => Ok(PredictionType::VPrediction),
            "sample" => Ok(PredictionType::Sample),
            s => Err(format!("prediction_type {s:?} is not supported (expected epsilon, v_prediction or sample)")),
        }
    }

    pub fn schedule(&self) -> std::result::Result<BetaSchedule, String> {
        match self.beta_schedule.as_str() {
            "linear" => Ok(BetaSchedule::Linear),
            "scaled_linear" => Ok(BetaSchedule::ScaledLinear),
            "squaredcos_cap_v2" => Ok(BetaSchedule::SquaredcosCapV2),
            s => Err(format!(
                "beta_schedule {s:?} is not supported (expected linear, scaled_linear or squaredcos_cap_v2)"
            )),
        }
    }

    fn parse(&self) -> std::result::Result<(TimestepSpacing, PredictionType, BetaSchedule), String> {
        if self.num_train_timesteps == 0 {
            return Err("num_train_timesteps must be at least 1".into());
        }
        let spacing = self.spacing()?;
        let prediction = self.prediction()?;
        let schedule = self.schedule()?;
        if self.thresholding {
            return Err("thresholding = true (dynamic thresholding) is not supported".into());
        }
        if self.rescale_betas_zero_snr {
            return Err("rescale_betas_zero_snr = true is not supported".into());
        }
        if self.clip_sample && !(self.clip_sample_range.is_finite() && self.clip_sample_range > 0.0) {
            return Err(format!("clip_sample_range {} must be positive", self.clip_sample_range));
        }
        if let Some(b) = &self.trained_betas {
            if b.len() != self.num_train_timesteps {
                return Err(format!(
                    "trained_betas has {} values but num_train_timesteps is {}",
                    b.len(),
                    self.num_train_timesteps
                ));
            }
        }
        Ok((spacing, prediction, schedule))
    }
}

// ---------------------------------------------------------------------------------------------
// noise schedule
// ---------------------------------------------------------------------------------------------

/// `torch.linspace(start, end, steps, dtype=float32)` on the CPU, bit for bit: the endpoints are
/// rounded to f32, the step is computed in f32, and the two halves are anchored at opposite ends
/// (torch does this so that both endpoints are exact); each element is one fused multiply-add, as
/// torch's compiled kernel does.
pub fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    match steps {
        0 => return vec![],
        1 => return vec![start as f32],
        _ => {}
    }
    let (start, end) = (start as f32, end as f32);
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine alpha-bar of Nichol & Dhariwal 2021
/// ("squaredcos_cap_v2"), computed in f64 and rounded to f32 like `torch.tensor(betas)`.
fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// `alphas_cumprod` exactly as diffusers' DDIM schedulers build it with torch on the CPU (see the
/// module doc). Bit-identical to the fixture for SD-1.5's `scaled_linear` settings.
pub fn alphas_cumprod(config: &DdimConfig) -> Result<Vec<f32>> {
    let (_, _, schedule) = config.parse().map_err(Error::invalid)?;
    let n = config.num_train_timesteps;
    let betas: Vec<f32> = match (&config.trained_betas, schedule) {
        (Some(b), _) => b.iter().map(|&v| v as f32).collect(),
        (None, BetaSchedule::Linear) => torch_linspace_f32(config.beta_start, config.beta_end, n),
        (None, BetaSchedule::ScaledLinear) => {
            torch_linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), n)
                .into_iter()
                .map(|b| b * b)
                .collect()
        }
        (None, BetaSchedule::SquaredcosCapV2) => cosine_betas(n),
    };
    // torch's CPU cumprod accumulates float32 in float64 and rounds each partial product.
    let mut acc = 1.0f64;
    Ok(betas
        .iter()
        .map(|&b| {
            acc *= (1.0f32 - b) as f64;
            acc as f32
        })
        .collect())
}

// ---------------------------------------------------------------------------------------------
// timestep grids
// ---------------------------------------------------------------------------------------------

fn check_steps(num_train_timesteps: usize, num_inference_steps: usize) -> Result<()> {
    if num_inference_steps == 0 || num_inference_steps > num_train_timesteps {
        return Err(Error::invalid(format!(
            "num_inference_steps must be in 1..={num_train_timesteps}, got {num_inference_steps}"
        )));
    }
    Ok(())
}

/// The stride diffusers' DDIM `step` uses for every spacing: `num_train_timesteps //
/// num_inference_steps`.
pub fn step_ratio(num_train_timesteps: usize, num_inference_steps: usize) -> Result<usize> {
    check_steps(num_train_timesteps, num_inference_steps)?;
    Ok(num_train_timesteps / num_inference_steps)
}

/// numpy's `round` (half to even), which diffusers applies to float timesteps.
fn np_round(v: f64) -> f64 {
    v.round_ties_even()
}

/// `np.round(np.arange(N, 0, -N / n)) - 1` (diffusers' "trailing" spacing), descending.
///
/// numpy's float `arange` stores `start` and `start + step`, then fills element i with
/// `start + i * d` where `d = (start + step) - start`; we reproduce that arithmetic. numpy sizes
/// the array as `ceil(N / (N / n))`, which for 62 values of n with N = 1000 (n = 61, 103, ...) is
/// n + 1, so diffusers gets an extra final timestep `round(~1e-13) - 1 = -1` (which torch would
/// index as the LAST alpha). We return only the n intended timesteps; they equal diffusers' first
/// n.
fn trailing_desc(num_train_timesteps: usize, n: usize) -> Vec<usize> {
    let start = num_train_timesteps as f64;
    let step = -(num_train_timesteps as f64 / n as f64);
    let d = (start + step) - start;
    (0..n)
        .map(|i| {
            let v = if i == 0 { start } else if i == 1 { start + step } else { start + i as f64 * d };
            (np_round(v) as i64 - 1) as usize
        })
        .collect()
}

fn check_range(timesteps: &[usize], num_train_timesteps: usize, what: &str) -> Result<()> {
    match timesteps.iter().find(|&&t| t >= num_train_timesteps) {
        Some(t) => Err(Error::invalid(format!(
            "{what} timestep {t} is outside 0..{num_train_timesteps} (steps_offset too large for this number of steps)"
        ))),
        None => Ok(()),
    }
}

/// Denoising timesteps (descending), exactly as `DDIMScheduler.set_timesteps(n)`:
/// * leading: `r = N // n`, `t_i = (n-1-i) * r + steps_offset` (SD-1.5, n = 50: 981, 961, ..., 1);
/// * trailing: `round(N - i * N / n) - 1` (numpy's half-to-even round; always starts at N - 1;
///   `steps_offset` ignored as in diffusers);
/// * linspace: `round(linspace(0, N - 1, n))` reversed (`steps_offset` ignored as in diffusers).
///
/// Note diffusers' `step` always moves by `N // n`, which for trailing / linspace is not the next
/// grid entry; [`Ddim::step`] reproduces that. Errors when `n` is not in `1..=N` or a timestep
/// would be `>= N` (leading with a large `steps_offset`).
pub fn denoise_timesteps(
    num_train_timesteps: usize,
    num_inference_steps: usize,
    spacing: TimestepSpacing,
    steps_offset: usize,
) -> Result<Vec<usize>> {
    let (big_n, n) = (num_train_timesteps, num_inference_steps);
    check_steps(big_n, n)?;
    let ts: Vec<usize> = match spacing {
        TimestepSpacing::Leading => {
            let r = big_n / n;
            (0..n).rev().map(|i| i * r + steps_offset).collect()
        }
        TimestepSpacing::Trailing => trailing_desc(big_n, n),
        TimestepSpacing::Linspace => {
            // np.linspace(0, N-1, n): y_i = i * ((N-1)/(n-1)), last element set to N-1 exactly.
            let stop = (big_n - 1) as f64;
            let mut y: Vec<f64> = if n == 1 {
                vec![0.0]
            } else {
                let step = stop / (n - 1) as f64;
                (0..n).map(|i| if step == 0.0 { 0.0 } else { i as f64 * step }).collect()
            };
            if n > 1 {
                y[n - 1] = stop;
            }
            y.iter().rev().map(|&v| np_round(v) as usize).collect()
        }
    };
    check_range(&ts, big_n, "denoising")?;
    Ok(ts)
}

/// Inversion timesteps (ascending), exactly as `DDIMInverseScheduler.set_timesteps(n)`:
/// * leading: `t_i = i * (N // n) + steps_offset` (SD-1.5, n = 50: 1, 21, ..., 981);
/// * trailing: the trailing denoising grid reversed (ends at N - 1);
/// * linspace: an error, as in diffusers (the inverse scheduler has no linspace spacing).
///
/// Each entry is the TARGET timestep of an inversion step and the timestep the UNet is evaluated
/// at (see [`Ddim::inverse_step`]).
pub fn inverse_timesteps(
    num_train_timesteps: usize,
    num_inference_steps: usize,
    spacing: TimestepSpacing,
    steps_offset: usize,
) -> Result<Vec<usize>> {
    let (big_n, n) = (num_train_timesteps, num_inference_steps);
    check_steps(big_n, n)?;
    let ts: Vec<usize> = match spacing {
        TimestepSpacing::Leading => {
            let r = big_n / n;
            (0..n).map(|i| i * r + steps_offset).collect()
        }
        TimestepSpacing::Trailing => trailing_desc(big_n, n).into_iter().rev().collect(),
        TimestepSpacing::Linspace => {
            return Err(Error::invalid(
                "timestep_spacing \"linspace\" is not supported for DDIM inversion (diffusers' \
                 DDIMInverseScheduler supports only leading and trailing)",
            ))
        }
    };
    check_range(&ts, big_n, "inversion")?;
    Ok(ts)
}

// ---------------------------------------------------------------------------------------------
// steps (pure functions)
// ---------------------------------------------------------------------------------------------

/// A 0-dim tensor of `x`'s dtype and device, so scalars combine with true tensor arithmetic (a
/// tensor divided by an f64 in candle multiplies by the reciprocal, which is not torch's result).
fn scalar_like(x: &Tensor, v: f32) -> Result<Tensor> {
    Ok(Tensor::new(v, x.device())?.to_dtype(x.dtype())?)
}

fn same_shape(a: &Tensor, x: &Tensor, what: &str) -> Result<Tensor> {
    if a.dims() != x.dims() {
        return Err(Error::invalid(format!("{what} has shape {:?} but the latent has {:?}", a.dims(), x.dims())));
    }
    Ok(a.to_dtype(x.dtype())?)
}

/// `(x - sqrt(1 - a) * eps) / sqrt(a)`: the predicted clean latent (DDIM eq. 12, first bracket).
fn pred_x0_from_eps(eps: &Tensor, x: &Tensor, a: f32) -> Result<Tensor> {
    let beta = 1.0f32 - a;
    let num = x.sub(&eps.broadcast_mul(&scalar_like(x, beta.sqrt())?)?)?;
    Ok(num.broadcast_div(&scalar_like(x, a.sqrt())?)?)
}

/// `sqrt(a_prev) * x0 + sqrt(1 - a_prev - std^2) * eps` (DDIM eq. 12 without the noise term).
fn combine(x0: &Tensor, eps: &Tensor, a_prev: f32, std_dev: f32) -> Result<Tensor> {
    let direction = eps.broadcast_mul(&scalar_like(x0, (1.0f32 - a_prev - std_dev * std_dev).sqrt())?)?;
    Ok(x0.broadcast_mul(&scalar_like(x0, a_prev.sqrt())?)?.add(&direction)?)
}

/// One deterministic DDIM sampling step (Song, Meng & Ermon 2021, eq. 12 with eta = 0 — diffusers'
/// `DDIMScheduler.step` for epsilon prediction without clipping), from the latent `x` at
/// cumulative alpha `alpha_t` to `alpha_prev`:
/// `x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t)`, `x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps`.
/// Scalars are computed in f32 and applied in diffusers' order; the result has `x`'s dtype.
pub fn ddim_step(eps: &Tensor, x: &Tensor, alpha_t: f32, alpha_prev: f32) -> Result<Tensor> {
    let eps = same_shape(eps, x, "eps")?;
    let x0 = pred_x0_from_eps(&eps, x, alpha_t)?;
    combine(&x0, &eps, alpha_prev, 0.0)
}

/// The DDIM posterior variance `(1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)` (Song et al. 2021,
/// eq. 16; diffusers' `_get_variance`), in f32.
pub fn ddim_variance(alpha_t: f32, alpha_prev: f32) -> f32 {
    ((1.0f32 - alpha_prev) / (1.0f32 - alpha_t)) * (1.0f32 - alpha_t / alpha_prev)
}

/// A stochastic DDIM step (Song, Meng & Ermon 2021, eq. 12 with sigma_t = eta * sqrt(variance),
/// see [`ddim_variance`]) with an explicit standard-normal `noise` tensor (diffusers'
/// `variance_noise`): `x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - std^2) eps + std * noise`.
/// eta = 1 is DDPM's ancestral step; eta = 0 equals [`ddim_step`] exactly (noise unused).
pub fn ddim_step_eta(
    eps: &Tensor,
    x: &Tensor,
    alpha_t: f32,
    alpha_prev: f32,
    eta: f32,
    noise: &Tensor,
) -> Result<Tensor> {
    let eps = same_shape(eps, x, "eps")?;
    let x0 = pred_x0_from_eps(&eps, x, alpha_t)?;
    let std_dev = eta * ddim_variance(alpha_t, alpha_prev).sqrt();
    let prev = combine(&x0, &eps, alpha_prev, std_dev)?;
    add_variance_noise(prev, noise, eta, std_dev)
}

fn add_variance_noise(prev: Tensor, noise: &Tensor, eta: f32, std_dev: f32) -> Result<Tensor> {
    // diffusers adds the noise term only when eta > 0.
    if eta > 0.0 {
        let noise = same_shape(noise, &prev, "noise")?;
        Ok(prev.add(&noise.broadcast_mul(&scalar_like(&prev, std_dev)?)?)?)
    } else {
        Ok(prev)
    }
}

/// One DDIM inversion step (diffusers' `DDIMInverseScheduler.step`; the deterministic DDIM map of
/// Song, Meng & Ermon 2021, eq. 12 / eq. 13's ODE, run towards higher noise), from the latent `x`
/// at `alpha_from` to `alpha_to`: `x0 = (x - sqrt(1 - a_from) eps) / sqrt(a_from)`,
/// `x_to = sqrt(a_to) x0 + sqrt(1 - a_to) eps`. The caller evaluates eps at the target timestep.
pub fn ddim_inverse_step(eps: &Tensor, x: &Tensor, alpha_from: f32, alpha_to: f32) -> Result<Tensor> {
    // The same map as a sampling step with the two alphas swapped in role.
    ddim_step(eps, x, alpha_from, alpha_to)
}

/// The forward process q(x_t | x_0) (Ho et al. 2020, eq. 4; diffusers' `add_noise`):
/// `sqrt(a_t) x0 + sqrt(1 - a_t) noise`.
pub fn add_noise(x0: &Tensor, noise: &Tensor, alpha_t: f32) -> Result<Tensor> {
    let noise = same_shape(noise, x0, "noise")?;
    let a = x0.broadcast_mul(&scalar_like(x0, alpha_t.sqrt())?)?;
    let b = noise.broadcast_mul(&scalar_like(x0, (1.0f32 - alpha_t).sqrt())?)?;
    Ok(a.add(&b)?)
}

// ---------------------------------------------------------------------------------------------
// scheduler object
// ---------------------------------------------------------------------------------------------

/// A timestep grid from [`Ddim::set_timesteps`] / [`Ddim::set_inverse_timesteps`], with the
/// stride `N // n` that diffusers' steps use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DdimTimesteps {
    pub timesteps: Vec<usize>,
    pub step_ratio: usize,
}

impl DdimTimesteps {
    pub fn len(&self) -> usize {
        self.timesteps.len()
    }
    pub fn is_empty(&self) -> bool {
        self.timesteps.is_empty()
    }
}

/// DDIM in diffusers' style: one object serving as both `DDIMScheduler` (sampling) and
/// `DDIMInverseScheduler` (inversion) for a config, with explicit grids instead of hidden state.
#[derive(Debug, Clone)]
pub struct Ddim {
    config: DdimConfig,
    spacing: TimestepSpacing,
    prediction: PredictionType,
    alphas_cumprod: Vec<f32>,
    /// Alpha "after t = 0" for sampling and "before t = 0" for inversion: 1.0 when
    /// `set_alpha_to_one`, else `alphas_cumprod[0]` (the two diffusers classes use the same rule).
    boundary_alpha: f32,
}

impl Ddim {
    pub fn new(config: DdimConfig) -> Result<Self> {
        let (spacing, prediction, _) = config.parse().map_err(Error::invalid)?;
        let alphas_cumprod = alphas_cumprod(&config)?;
        let boundary_alpha = if config.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        Ok(Ddim { config, spacing, prediction, alphas_cumprod, boundary_alpha })
    }

    /// Reads `scheduler_config.json` (errors name the file).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Ddim::new(DdimConfig::from_file(path)?).map_err(|e| Error::bad_file(path, e.to_string()))
    }

    pub fn config(&self) -> &DdimConfig {
        &self.config
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// diffusers' `final_alpha_cumprod` (sampling's alpha for `t_prev < 0`).
    pub fn final_alpha_cumprod(&self) -> f32 {
        self.boundary_alpha
    }

    /// diffusers' `initial_alpha_cumprod` (inversion's alpha for `t_from < 0`).
    pub fn initial_alpha_cumprod(&self) -> f32 {
        self.boundary_alpha
    }

    /// `alphas_cumprod[t]`, or an error when `t` is not a training timestep.
    pub fn alpha_at(&self, t: usize) -> Result<f32> {
        self.alphas_cumprod.get(t).copied().ok_or_else(|| {
            Error::invalid(format!("timestep {t} is outside 0..{}", self.alphas_cumprod.len()))
        })
    }

    /// `alphas_cumprod[t]` for `t >= 0`, the boundary alpha for `t < 0`.
    fn alpha_or_boundary(&self, t: i64) -> Result<f32> {
        if t >= 0 {
            self.alpha_at(t as usize)
        } else {
            Ok(self.boundary_alpha)
        }
    }

    /// Denoising grid (descending) for `n` steps; see [`denoise_timesteps`].
    pub fn set_timesteps(&self, n: usize) -> Result<DdimTimesteps> {
        let big_n = self.num_train_timesteps();
        Ok(DdimTimesteps {
            timesteps: denoise_timesteps(big_n, n, self.spacing, self.config.steps_offset)?,
            step_ratio: step_ratio(big_n, n)?,
        })
    }

    /// Inversion grid (ascending) for `n` steps; see [`inverse_timesteps`].
    pub fn set_inverse_timesteps(&self, n: usize) -> Result<DdimTimesteps> {
        let big_n = self.num_train_timesteps();
        Ok(DdimTimesteps {
            timesteps: inverse_timesteps(big_n, n, self.spacing, self.config.steps_offset)?,
            step_ratio: step_ratio(big_n, n)?,
        })
    }

    /// Turns the model output into (predicted x0, predicted eps) per `prediction_type`, then
    /// clips x0 if `clip_sample` (diffusers' order). For epsilon without clipping this is exactly
    /// the computation of [`ddim_step`].
    fn x0_and_eps(&self, out: &Tensor, x: &Tensor, a_t: f32) -> Result<(Tensor, Tensor)> {
        let out = same_shape(out, x, "model output")?;
        let beta_t = 1.0f32 - a_t;
        let (x0, eps) = match self.prediction {
            PredictionType::Epsilon => (pred_x0_from_eps(&out, x, a_t)?, out),
            PredictionType::Sample => {
                let eps = x
                    .sub(&out.broadcast_mul(&scalar_like(x, a_t.sqrt())?)?)?
                    .broadcast_div(&scalar_like(x, beta_t.sqrt())?)?;
                (out, eps)
            }
            PredictionType::VPrediction => {
                let (sa, sb) = (scalar_like(x, a_t.sqrt())?, scalar_like(x, beta_t.sqrt())?);
                let x0 = x.broadcast_mul(&sa)?.sub(&out.broadcast_mul(&sb)?)?;
                let eps = out.broadcast_mul(&sa)?.add(&x.broadcast_mul(&sb)?)?;
                (x0, eps)
            }
        };
        let x0 = if self.config.clip_sample {
            let r = self.config.clip_sample_range as f32;
            x0.clamp(-r, r)?
        } else {
            x0
        };
        Ok((x0, eps))
    }

    /// `DDIMScheduler.step(out, t, x, eta=0)`: from `t` to `t - grid.step_ratio`, with the final
    /// alpha when that is negative.
    pub fn step(&self, model_output: &Tensor, t: usize, x: &Tensor, grid: &DdimTimesteps) -> Result<Tensor> {
        let a_t = self.alpha_at(t)?;
        let a_prev = self.alpha_or_boundary(t as i64 - grid.step_ratio as i64)?;
        let (x0, eps) = self.x0_and_eps(model_output, x, a_t)?;
        combine(&x0, &eps, a_prev, 0.0)
    }

    /// `DDIMScheduler.step(out, t, x, eta, variance_noise=noise)`: the stochastic step of
    /// [`ddim_step_eta`] at the grid's stride.
    pub fn step_with_noise(
        &self,
        model_output: &Tensor,
        t: usize,
        x: &Tensor,
        grid: &DdimTimesteps,
        eta: f32,
        noise: &Tensor,
    ) -> Result<Tensor> {
        let a_t = self.alpha_at(t)?;
        let a_prev = self.alpha_or_boundary(t as i64 - grid.step_ratio as i64)?;
        let (x0, eps) = self.x0_and_eps(model_output, x, a_t)?;
        let std_dev = eta * ddim_variance(a_t, a_prev).sqrt();
        let prev = combine(&x0, &eps, a_prev, std_dev)?;
        add_variance_noise(prev, noise, eta, std_dev)
    }

    /// `DDIMInverseScheduler.step(out, t, x)`: moves `x` from `t_from = min(t - step_ratio, N - 1)`
    /// (the initial alpha when negative) TO `t`. The model output must come from the UNet
    /// evaluated at `t`, the target.
    pub fn inverse_step(&self, model_output: &Tensor, t: usize, x: &Tensor, grid: &DdimTimesteps) -> Result<Tensor> {
        let a_to = self.alpha_at(t)?;
        let t_from = (t as i64 - grid.step_ratio as i64).min(self.num_train_timesteps() as i64 - 1);
        let a_from = self.alpha_or_boundary(t_from)?;
        let (x0, eps) = self.x0_and_eps(model_output, x, a_from)?;
        combine(&x0, &eps, a_to, 0.0)
    }

    /// Forward noising to timestep `t` (diffusers' `add_noise`).
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, t: usize) -> Result<Tensor> {
        add_noise(x0, noise, self.alpha_at(t)?)
    }

    /// `alphas_cumprod` as an f32 tensor on `device`.
    pub fn alphas_cumprod_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::new(self.alphas_cumprod.as_slice(), device)?.to_dtype(DType::F32)?)
    }
}
