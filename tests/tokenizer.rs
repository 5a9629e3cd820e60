//! The CLIP tokenizer against ids produced by transformers' CLIPTokenizer: the real 49408-entry
//! vocabulary (built from vocab.json + merges.txt only) and the tiny model's (both load paths).
mod common;

use std::path::{Path, PathBuf};

use diffii::sd::tokenizer::ClipTokenizer;
use serde_json::Value;

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("string list")
        .iter()
        .map(|x| x.as_str().expect("string").to_string())
        .collect()
}

/// A fresh, empty folder under the system temp dir.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("diffii-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn real_clip_vocab_matches_transformers() {
    let dir = common::fixtures().join("clip-tokenizer");
    assert!(
        !dir.join("tokenizer.json").exists(),
        "this fixture must exercise the vocab+merges path"
    );
    let reference = read_json(&dir.join("reference_ids.json"));

    let plain = ClipTokenizer::from_dir(&dir).unwrap();
    assert_eq!(plain.vocab_size(), 49408);
    assert_eq!(plain.len(), 49408);
    assert_eq!(plain.bos_id() as u64, reference["bos"].as_u64().unwrap());
    assert_eq!(plain.eos_id() as u64, reference["eos"].as_u64().unwrap());
    assert_eq!(
        plain.pad_id() as u64,
        reference["pad_token_id"].as_u64().unwrap()
    );
    assert_eq!(
        plain.max_length() as u64,
        reference["model_max_length"].as_u64().unwrap()
    );

    let mut added = ClipTokenizer::from_dir(&dir).unwrap();
    let new_ids = added
        .add_concept_tokens(&strings(&reference["added_tokens"]))
        .unwrap();
    assert_eq!(new_ids, ids(&reference["added_token_ids"]));
    assert_eq!(added.vocab_size(), 49408);
    assert_eq!(added.len(), 49410);
    assert_eq!(added.token_id("<cls0>"), Some(49409));

    let cases = reference["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 12);
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        assert_eq!(
            plain.encode(prompt).unwrap(),
            ids(&case["input_ids"]),
            "plain ids of {prompt:?}"
        );
        assert_eq!(
            added.encode(prompt).unwrap(),
            ids(&case["input_ids_with_added_tokens"]),
            "ids with added tokens of {prompt:?}"
        );
    }
}

fn check_tiny(dir: &Path) {
    let config = &read_json(&common::tiny_ref().join("ref_diffii.json"))["config"];
    let mut tok = ClipTokenizer::from_dir(dir).unwrap();
    assert_eq!(
        (tok.vocab_size(), tok.bos_id(), tok.eos_id(), tok.pad_id()),
        (1000, 998, 999, 999)
    );
    let concepts = vec!["<cls0>".to_string(), "<cls1>".to_string()];
    assert_eq!(tok.add_concept_tokens(&concepts).unwrap(), vec![1000, 1001]);
    for (prompt, expected) in [
        ("prompt_a_stage1", "input_ids_a"),
        ("prompt_b_concept_inversion_stage2", "input_ids_b"),
        ("prompt_uncond", "input_ids_uncond"),
    ] {
        let prompt = config[prompt].as_str().unwrap();
        assert_eq!(
            tok.encode(prompt).unwrap(),
            ids(&config[expected]),
            "ids of {prompt:?} from {}",
            dir.display()
        );
    }
}

#[test]
fn tiny_vocab_from_tokenizer_json() {
    let dir = common::tiny_sd().join("tokenizer");
    assert!(dir.join("tokenizer.json").is_file());
    check_tiny(&dir);
}

#[test]
fn tiny_vocab_from_vocab_and_merges() {
    let src = common::tiny_sd().join("tokenizer");
    let dir = temp_dir("tiny-vocab-merges");
    for f in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    check_tiny(&dir);

    // Both load paths must agree beyond the reference prompts too.
    let from_json = ClipTokenizer::from_dir(&src).unwrap();
    let from_files = ClipTokenizer::from_dir(&dir).unwrap();
    for prompt in [
        "A Photo Of A Cardinal, in the SNOW!!",
        "don't  stop\tbelieving 1234 <|endoftext|> café 🐦 日本語",
        "CAFE\u{301} Cre\u{300}me",
        &"long prompt ".repeat(60),
    ] {
        assert_eq!(
            from_json.encode(prompt).unwrap(),
            from_files.encode(prompt).unwrap(),
            "{prompt:?}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn prompts_are_normalised_before_matching() {
    let dir = common::fixtures().join("clip-tokenizer");
    let mut tok = ClipTokenizer::from_dir(&dir).unwrap();
    // NFC then lowercase: a decomposed, upper-case "CAFÉ" is the same word as "café".
    assert_eq!(
        tok.encode("a CAFE\u{301}").unwrap(),
        tok.encode("a café").unwrap()
    );
    // Concept tokens are matched in the normalised text (transformers' `add_tokens` default),
    // so an upper-cased placeholder in a prompt still maps to the concept id.
    tok.add_concept_tokens(&["<cls0>".to_string()]).unwrap();
    assert_eq!(
        tok.encode("a <CLS0> bird").unwrap(),
        tok.encode("a <cls0> bird").unwrap()
    );
    assert_eq!(
        tok.encode("a <cls0>bird").unwrap()[..4],
        [49406, 320, 49408, 3329]
    );
}

#[test]
fn long_prompt_keeps_end_token() {
    let tok = ClipTokenizer::from_dir(&common::tiny_sd().join("tokenizer")).unwrap();
    let ids = tok.encode(&"bird ".repeat(200)).unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[0], tok.bos_id());
    assert_eq!(ids[76], tok.eos_id());
    assert!(ids[1..76].iter().all(|&i| i != tok.eos_id()));
}

#[test]
fn folder_without_vocab_is_an_error_naming_it() {
    let dir = temp_dir("no-vocab");
    let err = ClipTokenizer::from_dir(&dir)
        .err()
        .expect("empty folder must not load")
        .to_string();
    assert!(err.contains(&dir.display().to_string()), "{err}");
    assert!(err.contains("vocab.json"), "{err}");

    // vocab.json alone: the missing merges.txt must be named.
    std::fs::copy(
        common::tiny_sd().join("tokenizer/vocab.json"),
        dir.join("vocab.json"),
    )
    .unwrap();
    let err = ClipTokenizer::from_dir(&dir)
        .err()
        .expect("no merges.txt")
        .to_string();
    assert!(err.contains("merges.txt"), "{err}");

    // A malformed merges.txt: the file and line must be named.
    std::fs::write(dir.join("merges.txt"), "#version: 0.2\ni n\nbroken\n").unwrap();
    let err = ClipTokenizer::from_dir(&dir)
        .err()
        .expect("bad merges.txt")
        .to_string();
    assert!(
        err.contains("merges.txt") && err.contains("line 3"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn duplicate_concept_tokens_are_errors() {
    let mut tok = ClipTokenizer::from_dir(&common::tiny_sd().join("tokenizer")).unwrap();
    tok.add_concept_tokens(&["<cls0>".to_string()]).unwrap();

    let err = tok
        .add_concept_tokens(&["<cls0>".to_string()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("<cls0>") && err.contains("already exists"),
        "{err}"
    );
    let err = tok
        .add_concept_tokens(&["<|endoftext|>".to_string()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("already exists"), "{err}");
    let err = tok
        .add_concept_tokens(&["<x>".to_string(), "<x>".to_string()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("<x>") && err.contains("twice"), "{err}");

    // Failed calls must leave the tokenizer unchanged.
    assert_eq!(tok.len(), 1001);
    assert_eq!(tok.token_id("<x>"), None);
}
