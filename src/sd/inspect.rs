//! Model folder inspection for `diffii info`.
//!
//! [`inspect`] describes a diffusers SD-1.x folder without loading any weights: configs are
//! parsed with the same structs the loader uses (so an unsupported setting is reported exactly
//! as a load would report it), and safetensors files are memory-mapped only to read their
//! headers (names, shapes, dtypes). The result serialises to JSON and prints as text.
use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde::Serialize;
use serde_json::Value;

use crate::error::{read_json, Error, Result};
use crate::schedule::ddim::DdimConfig;
use crate::sd::concepts::Concepts;
use crate::sd::config::{BlockConfig, BlockKind, ClipConfig, UNetConfig, VaeConfig};
use crate::sd::loader::weights_file;
use crate::nn::Activation;
use crate::sd::tokenizer::ClipTokenizer;
use crate::nn::weights::Weights;

/// Everything `diffii info` reports about a model folder.
#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    pub dir: PathBuf,
    /// In folder order: tokenizer, text_encoder, unet, vae, scheduler, then concepts if present.
    pub components: Vec<ComponentInfo>,
    pub unet: UNetInfo,
    pub vae: VaeInfo,
    pub text_encoder: ClipInfo,
    pub tokenizer: TokenizerInfo,
    pub scheduler: SchedulerInfo,
    /// Latent side and channels the UNet works on (`unet.sample_size`, `unet.in_channels`).
    pub latent_size: usize,
    pub latent_channels: usize,
    /// Pixel side implied by the latent size: `latent_size * vae.spatial_factor`.
    pub image_size: usize,
    /// Inconsistencies that would make loading fail or results wrong, though each file parses.
    pub warnings: Vec<String>,
}

