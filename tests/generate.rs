//! End-to-end `diffii invert` / `generate` / `merge` runs on the tiny fixture model with a
//! small generated ImageFolder: outputs, manifest, determinism across batch sizes and thread
//! counts, shard union == single run, kill + resume, the inversion cache, and bad input.
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

fn tmp(name: &str) -> PathBuf {
    common::empty_temp_dir(&format!("gen-{name}"))
}

/// sparrow: 3 images (one non-square, one grey); gull: 1 image (no pair possible).
fn dataset(root: &Path) -> PathBuf {
    let data = root.join("data");
    let img = |w: u32, h: u32, seed: u32| {
        image::RgbImage::from_fn(w, h, |x, y| {
            let v = (x * 7 + y * 13 + seed * 31) % 256;
            image::Rgb([v as u8, ((v + 80 * seed) % 256) as u8, (255 - v) as u8])
        })
    };
    std::fs::create_dir_all(data.join("sparrow")).unwrap();
    std::fs::create_dir_all(data.join("gull")).unwrap();
    img(32, 32, 1).save(data.join("sparrow/a.png")).unwrap();
    img(48, 32, 2).save(data.join("sparrow/b_wide.png")).unwrap();
    image::DynamicImage::ImageRgb8(img(32, 32, 3)).to_luma8().save(data.join("sparrow/c_grey.png")).unwrap();
    img(32, 32, 4).save(data.join("gull/only.png")).unwrap();
    data
}

fn suffix_file(root: &Path) -> PathBuf {
    let p = root.join("suffixes.txt");
    std::fs::write(&p, "in the snow\n\n# a comment\non a tree branch\nby the sea\n").unwrap();
    p
}

/// Arguments for a quick run (32 px, 6 steps); flags in `extra` replace the defaults.
fn base(cmd: &str, data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut defaults: Vec<(&str, &str)> = vec![("--size", "32"), ("--inversion-steps", "6"), ("--superclass", "bird")];
    if cmd == "generate" {
        defaults.extend([("--steps", "6"), ("--per-class", "3"), ("--seed", "1")]);
    }
    let mut v: Vec<String> = vec![cmd.into(), "--model".into(), common::tiny_sd().display().to_string()];
    v.extend(["--data".into(), data.display().to_string(), "--out".into(), out.display().to_string(), "--quiet".into()]);
    for (k, val) in defaults {
        if !extra.contains(&k) {
            v.extend([k.to_string(), val.to_string()]);
        }
    }
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn diffii(args: &[String], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_diffii"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn ok(o: &Output) -> String {
    let s = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "failed:\nstdout: {s}\nstderr: {}", String::from_utf8_lossy(&o.stderr));
    s
}

