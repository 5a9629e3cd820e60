//! DDIM inversion of dataset images (Diff-II step 2), through the inversion cache.
//!
//! Each image is encoded by the VAE and inverted up the ascending DDIM grid, conditioned on its
//! class's concept prompt with guidance 1 (the conditional branch only), so that DDIM sampling
//! from the result returns (nearly) the original image. Results are cached per image with every
//! input that decides them ([`InversionKey`]); a cache entry made differently is recomputed.
use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use candle_core::Tensor;
use serde::Serialize;

use crate::data::dataset::Dataset;
use crate::data::image::{load_for_model, ResizePolicy};
use crate::data::pixels::u8_to_tensor;
use crate::error::{Error, Result};
use crate::schedule::sampling::ddim_invert;
use crate::synth::cache::{self, InversionKey, Lookup};
use crate::synth::driver::{RunOptions, Summary};
use crate::synth::pipeline::Pipeline;

/// Default number of DDIM inversion steps (the official Diff-II setting).
pub const DEFAULT_INVERSION_STEPS: usize = 200;
/// Default prompt template.
pub const DEFAULT_PROMPT_TEMPLATE: &str = "a photo of a {concept} {superclass}";

/// Everything that decides an inverted latent besides the model and the image.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Inversion {
    /// With `{concept}` and `{superclass}` placeholders.
    pub prompt_template: String,
    pub superclass: String,
    pub size: usize,
    pub resize: ResizePolicy,
    pub steps: usize,
    /// The model's product precision name ("f32", "bf16" or "bf16-amx").
    pub precision: String,
}

/// Inversion settings as a user gives them: `None` takes the default (or the preset's value).
#[derive(Clone, Debug, Default)]
pub struct InversionRequest {
    pub official: bool,
    pub prompt_template: Option<String>,
    pub superclass: Option<String>,
    pub size: Option<usize>,
    pub resize: Option<ResizePolicy>,
    pub steps: Option<usize>,
}

impl Inversion {
    /// Resolves a request against the model: explicit value > official preset > default.
    /// The default size is the model's native one; the official preset's is 512.
    pub fn resolve(r: &InversionRequest, p: &Pipeline) -> Result<Self> {
        let steps = r.steps.unwrap_or(DEFAULT_INVERSION_STEPS);
        if steps == 0 {
            return Err(Error::invalid("--inversion-steps must be at least 1"));
        }
        let template = r.prompt_template.clone().unwrap_or_else(|| DEFAULT_PROMPT_TEMPLATE.into());
        check_prompt_template(&template)?;
        Ok(Inversion {
            prompt_template: template,
            superclass: r.superclass.clone().unwrap_or_default(),
            size: r.size.unwrap_or(if r.official { 512 } else { p.native_size() }),
            resize: r.resize.unwrap_or(ResizePolicy::Squash),
            steps,
            precision: p.sd.precision.name().to_string(),
        })
    }

    /// The concept prompt of a class token.
    pub fn prompt(&self, token: &str) -> String {
        concept_prompt(&self.prompt_template, token, &self.superclass)
    }
}

/// An error unless `template` has a `{concept}` placeholder: without one every class would get
/// the same prompt.
pub fn check_prompt_template(template: &str) -> Result<()> {
    if !template.contains("{concept}") {
        return Err(Error::invalid(format!("--prompt-template {template:?} has no {{concept}}: every class would get the same prompt")));
    }
    Ok(())
}

