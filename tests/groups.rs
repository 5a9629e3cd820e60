//! Group-shift evaluation: the group file's errors, and `train` / `eval` reporting per-group,
//! group-mean and worst-group accuracy that agree with the overall accuracy.
mod common;

use std::path::Path;
use std::process::Command;

use diffii::classify::groups::Groups;
use diffii::data::dataset::Dataset;

/// Two classes whose pattern side a classifier can learn, `n` images each.
fn image_folder(root: &Path, n: usize) {
    for c in 0..2 {
        let dir = root.join(format!("c{c}"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..n {
            let img = image::RgbImage::from_fn(12, 12, |x, _| {
                let noise = ((x * 31 + i as u32 * 13 + c * 7) % 40) as u8;
                let v = if (x < 6) == (c == 0) { 200 + noise / 2 } else { noise };
                image::Rgb([v, v, v])
            });
            img.save(dir.join(format!("{i:03}.png"))).unwrap();
        }
    }
}

/// Groups by image index parity, so every group holds both classes.
fn parity_groups(test: &Dataset) -> String {
    test.items.iter().enumerate().map(|(i, it)| format!("{} {}\n", it.rel, if i % 2 == 0 { "even" } else { "odd" })).collect()
}

#[test]
fn group_files_are_read_by_test_image_path_and_mistakes_are_named() {
    let root = common::empty_temp_dir("groups-read");
    std::fs::create_dir_all(root.join("my imgs")).unwrap();
    for name in ["a b.png", "c.png", "d.png"] {
        image::RgbImage::new(4, 4).save(root.join("my imgs").join(name)).unwrap();
    }
    std::fs::write(root.join("test.txt"), "my imgs/a b.png x\nmy imgs/c.png y\nmy imgs/d.png x\n").unwrap();
    let test = Dataset::open(root.join("test.txt"), None).unwrap();
    let write = |text: &str| {
        let p = root.join("groups.txt");
        std::fs::write(&p, text).unwrap();
        p
    };
    let g = Groups::read(&write("# group per image\nmy imgs/a b.png water bg\n./my imgs/c.png land\nmy imgs/d.png land\n"), &test);
    // The group is the last word: `water bg` is image `my imgs/a b.png water`, not in the set.
    assert!(g.unwrap_err().to_string().contains("`my imgs/a b.png water` is not an image of the test set"));
    let g = Groups::read(&write("my imgs/a b.png water\n./my imgs/c.png land\nmy imgs/d.png land\n"), &test).unwrap();
    assert_eq!(g.names, ["land", "water"]);
    let by_rel: Vec<(&str, &str)> = test.items.iter().zip(&g.of_item).map(|(it, &k)| (it.rel.as_str(), g.names[k].as_str())).collect();
    assert!(by_rel.contains(&("my imgs/a b.png", "water")) && by_rel.contains(&("my imgs/c.png", "land")), "{by_rel:?}");
    for (text, needle) in [
        ("my imgs/a b.png water\nmy imgs/c.png land\n", "1 of the 3 test images have no group (e.g. my imgs/d.png)"),
        ("my imgs/a b.png water\nmy imgs/c.png land\nmy imgs/c.png water\nmy imgs/d.png land\n", "line 3: `my imgs/c.png` is given a group twice"),
        ("nogroup.png\n", "line 1: expected `<image path> <group>`"),
        ("other/e.png land\n", "line 1: `other/e.png` is not an image of the test set"),
    ] {
        let err = Groups::read(&write(text), &test).unwrap_err().to_string();
        assert!(err.contains(needle) && err.contains("groups.txt"), "{err}");
    }
    let err = Groups::read(&root.join("missing.txt"), &test).unwrap_err().to_string();
    assert!(err.contains("missing.txt"), "{err}");
}

fn diffii(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_diffii")).args(args).output().unwrap()
}

#[test]
fn train_and_eval_report_groups_that_add_up_to_the_overall_accuracy() {
    let root = common::empty_temp_dir("groups-train");
    image_folder(&root.join("train"), 8);
    image_folder(&root.join("test"), 5);
    let test = Dataset::open(root.join("test"), None).unwrap();
    std::fs::write(root.join("groups.txt"), parity_groups(&test)).unwrap();
    let (train, test_dir, out, groups) = (root.join("train"), root.join("test"), root.join("out"), root.join("groups.txt"));
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let args: Vec<String> = [
        "train", "--data", &s(&train), "--test", &s(&test_dir), "--test-groups", &s(&groups), "--out", &s(&out), "--seeds", "0,1",
        "--epochs", "3", "--batch", "4", "--size", "12", "--val-per-class", "2", "--lr", "0.05", "--quiet",
    ]
    .map(String::from)
    .to_vec();
    let o = diffii(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("worst-group accuracy") && stdout.contains("group even") && stdout.contains("group odd"), "{stdout}");

    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let mut worst_selected = Vec::new();
    for seed in results["seeds"].as_array().unwrap() {
        for (which, overall) in [("groups_selected", "test_acc_selected"), ("groups_last", "test_acc_last")] {
            let g = &seed[which];
            let scores = g["groups"].as_array().unwrap();
            assert_eq!(scores.iter().map(|x| x["name"].as_str().unwrap()).collect::<Vec<_>>(), ["even", "odd"]);
            let n: u64 = scores.iter().map(|x| x["images"].as_u64().unwrap()).sum();
            assert_eq!(n, 10);
            let weighted: f64 = scores.iter().map(|x| x["accuracy"].as_f64().unwrap() * x["images"].as_u64().unwrap() as f64).sum::<f64>() / n as f64;
            assert!((weighted - seed[overall].as_f64().unwrap()).abs() < 1e-12, "{which}: groups weighted by size give the overall accuracy");
            let accs: Vec<f64> = scores.iter().map(|x| x["accuracy"].as_f64().unwrap()).collect();
            assert_eq!(g["worst"].as_f64().unwrap(), accs.iter().cloned().fold(f64::INFINITY, f64::min));
            assert!((g["mean"].as_f64().unwrap() - accs.iter().sum::<f64>() / 2.0).abs() < 1e-12);
        }
        worst_selected.push(seed["groups_selected"]["worst"].as_f64().unwrap());
    }
    let summary = &results["groups"];
    let mean = worst_selected.iter().sum::<f64>() / 2.0;
    assert!((summary["worst_selected"][0].as_f64().unwrap() - mean).abs() < 1e-12, "{summary}");

    // eval recomputes the last epoch's group accuracies from the saved model.
    let o = diffii(&["eval", "--model", &s(&out.join("seed-0")), "--data", &s(&test_dir), "--groups", &s(&groups)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let worst = results["seeds"][0]["groups_last"]["worst"].as_f64().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains(&format!("worst-group accuracy {:.2} %", 100.0 * worst)), "{text}");

    // Finished seeds were measured on these groups: other groups in the same folder are refused.
    std::fs::write(&groups, parity_groups(&test).replace("even", "other")).unwrap();
    let o = diffii(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("different settings"), "{}", String::from_utf8_lossy(&o.stderr));
}
