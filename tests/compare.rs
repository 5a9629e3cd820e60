//! A tiny end-to-end `diffii compare` on the fixture model: every method's cell, the results
//! table, generation from the training split only (no validation or test image reaches the
//! generator), resume, added seeds, and refusal of changed settings in the same folder.
mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

use diffii::classify::protocol::{split, SplitSpec};
use diffii::data::dataset::Dataset;
use diffii::synth::manifest::read_jsonl;

fn image_folder(root: &Path, n: u32) {
    for (ci, class) in ["gull", "sparrow"].iter().enumerate() {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..n {
            image::RgbImage::from_fn(32, 32, |x, y| {
                let v = ((if ci == 0 { y } else { x }) * 8 + i * 9) % 256;
                image::Rgb([v as u8, ((x * 3 + i * 20) % 256) as u8, 128])
            })
            .save(root.join(class).join(format!("{i}.png")))
            .unwrap();
        }
    }
}

fn compare(root: &Path, extra: &[&str]) -> Output {
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let mut args: Vec<String> = vec!["compare".into(), "--model".into(), path(&common::tiny_sd())];
    args.extend(["--data".into(), path(&root.join("train")), "--test".into(), path(&root.join("test")), "--out".into(), path(&root.join("out"))]);
    let quick = [
        "--superclass", "bird", "--per-class", "2", "--steps", "4", "--inversion-steps", "4", "--epochs", "2", "--batch", "4",
        "--size", "16", "--val-per-class", "1", "--shots", "2", "--quiet",
    ];
    args.extend(quick.iter().chain(extra).map(|s| s.to_string()));
    Command::new(env!("CARGO_BIN_EXE_diffii")).args(&args).output().unwrap()
}

