//! The inbox: a folder that a USB stick or a network share copies images into.
//!
//! A file is taken only once it is complete — its size and modification time unchanged over
//! two looks at least `settle` apart, and not named like a partial copy (`*.part`, `*.tmp`,
//! `*.crdownload`, `~…`, `.…`). Each image is processed exactly once, across restarts too:
//! the field id comes from the image's content, the field is stored before the file is
//! removed, and an image whose field already exists is only removed. A file that is not a
//! usable image is moved to `rejected/` with the reason next to it; nothing stored is lost.

use crate::app::{App, Ingested};
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// What was seen of a file at the last look.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Seen {
    len: u64,
    modified: SystemTime,
}

/// A watched folder.
#[derive(Debug)]
pub struct Inbox {
    dir: PathBuf,
    settle: Duration,
    last: HashMap<PathBuf, Seen>,
}

/// Whether a name looks like a copy still in progress or a hidden file.
fn partial_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    name.starts_with('.')
        || name.starts_with('~')
        || [".part", ".tmp", ".crdownload", ".partial", ".swp"]
            .iter()
            .any(|s| lower.ends_with(s))
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PassSummary {
    /// New fields stored.
    pub stored: usize,
    /// Images already stored before (removed from the inbox).
    pub duplicates: usize,
    /// Files refused (moved to `rejected/`).
    pub rejected: usize,
}

impl Inbox {
    /// Watches `dir` (created if missing); a file must be unchanged for `settle`.
    pub fn new(dir: &Path, settle: Duration) -> Result<Self> {
        std::fs::create_dir_all(dir.join("rejected")).with_context(|| format!("creating inbox {}", dir.display()))?;
        Ok(Inbox {
            dir: dir.to_path_buf(),
            settle,
            last: HashMap::new(),
        })
    }

    /// Files that are complete now, sorted by name.
    pub fn complete_files(&mut self) -> Result<Vec<PathBuf>> {
        let now = SystemTime::now();
        let mut current = HashMap::new();
        let mut ready = Vec::new();
        for e in std::fs::read_dir(&self.dir).with_context(|| format!("reading inbox {}", self.dir.display()))? {
            let Ok(e) = e else { continue };
            let path = e.path();
            let Ok(m) = e.metadata() else { continue };
            let name = e.file_name().to_string_lossy().into_owned();
            if !m.is_file() || partial_name(&name) {
                continue;
            }
            let seen = Seen {
                len: m.len(),
                modified: m.modified().unwrap_or(now),
            };
            let settled = now.duration_since(seen.modified).unwrap_or_default() >= self.settle;
            if self.last.get(&path) == Some(&seen) && settled {
                ready.push(path.clone());
            }
            current.insert(path, seen);
        }
        self.last = current;
        ready.sort();
        Ok(ready)
    }

    /// Processes the complete files through the appliance.
    pub fn pass(&mut self, app: &App) -> Result<PassSummary> {
        let mut s = PassSummary::default();
        for path in self.complete_files()? {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let result = read_bounded(&path, app.settings.limits.max_bytes)
                .and_then(|bytes| app.ingest(&bytes, &name, "inbox", false));
            match result {
                Ok(Ingested::New(f)) => {
                    s.stored += 1;
                    tracing::info!(file = %name, field = %f.id, "inbox image stored");
                    remove(&path);
                }
                Ok(Ingested::Duplicate(f)) => {
                    s.duplicates += 1;
                    tracing::info!(file = %name, field = %f.id, "inbox image was already stored");
                    remove(&path);
                }
                Err(e) => {
                    s.rejected += 1;
                    let reason = format!("{e:#}");
                    tracing::warn!(file = %name, %reason, "inbox file rejected");
                    let to = self.dir.join("rejected").join(&name);
                    if let Err(e) = std::fs::rename(&path, &to) {
                        tracing::error!(file = %name, error = %e, "could not move a rejected file aside");
                    }
                    let _ = std::fs::write(self.dir.join("rejected").join(format!("{name}.reason.txt")), reason);
                }
            }
            self.last.remove(&path);
        }
        Ok(s)
    }
}

fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        tracing::error!(path = %path.display(), error = %e, "could not remove a processed inbox file");
    }
}

/// Reads a file, refusing one larger than `max` before reading it.
fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>> {
    let len = std::fs::metadata(path)?.len();
    if len > max {
        anyhow::bail!("file of {len} bytes is larger than the {max} bytes an image may have");
    }
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_copies_and_hidden_files_are_not_taken() {
        for n in ["a.jpg.part", "b.TMP", ".hidden.jpg", "~lock", "x.crdownload"] {
            assert!(partial_name(n), "{n}");
        }
        assert!(!partial_name("field 01.jpg"));
    }

    #[test]
    fn a_file_is_taken_only_once_it_stops_changing() {
        let dir = tempfile::tempdir().unwrap();
        let mut inbox = Inbox::new(dir.path(), Duration::ZERO).unwrap();
        let f = dir.path().join("a.png");
        std::fs::write(&f, b"12").unwrap();
        assert!(inbox.complete_files().unwrap().is_empty(), "first sight: not yet");
        std::fs::write(&f, b"1234").unwrap();
        assert!(inbox.complete_files().unwrap().is_empty(), "still growing");
        assert_eq!(inbox.complete_files().unwrap(), vec![f.clone()]);
        std::fs::write(dir.path().join("b.png.part"), b"x").unwrap();
        assert_eq!(inbox.complete_files().unwrap(), vec![f]);
        // A settle time keeps a just-written file waiting.
        let mut slow = Inbox::new(dir.path(), Duration::from_secs(3600)).unwrap();
        slow.complete_files().unwrap();
        assert!(slow.complete_files().unwrap().is_empty());
    }
}
