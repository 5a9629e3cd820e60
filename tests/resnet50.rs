//! ResNet-50 forward parity with torchvision: `scripts/reference/ref_resnet50.py` fills
//! torchvision's `resnet50` with closed-form weights (a function of each key and element
//! index), runs a closed-form input through it in eval mode and stores the logits in
//! `tests/fixtures/resnet50_ref.json`; here the same weights are rebuilt under the same keys,
//! loaded into our ResNet-50, and the logits must agree within 1e-4 (relative to their largest
//! magnitude). A torchvision checkpoint therefore loads and runs here unchanged.
use std::collections::HashMap;

use candle_core::{Device, Tensor};
use diffii::classify::resnet::{from_state, init_weights, InputNorm, ResNetConfig};

/// The script's weight formula (see its doc string).
fn values(key: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let phase = (key.bytes().map(|b| b as u64).sum::<u64>() % 97) as f64 / 10.0;
    (0..n)
        .map(|i| {
            let s = (0.37 * i as f64 + phase).sin();
            let v = if key.ends_with("running_var") {
                0.5 + 0.25 * (1.0 + s)
            } else if key.ends_with("running_mean") {
                0.05 * s
            } else if shape.len() == 4 {
                (2.0 / (shape[1] * shape[2] * shape[3]) as f64).sqrt() * s
            } else if key.starts_with("fc.") || key.ends_with("bias") {
                (if key.ends_with("bias") && !key.starts_with("fc.") { 0.05 } else { 0.02 }) * s
            } else {
                1.0 + 0.1 * s
            };
            v as f32
        })
        .collect()
}

