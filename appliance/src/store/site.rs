//! What the appliance has learnt of its site: the unadapted pooled features of the last cells
//! it classified (a window of the newest, for the model version that computed them), for a
//! model that adapts its backbone too the pictures of the last cells (a smaller window), and
//! the site adaptation fitted on them, per model version.
//!
//! A new model computes other features: the window starts over when the model version
//! changes, and an adaptation is only ever used with the version it was fitted for. Neither is
//! a result: a damaged record is dropped (and the appliance answers as the signed model does
//! until it has fitted again), never an error that stops a field.

use super::{Store, TxResult, be, be2, decode, encode, read_u64, tx_error};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sled::Transactional;
use wbc_models::adapt::Adaptation;

/// Format version of a stored feature row.
const ROW_VERSION: u8 = 1;
/// Format version of a stored site picture.
const PICTURE_VERSION: u8 = 1;
/// Adaptations of this many model versions are kept (a rollback finds its model's).
const ADAPTATIONS_KEPT: usize = 8;

/// An adaptation as the appliance keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredAdaptation {
    /// The adaptation.
    pub adaptation: Adaptation,
    /// When it was fitted, seconds since the Unix epoch.
    pub fitted_at: u64,
    /// Cells the model version had seen at the site when it was fitted.
    pub seen_at_fit: u64,
}

/// The site's cells kept for one model version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SiteCells {
    /// The model version whose features they are.
    pub model_version: u64,
    /// Cells this model version has seen at the site (since it was installed or reset).
    pub seen: u64,
    /// Cells whose features are kept (the newest, at most the configured window).
    pub kept: usize,
}

const SITE_VERSION: &[u8] = b"site_model_version";
const SITE_SEEN: &[u8] = b"site_seen";

impl Store {
    /// Keeps the features of newly classified cells (`rows`, `width` values each) for model
    /// `version`: a window of the newest `keep` cells. Another version's cells are dropped
    /// first. Returns what is kept now.
    pub fn add_site_features(&self, version: u64, rows: &[f32], width: usize, keep: usize) -> Result<SiteCells> {
        let _g = self.lock.lock().expect("store lock");
        let mut cells = self.site_cells_unlocked(version)?;
        if cells.model_version != version {
            self.site_features.clear()?;
            self.site_pictures.clear()?;
            cells = SiteCells {
                model_version: version,
                ..Default::default()
            };
        }
        let n = rows.len() / width.max(1);
        let mut batch = sled::Batch::default();
        for row in rows.chunks_exact(width.max(1)) {
            let mut v = Vec::with_capacity(1 + 4 * row.len());
            v.push(ROW_VERSION);
            row.iter().for_each(|x| v.extend_from_slice(&x.to_le_bytes()));
            batch.insert(&be2(version, self.db.generate_id()?), v);
        }
        (&self.site_features, &self.meta)
            .transaction(|(f, meta)| -> TxResult<()> {
                f.apply_batch(&batch)?;
                meta.insert(SITE_VERSION, &be(version))?;
                meta.insert(SITE_SEEN, &be(cells.seen + n as u64))?;
                Ok(())
            })
            .map_err(tx_error)?;
        let kept = keep_newest(&self.site_features, keep)?;
        Ok(SiteCells {
            model_version: version,
            seen: cells.seen + n as u64,
            kept,
        })
    }

    /// The site's cells kept for model `version` (none when they are another version's).
    pub fn site_cells(&self, version: u64) -> Result<SiteCells> {
        let _g = self.lock.lock().expect("store lock");
        let c = self.site_cells_unlocked(version)?;
        Ok(if c.model_version == version {
            c
        } else {
            SiteCells {
                model_version: version,
                ..Default::default()
            }
        })
    }

    fn site_cells_unlocked(&self, version: u64) -> Result<SiteCells> {
        let stored = match self.meta.get(SITE_VERSION)? {
            Some(v) => read_u64(&v)?,
            None => return Ok(SiteCells::default()),
        };
        if stored != version {
            return Ok(SiteCells {
                model_version: stored,
                ..Default::default()
            });
        }
        let seen = self
            .meta
            .get(SITE_SEEN)?
            .map(|v| read_u64(&v))
            .transpose()?
            .unwrap_or(0);
        Ok(SiteCells {
            model_version: version,
            seen,
            kept: self.site_features.len(),
        })
    }

