//! Running Diff-II over a dataset: invert every needed source image (cached), plan the samples,
//! interpolate, sample in two stages, decode, and write images, records and the manifest.
//!
//! Outputs, under `out/`:
//! - `<class>/<class>_<index>.png` — ImageFolder layout, readable by any trainer;
//! - `manifest.jsonl` — one [`Record`] per image (shard runs write `manifest.shard-i-of-n.jsonl`);
//! - `run_config.json` — every setting, with the hash that records carry;
//! - `previews/<class>.png` — source pair → result rows, to look at before training;
//! - `.records/` — per-sample records used for resuming.
//!
//! Every file is written to a temporary name and renamed, so a killed run leaves only complete
//! files; rerunning the same command makes only what is missing.
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::atomic::{save_png_atomic, write_json_atomic};
use crate::data::dataset::Dataset;
use crate::data::image::{load_for_model, prepare, sha256_file, ResizePolicy};
use crate::data::pixels::{tensor_to_u8, u8_to_tensor, Quantize};
use crate::diffii::cache::{self, InversionKey, Lookup};
use crate::diffii::interpolate::{circle_alpha, slerp, DEFAULT_DOT_THRESHOLD};
use crate::diffii::invert::ddim_invert;
use crate::diffii::manifest::{self, Record};
use crate::diffii::plan::{self, sanitize, Count, Interp, Sample, Shard};
use crate::diffii::sample::{sample_two_stage, stage1_steps_for_strength, TwoStage};
use crate::error::{Error, Result};
use crate::schedule::ddim::Ddim;
use crate::sd::loader::StableDiffusion;

/// Scene phrases used for stage 1 when no `--suffixes` file is given. The official release
/// had an LLM write ~10 per dataset from image captions; these are generic, class-agnostic
/// contexts in the same style, so any dataset gets diverse backgrounds without an LLM.
pub const BUILTIN_SUFFIXES: [&str; 10] = [
    "in its natural habitat",
    "outdoors on a sunny day",
    "in soft morning light",
    "at dusk with warm light",
    "in the rain",
    "in the snow",
    "against a plain background",
    "surrounded by green foliage",
    "in a close-up shot",
    "seen from a distance",
];

/// Every setting that affects the generated pixels. Its hash is stored in each record, so a
/// resumed run only reuses images made with identical settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Settings {
    /// With `{concept}` and `{superclass}` placeholders.
    pub prompt_template: String,
    pub superclass: String,
    pub suffixes: Vec<String>,
    pub size: usize,
    pub resize: ResizePolicy,
    pub inversion_steps: usize,
    pub steps: usize,
    pub guidance: f64,
    /// Stage 1 = steps with t >= 1000 (1 - strength), unless `stage1_steps` is set.
    pub strength: f64,
    pub stage1_steps: Option<usize>,
    pub interp: Interp,
    pub count: Count,
    pub seed: u64,
    pub quantize: Quantize,
    pub model_sha256: String,
    pub concepts_sha256: String,
    pub lora_sha256: Option<String>,
    /// Product precision of the model's layers: "f32", or "bf16" (see [`crate::nn::Precision`]).
    #[serde(default = "default_precision")]
    pub precision: String,
}

fn default_precision() -> String {
    "f32".into()
}

impl Settings {
    pub fn run_sha256(&self) -> String {
        let json = serde_json::to_string(self).expect("serialisable");
        format!("{:x}", Sha256::digest(json.as_bytes()))
    }

    /// The concept prompt of a class token.
    pub fn prompt(&self, token: &str) -> String {
        let p = self.prompt_template.replace("{concept}", token).replace("{superclass}", &self.superclass);
        p.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    /// Stage-1 prompt: concept prompt + scene suffix.
    pub fn stage1_prompt(&self, token: &str, suffix: &str) -> String {
        if suffix.is_empty() {
            self.prompt(token)
        } else {
            format!("{} {}", self.prompt(token), suffix.trim())
        }
    }
}

/// Where and how to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub out: PathBuf,
    pub cache: PathBuf,
    /// Samples (and images to invert) per UNet call.
    pub batch: usize,
    pub shard: Shard,
    pub progress: bool,
}

