//! Loading a diffusers SD-1.x folder: checkpoint dialects that must give bit-identical models
//! (CLIP keys without `text_model.`, old VAE attention names and 4-D shapes, linear
//! projections), errors that name the file and the key, per-block head resolution, and
//! `diffii info` (library and binary) against the fixture's recorded sizes.
//!
//! Each modified model is a copy of tiny-sd in a fresh temp folder, removed when the test ends.
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, ref_tensors, tiny_sd};
use diffii::error::Error;
use diffii::sd::config::UNetConfig;
use diffii::sd::inspect::inspect;
use diffii::sd::loader::{weights_file, LoadOptions};
use diffii::nn::Mode;
use diffii::sd::unet::UNet;
use diffii::nn::weights::Weights;
use diffii::sd::StableDiffusion;
use serde_json::{json, Value};

// ------------------------------------------------------------------------------------------
// helpers
// ------------------------------------------------------------------------------------------

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh, empty, uniquely named folder under the system temp dir.
fn fresh_dir(name: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("diffii-loader-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}


/// A writable copy of tiny-sd, deleted on drop.
struct TempModel {
    dir: PathBuf,
}

impl TempModel {
    fn new(name: &str) -> Self {
        // Built before copying so that a failed copy is cleaned up too.
        let m = TempModel { dir: fresh_dir(name) };
        common::copy_dir(&tiny_sd(), &m.dir);
        m
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    fn tensors(&self, rel: &str) -> HashMap<String, Tensor> {
        candle_core::safetensors::load(self.path(rel), &Device::Cpu).unwrap()
    }

    fn edit_tensors(&self, rel: &str, f: impl FnOnce(HashMap<String, Tensor>) -> HashMap<String, Tensor>) {
        let t = f(self.tensors(rel));
        candle_core::safetensors::save(&t, self.path(rel)).unwrap();
    }

    fn json(&self, rel: &str) -> Value {
        serde_json::from_str(&std::fs::read_to_string(self.path(rel)).unwrap()).unwrap()
    }

    fn edit_json(&self, rel: &str, f: impl FnOnce(&mut Value)) {
        let mut v = self.json(rel);
        f(&mut v);
        std::fs::write(self.path(rel), serde_json::to_string_pretty(&v).unwrap()).unwrap();
    }

    fn remove(&self, rel: &str) {
        std::fs::remove_file(self.path(rel)).unwrap();
    }
}

impl Drop for TempModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn load(dir: &Path) -> StableDiffusion {
    StableDiffusion::load(dir, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("loading {} failed: {e}", dir.display()))
}

fn load_err(dir: &Path) -> Error {
    match StableDiffusion::load(dir, &LoadOptions::default()) {
        Ok(_) => panic!("loading {} should have failed", dir.display()),
        Err(e) => e,
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error message should mention {p:?}; it is:\n{msg}");
    }
}

fn shown(p: &Path) -> String {
    p.display().to_string()
}

fn tiny_readme() -> Value {
    let p = tiny_sd().join("TINY_SD_README.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

// ------------------------------------------------------------------------------------------
// checkpoint dialects
// ------------------------------------------------------------------------------------------

#[test]
fn clip_keys_without_text_model_prefix_give_the_same_encoder() {
    let m = TempModel::new("clip-noprefix");
    m.edit_tensors("text_encoder/model.safetensors", |t| {
        t.into_iter()
            .map(|(k, v)| (k.strip_prefix("text_model.").expect("fixture keys start with text_model.").to_string(), v))
            .collect()
    });
    let keys = m.tensors("text_encoder/model.safetensors");
    assert!(keys.contains_key("embeddings.token_embedding.weight"));
    assert!(!keys.keys().any(|k| k.starts_with("text_model.")));

    let prompt = "a photo of a <cls0> bird";
    let want = load(&tiny_sd()).encode_prompt(prompt).unwrap();
    let got = load(&m.dir).encode_prompt(prompt).unwrap();
    assert_eq!(max_abs_diff(&got, &want), 0.0);
    // Guards against both loads being wrong in the same way.
    let reference = &ref_tensors()["text_emb_b"];
    let d = max_abs_diff(&got, reference);
    assert!(d < 1e-4, "text_emb_b differs from the reference by {d}");
}

/// Renames the VAE's attention weights to the pre-0.14 diffusers names, optionally storing the
/// projection matrices as 1x1 convolutions as the original LDM checkpoints do.
fn old_vae_names(four_d: bool) {
    let m = TempModel::new(if four_d { "vae-old-4d" } else { "vae-old" });
    let mut renamed = 0;
    m.edit_tensors("vae/diffusion_pytorch_model.safetensors", |t| {
        t.into_iter()
            .map(|(k, v)| {
                let new = k
                    .replace(".to_q.", ".query.")
                    .replace(".to_k.", ".key.")
                    .replace(".to_v.", ".value.")
                    .replace(".to_out.0.", ".proj_attn.");
                if new == k {
                    return (k, v);
                }
                renamed += 1;
                let v = if four_d && v.rank() == 2 {
                    let (o, i) = v.dims2().unwrap();
                    v.reshape((o, i, 1, 1)).unwrap()
                } else {
                    v
                };
                (new, v)
            })
            .collect()
    });
    // encoder and decoder mid-block attention: 4 projections x (weight, bias) each
    assert_eq!(renamed, 16);
    let stored = m.tensors("vae/diffusion_pytorch_model.safetensors");
    let q = &stored["encoder.mid_block.attentions.0.query.weight"];
    assert_eq!(q.rank(), if four_d { 4 } else { 2 });
    assert!(!stored.keys().any(|k| k.contains(".to_q.")));

    let orig = load(&tiny_sd());
    let old = load(&m.dir);
    let r = ref_tensors();
    let (mean0, logvar0) = orig.vae.encode(&r["image_a"]).unwrap();
    let (mean1, logvar1) = old.vae.encode(&r["image_a"]).unwrap();
    assert_eq!(max_abs_diff(&mean1, &mean0), 0.0);
    assert_eq!(max_abs_diff(&logvar1, &logvar0), 0.0);
    let z = r["probe_unet_x"].narrow(0, 0, 1).unwrap();
    assert_eq!(max_abs_diff(&old.vae.decode(&z).unwrap(), &orig.vae.decode(&z).unwrap()), 0.0);
    let d = max_abs_diff(&mean1, &r["vae_mean_a"]);
    assert!(d < 1e-4, "vae_mean_a differs from the reference by {d}");
}

#[test]
fn old_vae_attention_names_give_the_same_vae() {
    old_vae_names(false);
}

#[test]
fn old_vae_attention_names_stored_as_1x1_convs_give_the_same_vae() {
    old_vae_names(true);
}

#[test]
fn linear_projection_unet_matches_the_conv_projection_reference() {
    let m = TempModel::new("unet-linear");
    m.edit_json("unet/config.json", |v| v["use_linear_projection"] = json!(true));
    let mut reshaped = 0;
    m.edit_tensors("unet/diffusion_pytorch_model.safetensors", |t| {
        t.into_iter()
            .map(|(k, v)| {
                if (k.contains(".proj_in.") || k.contains(".proj_out.")) && v.rank() == 4 {
                    reshaped += 1;
                    let (o, i, _, _) = v.dims4().unwrap();
                    (k, v.reshape((o, i)).unwrap())
                } else {
                    (k, v)
                }
            })
            .collect()
    });
    // 2 down + 3 up + 1 mid transformers, proj_in and proj_out each
    assert_eq!(reshaped, 12);

    let cfg = UNetConfig::from_file(&m.path("unet/config.json")).unwrap();
    assert!(cfg.use_linear_projection);
    let w = Weights::from_file(&weights_file(&m.path("unet")).unwrap(), DType::F32, &Device::Cpu).unwrap();
    let unet = UNet::load(&w, &cfg, Mode::Infer).unwrap();
    // The weights now fit either projection (1x1 shapes are squeezed on load), so the output
    // alone cannot tell which one was built.
    let built = format!("{unet:?}");
    assert!(built.contains("proj_in: Linear(") && !built.contains("proj_in: Conv("), "expected linear projections");

    let r = ref_tensors();
    let ctx = Tensor::cat(&[&r["text_emb_uncond"], &r["text_emb_b"]], 0).unwrap();
    let out = unet.forward_t(&r["probe_unet_x"], 500, &ctx).unwrap();
    let d = max_abs_diff(&out, &r["probe_unet_out"]);
    assert!(d < 1e-4, "linear-projection UNet differs from probe_unet_out by {d}");
}

// ------------------------------------------------------------------------------------------
// weight errors
// ------------------------------------------------------------------------------------------

#[test]
fn missing_unet_tensor_names_file_and_key() {
    let m = TempModel::new("unet-missing");
    let key = "mid_block.resnets.0.conv1.weight";
    m.edit_tensors("unet/diffusion_pytorch_model.safetensors", |mut t| {
        assert!(t.remove(key).is_some());
        t
    });
    let file = m.path("unet/diffusion_pytorch_model.safetensors");
    let e = load_err(&m.dir);
    match &e {
        Error::Tensor { path, key: k, .. } => {
            assert_eq!(path, &file);
            assert_eq!(k, key);
        }
        other => panic!("expected a tensor error, got {other:?}"),
    }
    assert_mentions(&e.to_string(), &[&shown(&file), key, "missing"]);
}

#[test]
fn misshaped_tensor_names_file_key_and_both_shapes() {
    let m = TempModel::new("unet-shape");
    m.edit_tensors("unet/diffusion_pytorch_model.safetensors", |mut t| {
        assert_eq!(t["conv_in.weight"].dims(), &[32, 4, 3, 3]);
        t.insert("conv_in.weight".into(), Tensor::zeros((16, 4, 3, 3), DType::F32, &Device::Cpu).unwrap());
        t
    });
    let file = m.path("unet/diffusion_pytorch_model.safetensors");
    let e = load_err(&m.dir);
    assert!(matches!(e, Error::Tensor { .. }), "expected a tensor error, got {e:?}");
    assert_mentions(&e.to_string(), &[&shown(&file), "conv_in.weight", "[16, 4, 3, 3]", "[32, 4, 3, 3]"]);
}

#[test]
fn pickled_checkpoint_only_is_refused() {
    let m = TempModel::new("unet-bin");
    m.remove("unet/diffusion_pytorch_model.safetensors");
    std::fs::write(m.path("unet/diffusion_pytorch_model.bin"), b"PK\x03\x04 not really a pickle").unwrap();
    let e = load_err(&m.dir);
    assert_mentions(&e.to_string(), &[&shown(&m.path("unet")), "pickled", "safetensors"]);
    let e = inspect(&m.dir).expect_err("info must refuse it too");
    assert_mentions(&e.to_string(), &[&shown(&m.path("unet")), "pickled"]);
}

#[test]
fn missing_model_index_is_named() {
    let m = TempModel::new("no-index");
    m.remove("model_index.json");
    let e = load_err(&m.dir);
    assert_mentions(&e.to_string(), &[&shown(&m.dir), "model_index.json"]);
    let e = inspect(&m.dir).expect_err("info must refuse it too");
    assert_mentions(&e.to_string(), &["model_index.json"]);
}

// ------------------------------------------------------------------------------------------
// config errors and per-block resolution
// ------------------------------------------------------------------------------------------

#[test]
fn config_errors_name_the_file_and_the_key() {
    let m = TempModel::new("configs");
    let unet_cfg = m.path("unet/config.json");
    let vae_cfg = m.path("vae/config.json");
    let unet_orig = std::fs::read(&unet_cfg).unwrap();
    let vae_orig = std::fs::read(&vae_cfg).unwrap();

    m.edit_json("unet/config.json", |v| v["mid_block_type"] = json!("UNetMidBlockFlat"));
    let msg = load_err(&m.dir).to_string();
    assert_mentions(&msg, &[&shown(&unet_cfg), "mid_block_type", "UNetMidBlockFlat"]);
    std::fs::write(&unet_cfg, &unet_orig).unwrap();

    m.edit_json("unet/config.json", |v| v["attention_head_dim"] = json!([8, 8, 8]));
    let msg = load_err(&m.dir).to_string();
    assert_mentions(&msg, &[&shown(&unet_cfg), "attention_head_dim", "3 entries", "2 down blocks"]);
    std::fs::write(&unet_cfg, &unet_orig).unwrap();

    m.edit_json("vae/config.json", |v| v["down_block_types"] = json!(["DownEncoderBlock2D", "FancyDownBlock"]));
    let msg = load_err(&m.dir).to_string();
    assert_mentions(&msg, &[&shown(&vae_cfg), "down_block_types", "FancyDownBlock"]);
    std::fs::write(&vae_cfg, &vae_orig).unwrap();

    // One reader per config kind: each must name its file.
    for rel in ["unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json"] {
        let p = m.path(rel);
        let orig = std::fs::read(&p).unwrap();
        std::fs::write(&p, "{ \"block_out_channels\": [32, 64,").unwrap();
        let msg = load_err(&m.dir).to_string();
        assert_mentions(&msg, &[&shown(&p), "invalid JSON"]);
        std::fs::write(&p, orig).unwrap();
    }
    // The restored copy loads again, so every error above came from the edit.
    load(&m.dir);
}

/// A three-block UNet config with the given head settings, written to a temp file.
fn heads_config(name: &str, attention_head_dim: Value, num_attention_heads: Value) -> (PathBuf, PathBuf) {
    let dir = fresh_dir(name);
    let path = dir.join("config.json");
    let v = json!({
        "_class_name": "UNet2DConditionModel",
        "block_out_channels": [32, 64, 128],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "layers_per_block": 2,
        "cross_attention_dim": 32,
        "attention_head_dim": attention_head_dim,
        "num_attention_heads": num_attention_heads,
    });
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    (dir, path)
}

fn heads_of(attention_head_dim: Value, num_attention_heads: Value) -> (Vec<usize>, Vec<usize>, usize) {
    let (dir, path) = heads_config("heads", attention_head_dim, num_attention_heads);
    let cfg = UNetConfig::from_file(&path);
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = cfg.unwrap();
    assert_eq!(cfg.up.iter().map(|b| b.layers).collect::<Vec<_>>(), [3, 3, 3]);
    assert_eq!(cfg.up.iter().map(|b| b.out_channels).collect::<Vec<_>>(), [128, 64, 32]);
    (cfg.down.iter().map(|b| b.heads).collect(), cfg.up.iter().map(|b| b.heads).collect(), cfg.mid.heads)
}

#[test]
fn heads_resolve_per_block_with_diffusers_precedence() {
    // `attention_head_dim` historically holds head counts when `num_attention_heads` is null.
    assert_eq!(heads_of(json!([2, 4, 8]), Value::Null), (vec![2, 4, 8], vec![8, 4, 2], 8));
    assert_eq!(heads_of(json!(4), Value::Null), (vec![4, 4, 4], vec![4, 4, 4], 4));
    // `num_attention_heads` wins when both are given.
    assert_eq!(heads_of(json!([2, 4, 8]), json!([1, 2, 4])), (vec![1, 2, 4], vec![4, 2, 1], 4));
    assert_eq!(heads_of(json!([2, 4, 8]), json!(2)), (vec![2, 2, 2], vec![2, 2, 2], 2));
    // diffusers' default when neither is given
    assert_eq!(heads_of(Value::Null, Value::Null), (vec![8, 8, 8], vec![8, 8, 8], 8));

    let (dir, path) = heads_config("heads-bad", json!([2, 4]), Value::Null);
    let e = UNetConfig::from_file(&path).expect_err("two entries for three blocks");
    let _ = std::fs::remove_dir_all(&dir);
    assert_mentions(&e.to_string(), &[&shown(&path), "attention_head_dim", "2 entries", "3 down blocks"]);
}

// ------------------------------------------------------------------------------------------
// diffii info
// ------------------------------------------------------------------------------------------

#[test]
fn info_matches_the_fixture_record() {
    let readme = tiny_readme();
    let info = inspect(&tiny_sd()).unwrap();
    for name in ["unet", "vae", "text_encoder"] {
        assert_eq!(info.params(name), readme["params"][name].as_u64().unwrap(), "{name} params");
    }
    assert_eq!(info.params("unet"), 1106212);
    assert_eq!(info.params("vae"), 843847);
    assert_eq!(info.params("text_encoder"), 54895);
    assert_eq!(info.params("concepts"), 2 * 32);

    let names: Vec<_> = info.components.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["tokenizer", "text_encoder", "unet", "vae", "scheduler", "concepts"]);
    for c in &info.components {
        let mut files: Vec<(&Path, u64)> = c.files.iter().map(|f| (f.path.as_path(), f.bytes)).collect();
        files.extend(c.weights.iter().map(|w| (w.path.as_path(), w.bytes)));
        assert!(!files.is_empty(), "{} lists no files", c.name);
        for (path, bytes) in files {
            let rel = path.strip_prefix(tiny_sd()).unwrap().to_str().unwrap().to_string();
            assert_eq!(Some(bytes), readme["files"][&rel]["bytes"].as_u64(), "size of {rel}");
        }
        if let Some(w) = &c.weights {
            assert_eq!(w.dtypes, ["f32"], "{}", c.name);
        }
    }
    assert_eq!(info.component("unet").unwrap().class.as_deref(), Some("UNet2DConditionModel"));
    assert_eq!(info.component("scheduler").unwrap().class.as_deref(), Some("DDIMScheduler"));

    assert_eq!(info.tokenizer.vocab_size as u64, readme["vocab_size"].as_u64().unwrap());
    assert_eq!(info.text_encoder.vocab_size, 1000);
    let ids = &readme["token_ids"];
    assert_eq!(
        (info.tokenizer.bos_id as u64, info.tokenizer.eos_id as u64, info.tokenizer.pad_id as u64),
        (ids["bos"].as_u64().unwrap(), ids["eos"].as_u64().unwrap(), ids["pad"].as_u64().unwrap())
    );
    assert_eq!(info.tokenizer.max_length, 77);
    let concepts: Vec<(String, u64)> =
        info.tokenizer.concept_tokens.iter().map(|c| (c.token.clone(), c.id as u64)).collect();
    let want: Vec<(String, u64)> = readme["concept_token_ids_after_add"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect();
    assert_eq!(concepts, want);
    assert_eq!(info.tokenizer.concept_tokens[0].classes, ["sparrow"]);

    assert_eq!(info.latent_size as u64, readme["latent_size"].as_u64().unwrap());
    assert_eq!(info.image_size as u64, readme["image_size"].as_u64().unwrap());
    assert_eq!(info.vae.spatial_factor as u64, readme["vae_scale_factor"].as_u64().unwrap());

    assert_eq!(info.unet.down_block_types, ["CrossAttnDownBlock2D", "DownBlock2D"]);
    assert_eq!(info.unet.up_block_types, ["UpBlock2D", "CrossAttnUpBlock2D"]);
    assert_eq!(info.unet.heads_per_block, [8, 8]);
    assert_eq!(info.unet.time_embed_dim, 128);
    assert!(!info.unet.use_linear_projection);
    assert_eq!(info.text_encoder.intermediate_size, 37);
    assert_eq!(info.text_encoder.activation, "quick_gelu");
    assert_eq!(info.scheduler.steps_offset, 1);
    assert!(!info.scheduler.set_alpha_to_one);
    assert_eq!(info.scheduler.beta_schedule, "scaled_linear");
    assert!(info.warnings.is_empty(), "{:?}", info.warnings);
}

#[test]
fn info_reports_half_precision_weights() {
    let m = TempModel::new("info-fp16");
    let t: HashMap<String, Tensor> = m
        .tensors("vae/diffusion_pytorch_model.safetensors")
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F16).unwrap()))
        .collect();
    candle_core::safetensors::save(&t, m.path("vae/diffusion_pytorch_model.fp16.safetensors")).unwrap();
    m.remove("vae/diffusion_pytorch_model.safetensors");
    m.edit_json("text_encoder/config.json", |v| v["vocab_size"] = json!(1001));

    let info = inspect(&m.dir).unwrap();
    let w = info.component("vae").unwrap().weights.as_ref().unwrap();
    assert_eq!(w.path, m.path("vae/diffusion_pytorch_model.fp16.safetensors"));
    assert_eq!(w.dtypes, ["f16"]);
    assert_eq!(w.params, 843847);
    assert!(w.bytes < 843847 * 2 + 64 * 1024, "{} bytes for 843847 f16 values", w.bytes);
    // The text encoder's embedding file still has 1000 rows: a load would fail, info warns.
    assert!(info.warnings.iter().any(|w| w.contains("vocab_size 1001")), "{:?}", info.warnings);
}

fn run_info(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_diffii")).arg("info").args(args).output().expect("run diffii")
}

#[test]
fn info_command_prints_text_and_json() {
    let model = shown(&tiny_sd());
    let out = run_info(&["--model", &model]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "exit {:?}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    for n in ["1106212", "843847", "54895"] {
        assert!(stdout.contains(&format!("{n} params")), "no `{n} params` in:\n{stdout}");
    }
    let vocab_lines: Vec<_> = stdout.lines().filter(|l| l.trim_start().starts_with("vocab size")).collect();
    assert_eq!(vocab_lines.len(), 2, "tokenizer and text encoder vocab lines:\n{stdout}");
    assert!(vocab_lines.iter().all(|l| l.trim_end().ends_with(" 1000")), "{vocab_lines:?}");
    assert!(stdout.contains("image 64x64 <-> latent 4x32x32"), "{stdout}");

    let out = run_info(&["--model", &model, "--json"]);
    assert!(out.status.success(), "exit {:?}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(v["tokenizer"]["vocab_size"], json!(1000));
    assert_eq!(v["text_encoder"]["vocab_size"], json!(1000));
    let unet = v["components"].as_array().unwrap().iter().find(|c| c["name"] == "unet").expect("unet component");
    assert_eq!(unet["weights"]["params"], json!(1106212));
    assert_eq!(v["image_size"], json!(64));
}

#[test]
fn info_command_fails_on_a_missing_folder() {
    let missing = std::env::temp_dir().join(format!("diffii-no-such-model-{}", std::process::id()));
    let out = run_info(&["--model", &shown(&missing)]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&shown(&missing)), "stderr should name the folder: {stderr}");
}

#[test]
fn device_names_parse_or_say_what_to_do() {
    use diffii::sd::loader::parse_device;
    assert!(parse_device("cpu").unwrap().is_cpu());
    assert!(parse_device(" CPU ").unwrap().is_cpu());
    let e = parse_device("tpu").err().unwrap().to_string();
    assert_mentions(&e, &["tpu", "cpu, cuda or cuda:N"]);
    let e = parse_device("cuda:x").err().unwrap().to_string();
    assert_mentions(&e, &["cuda:x", "cuda:N"]);
    if !cfg!(feature = "cuda") {
        let e = parse_device("cuda:1").err().unwrap().to_string();
        assert_mentions(&e, &["no CUDA support", "scripts/build-cuda.sh"]);
    }
}