    /// The kept features of model `version`'s cells, `width` values each, row after row
    /// (a damaged row is skipped).
    pub fn site_features(&self, version: u64, width: usize) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for r in self.site_features.scan_prefix(be(version)) {
            let (_, v) = r.context("reading the site's cells")?;
            if v.first() != Some(&ROW_VERSION) || v.len() != 1 + 4 * width {
                tracing::warn!("a damaged site cell record is not used");
                continue;
            }
            out.extend(
                v[1..]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))),
            );
        }
        Ok(out)
    }

    /// Keeps the pictures of newly classified cells (PNG, with the pixel size they were
    /// classified at) for model `version`, after [`Store::add_site_features`] has counted
    /// them: a window of the newest `keep`.
    pub fn add_site_pictures(&self, version: u64, pictures: &[(Vec<u8>, Option<f32>)], keep: usize) -> Result<()> {
        let _g = self.lock.lock().expect("store lock");
        let mut batch = sled::Batch::default();
        for (png, um) in pictures {
            let mut v = Vec::with_capacity(5 + png.len());
            v.push(PICTURE_VERSION);
            v.extend_from_slice(&um.unwrap_or(f32::NAN).to_le_bytes());
            v.extend_from_slice(png);
            batch.insert(&be2(version, self.db.generate_id()?), v);
        }
        self.site_pictures.apply_batch(batch)?;
        keep_newest(&self.site_pictures, keep)?;
        Ok(())
    }

    /// The kept pictures of model `version`'s site cells (PNG) and their pixel sizes, oldest
    /// first (a damaged record is skipped).
    pub fn site_pictures(&self, version: u64) -> Result<Vec<(Vec<u8>, Option<f32>)>> {
        let mut out = Vec::new();
        for r in self.site_pictures.scan_prefix(be(version)) {
            let (_, v) = r.context("reading the site's cell pictures")?;
            if v.first() != Some(&PICTURE_VERSION) || v.len() < 6 {
                tracing::warn!("a damaged site picture record is not used");
                continue;
            }
            let um = f32::from_le_bytes(v[1..5].try_into().expect("4 bytes"));
            out.push((v[5..].to_vec(), um.is_finite().then_some(um)));
        }
        Ok(out)
    }

    /// Keeps an adaptation (for its model version; the oldest versions' are dropped).
    pub fn put_adaptation(&self, a: &StoredAdaptation) -> Result<()> {
        self.adaptations.insert(be(a.adaptation.model_version), encode(a))?;
        while self.adaptations.len() > ADAPTATIONS_KEPT {
            let Some((k, _)) = self.adaptations.first()? else { break };
            self.adaptations.remove(k)?;
        }
        self.flush()
    }

    /// The adaptation fitted for model `version`, if any. A damaged one is dropped.
    pub fn adaptation(&self, version: u64) -> Result<Option<StoredAdaptation>> {
        let Some(v) = self.adaptations.get(be(version))? else {
            return Ok(None);
        };
        match decode::<StoredAdaptation>(&v, "site adaptation") {
            Ok(a) if a.adaptation.check(version).is_ok() => Ok(Some(a)),
            Ok(_) | Err(_) => {
                tracing::warn!(
                    model_version = version,
                    "the stored site adaptation is damaged; dropped"
                );
                self.adaptations.remove(be(version))?;
                Ok(None)
            }
        }
    }

    /// Forgets what was learnt of the site for model `version`: its adaptation and the cells
    /// kept (a new stain protocol, a moved microscope).
    pub fn reset_site(&self, version: u64) -> Result<()> {
        let _g = self.lock.lock().expect("store lock");
        self.adaptations.remove(be(version))?;
        self.site_features.clear()?;
        self.site_pictures.clear()?;
        self.meta.insert(SITE_VERSION, &be(version))?;
        self.meta.insert(SITE_SEEN, &be(0))?;
        self.flush()
    }
}

