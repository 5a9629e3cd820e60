//! `UNet2DConditionModel` of SD-1.x: sinusoidal time embedding, cross-attention down / mid /
//! up blocks with skip connections, every size read from `unet/config.json`.
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::sd::config::{BlockConfig, BlockKind, UNetConfig};
use crate::nn::{Conv2d, GroupNorm, Linear, Mode};
use crate::sd::unet_blocks::{Downsample2D, ResnetBlock2D, ResnetSpec, Transformer2D, TransformerSpec, Upsample2D};
use crate::nn::weights::Weights;

/// Sinusoidal timestep features as diffusers' `get_timestep_embedding`, computed in f32:
/// freq_i = exp(-ln(10000) * i / (half - shift)), features = [sin(t f), cos(t f)], or
/// [cos, sin] when `flip_sin_to_cos`.
pub fn timestep_embedding(timesteps: &[f64], dim: usize, flip_sin_to_cos: bool, shift: f64, device: &Device) -> Result<Tensor> {
    let half = dim / 2;
    let log_max = -(10000f64.ln() as f32);
    let denom = half as f32 - shift as f32;
    let freqs: Vec<f32> = (0..half).map(|i| ((log_max * i as f32) / denom).exp()).collect();
    let mut data = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let args: Vec<f32> = freqs.iter().map(|f| t as f32 * f).collect();
        let (first, second): (Vec<f32>, Vec<f32>) =
            (args.iter().map(|a| a.sin()).collect(), args.iter().map(|a| a.cos()).collect());
        if flip_sin_to_cos {
            data.extend(second);
            data.extend(first);
        } else {
            data.extend(first);
            data.extend(second);
        }
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Ok(Tensor::from_vec(data, (timesteps.len(), dim), device)?)
}

#[derive(Clone, Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<Downsample2D>,
}

#[derive(Clone, Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<Upsample2D>,
}

#[derive(Clone, Debug)]
struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
}

#[derive(Clone, Debug)]
pub struct UNet {
    pub config: UNetConfig,
    time_linear_1: Linear,
    time_linear_2: Linear,
    conv_in: Conv2d,
    down: Vec<DownBlock>,
    mid: MidBlock,
    up: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    dtype: DType,
}

impl UNet {
    pub fn load(w: &Weights, config: &UNetConfig, mode: Mode) -> Result<Self> {
        let c = config;
        let ch0 = c.block_out_channels[0];
        let temb = c.time_embed_dim;
        let resnet = |cin: usize, cout: usize, scale: f64| ResnetSpec {
            in_channels: cin,
            out_channels: cout,
            temb_channels: Some(temb),
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            act: c.act,
            output_scale_factor: scale,
        };
        let transformer = |b: &BlockConfig, channels: usize| TransformerSpec {
            channels,
            heads: b.heads,
            layers: b.transformer_layers,
            context_dim: b.cross_attention_dim,
            groups: c.norm_num_groups,
            linear_projection: c.use_linear_projection,
            only_cross_attention: b.only_cross_attention,
        };
        let n = c.down.len();

        let mut down = Vec::with_capacity(n);
        let mut cout = ch0;
        for (i, b) in c.down.iter().enumerate() {
            let wb = w.pp("down_blocks").pp(i);
            let cin = cout;
            cout = b.out_channels;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..b.layers {
                let rin = if j == 0 { cin } else { cout };
                resnets.push(ResnetBlock2D::load(&wb.pp("resnets").pp(j), &resnet(rin, cout, c.resnet_out_scale_factor))?);
                if b.kind == BlockKind::CrossAttn {
                    attentions.push(Transformer2D::load(&wb.pp("attentions").pp(j), &transformer(b, cout), mode)?);
                }
            }
            let downsampler = if i + 1 < n {
                Some(Downsample2D::load(&wb.pp("downsamplers").pp(0), cout, c.downsample_padding)?)
            } else {
                None
            };
            down.push(DownBlock { resnets, attentions, downsampler });
        }

        let last = *c.block_out_channels.last().unwrap();
        let wm = w.pp("mid_block");
        let mut mid = MidBlock { resnets: Vec::new(), attentions: Vec::new() };
        mid.resnets.push(ResnetBlock2D::load(&wm.pp("resnets").pp(0), &resnet(last, last, c.mid_block_scale_factor))?);
        mid.attentions.push(Transformer2D::load(&wm.pp("attentions").pp(0), &transformer(&c.mid, last), mode)?);
        mid.resnets.push(ResnetBlock2D::load(&wm.pp("resnets").pp(1), &resnet(last, last, c.mid_block_scale_factor))?);

        let mut up = Vec::with_capacity(n);
        let rev: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let mut prev_out = rev[0];
        for (i, b) in c.up.iter().enumerate() {
            let wb = w.pp("up_blocks").pp(i);
            let out_ch = rev[i];
            let in_ch = rev[(i + 1).min(n - 1)];
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..b.layers {
                let skip = if j == b.layers - 1 { in_ch } else { out_ch };
                let rin = if j == 0 { prev_out } else { out_ch };
                resnets.push(ResnetBlock2D::load(&wb.pp("resnets").pp(j), &resnet(rin + skip, out_ch, c.resnet_out_scale_factor))?);
                if b.kind == BlockKind::CrossAttn {
                    attentions.push(Transformer2D::load(&wb.pp("attentions").pp(j), &transformer(b, out_ch), mode)?);
                }
            }
            let upsampler = if i + 1 < n { Some(Upsample2D::load(&wb.pp("upsamplers").pp(0), out_ch)?) } else { None };
            up.push(UpBlock { resnets, attentions, upsampler });
            prev_out = out_ch;
        }

        Ok(UNet {
            config: c.clone(),
            time_linear_1: Linear::load(&w.pp("time_embedding").pp("linear_1"), ch0, temb, true)?,
            time_linear_2: Linear::load(&w.pp("time_embedding").pp("linear_2"), temb, temb, true)?,
            conv_in: Conv2d::load(&w.pp("conv_in"), c.in_channels, ch0, c.conv_in_kernel, 1, c.conv_in_kernel / 2)?,
            down,
            mid,
            up,
            conv_norm_out: GroupNorm::load(&w.pp("conv_norm_out"), c.norm_num_groups, ch0, c.norm_eps)?,
            conv_out: Conv2d::load(&w.pp("conv_out"), ch0, c.out_channels, c.conv_out_kernel, 1, c.conv_out_kernel / 2)?,
            dtype: w.dtype(),
        })
    }

