//! Building blocks shared by the UNet and the VAE, named and wired as in diffusers
//! (`ResnetBlock2D`, `Downsample2D`, `Upsample2D`, `Attention`, `BasicTransformerBlock`,
//! `Transformer2DModel`), so checkpoint keys map one to one onto struct fields.
use candle_core::Tensor;

use crate::error::Result;
use crate::instrument::profile::{scope, Class};
use crate::nn::linear::Pointwise;
use crate::nn::{attention, fast_ok, geglu, Activation, Conv2d, ConvInput, GroupNorm, LayerNorm, Linear, Mode, Weights};

/// diffusers' `ResnetBlock2D` (time-scale-shift "default"): two GroupNorm-act-conv stages, the
/// projected time embedding added in between, a 1x1 shortcut when channels change.
#[derive(Clone, Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    act: Activation,
    output_scale_factor: f64,
}

pub struct ResnetSpec {
    pub in_channels: usize,
    pub out_channels: usize,
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub act: Activation,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn load(w: &Weights, s: &ResnetSpec) -> Result<Self> {
        let (cin, cout) = (s.in_channels, s.out_channels);
        Ok(ResnetBlock2D {
            norm1: GroupNorm::load(&w.pp("norm1"), s.groups, cin, s.eps)?,
            conv1: Conv2d::load(&w.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj: match s.temb_channels {
                Some(t) => Some(Linear::load(&w.pp("time_emb_proj"), t, cout, true)?),
                None => None,
            },
            norm2: GroupNorm::load(&w.pp("norm2"), s.groups, cout, s.eps)?,
            conv2: Conv2d::load(&w.pp("conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut: if cin != cout { Some(Conv2d::load(&w.pp("conv_shortcut"), cin, cout, 1, 1, 0)?) } else { None },
            act: s.act,
            output_scale_factor: s.output_scale_factor,
        })
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        if self.fast(x, temb) {
            return self.forward_fused(x, temb);
        }
        let mut h = self.conv1.forward(&self.norm1.forward_act(x, self.act)?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&self.act.forward(temb)?)?;
            h = scope(Class::Elementwise, || h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?))?;
        }
        let h = self.conv2.forward(&self.norm2.forward_act(&h, self.act)?)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        scope(Class::Elementwise, || {
            let out = (skip + h)?;
            Ok(if self.output_scale_factor != 1.0 { (out / self.output_scale_factor)? } else { out })
        })
    }

    fn fast(&self, x: &Tensor, temb: Option<&Tensor>) -> bool {
        let p = |t: &Tensor| fast_ok(&[t]);
        p(x) && temb.is_none_or(p)
            && [&self.norm1, &self.norm2].iter().all(|n| p(&n.weight) && p(&n.bias))
            && self.conv1.fast(x)
            && self.conv2.fast(x)
            && self.conv_shortcut.as_ref().is_none_or(|c| c.fast(x))
            && self.time_emb_proj.as_ref().is_none_or(|l| l.fast(x))
    }

    /// The same function in fused kernels: norm+act in one pass, the time embedding folded
    /// into conv1's bias, the residual add and output scale into conv2's epilogue.
    fn forward_fused(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let pad = |c: &Conv2d| ConvInput { upsample: None, pad: (c.padding, c.padding, c.padding, c.padding) };
        let t = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => Some(proj.forward(&self.act.forward(temb)?)?),
            _ => None,
        };
        let h = self.norm1.forward_act(x, self.act)?;
        let h = self.conv1.forward_ext(&h, pad(&self.conv1), t.as_ref(), None, 1.0)?;
        let h = self.norm2.forward_act(&h, self.act)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        self.conv2.forward_ext(&h, pad(&self.conv2), None, Some(&skip), self.output_scale_factor)
    }
}

/// diffusers' `Downsample2D` with a conv: stride 2, padding `padding`; padding 0 means the
/// asymmetric (0, 1, 0, 1) zero pad the VAE encoder uses.
#[derive(Clone, Debug)]
pub struct Downsample2D {
    conv: Conv2d,
    asymmetric_pad: bool,
}

