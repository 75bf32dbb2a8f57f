//! The inbox: a folder that a USB stick or a network share copies images into.
//!
//! A file is taken only once it is complete — its size and modification time unchanged over
//! two looks at least `settle` apart, and not named like a partial copy (`*.part`, `*.tmp`,
//! `*.crdownload`, `~…`, `.…`). Each image is processed exactly once, across restarts too:
//! the field id comes from the image's content, the field is stored before the file is
//! removed, and an image whose field already exists is only removed. A file that is not a
//! usable image is moved to `rejected/` with the reason next to it, under a name that never
//! overwrites an earlier one; nothing stored is lost. A file that failed for a reason of the
//! moment (the disk nearly full, a store error, a model that failed on it) stays in the inbox
//! and is tried again later, waiting twice as long after each failure (up to ten minutes).

use crate::app::{App, Ingested, Unusable, is_unusable};
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// The longest wait before a file that failed for a reason of the moment is tried again.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(600);
/// The first wait.
const FIRST_RETRY_WAIT: Duration = Duration::from_secs(2);

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
    waiting: HashMap<PathBuf, Retry>,
}

/// A file that failed for a reason of the moment.
#[derive(Debug, Clone)]
struct Retry {
    failures: u32,
    next: Instant,
    reason: String,
}

/// A file the inbox is waiting to try again, for the UI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// File name.
    pub name: String,
    /// Failed attempts so far.
    pub failures: u32,
    /// The last failure.
    pub reason: String,
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
    /// Files that failed for a reason of the moment and stay for another try.
    pub deferred: usize,
}

impl Inbox {
    /// Watches `dir` (created if missing); a file must be unchanged for `settle`.
    pub fn new(dir: &Path, settle: Duration) -> Result<Self> {
        std::fs::create_dir_all(dir.join("rejected")).with_context(|| format!("creating inbox {}", dir.display()))?;
        Ok(Inbox {
            dir: dir.to_path_buf(),
            settle,
            last: HashMap::new(),
            waiting: HashMap::new(),
        })
    }

    /// Files waiting for another try after a failure of the moment, by name.
    pub fn waiting(&self) -> Vec<Waiting> {
        let mut w: Vec<Waiting> = self
            .waiting
            .iter()
            .map(|(p, r)| Waiting {
                name: p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                failures: r.failures,
                reason: r.reason.clone(),
            })
            .collect();
        w.sort_by(|a, b| a.name.cmp(&b.name));
        w
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
        let now = Instant::now();
        // A file that is gone (taken away by hand) is no longer waited for.
        self.waiting.retain(|p, _| p.exists());
        for path in self.complete_files()? {
            if self.waiting.get(&path).is_some_and(|r| r.next > now) {
                continue;
            }
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let result = read_bounded(&path, app.settings.limits.max_bytes)
                .and_then(|bytes| app.ingest(&bytes, &name, "inbox", false));
            match result {
                Ok(Ingested::New(f)) => {
                    self.waiting.remove(&path);
                    s.stored += 1;
                    tracing::info!(file = %name, field = %f.id, "inbox image stored");
                    remove(&path);
                }
                Ok(Ingested::Duplicate(f)) => {
                    self.waiting.remove(&path);
                    s.duplicates += 1;
                    tracing::info!(file = %name, field = %f.id, "inbox image was already stored");
                    remove(&path);
                }
                Err(e) if is_unusable(&e) => {
                    self.waiting.remove(&path);
                    s.rejected += 1;
                    let reason = format!("{e:#}");
                    tracing::warn!(file = %name, %reason, "inbox file rejected");
                    let to = self.free_rejected_name(&name);
                    if let Err(e) = std::fs::rename(&path, &to) {
                        tracing::error!(file = %name, error = %e, "could not move a rejected file aside");
                    }
                    let mut note = to.clone().into_os_string();
                    note.push(".reason.txt");
                    let _ = std::fs::write(note, reason);
                }
                Err(e) => {
                    s.deferred += 1;
                    let reason = format!("{e:#}");
                    let failures = self.waiting.get(&path).map_or(0, |r| r.failures) + 1;
                    let wait = FIRST_RETRY_WAIT
                        .saturating_mul(1 << (failures - 1).min(16))
                        .min(MAX_RETRY_WAIT);
                    tracing::warn!(file = %name, %reason, failures, retry_in_s = wait.as_secs(), "inbox file kept for another try");
                    self.waiting.insert(
                        path.clone(),
                        Retry {
                            failures,
                            next: now + wait,
                            reason,
                        },
                    );
                }
            }
            self.last.remove(&path);
        }
        Ok(s)
    }
}

