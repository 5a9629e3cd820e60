//! UNet LoRA: the three diffusers key layouts, saving in the PEFT layout, and merging into the
//! attention projections of the tiny UNet.
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, tiny_sd};
use diffii::rng::seeded_randn;
use diffii::sd::config::UNetConfig;
use diffii::sd::loader::weights_file;
use diffii::sd::lora::{apply_lora, Lora, LoraEntry};
use diffii::nn::Mode;
use diffii::sd::unet::UNet;
use diffii::nn::weights::Weights;

/// A square self-attention query, a non-square cross-attention key (in = cross_attention_dim),
/// and an output projection (`to_out.0`, which the old layout calls `to_out_lora`).
const MODULES: [&str; 3] = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
    "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0",
];
const RANK: usize = 2;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn fresh_dir(name: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("diffii-lora-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tiny_unet() -> UNet {
    let dir = tiny_sd().join("unet");
    let w = Weights::from_file(&weights_file(&dir).unwrap(), DType::F32, &Device::Cpu).unwrap();
    UNet::load(&w, &UNetConfig::from_file(&dir.join("config.json")).unwrap(), Mode::Infer).unwrap()
}

fn weight_of(unet: &mut UNet, module: &str) -> Tensor {
    let projs = unet.attention_projections_mut();
    let names: Vec<String> = projs.iter().map(|(n, _)| n.clone()).collect();
    let (_, lin) = projs.into_iter().find(|(n, _)| n == module).unwrap_or_else(|| panic!("{module} not in {names:?}"));
    lin.weight.clone()
}

fn set_weight(unet: &mut UNet, module: &str, w: Tensor) {
    let mut projs = unet.attention_projections_mut();
    let (_, lin) = projs.iter_mut().find(|(n, _)| n == module).unwrap();
    lin.weight = w;
}

/// A rank-`RANK` LoRA for `MODULES` with values of a useful size, shaped from the UNet's layers.
fn random_lora(unet: &mut UNet, seed: u64) -> Lora {
    let entries = MODULES
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let (out, inp) = weight_of(unet, m).dims2().unwrap();
            let s = seed + 10 * i as u64;
            LoraEntry {
                module: m.to_string(),
                down: (seeded_randn(s, &[RANK, inp], &Device::Cpu).unwrap() * 0.3).unwrap(),
                up: (seeded_randn(s + 1, &[out, RANK], &Device::Cpu).unwrap() * 0.3).unwrap(),
                alpha: None,
            }
        })
        .collect();
    Lora { entries }
}

/// The UNet's eps on a fixed probe input.
fn probe(unet: &UNet) -> Tensor {
    let x = seeded_randn(11, &[1, 4, 8, 8], &Device::Cpu).unwrap();
    let ctx = seeded_randn(12, &[1, 7, 32], &Device::Cpu).unwrap();
    unet.forward_t(&x, 500, &ctx).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn save_st(path: &Path, tensors: Vec<(String, Tensor)>) {
    let map: HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

/// The old `save_attn_procs` layout: `<attention>.processor.to_q_lora.down.weight`, no prefix.
fn old_processor_key(module: &str, part: &str) -> String {
    let (attn, proj) = module.rsplit_once(".to_").unwrap();
    let proj = if proj == "out.0" { "to_out".to_string() } else { format!("to_{proj}") };
    format!("{attn}.processor.{proj}_lora.{part}.weight")
}

fn assert_same_entries(a: &Lora, b: &Lora) {
    let sorted = |l: &Lora| {
        let mut e = l.entries.clone();
        e.sort_by(|x, y| x.module.cmp(&y.module));
        e
    };
    let (a, b) = (sorted(a), sorted(b));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.module, y.module);
        assert_eq!(x.alpha, y.alpha, "alpha of {}", x.module);
        assert_eq!(values(&x.down), values(&y.down), "down of {}", x.module);
        assert_eq!(values(&x.up), values(&y.up), "up of {}", x.module);
        assert_eq!(x.down.dims(), y.down.dims());
        assert_eq!(x.up.dims(), y.up.dims());
    }
}

