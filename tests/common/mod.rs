//! Shared helpers for the integration tests: where the fixtures live, and tensor comparisons.
#![allow(dead_code)]
use std::path::PathBuf;

/// The shared fixtures folder: `$DIFFII_FIXTURES`, else `../shared/fixtures` beside the repo.
/// Panics with instructions when it is missing: a test must never pass by skipping.
pub fn fixtures() -> PathBuf {
    let dir = match std::env::var_os("DIFFII_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"),
    };
    assert!(
        dir.join("tiny-sd/model_index.json").is_file(),
        "fixtures not found at {}: set DIFFII_FIXTURES to the folder holding tiny-sd/ and tiny-sd-ref/",
        dir.display()
    );
    dir
}

pub fn tiny_sd() -> PathBuf {
    fixtures().join("tiny-sd")
}

pub fn tiny_ref() -> PathBuf {
    fixtures().join("tiny-sd-ref")
}

/// All tensors of the reference run, on the CPU.
pub fn ref_tensors() -> std::collections::HashMap<String, candle_core::Tensor> {
    let p = tiny_ref().join("ref_diffii.safetensors");
    candle_core::safetensors::load(&p, &candle_core::Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

/// Max absolute difference between two tensors of the same shape (computed in f64).
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let flat = |t: &candle_core::Tensor| -> Vec<f64> {
        t.to_dtype(candle_core::DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
    };
    flat(a).iter().zip(&flat(b)).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// An empty folder `diffii-<name>-<pid>` in the system temp dir (emptied if it exists).
pub fn empty_temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("diffii-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A fresh temporary folder `diffii-<tag>-<pid>-<n>`, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!("diffii-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies a folder tree by content rather than `fs::copy`, which would carry over the
/// fixtures' read-only permissions and make the copies impossible to rewrite.
pub fn copy_dir(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to);
        } else {
            std::fs::write(&to, std::fs::read(entry.path()).unwrap()).unwrap();
        }
    }
}
