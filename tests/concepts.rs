//! Concept inputs: diffusers TI safetensors (one or several files), class maps, and the official
//! Diff-II / Diff-Mix `learned_embeds-steps-*.bin` (read without executing its pickle).
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{Device, Tensor};
use common::{max_abs_diff, tiny_sd};
use diffii::sd::concepts::Concepts;

const HIDDEN: usize = 32;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn fresh_dir(name: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("diffii-concepts-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn official_bin() -> PathBuf {
    fixture("learned_embeds-steps-tiny.bin")
}

fn tiny_embeds() -> PathBuf {
    tiny_sd().join("concepts/learned_embeds.safetensors")
}

/// The tiny model's TI rows by token.
fn tiny_rows() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(tiny_embeds(), &Device::Cpu).unwrap()
}

fn row(c: &Concepts, token: &str) -> Tensor {
    let i = c.tokens.iter().position(|t| t == token).unwrap_or_else(|| panic!("no token {token} in {:?}", c.tokens));
    c.rows.get(i).unwrap()
}

fn from_files(paths: &[PathBuf], class_map: Option<&Path>) -> diffii::error::Result<Concepts> {
    Concepts::from_files(paths, class_map, HIDDEN, &Device::Cpu)
}

fn err_of(r: diffii::error::Result<Concepts>) -> String {
    match r {
        Ok(c) => panic!("expected an error, loaded tokens {:?}", c.tokens),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error message should mention {p:?}; it is:\n{msg}");
    }
}