impl Downsample2D {
    pub fn load(w: &Weights, channels: usize, padding: usize) -> Result<Self> {
        Ok(Downsample2D { conv: Conv2d::load(&w.pp("conv"), channels, channels, 3, 2, padding)?, asymmetric_pad: padding == 0 })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.conv.fast(x) {
            let p = self.conv.padding;
            let pad = if self.asymmetric_pad { (0, 0, 1, 1) } else { (p, p, p, p) };
            return self.conv.forward_ext(x, ConvInput { upsample: None, pad }, None, None, 1.0);
        }
        if self.asymmetric_pad {
            let x = scope(Class::Layout, || x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1))?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// diffusers' `Upsample2D` with a conv: nearest-neighbour resize, then 3x3 conv.
#[derive(Clone, Debug)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn load(w: &Weights, channels: usize) -> Result<Self> {
        Ok(Upsample2D { conv: Conv2d::load(&w.pp("conv"), channels, channels, 3, 1, 1)? })
    }

    /// `size` is the target (h, w); the UNet passes the skip connection's size so odd latent
    /// sizes round-trip, as diffusers does with `upsample_size`.
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        if self.conv.fast(x) {
            let p = self.conv.padding;
            return self.conv.forward_ext(x, ConvInput { upsample: Some((th, tw)), pad: (p, p, p, p) }, None, None, 1.0);
        }
        self.conv.forward(&crate::nn::conv::upsample_nearest(x, th, tw)?)
    }
}

/// diffusers' `Attention` for the UNet's transformer blocks: bias-free q/k/v, `to_out.0` with bias.
#[derive(Clone, Debug)]
pub struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    mode: Mode,
}

impl CrossAttention {
    pub fn load(w: &Weights, query_dim: usize, context_dim: usize, heads: usize, dim_head: usize, mode: Mode) -> Result<Self> {
        let inner = heads * dim_head;
        Ok(CrossAttention {
            to_q: Linear::load(&w.pp("to_q"), query_dim, inner, false)?.in_major()?,
            to_k: Linear::load(&w.pp("to_k"), context_dim, inner, false)?.in_major()?,
            to_v: Linear::load(&w.pp("to_v"), context_dim, inner, false)?.in_major()?,
            to_out: Linear::load(&w.pp("to_out").pp(0), inner, query_dim, true)?.in_major()?,
            heads,
            mode,
        })
    }

    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        self.forward_residual(x, context, None)
    }

    /// `forward(x, context) + residual`, the add fused into `to_out` when possible.
    fn forward_residual(&self, x: &Tensor, context: Option<&Tensor>, residual: Option<&Tensor>) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(ctx)?;
        let v = self.to_v.forward(ctx)?;
        self.to_out.forward_residual(&attention(&q, &k, &v, self.heads, None, self.mode, self.to_q.precision)?, residual)
    }

    /// The four projections, for attaching adapters (LoRA) by name.
    pub fn projections_mut(&mut self) -> [(&'static str, &mut Linear); 4] {
        [("to_q", &mut self.to_q), ("to_k", &mut self.to_k), ("to_v", &mut self.to_v), ("to_out.0", &mut self.to_out)]
    }
}

