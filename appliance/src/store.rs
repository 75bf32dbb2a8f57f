//! Where results live on the appliance: one interface, [`Store`], so that the durable store and
//! its uplink queue can replace the folder store without touching the rest.
//!
//! [`DirStore`] keeps one JSON file per field and per slide and the original images, each
//! written to a temporary file, synced and renamed into place: a crash or power cut leaves the
//! old version or the new one, never half of one. Original images are kept up to a byte limit;
//! beyond it the oldest go first (their results stay).

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use wbc_shared::messages::FieldRecord;

/// A slide: the fields counted together for one differential.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlideState {
    /// Slide id.
    pub id: String,
    /// When it was started, seconds since the Unix epoch.
    pub started_at: u64,
    /// When the technician closed it.
    #[serde(default)]
    pub finished_at: Option<u64>,
}

/// The appliance's results.
pub trait Store: Send + Sync {
    /// Writes a field (replacing one with the same id).
    fn put_field(&self, field: &FieldRecord) -> Result<()>;
    /// A field by id.
    fn field(&self, id: &str) -> Result<Option<FieldRecord>>;
    /// The fields of a slide, oldest first.
    fn fields_of_slide(&self, slide_id: &str) -> Result<Vec<FieldRecord>>;
    /// Keeps a field's original image (subject to the retention limit).
    fn put_image(&self, field_id: &str, bytes: &[u8]) -> Result<()>;
    /// A field's original image, unless retention removed it.
    fn image(&self, field_id: &str) -> Result<Option<Vec<u8>>>;
    /// Writes a slide.
    fn put_slide(&self, slide: &SlideState) -> Result<()>;
    /// All slides, oldest first.
    fn slides(&self) -> Result<Vec<SlideState>>;
}

/// A [`Store`] in a folder.
#[derive(Debug)]
pub struct DirStore {
    root: PathBuf,
    max_image_bytes: u64,
    lock: std::sync::Mutex<()>,
}

/// Ids become file names: only letters, digits, `-` and `_`, at most 64 characters.
fn check_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        bail!("invalid id {id:?}");
    }
    Ok(())
}

impl DirStore {
    /// Opens (creating) a store in `root`, keeping at most `max_image_bytes` of original images.
    pub fn open(root: &Path, max_image_bytes: u64) -> Result<Self> {
        for d in ["fields", "images", "slides", "tmp"] {
            std::fs::create_dir_all(root.join(d)).with_context(|| format!("creating {}", root.join(d).display()))?;
        }
        Ok(DirStore {
            root: root.to_path_buf(),
            max_image_bytes,
            lock: std::sync::Mutex::new(()),
        })
    }

    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let mut tmp = tempfile::NamedTempFile::new_in(self.root.join("tmp"))?;
        tmp.write_all(bytes)?;
        tmp.as_file().sync_all()?;
        tmp.persist(path)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
        match std::fs::read(path) {
            Ok(b) => {
                Ok(Some(serde_json::from_slice(&b).with_context(|| {
                    format!("{} is not a valid record", path.display())
                })?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Every record of a folder; one that cannot be read is logged and skipped, so that one
    /// damaged file never hides the others.
    fn read_all<T: for<'de> Deserialize<'de>>(&self, dir: &str) -> Result<Vec<T>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.root.join(dir))? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "json") {
                match Self::read_json(&p) {
                    Ok(Some(v)) => out.push(v),
                    Ok(None) => {}
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "skipping a damaged record"),
                }
            }
        }
        Ok(out)
    }

    /// Removes the oldest images until the total is within the limit.
    fn enforce_retention(&self) -> Result<()> {
        let mut images: Vec<(std::time::SystemTime, u64, PathBuf)> = std::fs::read_dir(self.root.join("images"))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                Some((m.modified().ok()?, m.len(), e.path()))
            })
            .collect();
        let mut total: u64 = images.iter().map(|i| i.1).sum();
        images.sort();
        for (_, len, path) in images {
            if total <= self.max_image_bytes {
                break;
            }
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            tracing::info!(path = %path.display(), "original image removed by the retention limit");
            total -= len;
        }
        Ok(())
    }
}

impl Store for DirStore {
    fn put_field(&self, field: &FieldRecord) -> Result<()> {
        check_id(&field.id)?;
        let _g = self.lock.lock().expect("store lock");
        self.write_atomic(
            &self.root.join("fields").join(format!("{}.json", field.id)),
            &serde_json::to_vec_pretty(field)?,
        )
    }

