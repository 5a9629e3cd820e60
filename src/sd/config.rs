//! Component configurations, read from the `config.json` files of a diffusers folder.
//!
//! Each `*File` struct mirrors the JSON (diffusers / transformers field names and defaults);
//! `validate` turns it into the plain config our model code uses, resolving per-block lists and
//! rejecting settings we do not implement with an error that names the file and the key, rather
//! than silently computing something else.
use std::path::Path;

use serde::Deserialize;

use crate::error::{read_json, Error, Result};
use crate::nn::Activation;

/// A JSON value that may be one number or one per block (`attention_head_dim: 8` or `[5, 10, ...]`).
#[derive(Deserialize, Clone, Debug)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    fn per_block(&self, n: usize, path: &Path, key: &str) -> Result<Vec<T>> {
        match self {
            OneOrMany::One(v) => Ok(vec![v.clone(); n]),
            OneOrMany::Many(v) if v.len() == n => Ok(v.clone()),
            OneOrMany::Many(v) => Err(Error::bad_file(
                path,
                format!("`{key}` has {} entries but there are {n} down blocks", v.len()),
            )),
        }
    }
}

fn unsupported(path: &Path, key: &str, value: impl std::fmt::Debug) -> Error {
    Error::bad_file(path, format!("`{key}` = {value:?} is not supported (SD-1.x UNet/VAE/CLIP only)"))
}

fn activation(path: &Path, key: &str, name: &str) -> Result<Activation> {
    Activation::parse(name).ok_or_else(|| unsupported(path, key, name))
}

// ------------------------------------------------------------------------------------------
// UNet
// ------------------------------------------------------------------------------------------

fn d_true() -> bool {
    true
}
fn d_one() -> usize {
    1
}
fn d_groups() -> usize {
    32
}
fn d_eps5() -> f64 {
    1e-5
}
fn d_silu() -> String {
    "silu".into()
}
fn d_scale1() -> f64 {
    1.0
}
fn d_three() -> usize {
    3
}
fn d_four() -> usize {
    4
}
fn d_default() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}
fn d_sample() -> usize {
    64
}
fn d_one_many() -> OneOrMany<usize> {
    OneOrMany::One(1)
}
fn d_false_many() -> OneOrMany<bool> {
    OneOrMany::One(false)
}

/// `unet/config.json` of a `UNet2DConditionModel`.
#[derive(Deserialize, Clone, Debug)]
pub struct UNetConfigFile {
    #[serde(default = "d_four")]
    pub in_channels: usize,
    #[serde(default = "d_four")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub layers_per_block: OneOrMany<usize>,
    pub attention_head_dim: Option<OneOrMany<usize>>,
    pub num_attention_heads: Option<OneOrMany<usize>>,
    pub cross_attention_dim: OneOrMany<usize>,
    #[serde(default = "d_one_many")]
    pub transformer_layers_per_block: OneOrMany<usize>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "d_false_many")]
    pub only_cross_attention: OneOrMany<bool>,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d_eps5")]
    pub norm_eps: f64,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_one")]
    pub downsample_padding: usize,
    #[serde(default = "d_scale1")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_scale1")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "d_sample")]
    pub sample_size: usize,
    #[serde(default = "d_three")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_three")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<usize>,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
    pub time_cond_proj_dim: Option<usize>,
    pub class_embed_type: Option<String>,
    pub num_class_embeds: Option<usize>,
    pub addition_embed_type: Option<String>,
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default = "d_default")]
    pub attention_type: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    CrossAttn,
    Plain,
}

/// One down or up block, fully resolved.
#[derive(Clone, Debug)]
pub struct BlockConfig {
    pub kind: BlockKind,
    pub out_channels: usize,
    /// Resnet layers (up blocks have `layers_per_block + 1`).
    pub layers: usize,
    pub heads: usize,
    pub transformer_layers: usize,
    pub cross_attention_dim: usize,
    pub only_cross_attention: bool,
}

/// The UNet as our code builds it.
#[derive(Clone, Debug)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down: Vec<BlockConfig>,
    pub up: Vec<BlockConfig>,
    pub mid: BlockConfig,
    pub use_linear_projection: bool,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub act: Activation,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub time_embed_dim: usize,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub resnet_out_scale_factor: f64,
    pub sample_size: usize,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
}

