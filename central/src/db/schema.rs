//! The database's schema: its tables (in the SQL that SQLite and PostgreSQL both accept), its
//! version, and opening a database — creating the tables of a new one and refusing one written
//! by a newer build.

use super::Db;
use crate::sql::Conn;
use anyhow::{Context, Result};
use parking_lot::Mutex;
use std::path::Path;

/// Schema version of the database (2: slide summaries; a version 1 database is brought up to
/// it when opened).
const DB_VERSION: i64 = 2;

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
CREATE TABLE IF NOT EXISTS review_pictures (
    clinic TEXT NOT NULL, device TEXT NOT NULL, field_id TEXT NOT NULL, idx BIGINT NOT NULL,
    jpeg_base64 TEXT NOT NULL,
    PRIMARY KEY (clinic, device, field_id, idx));
CREATE TABLE IF NOT EXISTS slide_summaries (
    clinic TEXT NOT NULL, device TEXT NOT NULL, slide_id TEXT NOT NULL,
    started_at BIGINT NOT NULL, finished_at BIGINT, blast BIGINT NOT NULL, possible_blast BIGINT NOT NULL,
    report_json TEXT NOT NULL, dirty BIGINT NOT NULL,
    PRIMARY KEY (clinic, device, slide_id));
CREATE INDEX IF NOT EXISTS slide_summaries_order ON slide_summaries (blast, possible_blast, started_at);
CREATE INDEX IF NOT EXISTS slide_summaries_clinic ON slide_summaries (clinic, blast, possible_blast, started_at);
CREATE INDEX IF NOT EXISTS slide_summaries_dirty ON slide_summaries (dirty);
CREATE INDEX IF NOT EXISTS cells_received ON cells (received_at);
CREATE INDEX IF NOT EXISTS messages_received ON messages (received_at);
CREATE INDEX IF NOT EXISTS rejected_at ON rejected (at);
CREATE INDEX IF NOT EXISTS model_events_at ON model_events (at);
CREATE INDEX IF NOT EXISTS reviews_at ON reviews (at);
";

/// Brings a version 1 database to version 2: every slide gets a summary, computed at its
/// first reading.
const TO_V2: &str = "
INSERT INTO slide_summaries (clinic, device, slide_id, started_at, finished_at, blast, possible_blast, report_json, dirty)
SELECT clinic, device, slide_id, 0, NULL, 0, 0, '', 1
FROM (SELECT clinic, device, slide_id FROM cells UNION SELECT clinic, device, slide_id FROM slides) k WHERE true
ON CONFLICT (clinic, device, slide_id) DO NOTHING;
UPDATE meta SET value = 2 WHERE key = 'db_version';
";

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
            Some(r) if r[0].int()? == 1 => {
                conn.transaction(|c| c.batch(TO_V2))
                    .context("bringing the database to version 2")?;
                tracing::info!("database brought to version 2: slide summaries");
            }
            Some(r) => anyhow::bail!(
                "{} is database version {}; this build knows {DB_VERSION}",
                display(&name),
                r[0].int()?
            ),
        }
        Ok(Db { conn: Mutex::new(conn) })
    }
}

/// A database name for messages: a URL without its password.
fn display(db: &str) -> String {
    match (db.find("://"), db.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://…@{}", &db[..s], &db[at + 1..]),
        _ => db.to_string(),
    }
}