/// `FeedForward` with GEGLU: proj to 2*inner, value * gelu(gate), project back.
#[derive(Clone, Debug)]
pub struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    pub fn load(w: &Weights, dim: usize, mult: usize) -> Result<Self> {
        let inner = dim * mult;
        Ok(FeedForward {
            proj: Linear::load(&w.pp("net").pp(0).pp("proj"), dim, inner * 2, true)?.in_major()?,
            out: Linear::load(&w.pp("net").pp(2), inner, dim, true)?.in_major()?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_residual(x, None)
    }

    /// `forward(x) + residual`: GEGLU in one pass and the add fused into the output layer
    /// when nothing tracks gradients.
    fn forward_residual(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        if self.proj.fast(x) {
            let h = self.proj.forward(x)?;
            if fast_ok(&[&h]) {
                return self.out.forward_residual(&geglu(&h)?, residual);
            }
        }
        let y = self.forward_composed(x)?;
        Ok(match residual {
            Some(r) => scope(Class::Elementwise, || y + r)?,
            None => y,
        })
    }

    fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.proj.forward(x)?;
        self.out.forward(&crate::nn::activation::geglu_trainable(&h)?)
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward, each pre-LN
/// with a residual.
#[derive(Clone, Debug)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff: FeedForward,
    only_cross_attention: bool,
}

impl BasicTransformerBlock {
    pub fn load(w: &Weights, dim: usize, heads: usize, dim_head: usize, context_dim: usize, only_cross: bool, mode: Mode) -> Result<Self> {
        let attn1_ctx = if only_cross { context_dim } else { dim };
        Ok(BasicTransformerBlock {
            norm1: LayerNorm::load(&w.pp("norm1"), dim, 1e-5, mode)?,
            attn1: CrossAttention::load(&w.pp("attn1"), dim, attn1_ctx, heads, dim_head, mode)?,
            norm2: LayerNorm::load(&w.pp("norm2"), dim, 1e-5, mode)?,
            attn2: CrossAttention::load(&w.pp("attn2"), dim, context_dim, heads, dim_head, mode)?,
            norm3: LayerNorm::load(&w.pp("norm3"), dim, 1e-5, mode)?,
            ff: FeedForward::load(&w.pp("ff"), dim, 4)?,
            only_cross_attention: only_cross,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let ctx1 = if self.only_cross_attention { Some(context) } else { None };
        if fast_ok(&[x, context]) {
            // Residual adds fused into to_out / ff.out (they fall back to a separate add when
            // a weight tracks gradients).
            let x = self.attn1.forward_residual(&self.norm1.forward(x)?, ctx1, Some(x))?;
            let x = self.attn2.forward_residual(&self.norm2.forward(&x)?, Some(context), Some(&x))?;
            return self.ff.forward_residual(&self.norm3.forward(&x)?, Some(&x));
        }
        let a = self.attn1.forward(&self.norm1.forward(x)?, ctx1)?;
        let x = scope(Class::Elementwise, || a + x)?;
        let a = self.attn2.forward(&self.norm2.forward(&x)?, Some(context))?;
        let x = scope(Class::Elementwise, || a + &x)?;
        let f = self.ff.forward(&self.norm3.forward(&x)?)?;
        Ok(scope(Class::Elementwise, || f + &x)?)
    }

    pub fn attentions_mut(&mut self) -> [(&'static str, &mut CrossAttention); 2] {
        [("attn1", &mut self.attn1), ("attn2", &mut self.attn2)]
    }
}

/// Input/output projection of `Transformer2DModel`: a 1x1 conv on NCHW or a linear layer on
/// tokens, per `use_linear_projection`.
#[derive(Clone, Debug)]
enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

/// `Transformer2DModel` for continuous inputs: GroupNorm (eps 1e-6), proj_in, transformer
/// blocks over the h*w tokens, proj_out, residual.
#[derive(Clone, Debug)]
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
}

pub struct TransformerSpec {
    pub channels: usize,
    pub heads: usize,
    pub layers: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub linear_projection: bool,
    pub only_cross_attention: bool,
}

impl Transformer2D {
    pub fn load(w: &Weights, s: &TransformerSpec, mode: Mode) -> Result<Self> {
        let c = s.channels;
        let dim_head = c / s.heads;
        let proj = |name: &str| -> Result<Proj> {
            Ok(if s.linear_projection {
                Proj::Linear(Linear::load(&w.pp(name), c, c, true)?)
            } else {
                Proj::Conv(Conv2d::load(&w.pp(name), c, c, 1, 1, 0)?)
            })
        };
        let blocks = (0..s.layers)
            .map(|i| {
                BasicTransformerBlock::load(&w.pp("transformer_blocks").pp(i), c, s.heads, dim_head, s.context_dim, s.only_cross_attention, mode)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Transformer2D { norm: GroupNorm::load(&w.pp("norm"), s.groups, c, 1e-6)?, proj_in: proj("proj_in")?, blocks, proj_out: proj("proj_out")? })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        // The fused proj_out records no backward: a context that tracks gradients (textual
        // inversion) must take the composed path, or the gradient would stop here.
        if self.fast(x) && fast_ok(&[context]) {
            return self.forward_fused(x, context);
        }
        let (b, c, h, w) = x.dims4()?;
        let to_tokens =
            |t: &Tensor| -> Result<Tensor> { scope(Class::Layout, || Ok(t.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?)) };
        let to_image = |t: &Tensor| -> Result<Tensor> {
            scope(Class::Layout, || Ok(t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()?))
        };
        let hn = self.norm.forward(x)?;
        let mut tokens = match &self.proj_in {
            Proj::Conv(conv) => to_tokens(&conv.forward(&hn)?)?,
            Proj::Linear(lin) => lin.forward(&to_tokens(&hn)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let out = match &self.proj_out {
            Proj::Conv(conv) => conv.forward(&to_image(&tokens)?)?,
            Proj::Linear(lin) => to_image(&lin.forward(&tokens)?)?,
        };
        Ok(scope(Class::Elementwise, || out + x)?)
    }

    fn pointwise(p: &Proj) -> Pointwise<'_> {
        match p {
            Proj::Conv(c) => c.pointwise(),
            Proj::Linear(l) => l.pointwise(),
        }
    }

    fn fast(&self, x: &Tensor) -> bool {
        let ok = |p: &Proj| {
            let pw = Self::pointwise(p);
            fast_ok(&[pw.weight]) && pw.bias.is_none_or(|b| fast_ok(&[b]))
        };
        fast_ok(&[x, &self.norm.weight, &self.norm.bias]) && ok(&self.proj_in) && ok(&self.proj_out)
    }

    /// proj_in reads the normalised NCHW map as tokens and proj_out writes NCHW plus the
    /// residual, with the transposes folded into the products (1x1 conv and linear projection
    /// are the same product).
    fn forward_fused(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let hn = self.norm.forward(x)?;
        let mut tokens = Self::pointwise(&self.proj_in).to_tokens(&hn)?;
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        Self::pointwise(&self.proj_out).from_tokens(&tokens, h, w, Some(x))
    }

    pub fn blocks_mut(&mut self) -> &mut [BasicTransformerBlock] {
        &mut self.blocks
    }
}

/// The VAE's single-head spatial self-attention (`Attention` with `group_norm`, biased q/k/v,
/// residual). Accepts both key namings: `to_q/to_k/to_v/to_out.0` and the old
/// `query/key/value/proj_attn` (the aliases are registered on the VAE's [`Weights`]).
#[derive(Clone, Debug)]
pub struct SpatialSelfAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    mode: Mode,
}

impl SpatialSelfAttention {
    pub fn load(w: &Weights, channels: usize, groups: usize, eps: f64, mode: Mode) -> Result<Self> {
        Ok(SpatialSelfAttention {
            group_norm: GroupNorm::load(&w.pp("group_norm"), groups, channels, eps)?,
            to_q: Linear::load(&w.pp("to_q"), channels, channels, true)?,
            to_k: Linear::load(&w.pp("to_k"), channels, channels, true)?,
            to_v: Linear::load(&w.pp("to_v"), channels, channels, true)?,
            to_out: Linear::load(&w.pp("to_out").pp(0), channels, channels, true)?,
            mode,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if [&self.to_q, &self.to_k, &self.to_v, &self.to_out].iter().all(|l| l.fast(x)) {
            let hn = self.group_norm.forward(x)?;
            let proj = |l: &Linear| l.pointwise().to_tokens(&hn);
            let (q, k, v) = (proj(&self.to_q)?, proj(&self.to_k)?, proj(&self.to_v)?);
            let a = attention(&q, &k, &v, 1, None, self.mode, self.to_q.precision)?;
            return self.to_out.pointwise().from_tokens(&a, h, w, Some(x));
        }
        let hn = self.group_norm.forward(x)?;
        let tokens = scope(Class::Layout, || hn.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous())?;
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        let out = self.to_out.forward(&attention(&q, &k, &v, 1, None, self.mode, self.to_q.precision)?)?;
        let out = scope(Class::Layout, || out.transpose(1, 2)?.reshape((b, c, h, w)))?;
        Ok(scope(Class::Elementwise, || out + x)?)
    }
}
