//! Property tests of every reader of user-supplied files: arbitrary bytes and structured
//! mutations of valid files go to the list-file and class-names parsers, the manifest reader,
//! the model config readers, the safetensors / concept / LoRA loaders, the PyTorch pickle
//! reader and the tokenizer. The property is always the same: an `Err` is fine, a panic is not.
//!
//! The case count is kept small so that this file runs in well under a minute in a debug build.
//! A longer run:
//!
//! ```text
//! PROPTEST_CASES=100000 DIFFII_FIXTURES=... cargo test --release --test fuzz
//! ```
//!
//! Inputs that once broke a reader are kept at the end of this file as plain regression tests.
mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::TempDir;
use proptest::prelude::*;

/// `PROPTEST_CASES` (default 64); nothing is written to the source tree on failure.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(64);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// Edits of a byte string: flip, insert, delete, truncate, duplicate a span, set a byte to a
/// boundary value. Positions wrap around the current length.
#[derive(Clone, Debug)]
enum Edit {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
    Duplicate(usize, usize),
    Boundary(usize, u8),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 1u8..).prop_map(|(p, b)| Edit::Flip(p, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Edit::Insert(p, b)),
        any::<usize>().prop_map(Edit::Delete),
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), 1usize..64).prop_map(|(p, n)| Edit::Duplicate(p, n)),
        (any::<usize>(), prop::sample::select(vec![0u8, 0x7f, 0x80, 0xff, b'"', b'{', b'9', b'-', b'.'])).prop_map(|(p, b)| Edit::Boundary(p, b)),
    ]
}

fn apply(mut v: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let n = v.len();
        match *e {
            Edit::Flip(p, b) if n > 0 => v[p % n] ^= b,
            Edit::Insert(p, b) => v.insert(p % (n + 1), b),
            Edit::Delete(p) if n > 0 => {
                v.remove(p % n);
            }
            Edit::Truncate(p) => v.truncate(p % (n + 1)),
            Edit::Duplicate(p, k) if n > 0 => {
                let s = p % n;
                let span: Vec<u8> = v[s..(s + k).min(n)].to_vec();
                v.splice(s..s, span);
            }
            Edit::Boundary(p, b) if n > 0 => v[p % n] = b,
            _ => {}
        }
    }
    v
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    prop::collection::vec(edit(), 1..6)
}

fn write(p: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, bytes).unwrap();
}

// ------------------------------------------------------------------------------------------
// list files and class names
// ------------------------------------------------------------------------------------------

/// List-file text from fragments that matter to the parser: paths, labels, separators,
/// comments, CR, BOM, numbers, traversal, empty lines.
fn list_text() -> impl Strategy<Value = String> {
    let frag = prop::sample::select(vec![
        "gull/a.png", "sparrow/b.png", "a b.png", "../up.png", "/abs.png", "gull", "sparrow", "0", "1", "2",
        "99999999999999999999999", "-1", " ", "\t", "\r", "\n", "#", "\u{feff}", "é", "🐦", ".", "..", "\\", "\u{0}",
        "sparrow/nope.png",
    ]);
    prop::collection::vec(frag, 0..40).prop_map(|v| v.concat())
}

fn list_dir_with_images(t: &TempDir) -> PathBuf {
    let root = t.join("list");
    for f in ["gull/a.png", "sparrow/b.png", "a b.png"] {
        let p = root.join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        image::RgbImage::from_pixel(4, 4, image::Rgb([1, 2, 3])).save(&p).unwrap();
    }
    root
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn list_file_parser_never_panics(text in list_text(), names in list_text(), raw in prop::collection::vec(any::<u8>(), 0..200)) {
        let t = TempDir::new("fuzz-list");
        let root = list_dir_with_images(&t);
        let (list, names_file) = (root.join("list.txt"), root.join("names.txt"));
        write(&list, text.as_bytes());
        write(&names_file, names.as_bytes());
        let _ = diffii::data::dataset::Dataset::list_file(&list, None);
        let _ = diffii::data::dataset::Dataset::list_file(&list, Some(&names_file));
        let _ = diffii::data::dataset::read_class_names(&names_file);
        write(&list, &raw);
        let _ = diffii::data::dataset::Dataset::list_file(&list, None);
    }
}

