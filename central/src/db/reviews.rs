//! The cells a clinic's technicians reviewed, with the picture each was reviewed on: the
//! clinic's teaching material for `trainer adapt` (`central export-reviews`).

use super::Db;
use anyhow::{Context, Result};
use wbc_protocol::classes::CellClass;
use wbc_protocol::messages::Review;

/// One reviewed cell with its picture.
#[derive(Debug, Clone, PartialEq)]
pub struct ReviewedCell {
    /// Device id.
    pub device: String,
    /// Field id.
    pub field_id: String,
    /// The cell's position in its field.
    pub index: u32,
    /// The technician's class.
    pub class: CellClass,
    /// What the model said (`None` when central never received the cell itself).
    pub model_class: Option<String>,
    /// Who reviewed it.
    pub by: String,
    /// When, seconds since the Unix epoch.
    pub at: u64,
    /// The picture the technician saw (JPEG).
    pub jpeg: Vec<u8>,
}

/// Where a page of [`Db::reviewed_cells`] ends: the next page starts after it.
pub type ReviewKey = (String, String, u32);

impl Db {
    /// Up to `limit` reviewed cells of `clinic` that name a class and came with their picture,
    /// in (device, field, index) order after `after` (a page at a time, so that a clinic's
    /// years of pictures are never held at once), and where the next page starts (`None`
    /// after the last).
    pub fn reviewed_cells(
        &self,
        clinic: &str,
        after: Option<&ReviewKey>,
        limit: usize,
    ) -> Result<(Vec<ReviewedCell>, Option<ReviewKey>)> {
        let (d, f, i) = after.cloned().unwrap_or_default();
        let rows = self.conn.lock().query(
            "SELECT r.device, r.field_id, r.idx, r.review_json, p.jpeg_base64, c.class
             FROM reviews r
             JOIN review_pictures p
               ON p.clinic = r.clinic AND p.device = r.device AND p.field_id = r.field_id AND p.idx = r.idx
             LEFT JOIN cells c
               ON c.clinic = r.clinic AND c.device = r.device AND c.field_id = r.field_id AND c.idx = r.idx
             WHERE r.clinic = $1 AND (r.device > $2 OR (r.device = $2 AND (r.field_id > $3 OR (r.field_id = $3 AND r.idx > $4))))
             ORDER BY r.device, r.field_id, r.idx LIMIT $5",
            &[
                clinic.into(),
                d.into(),
                f.into(),
                if after.is_some() { i64::from(i) } else { -1 }.into(),
                (limit as u64).into(),
            ],
        )?;
        let next = match rows.last() {
            Some(r) if rows.len() == limit => Some((r[0].text()?, r[1].text()?, r[2].int()? as u32)),
            _ => None,
        };
        let mut out = Vec::new();
        for r in rows {
            let review: Review = serde_json::from_str(&r[3].text()?).context("a stored review")?;
            let Some(class) = review.class else { continue };
            let Some(jpeg) = wbc_protocol::uplink::decode_picture(&r[4].text()?) else {
                continue;
            };
            out.push(ReviewedCell {
                device: r[0].text()?,
                field_id: r[1].text()?,
                index: r[2].int()? as u32,
                class,
                model_class: r[5].opt_text()?,
                by: review.by,
                at: review.at,
                jpeg,
            });
        }
        Ok((out, next))
    }

    /// Reviews of `clinic` central holds, with a picture or not, naming a class or not.
    pub fn review_count(&self, clinic: &str) -> Result<u64> {
        let rows = self
            .conn
            .lock()
            .query("SELECT COUNT(*) FROM reviews WHERE clinic = $1", &[clinic.into()])?;
        Ok(rows[0][0].int()? as u64)
    }
}
