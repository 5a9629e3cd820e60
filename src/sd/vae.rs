//! `AutoencoderKL` of SD-1.x: encoder to a diagonal-Gaussian posterior, decoder back to pixels.
//! Pixels are NCHW in [-1, 1]; latents are unscaled (multiply by `scaling_factor` for the UNet).
use candle_core::Tensor;

use crate::error::Result;
use crate::sd::config::VaeConfig;
use crate::nn::{Conv2d, GroupNorm, Mode};
use crate::sd::unet_blocks::{Downsample2D, ResnetBlock2D, ResnetSpec, SpatialSelfAttention, Upsample2D};
use crate::nn::weights::Weights;

/// diffusers hard-codes this epsilon for every VAE norm.
const VAE_EPS: f64 = 1e-6;

#[derive(Clone, Debug)]
struct MidBlock {
    resnet0: ResnetBlock2D,
    attention: Option<SpatialSelfAttention>,
    resnet1: ResnetBlock2D,
}

impl MidBlock {
    fn load(w: &Weights, c: &VaeConfig, channels: usize, mode: Mode) -> Result<Self> {
        let spec = spec(c, channels, channels);
        Ok(MidBlock {
            resnet0: ResnetBlock2D::load(&w.pp("resnets").pp(0), &spec)?,
            attention: if c.mid_block_add_attention {
                Some(SpatialSelfAttention::load(&w.pp("attentions").pp(0), channels, c.norm_num_groups, VAE_EPS, mode)?)
            } else {
                None
            },
            resnet1: ResnetBlock2D::load(&w.pp("resnets").pp(1), &spec)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.resnet0.forward(x, None)?;
        if let Some(a) = &self.attention {
            x = a.forward(&x)?;
        }
        self.resnet1.forward(&x, None)
    }
}

fn spec(c: &VaeConfig, cin: usize, cout: usize) -> ResnetSpec {
    ResnetSpec {
        in_channels: cin,
        out_channels: cout,
        temb_channels: None,
        groups: c.norm_num_groups,
        eps: VAE_EPS,
        act: c.act,
        output_scale_factor: 1.0,
    }
}

#[derive(Clone, Debug)]
pub struct Vae {
    pub config: VaeConfig,
    enc_conv_in: Conv2d,
    enc_down: Vec<(Vec<ResnetBlock2D>, Option<Downsample2D>)>,
    enc_mid: MidBlock,
    enc_norm_out: GroupNorm,
    enc_conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    dec_conv_in: Conv2d,
    dec_mid: MidBlock,
    dec_up: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    dec_norm_out: GroupNorm,
    dec_conv_out: Conv2d,
}

impl Vae {
    /// The device the weights live on.
    pub fn device(&self) -> &candle_core::Device {
        self.dec_conv_in.weight.device()
    }

    /// `w` must accept both attention namings; [`crate::sd::loader`] registers the aliases.
    pub fn load(w: &Weights, config: &VaeConfig, mode: Mode) -> Result<Self> {
        let c = config;
        let bo = &c.block_out_channels;
        let n = bo.len();
        let lat = c.latent_channels;
        let we = w.pp("encoder");
        let wd = w.pp("decoder");

        let mut enc_down = Vec::with_capacity(n);
        let mut cout = bo[0];
        for (i, &ch) in bo.iter().enumerate() {
            let wb = we.pp("down_blocks").pp(i);
            let cin = cout;
            cout = ch;
            let resnets = (0..c.layers_per_block)
                .map(|j| ResnetBlock2D::load(&wb.pp("resnets").pp(j), &spec(c, if j == 0 { cin } else { cout }, cout)))
                .collect::<Result<Vec<_>>>()?;
            let ds = if i + 1 < n { Some(Downsample2D::load(&wb.pp("downsamplers").pp(0), cout, 0)?) } else { None };
            enc_down.push((resnets, ds));
        }

        let mut dec_up = Vec::with_capacity(n);
        let rev: Vec<usize> = bo.iter().rev().copied().collect();
        let mut out_ch = rev[0];
        for i in 0..n {
            let wb = wd.pp("up_blocks").pp(i);
            let prev = out_ch;
            out_ch = rev[i];
            let resnets = (0..c.layers_per_block + 1)
                .map(|j| ResnetBlock2D::load(&wb.pp("resnets").pp(j), &spec(c, if j == 0 { prev } else { out_ch }, out_ch)))
                .collect::<Result<Vec<_>>>()?;
            let us = if i + 1 < n { Some(Upsample2D::load(&wb.pp("upsamplers").pp(0), out_ch)?) } else { None };
            dec_up.push((resnets, us));
        }

        Ok(Vae {
            config: c.clone(),
            enc_conv_in: Conv2d::load(&we.pp("conv_in"), c.in_channels, bo[0], 3, 1, 1)?,
            enc_down,
            enc_mid: MidBlock::load(&we.pp("mid_block"), c, bo[n - 1], mode)?,
            enc_norm_out: GroupNorm::load(&we.pp("conv_norm_out"), c.norm_num_groups, bo[n - 1], VAE_EPS)?,
            enc_conv_out: Conv2d::load(&we.pp("conv_out"), bo[n - 1], 2 * lat, 3, 1, 1)?,
            quant_conv: if c.use_quant_conv { Some(Conv2d::load(&w.pp("quant_conv"), 2 * lat, 2 * lat, 1, 1, 0)?) } else { None },
            post_quant_conv: if c.use_post_quant_conv { Some(Conv2d::load(&w.pp("post_quant_conv"), lat, lat, 1, 1, 0)?) } else { None },
            dec_conv_in: Conv2d::load(&wd.pp("conv_in"), lat, bo[n - 1], 3, 1, 1)?,
            dec_mid: MidBlock::load(&wd.pp("mid_block"), c, bo[n - 1], mode)?,
            dec_up,
            dec_norm_out: GroupNorm::load(&wd.pp("conv_norm_out"), c.norm_num_groups, bo[0], VAE_EPS)?,
            dec_conv_out: Conv2d::load(&wd.pp("conv_out"), bo[0], c.out_channels, 3, 1, 1)?,
        })
    }

    /// Posterior (mean, logvar) of pixels `x` [b, 3, H, W] in [-1, 1]; logvar clamped to
    /// [-30, 20] as diffusers' `DiagonalGaussianDistribution`.
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut h = self.enc_conv_in.forward(x)?;
        for (resnets, ds) in &self.enc_down {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(ds) = ds {
                h = ds.forward(&h)?;
            }
        }
        h = self.enc_mid.forward(&h)?;
        h = self.enc_conv_out.forward(&self.config.act.forward(&self.enc_norm_out.forward(&h)?)?)?;
        if let Some(q) = &self.quant_conv {
            h = q.forward(&h)?;
        }
        let lat = self.config.latent_channels;
        let mean = h.narrow(1, 0, lat)?;
        let logvar = h.narrow(1, lat, lat)?.clamp(-30f32, 20f32)?;
        Ok((mean, logvar))
    }

    /// Pixels in (about) [-1, 1] from an unscaled latent.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        h = self.dec_conv_in.forward(&h)?;
        h = self.dec_mid.forward(&h)?;
        for (resnets, us) in &self.dec_up {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(us) = us {
                h = us.forward(&h, None)?;
            }
        }
        self.dec_conv_out.forward(&self.config.act.forward(&self.dec_norm_out.forward(&h)?)?)
    }

    /// Posterior mean x scaling factor: the latent the UNet works on (Diff-II uses the mean, not
    /// a sample).
    pub fn encode_latent(&self, x: &Tensor) -> Result<Tensor> {
        Ok((self.encode(x)?.0 * self.config.scaling_factor)?)
    }

    /// Inverse of [`encode_latent`](Self::encode_latent)'s scaling, then decode.
    pub fn decode_latent(&self, z: &Tensor) -> Result<Tensor> {
        self.decode(&(z / self.config.scaling_factor)?)
    }
}
