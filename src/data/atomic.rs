//! Crash-safe output files and deterministic PNG encoding.
//!
//! Generation is resumable and sharded: a run that is killed must never leave a half-written
//! image or manifest that a later run would take as finished, and two machines producing the same
//! sample must write the same bytes. Hence every output goes to a temporary file in the target's
//! folder (same filesystem, so the rename is atomic) and is renamed into place only when complete,
//! and PNGs are encoded with fixed settings and no timestamps or other ambient metadata.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, ImageEncoder};

use crate::error::{Error, Result};

/// Distinguishes temporaries of threads of one process writing the same target.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn temp_path(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{}: not a file path", path.display())))?;
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = format!(".{}.tmp-{}-{n}", name.to_string_lossy(), std::process::id());
    Ok(path.with_file_name(tmp))
}

/// Removes the temporaries that killed processes left in `dir` (not recursive): files named
/// by [`write_atomic`] whose writer process no longer runs. Temporaries of live processes
/// (e.g. another shard writing into the same folder) are kept. Where liveness cannot be checked
/// (no `/proc`), nothing is removed. Returns how many were removed.
pub fn remove_stale_temps(dir: &Path) -> Result<usize> {
    let proc_fs = Path::new("/proc/self").exists();
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(0) };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some((_, tail)) = name.strip_prefix('.').and_then(|n| n.rsplit_once(".tmp-")) else { continue };
        let Some(pid) = tail.split_once('-').and_then(|(p, n)| n.parse::<u64>().ok().and(p.parse::<u32>().ok())) else {
            continue;
        };
        if proc_fs && !Path::new(&format!("/proc/{pid}")).exists() {
            let p = e.path();
            std::fs::remove_file(&p).map_err(|err| Error::io(&p, err))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// [`remove_stale_temps`] in `dir` and every folder below it (symlinks are not followed).
pub fn remove_stale_temps_tree(dir: &Path) -> Result<usize> {
    let mut removed = remove_stale_temps(dir)?;
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(removed) };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            removed += remove_stale_temps_tree(&e.path())?;
        }
    }
    Ok(removed)
}

/// Writes `bytes` to `path` atomically: readers see the old file or the complete new one, never
/// a partial one. Creates missing parent folders; replaces an existing file.
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    let path = path.as_ref();
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let tmp = temp_path(path)?;
    let result = (|| {
        // Errors name the target: the temporary is an implementation detail, removed below.
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(path, e))?;
        f.write_all(bytes).map_err(|e| Error::io(path, e))?;
        // Without this a power loss after the rename can leave an empty file under the final name.
        f.sync_all().map_err(|e| Error::io(path, e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Encodes HWC RGB8 pixels as PNG. The same pixels always give the same bytes (fixed compression
/// and filter, no time or text chunks), so output hashes are reproducible across machines.
pub fn encode_png(rgb: &[u8], w: usize, h: usize) -> Result<Vec<u8>> {
    if w == 0 || h == 0 || rgb.len() != w * h * 3 {
        return Err(Error::invalid(format!(
            "cannot encode PNG: {} bytes for a {w}x{h} RGB image (expected {})",
            rgb.len(),
            w * h * 3
        )));
    }
    let (w32, h32) = (
        u32::try_from(w).map_err(|_| Error::invalid(format!("image width {w} too large")))?,
        u32::try_from(h).map_err(|_| Error::invalid(format!("image height {h} too large")))?,
    );
    let mut out = Vec::new();
    PngEncoder::new_with_quality(&mut out, CompressionType::Default, FilterType::Adaptive)
        .write_image(rgb, w32, h32, ExtendedColorType::Rgb8)
        .map_err(|e| Error::invalid(format!("cannot encode PNG: {e}")))?;
    Ok(out)
}

/// Encodes and atomically writes a PNG; returns the hex SHA-256 of the bytes written.
pub fn save_png_atomic(path: impl AsRef<Path>, rgb: &[u8], w: usize, h: usize) -> Result<String> {
    let path = path.as_ref();
    let bytes = encode_png(rgb, w, h).map_err(|e| match e {
        Error::Invalid(msg) => Error::bad_file(path, msg),
        e => e,
    })?;
    write_atomic(path, &bytes)?;
    Ok(crate::hash::sha256_bytes(&bytes))
}

/// Writes `value` as pretty JSON (with a final newline) atomically.
pub fn write_json_atomic<T: serde::Serialize + ?Sized>(
    path: impl AsRef<Path>,
    value: &T,
) -> Result<()> {
    let path = path.as_ref();
    let mut bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::bad_file(path, format!("cannot serialise JSON: {e}")))?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// Guards an output folder against mixing runs: writes `settings` as JSON to `path` when the
/// file is missing; otherwise the stored settings must equal them, or the error names the
/// first differing field and says what to do. Returns whether the file already existed.
pub fn write_or_match_settings<T>(path: impl AsRef<Path>, settings: &T, what: &str) -> Result<bool>
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq,
{
    let path = path.as_ref();
    if !path.is_file() {
        write_json_atomic(path, settings)?;
        return Ok(false);
    }
    let old: T = crate::error::read_json(path)?;
    if old != *settings {
        let a = serde_json::to_value(&old).unwrap_or_default();
        let b = serde_json::to_value(settings).unwrap_or_default();
        let field = a
            .as_object()
            .and_then(|o| o.iter().find(|(k, v)| b.get(k.as_str()) != Some(v)).map(|(k, _)| k.clone()))
            .unwrap_or_default();
        return Err(Error::bad_file(
            path,
            format!("this output folder holds {what} with different settings (`{field}` differs); use another --out or delete it"),
        ));
    }
    Ok(true)
}
