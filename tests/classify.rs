//! The classifier harness: protocol splits (sizes, no overlap, reproducible per seed), the
//! replacement draws (frequency and inverse-frequency classes, statistically), augmentation,
//! the synthetic set read through a manifest, and a tiny end-to-end `diffii train` / `eval`
//! that gives the same bytes for any thread count.
mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use diffii::classify::data::{color_jitter, crop_box, resize_bilinear, rotate_bilinear, synthetic_dataset, Augment};
use diffii::classify::loss::soft_targets;
use diffii::classify::mix::{ClassDraw, Mixer, Pick};
use diffii::classify::protocol::{split, SplitSpec};
use diffii::data::dataset::Dataset;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// `n[c]` small distinct PNGs per class `c{c}` (pattern depends on class, so a classifier can
/// learn it: class 0 bright on the left, class 1 on the right, class 2 at the top).
fn image_folder(root: &Path, n: &[usize]) -> PathBuf {
    for (c, &k) in n.iter().enumerate() {
        let dir = root.join(format!("c{c}"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..k {
            let img = image::RgbImage::from_fn(12, 12, |x, y| {
                let on = match c % 3 {
                    0 => x < 6,
                    1 => x >= 6,
                    _ => y < 6,
                };
                let noise = ((x * 31 + y * 17 + i as u32 * 13 + c as u32 * 7) % 40) as u8;
                let v = if on { 200 + noise / 2 } else { noise };
                image::Rgb([v, v, v])
            });
            img.save(dir.join(format!("{i:03}.png"))).unwrap();
        }
    }
    root.to_path_buf()
}

#[test]
fn splits_have_the_promised_sizes_never_overlap_and_repeat_per_seed() {
    let root = common::empty_temp_dir("cls-split");
    let ds = Dataset::open(image_folder(&root, &[20, 15, 12]), None).unwrap();
    let spec = SplitSpec { val_per_class: 3, shots: Some(5), imbalance: None };
    let a = split(&ds, &spec, 0).unwrap();
    assert_eq!(a, split(&ds, &spec, 0).unwrap(), "same seed, same split");
    let b = split(&ds, &spec, 1).unwrap();
    assert_ne!(a.train, b.train, "few-shot draws differ per seed");
    for s in [&a, &b] {
        assert_eq!((s.train.len(), s.val.len()), (15, 9));
        let (t, v): (BTreeSet<_>, BTreeSet<_>) = (s.train.iter().collect(), s.val.iter().collect());
        assert!(t.is_disjoint(&v), "an image is in both splits");
        for c in 0..3 {
            assert_eq!(s.train.iter().filter(|&&i| ds.items[i].class == c).count(), 5);
            assert_eq!(s.val.iter().filter(|&&i| ds.items[i].class == c).count(), 3);
        }
    }
    // Long tail: exponential profile from the smallest pool (12 - 3 = 9) down to 9 * 0.1.
    let lt = split(&ds, &SplitSpec { val_per_class: 3, shots: None, imbalance: Some(0.1) }, 0).unwrap();
    let per: Vec<usize> = (0..3).map(|c| lt.train.iter().filter(|&&i| ds.items[i].class == c).count()).collect();
    assert_eq!(per, vec![9, 3, 1], "round(9 * 0.1^(c/2))");
    // Not enough images for the protocol: an error naming the class.
    let e = split(&ds, &SplitSpec { val_per_class: 10, shots: Some(5), imbalance: None }, 0).unwrap_err().to_string();
    assert!(e.contains("`c2`") && e.contains("12 images"), "{e}");
    assert!(split(&ds, &SplitSpec { val_per_class: 1, shots: Some(0), imbalance: None }, 0).is_err());
    assert!(split(&ds, &SplitSpec { val_per_class: 1, shots: None, imbalance: Some(1.5) }, 0).is_err());
}

#[test]
fn replacements_happen_with_probability_p_and_keep_the_class() {
    let synthetic = vec![vec![0, 1, 2], vec![3, 4], vec![]];
    let m = Mixer::new(0.3, ClassDraw::Same, &[5, 5, 5], synthetic).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let n = 20_000;
    let mut replaced = 0;
    for i in 0..n {
        let class = i % 2; // classes with synthetic images
        match m.pick(i, class, &mut rng) {
            Pick::Real(r) => assert_eq!(r, i),
            Pick::Synthetic(k, c) => {
                replaced += 1;
                assert_eq!(c, class, "same-class replacement changed the label");
                assert!(if class == 0 { k <= 2 } else { (3..=4).contains(&k) });
            }
        }
        // A class without synthetic images is never replaced.
        assert_eq!(m.pick(i, 2, &mut rng), Pick::Real(i));
    }
    // Binomial(20000, 0.3): sd = 64.8; 5 sd.
    let expect = 0.3 * n as f64;
    assert!((replaced as f64 - expect).abs() < 5.0 * 64.8, "{replaced} replacements, expected about {expect}");
    assert!(Mixer::new(1.5, ClassDraw::Same, &[1], vec![vec![]]).is_err());
}

#[test]
fn long_tail_replacements_draw_classes_by_inverse_frequency() {
    let counts = [99, 9, 0, 4];
    let synthetic = vec![vec![0], vec![1], vec![2], vec![]]; // class 3 has none: never drawn
    let m = Mixer::new(1.0, ClassDraw::InverseFrequency, &counts, synthetic).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let n = 60_000;
    let mut hist = [0usize; 4];
    for i in 0..n {
        match m.pick(i, 0, &mut rng) {
            Pick::Synthetic(k, c) => {
                assert_eq!(k, c);
                hist[c] += 1;
            }
            Pick::Real(_) => panic!("p = 1 always replaces"),
        }
    }
    let w = [1.0 / 100.0, 1.0 / 10.0, 1.0, 0.0];
    let total: f64 = w.iter().sum();
    for c in 0..4 {
        let p = w[c] / total;
        let sd = (n as f64 * p * (1.0 - p)).sqrt().max(1.0);
        assert!((hist[c] as f64 - n as f64 * p).abs() < 5.0 * sd, "class {c}: {} draws, expected {:.0}", hist[c], n as f64 * p);
    }
}

#[test]
fn crops_follow_torchvision_and_augmentation_is_reproducible() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for _ in 0..2000 {
        let (y, x, h, w) = crop_box(28, 28, (0.35, 1.0), (0.75, 4.0 / 3.0), &mut rng);
        assert!(h > 0 && w > 0 && y + h <= 28 && x + w <= 28);
        let area = (h * w) as f64 / 784.0;
        assert!((0.3..=1.0).contains(&area), "area fraction {area}");
    }
    // The whole image resized to its own size is the image; mirrored twice is the image.
    let src: Vec<u8> = (0..5 * 5 * 3).map(|i| (i * 7 % 256) as u8).collect();
    assert_eq!(resize_bilinear(&src, 5, (0, 0, 5, 5), 5, false), src);
    let m = resize_bilinear(&src, 5, (0, 0, 5, 5), 5, true);
    assert_eq!(&m[0..3], &src[4 * 3..5 * 3], "first pixel of the mirror = last of the row");
    let aug = Augment { flip: true, ..Augment::default() };
    let a = aug.apply(&src, 5, &mut ChaCha8Rng::seed_from_u64(9));
    assert_eq!(a, aug.apply(&src, 5, &mut ChaCha8Rng::seed_from_u64(9)));
    assert!(Augment { crop_scale: (0.0, 1.0), ..Augment::default() }.check().is_err());
    // Classic augmentation: identity at angle 0 and factors 1; a quarter turn moves pixels
    // exactly; jitter factors act as torchvision's (brightness 0 = black, saturation 0 = grey).
    assert_eq!(rotate_bilinear(&src, 5, 0.0), src);
    assert_eq!(color_jitter(&src, [1.0, 1.0, 1.0]), src);
    let q = rotate_bilinear(&src, 5, std::f64::consts::FRAC_PI_2);
    for (y, x) in [(0usize, 0usize), (1, 3), (4, 2)] {
        let (sy, sx) = (4 - x, y); // source of output (y, x) under the quarter turn used
        assert_eq!(&q[(y * 5 + x) * 3..(y * 5 + x) * 3 + 3], &src[(sy * 5 + sx) * 3..(sy * 5 + sx) * 3 + 3], "({y}, {x})");
    }
    assert!(color_jitter(&src, [0.0, 1.0, 1.0]).iter().all(|&v| v == 0));
    for p in color_jitter(&src, [1.0, 1.0, 0.0]).chunks(3) {
        assert!(p[0].abs_diff(p[1]) <= 1 && p[1].abs_diff(p[2]) <= 1, "saturation 0 is grey: {p:?}");
    }
    let classic = Augment { classic: true, ..Augment::default() };
    assert_eq!(classic.apply(&src, 5, &mut ChaCha8Rng::seed_from_u64(2)), classic.apply(&src, 5, &mut ChaCha8Rng::seed_from_u64(2)));
}

#[test]
fn a_generator_output_folder_is_read_through_its_manifest() {
    let root = common::empty_temp_dir("cls-syn");
    let out = root.join("syn");
    std::fs::create_dir_all(out.join("c1")).unwrap();
    std::fs::create_dir_all(out.join("previews")).unwrap();
    image::RgbImage::new(4, 4).save(out.join("c1/c1_00000.png")).unwrap();
    image::RgbImage::new(4, 4).save(out.join("previews/c1.png")).unwrap();
    let rec = r#"{"id":"c1_00000","class":"c1","class_index":0,"index":0,"file":"c1/c1_00000.png","output_sha256":"","sources":["a","b"],"source_sha256":["",""],"interp":"circle","t":0.0,"frac":null,"alpha":null,"theta":0.0,"cos":1.0,"lerp":false,"prompt":"","stage1_prompt":"","suffix":"","strength":0.3,"stage1_steps":1,"steps":2,"inversion_steps":2,"guidance":7.5,"seed":1,"size":4,"model_sha256":"","concepts_sha256":"","lora_sha256":null,"run_sha256":""}"#;
    std::fs::write(out.join("manifest.jsonl"), format!("{rec}\n")).unwrap();
    let classes = vec!["c0".to_string(), "c1".to_string()];
    let ds = synthetic_dataset(&out, &classes).unwrap().dataset;
    assert_eq!(ds.items.len(), 1, "previews are not training images");
    assert_eq!((ds.items[0].class, ds.items[0].rel.as_str()), (1, "c1/c1_00000.png"));
    let e = synthetic_dataset(&out, &classes[..1]).unwrap_err().to_string();
    assert!(e.contains("`c1` is not a training class"), "{e}");

    // A Diff-Mix record's soft label reaches the training targets; one that does not sum to 1,
    // or names an unknown class, is refused with the manifest named.
    let soft = |label: &str| rec.replace(r#","run_sha256":"#, &format!(r#","soft_label":{label},"run_sha256":"#));
    std::fs::write(out.join("manifest.jsonl"), format!("{}\n", soft(r#"[["c1",0.75],["c0",0.25]]"#))).unwrap();
    let set = synthetic_dataset(&out, &classes).unwrap();
    assert_eq!(set.soft_labels, vec![Some(vec![(1, 0.75), (0, 0.25)])]);
    let t = soft_targets(&[vec![(1, 0.75), (0, 0.25)], vec![(2, 1.0)]], 3, &candle_core::Device::Cpu).unwrap();
    assert_eq!(t.to_vec2::<f32>().unwrap(), vec![vec![0.25, 0.75, 0.0], vec![0.0, 0.0, 1.0]]);
    for (bad, expect) in [(r#"[["c1",0.75],["c0",0.5]]"#, "summing to 1"), (r#"[["c1",0.5],["c9",0.5]]"#, "`c9` is not a training class")] {
        std::fs::write(out.join("manifest.jsonl"), format!("{}\n", soft(bad))).unwrap();
        let e = synthetic_dataset(&out, &classes).unwrap_err().to_string();
        assert!(e.contains(expect) && e.contains("manifest.jsonl"), "{e}");
    }
}

fn diffii(args: &[&str], threads: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_diffii")).args(args).env("RAYON_NUM_THREADS", threads).output().unwrap()
}

#[test]
fn train_then_eval_end_to_end_is_the_same_for_any_thread_count() {
    let root = common::empty_temp_dir("cls-e2e");
    let data = image_folder(&root.join("train"), &[8, 8, 8]);
    let test = image_folder(&root.join("test"), &[4, 4, 4]);
    let run = |out: &Path, threads: &str| {
        let o = diffii(
            &[
                "train", "--data", data.to_str().unwrap(), "--test", test.to_str().unwrap(), "--out", out.to_str().unwrap(),
                "--seeds", "0,1", "--epochs", "3", "--batch", "6", "--size", "12", "--val-per-class", "2", "--shots", "5",
                "--lr", "0.05", "--quiet",
            ],
            threads,
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let (a, b) = (root.join("a"), root.join("b"));
    let stdout = run(&a, "1");
    run(&b, "2");
    assert!(stdout.contains("validation-selected epoch"), "{stdout}");
    for seed in ["seed-0", "seed-1"] {
        for f in ["model.safetensors", "history.csv"] {
            assert_eq!(std::fs::read(a.join(seed).join(f)).unwrap(), std::fs::read(b.join(seed).join(f)).unwrap(), "{seed}/{f}");
        }
    }
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(a.join("results.json")).unwrap()).unwrap();
    let seeds = results["seeds"].as_array().unwrap();
    assert_eq!(seeds.len(), 2);
    for s in seeds {
        assert_eq!((s["train_images"].as_u64(), s["val_images"].as_u64()), (Some(15), Some(6)));
        assert_eq!(s["history"].as_array().unwrap().len(), 3);
        let sel = s["selected_epoch"].as_u64().unwrap() as usize;
        let hist = s["history"].as_array().unwrap();
        let best = hist.iter().map(|e| e["val_acc"].as_f64().unwrap()).fold(f64::MIN, f64::max);
        assert_eq!(hist[sel - 1]["val_acc"].as_f64().unwrap(), best, "the selected epoch has the best validation accuracy");
        assert_eq!(s["test_acc_selected"], hist[sel - 1]["test_acc"], "test accuracy is reported at the selected epoch");
    }
    // Rerunning keeps finished seeds; other settings in the same folder are refused.
    let again = run(&a, "2");
    assert!(again.contains("seed 0:"), "{again}");
    let o = diffii(&["train", "--data", data.to_str().unwrap(), "--out", a.to_str().unwrap(), "--epochs", "4", "--quiet"], "2");
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("different settings"), "{}", String::from_utf8_lossy(&o.stderr));
    // eval reproduces the recorded last-epoch test accuracy.
    let o = diffii(&["eval", "--model", a.join("seed-0").to_str().unwrap(), "--data", test.to_str().unwrap()], "2");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let line = String::from_utf8_lossy(&o.stdout).lines().next().unwrap().to_string();
    let last = seeds[0]["test_acc_last"].as_f64().unwrap();
    assert!(line.starts_with(&format!("accuracy {:.2} %", 100.0 * last)), "{line} vs last-epoch test accuracy {last}");
}

#[test]
fn synthetic_copies_of_the_training_images_have_no_novelty_and_full_diversity() {
    use diffii::classify::data::ImageSet;
    use diffii::classify::resnet::{init_weights, trainable, ResNetConfig};
    let root = common::empty_temp_dir("cls-quality");
    let ds = Dataset::open(image_folder(&root, &[4, 4, 4]), None).unwrap();
    let all: Vec<usize> = (0..ds.items.len()).collect();
    let real = ImageSet::load(&ds, &all, 12, diffii::data::image::ResizePolicy::Squash).unwrap();
    let config = ResNetConfig::small(3, 1);
    let (model, _) = trainable(init_weights(&config, 0).unwrap(), &config, &candle_core::Device::Cpu).unwrap();
    let q = diffii::experiment::quality::measure(&model, &real, &real, 3).unwrap();
    assert_eq!(q.novelty, 0.0, "copies are not novel");
    assert!((q.diversity - 1.0).abs() < 1e-12, "the same set is exactly as diverse: {}", q.diversity);
    assert_eq!(q.faithfulness, diffii::classify::train::evaluate(&model, &real).unwrap());
    // One image repeated: no diversity at all.
    let same = ImageSet { labels: vec![0; 4], pixels: vec![real.pixels[0].clone(); 4], ..real.clone() };
    let q = diffii::experiment::quality::measure(&model, &real, &same, 3).unwrap();
    assert_eq!(q.diversity, 0.0);
}

#[test]
fn filter_drops_what_the_judge_does_not_recognise_and_blank_images() {
    let root = common::empty_temp_dir("cls-filter");
    let data = image_folder(&root.join("train"), &[10, 10]);
    let judge_dir = root.join("judge");
    let o = diffii(
        &[
            "train", "--data", data.to_str().unwrap(), "--out", judge_dir.to_str().unwrap(), "--seeds", "0", "--epochs", "4",
            "--batch", "8", "--size", "12", "--val-per-class", "2", "--lr", "0.05", "--quiet",
        ],
        "2",
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let judge = judge_dir.join("seed-0");

    // A synthetic folder: images of both looks filed under both classes, and one blank image.
    let syn = root.join("syn");
    let looks = image_folder(&root.join("looks"), &[3, 3]);
    let mut lines = String::new();
    let mut n = 0;
    for class in ["c0", "c1"] {
        std::fs::create_dir_all(syn.join(class)).unwrap();
        for (look, i) in [("c0", 0), ("c0", 1), ("c1", 0), ("c1", 2)] {
            let file = format!("{class}/{class}_{n:05}.png");
            std::fs::copy(looks.join(look).join(format!("{i:03}.png")), syn.join(&file)).unwrap();
            lines.push_str(&format!("{{\"id\":\"{class}_{n:05}\",\"class\":\"{class}\",\"class_index\":0,\"index\":{n},\"file\":\"{file}\",\"output_sha256\":\"\",\"sources\":[\"\",\"\"],\"source_sha256\":[\"\",\"\"],\"interp\":\"txt2img\",\"t\":1.0,\"frac\":null,\"alpha\":null,\"theta\":0.0,\"cos\":0.0,\"lerp\":false,\"prompt\":\"\",\"stage1_prompt\":\"\",\"suffix\":\"\",\"strength\":1.0,\"stage1_steps\":0,\"steps\":1,\"inversion_steps\":0,\"guidance\":1.0,\"seed\":0,\"size\":12,\"model_sha256\":\"\",\"concepts_sha256\":\"\",\"lora_sha256\":null,\"run_sha256\":\"\"}}\n"));
            n += 1;
        }
    }
    let blank = "c1/c1_blank.png";
    image::RgbImage::from_pixel(12, 12, image::Rgb([128, 128, 128])).save(syn.join(blank)).unwrap();
    lines.push_str(&lines.lines().last().unwrap().replace("c1_00007.png", "c1_blank.png").replace("\"c1_00007\"", "\"c1_blank\""));
    lines.push('\n');
    std::fs::write(syn.join("manifest.jsonl"), &lines).unwrap();

    // The judge's probability for each record's class, computed here independently.
    let (model, info) = diffii::classify::train::load_model(&judge, &candle_core::Device::Cpu).unwrap();
    let records = diffii::synth::manifest::read_jsonl(&syn.join("manifest.jsonl")).unwrap();
    let prob: Vec<f64> = records
        .iter()
        .map(|r| {
            let (px, _) = diffii::data::image::load_for_model(syn.join(&r.file), 12, info.resize).unwrap();
            let x = diffii::classify::data::batch_tensor(&[px.as_slice()], 12, &candle_core::Device::Cpu).unwrap();
            let logits: Vec<f64> = model.forward(&x, false).unwrap().to_dtype(candle_core::DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let z: f64 = logits.iter().map(|l| l.exp()).sum();
            logits[info.classes.iter().position(|c| *c == r.class).unwrap()].exp() / z
        })
        .collect();
    // A threshold between the probabilities, so that both outcomes occur.
    let mut sorted = prob[..8].to_vec();
    sorted.sort_by(f64::total_cmp);
    let min = (sorted[3] + sorted[4]) / 2.0;
    let o = diffii(&["filter", "--synthetic", syn.to_str().unwrap(), "--judge", judge.to_str().unwrap(), "--min", &min.to_string()], "2");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let after = diffii::synth::manifest::read_jsonl(&syn.join("manifest.jsonl")).unwrap();
    assert_eq!(after.len(), 9, "every record stays on record");
    let prob_of: std::collections::HashMap<&str, f64> = records.iter().map(|r| r.file.as_str()).zip(prob.iter().copied()).collect();
    for r in &after {
        let p = prob_of[r.file.as_str()];
        match &r.dropped {
            Some(why) if r.file == blank => assert!(why.starts_with("blank"), "{why}"),
            Some(why) => assert!(p < min && why.contains("below"), "{}: p {p} vs {min}: {why}", r.file),
            None => assert!(r.file != blank && p >= min, "{}: p {p} kept at {min}", r.file),
        }
    }
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("kept 4 | dropped 5"), "{stdout}");
    // Dropped images are not trained on; filtering again changes nothing.
    let set = synthetic_dataset(&syn, &["c0".to_string(), "c1".to_string()]).unwrap();
    assert_eq!(set.dataset.items.len(), 4);
    let bytes = std::fs::read(syn.join("manifest.jsonl")).unwrap();
    assert!(diffii(&["filter", "--synthetic", syn.to_str().unwrap(), "--judge", judge.to_str().unwrap(), "--min", &min.to_string()], "1").status.success());
    assert_eq!(std::fs::read(syn.join("manifest.jsonl")).unwrap(), bytes);
    let o = diffii(&["filter", "--synthetic", syn.to_str().unwrap(), "--judge", judge.to_str().unwrap(), "--min", "NaN"], "1");
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("must lie in [0, 1]"));
}

#[test]
fn an_unavailable_device_is_refused_before_any_work() {
    let root = common::empty_temp_dir("cls-device");
    let data = image_folder(&root.join("train"), &[3, 3]);
    let out = root.join("out");
    let args = |device: &str| -> Vec<String> {
        ["train", "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap(), "--device", device, "--quiet"].map(String::from).to_vec()
    };
    let o = diffii(&args("tpu").iter().map(String::as_str).collect::<Vec<_>>(), "1");
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("unknown device `tpu`"), "{}", String::from_utf8_lossy(&o.stderr));
    if !cfg!(feature = "cuda") {
        let o = diffii(&args("cuda").iter().map(String::as_str).collect::<Vec<_>>(), "1");
        assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("no CUDA support"), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert!(!out.exists(), "nothing is written before the device is known");
}

#[test]
fn the_inference_copy_of_a_trainable_classifier_gives_the_same_logits_to_the_bit() {
    use diffii::classify::resnet::{inference_copy, init_weights, trainable, ResNetConfig};
    let dev = candle_core::Device::Cpu;
    for config in [ResNetConfig::small(10, 1), ResNetConfig::small(3, 2)] {
        let (model, weights) = trainable(init_weights(&config, 3).unwrap(), &config, &dev).unwrap();
        // A training step first, so that the running statistics are not the initial ones.
        let x = diffii::rng::seeded_randn(5, &[6, 3, 32, 32], &dev).unwrap();
        model.forward(&x, true).unwrap();
        let tracked = model.forward(&x, false).unwrap();
        let copy = inference_copy(&model, &weights).unwrap();
        let fast = copy.forward(&x, false).unwrap();
        assert!(!fast.track_op());
        let bits = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&tracked), bits(&fast));
    }
}
