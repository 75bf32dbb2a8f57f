//! Central's store: embedded SQLite (one file, nothing to install) or, for a lab that
//! outgrows one machine, PostgreSQL (`db = "postgres://…"`, feature `postgres`).
//!
//! Each message is applied in one transaction together with its id in `messages`, so a
//! message seen twice (the uplink resends what it is not sure was received) changes nothing
//! the second time, and a crash leaves a message either wholly applied or not at all. The
//! broker's acknowledgement to central is sent only after the commit.
//!
//! The work is split by what it does: `schema.rs` creates and opens the database, `apply.rs`
//! stores the messages and statuses devices send, `queries.rs` reads devices, slides,
//! results and model events back for the web pages, and `summaries.rs` keeps a summary per
//! slide so that the slide list does not grow with the history, and removes what retention
//! lets go; `agreement.rs` sets the model against the technicians' reviews per clinic;
//! `reviews.rs` reads the reviewed cells with their pictures for a clinic's teaching. The
//! rows they return are defined here.

use crate::sql::Conn;
use parking_lot::Mutex;
use serde::Serialize;
use wbc_protocol::messages::CellRecord;
use wbc_protocol::slide::SlideReport;
use wbc_protocol::uplink::ModelEvent;

mod agreement;
mod apply;
mod queries;
mod reviews;
mod schema;
mod summaries;

pub use agreement::{Agreement, AgreementSettings, Change, NOT_A_WHITE_CELL, Week};
pub use reviews::{ReviewKey, ReviewedCell};
pub use summaries::{MAX_PAGE, Pruned, Retention};

pub use wbc_protocol::clock::now;

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
    pub event: ModelEvent,
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
    /// One connection for all. parking_lot's lock is eventually fair: a page being read waits
    /// at most about half a millisecond behind a stream of ingest writes, never the whole stream.
    conn: Mutex<Conn>,
}

#[cfg(test)]
pub(crate) mod tests;
