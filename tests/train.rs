//! Concept learning on the tiny fixture model: the loss falls, frozen weights stay unchanged,
//! gradients of the token rows and LoRA matrices match finite differences, a run resumed from a
//! checkpoint equals an uninterrupted one, per-class mode, bad settings, and the round trip
//! file → load → generate.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor, Var};
use diffii::data::dataset::Dataset;
use diffii::data::image::ResizePolicy;
use diffii::rng::seeded_randn;
use diffii::sd::concepts::Concepts;
use diffii::sd::loader::{model_fingerprint, LoadOptions, StableDiffusion};
use diffii::sd::lora::{self, Lora};
use diffii::nn::Mode;
use diffii::train::concepts::{
    default_tokens, TrainMode, TrainOptions, TrainSettings, Trainer, DEFAULT_TEMPLATE, EMBEDS_FILE, LORA_FILE, LOSS_FILE,
};

fn tmp(name: &str) -> PathBuf {
    common::empty_temp_dir(&format!("train-{name}"))
}

/// Two classes of two 32 px images each, with distinct colour patterns.
fn dataset(root: &Path) -> Dataset {
    let data = root.join("data");
    for (class, seeds) in [("finch", [1u32, 2]), ("heron", [5, 6])] {
        std::fs::create_dir_all(data.join(class)).unwrap();
        for s in seeds {
            let img = image::RgbImage::from_fn(32, 32, |x, y| {
                let v = (x * 5 * s + y * 11 + s * 40) % 256;
                image::Rgb([v as u8, ((v * s) % 256) as u8, (255 - v) as u8])
            });
            img.save(data.join(class).join(format!("{s}.png"))).unwrap();
        }
    }
    Dataset::open(&data, None).unwrap()
}

fn load(dtype: DType) -> StableDiffusion {
    let opts = LoadOptions { dtype, mode: Mode::Train, concepts: false, ..LoadOptions::default() };
    StableDiffusion::load(&common::tiny_sd(), &opts).unwrap()
}

fn settings(ds: &Dataset, steps: usize) -> TrainSettings {
    TrainSettings {
        mode: TrainMode::Joint,
        steps,
        batch: 2,
        grad_accum: 1,
        lr: 5e-3,
        weight_decay: 1e-2,
        lora_rank: 0,
        lora_alpha: 0.0,
        lora_lr: 1e-3,
        resolution: 32,
        resize: ResizePolicy::Squash,
        flip: true,
        random_crop: false,
        templates: vec![DEFAULT_TEMPLATE.into()],
        superclass: "bird".into(),
        init_word: "bird".into(),
        init_embeds: None,
        init_embeds_sha256: None,
        classes: ds.classes.clone(),
        tokens: default_tokens(ds.classes.len()),
        seed: 3,
        checkpoint_every: 0,
        model_sha256: "m".into(),
        data_sha256: "d".into(),
    }
}

fn opts(out: &Path) -> TrainOptions {
    TrainOptions { out: out.to_path_buf(), resume: false, progress: false, stop_after: None }
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
}

/// Mean loss over a fixed set of draws (the first micro-batches of steps 0..n).
fn eval_loss(tr: &Trainer, rows: &Tensor, n: usize) -> f64 {
    (0..n).map(|s| scalar(&tr.loss(&tr.batch(0, s, 0).unwrap(), rows).unwrap())).sum::<f64>() / n as f64
}

