//! Reading central's database back: counts, devices, model events, slides (their
//! differential rebuilt from the cells received, reviews applied), one slide's cells, cell
//! pictures and results over time.

use super::{DayCount, Db, DeviceRow, ModelEventRow, SlideCell, SlideDetail, SlideRow, now};
use anyhow::Result;
use std::collections::BTreeMap;
use wbc_protocol::messages::{CellRecord, Review};
use wbc_protocol::slide::{Flag, ReviewPriority, SlideSettings, report, review_queue};
use wbc_protocol::uplink::{FieldInfo, ModelEvent};

/// A slide's fields as central holds them and, per field and cell, the cell's index in its
/// field (cells may be missing) and whether central holds its picture.
#[derive(Default)]
pub(super) struct SlideCells {
    fields: Vec<wbc_protocol::messages::FieldRecord>,
    at: Vec<Vec<(u32, bool)>>,
}

pub(super) fn unix_day(day: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(day * 86_400)
        .ok()
        .and_then(|d| {
            d.format(&time::macros::format_description!("[year]-[month]-[day]"))
                .ok()
        })
        .unwrap_or_else(|| day.to_string())
}

impl Db {
    fn count(&self, sql: &str) -> Result<u64> {
        let mut conn = self.conn.lock();
        Ok(conn.query(sql, &[])?[0][0].int()? as u64)
    }

    /// Messages refused so far.
    pub fn rejected_count(&self) -> Result<u64> {
        self.count("SELECT COUNT(*) FROM rejected")
    }

    /// Distinct messages stored.
    pub fn message_count(&self) -> Result<u64> {
        self.count("SELECT COUNT(*) FROM messages")
    }

    /// Every device, by clinic.
    pub fn devices(&self) -> Result<Vec<DeviceRow>> {
        let mut conn = self.conn.lock();
        conn.query(
            "SELECT clinic, device, state, backlog, model_version, last_seen FROM devices ORDER BY clinic, device",
            &[],
        )?
        .into_iter()
        .map(|r| {
            Ok(DeviceRow {
                clinic: r[0].text()?,
                device: r[1].text()?,
                state: r[2].text()?,
                backlog: r[3].opt_int()?.map(|v| v as u64),
                model_version: r[4].opt_int()?.map(|v| v as u64),
                last_seen: r[5].int()? as u64,
            })
        })
        .collect()
    }

    /// Model events, newest first, at most `limit`, of one clinic or all.
    pub fn model_events(&self, clinic: Option<&str>, limit: u32) -> Result<Vec<ModelEventRow>> {
        let mut conn = self.conn.lock();
        conn.query(
            "SELECT clinic, device, event, model_version, detail, at FROM model_events
             WHERE ($1 = '' OR clinic = $1) ORDER BY at DESC, message_id DESC LIMIT $2",
            &[clinic.unwrap_or("").into(), i64::from(limit).into()],
        )?
        .into_iter()
        .map(|r| {
            Ok(ModelEventRow {
                clinic: r[0].text()?,
                device: r[1].text()?,
                event: r[2].text()?.parse().unwrap_or(ModelEvent::Unknown),
                model_version: r[3].int()? as u64,
                detail: r[4].text()?,
                at: r[5].int()? as u64,
            })
        })
        .collect()
    }

    /// The cells central holds for one slide, as the fields they came in (reviews applied).
    pub fn slide_fields(
        &self,
        clinic: &str,
        device: &str,
        slide_id: &str,
    ) -> Result<Vec<wbc_protocol::messages::FieldRecord>> {
        Ok(self.indexed_slide_fields(clinic, device, slide_id)?.fields)
    }

