//! Two-stage DDIM sampling with classifier-free guidance (Diff-II step 4).
//!
//! Stage 1 — the high-noise steps, whose timestep t >= 1000 (1 - strength) — is conditioned on
//! the concept prompt plus a scene suffix; stage 2 on the plain concept prompt. Guidance is
//! eps = eps_u + w (eps_c - eps_u), with [uncond, cond] evaluated in ONE batched UNet call.
use candle_core::Tensor;

use crate::diffii::invert::StepView;
use crate::error::{Error, Result};
use crate::schedule::ddim::Ddim;
use crate::sd::unet::UNet;

/// Number of leading steps of a descending grid that belong to stage 1 for Diff-II's
/// `strength`: those with t >= num_train_timesteps * (1 - strength) (the official code switches
/// to the concept prompt when `t < 1000 * (1 - strength)`).
pub fn stage1_steps_for_strength(timesteps: &[usize], num_train_timesteps: usize, strength: f64) -> usize {
    let thr = num_train_timesteps as f64 * (1.0 - strength);
    timesteps.iter().take_while(|&&t| !((t as f64) < thr)).count()
}

/// Text conditions for two-stage guided sampling. All are [1 or b, tokens, dim].
pub struct TwoStage<'a> {
    pub uncond: &'a Tensor,
    /// Concept prompt + suffix (stage 1).
    pub stage1: &'a Tensor,
    /// Concept prompt (stage 2).
    pub stage2: &'a Tensor,
    /// How many leading steps use `stage1`.
    pub stage1_steps: usize,
    pub guidance: f64,
}

/// Classifier-free-guided noise prediction for latents `x` [b, ...] in one UNet call on the
/// batch [uncond x b, cond x b]. With guidance 1 only the conditional branch is evaluated.
pub fn guided_eps(unet: &UNet, x: &Tensor, t: usize, uncond: &Tensor, cond: &Tensor, guidance: f64) -> Result<Tensor> {
    let b = x.dim(0)?;
    let expand = |c: &Tensor| -> Result<Tensor> {
        match c.dim(0)? {
            n if n == b => Ok(c.clone()),
            1 => Ok(c.repeat((b, 1, 1))?),
            n => Err(Error::invalid(format!("text condition batch {n} does not match latent batch {b}"))),
        }
    };
    if guidance == 1.0 {
        return unet.forward_t(x, t, &expand(cond)?);
    }
    let ctx = Tensor::cat(&[expand(uncond)?, expand(cond)?], 0)?;
    let out = unet.forward_t(&Tensor::cat(&[x, x], 0)?, t, &ctx)?;
    let eps_u = out.narrow(0, 0, b)?;
    let eps_c = out.narrow(0, b, b)?;
    Ok((&eps_u + ((eps_c - &eps_u)? * guidance)?)?)
}

/// Samples from `x_t` [b, c, h, w] down the `steps`-step DDIM grid (eta 0).
pub fn sample_two_stage(
    unet: &UNet,
    sched: &Ddim,
    x_t: &Tensor,
    cond: &TwoStage<'_>,
    steps: usize,
    mut observe: impl FnMut(StepView<'_>),
) -> Result<Tensor> {
    let grid = sched.set_timesteps(steps)?;
    let mut x = x_t.clone();
    for (index, &t) in grid.timesteps.iter().enumerate() {
        let c = if index < cond.stage1_steps { cond.stage1 } else { cond.stage2 };
        let eps = guided_eps(unet, &x, t, cond.uncond, c, cond.guidance)?;
        x = sched.step(&eps, t, &x, &grid)?;
        observe(StepView { index, t, eps: &eps, latent: &x });
    }
    Ok(x)
}
