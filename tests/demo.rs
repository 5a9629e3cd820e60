//! `diffii demo --quick` end to end on the shipped data and mini SD model: the report and
//! results exist, the accuracies are sane, and a rerun resumes to the same bytes.
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