fn load_err(path: &Path) -> String {
    match Lora::load(path) {
        Ok(l) => panic!("{} should not load; got {} entries", path.display(), l.entries.len()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error message should mention {p:?}; it is:\n{msg}");
    }
}

// ------------------------------------------------------------------------------------------
// layouts
// ------------------------------------------------------------------------------------------

#[test]
fn saved_lora_reloads_and_all_three_layouts_agree() {
    let mut unet = tiny_unet();
    let lora = random_lora(&mut unet, 1);
    let dir = fresh_dir("layouts");

    let peft = dir.join("pytorch_lora_weights.safetensors");
    lora.save(&peft).unwrap();
    // Exactly diffusers' PEFT names and shapes.
    let raw = candle_core::safetensors::load(&peft, &Device::Cpu).unwrap();
    assert_eq!(raw.len(), 2 * MODULES.len());
    for e in &lora.entries {
        assert_eq!(raw[&format!("unet.{}.lora_A.weight", e.module)].dims(), e.down.dims());
        assert_eq!(raw[&format!("unet.{}.lora_B.weight", e.module)].dims(), e.up.dims());
    }
    assert_same_entries(&Lora::load(&peft).unwrap(), &lora);

    let old = dir.join("old_attn_procs.safetensors");
    save_st(
        &old,
        lora.entries
            .iter()
            .flat_map(|e| {
                [(old_processor_key(&e.module, "down"), e.down.clone()), (old_processor_key(&e.module, "up"), e.up.clone())]
            })
            .collect(),
    );
    assert_same_entries(&Lora::load(&old).unwrap(), &lora);

    let dotted = dir.join("lora_dot.safetensors");
    save_st(
        &dotted,
        lora.entries
            .iter()
            .flat_map(|e| {
                [
                    (format!("unet.{}.lora.down.weight", e.module), e.down.clone()),
                    (format!("unet.{}.lora.up.weight", e.module), e.up.clone()),
                ]
            })
            .collect(),
    );
    assert_same_entries(&Lora::load(&dotted).unwrap(), &lora);

    let hashes: Vec<String> =
        [&peft, &old, &dotted].iter().map(|p| Lora::load(p).unwrap().sha256()).collect();
    assert!(hashes.iter().all(|h| *h == lora.sha256()), "{hashes:?}");
    let mut changed = lora.clone();
    changed.entries[0].up = (changed.entries[0].up.clone() * 2.0).unwrap();
    assert_ne!(changed.sha256(), lora.sha256());
}

#[test]
fn alphas_come_from_tensors_or_the_peft_metadata() {
    let mut unet = tiny_unet();
    let mut lora = random_lora(&mut unet, 2);
    let dir = fresh_dir("alpha");

    // `<module>.alpha` tensors.
    let with_tensor = dir.join("alpha_tensor.safetensors");
    let mut tensors = Vec::new();
    for (i, e) in lora.entries.iter().enumerate() {
        tensors.push((format!("unet.{}.lora_A.weight", e.module), e.down.clone()));
        tensors.push((format!("unet.{}.lora_B.weight", e.module), e.up.clone()));
        if i == 0 {
            tensors.push((format!("unet.{}.alpha", e.module), Tensor::new(8f32, &Device::Cpu).unwrap()));
        }
    }
    save_st(&with_tensor, tensors);
    let back = Lora::load(&with_tensor).unwrap();
    let by_module: HashMap<&str, &LoraEntry> = back.entries.iter().map(|e| (e.module.as_str(), e)).collect();
    assert_eq!(by_module[MODULES[0]].alpha, Some(8.0));
    assert_eq!(by_module[MODULES[0]].scale(), 4.0);
    assert_eq!(by_module[MODULES[1]].alpha, None);
    assert_eq!(by_module[MODULES[1]].scale(), 1.0);

    // Saved alphas travel as diffusers' PEFT config; a missing alpha means alpha = r.
    lora.entries[0].alpha = Some(8.0);
    lora.entries[2].alpha = Some(0.5);
    let saved = dir.join("alpha_meta.safetensors");
    lora.save(&saved).unwrap();
    let back = Lora::load(&saved).unwrap();
    for (orig, got) in lora.entries.iter().zip(&back.entries) {
        assert_eq!(orig.module, got.module);
        assert_eq!(orig.scale(), got.scale(), "scale of {}", orig.module);
    }
    let buf = std::fs::read(&saved).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&buf).unwrap();
    let json = &meta.metadata().as_ref().unwrap()["lora_adapter_metadata"];
    let cfg: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(cfg["unet.r"], 2);
    for (m, want) in MODULES.iter().zip([8.0, 2.0, 0.5]) {
        let alpha = cfg["unet.alpha_pattern"].get(m).unwrap_or(&cfg["unet.lora_alpha"]);
        assert_eq!(alpha.as_f64(), Some(want), "PEFT alpha of {m} in {cfg}");
    }
}