impl Inbox {
    /// A path in `rejected/` for `name` that holds nothing yet: `name`, else `name` with ` (2)`,
    /// ` (3)`, … before its extension.
    fn free_rejected_name(&self, name: &str) -> PathBuf {
        let dir = self.dir.join("rejected");
        let first = dir.join(name);
        if !first.exists() {
            return first;
        }
        let (stem, ext) = match name.rsplit_once('.') {
            Some((s, e)) if !s.is_empty() => (s, format!(".{e}")),
            _ => (name, String::new()),
        };
        (2u64..)
            .map(|n| dir.join(format!("{stem} ({n}){ext}")))
            .find(|p| !p.exists())
            .expect("a free name")
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
        return Err(Unusable(format!(
            "file of {len} bytes is larger than the {max} bytes an image may have"
        ))
        .into());
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

    /// A field image while the disk is nearly full stays in the inbox and is stored once there
    /// is room; two unusable files of one name are both kept aside, each with its reason.
    #[test]
    fn only_unusable_files_are_set_aside_and_a_full_disk_keeps_the_image_for_another_try() {
        use crate::store::Retention;
        let dir = tempfile::tempdir().unwrap();
        let full = crate::app::tests::app_with(
            &dir.path().join("full"),
            Retention {
                min_free_bytes: u64::MAX,
                ..Retention::default()
            },
        );
        let in_dir = dir.path().join("inbox");
        let mut inbox = Inbox::new(&in_dir, Duration::ZERO).unwrap();
        let field = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/fields/images/BloodImage_00000.jpg");
        std::fs::copy(&field, in_dir.join("a.jpg")).unwrap();
        std::fs::write(in_dir.join("x.jpg"), b"not an image").unwrap();
        assert_eq!(
            inbox.pass(&full).unwrap(),
            PassSummary::default(),
            "first sight: not yet"
        );
        let s = inbox.pass(&full).unwrap();
        assert_eq!((s.stored, s.rejected, s.deferred), (0, 1, 1));
        assert!(in_dir.join("a.jpg").exists(), "a good image is not given up on");
        let w = inbox.waiting();
        assert_eq!(w.len(), 1);
        assert_eq!((w[0].name.as_str(), w[0].failures), ("a.jpg", 1));
        assert!(w[0].reason.contains("nearly full"), "{}", w[0].reason);
        // Not tried again before its wait is over.
        inbox.pass(&full).unwrap();
        assert_eq!(inbox.waiting()[0].failures, 1);

        // A second unusable file of the same name does not overwrite the first.
        std::fs::write(in_dir.join("x.jpg"), b"also not an image, longer").unwrap();
        inbox.pass(&full).unwrap();
        inbox.pass(&full).unwrap();
        let rejected = in_dir.join("rejected");
        assert_eq!(std::fs::read(rejected.join("x.jpg")).unwrap(), b"not an image");
        assert_eq!(
            std::fs::read(rejected.join("x (2).jpg")).unwrap(),
            b"also not an image, longer"
        );
        assert!(rejected.join("x.jpg.reason.txt").exists() && rejected.join("x (2).jpg.reason.txt").exists());

        // Room again (another store): after its wait the image is stored and leaves the inbox.
        let roomy = crate::app::tests::app_with(&dir.path().join("roomy"), Retention::default());
        std::thread::sleep(FIRST_RETRY_WAIT + Duration::from_millis(100));
        let s = inbox.pass(&roomy).unwrap();
        assert_eq!((s.stored, s.deferred), (1, 0));
        assert!(!in_dir.join("a.jpg").exists());
        assert!(inbox.waiting().is_empty());
        assert!(!rejected.join("a.jpg").exists());
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
