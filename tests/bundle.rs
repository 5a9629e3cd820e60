//! The shipped Fashion-MNIST subset: its content, its materialisation as ImageFolders (class
//! order, pixels, no rewrite of a finished folder) and the errors for damaged files.
mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use diffii::data::bundle::{load, materialize, Bundle, FASHION_MNIST_SUBSET, SIDE};
use diffii::data::dataset::Dataset;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use common::TempDir;


const CLASSES: [&str; 10] =
    ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"];

fn shipped() -> Bundle {
    load(Path::new(FASHION_MNIST_SUBSET)).unwrap()
}

#[test]
fn shipped_subset_has_the_documented_content() {
    let b = shipped();
    assert_eq!(b.classes, CLASSES);
    for (split, per_class, n_official) in [(&b.pool, 500, 60_000), (&b.test, 200, 10_000)] {
        let n = per_class * CLASSES.len();
        assert_eq!((split.images.len(), split.labels.len(), split.index.len()), (n, n, n));
        // Rows are ordered by class.
        let expected: Vec<usize> = (0..CLASSES.len()).flat_map(|c| std::iter::repeat(c).take(per_class)).collect();
        assert_eq!(split.labels, expected);
        assert_eq!(split.index.iter().collect::<HashSet<_>>().len(), n, "an index is repeated");
        assert!(split.index.iter().all(|&i| i < n_official));
        let mean = split.images.iter().flatten().map(|&p| p as f64).sum::<f64>() / (n * SIDE * SIDE) as f64;
        assert!((40.0..110.0).contains(&mean), "mean pixel {mean}");
        assert!(split.images.iter().all(|im| im.iter().any(|&p| p > 100)), "a blank image");
    }
    // Test images are the first 200 per class in file order, so indices increase within a class.
    assert!(b.test.index.chunks(200).all(|c| c.windows(2).all(|w| w[0] < w[1])));
    // Pool images were shuffled, so they do not.
    assert!(b.pool.index.chunks(500).all(|c| c.windows(2).any(|w| w[0] > w[1])));
}

fn mtimes(root: &Path) -> Vec<(PathBuf, std::time::SystemTime)> {
    let mut out = Vec::new();
    for class in std::fs::read_dir(root).unwrap() {
        for f in std::fs::read_dir(class.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            let t = std::fs::metadata(&p).unwrap().modified().unwrap();
            out.push((p, t));
        }
    }
    out.sort();
    out
}

#[test]
fn materialized_folders_open_in_label_order() {
    let b = shipped();
    let t = TempDir::new("materialize");
    let m = materialize(&b, &t.0).unwrap();
    assert_eq!((m.pool.clone(), m.test.clone()), (t.0.join("pool"), t.0.join("test")));

    let (pool, test) = m.open().unwrap();
    let by_hand = Dataset::open(&m.pool, Some(&m.class_names)).unwrap();
    assert_eq!(pool, by_hand);
    for (ds, per_class) in [(&pool, 500), (&test, 200)] {
        assert_eq!(ds.classes, CLASSES);
        assert_eq!(ds.class_counts(), vec![per_class; 10]);
    }
    // Without the names file the folders still open, with classes sorted by name.
    let sorted = Dataset::image_folder(&m.pool, None).unwrap();
    assert_eq!(sorted.classes[0], "Ankle_boot");
    assert_eq!(sorted.len(), 5000);

    // Item (class, file) pairs match the bundle's rows, and a PNG decodes to the same pixels.
    let row = 1234;
    let (label, index) = (b.pool.labels[row], b.pool.index[row]);
    let rel = format!("{}/{index:05}.png", CLASSES[label]);
    let item = pool.items.iter().find(|it| it.rel == rel).expect("row's file is in the dataset");
    assert_eq!(item.class, label);
    let img = image::open(&item.path).unwrap();
    assert_eq!(img.color(), image::ColorType::L8);
    assert_eq!(img.into_luma8().into_raw(), b.pool.images[row].to_vec());

    // A second run rewrites nothing; a fresh folder gets the same bytes.
    let before = mtimes(&m.pool);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(materialize(&b, &t.0).unwrap(), m);
    assert_eq!(mtimes(&m.pool), before);
    let again = TempDir::new("materialize-again");
    let m2 = materialize(&b, &again.0).unwrap();
    let bytes = |p: &Path| std::fs::read(p).unwrap();
    let test_rel = format!("{}/{:05}.png", CLASSES[b.test.labels[0]], b.test.index[0]);
    assert_eq!(bytes(&m2.test.join(&test_rel)), bytes(&m.test.join(&test_rel)));
    assert_eq!(bytes(&m2.pool.join(&rel)), bytes(&m.pool.join(&rel)));
    assert_eq!(bytes(&m2.class_names), bytes(&m.class_names));

    // A finished folder that was changed is refused, not silently used or rewritten.
    std::fs::remove_file(m.pool.join(&rel)).unwrap();
    let err = materialize(&b, &t.0).unwrap_err().to_string();
    assert!(err.contains(&m.pool.display().to_string()) && err.contains("missing") && err.contains("delete"), "{err}");
    std::fs::write(m.pool.join(&rel), b"not a png").unwrap();
    let err = materialize(&b, &t.0).unwrap_err().to_string();
    assert!(err.contains("other pixels") && err.contains("delete"), "{err}");
}

