//! Loads a diffusers SD-1.x folder (`model_index.json`, `tokenizer/`, `text_encoder/`,
//! `unet/`, `vae/`, `scheduler/`, optional `concepts/`) into our components. Weights are read
//! from safetensors only; pickled `.bin` checkpoints are refused (loading them runs code).
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::error::{read_json, Error, Result};
use crate::schedule::ddim::DdimConfig;
use crate::sd::clip::ClipTextEncoder;
use crate::sd::concepts::Concepts;
use crate::sd::config::{ClipConfig, UNetConfig, VaeConfig};
use crate::nn::{Mode, Precision};
use crate::sd::tokenizer::ClipTokenizer;
use crate::sd::unet::UNet;
use crate::sd::vae::Vae;
use crate::nn::weights::Weights;

/// How to load a model.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
    pub mode: Mode,
    /// Product precision of every convolution and linear layer (checked against the CPU).
    pub precision: Precision,
    /// Also load `concepts/learned_embeds.safetensors` when the folder has one.
    pub concepts: bool,
    /// Layers skip their frozen weights' gradients in training (see [`crate::nn::frozen`]);
    /// off only to measure the difference.
    pub frozen_ops: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { dtype: DType::F32, device: Device::Cpu, mode: Mode::Infer, precision: Precision::F32, concepts: true, frozen_ops: true }
    }
}

/// Parses `cpu`, `cuda` or `cuda:N`. CUDA needs a build with the `cuda` feature
/// (`scripts/build-cuda.sh`); otherwise the error says so.
pub fn parse_device(s: &str) -> Result<Device> {
    let s = s.trim().to_ascii_lowercase();
    let ordinal = match s.as_str() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" | "gpu" => Some(0),
        _ => s.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()),
    };
    let Some(n) = ordinal else {
        return Err(Error::invalid(format!("unknown device `{s}`: use cpu, cuda or cuda:N")));
    };
    if !cfg!(feature = "cuda") {
        return Err(Error::invalid(format!(
            "device `{s}`: this build has no CUDA support; build with `scripts/build-cuda.sh` \
             (cargo build --release --features cuda) on a machine with a CUDA toolkit"
        )));
    }
    Device::new_cuda(n).map_err(|e| Error::invalid(format!("cannot open CUDA device {n}: {e}")))
}

/// `cpu`, or `cuda:N` with the GPU's name as its driver gives it (for reports).
pub fn device_name(device: &Device) -> String {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let stream = d.cuda_stream();
            let name = stream.context().name().unwrap_or_else(|e| format!("name unknown: {e}"));
            format!("cuda:{} {name}", stream.context().ordinal())
        }
        Device::Cpu => "cpu".into(),
        other => format!("{other:?}"),
    }
}

