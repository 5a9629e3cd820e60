//! `diffii pretrain` on a tiny dataset: every parameter of the VAE, text encoder and UNet gets
//! its true gradient (finite differences in f64), the loss falls, a killed run resumes to the
//! same bytes, and the exported folder loads as an SD-1.x model.
mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use diffii::data::dataset::Dataset;
use diffii::nn::{Mode, Weights};
use diffii::rng::seeded_randn;
use diffii::sd::clip::ClipTextEncoder;
use diffii::sd::config::{ClipConfig, UNetConfigFile, VaeConfig};
use diffii::sd::loader::{LoadOptions, StableDiffusion};
use diffii::sd::unet::UNet;
use diffii::sd::vae::Vae;
use diffii::train::diffusion::{noise_prediction_loss, Batch};
use diffii::train::pretrain::{captions, run, vae_loss, vocab::Vocab, Architecture, Cadence, Phase, PretrainSettings};

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// Central finite difference of `f` along a random unit direction over ALL `vars` against the
/// analytic directional derivative: a parameter whose gradient were dropped or wrong would
/// break the equality.
fn check_all(vars: &[Var], f: impl Fn() -> Tensor) -> (f64, f64) {
    let l = f();
    let grads = l.backward().unwrap();
    let dirs: Vec<Tensor> = vars.iter().enumerate().map(|(i, v)| seeded_randn(100 + i as u64, v.dims(), &Device::Cpu).unwrap().to_dtype(DType::F64).unwrap()).collect();
    let norm: f64 = dirs.iter().map(|d| scalar(&d.sqr().unwrap().sum_all().unwrap())).sum::<f64>().sqrt();
    let mut missing = Vec::new();
    let mut an = 0.0;
    for (i, (v, d)) in vars.iter().zip(&dirs).enumerate() {
        match grads.get(v.as_tensor()) {
            Some(g) => an += scalar(&(g * d).unwrap().sum_all().unwrap()) / norm,
            None => missing.push(i),
        }
    }
    assert!(missing.is_empty(), "no gradient reached parameters {missing:?}");
    let h = 1e-5;
    let base: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().copy().unwrap()).collect();
    let at = |sign: f64| {
        for ((v, b), d) in vars.iter().zip(&base).zip(&dirs) {
            v.set(&(b + (d * (sign * h / norm)).unwrap()).unwrap()).unwrap();
        }
        scalar(&f())
    };
    let fd = (at(1.0) - at(-1.0)) / (2.0 * h);
    for (v, b) in vars.iter().zip(&base) {
        v.set(b).unwrap();
    }
    (an, fd)
}

fn rel(an: f64, fd: f64) -> f64 {
    (an - fd).abs() / an.abs().max(fd.abs()).max(1e-30)
}

fn write_json(path: &Path, v: &serde_json::Value) {
    std::fs::write(path, serde_json::to_string(v).unwrap()).unwrap();
}

#[test]
fn vae_loss_gradient_reaches_every_parameter() {
    let dir = common::empty_temp_dir("pretrain-grad-vae");
    let arch = Architecture::tiny();
    let path = dir.join("vae.json");
    write_json(&path, &arch.vae_config(1.0));
    let config = VaeConfig::from_file(&path).unwrap();
    let w = Weights::synthetic(7, DType::F64, &Device::Cpu).with_all_trainable();
    let vae = Vae::load(&w, &config, Mode::Train).unwrap();
    let vars: Vec<Var> = w.vars().into_iter().map(|(_, v)| v).collect();
    assert!(vars.len() > 50, "every VAE tensor is a parameter ({})", vars.len());
    let x = (seeded_randn(1, &[2, 3, 16, 16], &Device::Cpu).unwrap().to_dtype(DType::F64).unwrap() * 0.5).unwrap();
    let (an, fd) = check_all(&vars, || vae_loss(&vae, &x, 3, 0.1).unwrap());
    eprintln!("VAE loss: analytic {an:.10e}, finite difference {fd:.10e}");
    assert!(rel(an, fd) < 1e-4, "relative error {}", rel(an, fd));
}

