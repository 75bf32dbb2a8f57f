//! Central's store: embedded SQLite (one file, nothing to install) or, for a lab that
//! outgrows one machine, PostgreSQL (`db = "postgres://…"`, feature `postgres`).
//!
//! Each message is applied in one transaction together with its id in `messages`, so a
//! message seen twice (the uplink resends what it is not sure was received) changes nothing
//! the second time, and a crash leaves a message either wholly applied or not at all. The
//! broker's acknowledgement to central is sent only after the commit.

use crate::sql::Conn;
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use wbc_shared::messages::{CellRecord, Review};
use wbc_shared::slide::{Flag, ReviewPriority, SlideReport, SlideSettings, report, review_queue};
use wbc_shared::uplink::{Body, CellMessage, DeviceState, Envelope, FieldInfo, Status};

/// Schema version of the database.
const DB_VERSION: i64 = 1;

// Written in the SQL both SQLite and PostgreSQL accept (BIGINT is an integer in SQLite).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY, clinic TEXT NOT NULL, device TEXT NOT NULL, seq BIGINT NOT NULL,
    kind TEXT NOT NULL, sent_at BIGINT NOT NULL, received_at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS cells (
    clinic TEXT NOT NULL, device TEXT NOT NULL, field_id TEXT NOT NULL, idx BIGINT NOT NULL,
    slide_id TEXT NOT NULL, received_at BIGINT NOT NULL, class TEXT NOT NULL,
    field_json TEXT NOT NULL, cell_json TEXT NOT NULL, message_id TEXT NOT NULL,
    PRIMARY KEY (clinic, device, field_id, idx));
CREATE INDEX IF NOT EXISTS cells_slide ON cells (clinic, device, slide_id);
CREATE TABLE IF NOT EXISTS reviews (
    clinic TEXT NOT NULL, device TEXT NOT NULL, field_id TEXT NOT NULL, idx BIGINT NOT NULL,
    review_json TEXT NOT NULL, at BIGINT NOT NULL,
    PRIMARY KEY (clinic, device, field_id, idx));
CREATE TABLE IF NOT EXISTS slides (
    clinic TEXT NOT NULL, device TEXT NOT NULL, slide_id TEXT NOT NULL,
    started_at BIGINT NOT NULL, finished_at BIGINT, report_json TEXT NOT NULL,
    PRIMARY KEY (clinic, device, slide_id));
CREATE TABLE IF NOT EXISTS devices (
    clinic TEXT NOT NULL, device TEXT NOT NULL, state TEXT NOT NULL, at BIGINT NOT NULL,
    backlog BIGINT, model_version BIGINT, last_seen BIGINT NOT NULL,
    PRIMARY KEY (clinic, device));
