//! `diffii demo --quick` (few-shot and group shift) end to end on the shipped data and mini SD
//! models: the report and results exist, the accuracies are sane, a rerun resumes to the same
//! bytes, and the group-shift run reports its four test groups.
mod common;

use std::process::Command;

fn demo(out: &std::path::Path) {
    let status = Command::new(env!("CARGO_BIN_EXE_diffii"))
        .args(["demo", "--quick", "--quiet", "--out"])
        .arg(out)
        .status()
        .expect("run diffii");
    assert!(status.success(), "diffii demo --quick failed");
}

#[test]
fn quick_demo_writes_a_sane_report_and_resumes() {
    let out = common::empty_temp_dir("demo-quick");
    demo(&out);
    let results: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    let acc = |m: &str| -> f64 {
        let row = results["methods"].as_array().unwrap().iter().find(|r| r["method"] == m).unwrap_or_else(|| panic!("{m} missing"));
        row["test_acc_selected"][0].as_f64().unwrap()
    };
    // 10 classes: chance is 10 %. Five real images per class give a small ResNet well above it.
    let none = acc("none");
    assert!((0.25..0.85).contains(&none), "no augmentation: {none}");
    assert!(acc("diffii") > 0.15, "Diff-II: {}", acc("diffii"));
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    for needle in ["<svg", "none", "diffii", "data:image/png;base64,"] {
        assert!(html.contains(needle), "report lacks {needle}");
    }
    let before = (std::fs::read(out.join("results.json")).unwrap(), html);
    demo(&out);
    let after = (std::fs::read(out.join("results.json")).unwrap(), std::fs::read_to_string(out.join("report.html")).unwrap());
    assert!(before == after, "a rerun of a finished demo changed its results or report");
}

#[test]
fn quick_group_shift_demo_reports_every_group_and_the_shortcut_shows() {
    let out = common::empty_temp_dir("demo-ood-quick");
    let status = Command::new(env!("CARGO_BIN_EXE_diffii"))
        .args(["demo", "--protocol", "ood", "--quick", "--quiet", "--out"])
        .arg(&out)
        .status()
        .expect("run diffii");
    assert!(status.success(), "diffii demo --protocol ood --quick failed");
    let results: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    for row in results["methods"].as_array().unwrap() {
        let g = &row["groups"];
        let names: Vec<&str> = g["per_group_selected"].as_array().unwrap().iter().map(|p| p[0].as_str().unwrap()).collect();
        assert_eq!(names, ["A-cool", "A-warm", "B-cool", "B-warm"], "{row}");
        let (worst, mean) = (g["worst_selected"][0].as_f64().unwrap(), g["mean_selected"][0].as_f64().unwrap());
        assert!(worst <= mean, "{row}");
        // The four test groups are equally large, so the group mean is the overall accuracy.
        assert!((mean - row["test_acc_selected"][0].as_f64().unwrap()).abs() < 1e-9, "{row}");
    }
    // Trained on real images alone, the classifier leans on the colour: the groups where colour
    // and label disagree are far below the mean.
    let none = results["methods"].as_array().unwrap().iter().find(|r| r["method"] == "none").unwrap();
    let (worst, mean) = (none["groups"]["worst_selected"][0].as_f64().unwrap(), none["groups"]["mean_selected"][0].as_f64().unwrap());
    assert!(worst + 0.05 < mean, "no shortcut visible: worst group {worst}, mean {mean}");
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    for needle in ["worst group (%)", "A-cool (%)", "test images: warm backgrounds | cool backgrounds"] {
        assert!(html.contains(needle), "report lacks {needle}");
    }
    assert!(out.join("data-ood/test_groups.txt").is_file());
}