/// One sub-folder of the model.
#[derive(Clone, Debug, Serialize)]
pub struct ComponentInfo {
    pub name: String,
    /// Class named in `model_index.json` (`None` for `concepts`, which diffusers does not list).
    pub class: Option<String>,
    /// Config and vocabulary files, with their sizes.
    pub files: Vec<FileInfo>,
    pub weights: Option<WeightsInfo>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FileInfo {
    pub path: PathBuf,
    pub bytes: u64,
}

/// What a safetensors file holds, from its header alone.
#[derive(Clone, Debug, Serialize)]
pub struct WeightsInfo {
    pub path: PathBuf,
    pub bytes: u64,
    /// Distinct stored dtypes (`f32`, `f16`, ...), sorted.
    pub dtypes: Vec<String>,
    pub tensors: usize,
    /// Sum of the element counts of all tensors.
    pub params: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct UNetInfo {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub mid_block_type: String,
    pub up_block_types: Vec<String>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: Vec<usize>,
    /// Attention heads per down block (up blocks use them reversed), and in the mid block.
    pub heads_per_block: Vec<usize>,
    pub mid_heads: usize,
    pub transformer_layers_per_block: Vec<usize>,
    pub cross_attention_dim: Vec<usize>,
    pub use_linear_projection: bool,
    pub sample_size: usize,
    pub time_embed_dim: usize,
    pub norm_num_groups: usize,
    pub act: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct VaeInfo {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    /// Pixels per latent cell along one side.
    pub spatial_factor: usize,
    pub scaling_factor: f64,
    pub sample_size: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct ClipInfo {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub activation: String,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct TokenizerInfo {
    /// Base vocabulary, without concept tokens.
    pub vocab_size: usize,
    pub bos_id: u32,
    pub eos_id: u32,
    pub pad_id: u32,
    pub max_length: usize,
    /// Concept tokens the loader adds, with the ids they get.
    pub concept_tokens: Vec<ConceptToken>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ConceptToken {
    pub token: String,
    pub id: u32,
    /// Class names mapped to this token in `concepts.json`.
    pub classes: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SchedulerInfo {
    /// `_class_name` of `scheduler_config.json`; sampling always uses DDIM with its settings.
    pub class: Option<String>,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: String,
    pub timestep_spacing: String,
    pub steps_offset: usize,
    pub set_alpha_to_one: bool,
    pub prediction_type: String,
    pub clip_sample: bool,
}

fn file_info(path: &Path) -> Result<FileInfo> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    Ok(FileInfo { path: path.to_path_buf(), bytes: meta.len() })
}

/// Header-only summary of a safetensors file (memory-mapped, never read in full).
pub fn weights_info(path: &Path) -> Result<WeightsInfo> {
    let w = Weights::from_file(path, DType::F32, &Device::Cpu)?;
    let infos = w.tensor_infos()?;
    if infos.is_empty() {
        return Err(Error::bad_file(path, "holds no tensors"));
    }
    let params = infos.iter().map(|(_, shape, _)| shape.iter().product::<usize>() as u64).sum();
    let dtypes: BTreeSet<&str> = infos.iter().map(|(_, _, dt)| dt.as_str()).collect();
    Ok(WeightsInfo {
        path: path.to_path_buf(),
        bytes: file_info(path)?.bytes,
        dtypes: dtypes.into_iter().map(String::from).collect(),
        tensors: infos.len(),
        params,
    })
}

fn activation_name(a: Activation) -> &'static str {
    match a {
        Activation::Silu => "silu",
        Activation::Gelu => "gelu",
        Activation::GeluTanh => "gelu_tanh",
        Activation::QuickGelu => "quick_gelu",
    }
}

/// The diffusers class name of a resolved block (the config accepts only these four).
fn block_type(b: &BlockConfig, dir: &str) -> String {
    match b.kind {
        BlockKind::CrossAttn => format!("CrossAttn{dir}Block2D"),
        BlockKind::Plain => format!("{dir}Block2D"),
    }
}

/// The component classes listed in `model_index.json` (`"unet": ["diffusers", "UNet2DConditionModel"]`).
fn model_index(dir: &Path) -> Result<Value> {
    let path = dir.join("model_index.json");
    if !path.is_file() {
        return Err(Error::bad_file(dir, "not a diffusers model folder: model_index.json is missing"));
    }
    read_json(&path)
}

fn class_of(index: &Value, comp: &str) -> Option<String> {
    index.get(comp).and_then(|e| e.get(1)).and_then(|c| c.as_str()).map(String::from)
}

/// Describes the diffusers SD-1.x model in `dir`. Fails, naming the file, on anything the
/// loader would refuse in a config, a missing weights file, or an unreadable safetensors header.
pub fn inspect(dir: &Path) -> Result<ModelInfo> {
    if !dir.is_dir() {
        return Err(Error::bad_file(dir, "no such model folder"));
    }
    let index = model_index(dir)?;
    let mut warnings = Vec::new();
    for (comp, expected) in [
        ("tokenizer", &["CLIPTokenizer", "CLIPTokenizerFast"][..]),
        ("text_encoder", &["CLIPTextModel"][..]),
        ("unet", &["UNet2DConditionModel"][..]),
        ("vae", &["AutoencoderKL"][..]),
    ] {
        let got = class_of(&index, comp);
        if !got.as_deref().is_some_and(|c| expected.contains(&c)) {
            warnings.push(format!("model_index.json: `{comp}` is {got:?}, expected {}", expected[0]));
        }
    }

    let tok_dir = dir.join("tokenizer");
    let mut tokenizer = ClipTokenizer::from_dir(&tok_dir)?;
    let tok_files = ["tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"]
        .iter()
        .map(|n| tok_dir.join(n))
        .filter(|p| p.is_file())
        .map(|p| file_info(&p))
        .collect::<Result<Vec<_>>>()?;

    let clip_cfg_path = dir.join("text_encoder/config.json");
    let clip = ClipConfig::from_file(&clip_cfg_path)?;
    let clip_weights = weights_info(&weights_file(&dir.join("text_encoder"))?)?;

    let unet_cfg_path = dir.join("unet/config.json");
    let unet = UNetConfig::from_file(&unet_cfg_path)?;
    let unet_weights = weights_info(&weights_file(&dir.join("unet"))?)?;

    let vae_cfg_path = dir.join("vae/config.json");
    let vae = VaeConfig::from_file(&vae_cfg_path)?;
    let vae_weights = weights_info(&weights_file(&dir.join("vae"))?)?;

    let sched_path = dir.join("scheduler/scheduler_config.json");
    let sched = DdimConfig::from_file(&sched_path)?;
    let sched_class = read_json::<Value>(&sched_path)?.get("_class_name").and_then(|c| c.as_str()).map(String::from);

    let mut components = vec![
        ComponentInfo {
            name: "tokenizer".into(),
            class: class_of(&index, "tokenizer"),
            files: tok_files,
            weights: None,
        },
        ComponentInfo {
            name: "text_encoder".into(),
            class: class_of(&index, "text_encoder"),
            files: vec![file_info(&clip_cfg_path)?],
            weights: Some(clip_weights),
        },
        ComponentInfo {
            name: "unet".into(),
            class: class_of(&index, "unet"),
            files: vec![file_info(&unet_cfg_path)?],
            weights: Some(unet_weights),
        },
        ComponentInfo {
            name: "vae".into(),
            class: class_of(&index, "vae"),
            files: vec![file_info(&vae_cfg_path)?],
            weights: Some(vae_weights),
        },
        ComponentInfo {
            name: "scheduler".into(),
            class: class_of(&index, "scheduler"),
            files: vec![file_info(&sched_path)?],
            weights: None,
        },
    ];

    // Concepts are tiny, so they are read in full: that is the only way to learn the ids the
    // loader will give them and to catch a row of the wrong width.
    let concepts_file = dir.join("concepts/learned_embeds.safetensors");
    let mut concept_tokens = Vec::new();
    if concepts_file.is_file() {
        let c = Concepts::load(&concepts_file, clip.hidden_size, &Device::Cpu)?;
        let ids = tokenizer.add_concept_tokens(&c.tokens)?;
        for (token, id) in c.tokens.iter().zip(ids) {
            let classes =
                c.class_to_token.iter().filter(|(_, t)| *t == token).map(|(class, _)| class.clone()).collect();
            concept_tokens.push(ConceptToken { token: token.clone(), id, classes });
        }
        let meta = concepts_file.with_file_name("concepts.json");
        let files = if meta.is_file() { vec![file_info(&meta)?] } else { Vec::new() };
        components.push(ComponentInfo {
            name: "concepts".into(),
            class: None,
            files,
            weights: Some(weights_info(&concepts_file)?),
        });
    }

    if tokenizer.vocab_size() != clip.vocab_size {
        warnings.push(format!(
            "tokenizer has {} tokens but text_encoder/config.json says vocab_size {}",
            tokenizer.vocab_size(),
            clip.vocab_size
        ));
    }
    if tokenizer.max_length() > clip.max_position_embeddings {
        warnings.push(format!(
            "tokenizer max length {} exceeds the text encoder's {} positions",
            tokenizer.max_length(),
            clip.max_position_embeddings
        ));
    }
    for (i, b) in unet.down.iter().enumerate() {
        if b.kind == BlockKind::CrossAttn && b.cross_attention_dim != clip.hidden_size {
            warnings.push(format!(
                "unet down block {i} cross_attention_dim {} != text encoder hidden_size {}",
                b.cross_attention_dim, clip.hidden_size
            ));
        }
    }
    if unet.in_channels != vae.latent_channels {
        warnings.push(format!("unet in_channels {} != vae latent_channels {}", unet.in_channels, vae.latent_channels));
    }

    let unet_info = UNetInfo {
        in_channels: unet.in_channels,
        out_channels: unet.out_channels,
        block_out_channels: unet.block_out_channels.clone(),
        down_block_types: unet.down.iter().map(|b| block_type(b, "Down")).collect(),
        mid_block_type: "UNetMidBlock2DCrossAttn".into(),
        up_block_types: unet.up.iter().map(|b| block_type(b, "Up")).collect(),
        layers_per_block: unet.down.iter().map(|b| b.layers).collect(),
        heads_per_block: unet.down.iter().map(|b| b.heads).collect(),
        mid_heads: unet.mid.heads,
        transformer_layers_per_block: unet.down.iter().map(|b| b.transformer_layers).collect(),
        cross_attention_dim: unet.down.iter().map(|b| b.cross_attention_dim).collect(),
        use_linear_projection: unet.use_linear_projection,
        sample_size: unet.sample_size,
        time_embed_dim: unet.time_embed_dim,
        norm_num_groups: unet.norm_num_groups,
        act: activation_name(unet.act).into(),
    };
    let vae_info = VaeInfo {
        in_channels: vae.in_channels,
        out_channels: vae.out_channels,
        block_out_channels: vae.block_out_channels.clone(),
        layers_per_block: vae.layers_per_block,
        latent_channels: vae.latent_channels,
        spatial_factor: vae.spatial_factor(),
        scaling_factor: vae.scaling_factor,
        sample_size: vae.sample_size,
    };
    let clip_info = ClipInfo {
        hidden_size: clip.hidden_size,
        num_hidden_layers: clip.num_hidden_layers,
        num_attention_heads: clip.num_attention_heads,
        intermediate_size: clip.intermediate_size,
        activation: activation_name(clip.act).into(),
        vocab_size: clip.vocab_size,
        max_position_embeddings: clip.max_position_embeddings,
    };
    let tokenizer_info = TokenizerInfo {
        vocab_size: tokenizer.vocab_size(),
        bos_id: tokenizer.bos_id(),
        eos_id: tokenizer.eos_id(),
        pad_id: tokenizer.pad_id(),
        max_length: tokenizer.max_length(),
        concept_tokens,
    };
    let scheduler_info = SchedulerInfo {
        class: sched_class,
        num_train_timesteps: sched.num_train_timesteps,
        beta_start: sched.beta_start,
        beta_end: sched.beta_end,
        beta_schedule: sched.beta_schedule.clone(),
        timestep_spacing: sched.timestep_spacing.clone(),
        steps_offset: sched.steps_offset,
        set_alpha_to_one: sched.set_alpha_to_one,
        prediction_type: sched.prediction_type.clone(),
        clip_sample: sched.clip_sample,
    };
    Ok(ModelInfo {
        dir: dir.to_path_buf(),
        components,
        latent_size: unet.sample_size,
        latent_channels: unet.in_channels,
        image_size: unet.sample_size * vae.spatial_factor(),
        unet: unet_info,
        vae: vae_info,
        text_encoder: clip_info,
        tokenizer: tokenizer_info,
        scheduler: scheduler_info,
        warnings,
    })
}

impl ModelInfo {
    /// Component by name (`"unet"`, `"vae"`, ...).
    pub fn component(&self, name: &str) -> Option<&ComponentInfo> {
        self.components.iter().find(|c| c.name == name)
    }

    /// Parameter count of a component's weights file (0 when it has none).
    pub fn params(&self, name: &str) -> u64 {
        self.component(name).and_then(|c| c.weights.as_ref()).map_or(0, |w| w.params)
    }
}

/// `1106212` -> `1.11M`: a glance value printed beside the exact count.
fn short_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}G", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}k", n as f64 / 1e3),
        n => n.to_string(),
    }
}

fn short_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

fn list<T: fmt::Display>(v: &[T]) -> String {
    v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ")
}

impl fmt::Display for ModelInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rel = |p: &Path| p.strip_prefix(&self.dir).unwrap_or(p).display().to_string();
        writeln!(f, "model    {}", self.dir.display())?;
        writeln!(
            f,
            "size     image {0}x{0} <-> latent {1}x{2}x{2} (unet sample_size {2} x vae factor {3})",
            self.image_size, self.latent_channels, self.latent_size, self.vae.spatial_factor
        )?;

