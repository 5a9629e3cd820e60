//! Sampling loops over a DDIM grid, in k-diffusion's shape: each takes the noise prediction as a
//! closure `eps(x, index, t)`, so the same loop serves every method and every way of
//! conditioning (classifier-free guidance, a prompt chosen per step, a plain UNet call).
//!
//! - [`ddim_sample`]: DDIM, Song, Meng & Ermon, ICLR 2021 (arXiv:2010.02502), eq. 12 with
//!   eta = 0, down the descending grid of [`Ddim::set_timesteps`];
//! - [`ddim_invert`]: the same deterministic map run backwards up the ascending grid of
//!   [`Ddim::set_inverse_timesteps`], with the model evaluated at each TARGET timestep, exactly
//!   as diffusers' `DDIMInverseScheduler` inside the SD pipeline.
use candle_core::Tensor;

use crate::error::Result;
use crate::schedule::ddim::Ddim;

/// One sampling or inversion step as seen by an observer: step index, timestep, the noise
/// prediction used, and the latent after the step.
pub struct StepView<'a> {
    pub index: usize,
    pub t: usize,
    pub eps: &'a Tensor,
    pub latent: &'a Tensor,
}

/// Samples from `x_t` down the `steps`-step DDIM grid (eta 0). `eps(x, index, t)` predicts the
/// noise of latent `x` at step `index`, timestep `t`.
pub fn ddim_sample(
    sched: &Ddim,
    x_t: &Tensor,
    steps: usize,
    eps: impl FnMut(&Tensor, usize, usize) -> Result<Tensor>,
    observe: impl FnMut(StepView<'_>),
) -> Result<Tensor> {
    ddim_sample_from(sched, x_t, steps, 0, eps, observe)
}

/// [`ddim_sample`] over the steps `start..` of the grid only, from a latent `x` at the
/// timestep of step `start` (image-to-image: the latent is a noised image). Step indices
/// passed to `eps` and `observe` are those of the whole grid.
pub fn ddim_sample_from(
    sched: &Ddim,
    x: &Tensor,
    steps: usize,
    start: usize,
    mut eps: impl FnMut(&Tensor, usize, usize) -> Result<Tensor>,
    mut observe: impl FnMut(StepView<'_>),
) -> Result<Tensor> {
    let grid = sched.set_timesteps(steps)?;
    let mut x = x.clone();
    for (index, &t) in grid.timesteps.iter().enumerate().skip(start) {
        let e = eps(&x, index, t)?;
        x = sched.step(&e, t, &x, &grid)?;
        observe(StepView { index, t, eps: &e, latent: &x });
    }
    Ok(x)
}

/// diffusers' image-to-image start: with `strength` s the last `int(steps * s)` steps of the
/// grid run, so the first of them is step `steps - int(steps * s)`; its timestep is where the
/// image is noised to. An error when no step would run.
pub fn img2img_start(sched: &Ddim, steps: usize, strength: f64) -> Result<(usize, usize)> {
    if !(0.0..=1.0).contains(&strength) {
        return Err(crate::error::Error::invalid(format!("strength {strength} must lie in [0, 1]")));
    }
    let run = ((steps as f64 * strength) as usize).min(steps);
    if run == 0 {
        return Err(crate::error::Error::invalid(format!("strength {strength} with {steps} steps runs no step; raise either")));
    }
    let start = steps - run;
    Ok((start, sched.set_timesteps(steps)?.timesteps[start]))
}

/// Inverts the clean latent `z0` with `steps` DDIM steps; `eps(x, index, t)` as in
/// [`ddim_sample`], called at each target timestep on the current latent.
pub fn ddim_invert(
    sched: &Ddim,
    z0: &Tensor,
    steps: usize,
    mut eps: impl FnMut(&Tensor, usize, usize) -> Result<Tensor>,
    mut observe: impl FnMut(StepView<'_>),
) -> Result<Tensor> {
    let grid = sched.set_inverse_timesteps(steps)?;
    let mut x = z0.clone();
    for (index, &t) in grid.timesteps.iter().enumerate() {
        let e = eps(&x, index, t)?;
        x = sched.inverse_step(&e, t, &x, &grid)?;
        observe(StepView { index, t, eps: &e, latent: &x });
    }
    Ok(x)
}