impl UNetConfigFile {
    pub fn validate(&self, path: &Path) -> Result<UNetConfig> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::bad_file(
                path,
                "`block_out_channels`, `down_block_types` and `up_block_types` must have the same non-zero length",
            ));
        }
        let checks: [(&str, bool, String); 10] = [
            ("class_embed_type", self.class_embed_type.is_none(), format!("{:?}", self.class_embed_type)),
            ("num_class_embeds", self.num_class_embeds.is_none(), format!("{:?}", self.num_class_embeds)),
            ("addition_embed_type", self.addition_embed_type.is_none(), format!("{:?}", self.addition_embed_type)),
            ("encoder_hid_dim", self.encoder_hid_dim.is_none(), format!("{:?}", self.encoder_hid_dim)),
            ("time_cond_proj_dim", self.time_cond_proj_dim.is_none(), format!("{:?}", self.time_cond_proj_dim)),
            ("timestep_post_act", self.timestep_post_act.is_none(), format!("{:?}", self.timestep_post_act)),
            ("time_embedding_act_fn", self.time_embedding_act_fn.is_none(), format!("{:?}", self.time_embedding_act_fn)),
            ("dual_cross_attention", !self.dual_cross_attention, "true".into()),
            ("time_embedding_type", self.time_embedding_type == "positional", self.time_embedding_type.clone()),
            ("resnet_time_scale_shift", self.resnet_time_scale_shift == "default", self.resnet_time_scale_shift.clone()),
        ];
        for (key, ok, value) in checks {
            if !ok {
                return Err(unsupported(path, key, value));
            }
        }
        if self.attention_type != "default" {
            return Err(unsupported(path, "attention_type", &self.attention_type));
        }
        if self.center_input_sample {
            return Err(unsupported(path, "center_input_sample", true));
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") | None => {}
            Some(other) => return Err(unsupported(path, "mid_block_type", other)),
        }
        for k in [self.conv_in_kernel, self.conv_out_kernel] {
            if k % 2 == 0 {
                return Err(unsupported(path, "conv_in_kernel/conv_out_kernel", k));
            }
        }
        // diffusers' historical naming: `attention_head_dim` holds the number of heads when
        // `num_attention_heads` is not given.
        let (heads_src, heads_key) = match (&self.num_attention_heads, &self.attention_head_dim) {
            (Some(h), _) => (h.clone(), "num_attention_heads"),
            (None, Some(h)) => (h.clone(), "attention_head_dim"),
            (None, None) => (OneOrMany::One(8), "attention_head_dim"),
        };
        let heads = heads_src.per_block(n, path, heads_key)?;
        let layers = self.layers_per_block.per_block(n, path, "layers_per_block")?;
        let cross = self.cross_attention_dim.per_block(n, path, "cross_attention_dim")?;
        let tlayers = self.transformer_layers_per_block.per_block(n, path, "transformer_layers_per_block")?;
        let only_cross = self.only_cross_attention.per_block(n, path, "only_cross_attention")?;
        let act = activation(path, "act_fn", &self.act_fn)?;

        let kind = |t: &str, key: &str| -> Result<BlockKind> {
            match t {
                "CrossAttnDownBlock2D" | "CrossAttnUpBlock2D" => Ok(BlockKind::CrossAttn),
                "DownBlock2D" | "UpBlock2D" => Ok(BlockKind::Plain),
                other => Err(unsupported(path, key, other)),
            }
        };
        let mut down = Vec::with_capacity(n);
        for i in 0..n {
            if !self.down_block_types[i].contains("Down") {
                return Err(unsupported(path, "down_block_types", &self.down_block_types[i]));
            }
            down.push(BlockConfig {
                kind: kind(&self.down_block_types[i], "down_block_types")?,
                out_channels: self.block_out_channels[i],
                layers: layers[i],
                heads: heads[i],
                transformer_layers: tlayers[i],
                cross_attention_dim: cross[i],
                only_cross_attention: only_cross[i],
            });
        }
        let mut up = Vec::with_capacity(n);
        for i in 0..n {
            let r = n - 1 - i;
            if !self.up_block_types[i].contains("Up") {
                return Err(unsupported(path, "up_block_types", &self.up_block_types[i]));
            }
            up.push(BlockConfig {
                kind: kind(&self.up_block_types[i], "up_block_types")?,
                out_channels: self.block_out_channels[r],
                layers: layers[r] + 1,
                heads: heads[r],
                transformer_layers: tlayers[r],
                cross_attention_dim: cross[r],
                only_cross_attention: only_cross[r],
            });
        }
        let mid = BlockConfig {
            kind: BlockKind::CrossAttn,
            out_channels: self.block_out_channels[n - 1],
            layers: 1,
            heads: heads[n - 1],
            transformer_layers: tlayers[n - 1],
            cross_attention_dim: cross[n - 1],
            only_cross_attention: false,
        };
        if self.norm_num_groups == 0 {
            return Err(Error::bad_file(path, "norm_num_groups must be at least 1"));
        }
        for b in down.iter().chain(up.iter()).chain(std::iter::once(&mid)) {
            if b.kind == BlockKind::CrossAttn && (b.heads == 0 || b.out_channels % b.heads != 0) {
                return Err(Error::bad_file(
                    path,
                    format!("{} channels are not divisible by {} attention heads", b.out_channels, b.heads),
                ));
            }
            if b.out_channels % self.norm_num_groups != 0 {
                return Err(Error::bad_file(
                    path,
                    format!("{} channels are not divisible by norm_num_groups {}", b.out_channels, self.norm_num_groups),
                ));
            }
        }
        Ok(UNetConfig {
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            block_out_channels: self.block_out_channels.clone(),
            down,
            up,
            mid,
            use_linear_projection: self.use_linear_projection,
            norm_num_groups: self.norm_num_groups,
            norm_eps: self.norm_eps,
            act,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
            time_embed_dim: self.time_embedding_dim.unwrap_or(self.block_out_channels[0] * 4),
            downsample_padding: self.downsample_padding,
            mid_block_scale_factor: self.mid_block_scale_factor,
            resnet_out_scale_factor: self.resnet_out_scale_factor,
            sample_size: self.sample_size,
            conv_in_kernel: self.conv_in_kernel,
            conv_out_kernel: self.conv_out_kernel,
        })
    }
}

