//! DDIM inversion (Diff-II step 2): run the deterministic DDIM update backwards, from a clean
//! latent up the ascending timestep grid, conditioned on the class's concept prompt with
//! guidance 1 (the conditional branch only), so that DDIM sampling from the result returns
//! (nearly) the original image.
use candle_core::Tensor;

use crate::error::Result;
use crate::schedule::ddim::Ddim;
use crate::sd::unet::UNet;

/// One inversion or sampling step as seen by an observer: step index, timestep, the noise
/// prediction used, and the latent after the step.
pub struct StepView<'a> {
    pub index: usize,
    pub t: usize,
    pub eps: &'a Tensor,
    pub latent: &'a Tensor,
}

/// Inverts `z0` [b, c, h, w] with `steps` DDIM steps. `context` [b or 1, tokens, dim] is the
/// concept prompt's text features. The UNet is evaluated at each TARGET timestep on the current
/// latent, exactly as diffusers' `DDIMInverseScheduler` with the SD pipeline.
pub fn ddim_invert(
    unet: &UNet,
    sched: &Ddim,
    z0: &Tensor,
    context: &Tensor,
    steps: usize,
    mut observe: impl FnMut(StepView<'_>),
) -> Result<Tensor> {
    let grid = sched.set_inverse_timesteps(steps)?;
    let b = z0.dim(0)?;
    let ctx = if context.dim(0)? == b { context.clone() } else { context.repeat((b, 1, 1))? };
    let mut x = z0.clone();
    for (index, &t) in grid.timesteps.iter().enumerate() {
        let eps = unet.forward_t(&x, t, &ctx)?;
        x = sched.inverse_step(&eps, t, &x, &grid)?;
        observe(StepView { index, t, eps: &eps, latent: &x });
    }
    Ok(x)
}
