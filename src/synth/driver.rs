//! The driver every synthesis method runs under: it owns the output folder, and a method only
//! says which samples exist and how to make a batch of them.
//!
//! Outputs, under `out/`:
//! - `<class>/<class>_<index>.png` — ImageFolder layout, readable by any trainer;
//! - `manifest.jsonl` — one [`Record`] per image, tagged with the method that made it (shard
//!   runs write `manifest.shard-i-of-n.jsonl`; `diffii merge` joins them);
//! - `run_config.json` — the method's settings, whose hash every record carries;
//! - `previews/<class>.png` — source images → result rows, to look at before training;
//! - `.records/` — per-sample records used for resuming.
//!
//! Every file is written to a temporary name and renamed, so a killed run leaves only complete
//! files; rerunning the same command makes only what is missing: a sample counts as done when
//! its record carries this run's settings hash and its image still has the recorded hash.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::data::atomic::{remove_stale_temps, save_png_atomic, write_atomic, write_json_atomic, write_or_match_settings};
use crate::data::dataset::{Dataset, Item};
use crate::data::image::{load_rgb8, prepare, ResizePolicy};
use crate::data::lock::{lock_output, Scope};
use crate::data::pixels::{tensor_to_u8, Quantize};
use crate::error::{Error, Result};
use crate::hash::{settings_sha256, sha256_file};
use crate::synth::manifest::{self, Record};
use crate::synth::plan::{sanitize, Sample, Shard};

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

impl RunOptions {
    /// Options with the default inversion cache of `out` (see [`default_cache`]).
    pub fn new(out: PathBuf, cache: Option<PathBuf>, batch: usize, shard: Shard, progress: bool) -> Self {
        let cache = cache.unwrap_or_else(|| default_cache(&out));
        RunOptions { out, cache, batch: batch.max(1), shard, progress }
    }
}

