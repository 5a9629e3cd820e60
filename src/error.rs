//! Typed errors of the library. Every variant that concerns a file names it, so a user can see
//! which file to fix; the binary wraps these in `anyhow` for display.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written. The OS error is part of the message, not a
    /// `source`: `{:#}` would print it twice.
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },

    /// A file exists but its content is not what we need (bad JSON, unsupported setting, ...).
    #[error("{}: {msg}", path.display())]
    BadFile { path: PathBuf, msg: String },

    /// A weight is missing or has the wrong shape / dtype.
    #[error("{}: tensor `{key}`: {msg}", path.display())]
    Tensor { path: PathBuf, key: String, msg: String },

    /// An argument or combination of settings that cannot work.
    #[error("{0}")]
    Invalid(String),

    /// An error from the tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io { path: path.into(), err }
    }
    pub fn bad_file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::BadFile { path: path.into(), msg: msg.into() }
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}

/// An error naming `what` (the stage, step and sample) unless every value of `t` is finite: a
/// NaN or infinity must stop a run, never become an image, a record or a cached tensor.
pub fn ensure_finite(t: &candle_core::Tensor, what: impl FnOnce() -> String) -> Result<()> {
    let bad = t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        return Err(Error::invalid(format!("{}: {bad} of {} values are NaN or infinite", what(), t.elem_count())));
    }
    Ok(())
}

/// Reads a JSON file into `T`, with errors that name the file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::bad_file(path, format!("invalid JSON: {e}")))
}