#[test]
fn denoiser_loss_gradient_reaches_every_parameter() {
    let dir = common::empty_temp_dir("pretrain-grad-unet");
    let arch = Architecture::tiny();
    let vocab = Vocab::for_words(&captions::vocabulary());
    let (up, cp) = (dir.join("unet.json"), dir.join("clip.json"));
    write_json(&up, &arch.unet_config());
    write_json(&cp, &arch.text_config(&vocab));
    let unet_cfg = serde_json::from_value::<UNetConfigFile>(arch.unet_config()).unwrap().validate(&up).unwrap();
    let clip_cfg = ClipConfig::from_file(&cp).unwrap();
    let w = Weights::synthetic(8, DType::F64, &Device::Cpu).with_all_trainable();
    let te = ClipTextEncoder::load(&w.pp("text_encoder"), &clip_cfg, Mode::Train).unwrap();
    let unet = UNet::load(&w.pp("unet"), &unet_cfg, Mode::Train).unwrap();
    let vars: Vec<Var> = w.vars().into_iter().map(|(_, v)| v).collect();
    let n = arch.max_length;
    let ids: Vec<u32> = (0..2 * n as u32).map(|i| (i * 7) % vocab.len() as u32).collect();
    let alphas: Vec<f32> = (0..1000).map(|t| 1.0 - t as f32 / 1001.0).collect();
    let batch = Batch {
        latents: seeded_randn(4, &[2, 4, 8, 8], &Device::Cpu).unwrap().to_dtype(DType::F64).unwrap(),
        noise: seeded_randn(5, &[2, 4, 8, 8], &Device::Cpu).unwrap().to_dtype(DType::F64).unwrap(),
        timesteps: vec![100, 700],
        ids: Tensor::from_vec(ids, (2, n), &Device::Cpu).unwrap(),
    };
    let pred = diffii::schedule::ddim::PredictionType::Epsilon;
    let (an, fd) = check_all(&vars, || noise_prediction_loss(&te, &unet, &alphas, pred, &batch, None).unwrap());
    eprintln!("denoiser loss: analytic {an:.10e}, finite difference {fd:.10e}");
    assert!(rel(an, fd) < 1e-4, "relative error {}", rel(an, fd));
}

/// 48 images of bright rectangles of varied size, aspect and brightness on black.
fn shapes_dataset(dir: &Path) -> PathBuf {
    let root = dir.join("data");
    for i in 0..48u32 {
        let class = root.join(format!("c{}", i % 3));
        std::fs::create_dir_all(&class).unwrap();
        let (w, h) = (4 + (i * 5) % 10, 4 + (i * 3) % 10);
        let v = 120 + ((i * 37) % 130) as u8;
        let img = image::GrayImage::from_fn(16, 16, |x, y| {
            let inside = x >= 8 - w / 2 && x < 8 + w / 2 && y >= 8 - h / 2 && y < 8 + h / 2;
            image::Luma([if inside { v.saturating_sub(((x + y) % 3 * 20) as u8) } else { 0 }])
        });
        img.save(class.join(format!("{i:03}.png"))).unwrap();
    }
    root
}

fn settings() -> PretrainSettings {
    PretrainSettings {
        arch: Architecture::tiny(),
        vae: Phase { steps: 40, batch: 8, lr: 2e-3, warmup: 5 },
        unet: Phase { steps: 40, batch: 8, lr: 1e-3, warmup: 5 },
        ..PretrainSettings::demo()
    }
}

fn cadence(stop_after: Option<usize>) -> Cadence {
    Cadence { checkpoint_every: 7, sample_every: 20, sample_steps: 5, progress: false, stop_after, ..Cadence::default() }
}