/// The default inversion cache of an output folder.
pub fn default_cache(out: &Path) -> PathBuf {
    out.join(".cache").join("inversions")
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

/// A synthesis method as the driver sees it.
pub trait Method {
    /// Every setting that decides the pixels; hashed into `run_sha256`.
    type Settings: Serialize + DeserializeOwned + PartialEq;
    /// The tag in every record's `method` field.
    fn name(&self) -> &'static str;

    fn settings(&self) -> &Self::Settings;
    /// Every sample of the run (all shards), in manifest order.
    fn samples(&self) -> &[Sample];
    /// Called once before the first batch with the samples this run still has to make (e.g. to
    /// invert their sources).
    fn prepare(&mut self, pending: &[&Sample], opts: &RunOptions, summary: &mut Summary) -> Result<()>;
    /// Makes a batch: decoded images [b, 3, h, w] in [-1, 1] and one record per sample with the
    /// method's fields set (the driver sets id, class, index, file, hashes and method).
    fn make(&mut self, batch: &[&Sample]) -> Result<(Tensor, Vec<Record>)>;
    /// 8-bit conversion of the decoded images.
    fn quantize(&self) -> Quantize;
    /// Side and resize policy of the source images, for the preview sheets.
    fn source_geometry(&self) -> (usize, ResizePolicy);
}

/// The manifest file a run writes: `manifest.jsonl`, or one per shard.
pub fn manifest_name(shard: Shard) -> String {
    if shard.is_all() {
        manifest::MANIFEST.to_string()
    } else {
        format!("manifest.shard-{}-of-{}.jsonl", shard.index, shard.count)
    }
}

/// The output-folder lock a run of `shard` takes: shards of one run may share a folder.
pub fn lock_scope(shard: Shard) -> Scope {
    if shard.is_all() {
        Scope::Whole
    } else {
        Scope::Shard { index: shard.index, count: shard.count }
    }
}

/// Makes the samples of `opts.shard` that are not done yet, then writes this shard's manifest
/// (and, for a whole run, the previews). `summary` may already hold the method's notes.
pub fn run<M: Method>(m: &mut M, ds: &Dataset, opts: &RunOptions, mut summary: Summary) -> Result<Summary> {
    summary.planned = m.samples().len();
    let _lock = lock_output(&opts.out, lock_scope(opts.shard))?;
    write_or_match_settings(opts.out.join("run_config.json"), m.settings(), "a run")?;
    let run_sha = settings_sha256(m.settings());
    // A killed run may have left temporaries; they are never read, but should not pile up.
    remove_stale_temps(&opts.out)?;
    for class in &ds.classes {
        let dir = sanitize(class);
        remove_stale_temps(&opts.out.join(&dir))?;
        remove_stale_temps(&opts.out.join(manifest::RECORDS_DIR).join(&dir))?;
    }
    remove_stale_temps(&opts.out.join("previews"))?;

    let mine: Vec<Sample> = m.samples().iter().filter(|x| opts.shard.contains(x)).cloned().collect();
    let mut pending = Vec::new();
    for x in &mine {
        let done = manifest::read_record(&record_path(opts, ds, x)).is_some_and(|r| {
            r.run_sha256 == run_sha && sha256_file(opts.out.join(&r.file)).map(|h| h == r.output_sha256).unwrap_or(false)
        });
        if done {
            summary.skipped_existing += 1;
        } else {
            pending.push(x);
        }
    }
    m.prepare(&pending, opts, &mut summary)?;

    let t0 = Instant::now();
    let pb = crate::progress::bar(pending.len(), "generate", opts.progress);
    for chunk in pending.chunks(opts.batch.max(1)) {
        let (decoded, records) = m.make(chunk)?;
        if records.len() != chunk.len() {
            return Err(Error::invalid(format!("{}: {} records for {} samples", m.name(), records.len(), chunk.len())));
        }
        for (j, (x, mut rec)) in chunk.iter().zip(records).enumerate() {
            let class = &ds.classes[x.class];
            let id = x.id(class);
            let image = decoded.narrow(0, j, 1)?;
            crate::error::ensure_finite(&image, || format!("{}: decoded image of sample {id}", m.name()))?;
            let (px, h, w) = tensor_to_u8(&image, m.quantize())?;
            rec.file = format!("{}/{id}.png", sanitize(class));
            rec.output_sha256 = save_png_atomic(opts.out.join(&rec.file), &px, w, h)?;
            rec.id = id;
            rec.method = m.name().to_string();
            rec.class = class.clone();
            rec.class_index = x.class;
            rec.index = x.index;
            rec.seed = x.seed;
            rec.run_sha256 = run_sha.clone();
            write_json_atomic(record_path(opts, ds, x), &rec)?;
            summary.written += 1;
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    summary.seconds_generation = t0.elapsed().as_secs_f64();

    // This shard's manifest, from the records of its samples (finished now or before).
    let recs: Vec<Record> = mine.iter().filter_map(|x| manifest::read_record(&record_path(opts, ds, x))).collect();
    write_atomic(opts.out.join(manifest_name(opts.shard)), manifest::to_jsonl(&recs)?.as_bytes())?;
    if opts.shard.is_all() {
        let (size, resize) = m.source_geometry();
        write_previews(&opts.out, ds, &recs, size, resize)?;
    }
    summary.peak_rss_mib = crate::instrument::peak_rss_mib();
    Ok(summary)
}

fn record_path(opts: &RunOptions, ds: &Dataset, x: &Sample) -> PathBuf {
    let class = &ds.classes[x.class];
    manifest::record_path(&opts.out, &sanitize(class), &x.id(class))
}

/// Per-class preview sheets: up to 6 rows of [source A | source B | result].
pub fn write_previews(out: &Path, ds: &Dataset, records: &[Record], size: usize, resize: ResizePolicy) -> Result<()> {
    let tile = size.min(128);
    let by_rel: HashMap<&str, &Item> = ds.items.iter().map(|i| (i.rel.as_str(), i)).collect();
    for (c, class) in ds.classes.iter().enumerate() {
        let rows: Vec<&Record> = records.iter().filter(|r| r.class_index == c).take(6).collect();
        if rows.is_empty() {
            continue;
        }
        let mut sheet = image::RgbImage::new(3 * tile as u32, (rows.len() * tile) as u32);
        for (r, rec) in rows.iter().enumerate() {
            let mut tiles = Vec::new();
            // Methods without a second source (img2img) or any (txt2img) leave those tiles black.
            for src in &rec.sources {
                if src.is_empty() {
                    tiles.push(image::RgbImage::new(tile as u32, tile as u32));
                    continue;
                }
                let item = by_rel.get(src.as_str()).ok_or_else(|| Error::invalid(format!("preview: {src} is not in the dataset")))?;
                tiles.push(prepare(&load_rgb8(&item.path)?, tile, resize));
            }
            tiles.push(prepare(&load_rgb8(out.join(&rec.file))?, tile, ResizePolicy::Squash));
            for (k, t) in tiles.iter().enumerate() {
                image::imageops::replace(&mut sheet, t, (k * tile) as i64, (r * tile) as i64);
            }
        }
        let path = out.join("previews").join(format!("{}.png", sanitize(class)));
        save_png_atomic(&path, sheet.as_raw(), sheet.width() as usize, sheet.height() as usize)?;
    }
    Ok(())
}

/// The shard manifests (`manifest.shard-*-of-N.jsonl`) in `out`, sorted; an error when none is
/// there or when some of the N shards are missing.
pub fn shard_manifests(out: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(out)
        .map_err(|e| Error::io(out, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("manifest.shard-") && n.ends_with(".jsonl")))
        .collect();
    v.sort();
    if v.is_empty() {
        return Err(Error::invalid(format!("{}: no manifest.shard-*.jsonl files to merge", out.display())));
    }
    check_all_shards(&v, out)?;
    Ok(v)
}

/// When every input names the same shard count N, all N must be present.
pub fn check_all_shards(inputs: &[PathBuf], out: &Path) -> Result<()> {
    let counts: std::collections::BTreeSet<String> = inputs
        .iter()
        .filter_map(|p| p.file_name()?.to_str()?.rsplit_once("-of-").map(|(_, n)| n.trim_end_matches(".jsonl").to_string()))
        .collect();
    if let (1, Some(n)) = (counts.len(), counts.iter().next().and_then(|n| n.parse::<usize>().ok())) {
        if inputs.len() != n {
            return Err(Error::invalid(format!(
                "found {} of {n} shard manifests in {}: wait for the missing shards or rerun them",
                inputs.len(),
                out.display()
            )));
        }
    }
    Ok(())
}

/// Merges the shard manifests (`inputs`, or every shard manifest in `out`) into
/// `out/manifest.jsonl`. Returns the inputs used and the number of records.
pub fn merge_shards(out: &Path, inputs: &[PathBuf]) -> Result<(Vec<PathBuf>, usize)> {
    let inputs = if inputs.is_empty() {
        shard_manifests(out)?
    } else {
        check_all_shards(inputs, out)?;
        inputs.to_vec()
    };
    let records = manifest::merge(&inputs)?;
    write_atomic(out.join(manifest::MANIFEST), manifest::to_jsonl(&records)?.as_bytes())?;
    Ok((inputs, records.len()))
}