#[test]
fn loss_falls_and_frozen_weights_stay_unchanged() {
    let root = tmp("falls");
    let ds = dataset(&root);
    let before_files = model_fingerprint(&common::tiny_sd()).unwrap();
    let mut sd = load(DType::F32);
    let probe_x = seeded_randn(7, &[1, 4, 16, 16], &Device::Cpu).unwrap();
    let ctx = sd.encode_prompt("a photo of a bird").unwrap();
    let unet_before = sd.unet.forward_t(&probe_x, 400, &ctx).unwrap();
    let emb_before = sd.text_encoder.token_embedding().copy().unwrap();
    let mut s = settings(&ds, 40);
    s.lora_rank = 2;
    s.lora_alpha = 2.0;
    let mut tr = Trainer::new(&mut sd, &ds, s, false).unwrap();
    let init_rows = tr.rows().copy().unwrap();
    let l0 = eval_loss(&tr, &init_rows, 12);
    let out = root.join("out");
    let summary = tr.run(&opts(&out)).unwrap();
    assert!(summary.finished && summary.steps_done == 40);
    let rows = tr.rows().copy().unwrap();
    let l1 = eval_loss(&tr, &rows, 12);
    eprintln!("fixed-draw loss before {l0:.5}, after {l1:.5}; logged first/last tenth {:.5} / {:.5}", summary.loss_first, summary.loss_last);
    assert!(l1 < 0.97 * l0, "loss did not fall: {l0} -> {l1}");
    assert!(bits(&rows) != bits(&init_rows), "rows did not change");
    // Both classes' rows trained (each appears in prompts of its own images).
    for k in 0..2 {
        assert!(bits(&rows.get(k).unwrap()) != bits(&init_rows.get(k).unwrap()), "row {k} did not change");
    }
    // Frozen: base vocabulary and every UNet weight (adapters removed) exactly as before.
    lora::detach_adapters(&mut tr.sd.unet);
    assert_eq!(bits(tr.sd.text_encoder.token_embedding()), bits(&emb_before));
    let unet_after = tr.sd.unet.forward_t(&probe_x, 400, &ctx).unwrap();
    assert_eq!(bits(&unet_after), bits(&unet_before), "a frozen UNet weight changed");
    assert_eq!(model_fingerprint(&common::tiny_sd()).unwrap(), before_files);
    // Outputs in diffusers formats.
    let c = Concepts::load(&out.join(EMBEDS_FILE), 32, &Device::Cpu).unwrap();
    assert_eq!(c.tokens, vec!["<class_0>", "<class_1>"]);
    assert_eq!(c.class_to_token.get("heron").map(String::as_str), Some("<class_1>"));
    assert_eq!(bits(&c.rows), bits(&rows));
    let l = Lora::load(&out.join(LORA_FILE)).unwrap();
    assert!(!l.entries.is_empty() && l.entries.iter().all(|e| e.rank() == 2 && e.scale() == 1.0));
    let log = std::fs::read_to_string(out.join(LOSS_FILE)).unwrap();
    assert_eq!(log.lines().count(), 41, "header + one line per step");
    assert!(!out.join("checkpoint.safetensors").exists(), "checkpoint left behind after a finished run");

    // A second run initialised from these rows (e.g. to tune a LoRA on top) starts exactly at them.
    let mut sd2 = load(DType::F32);
    let mut s2 = settings(&ds, 1);
    s2.init_embeds = Some(out.join(EMBEDS_FILE));
    let tr2 = Trainer::new(&mut sd2, &ds, s2.clone(), false).unwrap();
    assert_eq!(bits(tr2.rows()), bits(&rows));
    // Rows for other tokens: a clear error naming the file.
    let mut sd3 = load(DType::F32);
    s2.tokens = vec!["<a>".into(), "<b>".into()];
    let e = Trainer::new(&mut sd3, &ds, s2, false).err().expect("missing tokens must be refused").to_string();
    assert!(e.contains(EMBEDS_FILE) && e.contains("<a>"), "{e}");
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let root = tmp("resume");
    let ds = dataset(&root);
    let mut s = settings(&ds, 5);
    s.lora_rank = 1;
    s.lora_alpha = 1.0;
    s.grad_accum = 2;
    s.checkpoint_every = 2;
    let full = root.join("full");
    {
        let mut sd = load(DType::F32);
        Trainer::new(&mut sd, &ds, s.clone(), false).unwrap().run(&opts(&full)).unwrap();
    }
    let part = root.join("part");
    {
        let mut sd = load(DType::F32);
        let r = Trainer::new(&mut sd, &ds, s.clone(), false)
            .unwrap()
            .run(&TrainOptions { stop_after: Some(3), ..opts(&part) })
            .unwrap();
        assert!(!r.finished && r.steps_done == 3);
        assert!(part.join("checkpoint.safetensors").is_file());
        // Without --resume the folder is refused.
        let mut sd = load(DType::F32);
        let e = Trainer::new(&mut sd, &ds, s.clone(), false).unwrap().run(&opts(&part)).err().unwrap().to_string();
        assert!(e.contains("--resume"), "{e}");
    }
    {
        let mut sd = load(DType::F32);
        let r = Trainer::new(&mut sd, &ds, s.clone(), false)
            .unwrap()
            .run(&TrainOptions { resume: true, ..opts(&part) })
            .unwrap();
        assert!(r.finished && r.resumed_from == 3 && r.steps_done == 2, "{r:?}");
    }
    for f in [EMBEDS_FILE, LORA_FILE, LOSS_FILE, "concepts.json"] {
        assert!(std::fs::read(full.join(f)).unwrap() == std::fs::read(part.join(f)).unwrap(), "{f} differs");
    }
    // Other settings in the same folder are refused, naming the field.
    let mut other = s.clone();
    other.lr = 1.0;
    let mut sd = load(DType::F32);
    let e = Trainer::new(&mut sd, &ds, other, false).unwrap().run(&TrainOptions { resume: true, ..opts(&part) }).err().unwrap();
    assert!(e.to_string().contains("`lr` differs"), "{e}");
}

