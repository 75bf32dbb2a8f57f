//! Retention: original images go by age and by a byte limit (the oldest first), results by
//! age once central has them all (an undelivered field stays, whatever its age), and new work
//! is refused while the disk is below its free-space floor.

use super::{Store, be, be2, decode, read_u64, tx_error};
use anyhow::{Context, Result, bail};
use sled::Transactional;
use wbc_protocol::messages::FieldRecord;

/// What a retention pass removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Original images removed.
    pub images: u64,
    /// Delivered fields (with their cells and reviews) removed.
    pub fields: u64,
}

impl Store {
    /// Free bytes on the store's file system.
    pub fn free_bytes(&self) -> Result<u64> {
        let s =
            rustix::fs::statvfs(&self.dir).with_context(|| format!("checking free space of {}", self.dir.display()))?;
        Ok(s.f_bavail.saturating_mul(s.f_frsize))
    }

    /// Refuses new work when the disk is nearly full.
    pub fn check_space(&self) -> Result<()> {
        let free = self.free_bytes()?;
        if free < self.retention.min_free_bytes {
            bail!(
                "the disk is nearly full ({} MB free, {} MB are kept free): new fields are refused until space is \
                 freed; everything already stored is intact",
                free >> 20,
                self.retention.min_free_bytes >> 20
            );
        }
        Ok(())
    }

    fn remove_image(&self, seq: u64) -> Result<()> {
        (&self.images, &self.image_meta)
            .transaction(|(i, m)| {
                i.remove(&be(seq))?;
                m.remove(&be(seq))?;
                Ok(())
            })
            .map_err(tx_error)
    }

    /// Removes the oldest images until the total is within the limit.
    pub(super) fn enforce_image_quota(&self) -> Result<u64> {
        let mut metas = Vec::new();
        let mut total = 0u64;
        for r in self.image_meta.iter() {
            let (k, v) = r?;
            let (at, len) = (read_u64(&v)?, read_u64(&v[8..])?);
            total += len;
            metas.push((at, read_u64(&k)?, len));
        }
        metas.sort();
        let mut removed = 0;
        for (_, seq, len) in metas {
            if total <= self.retention.max_image_bytes {
                break;
            }
            self.remove_image(seq)?;
            total -= len;
            removed += 1;
        }
        if removed > 0 {
            tracing::info!(removed, "original images removed by the byte limit");
        }
        Ok(removed)
    }

    /// One retention pass at time `now`: images past their age or over the byte limit, and
    /// delivered results past their age. Undelivered results stay, whatever their age.
    pub fn prune(&self, now: u64) -> Result<Pruned> {
        let day = 86_400u64;
        let mut p = Pruned::default();
        if self.retention.image_max_age_days > 0 {
            let cutoff = now.saturating_sub(u64::from(self.retention.image_max_age_days) * day);
            for r in self.image_meta.iter() {
                let (k, v) = r?;
                if read_u64(&v)? < cutoff {
                    self.remove_image(read_u64(&k)?)?;
                    p.images += 1;
                }
            }
        }
        p.images += self.enforce_image_quota()?;
        if self.retention.result_max_age_days > 0 {
            let cutoff = now.saturating_sub(u64::from(self.retention.result_max_age_days) * day);
            let _g = self.lock.lock().expect("store lock");
            let pending = self.undelivered_fields()?;
            let mut kept_undelivered = 0u64;
            for r in self.fields.iter() {
                let (k, v) = r?;
                let seq = read_u64(&k)?;
                let f: FieldRecord = match decode(&v, "field") {
                    Ok(f) => f,
                    Err(_) => continue,
                };
                if f.received_at >= cutoff {
                    continue;
                }
                if pending.contains(&seq) {
                    kept_undelivered += 1;
                    continue;
                }
                self.remove_field(seq, &f)?;
                p.fields += 1;
            }
            if kept_undelivered > 0 {
                tracing::warn!(kept_undelivered, "old fields kept: central has not received them yet");
            }
        }
        self.flush()?;
        if p != Pruned::default() {
            tracing::info!(images = p.images, fields = p.fields, "retention pass");
        }
        Ok(p)
    }

    fn remove_field(&self, seq: u64, f: &FieldRecord) -> Result<()> {
        let slide = self.slide_seq(&f.slide_id)?;
        let review_keys: Vec<_> = self.reviews.scan_prefix(be(seq)).keys().collect::<Result<_, _>>()?;
        (
            &self.fields,
            &self.field_ids,
            &self.slide_fields,
            &self.reviews,
            &self.images,
            &self.image_meta,
            &self.pictures,
        )
            .transaction(|(fields, ids, slide_fields, reviews, images, image_meta, pictures)| {
                fields.remove(&be(seq))?;
                ids.remove(f.id.as_bytes())?;
                if let Some(s) = slide {
                    slide_fields.remove(&be2(s, seq))?;
                }
                for k in &review_keys {
                    reviews.remove(k)?;
                }
                images.remove(&be(seq))?;
                image_meta.remove(&be(seq))?;
                for i in 0..f.cells.len() {
                    pictures.remove(&super::cell_key(seq, i))?;
                }
                Ok(())
            })
            .map_err(tx_error)
    }
}