impl UNetConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        read_json::<UNetConfigFile>(path)?.validate(path)
    }

    /// The SD-1.5 UNet (runwayml/stable-diffusion-v1-5 `unet/config.json`), for benchmarks.
    pub fn sd15() -> Self {
        let json = r#"{"act_fn":"silu","attention_head_dim":8,"block_out_channels":[320,640,1280,1280],
            "center_input_sample":false,"cross_attention_dim":768,
            "down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],
            "downsample_padding":1,"flip_sin_to_cos":true,"freq_shift":0,"in_channels":4,"layers_per_block":2,
            "mid_block_scale_factor":1,"norm_eps":1e-05,"norm_num_groups":32,"out_channels":4,"sample_size":64,
            "up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"]}"#;
        let file: UNetConfigFile = serde_json::from_str(json).expect("valid built-in config");
        file.validate(Path::new("<built-in SD-1.5 config>")).expect("valid built-in config")
    }
}

// ------------------------------------------------------------------------------------------
// VAE
// ------------------------------------------------------------------------------------------

fn d_three_ch() -> usize {
    3
}
fn d_sf() -> f64 {
    0.18215
}

/// `vae/config.json` of an `AutoencoderKL`.
#[derive(Deserialize, Clone, Debug)]
pub struct VaeConfigFile {
    #[serde(default = "d_three_ch")]
    pub in_channels: usize,
    #[serde(default = "d_three_ch")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "d_one")]
    pub layers_per_block: usize,
    #[serde(default = "d_four")]
    pub latent_channels: usize,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_sf")]
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
    #[serde(default = "d_sample")]
    pub sample_size: usize,
    pub latents_mean: Option<serde_json::Value>,
}

#[derive(Clone, Debug)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub act: Activation,
    pub scaling_factor: f64,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
    pub sample_size: usize,
}