/// Drops the oldest records of a window (keys in the order they were added) beyond the
/// newest `keep`; returns how many are kept.
fn keep_newest(tree: &sled::Tree, keep: usize) -> Result<usize> {
    let mut kept = tree.len();
    while kept > keep {
        let Some((k, _)) = tree.first()? else {
            break;
        };
        tree.remove(k)?;
        kept -= 1;
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Retention;
    use crate::store::tests::identity;

    fn adaptation(version: u64) -> StoredAdaptation {
        StoredAdaptation {
            adaptation: Adaptation {
                units: None,
                model_version: version,
                cells: 30,
                class_mix: [0.0, 0.0, 0.3, 0.1, 0.6, 0.0],
                scale: vec![1.5; wbc_models::compact::mobilenet::FEATURES],
                shift: vec![-0.1; wbc_models::compact::mobilenet::FEATURES],
            },
            fitted_at: 7,
            seen_at_fit: 30,
        }
    }

    #[test]
    fn the_site_window_keeps_the_newest_cells_of_one_model_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), identity(), Retention::default()).unwrap();
        let rows = |from: usize, n: usize| -> Vec<f32> { (from..from + n).flat_map(|i| [i as f32, 0.5]).collect() };
        assert_eq!(store.site_cells(4).unwrap().seen, 0);
        store.add_site_features(4, &rows(0, 3), 2, 5).unwrap();
        let c = store.add_site_features(4, &rows(3, 4), 2, 5).unwrap();
        assert_eq!((c.seen, c.kept), (7, 5), "seven seen, the newest five kept");
        assert_eq!(store.site_features(4, 2).unwrap(), rows(2, 5));
        store.put_adaptation(&adaptation(4)).unwrap();
        drop(store);

        // Opened again as soon as sled lets go of it.
        let store = crate::store::tests::open(dir.path(), Retention::default());
        assert_eq!(store.site_cells(4).unwrap().seen, 7);
        assert_eq!(store.adaptation(4).unwrap(), Some(adaptation(4)));
        assert_eq!(store.adaptation(5).unwrap(), None);
        // Another model's features are another space: its cells start a new window, and the
        // first model's adaptation stays for a rollback.
        assert_eq!(store.site_cells(5).unwrap().seen, 0);
        let c = store.add_site_features(5, &rows(100, 2), 2, 5).unwrap();
        assert_eq!((c.seen, c.kept), (2, 2));
        assert_eq!(store.site_features(4, 2).unwrap(), Vec::<f32>::new());
        assert_eq!(store.site_features(5, 2).unwrap(), rows(100, 2));
        assert_eq!(store.site_cells(4).unwrap().seen, 0);
        assert!(store.adaptation(4).unwrap().is_some());

        store.reset_site(5).unwrap();
        assert_eq!(
            store.site_cells(5).unwrap(),
            SiteCells {
                model_version: 5,
                seen: 0,
                kept: 0
            }
        );
    }

    #[test]
    fn the_site_pictures_keep_a_window_go_with_their_model_and_skip_damaged_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), identity(), Retention::default()).unwrap();
        let pics = |from: u8, n: u8| -> Vec<(Vec<u8>, Option<f32>)> {
            (from..from + n)
                .map(|i| (vec![i; 3], (i % 2 == 0).then_some(0.1)))
                .collect()
        };
        store.add_site_features(4, &[0.0; 6], 2, 10).unwrap();
        store.add_site_pictures(4, &pics(0, 3), 2).unwrap();
        assert_eq!(store.site_pictures(4).unwrap(), pics(1, 2), "the newest two");
        // A damaged record is skipped, the others are read.
        store.site_pictures.insert(be2(4, u64::MAX), &b"\x09junk"[..]).unwrap();
        assert_eq!(store.site_pictures(4).unwrap(), pics(1, 2));
        // Another model starts over; a reset forgets them.
        store.add_site_features(5, &[0.0; 2], 2, 10).unwrap();
        assert!(store.site_pictures(4).unwrap().is_empty());
        store.add_site_pictures(5, &pics(7, 1), 2).unwrap();
        assert_eq!(store.site_pictures(5).unwrap(), pics(7, 1));
        store.reset_site(5).unwrap();
        assert!(store.site_pictures(5).unwrap().is_empty());
    }

    #[test]
    fn a_damaged_or_mismatched_adaptation_is_dropped_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), identity(), Retention::default()).unwrap();
        store.adaptations.insert(be(4), &b"\x01{not json"[..]).unwrap();
        assert_eq!(store.adaptation(4).unwrap(), None);
        assert!(store.adaptations.get(be(4)).unwrap().is_none(), "dropped");
        // Filed under version 6 but fitted for 4 (or cut short): never applied to 6.
        let mut wrong = adaptation(4);
        store.adaptations.insert(be(6), encode(&wrong)).unwrap();
        assert_eq!(store.adaptation(6).unwrap(), None);
        wrong.adaptation.model_version = 6;
        wrong.adaptation.scale.truncate(10);
        store.put_adaptation(&wrong).unwrap();
        assert_eq!(store.adaptation(6).unwrap(), None);
        // A damaged feature row is skipped; the others are read.
        store.add_site_features(6, &[1.0, 2.0, 3.0, 4.0], 2, 10).unwrap();
        store.site_features.insert(be2(6, u64::MAX), &b"\x01abc"[..]).unwrap();
        assert_eq!(store.site_features(6, 2).unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    }
}
