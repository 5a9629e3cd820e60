//! The loss log of a training run: a CSV file with a header and one row per optimiser step,
//! rewritten atomically just before every checkpoint, so it always holds at least the
//! checkpoint's rows (a kill between the two writes leaves extra rows); a resumed run keeps the
//! rows up to its checkpoint and continues them.
use std::path::{Path, PathBuf};

use crate::data::atomic::write_atomic;
use crate::error::Result;

pub struct LossLog {
    path: PathBuf,
    lines: Vec<String>,
}

impl LossLog {
    /// A log at `path` with the given column names. With `resume_rows`, the first that many rows
    /// of an existing file are kept (a missing file starts afresh).
    pub fn open(path: &Path, columns: &[&str], resume_rows: Option<usize>) -> Self {
        let mut lines: Vec<String> = match (resume_rows, std::fs::read_to_string(path)) {
            (Some(n), Ok(text)) => text.lines().take(n + 1).map(str::to_string).collect(),
            _ => Vec::new(),
        };
        if lines.is_empty() {
            lines.push(columns.iter().map(|c| csv_field(c)).collect::<Vec<_>>().join(","));
        }
        LossLog { path: path.to_path_buf(), lines }
    }

    /// Appends a row (fields are quoted where CSV needs it).
    pub fn push(&mut self, fields: &[&str]) {
        self.lines.push(fields.iter().map(|f| csv_field(f)).collect::<Vec<_>>().join(","));
    }

    /// Writes the whole log atomically.
    pub fn write(&self) -> Result<()> {
        write_atomic(&self.path, (self.lines.join("\n") + "\n").as_bytes())
    }
}

/// A CSV field, quoted when it holds a comma, a quote or a newline.
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
