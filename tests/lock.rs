//! The output-folder lock: a second process writing the same folder is refused with a message
//! naming the holder, shards of one run share a folder, and a whole run and a shard exclude
//! each other. The holder is either this test process (through the library) or a real
//! `generate` that is still running.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::TempDir;
use diffii::data::lock::{lock_output, Scope};

fn dataset(root: &Path) -> PathBuf {
    let data = root.join("data");
    for (c, n) in [("sparrow", 3u32), ("gull", 2)] {
        std::fs::create_dir_all(data.join(c)).unwrap();
        for k in 0..n {
            image::RgbImage::from_fn(16, 16, |x, y| image::Rgb([(x * 9 + k * 40) as u8, (y * 11) as u8, (k * 70) as u8]))
                .save(data.join(c).join(format!("{k}.png")))
                .unwrap();
        }
    }
    data
}

fn generate(data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_diffii"));
    c.args(["generate", "--model"]).arg(common::tiny_sd()).arg("--data").arg(data).arg("--out").arg(out);
    c.args(["--size", "16", "--inversion-steps", "2", "--steps", "2", "--superclass", "bird", "--quiet"]);
    c.args(extra);
    c
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn refused(o: &Output, out: &Path, pid: u32) {
    let e = stderr(o);
    assert!(!o.status.success(), "a second writer was let in:\n{e}");
    let want = format!("{} is in use by another diffii process (pid {pid}); wait for it or use another --out", out.display());
    assert!(e.contains(&want), "expected `{want}` in:\n{e}");
}

#[test]
fn every_long_command_is_refused_while_the_folder_is_locked() {
    let t = TempDir::new("lock-cmds");
    let data = dataset(t.path());
    let out = t.join("out");
    let _held = lock_output(&out, Scope::Whole).unwrap();
    let me = std::process::id();
    let tiny = common::tiny_sd();
    let bin = env!("CARGO_BIN_EXE_diffii");
    let run = |args: &[&std::ffi::OsStr]| Command::new(bin).args(args).output().unwrap();
    let (d, o, m) = (data.as_os_str(), out.as_os_str(), tiny.as_os_str());
    let s = |x: &'static str| std::ffi::OsStr::new(x);
    let cases: Vec<(&str, Vec<&std::ffi::OsStr>)> = vec![
        ("generate", vec![s("generate"), s("--model"), m, s("--data"), d, s("--out"), o, s("--size"), s("16"), s("--inversion-steps"), s("2"), s("--steps"), s("2"), s("--superclass"), s("bird")]),
        ("augment", vec![s("augment"), s("--model"), m, s("--data"), d, s("--out"), o, s("--size"), s("16"), s("--inversion-steps"), s("2"), s("--steps"), s("2"), s("--superclass"), s("bird")]),
        ("invert", vec![s("invert"), s("--model"), m, s("--data"), d, s("--out"), o, s("--size"), s("16"), s("--inversion-steps"), s("2"), s("--superclass"), s("bird")]),
        ("concepts", vec![s("concepts"), s("--model"), m, s("--data"), d, s("--out"), o, s("--superclass"), s("bird"), s("--steps"), s("1"), s("--resolution"), s("16")]),
        ("train", vec![s("train"), s("--data"), d, s("--out"), o, s("--epochs"), s("1"), s("--size"), s("8"), s("--val-per-class"), s("0")]),
        ("compare", vec![s("compare"), s("--model"), m, s("--data"), d, s("--test"), d, s("--out"), o, s("--methods"), s("none"), s("--epochs"), s("1"), s("--size"), s("8"), s("--val-per-class"), s("0")]),
        ("pretrain", vec![s("pretrain"), s("--data"), d, s("--out"), o, s("--arch"), s("tiny"), s("--vae-steps"), s("1"), s("--unet-steps"), s("1")]),
    ];
    for (name, args) in cases {
        let r = run(&args);
        assert!(!r.status.success(), "{name} ran in a locked folder");
        refused(&r, &out, me);
    }
    // Nothing but the lock file was written by the refused commands.
    let names: Vec<String> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    assert_eq!(names, vec![".diffii.lock".to_string()]);
}

#[test]
fn shards_share_a_folder_but_exclude_a_whole_run_and_their_twins() {
    let t = TempDir::new("lock-shards");
    let data = dataset(t.path());
    let out = t.join("out");
    let held = lock_output(&out, Scope::Shard { index: 0, count: 2 }).unwrap();
    let me = std::process::id();
    // Another shard runs beside the held one.
    let other = generate(&data, &out, &["--per-class", "2", "--shard", "1/2"]).output().unwrap();
    assert!(other.status.success(), "{}", stderr(&other));
    assert!(out.join("manifest.shard-1-of-2.jsonl").is_file());
    // The held shard itself, and a whole run, are refused and name this process.
    refused(&generate(&data, &out, &["--per-class", "2", "--shard", "0/2"]).output().unwrap(), &out, me);
    refused(&generate(&data, &out, &["--per-class", "2"]).output().unwrap(), &out, me);
    drop(held);
    // Released: the shard now runs.
    let again = generate(&data, &out, &["--per-class", "2", "--shard", "0/2"]).output().unwrap();
    assert!(again.status.success(), "{}", stderr(&again));
    // A whole run holds the folder against every shard.
    let whole = lock_output(&out, Scope::Whole).unwrap();
    refused(&generate(&data, &out, &["--per-class", "2", "--shard", "1/2"]).output().unwrap(), &out, me);
    drop(whole);
}

#[test]
fn the_lock_is_reentrant_within_a_process_and_released_on_drop() {
    let t = TempDir::new("lock-lib");
    let out = t.join("out");
    let a = lock_output(&out, Scope::Whole).unwrap();
    // A library call under a command that already holds its folder must not refuse itself.
    let b = lock_output(&out, Scope::Shard { index: 0, count: 3 }).unwrap();
    drop(a);
    drop(b);
    let c = lock_output(&out, Scope::Whole).unwrap();
    drop(c);
    // A file where the folder should be is named.
    let f = t.join("file");
    std::fs::write(&f, b"x").unwrap();
    let e = lock_output(&f, Scope::Whole).unwrap_err().to_string();
    assert!(e.contains("not a folder"), "{e}");
}

#[test]
fn taking_a_whole_folder_removes_what_killed_writers_left() {
    let t = TempDir::new("lock-sweep");
    let out = t.join("out");
    // A pid that surely no longer runs: a child that has exited and been reaped.
    let mut c = Command::new("true").spawn().unwrap();
    let dead = c.id();
    c.wait().unwrap();
    let stale = out.join(format!("seed-0/.model.safetensors.tmp-{dead}-0"));
    let live = out.join(format!("seed-1/.history.csv.tmp-{}-0", std::process::id()));
    for p in [&stale, &live] {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"partial").unwrap();
    }
    let _l = lock_output(&out, Scope::Whole).unwrap();
    assert!(!stale.exists(), "a dead writer's temporary was left");
    assert!(live.exists(), "a live writer's temporary was removed");
}