/// Central finite difference of `f` along `dir` (unit length) against <grad, dir>.
fn fd_check(var: &Var, grad: &Tensor, dir: &Tensor, h: f64, mut f: impl FnMut() -> f64) -> f64 {
    let dot = |a: &Tensor, b: &Tensor| scalar(&(a * b).unwrap().sum_all().unwrap());
    let dir = (dir / dot(dir, dir).sqrt()).unwrap();
    let base = var.as_tensor().copy().unwrap();
    var.set(&(&base + (&dir * h).unwrap()).unwrap()).unwrap();
    let lp = f();
    var.set(&(&base - (&dir * h).unwrap()).unwrap()).unwrap();
    let lm = f();
    var.set(&base).unwrap();
    let fd = (lp - lm) / (2.0 * h);
    let an = dot(grad, &dir);
    assert!(fd.abs() > 1e-9, "loss does not depend on this variable");
    (an - fd).abs() / fd.abs().max(an.abs())
}

#[test]
fn token_and_lora_gradients_match_finite_differences() {
    let root = tmp("grad");
    let ds = dataset(&root);
    let mut sd = load(DType::F64);
    let mut s = settings(&ds, 1);
    s.lora_rank = 2;
    s.lora_alpha = 2.0;
    s.random_crop = true; // exercise the per-draw encoding path too
    let tr = Trainer::new(&mut sd, &ds, s, false).unwrap();
    // A zero `up` would make the `down` gradient vanish: start from a random adapter.
    for (i, a) in tr.adapters.iter().enumerate() {
        a.up.set(&(seeded_randn(100 + i as u64, a.up.dims(), &Device::Cpu).unwrap().to_dtype(DType::F64).unwrap() * 0.1).unwrap()).unwrap();
    }
    let batch = tr.batch(0, 0, 0).unwrap();
    let rows = Var::from_tensor(tr.rows()).unwrap();
    let loss = tr.loss(&batch, rows.as_tensor()).unwrap();
    let grads = loss.backward().unwrap();
    let f = |r: &Tensor| scalar(&tr.loss(&batch, r).unwrap());
    let g = grads.get(rows.as_tensor()).expect("gradient reaches the token rows").clone();
    let dir = seeded_randn(1, g.dims(), &Device::Cpu).unwrap().to_dtype(DType::F64).unwrap();
    let rel = fd_check(&rows, &g, &dir, 1e-5, || f(rows.as_tensor()));
    eprintln!("token rows: relative error {rel:.3e}");
    assert!(rel < 1e-5, "token rows: {rel}");
    let picks = [0, tr.adapters.len() / 2, tr.adapters.len() - 1];
    for (n, &i) in picks.iter().enumerate() {
        let a = &tr.adapters[i];
        for (name, var) in [("down", &a.down), ("up", &a.up)] {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {} {name}", a.module)).clone();
            let dir = seeded_randn(10 + n as u64, g.dims(), &Device::Cpu).unwrap().to_dtype(DType::F64).unwrap();
            let rel = fd_check(var, &g, &dir, 1e-5, || f(rows.as_tensor()));
            eprintln!("{}.{name}: relative error {rel:.3e}", a.module);
            assert!(rel < 1e-5, "{} {name}: {rel}", a.module);
        }
    }
}