#[test]
fn text_encoder_and_unknown_keys_are_errors() {
    let mut unet = tiny_unet();
    let lora = random_lora(&mut unet, 3);
    let dir = fresh_dir("keys");
    let e = &lora.entries[0];
    let base = vec![
        (format!("unet.{}.lora_A.weight", e.module), e.down.clone()),
        (format!("unet.{}.lora_B.weight", e.module), e.up.clone()),
    ];

    let te = dir.join("with_te.safetensors");
    let mut t = base.clone();
    let q = Tensor::zeros((RANK, 32), DType::F32, &Device::Cpu).unwrap();
    t.push(("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight".into(), q));
    save_st(&te, t);
    assert_mentions(&load_err(&te), &[&te.display().to_string(), "text-encoder", "not supported"]);

    let odd = dir.join("odd.safetensors");
    let mut t = base.clone();
    t.push(("unet.conv_in.weight".into(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap()));
    save_st(&odd, t);
    assert_mentions(&load_err(&odd), &[&odd.display().to_string(), "unet.conv_in.weight"]);

    let half = dir.join("half.safetensors");
    save_st(&half, base[..1].to_vec());
    assert_mentions(&load_err(&half), &[&half.display().to_string(), MODULES[0]]);

    let kohya = dir.join("kohya.safetensors");
    save_st(&kohya, vec![("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight".into(), e.down.clone())]);
    assert_mentions(&load_err(&kohya), &[&kohya.display().to_string(), "kohya"]);
}

// ------------------------------------------------------------------------------------------
// merging
// ------------------------------------------------------------------------------------------

#[test]
fn merged_weights_are_w_plus_scaled_up_down() {
    let mut unet = tiny_unet();
    let before = probe(&unet);
    let mut lora = random_lora(&mut unet, 4);
    lora.entries[1].alpha = Some(1.0); // scale 1/2 for that module
    let scale = 0.7;
    let originals: Vec<Tensor> = MODULES.iter().map(|m| weight_of(&mut unet, m)).collect();

    let mut merged = tiny_unet();
    assert_eq!(apply_lora(&mut merged, &lora, scale).unwrap(), MODULES.len());

    // Reference: W + scale * (alpha / r) * up @ down, summed by hand in f64.
    let mut manual = tiny_unet();
    for (e, w0) in lora.entries.iter().zip(&originals) {
        let (out, inp) = w0.dims2().unwrap();
        let (w, up, down) = (values(w0), values(&e.up), values(&e.down));
        let s = scale * e.alpha.map_or(1.0, |a| a / RANK as f64);
        let mut want = vec![0f32; out * inp];
        for o in 0..out {
            for i in 0..inp {
                let d: f64 = (0..RANK).map(|k| up[o * RANK + k] as f64 * down[k * inp + i] as f64).sum();
                want[o * inp + i] = (w[o * inp + i] as f64 + s * d) as f32;
            }
        }
        let want = Tensor::from_vec(want, (out, inp), &Device::Cpu).unwrap();
        let got = weight_of(&mut merged, &e.module);
        assert!(max_abs_diff(&got, &want) < 1e-6, "{}: merged weight off by {}", e.module, max_abs_diff(&got, &want));
        assert!(max_abs_diff(&got, w0) > 1e-3, "{}: weight did not change", e.module);
        set_weight(&mut manual, &e.module, want);
    }
    // Untouched projections stay bit-identical.
    let other = "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v";
    assert_eq!(values(&weight_of(&mut merged, other)), values(&weight_of(&mut unet, other)));

    let (got, want) = (probe(&merged), probe(&manual));
    assert!(max_abs_diff(&got, &want) < 1e-5, "merged UNet differs from the hand-merged one by {}", max_abs_diff(&got, &want));
    assert!(max_abs_diff(&got, &before) > 1e-4, "the LoRA did not change the UNet's output");
}

#[test]
fn zero_up_lora_leaves_outputs_bit_identical() {
    let mut unet = tiny_unet();
    let before = probe(&unet);
    let mut lora = random_lora(&mut unet, 5);
    for e in &mut lora.entries {
        e.up = e.up.zeros_like().unwrap();
    }
    assert_eq!(apply_lora(&mut unet, &lora, 1.0).unwrap(), MODULES.len());
    assert_eq!(values(&probe(&unet)), values(&before));
}

#[test]
fn unknown_module_is_an_error_and_nothing_is_merged() {
    let mut unet = tiny_unet();
    let before = weight_of(&mut unet, MODULES[0]);
    let mut lora = random_lora(&mut unet, 6);
    let bogus = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_z";
    lora.entries.push(LoraEntry { module: bogus.into(), ..lora.entries[0].clone() });
    let msg = apply_lora(&mut unet, &lora, 1.0).unwrap_err().to_string();
    assert_mentions(&msg, &[bogus, "not an attention projection"]);
    assert_eq!(values(&weight_of(&mut unet, MODULES[0])), values(&before), "a failed merge changed weights");

    let conv = Lora { entries: vec![LoraEntry { module: "conv_in".into(), ..lora.entries[0].clone() }] };
    assert_mentions(&apply_lora(&mut unet, &conv, 1.0).unwrap_err().to_string(), &["`conv_in`"]);
}

#[test]
fn shape_mismatch_is_an_error_naming_module_and_shapes() {
    let mut unet = tiny_unet();
    let lora = random_lora(&mut unet, 7);
    // The cross-attention key reads 32-wide text features; a LoRA for 64-wide input cannot fit.
    let e = &lora.entries[1];
    let (out, _) = weight_of(&mut unet, &e.module).dims2().unwrap();
    let wrong = LoraEntry { down: Tensor::zeros((RANK, 64), DType::F32, &Device::Cpu).unwrap(), ..e.clone() };
    let msg = apply_lora(&mut unet, &Lora { entries: vec![wrong] }, 1.0).unwrap_err().to_string();
    assert_mentions(&msg, &[&e.module, "[2, 64]", &format!("[{out}, 32]")]);

    // Rank disagreement between down and up.
    let wrong = LoraEntry { up: Tensor::zeros((out, RANK + 1), DType::F32, &Device::Cpu).unwrap(), ..e.clone() };
    let msg = apply_lora(&mut unet, &Lora { entries: vec![wrong] }, 1.0).unwrap_err().to_string();
    assert_mentions(&msg, &[&e.module, &format!("[{out}, 3]")]);
}