#[test]
fn leftovers_of_a_killed_run_are_replaced() {
    let b = shipped();
    let t = TempDir::new("resume");
    // A half-built folder of a process that no longer runs.
    let dead = t.0.join(".pool.tmp-4000000000");
    std::fs::create_dir_all(dead.join("Bag")).unwrap();
    std::fs::write(dead.join("Bag/00001.png"), b"half").unwrap();
    let m = materialize(&b, &t.0).unwrap();
    assert!(!dead.exists());
    let mut names: Vec<String> =
        std::fs::read_dir(&t.0).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["classes.txt", "pool", "test"]);
    assert_eq!(m.open().unwrap().0.len(), 5000);
}

/// A small subset file with `images` of the given shape and the given labels.
fn write_subset(path: &Path, classes: Option<&str>, image_shape: &[usize], labels: &[u8]) {
    let n = labels.len();
    let pixels = vec![7u8; image_shape.iter().product()];
    let index: Vec<u8> = (0..n as u32).flat_map(|i| i.to_le_bytes()).collect();
    let mut tensors = Vec::new();
    for split in ["pool", "test"] {
        tensors.push((format!("{split}_images"), TensorView::new(Dtype::U8, image_shape.to_vec(), &pixels).unwrap()));
        tensors.push((format!("{split}_labels"), TensorView::new(Dtype::U8, vec![n], labels).unwrap()));
        tensors.push((format!("{split}_index"), TensorView::new(Dtype::U32, vec![n], &index).unwrap()));
    }
    let metadata = classes.map(|c| [("classes".to_string(), c.to_string())].into_iter().collect());
    std::fs::write(path, safetensors::serialize(tensors, metadata).unwrap()).unwrap();
}

fn load_error(path: &Path) -> String {
    let err = load(path).expect_err("expected an error").to_string();
    assert!(err.contains(&path.display().to_string()), "error does not name the file: {err}");
    err
}

#[test]
fn damaged_files_give_errors_naming_the_file() {
    let t = TempDir::new("damaged");
    let two = r#"["a", "b"]"#;

    let ok = t.0.join("ok.safetensors");
    write_subset(&ok, Some(two), &[3, SIDE, SIDE], &[0, 1, 1]);
    let b = load(&ok).unwrap();
    assert_eq!((b.classes.len(), b.pool.labels.clone(), b.test.index.clone()), (2, vec![0, 1, 1], vec![0, 1, 2]));

    let truncated = t.0.join("truncated.safetensors");
    let shipped_bytes = std::fs::read(FASHION_MNIST_SUBSET).unwrap();
    std::fs::write(&truncated, &shipped_bytes[..shipped_bytes.len() / 2]).unwrap();
    assert!(load_error(&truncated).contains("safetensors"));
    std::fs::write(&truncated, &shipped_bytes[..5]).unwrap();
    load_error(&truncated);

    let shape = t.0.join("shape.safetensors");
    write_subset(&shape, Some(two), &[3, SIDE, SIDE - 1], &[0, 1, 1]);
    assert!(load_error(&shape).contains("pool_images"));

    let label = t.0.join("label.safetensors");
    write_subset(&label, Some(two), &[3, SIDE, SIDE], &[0, 2, 1]);
    assert!(load_error(&label).contains("pool_labels"));
    let ten = r#"["0","1","2","3","4","5","6","7","8","9"]"#;
    write_subset(&label, Some(ten), &[1, SIDE, SIDE], &[10]);
    assert!(load_error(&label).contains("is 10"));

    let lengths = t.0.join("lengths.safetensors");
    write_subset(&lengths, Some(two), &[2, SIDE, SIDE], &[0, 1, 1]);
    assert!(load_error(&lengths).contains("expected [2]"));

    let meta = t.0.join("meta.safetensors");
    write_subset(&meta, None, &[3, SIDE, SIDE], &[0, 1, 1]);
    assert!(load_error(&meta).contains("classes"));
    for bad in ["not json", "[]", r#"["a", "a"]"#, r#"["a/b"]"#] {
        write_subset(&meta, Some(bad), &[1, SIDE, SIDE], &[0]);
        assert!(load_error(&meta).contains("class"), "{bad}");
    }

    let missing = t.0.join("missing.safetensors");
    load_error(&missing);

    // Bundles built by hand are checked before anything is written.
    let out = t.0.join("out");
    let mut bad = b.clone();
    bad.test.labels[0] = 2;
    assert!(materialize(&bad, &out).unwrap_err().to_string().contains("test_labels"));
    let mut bad = b.clone();
    bad.pool.index[1] = 0;
    assert!(materialize(&bad, &out).unwrap_err().to_string().contains("twice"));
    let mut bad = b;
    bad.pool.labels.pop();
    assert!(materialize(&bad, &out).unwrap_err().to_string().contains("labels"));
    assert!(!out.exists());
}