        writeln!(f, "\ncomponents")?;
        for c in &self.components {
            writeln!(f, "  {:<13} {}", c.name, c.class.as_deref().unwrap_or("-"))?;
            if let Some(w) = &c.weights {
                writeln!(
                    f,
                    "    {}  {}  {} tensors  {} params ({})  {}",
                    rel(&w.path),
                    w.dtypes.join("+"),
                    w.tensors,
                    w.params,
                    short_count(w.params),
                    short_bytes(w.bytes)
                )?;
            }
            for file in &c.files {
                writeln!(f, "    {}  {}", rel(&file.path), short_bytes(file.bytes))?;
            }
        }

        let u = &self.unet;
        writeln!(f, "\nunet")?;
        writeln!(f, "  in/out channels          {} / {}", u.in_channels, u.out_channels)?;
        writeln!(f, "  block_out_channels       [{}]", list(&u.block_out_channels))?;
        writeln!(f, "  down_block_types         {}", u.down_block_types.join(", "))?;
        writeln!(f, "  mid_block_type           {}", u.mid_block_type)?;
        writeln!(f, "  up_block_types           {}", u.up_block_types.join(", "))?;
        writeln!(f, "  layers per block         [{}]", list(&u.layers_per_block))?;
        writeln!(f, "  heads per block          [{}] (mid {})", list(&u.heads_per_block), u.mid_heads)?;
        writeln!(f, "  transformer layers       [{}]", list(&u.transformer_layers_per_block))?;
        writeln!(f, "  cross_attention_dim      [{}]", list(&u.cross_attention_dim))?;
        writeln!(f, "  use_linear_projection    {}", u.use_linear_projection)?;
        writeln!(f, "  sample_size              {}", u.sample_size)?;
        writeln!(f, "  time embed dim           {}", u.time_embed_dim)?;
        writeln!(f, "  norm groups / act        {} / {}", u.norm_num_groups, u.act)?;

