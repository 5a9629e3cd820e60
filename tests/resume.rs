//! SIGKILL in the middle of `concepts`, `train` and `compare`, then a rerun: the final outputs
//! must equal those of an uninterrupted run byte for byte (wall-clock fields aside). `generate`,
//! `invert` and `pretrain` have the same tests in their own files.
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::TempDir;

fn folder(root: &Path, n: u32) -> PathBuf {
    for (c, class) in ["gull", "sparrow"].iter().enumerate() {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for k in 0..n {
            let s = c as u32 * 50 + k;
            image::RgbImage::from_fn(16, 16, |x, y| image::Rgb([(x * 13 + s * 7) as u8, (y * 9 + s * 3) as u8, (s * 40 + c as u32 * 120) as u8]))
                .save(root.join(class).join(format!("{k}.png")))
                .unwrap();
        }
    }
    root.to_path_buf()
}

fn diffii(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_diffii"));
    c.args(args);
    c
}

fn ok(c: &mut Command) -> String {
    let o = c.output().unwrap();
    assert!(o.status.success(), "failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Starts `args`, waits until `ready` holds, SIGKILLs it. Returns whether `done` held at the
/// moment of the kill (it must not: the run has to be interrupted mid-way).
fn kill_when(args: &[&str], ready: impl Fn() -> bool, done: impl Fn() -> bool) {
    let mut child = diffii(args).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    while !ready() && t0.elapsed() < Duration::from_secs(300) {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be interrupted: give it more work");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!done(), "the run finished before the kill: give it more work");
}

/// Every file under `dir` by relative path, with JSON files passed through `clean`.
fn files(dir: &Path, skip: &[&str]) -> BTreeMap<String, Vec<u8>> {
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, &mut v);
    v.into_iter()
        .filter_map(|p| {
            let rel = p.strip_prefix(dir).unwrap().to_string_lossy().to_string();
            if skip.iter().any(|s| rel.contains(s)) {
                return None;
            }
            let bytes = std::fs::read(&p).unwrap();
            let bytes = if rel.ends_with(".json") { without_seconds(&bytes) } else { bytes };
            Some((rel, bytes))
        })
        .collect()
}

/// JSON with every `seconds*` field removed: wall time is the one thing a rerun may change.
fn without_seconds(bytes: &[u8]) -> Vec<u8> {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.retain(|k, _| !k.starts_with("seconds"));
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(bytes) else { return bytes.to_vec() };
    strip(&mut v);
    serde_json::to_vec(&v).unwrap()
}

/// `a` and `b` hold the same files with the same bytes, `must` among them.
fn assert_same(a: &BTreeMap<String, Vec<u8>>, b: &BTreeMap<String, Vec<u8>>, must: &[&str]) {
    for m in must {
        assert!(a.contains_key(*m), "no {m} among {:?}", a.keys().collect::<Vec<_>>());
    }
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "different files");
    for (k, v) in a {
        assert!(v == &b[k], "{k} differs between the uninterrupted and the killed + resumed run");
    }
}

#[test]
fn killed_concepts_run_resumes_to_the_same_bytes() {
    let t = TempDir::new("resume-concepts");
    let data = folder(&t.join("data"), 2);
    let tiny = common::tiny_sd();
    let (full, killed) = (t.join("full"), t.join("killed"));
    let args = |out: &Path| -> Vec<String> {
        let v = ["concepts", "--model", tiny.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()];
        let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        v.extend(["--superclass", "bird", "--steps", "300", "--resolution", "16", "--checkpoint-every", "10", "--quiet"].map(String::from));
        v
    };
    let a = args(&full);
    ok(&mut diffii(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    let k = args(&killed);
    let k: Vec<&str> = k.iter().map(String::as_str).collect();
    let ckpt = killed.join("checkpoint.safetensors");
    kill_when(&k, || ckpt.is_file(), || killed.join("learned_embeds.safetensors").is_file());
    let mut resume = k.clone();
    resume.push("--resume");
    let out = ok(&mut diffii(&resume));
    assert!(out.contains("resumed at") && !out.contains("resumed at 0)"), "{out}");
    assert_same(&files(&full, &[".lock"]), &files(&killed, &[".lock"]), &["learned_embeds.safetensors", "concepts.json", "loss.csv"]);
}

#[test]
fn killed_train_run_resumes_to_the_same_bytes() {
    let t = TempDir::new("resume-train");
    let data = folder(&t.join("data"), 8);
    let test = folder(&t.join("test"), 2);
    let (full, killed) = (t.join("full"), t.join("killed"));
    let args = |out: &Path| -> Vec<String> {
        ["train", "--data", data.to_str().unwrap(), "--test", test.to_str().unwrap(), "--out", out.to_str().unwrap(), "--seeds", "0,1,2,3"]
            .iter()
            .map(|s| s.to_string())
            .chain(["--epochs", "4", "--size", "16", "--batch", "4", "--val-per-class", "1", "--quiet"].map(String::from))
            .collect()
    };
    let a = args(&full);
    ok(&mut diffii(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    let k = args(&killed);
    let k: Vec<&str> = k.iter().map(String::as_str).collect();
    kill_when(&k, || killed.join("seed-0/result.json").is_file(), || killed.join("results.json").is_file());
    let out = ok(&mut diffii(&k));
    assert!(out.contains("seed 3:"), "{out}");
    assert_same(&files(&full, &[".lock"]), &files(&killed, &[".lock"]), &["results.json", "seed-0/model.safetensors", "seed-3/model.safetensors"]);
}

#[test]
fn killed_compare_run_resumes_to_the_same_bytes() {
    let t = TempDir::new("resume-compare");
    let data = folder(&t.join("data"), 6);
    let test = folder(&t.join("test"), 2);
    let tiny = common::tiny_sd();
    let (full, killed) = (t.join("full"), t.join("killed"));
    let args = |out: &Path| -> Vec<String> {
        ["compare", "--model", tiny.to_str().unwrap(), "--data", data.to_str().unwrap(), "--test", test.to_str().unwrap(), "--out", out.to_str().unwrap()]
            .iter()
            .map(|s| s.to_string())
            .chain(
                ["--methods", "none,diffii", "--seeds", "0,1", "--superclass", "bird", "--gen-size", "16", "--inversion-steps", "2", "--steps", "2", "--expansion", "1"]
                    .map(String::from),
            )
            .chain(["--epochs", "3", "--size", "16", "--batch", "4", "--val-per-class", "1", "--quiet"].map(String::from))
            .collect()
    };
    let a = args(&full);
    ok(&mut diffii(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    let k = args(&killed);
    let k: Vec<&str> = k.iter().map(String::as_str).collect();
    kill_when(&k, || killed.join("none/seed-0/result.json").is_file(), || killed.join("results.json").is_file());
    ok(&mut diffii(&k));
    // results.md and the HTML carry timings; results.json is compared without them.
    let must = ["results.json", "none/seed-1/result.json", "diffii/seed-1/result.json", "diffii/seed-1/synthetic/manifest.jsonl"];
    assert_same(&files(&full, &[".lock", "results.md", ".html"]), &files(&killed, &[".lock", "results.md", ".html"]), &must);
}
