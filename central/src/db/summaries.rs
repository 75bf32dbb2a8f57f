//! What keeps the dashboard and the slide list fast however long the history: a summary row
//! per slide (`slide_summaries`: its times, its flags, its report), marked when a message
//! changes the slide and recomputed from that slide's cells alone when next read; pages of
//! slides read in the index's order. And retention: message ids and rejected messages past
//! their age are removed.

use super::{Db, SlideRow};
use crate::sql::{Conn, Val};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use wbc_protocol::slide::SlideReport;

/// How long central keeps what only serves the ingest (`[retention]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    /// Message ids (what makes a resend a duplicate) are kept this many days. Results,
    /// reviews and slides are kept: storing them is idempotent, so a resend older than this
    /// changes nothing either.
    pub message_ids_days: u32,
    /// Rejected messages (kept for a maintainer) are kept this many days.
    pub rejected_days: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            message_ids_days: 90,
            rejected_days: 30,
        }
    }
}

/// What one retention pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Message ids.
    pub message_ids: u64,
    /// Rejected messages.
    pub rejected: u64,
}

/// The most slides one page lists.
pub const MAX_PAGE: u32 = 1000;

impl Db {
    /// Marks a slide's summary as changed, inside the transaction that changes it.
    pub(super) fn mark_slide(c: &mut Conn, clinic: &str, device: &str, slide_id: &str) -> Result<()> {
        c.exec(
            "INSERT INTO slide_summaries (clinic, device, slide_id, started_at, finished_at, blast, possible_blast,
                                          report_json, dirty)
             VALUES ($1, $2, $3, 0, NULL, 0, 0, '', 1)
             ON CONFLICT (clinic, device, slide_id) DO UPDATE SET dirty = slide_summaries.dirty + 1",
            &[clinic.into(), device.into(), slide_id.into()],
        )?;
        Ok(())
    }

    /// Recomputes the summaries of the slides changed since they were last read; returns how
    /// many. A slide changed again meanwhile stays marked.
    pub fn refresh_summaries(&self) -> Result<usize> {
        let marked = self.conn.lock().query(
            "SELECT clinic, device, slide_id, dirty FROM slide_summaries WHERE dirty > 0",
            &[],
        )?;
        let mut done = 0;
        for r in marked {
            let (c, d, s, mark) = (r[0].text()?, r[1].text()?, r[2].text()?, r[3].int()?);
            let Some((row, _)) = self.slide_row(&c, &d, &s)? else {
                continue;
            };
            done += self.conn.lock().exec(
                "UPDATE slide_summaries SET started_at = $4, finished_at = $5, blast = $6, possible_blast = $7,
                                            report_json = $8, dirty = 0
                 WHERE clinic = $1 AND device = $2 AND slide_id = $3 AND dirty = $9",
                &[
                    c.into(),
                    d.into(),
                    s.into(),
                    row.started_at.into(),
                    row.finished_at.into(),
                    i64::from(row.blast).into(),
                    i64::from(row.possible_blast).into(),
                    serde_json::to_string(&row.report)?.into(),
                    mark.into(),
                ],
            )? as usize;
        }
        Ok(done)
    }

    /// A page of slides (of a clinic, or of all with `None`): blasts first, then slides with
    /// possible blasts waiting, then newest first; at most `limit` ([`MAX_PAGE`]) from
    /// `offset` on. Its cost grows with the page and with the slides changed since the last
    /// read, not with the history.
    pub fn slides_page(&self, clinic: Option<&str>, limit: u32, offset: u64) -> Result<Vec<SlideRow>> {
        self.refresh_summaries()?;
        self.read_summaries(clinic, i64::from(limit.min(MAX_PAGE)), offset)
    }

    /// Every slide (of a clinic, or of all), in the order of [`Db::slides_page`].
    pub fn slides(&self, clinic: Option<&str>) -> Result<Vec<SlideRow>> {
        self.refresh_summaries()?;
        self.read_summaries(clinic, i64::MAX, 0)
    }

    fn read_summaries(&self, clinic: Option<&str>, limit: i64, offset: u64) -> Result<Vec<SlideRow>> {
        // Two statements, so that each has its index (an `OR` on the clinic would have none).
        const COLUMNS: &str = "SELECT clinic, device, started_at, finished_at, blast, possible_blast, report_json
             FROM slide_summaries";
        const ORDER: &str = "ORDER BY blast DESC, possible_blast DESC, started_at DESC, clinic, device, slide_id";
        let (limit, offset): (Val, Val) = (limit.into(), offset.min(i64::MAX as u64).into());
        let rows = match clinic {
            Some(c) => self.conn.lock().query(
                &format!("{COLUMNS} WHERE clinic = $1 {ORDER} LIMIT $2 OFFSET $3"),
                &[c.into(), limit, offset],
            )?,
            None => self
                .conn
                .lock()
                .query(&format!("{COLUMNS} {ORDER} LIMIT $1 OFFSET $2"), &[limit, offset])?,
        };
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let report: SlideReport = match serde_json::from_str(&r[6].text()?) {
                Ok(rep) => rep,
                Err(e) => {
                    tracing::error!(error = %e, clinic = %r[0].text()?, "skipping a damaged slide summary");
                    continue;
                }
            };
            out.push(SlideRow {
                clinic: r[0].text()?,
                device: r[1].text()?,
                started_at: r[2].int()? as u64,
                finished_at: r[3].opt_int()?.map(|t| t as u64),
                blast: r[4].int()? != 0,
                possible_blast: r[5].int()? != 0,
                report,
            });
        }
        Ok(out)
    }

    /// One retention pass at time `now`.
    pub fn prune(&self, now: u64, r: &Retention) -> Result<Pruned> {
        let cutoff = |days: u32| now.saturating_sub(u64::from(days) * 86_400);
        let mut conn = self.conn.lock();
        let p = Pruned {
            message_ids: conn.exec(
                "DELETE FROM messages WHERE received_at < $1",
                &[cutoff(r.message_ids_days).into()],
            )?,
            rejected: conn.exec("DELETE FROM rejected WHERE at < $1", &[cutoff(r.rejected_days).into()])?,
        };
        if p != Pruned::default() {
            tracing::info!(
                message_ids = p.message_ids,
                rejected = p.rejected,
                "central retention pass"
            );
        }
        Ok(p)
    }
}