fn err(o: &Output) -> String {
    assert!(!o.status.success(), "should fail:\n{}", String::from_utf8_lossy(&o.stdout));
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Every image and the manifest, by relative path (caches, records and configs excluded).
fn snapshot(out: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    let mut stack = vec![out.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(out).unwrap().to_string_lossy().to_string();
            if rel.starts_with('.') || rel.starts_with("previews") {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if rel.ends_with(".png") || rel == "manifest.jsonl" {
                m.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    m
}

fn sha(p: &Path) -> String {
    format!("{:x}", Sha256::digest(std::fs::read(p).unwrap()))
}

fn manifest(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("manifest.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn full_run_writes_images_manifest_and_previews() {
    let root = tmp("full");
    let data = dataset(&root);
    let suffixes = suffix_file(&root);
    let out = root.join("out");
    let stdout = ok(&diffii(&base("generate", &data, &out, &["--suffixes", suffixes.to_str().unwrap()]), &[]));
    assert!(stdout.contains("written 6"), "{stdout}");
    let recs = manifest(&out);
    assert_eq!(recs.len(), 6);
    for (i, r) in recs.iter().enumerate() {
        let class = r["class"].as_str().unwrap();
        assert_eq!(class, if i < 3 { "gull" } else { "sparrow" }, "sorted by class index (gull < sparrow)");
        let file = out.join(r["file"].as_str().unwrap());
        assert!(file.starts_with(out.join(class)), "ImageFolder layout");
        assert_eq!(r["output_sha256"].as_str().unwrap(), sha(&file));
        let img = image::open(&file).unwrap();
        assert_eq!((img.width(), img.height()), (32, 32));
        let src: Vec<&str> = r["sources"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
        assert_eq!(r["source_sha256"][0].as_str().unwrap(), sha(&data.join(src[0])));
        let token = if class == "sparrow" { "<cls0>" } else { "<cls1>" };
        assert_eq!(r["prompt"], format!("a photo of a {token} bird"));
        let suffix = r["suffix"].as_str().unwrap();
        assert!(["in the snow", "on a tree branch", "by the sea"].contains(&suffix), "{suffix}");
        assert_eq!(r["stage1_prompt"], format!("a photo of a {token} bird {suffix}"));
        assert_eq!(r["steps"], 6);
        assert_eq!(r["inversion_steps"], 6);
        assert_eq!(r["guidance"], 7.5);
        assert_eq!(r["strength"], 0.3);
        // 6 steps on the leading grid: t = 833, 667, 500, ... -> one step has t >= 700.
        assert_eq!(r["stage1_steps"], 1);
        if class == "gull" {
            assert_eq!(r["interp"], "single-image");
            assert_eq!(src[0], src[1]);
        } else {
            assert_eq!(r["interp"], "circle");
            assert_ne!(src[0], src[1], "a pair of different images");
            let (frac, alpha, theta) = (r["frac"].as_f64().unwrap(), r["alpha"].as_f64().unwrap(), r["theta"].as_f64().unwrap());
            assert!((0.0..1.0).contains(&frac));
            assert!((alpha - frac * 2.0 * std::f64::consts::PI / theta).abs() < 1e-9);
            assert!((r["t"].as_f64().unwrap() + alpha).abs() < 1e-12);
        }
    }
    assert!(out.join("previews/sparrow.png").is_file() && out.join("previews/gull.png").is_file());
    let prev = image::open(out.join("previews/sparrow.png")).unwrap();
    assert_eq!((prev.width(), prev.height()), (96, 96), "3 rows of [A | B | result] at 32 px");
    assert!(out.join("run_config.json").is_file());
    // Same command again: nothing to do.
    let again = ok(&diffii(&base("generate", &data, &out, &["--suffixes", suffixes.to_str().unwrap()]), &[]));
    assert!(again.contains("written 0") && again.contains("skipped (already done) 6"), "{again}");
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn output_bytes_do_not_depend_on_batch_or_threads() {
    let root = tmp("det");
    let data = dataset(&root);
    let (a, b) = (root.join("a"), root.join("b"));
    ok(&diffii(&base("generate", &data, &a, &["--batch", "1"]), &[("RAYON_NUM_THREADS", "1")]));
    ok(&diffii(&base("generate", &data, &b, &["--batch", "4"]), &[("RAYON_NUM_THREADS", "2")]));
    let (sa, sb) = (snapshot(&a), snapshot(&b));
    assert_eq!(sa.len(), 7);
    assert_eq!(sa.keys().collect::<Vec<_>>(), sb.keys().collect::<Vec<_>>());
    for (k, v) in &sa {
        assert!(v == &sb[k], "{k} differs between --batch 1 / 1 thread and --batch 4 / 2 threads");
    }
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn shard_union_equals_single_run() {
    let root = tmp("shard");
    let data = dataset(&root);
    let (single, sharded) = (root.join("single"), root.join("sharded"));
    ok(&diffii(&base("generate", &data, &single, &[]), &[]));
    for i in 0..3 {
        let shard = format!("{i}/3");
        ok(&diffii(&base("generate", &data, &sharded, &["--shard", &shard]), &[]));
    }
    assert!(!sharded.join("manifest.jsonl").exists());
    let missing = err(&diffii(&["merge".into(), "--out".into(), sharded.display().to_string(), "--inputs".into(), sharded.join("manifest.shard-0-of-3.jsonl").display().to_string()], &[]));
    assert!(missing.contains("1 of 3"), "{missing}");
    ok(&diffii(&["merge".into(), "--out".into(), sharded.display().to_string()], &[]));
    let (a, b) = (snapshot(&single), snapshot(&sharded));
    assert_eq!(a.len(), 7);
    assert_eq!(a, b, "the union of 3 shards must equal the single run byte for byte");
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn killed_run_resumes_to_the_same_files() {
    let root = tmp("resume");
    let data = dataset(&root);
    let (full, killed) = (root.join("full"), root.join("killed"));
    let args = |out: &Path| base("generate", &data, out, &["--per-class", "8"]);
    ok(&diffii(&args(&full), &[]));
    let mut child = Command::new(env!("CARGO_BIN_EXE_diffii")).args(args(&killed)).spawn().unwrap();
    let records = killed.join(".records");
    let count = || -> usize {
        // Finished records only: a write in progress is a `.<name>.tmp-*` file.
        let finished = |c: &str| {
            std::fs::read_dir(records.join(c))
                .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".json")).count())
                .unwrap_or(0)
        };
        ["sparrow", "gull"].iter().map(|c| finished(c)).sum()
    };
    let t0 = std::time::Instant::now();
    while count() < 2 && t0.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let done = count();
    assert!((2..16).contains(&done), "the run must be interrupted mid-way (had {done} of 16)");
    let stdout = ok(&diffii(&args(&killed), &[]));
    assert!(stdout.contains(&format!("skipped (already done) {done}")), "{stdout}");
    assert_eq!(snapshot(&full), snapshot(&killed));
    // No temporary files are left behind.
    let leftovers: Vec<_> = walk(&killed).into_iter().filter(|p| p.to_string_lossy().contains(".tmp")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    std::fs::remove_dir_all(&root).ok();
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            v.extend(walk(&p));
        } else {
            v.push(p);
        }
    }
    v
}

#[test]
fn inversion_cache_is_reused_only_when_everything_matches() {
    let root = tmp("cache");
    let data = dataset(&root);
    let out = root.join("out");
    let first = ok(&diffii(&base("invert", &data, &out, &[]), &[]));
    assert!(first.contains("inverted 4 (cache hits 0, stale 0)"), "{first}");
    let again = ok(&diffii(&base("invert", &data, &out, &[]), &[]));
    assert!(again.contains("inverted 0 (cache hits 4, stale 0)"), "{again}");
    // A changed source image: only its entry is recomputed, and the reason is reported.
    image::RgbImage::from_pixel(32, 32, image::Rgb([9, 99, 199])).save(data.join("sparrow/a.png")).unwrap();
    let changed = diffii(&base("invert", &data, &out, &[]), &[]);
    let stdout = ok(&changed);
    assert!(stdout.contains("inverted 1 (cache hits 3, stale 1)"), "{stdout}");
    assert!(String::from_utf8_lossy(&changed.stderr).contains("sparrow/a.png (image_sha256"), "{}", String::from_utf8_lossy(&changed.stderr));
    // Other settings (steps, prompt) invalidate every entry.
    let steps = ok(&diffii(&base("invert", &data, &out, &["--inversion-steps", "5"]), &[]));
    assert!(steps.contains("inverted 4 (cache hits 0, stale 4)"), "{steps}");
    let prompt = ok(&diffii(&base("invert", &data, &out, &["--inversion-steps", "5", "--superclass", "animal"]), &[]));
    assert!(prompt.contains("stale 4"), "{prompt}");
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn bad_input_gives_clear_errors() {
    let root = tmp("bad");
    let data = dataset(&root);
    let out = root.join("out");
    let gen = |extra: &[&str]| diffii(&base("generate", &data, &out, extra), &[]);

    let e = err(&diffii(&base("generate", &root.join("nope"), &out, &[]), &[]));
    assert!(e.contains("nope"), "{e}");
    let e = err(&gen(&["--stage1-steps", "99"]));
    assert!(e.contains("--stage1-steps 99") && e.contains("--steps 6"), "{e}");
    let e = err(&gen(&["--strength", "1.5"]));
    assert!(e.contains("--strength"), "{e}");
    let e = err(&gen(&["--size", "33"]));
    assert!(e.contains("33") && e.contains("VAE factor"), "{e}");
    let e = err(&gen(&["--shard", "3/3"]));
    assert!(e.contains("shard"), "{e}");
    let e = err(&gen(&["--concepts", "/nonexistent/learned_embeds.safetensors"]));
    assert!(e.contains("/nonexistent/learned_embeds.safetensors"), "{e}");

    // Numbers that would silently give blank images or an ignored setting are refused.
    for (args, expect) in [
        (vec!["--guidance", "NaN"], "--guidance NaN must be a finite number"),
        (vec!["--guidance", "inf"], "--guidance inf must be a finite number"),
        (vec!["--steps", "0"], "--steps must be at least 1"),
        (vec!["--per-class", "0"], "must be at least 1"),
        (vec!["--strength", "NaN"], "--strength NaN"),
        (vec!["--lora-scale", "NaN"], "--lora-scale NaN"),
        (vec!["--prompt-template", "a photo"], "has no {concept}"),
        (vec!["--interp", "slerp", "--t-min", "0.8", "--t-max", "0.2"], "t-min <= t-max"),
        (vec!["--t-min", "0.2"], "pass --interp slerp"),
        (vec!["--interp", "circle", "--t-max", "0.5"], "pass --interp slerp"),
    ] {
        let e = err(&gen(&args));
        assert!(e.contains(expect), "{args:?}: {e}");
        assert!(!out.join("manifest.jsonl").exists(), "{args:?} wrote a manifest");
    }
    let e = err(&diffii(
        &["concepts", "--model", common::tiny_sd().to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", root.join("c").to_str().unwrap(), "--superclass", "bird", "--lr", "NaN"]
            .map(String::from),
        &[],
    ));
    assert!(e.contains("--lr NaN must be a finite number"), "{e}");

    // A class without a concept token is named, not silently given a wrong prompt.
    let extra = root.join("data3");
    std::fs::create_dir_all(extra.join("owl")).unwrap();
    for c in ["sparrow", "gull"] {
        std::fs::create_dir_all(extra.join(c)).unwrap();
        std::fs::copy(data.join("gull/only.png"), extra.join(c).join("x.png")).unwrap();
    }
    std::fs::copy(data.join("gull/only.png"), extra.join("owl/x.png")).unwrap();
    let e = err(&diffii(&base("generate", &extra, &root.join("out3"), &[]), &[]));
    assert!(e.contains("owl"), "{e}");

    // An empty suffix file is reported, not fatal.
    let empty = root.join("empty.txt");
    std::fs::write(&empty, "\n# nothing\n").unwrap();
    let o = diffii(&base("generate", &data, &root.join("out4"), &["--suffixes", empty.to_str().unwrap()]), &[]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("no suffix lines"));

    // Reusing an output folder with other settings is refused.
    ok(&gen(&[]));
    let e = err(&gen(&["--guidance", "3"]));
    assert!(e.contains("run_config.json") && e.contains("guidance"), "{e}");
    std::fs::remove_dir_all(&root).ok();
}

/// A copy of the tiny model whose UNet output bias is NaN.
fn nan_model(root: &Path) -> PathBuf {
    let model = root.join("nan-model");
    common::copy_dir(&common::tiny_sd(), &model);
    let st = model.join("unet/diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&st, &candle_core::Device::Cpu).unwrap();
    let bias = tensors.get("conv_out.bias").unwrap();
    let nan = (bias.ones_like().unwrap() * f64::NAN).unwrap();
    tensors.insert("conv_out.bias".into(), nan);
    candle_core::safetensors::save(&tensors, &st).unwrap();
    model
}

#[test]
fn nan_in_the_model_stops_the_run_before_anything_is_written() {
    let root = tmp("nan");
    let data = dataset(&root);
    let model = nan_model(&root);
    let out = root.join("out");
    let mut args = base("generate", &data, &out, &[]);
    let i = args.iter().position(|a| a == "--model").unwrap();
    args[i + 1] = model.display().to_string();
    let e = err(&diffii(&args, &[]));
    assert!(e.contains("NaN or infinite") && e.contains("inversion of"), "{e}");
    let written: Vec<_> = walk(&out).into_iter().filter(|p| p.extension().is_some_and(|x| x == "png" || x == "jsonl" || x == "safetensors")).collect();
    assert!(written.is_empty(), "{written:?}");
    std::fs::remove_dir_all(&root).ok();
}
