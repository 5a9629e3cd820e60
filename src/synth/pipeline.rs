//! The generator every synthesis method runs on: a Stable Diffusion model with its concept
//! tokens (and optionally a merged LoRA), its DDIM scheduler, and the hashes that identify all
//! three in settings, records and the inversion cache.
use std::path::PathBuf;

use candle_core::Tensor;

use crate::data::dataset::Dataset;
use crate::error::{Error, Result};
use crate::nn::Precision;
use crate::schedule::ddim::Ddim;
use crate::sd::concepts::Concepts;
use crate::sd::loader::{parse_device, LoadOptions, StableDiffusion};
use crate::sd::lora::{apply_lora, Lora};

/// What to load: the model folder plus the optional concept files and LoRA.
#[derive(Clone, Debug)]
pub struct PipelineSpec {
    /// diffusers SD-1.x model folder.
    pub model: PathBuf,
    /// Concept files; empty means the model's own `concepts/` folder.
    pub concepts: Vec<PathBuf>,
    /// JSON map from class name to concept token (needs `concepts`).
    pub class_map: Option<PathBuf>,
    pub lora: Option<PathBuf>,
    pub lora_scale: f64,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    pub precision: Precision,
}

/// The model plus the hashes that identify it.
pub struct Pipeline {
    pub sd: StableDiffusion,
    pub sched: Ddim,
    pub model_sha256: String,
    pub concepts_sha256: String,
    /// `<lora file hash>@<scale>` when a LoRA is merged.
    pub lora_sha256: Option<String>,
    /// How many attention projections the LoRA changed (0 without one).
    pub lora_projections: usize,
}

impl Pipeline {
    /// Loads the model with its concepts (and LoRA) and computes the identifying hashes.
    pub fn load(spec: &PipelineSpec) -> Result<Self> {
        if !spec.lora_scale.is_finite() {
            return Err(Error::invalid(format!("--lora-scale {} must be a finite number", spec.lora_scale)));
        }
        let device = parse_device(&spec.device)?;
        let opts = LoadOptions { concepts: spec.concepts.is_empty(), device, precision: spec.precision, ..LoadOptions::default() };
        let mut sd = StableDiffusion::load(&spec.model, &opts)?;
        if !spec.concepts.is_empty() {
            let c = Concepts::from_files(&spec.concepts, spec.class_map.as_deref(), sd.text_encoder.config.hidden_size, &opts.device)?;
            sd.add_concepts(c)?;
        } else if let Some(map) = &spec.class_map {
            return Err(Error::invalid(format!("--class-map {} needs --concepts", map.display())));
        }
        let (lora_sha256, lora_projections) = match &spec.lora {
            Some(path) => {
                let lora = Lora::load(path)?;
                let n = apply_lora(&mut sd.unet, &lora, spec.lora_scale)?;
                (Some(format!("{}@{}", lora.sha256(), spec.lora_scale)), n)
            }
            None => (None, 0),
        };
        let concepts_sha256 = sd.concepts.as_ref().map(|c| c.sha256()).unwrap_or_default();
        let model_sha256 = sd.fingerprint()?;
        let sched = Ddim::new(sd.scheduler.clone())?;
        Ok(Pipeline { sd, sched, model_sha256, concepts_sha256, lora_sha256, lora_projections })
    }

    /// The model's native image side in pixels.
    pub fn native_size(&self) -> usize {
        self.sd.unet.config.sample_size * self.sd.vae.config.spatial_factor()
    }

    /// The concept token of every dataset class, or an error listing classes without one.
    pub fn class_tokens(&self, ds: &Dataset) -> Result<Vec<String>> {
        let concepts = self.sd.concepts.as_ref().ok_or_else(|| {
            Error::invalid(
                "no concepts loaded: pass --concepts (learned_embeds.safetensors or the official .bin), \
                 or learn them first with `diffii concepts --model M --data D --out C --superclass WORD`",
            )
        })?;
        concepts.check_classes(&ds.classes)?;
        Ok(ds.classes.iter().map(|c| concepts.token_for_class(c).expect("checked").to_string()).collect())
    }

    /// Text features of several prompts, concatenated along the batch.
    pub fn encode(&self, prompts: &[String]) -> Result<Tensor> {
        let embs = prompts.iter().map(|p| self.sd.encode_prompt(p)).collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&embs, 0)?)
    }
}