/// A prompt template filled with a concept token and the superclass word, whitespace collapsed.
pub fn concept_prompt(template: &str, token: &str, superclass: &str) -> String {
    let p = template.replace("{concept}", token).replace("{superclass}", superclass);
    p.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Inverts the dataset images `wanted` (indices into `ds.items`), using and filling the cache
/// in `opts.cache`. Returns the inverted latents by item index.
pub fn invert_items(
    p: &Pipeline,
    ds: &Dataset,
    inv: &Inversion,
    opts: &RunOptions,
    wanted: &BTreeSet<usize>,
    summary: &mut Summary,
) -> Result<HashMap<usize, Tensor>> {
    let t0 = Instant::now();
    let tokens = p.class_tokens(ds)?;
    let dev = p.sd.unet_device().clone();
    let mut out = HashMap::new();
    let mut todo: Vec<(usize, InversionKey, Vec<u8>)> = Vec::new();
    let dirs: BTreeSet<_> = wanted.iter().filter_map(|&i| cache::entry_path(&opts.cache, &ds.items[i].rel).parent().map(|d| d.to_path_buf())).collect();
    for d in dirs {
        crate::data::atomic::remove_stale_temps(&d)?;
    }
    for &i in wanted {
        let item = &ds.items[i];
        let (pixels, image_sha256) = load_for_model(&item.path, inv.size, inv.resize)?;
        let key = InversionKey {
            image_sha256,
            model_sha256: p.model_sha256.clone(),
            concepts_sha256: p.concepts_sha256.clone(),
            lora_sha256: p.lora_sha256.clone().unwrap_or_default(),
            prompt: inv.prompt(&tokens[item.class]),
            steps: inv.steps,
            size: inv.size,
            resize: format!("{:?}", inv.resize),
            // A GPU sums in other orders than the CPU kernels: its inversions are its own
            // (CPU keys keep their old form, so existing caches stay valid).
            dtype: format!("{:?}/{}{}", p.sd.unet.dtype(), inv.precision, if dev.is_cpu() { "" } else { "/gpu" }),
        };
        match cache::load(&cache::entry_path(&opts.cache, &item.rel), &key, &dev)? {
            Lookup::Hit(t) => {
                summary.inversion_cache_hits += 1;
                out.insert(i, t);
            }
            Lookup::Stale(reason) => {
                summary.inversion_cache_stale += 1;
                summary.notes.push(format!("recomputed inversion of {} ({reason})", item.rel));
                todo.push((i, key, pixels));
            }
            Lookup::Miss => todo.push((i, key, pixels)),
        }
    }
    let pb = crate::progress::bar(todo.len(), "invert", opts.progress);
    for chunk in todo.chunks(opts.batch.max(1)) {
        let xs = chunk.iter().map(|(_, _, px)| u8_to_tensor(px, inv.size, inv.size, &dev)).collect::<Result<Vec<_>>>()?;
        let x = Tensor::cat(&xs, 0)?.to_dtype(p.sd.unet.dtype())?;
        let z0 = p.sd.vae.encode_latent(&x)?;
        let prompts: Vec<String> = chunk.iter().map(|(_, k, _)| k.prompt.clone()).collect();
        let ctx = p.encode(&prompts)?;
        let z_t = ddim_invert(&p.sched, &z0, inv.steps, |x, _, t| p.sd.unet.forward_t(x, t, &ctx), |_| {})?;
        for (j, (i, key, _)) in chunk.iter().enumerate() {
            let lat = z_t.narrow(0, j, 1)?;
            crate::error::ensure_finite(&lat, || format!("inversion of {} ({} steps)", ds.items[*i].rel, inv.steps))?;
            cache::store(&cache::entry_path(&opts.cache, &ds.items[*i].rel), key, &lat)?;
            out.insert(*i, lat);
            summary.inverted += 1;
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    summary.seconds_inversion += t0.elapsed().as_secs_f64();
    Ok(out)
}

/// The images shard `shard` inverts when it inverts a whole dataset: by position, the same way
/// shards split samples.
pub fn shard_items(ds: &Dataset, shard: crate::synth::plan::Shard) -> BTreeSet<usize> {
    (0..ds.items.len()).filter(|i| i % shard.count == shard.index).collect()
}

/// `diffii invert`: inverts this shard's share of every dataset image into the cache.
pub fn invert_dataset(p: &Pipeline, ds: &Dataset, inv: &Inversion, opts: &RunOptions) -> Result<Summary> {
    let _lock = crate::data::lock::lock_output(&opts.out, crate::synth::driver::lock_scope(opts.shard))?;
    let mut summary = Summary::default();
    invert_items(p, ds, inv, opts, &shard_items(ds, opts.shard), &mut summary)?;
    summary.peak_rss_mib = crate::instrument::peak_rss_mib();
    Ok(summary)
}