#[test]
fn resnet50_matches_torchvision() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/resnet50_ref.json");
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).expect("tests/fixtures/resnet50_ref.json")).unwrap();
    let classes = reference["classes"].as_u64().unwrap() as usize;
    // The reference feeds its input to the network as is: no ImageNet normalisation here.
    let config = ResNetConfig { input_norm: InputNorm::Identity, ..ResNetConfig::resnet50(classes) };
    let keys = init_weights(&config, 0).unwrap();
    assert_eq!(keys.len(), 267, "torchvision's resnet50 has 267 tensors besides num_batches_tracked");
    let state: HashMap<String, Tensor> = keys
        .iter()
        .map(|(k, t)| (k.clone(), Tensor::from_vec(values(k, t.dims()), t.dims(), &Device::Cpu).unwrap()))
        .collect();
    let model = from_state(state, &config, &Device::Cpu).unwrap();
    let shape: Vec<usize> = reference["input_shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let n: usize = shape.iter().product();
    let x = Tensor::from_vec((0..n).map(|i| (0.011 * i as f64).sin() as f32).collect::<Vec<_>>(), shape.as_slice(), &Device::Cpu).unwrap();
    let got: Vec<f32> = model.forward(&x, false).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<f64> = reference["logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    let err = got.iter().zip(&want).fold(0f64, |m, (g, w)| m.max((*g as f64 - w).abs()));
    eprintln!("resnet50 vs torchvision {}: max abs error {err:.2e}, relative {:.2e}", reference["torchvision"], err / scale);
    assert!(err / scale <= 1e-4, "max abs error {err} against logits up to {scale}");
}

#[test]
fn imagenet_normalisation_maps_minus_one_one_to_torchvision_inputs() {
    // With ImageNet normalisation the model sees (x01 - mean) / std of x01 = (x + 1) / 2:
    // the same logits as the identity model fed that tensor.
    let mut config = ResNetConfig::resnet50(3);
    config.blocks = vec![1, 1, 1, 1];
    let w = init_weights(&config, 1).unwrap();
    let norm = from_state(w.clone(), &config, &Device::Cpu).unwrap();
    let ident = from_state(w, &ResNetConfig { input_norm: InputNorm::Identity, ..config.clone() }, &Device::Cpu).unwrap();
    let x = (diffii::rng::seeded_randn(3, &[1, 3, 32, 32], &Device::Cpu).unwrap().tanh().unwrap()).contiguous().unwrap();
    let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let (mean, std) = (diffii::classify::resnet::IMAGENET_MEAN, diffii::classify::resnet::IMAGENET_STD);
    let manual: Vec<f32> = v.iter().enumerate().map(|(i, &x)| { let c = i / (32 * 32) % 3; ((((x as f64) + 1.0) / 2.0 - mean[c]) / std[c]) as f32 }).collect();
    let manual = Tensor::from_vec(manual, (1, 3, 32, 32), &Device::Cpu).unwrap();
    let a: Vec<f32> = norm.forward(&x, false).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = ident.forward(&manual, false).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    for (p, q) in a.iter().zip(&b) {
        assert!((p - q).abs() <= 1e-4 * q.abs().max(1.0), "{a:?} vs {b:?}");
    }
}

#[test]
fn a_torchvision_checkpoint_fine_tunes_with_a_new_head() {
    let root = std::env::temp_dir().join(format!("diffii-r50-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    // The reference's 10-class checkpoint, as torchvision would save it (plus a counter).
    let config = ResNetConfig::resnet50(10);
    let mut tensors: Vec<(String, Tensor)> = init_weights(&config, 0)
        .unwrap()
        .iter()
        .map(|(k, t)| (k.clone(), Tensor::from_vec(values(k, t.dims()), t.dims(), &Device::Cpu).unwrap()))
        .collect();
    tensors.push(("bn1.num_batches_tracked".into(), Tensor::new(&[7f32], &Device::Cpu).unwrap()));
    let ckpt = root.join("resnet50.safetensors");
    diffii::nn::weights::save_safetensors(&ckpt, &tensors, None).unwrap();
    // Three classes here: every tensor but the head comes from the file.
    let mut init = init_weights(&ResNetConfig::resnet50(3), 5).unwrap();
    let head_taken = diffii::classify::resnet::load_pretrained(&mut init, &ckpt).unwrap();
    assert!(!head_taken);
    let from_file = |k: &str| tensors.iter().find(|(n, _)| n == k).unwrap().1.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(init["layer3.5.conv2.weight"].flatten_all().unwrap().to_vec1::<f32>().unwrap(), from_file("layer3.5.conv2.weight"));
    assert_eq!(init["fc.weight"].dims(), &[3, 2048]);
    // A file of another architecture is refused by name.
    let mut small = init_weights(&ResNetConfig::small(3, 1), 0).unwrap();
    let e = diffii::classify::resnet::load_pretrained(&mut small, &ckpt).unwrap_err().to_string();
    assert!(e.contains("resnet50.safetensors") && e.contains("`bn1.bias` has shape [64]; the model needs [16]"), "{e}");

    // End to end: one epoch of fine-tuning; --pretrained without --arch resnet50 is refused.
    let data = root.join("data");
    for c in 0..3 {
        std::fs::create_dir_all(data.join(format!("c{c}"))).unwrap();
        for i in 0..4u32 {
            image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([((x * (c + 1) + i) % 255) as u8, (y * 7 % 255) as u8, 60])).save(data.join(format!("c{c}/{i}.png"))).unwrap();
        }
    }
    let run = |extra: &[&str]| {
        let mut args = vec!["train", "--data", data.to_str().unwrap(), "--out", root.to_str().unwrap(), "--seeds", "0", "--epochs", "1", "--batch", "4", "--size", "32", "--val-per-class", "1", "--quiet"];
        args.extend(extra);
        std::process::Command::new(env!("CARGO_BIN_EXE_diffii")).args(&args).output().unwrap()
    };
    let o = run(&["--pretrained", ckpt.to_str().unwrap()]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--pretrained needs --arch resnet50"));
    let o = run(&["--arch", "resnet50", "--pretrained", ckpt.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (model, info) = diffii::classify::train::load_model(&root.join("seed-0"), &Device::Cpu).unwrap();
    assert_eq!((info.config.clone(), model.config.classes), (ResNetConfig::resnet50(3), 3));
    std::fs::remove_dir_all(&root).unwrap();
}