CREATE TABLE IF NOT EXISTS model_events (
    message_id TEXT PRIMARY KEY, clinic TEXT NOT NULL, device TEXT NOT NULL, event TEXT NOT NULL,
    model_version BIGINT NOT NULL, detail TEXT NOT NULL, at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS rejected (topic TEXT NOT NULL, reason TEXT NOT NULL, at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS cell_pictures (
    clinic TEXT NOT NULL, device TEXT NOT NULL, field_id TEXT NOT NULL, idx BIGINT NOT NULL,
    jpeg_base64 TEXT NOT NULL,
    PRIMARY KEY (clinic, device, field_id, idx));
";

/// The JPEG of a cell message's picture when it is one central keeps: valid base64, within
/// [`MAX_PICTURE_BYTES`](wbc_shared::uplink::MAX_PICTURE_BYTES), and a JPEG that decodes to at
/// most 512 pixels across. Anything else is dropped (the cell is kept without it).
fn valid_picture(m: &CellMessage) -> Option<Vec<u8>> {
    let jpeg = m.picture_jpeg()?;
    let limits = wbc_shared::image::DecodeLimits {
        max_bytes: wbc_shared::uplink::MAX_PICTURE_BYTES as u64,
        max_side: 512,
        max_alloc: 4 << 20,
    };
    match wbc_shared::image::decode_rgb(&jpeg, &limits) {
        Ok(_) => Some(jpeg),
        Err(e) => {
            tracing::warn!(error = %e, field = %m.field.id, index = m.index, "dropping a cell picture that does not decode");
            None
        }
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What became of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// First time seen: stored.
    New,
    /// Seen before: nothing changed.
    Duplicate,
}

/// A device as central last heard of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceRow {
    /// Clinic id.
    pub clinic: String,
    /// Device id.
    pub device: String,
    /// `online`, `offline`, or `unknown` (results seen, no status yet).
    pub state: String,
    /// Outbox backlog the device last reported.
    pub backlog: Option<u64>,
    /// Active model version it last reported.
    pub model_version: Option<u64>,
    /// Last message of any kind, seconds since the Unix epoch.
    pub last_seen: u64,
}

/// A model event a device reported (an update downloaded, verified, refused, active, rolled
/// back, ...).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelEventRow {
    /// Clinic id.
    pub clinic: String,
    /// Device id.
    pub device: String,
    /// What happened.
    pub event: String,
    /// Model version concerned.
    pub model_version: u64,
    /// Details (the reason of a refusal or rollback).
    pub detail: String,
    /// When, on the device, seconds since the Unix epoch.
    pub at: u64,
}

/// A slide as central knows it: its differential computed from the cells received.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SlideRow {
    /// Clinic id.
    pub clinic: String,
    /// Device id.
    pub device: String,
    /// When the slide was started (earliest field where no slide report came yet).
    pub started_at: u64,
    /// When it was finished, if the device said so.
    pub finished_at: Option<u64>,
    /// Whether any blast is counted (urgent).
    pub blast: bool,
    /// Whether cells wait for review as possible blasts (listed after the blasts).
    pub possible_blast: bool,
    /// The differential and flags.
    pub report: SlideReport,
}

impl SlideRow {
    /// `finished` or `in progress`, in words.
    pub fn state(&self) -> &'static str {
        if self.finished_at.is_some() {
            "finished"
        } else {
            "in progress"
        }
    }
}

/// A slide's fields as central holds them and, per field and cell, the cell's index in its
/// field (cells may be missing) and whether central holds its picture.
#[derive(Default)]
struct SlideCells {
    fields: Vec<wbc_shared::messages::FieldRecord>,
    at: Vec<Vec<(u32, bool)>>,
}

/// One cell of a slide, for the lab's review.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SlideCell {
    /// Its field's id.
    pub field_id: String,
    /// Its field's file name, where it had one.
    pub field_name: String,
    /// When the appliance received the field.
    pub received_at: u64,
    /// Its index among its field's cells.
    pub index: u32,
    /// Why it waits for review, if it does: `blast`, `possible_blast`, `set_aside`.
    pub waiting: Option<&'static str>,
    /// Whether central holds its picture (`/cell-picture`).
    pub picture: bool,
    /// The model's answer and the technician's review.
    pub cell: CellRecord,
}

/// A slide with its cells.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SlideDetail {
    /// The slide, as the list shows it.
    pub slide: SlideRow,
    /// Its cells, those waiting for review first.
    pub cells: Vec<SlideCell>,
}

/// Counts of one class on one day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DayCount {
    /// `YYYY-MM-DD` (UTC).
    pub day: String,
    /// Class name, or `Unidentified`.
    pub class: String,
    /// Cells.
    pub count: u64,
}

/// Central's database.
pub struct Db {
    conn: Mutex<Conn>,
}

fn unix_day(day: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(day * 86_400)
        .ok()
        .and_then(|d| {
            d.format(&time::macros::format_description!("[year]-[month]-[day]"))
                .ok()
        })
        .unwrap_or_else(|| day.to_string())
}

