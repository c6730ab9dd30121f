//! One process per run folder: an exclusive advisory lock on `<run>/.lock`, which the OS
//! releases when the process exits however it exits, so a killed run never needs unlocking
//! by hand. The file holds the owner's PID, for the message a second process gets.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

pub const LOCK_FILE: &str = ".lock";

/// Held for as long as the run is being changed.
#[derive(Debug)]
pub struct RunLock {
    file: File,
    pub path: PathBuf,
}

impl Drop for RunLock {
    /// Unlocks before the file closes. Closing alone releases the lock only when no other
    /// descriptor shares the open file: a child forked by another thread shares it until its
    /// `exec`, and in that window the next `acquire` (a resume in the same process) would
    /// find the run locked by its own PID.
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

impl RunLock {
    /// Lock `run_dir` (which exists), or say which process holds it.
    pub fn acquire(run_dir: &Path) -> anyhow::Result<Self> {
        let path = run_dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening the run's lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {
                file.set_len(0)
                    .and_then(|_| write!(file, "{}", std::process::id()))
                    .with_context(|| format!("writing {}", path.display()))?;
                Ok(Self { file, path })
            }
            Err(TryLockError::WouldBlock) => {
                let pid = std::fs::read_to_string(&path).unwrap_or_default();
                bail!(
                    "{} is in use by another metamix process (PID {}); wait for it to finish or \
                     stop it — its lock is released when it exits",
                    run_dir.display(),
                    if pid.trim().is_empty() {
                        "unknown"
                    } else {
                        pid.trim()
                    }
                )
            }
            Err(TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("locking {}", path.display()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(dir.path()).unwrap();
        let err = RunLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&std::process::id().to_string()), "{err}");
        drop(first);
        RunLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn dropping_the_lock_releases_it_while_a_duplicate_descriptor_lives() {
        // What a child forked by another thread holds until it execs.
        let dir = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(dir.path()).unwrap();
        let duplicate = first.file.try_clone().unwrap();
        drop(first);
        RunLock::acquire(dir.path()).unwrap();
        drop(duplicate);
    }
}