#[test]
fn per_class_mode_trains_each_row_and_rejects_lora() {
    let root = tmp("perclass");
    let ds = dataset(&root);
    let mut sd = load(DType::F32);
    let mut s = settings(&ds, 3);
    s.mode = TrainMode::PerClass;
    s.flip = false;
    let mut tr = Trainer::new(&mut sd, &ds, s.clone(), false).unwrap();
    let init = tr.rows().copy().unwrap();
    let r = tr.run(&opts(&root.join("out"))).unwrap();
    assert!(r.finished && r.steps_done == 6);
    for k in 0..2 {
        assert!(bits(&tr.rows().get(k).unwrap()) != bits(&init.get(k).unwrap()), "row {k} untouched");
    }
    let log = std::fs::read_to_string(root.join("out").join(LOSS_FILE)).unwrap();
    assert!(log.lines().nth(1).unwrap().starts_with("0,finch,1,") && log.lines().nth(4).unwrap().starts_with("1,heron,1,"), "{log}");
    s.lora_rank = 4;
    let mut sd = load(DType::F32);
    let e = Trainer::new(&mut sd, &ds, s, false).err().expect("LoRA in per-class mode must be refused").to_string();
    assert!(e.contains("--mode joint"), "{e}");
}

#[test]
fn bad_settings_are_clear_errors() {
    let root = tmp("bad");
    let ds = dataset(&root);
    let check = |what: &str, f: &dyn Fn(&mut TrainSettings), expect: &str| {
        let mut s = settings(&ds, 1);
        f(&mut s);
        let mut sd = load(DType::F32);
        let e = Trainer::new(&mut sd, &ds, s, false).err().unwrap_or_else(|| panic!("{what}: should fail")).to_string();
        assert!(e.contains(expect), "{what}: {e}");
    };
    check("resolution", &|s| s.resolution = 30, "multiple of 4");
    check("init word", &|s| s.init_word = " ".into(), "--init-word");
    check("known token", &|s| s.tokens[1] = "<|endoftext|>".into(), "already exists");
    check("duplicate token", &|s| s.tokens[1] = s.tokens[0].clone(), "given twice");
    check("template", &|s| s.templates = vec!["a photo".into()], "{concept}");
    check("steps", &|s| s.steps = 0, "--steps");
}

fn diffii(args: &[&str]) -> std::process::Output {
    diffii_env(args, &[])
}

fn diffii_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_diffii")).args(args).envs(env.iter().copied()).output().unwrap()
}