impl Db {
    /// Opens (creating) the database: an SQLite file (`:memory:` for a throwaway one) or, in a
    /// build with the `postgres` feature, a `postgres://` URL.
    pub fn open(db: &Path) -> Result<Self> {
        let name = db.to_string_lossy();
        let mut conn = Conn::open(&name)?;
        conn.batch(SCHEMA).context("creating the schema")?;
        let v = conn.query("SELECT value FROM meta WHERE key = 'db_version'", &[])?;
        match v.first() {
            None => {
                conn.exec(
                    "INSERT INTO meta (key, value) VALUES ('db_version', $1)",
                    &[DB_VERSION.into()],
                )?;
            }
            Some(r) if r[0].int()? == DB_VERSION => {}
            Some(r) => anyhow::bail!(
                "{} is database version {}; this build knows {DB_VERSION}",
                display(&name),
                r[0].int()?
            ),
        }
        Ok(Db { conn: Mutex::new(conn) })
    }

    fn touch_device(c: &mut Conn, clinic: &str, device: &str) -> Result<()> {
        c.exec(
            "INSERT INTO devices (clinic, device, state, at, last_seen) VALUES ($1, $2, 'unknown', 0, $3)
             ON CONFLICT (clinic, device) DO UPDATE SET last_seen = excluded.last_seen",
            &[clinic.into(), device.into(), now().into()],
        )?;
        Ok(())
    }

