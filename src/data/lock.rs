//! Exclusive use of an output folder: two processes writing one folder would interleave their
//! records, manifests and checkpoints, so every long command takes a lock file in its output
//! folder first and a second process is refused with a message naming the holder.
//!
//! The lock is an OS file lock (`flock` on Unix) on `<out>/.diffii.lock`: it is released when
//! the [`OutputLock`] is dropped, and by the OS when the process dies, even by SIGKILL, so a
//! killed run never leaves a folder locked. The file itself stays (removing it would race with
//! a process that has just opened it) and holds the pid of the last holder, for the message.
//!
//! Shards of one run (`--shard i/n`) write disjoint files into one folder and must run side by
//! side: a shard holds `.diffii.lock` *shared* plus its own `.diffii-shard-i-of-n.lock`
//! exclusively. A whole run holds `.diffii.lock` exclusively, so it excludes every shard and
//! every shard excludes it, while distinct shards do not exclude each other.
//!
//! Taking a whole folder also removes the temporaries that killed writers left anywhere in it
//! (see [`remove_stale_temps_tree`]): no live process but this one may be writing there.
//!
//! Within one process the lock is re-entrant (a command that locks its folder may call library
//! code that locks the same folder), since a second `flock` from the same process on a new file
//! handle would otherwise refuse its own holder.
use std::collections::HashMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::data::atomic::remove_stale_temps_tree;
use crate::error::{Error, Result};

/// The lock file of a whole run.
pub const LOCK_FILE: &str = ".diffii.lock";

/// Which part of a folder's work a process does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// All of it: no other process may write the folder.
    Whole,
    /// Shard `index` of `count`: other shards may run beside it, a whole run may not.
    Shard { index: usize, count: usize },
}

/// Held locks of this process: lock file -> (open handle, holders).
type Held = HashMap<PathBuf, (Arc<File>, usize)>;

fn held() -> &'static Mutex<Held> {
    static HELD: std::sync::OnceLock<Mutex<Held>> = std::sync::OnceLock::new();
    HELD.get_or_init(|| Mutex::new(HashMap::new()))
}

/// A held lock on an output folder; dropping it releases the lock.
#[derive(Debug)]
pub struct OutputLock {
    files: Vec<PathBuf>,
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        let mut h = held().lock().unwrap_or_else(|e| e.into_inner());
        for f in &self.files {
            if let Some(entry) = h.get_mut(f) {
                entry.1 -= 1;
                if entry.1 == 0 {
                    // Closing the last handle releases the OS lock.
                    h.remove(f);
                }
            }
        }
    }
}

/// The shard lock file name of shard `index` of `count`.
pub fn shard_lock_file(index: usize, count: usize) -> String {
    format!(".diffii-shard-{index}-of-{count}.lock")
}

/// Takes the lock of `dir` (created if missing) for `scope`, or explains who holds it.
pub fn lock_output(dir: &Path, scope: Scope) -> Result<OutputLock> {
    if dir.exists() && !dir.is_dir() {
        return Err(Error::bad_file(dir, "is a file, not a folder: pass a folder (or a path where one can be made) as --out"));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::bad_file(dir, format!("cannot create the output folder: {e}")))?;
    let main = dir.join(LOCK_FILE);
    let mut lock = OutputLock { files: Vec::new() };
    match scope {
        Scope::Whole => {
            take(&main, true, dir)?;
            lock.files.push(main);
            remove_stale_temps_tree(dir)?;
        }
        Scope::Shard { index, count } => {
            take(&main, false, dir)?;
            lock.files.push(main);
            let own = dir.join(shard_lock_file(index, count));
            take(&own, true, dir)?;
            lock.files.push(own);
        }
    }
    Ok(lock)
}

/// Locks `path` (exclusive or shared) and records it as held by this process.
fn take(path: &Path, exclusive: bool, dir: &Path) -> Result<()> {
    let mut h = held().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(entry) = h.get_mut(path) {
        entry.1 += 1;
        return Ok(());
    }
    let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(|e| Error::io(path, e))?;
    let r = if exclusive { file.try_lock() } else { file.try_lock_shared() };
    match r {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Err(in_use(dir)),
        Err(TryLockError::Error(e)) => {
            return Err(Error::bad_file(path, format!("cannot lock the output folder ({e}); use an --out on a local filesystem")))
        }
    }
    if exclusive {
        // Only an exclusive holder may rewrite the pid; shared holders would garble it.
        let pid = format!("{}\n", std::process::id());
        let _ = file.set_len(0).and_then(|_| file.seek(SeekFrom::Start(0))).and_then(|_| file.write_all(pid.as_bytes()));
    }
    h.insert(path.to_path_buf(), (Arc::new(file), 1));
    Ok(())
}

/// The error for a folder locked by another process, naming the holders it can find: the
/// pids of held shard locks, else the pid in the main lock file.
fn in_use(dir: &Path) -> Error {
    let mut pids: Vec<String> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut names: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(".diffii-shard-") && n.ends_with(".lock")))
            .collect();
        names.sort();
        for p in names {
            if let Some(pid) = holder_pid(&p) {
                pids.push(pid);
            }
        }
    }
    if pids.is_empty() {
        pids.extend(read_pid(&dir.join(LOCK_FILE)));
    }
    let who = match pids.len() {
        0 => "another diffii process".to_string(),
        1 => format!("another diffii process (pid {})", pids[0]),
        _ => format!("other diffii processes (pids {})", pids.join(", ")),
    };
    Error::invalid(format!("{} is in use by {who}; wait for it or use another --out", dir.display()))
}

/// The pid in a lock file that another process holds now (None if nobody holds it).
fn holder_pid(path: &Path) -> Option<String> {
    let f = File::open(path).ok()?;
    match f.try_lock_shared() {
        Err(TryLockError::WouldBlock) => read_pid(path),
        _ => None,
    }
}

fn read_pid(path: &Path) -> Option<String> {
    let mut s = String::new();
    File::open(path).ok()?.read_to_string(&mut s).ok()?;
    let pid = s.trim();
    (!pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())).then(|| pid.to_string())
}