/// What a run did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub planned: usize,
    pub written: usize,
    pub skipped_existing: usize,
    pub inverted: usize,
    pub inversion_cache_hits: usize,
    pub inversion_cache_stale: usize,
    pub seconds_inversion: f64,
    pub seconds_generation: f64,
    pub peak_rss_mib: f64,
    pub notes: Vec<String>,
}


/// The model plus the hashes that identify it.
pub struct Pipeline {
    pub sd: StableDiffusion,
    pub sched: Ddim,
    pub model_sha256: String,
    pub concepts_sha256: String,
    pub lora_sha256: Option<String>,
}

impl Pipeline {
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

    fn encode(&self, prompts: &[String]) -> Result<Tensor> {
        let embs = prompts.iter().map(|p| self.sd.encode_prompt(p)).collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&embs, 0)?)
    }
}

/// Inverts the dataset images `wanted` (indices into `ds.items`), using and filling the cache.
/// Returns the inverted latents by item index.
pub fn invert_items(
    p: &Pipeline,
    ds: &Dataset,
    s: &Settings,
    opts: &RunOptions,
    wanted: &BTreeSet<usize>,
    summary: &mut Summary,
) -> Result<HashMap<usize, Tensor>> {
    let t0 = Instant::now();
    let tokens = p.class_tokens(ds)?;
    let dev = p.sd.unet_device().clone();
    let mut out = HashMap::new();
    let mut todo: Vec<(usize, InversionKey, Vec<u8>)> = Vec::new();
    for &i in wanted {
        let item = &ds.items[i];
        let (pixels, image_sha256) = load_for_model(&item.path, s.size, s.resize)?;
        let key = InversionKey {
            image_sha256,
            model_sha256: p.model_sha256.clone(),
            concepts_sha256: p.concepts_sha256.clone(),
            lora_sha256: p.lora_sha256.clone().unwrap_or_default(),
            prompt: s.prompt(&tokens[item.class]),
            steps: s.inversion_steps,
            size: s.size,
            resize: format!("{:?}", s.resize),
            dtype: format!("{:?}/{}", p.sd.unet.dtype(), s.precision),
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
        let xs = chunk.iter().map(|(_, _, px)| u8_to_tensor(px, s.size, s.size, &dev)).collect::<Result<Vec<_>>>()?;
        let x = Tensor::cat(&xs, 0)?.to_dtype(p.sd.unet.dtype())?;
        let z0 = p.sd.vae.encode_latent(&x)?;
        let prompts: Vec<String> = chunk.iter().map(|(_, k, _)| k.prompt.clone()).collect();
        let ctx = p.encode(&prompts)?;
        let z_t = ddim_invert(&p.sd.unet, &p.sched, &z0, &ctx, s.inversion_steps, |_| {})?;
        for (j, (i, key, _)) in chunk.iter().enumerate() {
            let lat = z_t.narrow(0, j, 1)?;
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

/// Number of stage-1 steps for the settings.
pub fn stage1_steps(p: &Pipeline, s: &Settings) -> Result<usize> {
    let grid = p.sched.set_timesteps(s.steps)?;
    Ok(match s.stage1_steps {
        Some(k) if k > s.steps => return Err(Error::invalid(format!("--stage1-steps {k} exceeds --steps {}", s.steps))),
        Some(k) => k,
        None => stage1_steps_for_strength(&grid.timesteps, p.sched.num_train_timesteps(), s.strength),
    })
}

/// The manifest file a run writes: `manifest.jsonl`, or one per shard.
pub fn manifest_name(shard: Shard) -> String {
    if shard.is_all() {
        manifest::MANIFEST.to_string()
    } else {
        format!("manifest.shard-{}-of-{}.jsonl", shard.index, shard.count)
    }
}

/// Refuses to mix runs in one output folder.
fn check_run_config(out: &Path, s: &Settings) -> Result<()> {
    crate::data::atomic::write_or_match_settings(out.join("run_config.json"), s, "a run").map(|_| ())
}

/// Generates the samples of `opts.shard`, skipping those already finished.
pub fn generate(p: &Pipeline, ds: &Dataset, s: &Settings, opts: &RunOptions) -> Result<Summary> {
    let mut summary = Summary::default();
    if s.size % p.sd.vae.config.spatial_factor() != 0 {
        return Err(Error::invalid(format!("image size {} is not a multiple of the VAE factor {}", s.size, p.sd.vae.config.spatial_factor())));
    }
    let tokens = p.class_tokens(ds)?;
    let members = ds.class_members();
    let counts: Vec<usize> = members.iter().map(|m| m.len()).collect();
    let n_suffix = s.suffixes.len();
    let samples = plan::plan(&ds.classes, &counts, s.count, s.interp, n_suffix, s.seed)?;
    summary.planned = samples.len();
    for (c, n) in counts.iter().enumerate() {
        if *n == 1 {
            summary.notes.push(format!(
                "class `{}` has one image: its samples re-generate that image's own inversion with the two-stage prompts (no pair to interpolate)",
                ds.classes[c]
            ));
        }
    }
    if s.suffixes.is_empty() {
        summary.notes.push("no scene suffixes: stage 1 uses the plain concept prompt".into());
    }
    // Validate everything before touching the output folder.
    let k1 = stage1_steps(p, s)?;
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
    check_run_config(&opts.out, s)?;
    let run_sha = s.run_sha256();

    // Which samples of this shard still need work.
    let mine: Vec<&Sample> = samples.iter().filter(|x| opts.shard.contains(x)).collect();
    let mut pending = Vec::new();
    for x in &mine {
        let class_dir = sanitize(&ds.classes[x.class]);
        let id = x.id(&ds.classes[x.class]);
        let done = manifest::read_record(&manifest::record_path(&opts.out, &class_dir, &id)).is_some_and(|r| {
            r.run_sha256 == run_sha
                && sha256_file(&opts.out.join(&r.file)).map(|h| h == r.output_sha256).unwrap_or(false)
        });
        if done {
            summary.skipped_existing += 1;
        } else {
            pending.push(*x);
        }
    }

    let wanted: BTreeSet<usize> =
        pending.iter().flat_map(|x| [members[x.class][x.pair.0], members[x.class][x.pair.1]]).collect();
    let latents = invert_items(p, ds, s, opts, &wanted, &mut summary)?;

    let t0 = Instant::now();
    let uncond = p.sd.encode_prompt("")?;
    let pb = crate::progress::bar(pending.len(), "generate", opts.progress);
    for chunk in pending.chunks(opts.batch.max(1)) {
        let mut zs = Vec::new();
        let mut meta = Vec::new();
        let mut p1 = Vec::new();
        let mut p2 = Vec::new();
        for x in chunk {
            let (ia, ib) = (members[x.class][x.pair.0], members[x.class][x.pair.1]);
            let (a, b) = (&latents[&ia], &latents[&ib]);
            let (z, info, t, frac, alpha, mode) = if x.single_image() {
                (a.clone(), None, 0.0, None, None, "single-image")
            } else {
                match s.interp {
                    Interp::Slerp { .. } => {
                        let (z, info) = slerp(a, b, x.draw, DEFAULT_DOT_THRESHOLD)?;
                        (z, Some(info), x.draw, None, None, "slerp")
                    }
                    Interp::Circle => {
                        let theta = crate::diffii::interpolate::cosine(a, b)?.clamp(-1.0, 1.0).acos();
                        let alpha = circle_alpha(theta.max(1e-12), x.draw);
                        let (z, info) = slerp(a, b, -alpha, DEFAULT_DOT_THRESHOLD)?;
                        (z, Some(info), -alpha, Some(x.draw), Some(alpha), "circle")
                    }
                }
            };
            let token = &tokens[x.class];
            let suffix = if n_suffix > 0 { s.suffixes[x.suffix].clone() } else { String::new() };
            p1.push(s.stage1_prompt(token, &suffix));
            p2.push(s.prompt(token));
            zs.push(z);
            meta.push((ia, ib, info, t, frac, alpha, mode, suffix));
        }
        let z = Tensor::cat(&zs, 0)?;
        let (e1, e2) = (p.encode(&p1)?, p.encode(&p2)?);
        let cond = TwoStage { uncond: &uncond, stage1: &e1, stage2: &e2, stage1_steps: k1, guidance: s.guidance };
        let out = sample_two_stage(&p.sd.unet, &p.sched, &z, &cond, s.steps, |_| {})?;
        let decoded = p.sd.vae.decode_latent(&out)?;
        for (j, x) in chunk.iter().enumerate() {
            let (ia, ib, info, t, frac, alpha, mode, suffix) = meta[j].clone();
            let (px, h, w) = tensor_to_u8(&decoded.narrow(0, j, 1)?, s.quantize)?;
            let class = &ds.classes[x.class];
            let class_dir = sanitize(class);
            let id = x.id(class);
            let file = format!("{class_dir}/{id}.png");
            let output_sha256 = save_png_atomic(&opts.out.join(&file), &px, w, h)?;
            let (ra, rb) = (&ds.items[ia], &ds.items[ib]);
            let rec = Record {
                id: id.clone(),
                class: class.clone(),
                class_index: x.class,
                index: x.index,
                file,
                output_sha256,
                sources: [ra.rel.clone(), rb.rel.clone()],
                source_sha256: [sha256_file(&ra.path)?, sha256_file(&rb.path)?],
                interp: mode.to_string(),
                t,
                frac,
                alpha,
                theta: info.map(|i| i.theta).unwrap_or(0.0),
                cos: info.map(|i| i.cos).unwrap_or(1.0),
                lerp: info.map(|i| i.lerp).unwrap_or(false),
                prompt: p2[j].clone(),
                stage1_prompt: p1[j].clone(),
                suffix,
                strength: s.strength,
                stage1_steps: k1,
                steps: s.steps,
                inversion_steps: s.inversion_steps,
                guidance: s.guidance,
                seed: x.seed,
                size: s.size,
                model_sha256: p.model_sha256.clone(),
                concepts_sha256: p.concepts_sha256.clone(),
                lora_sha256: p.lora_sha256.clone(),
                run_sha256: run_sha.clone(),
            };
            write_json_atomic(&manifest::record_path(&opts.out, &class_dir, &id), &rec)?;
            summary.written += 1;
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    summary.seconds_generation = t0.elapsed().as_secs_f64();

    // This shard's manifest, from the records of its samples (finished now or before).
    let mut recs = Vec::new();
    for x in &mine {
        let class = &ds.classes[x.class];
        if let Some(r) = manifest::read_record(&manifest::record_path(&opts.out, &sanitize(class), &x.id(class))) {
            recs.push(r);
        }
    }
    crate::data::atomic::write_atomic(&opts.out.join(manifest_name(opts.shard)), manifest::to_jsonl(&recs)?.as_bytes())?;
    if opts.shard.is_all() {
        write_previews(&opts.out, ds, &recs, s)?;
    }
    summary.peak_rss_mib = crate::instrument::peak_rss_mib();
    Ok(summary)
}

/// Per-class preview sheets: up to 6 rows of [source A | source B | result].
pub fn write_previews(out: &Path, ds: &Dataset, records: &[Record], s: &Settings) -> Result<()> {
    let tile = s.size.min(128);
    let by_rel: HashMap<&str, &crate::data::dataset::Item> = ds.items.iter().map(|i| (i.rel.as_str(), i)).collect();
    for (c, class) in ds.classes.iter().enumerate() {
        let rows: Vec<&Record> = records.iter().filter(|r| r.class_index == c).take(6).collect();
        if rows.is_empty() {
            continue;
        }
        let mut sheet = image::RgbImage::new(3 * tile as u32, (rows.len() * tile) as u32);
        for (r, rec) in rows.iter().enumerate() {
            let mut tiles = Vec::new();
            for src in &rec.sources {
                let item = by_rel.get(src.as_str()).ok_or_else(|| Error::invalid(format!("preview: {src} is not in the dataset")))?;
                tiles.push(prepare(&crate::data::image::load_rgb8(&item.path)?, tile, s.resize));
            }
            let result = crate::data::image::load_rgb8(&out.join(&rec.file))?;
            tiles.push(prepare(&result, tile, ResizePolicy::Squash));
            for (k, t) in tiles.iter().enumerate() {
                image::imageops::replace(&mut sheet, t, (k * tile) as i64, (r * tile) as i64);
            }
        }
        let path = out.join("previews").join(format!("{}.png", sanitize(class)));
        save_png_atomic(&path, sheet.as_raw(), sheet.width() as usize, sheet.height() as usize)?;
    }
    Ok(())
}

/// The default inversion cache of an output folder.
pub fn default_cache(out: &Path) -> PathBuf {
    out.join(".cache").join("inversions")
}