#[test]
fn cli_concepts_then_generate_round_trip() {
    let root = tmp("cli");
    let ds = dataset(&root);
    let data = ds.root.display().to_string();
    let model = common::tiny_sd().display().to_string();
    let out = root.join("concepts");
    let o = diffii(&[
        "concepts", "--model", &model, "--data", &data, "--out", out.to_str().unwrap(), "--superclass", "bird", "--steps", "3",
        "--lora-rank", "2", "--resolution", "32", "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let gen = root.join("gen");
    let o = diffii(&[
        "generate", "--model", &model, "--data", &data, "--out", gen.to_str().unwrap(), "--concepts",
        out.join(EMBEDS_FILE).to_str().unwrap(), "--lora", out.join(LORA_FILE).to_str().unwrap(), "--superclass", "bird",
        "--size", "32", "--inversion-steps", "4", "--steps", "4", "--per-class", "1", "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let manifest = std::fs::read_to_string(gen.join("manifest.jsonl")).unwrap();
    assert_eq!(manifest.lines().count(), 2);
    assert!(manifest.contains("a photo of a <class_0> bird") && manifest.contains("\"lora_sha256\":\""), "{manifest}");
    assert!(gen.join("finch/finch_00000.png").is_file() && gen.join("heron/heron_00000.png").is_file());
    // Diff-AUG is DA-Fusion's img2img on the LoRA model: the same pixels, its own name; without
    // a LoRA it is refused.
    let img2img = |method: &str, dir: &str, lora: bool| {
        let out_dir = root.join(dir);
        let mut args = vec![
            "generate", "--method", method, "--model", &model, "--data", &data, "--out", out_dir.to_str().unwrap(), "--superclass", "bird",
            "--size", "32", "--steps", "4", "--per-class", "1", "--quiet",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        args.extend(["--concepts".into(), out.join(EMBEDS_FILE).display().to_string()]);
        if lora {
            args.extend(["--lora".into(), out.join(LORA_FILE).display().to_string()]);
        }
        (diffii(&args.iter().map(String::as_str).collect::<Vec<_>>()), out_dir)
    };
    let (o, aug) = img2img("diff-aug", "aug", true);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (o, fusion) = img2img("da-fusion", "fusion", true);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let png = "finch/finch_00000.png";
    assert_eq!(std::fs::read(aug.join(png)).unwrap(), std::fs::read(fusion.join(png)).unwrap());
    assert!(std::fs::read_to_string(aug.join("manifest.jsonl")).unwrap().contains("\"method\":\"diff-aug\""));
    let (o, _) = img2img("diff-aug", "aug-without", false);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("LoRA"), "{e}");
    // compare runs it from a concepts + LoRA folder.
    let test = root.join("test");
    common::copy_dir(&ds.root, &test);
    let o = diffii(&[
        "compare", "--model", &model, "--data", &data, "--test", test.to_str().unwrap(), "--out", root.join("cmp").to_str().unwrap(),
        "--methods", "none,diff-aug", "--diff-aug-concepts", out.to_str().unwrap(), "--concepts", out.join(EMBEDS_FILE).to_str().unwrap(),
        "--superclass", "bird", "--steps", "4", "--per-class", "1", "--seeds", "0", "--epochs", "1", "--batch", "2", "--size", "16",
        "--val-per-class", "1", "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = std::fs::read_to_string(root.join("cmp/results.md")).unwrap();
    assert!(table.contains("| diff-aug |"), "{table}");
    assert!(std::fs::read_to_string(root.join("cmp/diff-aug/seed-0/synthetic/manifest.jsonl")).unwrap().contains("\"lora_sha256\":\""));
    // The class map and a missing superclass / init word are checked before any work.
    let o = diffii(&["concepts", "--model", &model, "--data", &data, "--out", root.join("x").to_str().unwrap(), "--quiet"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--superclass"));
    let map = root.join("map.json");
    std::fs::write(&map, r#"{"finch": "<f>"}"#).unwrap();
    let o = diffii(&[
        "concepts", "--model", &model, "--data", &data, "--out", root.join("y").to_str().unwrap(), "--superclass", "bird",
        "--class-map", map.to_str().unwrap(), "--quiet",
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("map.json") && e.contains("heron"), "{e}");
}

#[test]
fn cli_concepts_bytes_do_not_depend_on_thread_count() {
    let root = tmp("threads");
    let ds = dataset(&root);
    let data = ds.root.display().to_string();
    let model = common::tiny_sd().display().to_string();
    let run = |threads: &str| -> PathBuf {
        let out = root.join(format!("t{threads}"));
        let o = diffii_env(
            &[
                "concepts", "--model", &model, "--data", &data, "--out", out.to_str().unwrap(), "--superclass", "bird", "--steps", "4",
                "--batch", "2", "--lora-rank", "2", "--resolution", "32", "--flip", "--quiet",
            ],
            &[("RAYON_NUM_THREADS", threads)],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        out
    };
    let (a, b) = (run("1"), run("2"));
    for f in [EMBEDS_FILE, LORA_FILE, LOSS_FILE] {
        assert!(std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap(), "{f} differs between 1 and 2 threads");
    }
}
