//! SHA-256 content hashes, as lower-case hex: of bytes, of files (streamed), and of settings
//! (their JSON). Records, caches and checkpoints identify what they were made from with these.
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// SHA-256 of a file's bytes, streamed in 1 MiB blocks so large weights need no big buffer.
pub fn file_digest(path: impl AsRef<Path>) -> Result<[u8; 32]> {
    let path = path.as_ref();
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

/// Hex SHA-256 of a file's bytes.
pub fn sha256_file(path: impl AsRef<Path>) -> Result<String> {
    Ok(hex(&file_digest(path)?))
}

/// Hex SHA-256 of `settings` as compact JSON (field order as declared): ties outputs,
/// checkpoints and records to the exact settings that made them.
pub fn settings_sha256<S: serde::Serialize>(settings: &S) -> String {
    sha256_bytes(serde_json::to_string(settings).expect("settings serialise to JSON").as_bytes())
}