        let v = &self.vae;
        writeln!(f, "\nvae")?;
        writeln!(f, "  in/out channels          {} / {}", v.in_channels, v.out_channels)?;
        writeln!(f, "  block_out_channels       [{}]", list(&v.block_out_channels))?;
        writeln!(f, "  layers per block         {}", v.layers_per_block)?;
        writeln!(f, "  latent channels          {}", v.latent_channels)?;
        writeln!(f, "  spatial factor           {}", v.spatial_factor)?;
        writeln!(f, "  scaling factor           {}", v.scaling_factor)?;
        writeln!(f, "  sample_size              {}", v.sample_size)?;

        let c = &self.text_encoder;
        writeln!(f, "\ntext_encoder")?;
        writeln!(f, "  hidden size              {}", c.hidden_size)?;
        writeln!(f, "  layers / heads           {} / {}", c.num_hidden_layers, c.num_attention_heads)?;
        writeln!(f, "  intermediate size        {}", c.intermediate_size)?;
        writeln!(f, "  activation               {}", c.activation)?;
        writeln!(f, "  vocab size               {}", c.vocab_size)?;
        writeln!(f, "  max positions            {}", c.max_position_embeddings)?;

        let t = &self.tokenizer;
        writeln!(f, "\ntokenizer")?;
        writeln!(f, "  vocab size               {}", t.vocab_size)?;
        writeln!(f, "  bos / eos / pad ids      {} / {} / {}", t.bos_id, t.eos_id, t.pad_id)?;
        writeln!(f, "  max length               {}", t.max_length)?;
        if t.concept_tokens.is_empty() {
            writeln!(f, "  concept tokens           none")?;
        }
        for ct in &t.concept_tokens {
            let classes = if ct.classes.is_empty() { String::new() } else { format!(" ({})", ct.classes.join(", ")) };
            writeln!(f, "  concept token            {} = {}{classes}", ct.token, ct.id)?;
        }

        let s = &self.scheduler;
        writeln!(f, "\nscheduler ({}; sampled with DDIM)", s.class.as_deref().unwrap_or("class not named"))?;
        writeln!(f, "  num_train_timesteps      {}", s.num_train_timesteps)?;
        writeln!(f, "  beta schedule            {} [{}, {}]", s.beta_schedule, s.beta_start, s.beta_end)?;
        writeln!(f, "  timestep_spacing         {}", s.timestep_spacing)?;
        writeln!(f, "  steps_offset             {}", s.steps_offset)?;
        writeln!(f, "  set_alpha_to_one         {}", s.set_alpha_to_one)?;
        writeln!(f, "  prediction_type          {}", s.prediction_type)?;
        writeln!(f, "  clip_sample              {}", s.clip_sample)?;

        if !self.warnings.is_empty() {
            writeln!(f, "\nwarnings")?;
            for w in &self.warnings {
                writeln!(f, "  {w}")?;
            }
        }
        Ok(())
    }
}
