//! Classifier-free guidance (Ho & Salimans, arXiv:2207.12598): the noise prediction
//! eps = eps_u + w (eps_c - eps_u), with the unconditional and conditional branches evaluated
//! in ONE batched UNet call, as diffusers' SD pipelines do. Every method samples through it.
use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::sd::unet::UNet;

/// Guided noise prediction for latents `x` [b, ...] at timestep `t`, from one UNet call on the
/// batch [uncond x b, cond x b]. Text conditions are [1 or b, tokens, dim]. With guidance 1
/// only the conditional branch is evaluated.
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
