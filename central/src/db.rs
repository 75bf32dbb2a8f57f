//! Central's store: embedded SQLite (one file, nothing to install).
//!
//! Each message is applied in one transaction together with its id in `messages`, so a
//! message seen twice (the uplink resends what it is not sure was received) changes nothing
//! the second time, and a crash leaves a message either wholly applied or not at all. The
//! broker's acknowledgement to central is sent only after the commit.

use anyhow::{Context, Result};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use wbc_shared::messages::{CellRecord, Review};
use wbc_shared::slide::{SlideReport, SlideSettings, report};
use wbc_shared::uplink::{Body, DeviceState, Envelope, FieldInfo, Status};

/// Schema version of the database.
const DB_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY, clinic TEXT NOT NULL, device TEXT NOT NULL, seq INTEGER NOT NULL,
    kind TEXT NOT NULL, sent_at INTEGER NOT NULL, received_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS cells (
    clinic TEXT NOT NULL, device TEXT NOT NULL, field_id TEXT NOT NULL, idx INTEGER NOT NULL,
    slide_id TEXT NOT NULL, received_at INTEGER NOT NULL, class TEXT NOT NULL,
    field_json TEXT NOT NULL, cell_json TEXT NOT NULL, message_id TEXT NOT NULL,
    PRIMARY KEY (clinic, device, field_id, idx));
CREATE INDEX IF NOT EXISTS cells_slide ON cells (clinic, device, slide_id);
CREATE TABLE IF NOT EXISTS reviews (
    clinic TEXT NOT NULL, device TEXT NOT NULL, field_id TEXT NOT NULL, idx INTEGER NOT NULL,
    review_json TEXT NOT NULL, at INTEGER NOT NULL,
    PRIMARY KEY (clinic, device, field_id, idx));
CREATE TABLE IF NOT EXISTS slides (
    clinic TEXT NOT NULL, device TEXT NOT NULL, slide_id TEXT NOT NULL,
    started_at INTEGER NOT NULL, finished_at INTEGER, report_json TEXT NOT NULL,
    PRIMARY KEY (clinic, device, slide_id));
CREATE TABLE IF NOT EXISTS devices (
    clinic TEXT NOT NULL, device TEXT NOT NULL, state TEXT NOT NULL, at INTEGER NOT NULL,
    backlog INTEGER, model_version INTEGER, last_seen INTEGER NOT NULL,
    PRIMARY KEY (clinic, device));
CREATE TABLE IF NOT EXISTS model_events (
    message_id TEXT PRIMARY KEY, clinic TEXT NOT NULL, device TEXT NOT NULL, event TEXT NOT NULL,
    model_version INTEGER NOT NULL, detail TEXT NOT NULL, at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rejected (
    id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, reason TEXT NOT NULL, at INTEGER NOT NULL);
";

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
    /// The differential and flags.
    pub report: SlideReport,
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
    conn: Mutex<Connection>,
}