impl VaeConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let f: VaeConfigFile = read_json(path)?;
        let n = f.block_out_channels.len();
        if n == 0 || f.down_block_types.len() != n || f.up_block_types.len() != n {
            return Err(Error::bad_file(path, "block lists must have the same non-zero length"));
        }
        for t in &f.down_block_types {
            if t != "DownEncoderBlock2D" {
                return Err(unsupported(path, "down_block_types", t));
            }
        }
        for t in &f.up_block_types {
            if t != "UpDecoderBlock2D" {
                return Err(unsupported(path, "up_block_types", t));
            }
        }
        if f.shift_factor.is_some_and(|s| s != 0.0) {
            return Err(unsupported(path, "shift_factor", f.shift_factor));
        }
        if f.latents_mean.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(unsupported(path, "latents_mean", "set"));
        }
        if f.norm_num_groups == 0 {
            return Err(Error::bad_file(path, "norm_num_groups must be at least 1"));
        }
        for &c in &f.block_out_channels {
            if c % f.norm_num_groups != 0 {
                return Err(Error::bad_file(path, format!("{c} channels are not divisible by norm_num_groups")));
            }
        }
        Ok(VaeConfig {
            in_channels: f.in_channels,
            out_channels: f.out_channels,
            block_out_channels: f.block_out_channels,
            layers_per_block: f.layers_per_block,
            latent_channels: f.latent_channels,
            norm_num_groups: f.norm_num_groups,
            act: activation(path, "act_fn", &f.act_fn)?,
            scaling_factor: f.scaling_factor,
            use_quant_conv: f.use_quant_conv,
            use_post_quant_conv: f.use_post_quant_conv,
            mid_block_add_attention: f.mid_block_add_attention,
            sample_size: f.sample_size,
        })
    }

    /// The SD-1.x autoencoder (`AutoencoderKL`, 4 levels of 128-512 channels), for benchmarks.
    pub fn sd15() -> Self {
        VaeConfig {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            act: Activation::Silu,
            scaling_factor: 0.18215,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            sample_size: 512,
        }
    }

    /// Pixels per latent cell along one side (8 for SD-1.5).
    pub fn spatial_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

// ------------------------------------------------------------------------------------------
// CLIP text encoder
// ------------------------------------------------------------------------------------------

fn d_quick_gelu() -> String {
    "quick_gelu".into()
}
fn d_77() -> usize {
    77
}

/// `text_encoder/config.json` of a `CLIPTextModel`.
#[derive(Deserialize, Clone, Debug)]
pub struct ClipConfigFile {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "d_77")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "d_eps5")]
    pub layer_norm_eps: f64,
    /// Some exports nest the text config (CLIPConfig); accept that too.
    pub text_config: Option<Box<ClipConfigFile>>,
}

#[derive(Clone, Debug)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub act: Activation,
    pub layer_norm_eps: f64,
}

impl ClipConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::bad_file(path, format!("invalid JSON: {e}")))?;
        if let Some(tc) = v.get("text_config").filter(|t| t.is_object()).cloned() {
            v = tc;
        }
        let f: ClipConfigFile =
            serde_json::from_value(v).map_err(|e| Error::bad_file(path, format!("invalid CLIP text config: {e}")))?;
        if f.num_attention_heads == 0 || f.hidden_size % f.num_attention_heads != 0 {
            return Err(Error::bad_file(path, "hidden_size must be divisible by num_attention_heads"));
        }
        Ok(ClipConfig {
            vocab_size: f.vocab_size,
            hidden_size: f.hidden_size,
            intermediate_size: f.intermediate_size,
            num_hidden_layers: f.num_hidden_layers,
            num_attention_heads: f.num_attention_heads,
            max_position_embeddings: f.max_position_embeddings,
            act: activation(path, "hidden_act", &f.hidden_act)?,
            layer_norm_eps: f.layer_norm_eps,
        })
    }

    /// The text encoder of SD-1.x (OpenAI CLIP ViT-L/14's text tower), for benchmarks.
    pub fn sd15() -> Self {
        ClipConfig {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            act: activation(Path::new("<built-in SD-1.5 config>"), "hidden_act", "quick_gelu").expect("known activation"),
            layer_norm_eps: 1e-5,
        }
    }
}