#[test]
fn compare_runs_every_method_from_the_training_split_and_resumes() {
    let root = common::empty_temp_dir("compare");
    image_folder(&root.join("train"), 4);
    image_folder(&root.join("test"), 3);
    let o = compare(&root, &["--methods", "none,classic,diffii,da-fusion,txt2img", "--seeds", "0"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = std::fs::read_to_string(root.join("out/results.md")).unwrap();
    for m in ["| none |", "| classic |", "| diffii |", "| da-fusion |", "| txt2img |"] {
        assert!(table.contains(m), "{table}");
    }
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root.join("out/results.json")).unwrap()).unwrap();
    let methods = results["methods"].as_array().unwrap();
    assert_eq!(methods.len(), 5);
    assert_eq!((&methods[0]["synthetic_images"], &methods[1]["synthetic_images"]), (&0.into(), &0.into()));
    for m in &methods[2..] {
        assert_eq!(m["synthetic_images"], 4, "2 per class for every generator: {m}");
    }
    // Quality by the `none` classifier, for generating methods only.
    assert!(methods[0]["quality"].is_null() && methods[1]["quality"].is_null());
    for m in &methods[2..] {
        let q = &m["quality"];
        let f = q["faithfulness"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&f), "{m}");
        assert!(q["diversity"].as_f64().unwrap() >= 0.0 && q["novelty"].as_f64().unwrap() >= 0.0, "{m}");
    }
    assert!(root.join("out/diffii/seed-0/quality.json").is_file());
    // Sources come from seed 0's training split only.
    let ds = Dataset::open(root.join("train"), None).unwrap();
    let sp = split(&ds, &SplitSpec { val_per_class: 1, shots: Some(2), imbalance: None }, 0).unwrap();
    let train_rel: BTreeSet<&str> = sp.train.iter().map(|&i| ds.items[i].rel.as_str()).collect();
    for method in ["diffii", "da-fusion"] {
        for r in read_jsonl(&root.join(format!("out/{method}/seed-0/synthetic/manifest.jsonl"))).unwrap() {
            for s in r.sources.iter().filter(|s| !s.is_empty()) {
                assert!(train_rel.contains(s.as_str()), "{method} used {s}, outside the training split {train_rel:?}");
            }
        }
    }
    // Rerun: nothing is redone and the numbers stay; an added seed runs only its cells.
    let before = std::fs::read_to_string(root.join("out/diffii/seed-0/result.json")).unwrap();
    let o = compare(&root, &["--methods", "none,diffii", "--seeds", "0,1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(before, std::fs::read_to_string(root.join("out/diffii/seed-0/result.json")).unwrap());
    assert!(root.join("out/diffii/seed-1/result.json").is_file());
    // `+classic` variants train on their generator's own images, generating nothing new.
    let record = root.join("out/diffii/seed-0/synthetic/generation.json");
    let stamp = std::fs::metadata(&record).unwrap().modified().unwrap();
    let o = compare(&root, &["--methods", "diffii", "--seeds", "0", "--with-classic"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root.join("out/results.json")).unwrap()).unwrap();
    let row = results["methods"].as_array().unwrap().iter().find(|m| m["method"] == "diffii+classic").expect("diffii+classic row").clone();
    assert_eq!(row["synthetic_images"], 4);
    assert!(!row["quality"].is_null(), "the generator's quality is reported");
    assert_eq!(std::fs::metadata(&record).unwrap().modified().unwrap(), stamp, "no new generation");
    assert!(root.join("out/diffii+classic/seed-0/result.json").is_file() && !root.join("out/diffii+classic/seed-0/synthetic").exists());
    // Changed settings for a method already in the folder are refused.
    let o = compare(&root, &["--methods", "diffii", "--seeds", "0", "--guidance", "3"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("different settings"), "{err}");
}

#[test]
fn filtered_compare_judges_with_none_first_and_counts_the_drops() {
    let root = common::empty_temp_dir("compare-filter");
    image_folder(&root.join("train"), 4);
    image_folder(&root.join("test"), 3);
    let o = compare(&root, &["--methods", "diff-mix,diffii", "--seeds", "0", "--filter-min", "0.5"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("add none to the methods"), "{err}");
    // `none` listed last still runs first: its classifier is the judge.
    let o = compare(&root, &["--methods", "diff-mix,diffii,none", "--seeds", "0", "--filter-min", "0.5"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root.join("out/results.json")).unwrap()).unwrap();
    let methods = results["methods"].as_array().unwrap();
    let names: Vec<&str> = methods.iter().map(|m| m["method"].as_str().unwrap()).collect();
    assert_eq!(names, ["diff-mix", "diffii", "none"], "rows keep the order asked for");
    for m in &methods[..2] {
        let name = m["method"].as_str().unwrap();
        let recs = read_jsonl(&root.join(format!("out/{name}/seed-0/synthetic/manifest.jsonl"))).unwrap();
        assert_eq!(recs.len(), 4, "every record stays on record");
        let dropped = recs.iter().filter(|r| r.dropped.is_some()).count();
        assert_eq!(m["synthetic_dropped"].as_u64(), Some(dropped as u64), "{m}");
        assert_eq!(m["seeds"][0]["synthetic_images"].as_u64(), Some(4 - dropped as u64), "the classifier trains on the kept images only");
        if name == "diff-mix" {
            assert!(recs.iter().all(|r| r.method == "diff-mix" && r.strength == 0.7));
        }
    }
    assert!(methods[2]["synthetic_dropped"].is_null());
    let table = std::fs::read_to_string(root.join("out/results.md")).unwrap();
    assert!(table.contains("dropped by filter"), "{table}");
    // Another threshold in the same folder is refused.
    let o = compare(&root, &["--methods", "none", "--seeds", "0", "--filter-min", "0.2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("different settings"), "{err}");
}

#[test]
fn sweep_grids_labels_and_families() {
    use diffii::experiment::compare::MethodKind;
    use diffii::experiment::sweep::{family, label, points, Axis};
    let axes: Vec<Axis> = ["guidance=1,3", "strength=0.1,0.3,0.5", "syn-p=0.5"].iter().map(|s| s.parse().unwrap()).collect();
    let diffii = points(&axes, |k| MethodKind::Diffii.swept_by(k)).unwrap();
    assert_eq!(diffii.len(), 6, "2 x 3 x 1");
    assert_eq!(label(&diffii[1]), "guidance=1,strength=0.3,syn-p=0.5");
    assert_eq!(points(&axes, |k| MethodKind::DaFusion.swept_by(k)).unwrap().len(), 2, "strength is Diff-II's alone");
    assert_eq!(points(&axes, |k| MethodKind::None.swept_by(k)).unwrap(), vec![vec![]], "no axis applies to none");
    assert_eq!(family("diffii@guidance=1,strength=0.3+classic"), "diffii+classic");
    assert_eq!(family("da-fusion@guidance=3"), "da-fusion");
    assert_eq!(family("none"), "none");
    for (bad, expect) in [("foo=1", "not one of"), ("steps=1.5", "whole numbers"), ("guidance=NaN", "finite"), ("guidance", "key=v1,v2")] {
        let e = bad.parse::<Axis>().unwrap_err();
        assert!(e.contains(expect), "{bad}: {e}");
    }
    let twice: Vec<Axis> = ["guidance=1", "guidance=3"].iter().map(|s| s.parse().unwrap()).collect();
    assert!(points(&twice, |k| MethodKind::Diffii.swept_by(k)).unwrap_err().to_string().contains("given twice"));
}

#[test]
fn a_swept_compare_selects_each_family_on_validation_accuracy() {
    let root = common::empty_temp_dir("compare-sweep");
    image_folder(&root.join("train"), 4);
    image_folder(&root.join("test"), 3);
    let o = compare(&root, &["--methods", "none,diffii", "--seeds", "0,1", "--sweep", "guidance=1,3", "--sweep", "syn-p=0.25,0.75"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root.join("out/results.json")).unwrap()).unwrap();
    let methods = results["methods"].as_array().unwrap();
    let names: Vec<&str> = methods.iter().map(|m| m["method"].as_str().unwrap()).collect();
    assert_eq!(names, ["none", "diffii@guidance=1,syn-p=0.25", "diffii@guidance=1,syn-p=0.75", "diffii@guidance=3,syn-p=0.25", "diffii@guidance=3,syn-p=0.75"]);
    // Each guidance generated once, with its own value; the syn-p variants train on that set.
    for (name, g) in [("diffii@guidance=1", 1.0), ("diffii@guidance=3", 3.0)] {
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root.join(format!("out/{name}/seed-0/synthetic/run_config.json"))).unwrap()).unwrap();
        assert_eq!(cfg["guidance"].as_f64(), Some(g), "{name}");
    }
    for m in &methods[1..] {
        let name = m["method"].as_str().unwrap();
        assert!(!root.join(format!("out/{name}/seed-0/synthetic")).exists(), "{name} generated its own copy");
        assert_eq!(m["synthetic_images"], 8, "2 per class, 2 classes, 2 seeds: {m}");
    }
    // The selection is the variant with the best mean validation accuracy (first of equals).
    let mean_val = |m: &serde_json::Value| {
        let v: Vec<f64> = m["seeds"].as_array().unwrap().iter().map(|s| s["val_acc_selected"].as_f64().unwrap()).collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    let mut best = &methods[1];
    for m in &methods[2..] {
        if mean_val(m) > mean_val(best) {
            best = m;
        }
    }
    let sel = results["selected"].as_array().unwrap();
    assert_eq!(sel.len(), 1, "only diffii has variants: {sel:?}");
    assert_eq!((sel[0]["family"].as_str(), sel[0]["method"].as_str(), sel[0]["variants"].as_u64()), (Some("diffii"), best["method"].as_str(), Some(4)));
    assert_eq!(sel[0]["test_acc_selected"], best["test_acc_selected"]);
    let table = std::fs::read_to_string(root.join("out/results.md")).unwrap();
    assert!(table.contains("Selected on validation accuracy") && table.contains(best["method"].as_str().unwrap()), "{table}");
}

#[test]
fn sharded_compare_equals_a_whole_run_and_reports_groups() {
    let root = common::empty_temp_dir("compare-shard");
    image_folder(&root.join("train"), 4);
    image_folder(&root.join("test"), 3);
    let test = Dataset::open(root.join("test"), None).unwrap();
    let groups: String = test.items.iter().map(|it| format!("{} {}\n", it.rel, if it.rel.ends_with("1.png") { "b" } else { "a" })).collect();
    std::fs::write(root.join("groups.txt"), groups).unwrap();
    let g = root.join("groups.txt").to_str().unwrap().to_string();
    let common_args = ["--methods", "none,diffii", "--seeds", "0,1,2", "--test-groups", g.as_str()];
    let whole = compare(&root, &common_args);
    assert!(whole.status.success(), "{}", String::from_utf8_lossy(&whole.stderr));
    let read = |p: &Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
    let reference = read(&root.join("out/results.json"));
    std::fs::rename(root.join("out"), root.join("whole")).unwrap();

    for shard in ["1/2", "0/2"] {
        let o = compare(&root, &[&common_args[..], &["--shard", shard]].concat());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(read(&root.join("out/results.shard-0-of-2.json"))["seeds"], serde_json::json!([0, 2]));
    assert_eq!(read(&root.join("out/results.shard-1-of-2.json"))["seeds"], serde_json::json!([1]));
    assert!(!root.join("out/results.json").exists(), "a shard writes only its own results");
    let stamp = std::fs::metadata(root.join("out/diffii/seed-1/result.json")).unwrap().modified().unwrap();
    let o = compare(&root, &common_args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::metadata(root.join("out/diffii/seed-1/result.json")).unwrap().modified().unwrap(), stamp, "assembling recomputes nothing");
    let merged = read(&root.join("out/results.json"));
    for (a, b) in reference["methods"].as_array().unwrap().iter().zip(merged["methods"].as_array().unwrap()) {
        for key in ["method", "test_acc_selected", "test_acc_last", "synthetic_images", "quality", "groups"] {
            assert_eq!(a[key], b[key], "{key}");
        }
        assert!(!a["groups"].is_null(), "{a}");
    }
    let table = std::fs::read_to_string(root.join("out/results.md")).unwrap();
    assert!(table.contains("worst group (%)") && table.contains("| a (%) | b (%) |"), "{table}");
    let o = compare(&root, &[&common_args[..], &["--shard", "3/3"]].concat());
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("need 0 <= i < n"), "{}", String::from_utf8_lossy(&o.stderr));
}