impl Db {
    /// Opens (creating) the database at `path` (`:memory:` for a throwaway one).
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a committed message survives a power cut (it has been acknowledged by then).
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch(SCHEMA).context("creating the schema")?;
        let v: Option<i64> = conn
            .query_row("SELECT value FROM meta WHERE key = 'db_version'", [], |r| r.get(0))
            .optional()?;
        match v {
            None => {
                conn.execute("INSERT INTO meta (key, value) VALUES ('db_version', ?1)", [DB_VERSION])?;
            }
            Some(DB_VERSION) => {}
            Some(v) => anyhow::bail!(
                "{} is database version {v}; this build knows {DB_VERSION}",
                path.display()
            ),
        }
        Ok(Db { conn: Mutex::new(conn) })
    }

    fn touch_device(tx: &rusqlite::Transaction<'_>, clinic: &str, device: &str) -> rusqlite::Result<()> {
        tx.execute(
            "INSERT INTO devices (clinic, device, state, at, last_seen) VALUES (?1, ?2, 'unknown', 0, ?3)
             ON CONFLICT (clinic, device) DO UPDATE SET last_seen = excluded.last_seen",
            params![clinic, device, now() as i64],
        )?;
        Ok(())
    }

    /// Applies a validated message once.
    pub fn apply(&self, e: &Envelope) -> Result<Applied> {
        let mut conn = self.conn.lock().expect("db lock");
        let tx = conn.transaction()?;
        let fresh = tx.execute(
            "INSERT OR IGNORE INTO messages (id, clinic, device, seq, kind, sent_at, received_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                e.id,
                e.clinic,
                e.device,
                e.seq as i64,
                e.body.kind().as_str(),
                e.at as i64,
                now() as i64
            ],
        )?;
        if fresh == 0 {
            return Ok(Applied::Duplicate);
        }
        Self::touch_device(&tx, &e.clinic, &e.device)?;
        match &e.body {
            Body::Cell(c) => {
                tx.execute(
                    "INSERT INTO cells (clinic, device, field_id, idx, slide_id, received_at, class, field_json,
                                        cell_json, message_id)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                     ON CONFLICT (clinic, device, field_id, idx) DO UPDATE SET
                       slide_id = excluded.slide_id, class = excluded.class, field_json = excluded.field_json,
                       cell_json = excluded.cell_json, message_id = excluded.message_id",
                    params![
                        e.clinic,
                        e.device,
                        c.field.id,
                        c.index,
                        c.field.slide_id,
                        c.field.received_at as i64,
                        c.cell.result.class_name(),
                        serde_json::to_string(&c.field)?,
                        serde_json::to_string(&c.cell)?,
                        e.id
                    ],
                )?;
            }
            Body::Review(r) => {
                tx.execute(
                    "INSERT INTO reviews (clinic, device, field_id, idx, review_json, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (clinic, device, field_id, idx) DO UPDATE SET
                       review_json = excluded.review_json, at = excluded.at WHERE excluded.at >= reviews.at",
                    params![
                        e.clinic,
                        e.device,
                        r.field_id,
                        r.index,
                        serde_json::to_string(&r.review)?,
                        r.review.at as i64
                    ],
                )?;
            }
            Body::Slide(s) => {
                tx.execute(
                    "INSERT INTO slides (clinic, device, slide_id, started_at, finished_at, report_json)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (clinic, device, slide_id) DO UPDATE SET
                       started_at = excluded.started_at,
                       finished_at = COALESCE(excluded.finished_at, slides.finished_at),
                       report_json = excluded.report_json",
                    params![
                        e.clinic,
                        e.device,
                        s.report.slide_id,
                        s.started_at as i64,
                        s.finished_at.map(|t| t as i64),
                        serde_json::to_string(&s.report)?
                    ],
                )?;
            }
            Body::Model(m) => {
                tx.execute(
                    "INSERT OR IGNORE INTO model_events (message_id, clinic, device, event, model_version, detail, at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        e.id,
                        e.clinic,
                        e.device,
                        m.event,
                        m.model_version as i64,
                        m.detail,
                        e.at as i64
                    ],
                )?;
                if m.event == "active" {
                    tx.execute(
                        "UPDATE devices SET model_version = ?3 WHERE clinic = ?1 AND device = ?2",
                        params![e.clinic, e.device, m.model_version as i64],
                    )?;
                }
            }
        }
        tx.commit()?;
        Ok(Applied::New)
    }

    /// Records a device's status. The last one to arrive wins: the broker delivers a device's
    /// messages in order and publishes its last will after them (the will's `at` is when the
    /// connection began, so times cannot be compared).
    pub fn set_status(&self, s: &Status) -> Result<()> {
        let mut conn = self.conn.lock().expect("db lock");
        let tx = conn.transaction()?;
        Self::touch_device(&tx, &s.clinic, &s.device)?;
        let state = match s.state {
            DeviceState::Online => "online",
            DeviceState::Offline => "offline",
        };
        tx.execute(
            "UPDATE devices SET state = ?3, at = ?4, backlog = COALESCE(?5, backlog),
                    model_version = COALESCE(?6, model_version)
             WHERE clinic = ?1 AND device = ?2",
            params![
                s.clinic,
                s.device,
                state,
                s.at as i64,
                s.backlog.map(|b| b as i64),
                s.model_version.map(|v| v as i64)
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Keeps a refused message's topic and reason (for the lab to see what devices send wrong).
    pub fn note_rejected(&self, topic: &str, reason: &str) -> Result<()> {
        let conn = self.conn.lock().expect("db lock");
        conn.execute(
            "INSERT INTO rejected (topic, reason, at) VALUES (?1, ?2, ?3)",
            params![
                topic.chars().take(300).collect::<String>(),
                reason.chars().take(500).collect::<String>(),
                now() as i64
            ],
        )?;
        Ok(())
    }

    /// Messages refused so far.
    pub fn rejected_count(&self) -> Result<u64> {
        let conn = self.conn.lock().expect("db lock");
        Ok(conn.query_row("SELECT COUNT(*) FROM rejected", [], |r| r.get::<_, i64>(0))? as u64)
    }

    /// Distinct messages stored.
    pub fn message_count(&self) -> Result<u64> {
        let conn = self.conn.lock().expect("db lock");
        Ok(conn.query_row("SELECT COUNT(*) FROM messages", [], |r| r.get::<_, i64>(0))? as u64)
    }

    /// Every device, by clinic.
    pub fn devices(&self) -> Result<Vec<DeviceRow>> {
        let conn = self.conn.lock().expect("db lock");
        let mut st = conn.prepare(
            "SELECT clinic, device, state, backlog, model_version, last_seen FROM devices ORDER BY clinic, device",
        )?;
        let rows = st.query_map([], |r| {
            Ok(DeviceRow {
                clinic: r.get(0)?,
                device: r.get(1)?,
                state: r.get(2)?,
                backlog: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
                model_version: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
                last_seen: r.get::<_, i64>(5)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The cells central holds for one slide, as the fields they came in (reviews applied).
    pub fn slide_fields(
        &self,
        clinic: &str,
        device: &str,
        slide_id: &str,
    ) -> Result<Vec<wbc_shared::messages::FieldRecord>> {
        let conn = self.conn.lock().expect("db lock");
        let mut st = conn.prepare(
            "SELECT c.field_id, c.idx, c.field_json, c.cell_json, r.review_json FROM cells c
             LEFT JOIN reviews r ON r.clinic = c.clinic AND r.device = c.device AND r.field_id = c.field_id
                                 AND r.idx = c.idx
             WHERE c.clinic = ?1 AND c.device = ?2 AND c.slide_id = ?3
             ORDER BY c.received_at, c.field_id, c.idx",
        )?;
        let mut fields: Vec<(FieldInfo, Vec<CellRecord>)> = Vec::new();
        let mut rows = st.query(params![clinic, device, slide_id])?;
        while let Some(r) = rows.next()? {
            let field_id: String = r.get(0)?;
            let parsed = (|| -> Result<(FieldInfo, CellRecord)> {
                let info: FieldInfo = serde_json::from_str(&r.get::<_, String>(2)?)?;
                let mut cell: CellRecord = serde_json::from_str(&r.get::<_, String>(3)?)?;
                if let Some(rj) = r.get::<_, Option<String>>(4)? {
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
            match fields.last_mut() {
                Some((f, cells)) if f.id == field_id => cells.push(cell),
                _ => fields.push((info, vec![cell])),
            }
        }
        Ok(fields.into_iter().map(|(f, cells)| f.to_record(cells)).collect())
    }

    /// The slides of a clinic (every clinic with `None`), blasts first, then newest first.
    pub fn slides(&self, clinic: Option<&str>) -> Result<Vec<SlideRow>> {
        let keys: Vec<(String, String, String, i64, Option<i64>)> = {
            let conn = self.conn.lock().expect("db lock");
            let mut st = conn.prepare(
                "SELECT k.clinic, k.device, k.slide_id,
                        COALESCE(s.started_at, (SELECT MIN(received_at) FROM cells c WHERE c.clinic = k.clinic
                                 AND c.device = k.device AND c.slide_id = k.slide_id), 0),
                        s.finished_at
                 FROM (SELECT clinic, device, slide_id FROM cells UNION SELECT clinic, device, slide_id FROM slides) k
                 LEFT JOIN slides s ON s.clinic = k.clinic AND s.device = k.device AND s.slide_id = k.slide_id
                 WHERE ?1 IS NULL OR k.clinic = ?1",
            )?;
            let rows = st.query_map(params![clinic], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?;
            rows.collect::<Result<_, _>>()?
        };
        let settings = SlideSettings::default();
        let mut out = Vec::with_capacity(keys.len());
        for (c, d, s, started, finished) in keys {
            let fields = self.slide_fields(&c, &d, &s)?;
            let report = report(&s, &fields, &settings, finished.is_some());
            out.push(SlideRow {
                blast: report.flags.iter().any(|f| f.urgent()),
                clinic: c,
                device: d,
                started_at: started as u64,
                finished_at: finished.map(|t| t as u64),
                report,
            });
        }
        out.sort_by(|a, b| b.blast.cmp(&a.blast).then(b.started_at.cmp(&a.started_at)));
        Ok(out)
    }

    /// Cells per day and class over the last `days` days.
    pub fn results_over_time(&self, clinic: Option<&str>, days: u32) -> Result<Vec<DayCount>> {
        let conn = self.conn.lock().expect("db lock");
        let since = now().saturating_sub(u64::from(days) * 86_400) as i64;
        let mut st = conn.prepare(
            "SELECT date(received_at, 'unixepoch') AS day, class, COUNT(*) FROM cells
             WHERE received_at >= ?1 AND (?2 IS NULL OR clinic = ?2)
             GROUP BY day, class ORDER BY day, class",
        )?;
        let rows = st.query_map(params![since, clinic], |r| {
            Ok(DayCount {
                day: r.get(0)?,
                class: r.get(1)?,
                count: r.get::<_, i64>(2)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Cells held per (clinic, device, slide), for checks.
    pub fn cell_counts(&self) -> Result<BTreeMap<(String, String, String), u64>> {
        let conn = self.conn.lock().expect("db lock");
        let mut st =
            conn.prepare("SELECT clinic, device, slide_id, COUNT(*) FROM cells GROUP BY clinic, device, slide_id")?;
        let rows = st.query_map([], |r| {
            Ok(((r.get(0)?, r.get(1)?, r.get(2)?), r.get::<_, i64>(3)? as u64))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sqlite");
        let db = Db::open(&path).unwrap();
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
        let db = Db::open(&path).unwrap();
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
    fn slide_reports_model_events_and_status_update_the_device() {
        let db = Db::open(Path::new(":memory:")).unwrap();
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
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sqlite");
        drop(Db::open(&path).unwrap());
        let c = Connection::open(&path).unwrap();
        c.execute("UPDATE meta SET value = 99 WHERE key = 'db_version'", [])
            .unwrap();
        drop(c);
        let e = Db::open(&path).err().unwrap().to_string();
        assert!(e.contains("version 99"), "{e}");
    }
}
