//! The group-shift world built from the shipped subset: measured on the written images, the
//! background colour agrees with the label group in 95 % of the pool (and of few-shot training
//! splits drawn from it) and is independent of the label at test, where the four groups are
//! balanced; the group file matches the pixels; building it twice gives the same bytes.
mod common;

use diffii::classify::groups::Groups;
use diffii::classify::protocol::{split, SplitSpec};
use diffii::data::bundle;
use diffii::data::dataset::Dataset;
use diffii::data::shift::{self, ShiftSpec, COLOURS, LABEL_GROUPS};

/// The colour group of an image: the palette colour most of its pixels equal exactly (black
/// background pixels become the colour itself under the screen blend).
fn colour_group(path: &std::path::Path) -> usize {
    let img = image::open(path).unwrap().into_rgb8();
    let count = |c: [u8; 3]| img.pixels().filter(|p| p.0 == c).count();
    let (g, n) = (0..2).flat_map(|g| COLOURS[g].1.iter().map(move |&c| (g, c))).map(|(g, c)| (g, count(c))).max_by_key(|&(_, n)| n).unwrap();
    assert!(n > 0, "{}: no pixel has a background colour", path.display());
    g
}

#[test]
fn colour_agrees_with_the_label_group_in_training_and_not_at_test() {
    let b = bundle::load(std::path::Path::new(bundle::FASHION_MNIST_SUBSET)).unwrap();
    let out = common::empty_temp_dir("shift");
    let w = shift::materialize(&b, &ShiftSpec::default(), &out).unwrap();
    let (pool, test) = w.folders.open().unwrap();

    // Pool: per class 475 of 500 agree (95 %); corners are uniform enough to read back.
    let pool_colour: Vec<usize> = pool.items.iter().map(|it| colour_group(&it.path)).collect();
    for c in 0..10 {
        let rows: Vec<usize> = (0..pool.items.len()).filter(|&i| pool.items[i].class == c).collect();
        let agree = rows.iter().filter(|&&i| pool_colour[i] == LABEL_GROUPS[c]).count();
        assert_eq!((agree, rows.len()), (475, 500), "class {c}");
    }
    // Few-shot training splits drawn from the pool keep the bias (over 40 seeds x 50 images).
    let spec = SplitSpec { val_per_class: 10, shots: Some(5), imbalance: None };
    let (mut agree, mut n) = (0usize, 0usize);
    for seed in 0..40 {
        for i in split(&pool, &spec, seed).unwrap().train {
            agree += (pool_colour[i] == LABEL_GROUPS[pool.items[i].class]) as usize;
            n += 1;
        }
    }
    let share = agree as f64 / n as f64;
    assert!((share - 0.95).abs() < 0.02, "training images agreeing: {share}");

    // Test: every class exactly half warm, half cool, so P(colour | label) = P(colour).
    let groups = Groups::read(&w.test_groups, &test).unwrap();
    assert_eq!(groups.names, ["A-cool", "A-warm", "B-cool", "B-warm"]);
    let mut cells = [0usize; 4];
    for (c, members) in test.class_members().iter().enumerate() {
        let warm = members.iter().filter(|&&i| colour_group(&test.items[i].path) == 0).count();
        assert_eq!((warm, members.len()), (100, 200), "class {c}");
        for &i in members {
            let colour = colour_group(&test.items[i].path);
            let name = &groups.names[groups.of_item[i]];
            assert_eq!(name, &format!("{}-{}", shift::LABEL_GROUP_NAMES[LABEL_GROUPS[c]], COLOURS[colour].0), "{}", test.items[i].rel);
            cells[groups.of_item[i]] += 1;
        }
    }
    assert_eq!(cells, [500; 4]);

    // Deterministic: a second build elsewhere writes the same bytes.
    let again = common::empty_temp_dir("shift-again");
    let w2 = shift::materialize(&b, &ShiftSpec::default(), &again).unwrap();
    assert_eq!(std::fs::read(&w.test_groups).unwrap(), std::fs::read(&w2.test_groups).unwrap());
    let (pool2, _) = w2.folders.open().unwrap();
    for (a, b) in pool.items.iter().zip(&pool2.items).step_by(97) {
        assert_eq!(std::fs::read(&a.path).unwrap(), std::fs::read(&b.path).unwrap(), "{}", a.rel);
    }
    // An existing folder is checked, not rewritten, and reused when right.
    assert_eq!(shift::materialize(&b, &ShiftSpec::default(), &out).unwrap(), w);
    let _ = Dataset::open(&w.folders.pool, Some(&w.folders.class_names)).unwrap();
}