fn save_st(path: &Path, tensors: &[(&str, Tensor)]) {
    let map: HashMap<String, Tensor> = tensors.iter().map(|(k, t)| (k.to_string(), t.clone())).collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

fn classes(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

// ------------------------------------------------------------------------------------------
// the official .bin
// ------------------------------------------------------------------------------------------

#[test]
fn official_bin_gives_the_tiny_rows_and_its_class_map() {
    let c = from_files(&[official_bin()], None).unwrap();
    // No `order` in the file: the pickle's own order, which lists <cls1> first.
    assert_eq!(c.tokens, ["<cls1>", "<cls0>"]);
    assert_eq!(c.rows.dims(), [2, HIDDEN]);
    for (tok, want) in tiny_rows() {
        assert_eq!(max_abs_diff(&row(&c, &tok), &want), 0.0, "row of {tok}");
    }
    assert_eq!(c.token_for_class("sparrow"), Some("<cls0>"));
    assert_eq!(c.token_for_class("gull"), Some("<cls1>"));
    assert_eq!(c.class_to_token.len(), 2);
    c.check_classes(&classes(&["sparrow", "gull"])).unwrap();
}

#[test]
fn class_map_order_fixes_ids_and_matches_the_safetensors_concepts() {
    let cm = tiny_sd().join("concepts/concepts.json");
    let from_bin = from_files(&[official_bin()], Some(&cm)).unwrap();
    let from_st = Concepts::load(&tiny_embeds(), HIDDEN, &Device::Cpu).unwrap();
    assert_eq!(from_bin.tokens, ["<cls0>", "<cls1>"]);
    assert_eq!(from_bin.tokens, from_st.tokens);
    assert_eq!(max_abs_diff(&from_bin.rows, &from_st.rows), 0.0);
    assert_eq!(from_bin.class_to_token, from_st.class_to_token);
    assert_eq!(from_bin.sha256(), from_st.sha256());
    // The hash covers the id order.
    let unordered = from_files(&[official_bin()], None).unwrap();
    assert_ne!(unordered.sha256(), from_st.sha256());
}

#[test]
fn flat_class_map_json_is_accepted() {
    let dir = fresh_dir("flat-map");
    let cm = dir.join("classes.json");
    std::fs::write(&cm, r#"{"house sparrow": "<cls0>", "herring gull": "<cls1>"}"#).unwrap();
    let c = from_files(&[official_bin()], Some(&cm)).unwrap();
    assert_eq!(c.token_for_class("house sparrow"), Some("<cls0>"));
    assert_eq!(c.token_for_class("herring gull"), Some("<cls1>"));
    // The explicit map replaces the file's own.
    assert_eq!(c.token_for_class("sparrow"), None);
    // Names compare the way the official loader normalises them.
    assert_eq!(c.token_for_class("house_sparrow"), Some("<cls0>"));
}

#[test]
fn corrupt_bin_is_refused_with_its_name() {
    let dir = fresh_dir("corrupt");
    let good = std::fs::read(official_bin()).unwrap();

    let garbage = dir.join("learned_embeds-steps-1.bin");
    std::fs::write(&garbage, b"this is not a torch file at all").unwrap();
    let msg = err_of(from_files(std::slice::from_ref(&garbage), None));
    assert_mentions(&msg, &[&garbage.display().to_string(), "torch"]);

    let truncated = dir.join("truncated.bin");
    std::fs::write(&truncated, &good[..good.len() / 2]).unwrap();
    let msg = err_of(from_files(std::slice::from_ref(&truncated), None));
    assert_mentions(&msg, &[&truncated.display().to_string()]);

    // One flipped bit in the float storage: only the CRC can notice.
    let storage = b"learned_embeds-steps-tiny/data/0";
    let at = good.windows(storage.len()).position(|w| w == storage).expect("storage record in fixture");
    let data_start = at + storage.len(); // no extra field in the local header the generator writes
    let mut flipped = good.clone();
    flipped[data_start + 5] ^= 0x01;
    let bad = dir.join("flipped.bin");
    std::fs::write(&bad, &flipped).unwrap();
    let msg = err_of(from_files(std::slice::from_ref(&bad), None));
    assert_mentions(&msg, &[&bad.display().to_string(), "CRC"]);
}

#[test]
fn pickle_calling_os_system_is_refused_and_never_run() {
    let marker = Path::new("/tmp/diffii_pickle_exploit_marker");
    let _ = std::fs::remove_file(marker);
    let evil = fixture("malicious.bin");
    let msg = err_of(from_files(std::slice::from_ref(&evil), None));
    assert_mentions(&msg, &[&evil.display().to_string(), "os.system"]);
    assert!(!marker.exists(), "the pickle's payload ran");
}

// ------------------------------------------------------------------------------------------
// safetensors TI files
// ------------------------------------------------------------------------------------------

#[test]
fn several_ti_files_merge_in_the_given_order() {
    let rows = tiny_rows();
    let dir = fresh_dir("merge");
    let (a, b) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let (fa, fb) = (a.join("sparrow.safetensors"), b.join("gull.safetensors"));
    save_st(&fa, &[("<cls0>", rows["<cls0>"].clone())]);
    // [1, hidden] is diffusers' other TI row shape.
    save_st(&fb, &[("<cls1>", rows["<cls1>"].unsqueeze(0).unwrap())]);

    let c = from_files(&[fa.clone(), fb.clone()], None).unwrap();
    assert_eq!(c.tokens, ["<cls0>", "<cls1>"]);
    let reference = Concepts::load(&tiny_embeds(), HIDDEN, &Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(&c.rows, &reference.rows), 0.0);
    assert!(c.class_to_token.is_empty());

    let c = from_files(&[fb, fa], None).unwrap();
    assert_eq!(c.tokens, ["<cls1>", "<cls0>"]);
}

#[test]
fn a_token_in_two_files_names_both() {
    let rows = tiny_rows();
    let dir = fresh_dir("dup");
    let (f1, f2) = (dir.join("one.safetensors"), dir.join("two.safetensors"));
    save_st(&f1, &[("<cls0>", rows["<cls0>"].clone())]);
    save_st(&f2, &[("<cls0>", rows["<cls1>"].clone()), ("<cls1>", rows["<cls1>"].clone())]);
    let msg = err_of(from_files(&[f1.clone(), f2.clone()], None));
    assert_mentions(&msg, &["<cls0>", &f1.display().to_string(), &f2.display().to_string()]);
    // A .bin and a safetensors file defining the same token clash the same way.
    let msg = err_of(from_files(&[official_bin(), f1.clone()], None));
    assert_mentions(&msg, &["<cls0>", &f1.display().to_string(), &official_bin().display().to_string()]);
}

#[test]
fn multi_vector_rows_are_refused() {
    let dir = fresh_dir("multi");
    let f = dir.join("multi.safetensors");
    let t = Tensor::ones((2, HIDDEN), candle_core::DType::F32, &Device::Cpu).unwrap();
    save_st(&f, &[("<cls0>", t)]);
    let msg = err_of(from_files(std::slice::from_ref(&f), None));
    assert_mentions(&msg, &[&f.display().to_string(), "<cls0>", "multi-vector"]);
}

#[test]
fn rows_with_nan_or_infinity_are_refused() {
    for bad in [f32::NAN, f32::INFINITY] {
        let dir = fresh_dir("nonfinite");
        let f = dir.join("learned_embeds.safetensors");
        let mut row = vec![0.1f32; 32];
        row[7] = bad;
        save_st(&f, &[("<cls0>", Tensor::from_vec(row, 32, &Device::Cpu).unwrap())]);
        let msg = err_of(Concepts::from_files(&[f.clone()], None, 32, &Device::Cpu));
        assert_mentions(&msg, &[&f.display().to_string(), "<cls0>", "1 of 32 values are NaN or infinite"]);
    }
}

#[test]
fn rows_of_another_width_are_refused() {
    let msg = err_of(Concepts::from_files(&[official_bin()], None, 768, &Device::Cpu));
    assert_mentions(&msg, &[&official_bin().display().to_string(), "[32]", "768"]);
}

// ------------------------------------------------------------------------------------------
// class maps
// ------------------------------------------------------------------------------------------

#[test]
fn classes_without_a_token_are_listed() {
    let c = from_files(&[official_bin()], None).unwrap();
    let msg = c.check_classes(&classes(&["sparrow", "albatross", "gull", "tern"])).unwrap_err().to_string();
    assert_mentions(&msg, &["2 of 4", "`albatross`", "`tern`"]);
    let (missing, _) = msg.split_once(';').unwrap();
    assert!(!missing.contains("`sparrow`") && !missing.contains("`gull`"), "classes with a token listed as missing:\n{msg}");

    // Without any class map every class is missing, and the message says why.
    let dir = fresh_dir("no-map");
    let lone = dir.join("learned_embeds.safetensors");
    std::fs::copy(tiny_embeds(), &lone).unwrap();
    let c = from_files(&[lone], None).unwrap();
    let msg = c.check_classes(&classes(&["sparrow"])).unwrap_err().to_string();
    assert_mentions(&msg, &["`sparrow`", "no class map"]);
}

#[test]
fn class_map_pointing_to_an_absent_token_is_refused() {
    let dir = fresh_dir("absent");
    let cm = dir.join("classes.json");
    std::fs::write(&cm, r#"{"name2placeholder": {"sparrow": "<cls0>", "gull": "<cls9>"}}"#).unwrap();
    let msg = err_of(from_files(&[official_bin()], Some(&cm)));
    assert_mentions(&msg, &[&cm.display().to_string(), "gull", "<cls9>"]);

    std::fs::write(&cm, r#"{"order": ["<cls0>", "<cls7>"]}"#).unwrap();
    let msg = err_of(from_files(&[official_bin()], Some(&cm)));
    assert_mentions(&msg, &[&cm.display().to_string(), "<cls7>"]);

    std::fs::write(&cm, r#"{"sparrow": 3}"#).unwrap();
    let msg = err_of(from_files(&[official_bin()], Some(&cm)));
    assert_mentions(&msg, &[&cm.display().to_string(), "sparrow"]);
}

#[test]
fn concepts_json_beside_a_file_is_used() {
    // The tiny model's folder has concepts.json next to the embeddings.
    let c = from_files(&[tiny_embeds()], None).unwrap();
    assert_eq!(c.tokens, ["<cls0>", "<cls1>"]);
    assert_eq!(c.token_for_class("gull"), Some("<cls1>"));
}

#[test]
fn save_round_trips_and_the_hash_follows_the_rows() {
    let cm = tiny_sd().join("concepts/concepts.json");
    let c = from_files(&[official_bin()], Some(&cm)).unwrap();
    let dir = fresh_dir("save");
    let out = dir.join("learned_embeds.safetensors");
    c.save(&out).unwrap();
    let back = Concepts::load(&out, HIDDEN, &Device::Cpu).unwrap();
    assert_eq!(back.tokens, c.tokens);
    assert_eq!(back.class_to_token, c.class_to_token);
    assert_eq!(back.sha256(), c.sha256());

    let mut changed = c.clone();
    changed.rows = (c.rows.clone() * 1.5).unwrap();
    assert_ne!(changed.sha256(), c.sha256());
}

/// zlib's CRC-32, to keep mutated archives past the CRC check so the pickle reader sees them.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[test]
fn mutated_pickles_give_errors_not_panics() {
    let good = std::fs::read(official_bin()).unwrap();
    let u16_at = |b: &[u8], i: usize| u16::from_le_bytes([b[i], b[i + 1]]) as usize;
    let u32_at = |b: &[u8], i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap()) as usize;
    // The generator writes data.pkl first: local header at 0, first central-directory entry.
    assert_eq!(&good[..4], b"PK\x03\x04");
    let start = 30 + u16_at(&good, 26) + u16_at(&good, 28);
    let len = u32_at(&good, 22);
    let cd = good.windows(4).position(|w| w == b"PK\x01\x02").unwrap();
    let dir = fresh_dir("mutate");
    let path = dir.join("mutated.bin");
    let mut outcomes = (0, 0);
    for i in start..start + len {
        for v in [0x00u8, 0xff, b'h', b'X', b'(', b'R', b'Q', b'.', 0x8a] {
            let mut m = good.clone();
            if m[i] == v {
                continue;
            }
            m[i] = v;
            let crc = crc32(&m[start..start + len]).to_le_bytes();
            m[14..18].copy_from_slice(&crc);
            m[cd + 16..cd + 20].copy_from_slice(&crc);
            std::fs::write(&path, &m).unwrap();
            match from_files(std::slice::from_ref(&path), None) {
                Ok(_) => outcomes.0 += 1,
                Err(e) => {
                    assert!(e.to_string().contains(&path.display().to_string()), "error without the file name: {e}");
                    outcomes.1 += 1;
                }
            }
        }
    }
    assert!(outcomes.1 > 0, "no mutation was detected: {outcomes:?}");
}