    fn field(&self, id: &str) -> Result<Option<FieldRecord>> {
        check_id(id)?;
        Self::read_json(&self.root.join("fields").join(format!("{id}.json")))
    }

    fn fields_of_slide(&self, slide_id: &str) -> Result<Vec<FieldRecord>> {
        let mut v: Vec<FieldRecord> = self
            .read_all::<FieldRecord>("fields")?
            .into_iter()
            .filter(|f| f.slide_id == slide_id)
            .collect();
        v.sort_by(|a, b| (a.received_at, &a.id).cmp(&(b.received_at, &b.id)));
        Ok(v)
    }

    fn put_image(&self, field_id: &str, bytes: &[u8]) -> Result<()> {
        check_id(field_id)?;
        let _g = self.lock.lock().expect("store lock");
        self.write_atomic(&self.root.join("images").join(field_id), bytes)?;
        self.enforce_retention()
    }

    fn image(&self, field_id: &str) -> Result<Option<Vec<u8>>> {
        check_id(field_id)?;
        match std::fs::read(self.root.join("images").join(field_id)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn put_slide(&self, slide: &SlideState) -> Result<()> {
        check_id(&slide.id)?;
        let _g = self.lock.lock().expect("store lock");
        self.write_atomic(
            &self.root.join("slides").join(format!("{}.json", slide.id)),
            &serde_json::to_vec_pretty(slide)?,
        )
    }

    fn slides(&self) -> Result<Vec<SlideState>> {
        let mut v = self.read_all::<SlideState>("slides")?;
        v.sort_by(|a, b| (a.started_at, &a.id).cmp(&(b.started_at, &b.id)));
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wbc_shared::messages::SCHEMA_VERSION;

    fn field(id: &str, slide: &str, at: u64) -> FieldRecord {
        FieldRecord {
            schema_version: SCHEMA_VERSION,
            id: id.into(),
            slide_id: slide.into(),
            received_at: at,
            source: "test".into(),
            name: "x.jpg".into(),
            image_sha256: String::new(),
            width: 1,
            height: 1,
            single_cell: true,
            microns_per_pixel: 0.1,
            cells: vec![],
        }
    }

    #[test]
    fn fields_slides_and_images_round_trip_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let s = DirStore::open(dir.path(), 1 << 20).unwrap();
        s.put_field(&field("b", "s1", 2)).unwrap();
        s.put_field(&field("a", "s1", 1)).unwrap();
        s.put_field(&field("c", "s2", 3)).unwrap();
        s.put_image("a", b"bytes").unwrap();
        s.put_slide(&SlideState {
            id: "s1".into(),
            started_at: 1,
            finished_at: None,
        })
        .unwrap();
        drop(s);
        let s = DirStore::open(dir.path(), 1 << 20).unwrap();
        let ids: Vec<_> = s.fields_of_slide("s1").unwrap().into_iter().map(|f| f.id).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(s.field("c").unwrap().unwrap().slide_id, "s2");
        assert_eq!(s.field("zz").unwrap(), None);
        assert_eq!(s.image("a").unwrap().as_deref(), Some(&b"bytes"[..]));
        assert_eq!(s.image("b").unwrap(), None);
        assert_eq!(s.slides().unwrap().len(), 1);
    }

    #[test]
    fn hostile_ids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = DirStore::open(dir.path(), 1 << 20).unwrap();
        for id in ["", "../x", "a/b", "a.json", &"x".repeat(65)] {
            assert!(s.field(id).is_err(), "{id}");
            assert!(s.put_image(id, b"x").is_err(), "{id}");
        }
    }

    #[test]
    fn a_damaged_record_does_not_hide_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let s = DirStore::open(dir.path(), 1 << 20).unwrap();
        s.put_field(&field("a", "s", 1)).unwrap();
        std::fs::write(dir.path().join("fields/b.json"), b"{ truncated").unwrap();
        assert_eq!(s.fields_of_slide("s").unwrap().len(), 1);
        assert!(s.field("b").is_err(), "reading the damaged one directly says so");
    }

    #[test]
    fn retention_removes_the_oldest_images_first() {
        let dir = tempfile::tempdir().unwrap();
        let s = DirStore::open(dir.path(), 25).unwrap();
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            s.put_image(id, &[i as u8; 10]).unwrap();
            // Distinct modification times.
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(s.image("a").unwrap(), None, "oldest removed");
        assert!(s.image("b").unwrap().is_some() && s.image("c").unwrap().is_some());
    }
}