    /// Predicts noise for `sample` [b, in, h, w] at one timestep per batch element (or one for
    /// all), conditioned on `context` [b, tokens, cross_attention_dim].
    pub fn forward(&self, sample: &Tensor, timesteps: &[f64], context: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = sample.dims4()?;
        let ts: Vec<f64> = match timesteps.len() {
            1 => vec![timesteps[0]; b],
            n if n == b => timesteps.to_vec(),
            n => return Err(Error::invalid(format!("{n} timesteps for a batch of {b}"))),
        };
        if context.dim(0)? != b {
            return Err(Error::invalid(format!("context batch {} != sample batch {b}", context.dim(0)?)));
        }
        let c = &self.config;
        let t_feat = timestep_embedding(&ts, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift, sample.device())?
            .to_dtype(self.dtype)?;
        let emb = self.time_linear_2.forward(&c.act.forward(&self.time_linear_1.forward(&t_feat)?)?)?;

        let mut x = self.conv_in.forward(sample)?;
        let mut skips = vec![x.clone()];
        for block in &self.down {
            for (j, resnet) in block.resnets.iter().enumerate() {
                x = resnet.forward(&x, Some(&emb))?;
                if let Some(attn) = block.attentions.get(j) {
                    x = attn.forward(&x, context)?;
                }
                skips.push(x.clone());
            }
            if let Some(ds) = &block.downsampler {
                x = ds.forward(&x)?;
                skips.push(x.clone());
            }
        }

        x = self.mid.resnets[0].forward(&x, Some(&emb))?;
        for (attn, resnet) in self.mid.attentions.iter().zip(&self.mid.resnets[1..]) {
            x = attn.forward(&x, context)?;
            x = resnet.forward(&x, Some(&emb))?;
        }

        for block in &self.up {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().expect("one skip per up-block resnet");
                x = Tensor::cat(&[&x, &skip], 1)?;
                x = resnet.forward(&x, Some(&emb))?;
                if let Some(attn) = block.attentions.get(j) {
                    x = attn.forward(&x, context)?;
                }
            }
            if let Some(us) = &block.upsampler {
                let size = skips.last().map(|s| (s.dim(2).unwrap_or(0), s.dim(3).unwrap_or(0)));
                x = us.forward(&x, size)?;
            }
        }
        debug_assert!(skips.is_empty());
        let _ = (h, w);
        let x = c.act.forward(&self.conv_norm_out.forward(&x)?)?;
        self.conv_out.forward(&x)
    }

    /// Convenience: one integer timestep for the whole batch.
    pub fn forward_t(&self, sample: &Tensor, t: usize, context: &Tensor) -> Result<Tensor> {
        self.forward(sample, &[t as f64], context)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &candle_core::Device {
        self.conv_in.weight.device()
    }

    /// Every attention projection (`to_q`, `to_k`, `to_v`, `to_out.0`) with its checkpoint
    /// module path, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`: the
    /// layers LoRA adapters attach to.
    pub fn attention_projections_mut(&mut self) -> Vec<(String, &mut Linear)> {
        fn visit<'a>(prefix: String, attns: &'a mut [Transformer2D], out: &mut Vec<(String, &'a mut Linear)>) {
            for (j, t) in attns.iter_mut().enumerate() {
                for (k, block) in t.blocks_mut().iter_mut().enumerate() {
                    for (attn_name, attn) in block.attentions_mut() {
                        for (proj_name, lin) in attn.projections_mut() {
                            out.push((format!("{prefix}.attentions.{j}.transformer_blocks.{k}.{attn_name}.{proj_name}"), lin));
                        }
                    }
                }
            }
        }
        let mut out = Vec::new();
        for (i, b) in self.down.iter_mut().enumerate() {
            visit(format!("down_blocks.{i}"), &mut b.attentions, &mut out);
        }
        visit("mid_block".to_string(), &mut self.mid.attentions, &mut out);
        for (i, b) in self.up.iter_mut().enumerate() {
            visit(format!("up_blocks.{i}"), &mut b.attentions, &mut out);
        }
        out
    }
}
