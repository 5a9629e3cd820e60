//! The baselines (DA-Fusion image-to-image, Diff-Mix inter-class image-to-image, text-to-image) through the shared synthesis driver
//! on the tiny fixture model: a valid manifest tagged with the method, sources and strengths as
//! promised, the same bytes for any batch size, resume, Diff-II-only flags refused, and the
//! output readable by the classifier harness.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use diffii::hash::sha256_file;
use diffii::synth::manifest::read_jsonl;

/// sparrow: 3 images; gull: 2 (the classes of the fixture's concepts).
fn dataset(root: &Path) -> PathBuf {
    let data = root.join("data");
    for (class, n) in [("sparrow", 3u32), ("gull", 2)] {
        std::fs::create_dir_all(data.join(class)).unwrap();
        for i in 0..n {
            let img = image::RgbImage::from_fn(32, 32, |x, y| {
                let v = (x * 7 + y * 13 + i * 31 + n * 5) % 256;
                image::Rgb([v as u8, (255 - v) as u8, ((v * 3) % 256) as u8])
            });
            img.save(data.join(class).join(format!("{i}.png"))).unwrap();
        }
    }
    data
}

fn generate(data: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<String> = ["generate", "--model", common::tiny_sd().to_str().unwrap(), "--data", data.to_str().unwrap()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--out", out.to_str().unwrap(), "--size", "32", "--steps", "8", "--per-class", "3", "--quiet"].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    Command::new(env!("CARGO_BIN_EXE_diffii")).args(&args).output().unwrap()
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v = Vec::new();
    for class in ["sparrow", "gull"] {
        for e in std::fs::read_dir(dir.join(class)).unwrap() {
            let p = e.unwrap().path();
            v.push((p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()));
        }
    }
    v.push(("manifest.jsonl".into(), std::fs::read(dir.join("manifest.jsonl")).unwrap()));
    v.sort();
    v
}

#[test]
fn each_baseline_writes_a_valid_manifest_deterministically() {
    let root = common::empty_temp_dir("baselines");
    let data = dataset(&root);
    let mut mixed = 0;
    for (method, extra) in [("da-fusion", vec!["--strengths", "0.5,1"]), ("diff-mix", vec!["--strengths", "0.5", "--mix-gamma", "0.5"]), ("txt2img", vec![])] {
        let a = root.join(format!("{method}-a"));
        let mut args = vec!["--method", method, "--batch", "1"];
        args.extend(&extra);
        ok(generate(&data, &a, &args));
        let recs = read_jsonl(&a.join("manifest.jsonl")).unwrap();
        assert_eq!(recs.len(), 6, "3 per class");
        for r in &recs {
            assert_eq!(r.method, method);
            assert_eq!(sha256_file(a.join(&r.file)).unwrap(), r.output_sha256, "{}", r.file);
            assert!(r.prompt.contains(if r.class == "sparrow" { "<cls0>" } else { "<cls1>" }), "{}", r.prompt);
            match method {
                "da-fusion" => {
                    let src = data.join(&r.sources[0]);
                    assert!(r.sources[0].starts_with(&format!("{}/", r.class)), "a same-class source: {:?}", r.sources);
                    assert_eq!(sha256_file(&src).unwrap(), r.source_sha256[0]);
                    assert!([0.5, 1.0].contains(&r.strength), "strength {}", r.strength);
                    assert!(r.soft_label.is_empty());
                }
                "diff-mix" => {
                    let src = data.join(&r.sources[0]);
                    assert_eq!(sha256_file(&src).unwrap(), r.source_sha256[0]);
                    assert_eq!(r.strength, 0.5);
                    let source_class = r.sources[0].split('/').next().unwrap();
                    if source_class == r.class {
                        assert!(r.soft_label.is_empty(), "an intra-class draw keeps the hard label");
                    } else {
                        // strength^gamma for the target, the rest for the source.
                        let w = 0.5f64.powf(0.5);
                        assert_eq!(r.soft_label, vec![(r.class.clone(), w), (source_class.to_string(), 1.0 - w)]);
                        mixed += 1;
                    }
                }
                _ => assert!(r.sources.iter().all(|s| s.is_empty()) && r.strength == 1.0),
            }
        }
        assert!(a.join("previews/sparrow.png").is_file());
        // Batch size does not change a byte; rerunning makes nothing new.
        let b = root.join(format!("{method}-b"));
        let mut args = vec!["--method", method, "--batch", "4"];
        args.extend(&extra);
        ok(generate(&data, &b, &args));
        assert_eq!(files(&a), files(&b), "{method}: batch 1 vs 4");
        let again = ok(generate(&data, &a, &args));
        assert!(again.contains("written 0 | skipped (already done) 6"), "{again}");
        // The classifier harness reads the folder through its manifest.
        let classes = vec!["gull".to_string(), "sparrow".to_string()];
        let set = diffii::classify::data::synthetic_dataset(&a, &classes).unwrap();
        assert_eq!(set.dataset.items.len(), 6);
        let soft = set.soft_labels.iter().filter(|l| l.is_some()).count();
        assert_eq!(soft, if method == "diff-mix" { mixed } else { 0 }, "{method}: soft labels reach the classifier");
    }
    assert!(mixed > 0, "some Diff-Mix sources come from the other class");
}

#[test]
fn flags_of_another_method_are_refused() {
    let root = common::empty_temp_dir("baselines-flags");
    let data = dataset(&root);
    for (args, expect) in [
        (vec!["--method", "da-fusion", "--strength", "0.3"], "--strength is a Diff-II setting"),
        (vec!["--method", "txt2img", "--strengths", "0.5"], "--strengths is an img2img setting"),
        (vec!["--strengths", "0.5"], "--strengths is a da-fusion setting"),
        (vec!["--method", "da-fusion", "--strengths", "0.1"], "runs no step"),
        (vec!["--method", "da-fusion", "--prompt-template", "a photo"], "has no {concept}"),
        (vec!["--method", "da-fusion", "--mix-gamma", "0.5"], "--mix-gamma is a diff-mix setting"),
        (vec!["--method", "diff-mix", "--mix-gamma", "NaN"], "--mix-gamma must be finite"),
        (vec!["--method", "diff-mix", "--strength", "0.3"], "--strength is a Diff-II setting"),
    ] {
        let o = generate(&data, &root.join("out"), &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(expect), "{args:?}: {err}");
    }
}