/// Two real processes: a second `generate` into the folder of a running one is refused, and
/// the first finishes with every image it planned, as a run alone would have.
#[test]
fn a_second_generate_cannot_join_a_running_one() {
    let t = TempDir::new("lock-two");
    let data = dataset(t.path());
    let (out, alone) = (t.join("out"), t.join("alone"));
    let args = ["--per-class", "20"];
    let mut first = generate(&data, &out, &args).spawn().unwrap();
    // Wait until the first has written a record: it holds the lock and is mid-run.
    let records = out.join(".records");
    let t0 = std::time::Instant::now();
    let count = || walk(&records).iter().filter(|p| p.extension().is_some_and(|e| e == "json")).count();
    while count() == 0 && t0.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let second = generate(&data, &out, &args).output().unwrap();
    let running = first.try_wait().unwrap().is_none();
    assert!(first.wait().unwrap().success());
    assert!(running, "the first run finished before the second started: the test needs more work per run");
    refused(&second, &out, first.id());
    assert!(generate(&data, &alone, &args).status().unwrap().success());
    let (a, b) = (images(&alone), images(&out));
    assert_eq!(a.len(), 40 + 1, "40 images and the manifest");
    assert_eq!(a, b, "the contended folder must hold exactly what a lone run writes");
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    let Ok(rd) = std::fs::read_dir(d) else { return v };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            v.extend(walk(&p));
        } else {
            v.push(p);
        }
    }
    v
}

/// PNGs and the manifest, by path relative to `out`.
fn images(out: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    walk(out)
        .into_iter()
        .filter_map(|p| {
            let rel = p.strip_prefix(out).unwrap().to_string_lossy().to_string();
            let keep = (rel.ends_with(".png") && !rel.starts_with("previews") && !rel.starts_with('.')) || rel == "manifest.jsonl";
            keep.then(|| (rel, std::fs::read(&p).unwrap()))
        })
        .collect()
}