/// Finds a component's safetensors weights, preferring full precision.
pub fn weights_file(dir: &Path) -> Result<PathBuf> {
    for name in [
        "diffusion_pytorch_model.safetensors",
        "model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "model.fp16.safetensors",
    ] {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    let has_bin = ["diffusion_pytorch_model.bin", "pytorch_model.bin"].iter().any(|n| dir.join(n).is_file());
    let msg = if has_bin {
        "only a pickled .bin checkpoint is present; convert it to safetensors (e.g. diffusers' \
         `save_pretrained(..., safe_serialization=True)`)"
    } else {
        "no diffusion_pytorch_model.safetensors or model.safetensors found"
    };
    Err(Error::bad_file(dir, msg))
}

/// Opens a text encoder's weights, accepting keys with or without the `text_model.` prefix.
pub fn text_encoder_weights(path: &Path, dtype: DType, device: &Device) -> Result<Weights> {
    Ok(Weights::from_file(path, dtype, device)?.with_alias("text_model.", ""))
}

/// Opens a VAE's weights, accepting old attention names (`query/key/value/proj_attn`).
pub fn vae_weights(path: &Path, dtype: DType, device: &Device) -> Result<Weights> {
    Ok(Weights::from_file(path, dtype, device)?
        .with_alias(".to_q.", ".query.")
        .with_alias(".to_k.", ".key.")
        .with_alias(".to_v.", ".value.")
        .with_alias(".to_out.0.", ".proj_attn."))
}

/// Checks that `model_index.json` names the classes we implement.
fn check_model_index(dir: &Path) -> Result<()> {
    let path = dir.join("model_index.json");
    if !path.is_file() {
        return Err(Error::bad_file(dir, "not a diffusers model folder: model_index.json is missing"));
    }
    let v: Value = read_json(&path)?;
    let expect = [
        ("unet", "UNet2DConditionModel"),
        ("vae", "AutoencoderKL"),
        ("text_encoder", "CLIPTextModel"),
        ("tokenizer", "CLIPTokenizer"),
    ];
    for (comp, class) in expect {
        let got = v.get(comp).and_then(|e| e.get(1)).and_then(|c| c.as_str());
        match got {
            Some(c) if c == class || (comp == "tokenizer" && c == "CLIPTokenizerFast") => {}
            other => {
                return Err(Error::bad_file(&path, format!("component `{comp}` is {other:?}, expected {class} (SD-1.x)")))
            }
        }
    }
    Ok(())
}

/// The parts of an SD-1.x model that Diff-II uses.
pub struct StableDiffusion {
    pub dir: PathBuf,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextEncoder,
    pub unet: UNet,
    pub vae: Vae,
    pub scheduler: DdimConfig,
    /// Concept tokens shipped in `concepts/`, already added to the tokenizer.
    pub concepts: Option<Concepts>,
    /// The product precision the model was loaded at.
    pub precision: Precision,
}

impl StableDiffusion {
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        check_model_index(dir)?;
        opts.precision.check(&opts.device)?;
        let (dt, dev, prec) = (opts.dtype, &opts.device, opts.precision);
        let mut tokenizer = ClipTokenizer::from_dir(&dir.join("tokenizer"))?;
        let clip_cfg = ClipConfig::from_file(&dir.join("text_encoder/config.json"))?;
        let tw = text_encoder_weights(&weights_file(&dir.join("text_encoder"))?, dt, dev)?.with_precision(prec).with_frozen_ops(opts.frozen_ops);
        let text_encoder = ClipTextEncoder::load(&tw, &clip_cfg, opts.mode)?;
        let unet_cfg = UNetConfig::from_file(&dir.join("unet/config.json"))?;
        let uw = Weights::from_file(&weights_file(&dir.join("unet"))?, dt, dev)?.with_precision(prec).with_frozen_ops(opts.frozen_ops);
        let unet = UNet::load(&uw, &unet_cfg, opts.mode)?;
        let vae_cfg = VaeConfig::from_file(&dir.join("vae/config.json"))?;
        let vw = vae_weights(&weights_file(&dir.join("vae"))?, dt, dev)?.with_precision(prec).with_frozen_ops(opts.frozen_ops);
        let vae = Vae::load(&vw, &vae_cfg, opts.mode)?;
        let scheduler = DdimConfig::from_file(&dir.join("scheduler/scheduler_config.json"))?;
        if tokenizer.vocab_size() != clip_cfg.vocab_size {
            return Err(Error::bad_file(
                dir.join("tokenizer"),
                format!("has {} tokens but text_encoder/config.json says vocab_size {}", tokenizer.vocab_size(), clip_cfg.vocab_size),
            ));
        }
        let concepts_file = dir.join("concepts/learned_embeds.safetensors");
        let concepts = if opts.concepts && concepts_file.is_file() {
            let c = Concepts::load(&concepts_file, clip_cfg.hidden_size, dev)?;
            tokenizer.add_concept_tokens(&c.tokens)?;
            Some(c)
        } else {
            None
        };
        Ok(StableDiffusion { dir: dir.to_path_buf(), tokenizer, text_encoder, unet, vae, scheduler, concepts, precision: prec })
    }

    /// Adds concept tokens (from any source) to the tokenizer and the text encoder's extra
    /// rows. Fails if the model already carries concepts: pass `concepts: false` to
    /// [`LoadOptions`] when supplying your own.
    pub fn add_concepts(&mut self, concepts: Concepts) -> Result<()> {
        if self.concepts.is_some() {
            return Err(Error::invalid("the model folder already provides concepts/; load it with concepts disabled"));
        }
        let hidden = self.text_encoder.config.hidden_size;
        if concepts.rows.dim(1)? != hidden {
            return Err(Error::invalid(format!("concept rows have {} values, the text encoder needs {hidden}", concepts.rows.dim(1)?)));
        }
        self.tokenizer.add_concept_tokens(&concepts.tokens)?;
        self.concepts = Some(concepts);
        Ok(())
    }

    /// SHA-256 over the model's weight, config and tokenizer files (what a generated image
    /// depends on), for manifests and cache keys.
    pub fn fingerprint(&self) -> Result<String> {
        model_fingerprint(&self.dir)
    }

    /// Extra embedding rows for the added concept tokens, in the model's dtype.
    pub fn concept_rows(&self) -> Result<Option<Tensor>> {
        Ok(match &self.concepts {
            Some(c) => Some(c.rows.to_dtype(self.unet.dtype())?),
            None => None,
        })
    }

    /// Text-encoder features [1, 77, hidden] of a prompt (concept tokens resolved); a prompt
    /// longer than the encoder reads is an error, not truncated.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Tensor> {
        self.tokenizer.check_fits(prompt)?;
        let ids = self.tokenizer.encode(prompt)?;
        let n = ids.len();
        let ids = Tensor::from_vec(ids, (1, n), self.unet_device())?;
        self.text_encoder.forward(&ids, self.concept_rows()?.as_ref())
    }

    pub fn unet_device(&self) -> &Device {
        self.text_encoder.token_embedding().device()
    }
}

/// SHA-256 of a model folder's content: every file the loader reads, hashed in parallel, then
/// combined in a fixed order.
pub fn model_fingerprint(dir: &Path) -> Result<String> {
    use rayon::prelude::*;
    use sha2::{Digest, Sha256};
    let mut files = vec![dir.join("scheduler/scheduler_config.json")];
    for comp in ["text_encoder", "unet", "vae"] {
        files.push(dir.join(comp).join("config.json"));
        files.push(weights_file(&dir.join(comp))?);
    }
    for f in ["vocab.json", "merges.txt", "tokenizer.json"] {
        let p = dir.join("tokenizer").join(f);
        if p.is_file() {
            files.push(p);
        }
    }
    let hashes = files
        .par_iter()
        .map(crate::hash::file_digest)
        .collect::<Result<Vec<_>>>()?;
    let mut h = Sha256::new();
    for (p, d) in files.iter().zip(hashes) {
        h.update(p.strip_prefix(dir).unwrap_or(p).to_string_lossy().as_bytes());
        h.update(d);
    }
    Ok(crate::hash::hex(&h.finalize()))
}