    /// Applies a validated message once.
    pub fn apply(&self, e: &Envelope) -> Result<Applied> {
        let mut conn = self.conn.lock().expect("db lock");
        conn.transaction(|c| {
            let fresh = c.exec(
                "INSERT INTO messages (id, clinic, device, seq, kind, sent_at, received_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
                &[
                    (&e.id).into(),
                    (&e.clinic).into(),
                    (&e.device).into(),
                    e.seq.into(),
                    e.body.kind().as_str().into(),
                    e.at.into(),
                    now().into(),
                ],
            )?;
            if fresh == 0 {
                return Ok(Applied::Duplicate);
            }
            Self::touch_device(c, &e.clinic, &e.device)?;
            match &e.body {
                Body::Cell(m) => {
                    c.exec(
                        "INSERT INTO cells (clinic, device, field_id, idx, slide_id, received_at, class, field_json,
                                            cell_json, message_id)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                         ON CONFLICT (clinic, device, field_id, idx) DO UPDATE SET
                           slide_id = excluded.slide_id, class = excluded.class, field_json = excluded.field_json,
                           cell_json = excluded.cell_json, message_id = excluded.message_id",
                        &[
                            (&e.clinic).into(),
                            (&e.device).into(),
                            (&m.field.id).into(),
                            m.index.into(),
                            (&m.field.slide_id).into(),
                            m.field.received_at.into(),
                            m.cell.result.class_name().into(),
                            serde_json::to_string(&m.field)?.into(),
                            serde_json::to_string(&m.cell)?.into(),
                            (&e.id).into(),
                        ],
                    )?;
                    let key = [
                        (&e.clinic).into(),
                        (&e.device).into(),
                        (&m.field.id).into(),
                        m.index.into(),
                    ];
                    match valid_picture(m) {
                        Some(jpeg) => c.exec(
                            "INSERT INTO cell_pictures (clinic, device, field_id, idx, jpeg_base64)
                             VALUES ($1, $2, $3, $4, $5)
                             ON CONFLICT (clinic, device, field_id, idx) DO UPDATE SET jpeg_base64 = excluded.jpeg_base64",
                            &[key.as_slice(), &[CellMessage::encode_picture(&jpeg).into()]].concat(),
                        )?,
                        // A cell sent anew without a (usable) picture keeps none of an old one.
                        None => c.exec(
                            "DELETE FROM cell_pictures WHERE clinic = $1 AND device = $2 AND field_id = $3 AND idx = $4",
                            &key,
                        )?,
                    };
                }
                Body::Review(r) => {
                    c.exec(
                        "INSERT INTO reviews (clinic, device, field_id, idx, review_json, at) VALUES ($1, $2, $3, $4, $5, $6)
                         ON CONFLICT (clinic, device, field_id, idx) DO UPDATE SET
                           review_json = excluded.review_json, at = excluded.at WHERE excluded.at >= reviews.at",
                        &[
                            (&e.clinic).into(),
                            (&e.device).into(),
                            (&r.field_id).into(),
                            r.index.into(),
                            serde_json::to_string(&r.review)?.into(),
                            r.review.at.into(),
                        ],
                    )?;
                }
                Body::Slide(m) => {
                    c.exec(
                        "INSERT INTO slides (clinic, device, slide_id, started_at, finished_at, report_json)
                         VALUES ($1, $2, $3, $4, $5, $6)
                         ON CONFLICT (clinic, device, slide_id) DO UPDATE SET
                           started_at = excluded.started_at,
                           finished_at = COALESCE(excluded.finished_at, slides.finished_at),
                           report_json = excluded.report_json",
                        &[
                            (&e.clinic).into(),
                            (&e.device).into(),
                            (&m.report.slide_id).into(),
                            m.started_at.into(),
                            m.finished_at.into(),
                            serde_json::to_string(&m.report)?.into(),
                        ],
                    )?;
                }
                Body::Model(m) => {
                    c.exec(
                        "INSERT INTO model_events (message_id, clinic, device, event, model_version, detail, at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (message_id) DO NOTHING",
                        &[
                            (&e.id).into(),
                            (&e.clinic).into(),
                            (&e.device).into(),
                            (&m.event).into(),
                            m.model_version.into(),
                            (&m.detail).into(),
                            e.at.into(),
                        ],
                    )?;
                    if m.event == "active" {
                        c.exec(
                            "UPDATE devices SET model_version = $1 WHERE clinic = $2 AND device = $3",
                            &[m.model_version.into(), (&e.clinic).into(), (&e.device).into()],
                        )?;
                    }
                }
            }
            Ok(Applied::New)
        })
    }

    /// Records a device's status. The last one to arrive wins: the broker delivers a device's
    /// messages in order and publishes its last will after them (the will's `at` is when the
    /// connection began, so times cannot be compared).
    pub fn set_status(&self, s: &Status) -> Result<()> {
        let mut conn = self.conn.lock().expect("db lock");
        conn.transaction(|c| {
            Self::touch_device(c, &s.clinic, &s.device)?;
            let state = match s.state {
                DeviceState::Online => "online",
                DeviceState::Offline => "offline",
            };
            c.exec(
                "UPDATE devices SET state = $1, at = $2, backlog = COALESCE($3, backlog),
                        model_version = COALESCE($4, model_version)
                 WHERE clinic = $5 AND device = $6",
                &[
                    state.into(),
                    s.at.into(),
                    s.backlog.into(),
                    s.model_version.into(),
                    (&s.clinic).into(),
                    (&s.device).into(),
                ],
            )?;
            Ok(())
        })
    }

    /// Keeps a refused message's topic and reason (for the lab to see what devices send wrong).
    pub fn note_rejected(&self, topic: &str, reason: &str) -> Result<()> {
        let mut conn = self.conn.lock().expect("db lock");
        conn.exec(
            "INSERT INTO rejected (topic, reason, at) VALUES ($1, $2, $3)",
            &[
                topic.chars().take(300).collect::<String>().into(),
                reason.chars().take(500).collect::<String>().into(),
                now().into(),
            ],
        )?;
        Ok(())
    }

    fn count(&self, sql: &str) -> Result<u64> {
        let mut conn = self.conn.lock().expect("db lock");
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
        let mut conn = self.conn.lock().expect("db lock");
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
        let mut conn = self.conn.lock().expect("db lock");
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
                event: r[2].text()?,
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
    ) -> Result<Vec<wbc_shared::messages::FieldRecord>> {
        Ok(self.indexed_slide_fields(clinic, device, slide_id)?.fields)
    }

    /// [`Db::slide_fields`], with each cell's index in its field and whether central holds its
    /// picture.
    fn indexed_slide_fields(&self, clinic: &str, device: &str, slide_id: &str) -> Result<SlideCells> {
        let rows = self.conn.lock().expect("db lock").query(
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
        let rows = self.conn.lock().expect("db lock").query(
            "SELECT jpeg_base64 FROM cell_pictures WHERE clinic = $1 AND device = $2 AND field_id = $3 AND idx = $4",
            &[clinic.into(), device.into(), field_id.into(), idx.into()],
        )?;
        let Some(r) = rows.first() else {
            return Ok(None);
        };
        Ok(wbc_shared::uplink::decode_picture(&r[0].text()?))
    }

    /// The slides of a clinic (every clinic with `None`), blasts first, then slides with
    /// possible blasts waiting, then newest first.
    pub fn slides(&self, clinic: Option<&str>) -> Result<Vec<SlideRow>> {
        let mut out: Vec<SlideRow> = self.slide_rows(clinic, None)?.into_iter().map(|(row, _)| row).collect();
        out.sort_by_key(|s| std::cmp::Reverse((s.blast, s.possible_blast, s.started_at)));
        Ok(out)
    }

    /// One slide with every cell central holds of it (reviews applied), the cells waiting for
    /// review first ([`review_queue`]: blasts, then possible blasts, then other cells set
    /// aside), then the rest in the order they came. `None` for a slide central never heard of.
    pub fn slide(&self, clinic: &str, device: &str, slide_id: &str) -> Result<Option<SlideDetail>> {
        let Some((row, SlideCells { fields, at })) = self.slide_rows(Some(clinic), Some((device, slide_id)))?.pop()
        else {
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

    /// Slides (of a clinic, or of one device's one slide) with the fields they are counted from.
    fn slide_rows(&self, clinic: Option<&str>, only: Option<(&str, &str)>) -> Result<Vec<(SlideRow, SlideCells)>> {
        let (device, slide) = (only.map(|o| o.0), only.map(|o| o.1));
        let keys = self.conn.lock().expect("db lock").query(
            "SELECT k.clinic, k.device, k.slide_id,
                    COALESCE(s.started_at, (SELECT MIN(received_at) FROM cells c WHERE c.clinic = k.clinic
                             AND c.device = k.device AND c.slide_id = k.slide_id), 0),
                    s.finished_at
             FROM (SELECT clinic, device, slide_id FROM cells UNION SELECT clinic, device, slide_id FROM slides) k
             LEFT JOIN slides s ON s.clinic = k.clinic AND s.device = k.device AND s.slide_id = k.slide_id
             WHERE (CAST($1 AS TEXT) IS NULL OR k.clinic = $1)
               AND (CAST($2 AS TEXT) IS NULL OR k.device = $2)
               AND (CAST($3 AS TEXT) IS NULL OR k.slide_id = $3)",
            &[clinic.into(), device.into(), slide.into()],
        )?;
        let settings = SlideSettings::default();
        let mut out = Vec::with_capacity(keys.len());
        for r in keys {
            let (c, d, s) = (r[0].text()?, r[1].text()?, r[2].text()?);
            let finished = r[4].opt_int()?;
            let cells = self.indexed_slide_fields(&c, &d, &s)?;
            let report = report(&s, &cells.fields, &settings, finished.is_some());
            let row = SlideRow {
                blast: report.flags.iter().any(|f| f.urgent()),
                possible_blast: report.flags.iter().any(|f| matches!(f, Flag::PossibleBlast { .. })),
                clinic: c,
                device: d,
                started_at: r[3].int()? as u64,
                finished_at: finished.map(|t| t as u64),
                report,
            };
            out.push((row, cells));
        }
        Ok(out)
    }

    /// Cells per day (UTC) and class over the last `days` days.
    pub fn results_over_time(&self, clinic: Option<&str>, days: u32) -> Result<Vec<DayCount>> {
        let since = now().saturating_sub(u64::from(days) * 86_400);
        self.conn
            .lock()
            .expect("db lock")
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
            .expect("db lock")
            .query(
                "SELECT clinic, device, slide_id, COUNT(*) FROM cells GROUP BY clinic, device, slide_id",
                &[],
            )?
            .into_iter()
            .map(|r| Ok(((r[0].text()?, r[1].text()?, r[2].text()?), r[3].int()? as u64)))
            .collect()
    }
}

/// A database name for messages: a URL without its password.
fn display(db: &str) -> String {
    match (db.find("://"), db.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://…@{}", &db[..s], &db[at + 1..]),
        _ => db.to_string(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sql::databases;
    use wbc_shared::classes::CellClass;
    use wbc_shared::messages::{CellResult, FieldRecord, SCHEMA_VERSION};
    use wbc_shared::uplink::{ModelMessage, ReviewMessage, SlideMessage, UPLINK_SCHEMA_VERSION};

    fn field(id: &str, slide: &str, classes: &[usize]) -> FieldRecord {
        FieldRecord {
            schema_version: SCHEMA_VERSION,
            id: id.into(),
            slide_id: slide.into(),
            received_at: now(),
            source: "camera".into(),
            name: "f.jpg".into(),
            image_sha256: "00".into(),
            width: 10,
            height: 10,
            single_cell: false,
            microns_per_pixel: 0.1,
            cells: classes
                .iter()
                .map(|&c| {
                    let mut p = [0.0; 6];
                    p[c] = 1.0;
                    CellRecord {
                        result: CellResult::from_probabilities(&p, &Default::default(), "d".into(), 0.5, 1),
                        review: None,
                    }
                })
                .collect(),
        }
    }

    fn envelopes(clinic: &str, first_seq: u64, bodies: Vec<Body>) -> Vec<Envelope> {
        bodies
            .into_iter()
            .enumerate()
            .map(|(i, b)| Envelope::new(clinic, "dev1", first_seq + i as u64, now(), b))
            .collect()
    }

    #[test]
    fn each_message_counts_once_and_slides_are_rebuilt_from_cells() {
        for (_guard, path) in databases() {
            counts_once(&path);
        }
    }

    fn counts_once(path: &Path) {
        let db = Db::open(path).unwrap();
        let neut = CellClass::Neutrophil.index();
        let blast = CellClass::Blast.index();
        let msgs = envelopes("a", 1, Body::cells_of(&field("f1", "s1", &[neut, neut, blast])));
        for m in &msgs {
            assert_eq!(db.apply(m).unwrap(), Applied::New);
        }
        for m in &msgs {
            assert_eq!(db.apply(m).unwrap(), Applied::Duplicate, "a resend changes nothing");
        }
        // The technician says the blast is a lymphocyte.
        let review = Envelope::new(
            "a",
            "dev1",
            10,
            now(),
            Body::Review(ReviewMessage {
                field_id: "f1".into(),
                slide_id: "s1".into(),
                index: 2,
                review: Review {
                    class: Some(CellClass::Lymphocyte),
                    by: "t".into(),
                    at: now(),
                },
            }),
        );
        db.apply(&review).unwrap();
        for m in envelopes("b", 1, Body::cells_of(&field("f2", "s9", &[blast]))) {
            db.apply(&m).unwrap();
        }
        drop(db);
        let db = Db::open(path).unwrap();
        assert_eq!(db.message_count().unwrap(), 5);
        let slides = db.slides(None).unwrap();
        assert_eq!(slides.len(), 2);
        assert_eq!(
            (slides[0].clinic.as_str(), slides[0].blast),
            ("b", true),
            "blasts first"
        );
        let a = &slides[1];
        assert!(!a.blast, "the review overrides the model");
        assert_eq!(a.report.per_class["Neutrophil"].count, 2);
        assert_eq!(a.report.per_class["Lymphocyte"].count, 1);
        assert_eq!(db.slides(Some("a")).unwrap().len(), 1);
        let counts = db.cell_counts().unwrap();
        assert_eq!(counts[&("a".to_string(), "dev1".to_string(), "s1".to_string())], 3);
        let days = db.results_over_time(Some("a"), 7).unwrap();
        assert_eq!(days.iter().map(|d| d.count).sum::<u64>(), 3);
    }

    #[test]
    fn slides_with_possible_blasts_come_after_blasts_and_before_the_rest() {
        for (_guard, path) in databases() {
            let db = Db::open(&path).unwrap();
            let (neut, blast) = (CellClass::Neutrophil.index(), CellClass::Blast.index());
            // Clinic "p": a cell whose most probable class is Blast, too unsure to be called one.
            let mut unsure = field("f3", "s3", &[neut]);
            let mut p = [0.05; 6];
            p[blast] = 0.45;
            unsure.cells.push(CellRecord {
                result: CellResult::from_probabilities(&p, &Default::default(), "d".into(), 0.5, 1),
                review: None,
            });
            for (clinic, f) in [
                ("n", field("f1", "s1", &[neut])),
                ("p", unsure),
                ("b", field("f2", "s2", &[blast])),
            ] {
                for m in envelopes(clinic, 1, Body::cells_of(&f)) {
                    db.apply(&m).unwrap();
                }
            }
            let slides = db.slides(None).unwrap();
            let order: Vec<(&str, bool, bool)> = slides
                .iter()
                .map(|s| (s.clinic.as_str(), s.blast, s.possible_blast))
                .collect();
            assert_eq!(order, vec![("b", true, false), ("p", false, true), ("n", false, false)]);
            assert_eq!(slides[1].report.flags, vec![Flag::PossibleBlast { count: 1 }]);
            assert_eq!(slides[1].report.unidentified, 1);
            // The slide itself: the cell waiting for review first, then the rest.
            let d = db.slide("p", "dev1", "s3").unwrap().unwrap();
            assert_eq!(d.slide, slides[1]);
            let waiting: Vec<_> = d.cells.iter().map(|c| (c.waiting, c.cell.result.class)).collect();
            assert_eq!(
                waiting,
                vec![(Some("possible_blast"), None), (None, Some(CellClass::Neutrophil))]
            );
            assert!(d.cells.iter().all(|c| c.field_id == "f3"));
            let b = db.slide("b", "dev1", "s2").unwrap().unwrap();
            assert_eq!(b.cells[0].waiting, Some("blast"));
            assert_eq!(db.slide("p", "dev1", "s2").unwrap(), None, "another clinic's slide id");
            assert_eq!(db.slide("p", "dev2", "s3").unwrap(), None, "another device");
            assert_eq!(db.slide("p", "dev1", "' OR 1=1 --").unwrap(), None);
        }
    }

    /// A real JPEG of `side` pixels.
    pub fn jpeg(side: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(side, side, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 128]));
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new(&mut out)
            .encode_image(&img)
            .unwrap();
        out
    }

    #[test]
    fn a_cells_picture_is_kept_when_it_is_a_picture_and_dropped_alone_when_not() {
        for (_guard, path) in databases() {
            let db = Db::open(&path).unwrap();
            let blast = CellClass::Blast.index();
            let f = field("f1", "s1", &[blast, blast, blast, blast]);
            let good = jpeg(64);
            let mut corrupt = good.clone();
            corrupt.truncate(good.len() / 2);
            let pictures = [Some(good.clone()), Some(corrupt), None, None];
            let mut bodies = Body::cells_with_pictures(&f, |i| pictures[i].clone());
            // A JPEG too large to decode here (1024 px; an appliance sends 128), and a picture
            // that is no base64 at all, sent by a broken or hostile device.
            let mut huge = Vec::new();
            image::codecs::jpeg::JpegEncoder::new(&mut huge)
                .encode_image(&image::RgbImage::from_pixel(1024, 1024, image::Rgb([200, 120, 160])))
                .unwrap();
            assert!(huge.len() <= wbc_shared::uplink::MAX_PICTURE_BYTES, "{}", huge.len());
            if let Body::Cell(m) = &mut bodies[2] {
                m.picture = Some(CellMessage::encode_picture(&huge));
            }
            if let Body::Cell(m) = &mut bodies[3] {
                m.picture = Some("\u{0}<script>".into());
            }
            for m in envelopes("a", 1, bodies) {
                assert_eq!(db.apply(&m).unwrap(), Applied::New);
            }
            let d = db.slide("a", "dev1", "s1").unwrap().unwrap();
            assert_eq!(d.cells.len(), 4, "every cell is kept, whatever its picture");
            let kept: Vec<(u32, bool)> = d.cells.iter().map(|c| (c.index, c.picture)).collect();
            assert_eq!(kept, vec![(0, true), (1, false), (2, false), (3, false)]);
            assert_eq!(db.cell_picture("a", "dev1", "f1", 0).unwrap(), Some(good));
            assert_eq!(db.cell_picture("a", "dev1", "f1", 1).unwrap(), None);
            assert_eq!(
                db.cell_picture("b", "dev1", "f1", 0).unwrap(),
                None,
                "another clinic's cell"
            );
            // The cell sent again (a new message) without its picture keeps no stale one.
            let again = Body::cells_of(&f);
            db.apply(&Envelope::new("a", "dev1", 99, now(), again[0].clone()))
                .unwrap();
            assert_eq!(db.cell_picture("a", "dev1", "f1", 0).unwrap(), None);
        }
    }

    #[test]
    fn slide_reports_model_events_and_status_update_the_device() {
        for (_guard, path) in databases() {
            slides_and_status(&path);
        }
    }

    fn slides_and_status(path: &Path) {
        let db = Db::open(path).unwrap();
        let s = |finished: Option<u64>| {
            Body::Slide(SlideMessage {
                started_at: 5,
                finished_at: finished,
                report: report("s1", &[], &SlideSettings::default(), finished.is_some()),
            })
        };
        db.apply(&Envelope::new("a", "d", 1, 1, s(Some(9)))).unwrap();
        db.apply(&Envelope::new("a", "d", 2, 2, s(None))).unwrap();
        let slides = db.slides(None).unwrap();
        assert_eq!(slides[0].finished_at, Some(9), "a finished slide stays finished");
        db.apply(&Envelope::new(
            "a",
            "d",
            3,
            3,
            Body::Model(ModelMessage {
                event: "active".into(),
                model_version: 4,
                detail: String::new(),
            }),
        ))
        .unwrap();
        let status = |state, at| Status {
            schema_version: UPLINK_SCHEMA_VERSION,
            clinic: "a".into(),
            device: "d".into(),
            state,
            at,
            backlog: Some(7),
            model_version: None,
        };
        db.set_status(&status(DeviceState::Online, 100)).unwrap();
        let d = &db.devices().unwrap()[0];
        assert_eq!(
            (d.state.as_str(), d.backlog, d.model_version),
            ("online", Some(7), Some(4))
        );
        // The last will carries the connection's start time, older than the last online status.
        db.set_status(&status(DeviceState::Offline, 50)).unwrap();
        assert_eq!(db.devices().unwrap()[0].state, "offline", "the last to arrive wins");
        db.note_rejected("wbc/x", "bad").unwrap();
        assert_eq!(db.rejected_count().unwrap(), 1);
    }

    #[test]
    fn a_database_from_a_newer_build_is_refused() {
        for (_guard, path) in databases() {
            drop(Db::open(&path).unwrap());
            let mut c = Conn::open(&path.to_string_lossy()).unwrap();
            c.exec("UPDATE meta SET value = 99 WHERE key = 'db_version'", &[])
                .unwrap();
            drop(c);
            let e = Db::open(&path).err().unwrap().to_string();
            assert!(e.contains("version 99") && !e.contains("secret"), "{e}");
        }
    }
}