fn losses(csv: &Path) -> Vec<f64> {
    std::fs::read_to_string(csv).unwrap().lines().skip(1).map(|l| l.split(',').nth(1).unwrap().parse().unwrap()).collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

fn model_files(model: &Path) -> Vec<(String, Vec<u8>)> {
    ["vae/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "vae/config.json"]
        .iter()
        .map(|f| (f.to_string(), std::fs::read(model.join(f)).unwrap()))
        .collect()
}

#[test]
fn pretraining_learns_resumes_exactly_and_exports_a_loadable_model() {
    let dir = common::empty_temp_dir("pretrain-run");
    let ds = Dataset::open(shapes_dataset(&dir), None).unwrap();
    let s = settings();

    let full = dir.join("full");
    let r = run(&ds, &s, &cadence(None), &full).unwrap();
    assert!(r.finished && r.images == 48);
    let vae = losses(&full.join("loss-vae.csv"));
    let unet = losses(&full.join("loss-unet.csv"));
    assert_eq!((vae.len(), unet.len()), (40, 40));
    assert!(mean(&vae[35..]) < 0.7 * mean(&vae[..5]), "VAE loss did not fall: {vae:?}");
    assert!(mean(&unet[30..]) < 0.9 * mean(&unet[..5]), "UNet loss did not fall: {unet:?}");
    let sf = r.scaling_factor.unwrap();
    assert!(sf.is_finite() && sf > 0.0);

    // Killed mid-VAE, then mid-UNet, then finished: the same bytes as the uninterrupted run.
    let resumed = dir.join("resumed");
    let a = run(&ds, &s, &cadence(Some(13)), &resumed).unwrap();
    assert!(!a.finished);
    let b = run(&ds, &s, &cadence(Some(27)), &resumed).unwrap();
    assert!(!b.finished && b.scaling_factor == Some(sf), "the VAE phase finished, the UNet phase did not");
    let c = run(&ds, &s, &cadence(Some(11)), &resumed).unwrap();
    assert!(!c.finished);
    let d = run(&ds, &s, &cadence(None), &resumed).unwrap();
    assert!(d.finished);
    for ((name, x), (_, y)) in model_files(&full.join("model")).iter().zip(model_files(&resumed.join("model"))) {
        assert!(*x == y, "{name} differs after resuming");
    }
    assert_eq!(losses(&full.join("loss-unet.csv")), losses(&resumed.join("loss-unet.csv")));

    // Other settings in the same folder are refused, naming the setting.
    let other = PretrainSettings { seed: 1, ..s.clone() };
    let e = run(&ds, &other, &cadence(None), &full).unwrap_err().to_string();
    assert!(e.contains("seed"), "{e}");

    // The folder loads as an SD-1.x model; its tokenizer gives each caption word one token.
    let sd = StableDiffusion::load(&full.join("model"), &LoadOptions::default()).unwrap();
    let ids = sd.tokenizer.encode("an item dark narrow patterned").unwrap();
    assert_eq!(ids.len(), 8);
    assert_eq!(ids[6], sd.tokenizer.eos_id(), "5 words + start + end: {ids:?}");
    let info = diffii::sd::inspect::inspect(&full.join("model")).unwrap();
    assert!(format!("{info}").contains("UNet2DConditionModel"));
    for g in ["samples-000020.png", "samples-000040.png", "inversion.png"] {
        let img = image::open(full.join("grids").join(g)).unwrap();
        assert_eq!(img.width(), 8 * 16, "{g}");
    }
}

#[test]
fn captions_never_name_a_class_and_follow_the_tertiles() {
    let attrs: Vec<[f64; 4]> = (0..30).map(|i| [i as f64, (30 - i) as f64, 1.0, (i % 10) as f64]).collect();
    let c = captions::Captioner::fit(&attrs, 1.0, 0.0);
    assert_eq!(c.words(&attrs[0]), vec!["dark", "large", "plain"]);
    assert_eq!(c.words(&attrs[29]), vec!["light", "small", "patterned"]);
    let mut rng = diffii::rng::derive_rng(&[b"t"]);
    assert_eq!(c.caption(&attrs[29], &mut rng), "an item light small patterned");
    let empty = captions::Captioner { empty: 1.0, ..c };
    assert_eq!(empty.caption(&attrs[29], &mut rng), "");
}