// ------------------------------------------------------------------------------------------
// manifests
// ------------------------------------------------------------------------------------------

fn manifest_seed() -> Vec<u8> {
    let r = diffii::synth::manifest::Record { id: "gull_0".into(), file: "gull/gull_0.png".into(), class: "gull".into(), ..Default::default() };
    diffii::synth::manifest::to_jsonl(&[r.clone(), r]).unwrap().into_bytes()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn manifest_reader_never_panics(e in edits()) {
        let t = TempDir::new("fuzz-manifest");
        let p = t.join("manifest.jsonl");
        write(&p, &apply(manifest_seed(), &e));
        if let Ok(recs) = diffii::synth::manifest::read_jsonl(&p) {
            // Whatever parses must survive the round trip the merge does.
            let _ = diffii::synth::manifest::to_jsonl(&recs);
            let _ = diffii::synth::manifest::merge(&[p.clone()]);
        }
    }
}

// ------------------------------------------------------------------------------------------
// model configs
// ------------------------------------------------------------------------------------------

/// JSON values that stress a config field: zero, negative, huge, fractional, wrong types.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::json;
    prop_oneof![
        prop::sample::select(vec![0i64, 1, 2, 3, 7, 8, -1, 1 << 20, i64::MAX, i64::MIN]).prop_map(|v| json!(v)),
        prop::sample::select(vec![0.0f64, -0.5, 1e-30, 1e30, 0.5]).prop_map(|v| json!(v)),
        Just(json!(null)),
        Just(json!("silu")),
        Just(json!("")),
        Just(json!([])),
        prop::collection::vec(prop::sample::select(vec![0i64, 1, 3, 32, 64, -2, 1 << 30]), 0..5).prop_map(|v| json!(v)),
        Just(json!(["CrossAttnDownBlock2D", "DownBlock2D", "Nope"])),
        Just(json!({})),
    ]
}

fn mutate_json(seed: &serde_json::Value, picks: &[(usize, serde_json::Value)]) -> serde_json::Value {
    let mut v = seed.clone();
    if let Some(obj) = v.as_object_mut() {
        let keys: Vec<String> = obj.keys().cloned().collect();
        for (i, val) in picks {
            let k = &keys[i % keys.len()];
            obj.insert(k.clone(), val.clone());
        }
    }
    v
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn config_readers_never_panic(picks in prop::collection::vec((any::<usize>(), json_value()), 1..5), e in edits()) {
        use diffii::sd::config::{ClipConfig, UNetConfig, VaeConfig};
        let t = TempDir::new("fuzz-config");
        let tiny = common::tiny_sd();
        for (sub, read) in [
            ("unet", (|p: &Path| UNetConfig::from_file(p).map(|_| ())) as fn(&Path) -> diffii::error::Result<()>),
            ("vae", |p: &Path| VaeConfig::from_file(p).map(|_| ())),
            ("text_encoder", |p: &Path| ClipConfig::from_file(p).map(|_| ())),
        ] {
            let text = std::fs::read(tiny.join(sub).join("config.json")).unwrap();
            let seed: serde_json::Value = serde_json::from_slice(&text).unwrap();
            let p = t.join(&format!("{sub}.json"));
            write(&p, &serde_json::to_vec(&mutate_json(&seed, &picks)).unwrap());
            let _ = read(&p);
            write(&p, &apply(text, &e));
            let _ = read(&p);
        }
    }
}


proptest! {
    // A whole model load per case: a quarter of the cases of the cheap targets.
    #![proptest_config(ProptestConfig { cases: config().cases.div_ceil(4), ..config() })]

    #[test]
    fn model_load_with_mutated_configs_never_panics(sub in prop::sample::select(vec!["unet", "vae", "text_encoder", "scheduler"]), picks in prop::collection::vec((any::<usize>(), json_value()), 1..4)) {
        // The real weights under a lying config: every size the config implies must be checked
        // against the tensors, not trusted.
        let t = TempDir::new("fuzz-model");
        let m = t.join("model");
        common::copy_dir(&common::tiny_sd(), &m);
        let file = if sub == "scheduler" { m.join("scheduler/scheduler_config.json") } else { m.join(sub).join("config.json") };
        let seed: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        write(&file, &serde_json::to_vec(&mutate_json(&seed, &picks)).unwrap());
        let _ = diffii::sd::loader::StableDiffusion::load(&m, &diffii::sd::loader::LoadOptions::default());
        let _ = diffii::sd::inspect::inspect(&m);
    }
}

