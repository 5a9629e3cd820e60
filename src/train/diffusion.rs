//! The latent-diffusion training objective (Rombach et al. 2022, eq. 2), shared by everything
//! that trains against a frozen or learning UNet: concept learning, the training benchmarks and
//! pretraining.
use candle_core::Tensor;

use crate::error::Result;
use crate::schedule::ddim::PredictionType;
use crate::sd::clip::ClipTextEncoder;
use crate::sd::unet::UNet;

/// One micro-batch: clean latents, noise, timesteps and prompt ids.
pub struct Batch {
    /// [b, c, h, w], already x scaling factor.
    pub latents: Tensor,
    pub noise: Tensor,
    pub timesteps: Vec<usize>,
    /// [b, tokens]
    pub ids: Tensor,
}

/// The latent-diffusion training loss of `batch` (Rombach et al. 2022, eq. 2):
/// `mean((unet(x_t, t, clip(ids; rows)) - target)^2)` (`rows`: extra token rows, e.g. concepts) with `x_t = sqrt(a_t) x0 + sqrt(1-a_t) noise`
/// and target = noise (epsilon), `sqrt(a_t) noise - sqrt(1-a_t) x0` (v-prediction) or x0.
pub fn noise_prediction_loss(
    text_encoder: &ClipTextEncoder,
    unet: &UNet,
    alphas_cumprod: &[f32],
    prediction: PredictionType,
    batch: &Batch,
    rows: Option<&Tensor>,
) -> Result<Tensor> {
    let b = batch.timesteps.len();
    let dtype = batch.latents.dtype();
    let dev = batch.latents.device();
    let a: Vec<f32> = batch.timesteps.iter().map(|&t| alphas_cumprod[t]).collect();
    let sa = Tensor::from_vec(a.iter().map(|a| a.sqrt()).collect::<Vec<_>>(), (b, 1, 1, 1), dev)?.to_dtype(dtype)?;
    let sb = Tensor::from_vec(a.iter().map(|a| (1.0 - a).sqrt()).collect::<Vec<_>>(), (b, 1, 1, 1), dev)?.to_dtype(dtype)?;
    let x_t = (batch.latents.broadcast_mul(&sa)? + batch.noise.broadcast_mul(&sb)?)?;
    let target = match prediction {
        PredictionType::Epsilon => batch.noise.clone(),
        PredictionType::VPrediction => (batch.noise.broadcast_mul(&sa)? - batch.latents.broadcast_mul(&sb)?)?,
        PredictionType::Sample => batch.latents.clone(),
    };
    let ctx = text_encoder.forward(&batch.ids, rows)?;
    let ts: Vec<f64> = batch.timesteps.iter().map(|&t| t as f64).collect();
    let pred = unet.forward(&x_t, &ts, &ctx)?;
    Ok((pred - target)?.sqr()?.mean_all()?)
}