    /// [`Db::slide_fields`], with each cell's index in its field and whether central holds its
    /// picture.
    fn indexed_slide_fields(&self, clinic: &str, device: &str, slide_id: &str) -> Result<SlideCells> {
        let rows = self.conn.lock().query(
            "SELECT c.field_id, c.idx, c.field_json, c.cell_json, r.review_json,
                    CASE WHEN p.idx IS NULL THEN 0 ELSE 1 END
             FROM cells c
             LEFT JOIN reviews r ON r.clinic = c.clinic AND r.device = c.device AND r.field_id = c.field_id
                                 AND r.idx = c.idx
             LEFT JOIN cell_pictures p ON p.clinic = c.clinic AND p.device = c.device AND p.field_id = c.field_id
                                 AND p.idx = c.idx
             WHERE c.clinic = $1 AND c.device = $2 AND c.slide_id = $3
             ORDER BY c.received_at, c.field_id, c.idx",
            &[clinic.into(), device.into(), slide_id.into()],
        )?;
        let mut s = SlideCells::default();
        for r in rows {
            let field_id = r[0].text()?;
            let parsed = (|| -> Result<(FieldInfo, CellRecord)> {
                let info: FieldInfo = serde_json::from_str(&r[2].text()?)?;
                let mut cell: CellRecord = serde_json::from_str(&r[3].text()?)?;
                if let Some(rj) = r[4].opt_text()? {
                    cell.review = Some(serde_json::from_str::<Review>(&rj)?);
                }
                Ok((info, cell))
            })();
            // One damaged row must not hide the slide.
            let (info, cell) = match parsed {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), field = %field_id, "skipping a damaged cell row");
                    continue;
                }
            };
            let at = (r[1].int()? as u32, r[5].int()? == 1);
            match (s.fields.last_mut(), s.at.last_mut()) {
                (Some(f), Some(idx)) if f.id == field_id => {
                    f.cells.push(cell);
                    idx.push(at);
                }
                _ => {
                    s.fields.push(info.to_record(vec![cell]));
                    s.at.push(vec![at]);
                }
            }
        }
        Ok(s)
    }

    /// The JPEG of a cell's picture, where central holds one.
    pub fn cell_picture(&self, clinic: &str, device: &str, field_id: &str, idx: u32) -> Result<Option<Vec<u8>>> {
        let rows = self.conn.lock().query(
            "SELECT jpeg_base64 FROM cell_pictures WHERE clinic = $1 AND device = $2 AND field_id = $3 AND idx = $4",
            &[clinic.into(), device.into(), field_id.into(), idx.into()],
        )?;
        let Some(r) = rows.first() else {
            return Ok(None);
        };
        Ok(wbc_protocol::uplink::decode_picture(&r[0].text()?))
    }

    /// One slide with every cell central holds of it (reviews applied), the cells waiting for
    /// review first ([`review_queue`]: blasts, then possible blasts, then other cells set
    /// aside), then the rest in the order they came. `None` for a slide central never heard of.
    pub fn slide(&self, clinic: &str, device: &str, slide_id: &str) -> Result<Option<SlideDetail>> {
        let Some((row, SlideCells { fields, at })) = self.slide_row(clinic, device, slide_id)? else {
            return Ok(None);
        };
        let cell = |fi: usize, ci: usize, waiting: Option<ReviewPriority>| {
            let f = &fields[fi];
            let (index, picture) = at[fi][ci];
            SlideCell {
                field_id: f.id.clone(),
                field_name: f.name.clone(),
                received_at: f.received_at,
                index,
                picture,
                waiting: waiting.map(|p| match p {
                    ReviewPriority::Blast => "blast",
                    ReviewPriority::PossibleBlast => "possible_blast",
                    ReviewPriority::Other => "set_aside",
                }),
                cell: f.cells[ci].clone(),
            }
        };
        let queue = review_queue(&fields);
        let queued: std::collections::HashSet<(usize, usize)> = queue.iter().map(|&(_, fi, ci)| (fi, ci)).collect();
        let mut cells: Vec<SlideCell> = queue.iter().map(|&(p, fi, ci)| cell(fi, ci, Some(p))).collect();
        for (fi, f) in fields.iter().enumerate() {
            for ci in (0..f.cells.len()).filter(|ci| !queued.contains(&(fi, *ci))) {
                cells.push(cell(fi, ci, None));
            }
        }
        Ok(Some(SlideDetail { slide: row, cells }))
    }

    /// One slide with the fields it is counted from, read by its key alone (its cells through
    /// the `cells_slide` index). `None` for a slide central never heard of.
    pub(super) fn slide_row(
        &self,
        clinic: &str,
        device: &str,
        slide_id: &str,
    ) -> Result<Option<(SlideRow, SlideCells)>> {
        let key = [clinic.into(), device.into(), slide_id.into()];
        let (known, started, first_cell) = {
            let mut conn = self.conn.lock();
            let known = conn.query(
                "SELECT started_at, finished_at FROM slides WHERE clinic = $1 AND device = $2 AND slide_id = $3",
                &key,
            )?;
            let first = conn.query(
                "SELECT MIN(received_at), COUNT(*) FROM cells WHERE clinic = $1 AND device = $2 AND slide_id = $3",
                &key,
            )?;
            let cells = first.first().map(|r| r[1].int()).transpose()?.unwrap_or(0);
            let first_cell = match first.first() {
                Some(r) if cells > 0 => Some(r[0].int()?),
                _ => None,
            };
            let started = known.first().map(|r| r[0].int()).transpose()?;
            let finished = known.first().map(|r| r[1].opt_int()).transpose()?.flatten();
            (known.first().map(|_| finished), started, first_cell)
        };
        if known.is_none() && first_cell.is_none() {
            return Ok(None);
        }
        let finished = known.flatten();
        let cells = self.indexed_slide_fields(clinic, device, slide_id)?;
        let report = report(slide_id, &cells.fields, &SlideSettings::default(), finished.is_some());
        let row = SlideRow {
            blast: report.flags.iter().any(|f| f.urgent()),
            possible_blast: report.flags.iter().any(|f| matches!(f, Flag::PossibleBlast { .. })),
            clinic: clinic.into(),
            device: device.into(),
            started_at: started.or(first_cell).unwrap_or(0) as u64,
            finished_at: finished.map(|t| t as u64),
            report,
        };
        Ok(Some((row, cells)))
    }

    /// Cells per day (UTC) and class over the last `days` days.
    pub fn results_over_time(&self, clinic: Option<&str>, days: u32) -> Result<Vec<DayCount>> {
        let since = now().saturating_sub(u64::from(days) * 86_400);
        self.conn
            .lock()
            .query(
                "SELECT received_at / 86400 AS day, class, COUNT(*) FROM cells
                 WHERE received_at >= $1 AND (CAST($2 AS TEXT) IS NULL OR clinic = $2)
                 GROUP BY day, class ORDER BY day, class",
                &[since.into(), clinic.into()],
            )?
            .into_iter()
            .map(|r| {
                Ok(DayCount {
                    day: unix_day(r[0].int()?),
                    class: r[1].text()?,
                    count: r[2].int()? as u64,
                })
            })
            .collect()
    }

    /// Cells held per (clinic, device, slide), for checks.
    pub fn cell_counts(&self) -> Result<BTreeMap<(String, String, String), u64>> {
        self.conn
            .lock()
            .query(
                "SELECT clinic, device, slide_id, COUNT(*) FROM cells GROUP BY clinic, device, slide_id",
                &[],
            )?
            .into_iter()
            .map(|r| Ok(((r[0].text()?, r[1].text()?, r[2].text()?), r[3].int()? as u64)))
            .collect()
    }
}