// ------------------------------------------------------------------------------------------
// safetensors, concepts, LoRA
// ------------------------------------------------------------------------------------------

fn safetensors_bytes(tensors: &[(&str, Tensor)]) -> Vec<u8> {
    let t = TempDir::new("fuzz-st-seed");
    let p = t.join("x.safetensors");
    let m: std::collections::HashMap<String, Tensor> = tensors.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    candle_core::safetensors::save(&m, &p).unwrap();
    std::fs::read(&p).unwrap()
}

fn concept_seed() -> Vec<u8> {
    std::fs::read(common::tiny_sd().join("concepts/learned_embeds.safetensors")).unwrap()
}

fn lora_seed() -> Vec<u8> {
    let m = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let down = Tensor::ones((2, 32), DType::F32, &Device::Cpu).unwrap();
    let up = Tensor::ones((32, 2), DType::F32, &Device::Cpu).unwrap();
    safetensors_bytes(&[(&format!("unet.{m}.lora_A.weight"), down), (&format!("unet.{m}.lora_B.weight"), up)])
}

/// Reads every tensor of a safetensors file the way the model loader does.
fn read_all_weights(p: &Path) {
    let Ok(w) = diffii::nn::Weights::from_file(p, DType::F32, &Device::Cpu) else { return };
    if let Ok(infos) = w.tensor_infos() {
        for (k, shape, _) in infos {
            let _ = w.get(&shape, &k);
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn safetensors_and_concept_loaders_never_panic(e in edits()) {
        let t = TempDir::new("fuzz-st");
        let p = t.join("learned_embeds.safetensors");
        write(&p, &apply(concept_seed(), &e));
        read_all_weights(&p);
        let _ = diffii::sd::concepts::Concepts::from_files(&[p.clone()], None, 32, &Device::Cpu);
    }

    #[test]
    fn safetensors_header_edits_never_panic(e in prop::collection::vec(edit(), 1..4)) {
        // Edits confined to the JSON header: offsets, shapes and dtypes that lie.
        let seed = concept_seed();
        let n = u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
        let header = apply(seed[8..8 + n].to_vec(), &e);
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(&header);
        bytes.extend(&seed[8 + n..]);
        let t = TempDir::new("fuzz-st-header");
        let p = t.join("learned_embeds.safetensors");
        write(&p, &bytes);
        read_all_weights(&p);
        let _ = diffii::sd::concepts::Concepts::from_files(&[p.clone()], None, 32, &Device::Cpu);
    }

    #[test]
    fn lora_loader_never_panics(e in edits()) {
        let t = TempDir::new("fuzz-lora");
        let p = t.join("pytorch_lora_weights.safetensors");
        write(&p, &apply(lora_seed(), &e));
        if let Ok(l) = diffii::sd::lora::Lora::load(&p) {
            for entry in &l.entries {
                let _ = entry.delta(1.0);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// PyTorch pickles
// ------------------------------------------------------------------------------------------

/// The records of the official-format fixture: (name, bytes), data.pkl included.
fn bin_records() -> Vec<(String, Vec<u8>)> {
    use std::io::Read;
    let bytes = std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/learned_embeds-steps-tiny.bin")).unwrap();
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    (0..z.len())
        .map(|i| {
            let mut f = z.by_index(i).unwrap();
            let mut b = Vec::new();
            f.read_to_end(&mut b).unwrap();
            (f.name().unwrap().to_string(), b)
        })
        .collect()
}

/// A stored zip of `records`.
fn zip_of(records: &[(String, Vec<u8>)]) -> Vec<u8> {
    use std::io::Write;
    let mut out = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut out);
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        for (n, b) in records {
            z.start_file(n.as_str(), opts).unwrap();
            z.write_all(b).unwrap();
        }
        z.finish().unwrap();
    }
    out.into_inner()
}

/// Opens a torch.save file and reads every tensor it references.
fn read_torch(bytes: &[u8]) {
    use diffii::formats::torch_pickle::{TorchFile, Value};
    let Ok(f) = TorchFile::open(bytes) else { return };
    let mut stack = vec![f.root()];
    let mut seen = 0;
    // Bounded: a pickle may hold a container that contains itself.
    while let Some(v) = stack.pop() {
        seen += 1;
        if seen > 10_000 {
            break;
        }
        match v {
            Value::Tensor(t) => {
                let _ = f.tensor(&t, &Device::Cpu);
            }
            Value::Tuple(items) => stack.extend(items),
            Value::List(items) => stack.extend(items.borrow().iter().cloned()),
            Value::Dict(items) => stack.extend(items.borrow().iter().flat_map(|(k, v)| [k.clone(), v.clone()])),
            _ => {}
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn pickle_reader_never_panics(e in edits(), which in any::<usize>()) {
        let mut recs = bin_records();
        // Mostly the pickle itself; sometimes a storage record or the byte order.
        let i = if which % 4 == 0 { which / 4 % recs.len() } else { recs.iter().position(|(n, _)| n.ends_with("data.pkl")).unwrap() };
        recs[i].1 = apply(recs[i].1.clone(), &e);
        let bytes = zip_of(&recs);
        read_torch(&bytes);
        let t = TempDir::new("fuzz-pickle");
        let p = t.join("learned_embeds-steps-1.bin");
        write(&p, &bytes);
        let _ = diffii::sd::concepts::Concepts::from_files(&[p.clone()], None, 32, &Device::Cpu);
    }

    #[test]
    fn pickle_of_arbitrary_bytes_never_panics(body in prop::collection::vec(any::<u8>(), 0..300)) {
        let mut pk = vec![0x80, 0x02];
        pk.extend(body);
        read_torch(&zip_of(&[("archive/data.pkl".to_string(), pk)]));
    }
}

// ------------------------------------------------------------------------------------------
// tokenizer
// ------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn tokenizer_encodes_any_text(prompt in any::<String>(), token in "\\PC{0,12}") {
        let mut tk = diffii::sd::tokenizer::ClipTokenizer::from_dir(&common::tiny_sd().join("tokenizer")).unwrap();
        if let Ok(ids) = tk.encode(&prompt) {
            prop_assert_eq!(ids.len(), tk.max_length());
        }
        let _ = tk.check_fits(&prompt);
        if tk.add_concept_tokens(&[token.clone()]).is_ok() {
            let _ = tk.encode(&format!("a {token} {prompt}"));
        }
    }

    #[test]
    fn tokenizer_files_never_panic(e in edits(), which in 0usize..3) {
        let t = TempDir::new("fuzz-tok");
        let dir = t.join("tokenizer");
        let src = common::tiny_sd().join("tokenizer");
        for f in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
            let b = std::fs::read(src.join(f)).unwrap();
            let b = if ["vocab.json", "merges.txt", "tokenizer_config.json"][which] == f { apply(b, &e) } else { b };
            write(&dir.join(f), &b);
        }
        if let Ok(tk) = diffii::sd::tokenizer::ClipTokenizer::from_dir(&dir) {
            let _ = tk.encode("a photo of a bird");
        }
    }
}

// ------------------------------------------------------------------------------------------
// regressions: inputs the properties above once found
// ------------------------------------------------------------------------------------------

/// The tiny model's config of `sub` with `key` set to `value`, in a folder of `t`.
fn config_with(t: &TempDir, sub: &str, key: &str, value: serde_json::Value) -> PathBuf {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(common::tiny_sd().join(sub).join("config.json")).unwrap()).unwrap();
    v[key] = value;
    let p = t.join(sub).join("config.json");
    write(&p, &serde_json::to_vec(&v).unwrap());
    p
}

#[test]
fn zero_norm_groups_is_an_error_not_a_division_by_zero() {
    use diffii::sd::config::{UNetConfig, VaeConfig};
    let t = TempDir::new("fuzz-reg-groups");
    let p = config_with(&t, "unet", "norm_num_groups", serde_json::json!(0));
    let e = UNetConfig::from_file(&p).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("norm_num_groups must be at least 1"), "{e}");
    let p = config_with(&t, "vae", "norm_num_groups", serde_json::json!(0));
    let e = VaeConfig::from_file(&p).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("norm_num_groups must be at least 1"), "{e}");
}
