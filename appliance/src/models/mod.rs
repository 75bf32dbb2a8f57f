//! The appliance's models on disk, and the only way one becomes active.
//!
//! `<data_dir>/models/` holds at most two installed bundles (the active one and its fallback,
//! `slot-v<version>-<sha>.bundle`), the pointer `current.json` that says which is which, the
//! trusted key list `trust.json` once the lab has rotated keys, `seen.json`, what became of
//! each bundle offered (so that a refused bundle left on a USB stick is not tried every poll),
//! and `withdrawn.json`, the bundles the lab withdrew (never aged out).
//! The factory model (the configured bundle, else the embedded default) needs no slot.
//!
//! An update is verified before anything changes (signature by a trusted key, every part's
//! sha256, bundle format, minimum appliance version, a strictly newer version unless a signed
//! rollback instruction allows an older one), copied into a new slot (written, flushed,
//! renamed), loaded and run on its own golden self-test images, and only then made active by
//! renaming a new pointer over the old one (flushed, with its folder). A power cut at any moment
//! leaves the old pointer or the new one, each naming a complete verified bundle; files of an
//! interrupted update are removed at the next start.
//!
//! A new model is on probation until it has processed `probation_fields` fields. If it fails
//! the pipeline `max_failures` times, or the appliance starts `max_failures` times without
//! having stopped cleanly (it crashed), the fallback becomes active again and the reason is
//! reported. At every start the active bundle is verified and self-tested again; if that fails
//! the fallback, and then the factory model, is used, and the reason is reported.
//!
//! The code is split along those lines: `slots` holds the installed models, the pointer and
//! how it is switched atomically, and the start (factory model and fallback included);
//! `probation` a new model's trial and the return to the fallback; `install` the offered
//! bundles (verification, staging, self-test, signed key lists and rollback instructions, and
//! the memory of what became of each).

use anyhow::Result;
use ed25519_dalek::VerifyingKey;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use wbc_protocol::bundle::Bundle;
use wbc_protocol::uplink::{ModelEvent, ModelMessage};

mod install;
#[cfg(test)]
use install::Staging;
mod probation;
mod slots;
#[cfg(test)]
mod tests;
mod withdrawn;

pub use probation::Probation;
pub use slots::{PAUSE_ENV, Pointer, Slot, write_atomic};
pub use withdrawn::Withdrawn;

pub use wbc_config::ModelPolicy;

/// The factory model and the keys the device was provisioned with.
pub struct Factory {
    /// The factory bundle.
    pub source: FactorySource,
    /// Where they came from, in words.
    pub name: String,
    /// Keys that verify the factory bundle.
    pub trusted: Vec<VerifyingKey>,
    /// The provisioned update keys (configuration), trusted for updates until a signed key
    /// list replaces them.
    pub update_keys: Vec<VerifyingKey>,
}

/// Where the factory bundle is.
pub enum FactorySource {
    /// Bytes in the program (the embedded default).
    Embedded(Arc<[u8]>),
    /// A file of the device's own (a configured bundle): mapped when a model is built from it,
    /// never read whole.
    File(std::path::PathBuf),
}

/// Builds the runnable model from a verified bundle and runs its golden self-test.
pub type Loader<T> = Box<dyn Fn(&Bundle) -> Result<T> + Send + Sync>;
/// Receives every model event (logged, shown, sent to central).
pub type Reporter = Box<dyn Fn(&ModelMessage) + Send + Sync>;

/// What became of an offered bundle.
#[derive(Debug)]
pub enum Outcome<T> {
    /// Verified, self-tested and active: the model to use from now on.
    Active(T),
    /// Nothing to do (already active, or already refused), with why.
    Skipped(String),
    /// Refused, with the reason (reported).
    Rejected(String),
}

struct State {
    pointer: Pointer,
    trusted: Vec<VerifyingKey>,
    key_sequence: u64,
    /// Why the trusted key list cannot be relied on (then no new trust decision is made).
    trust_problem: Option<String>,
    seen: BTreeMap<String, String>,
    withdrawn: withdrawn::WithdrawnList,
    /// The slot an install is writing now (kept by the clean-up of unneeded files).
    staging: Option<String>,
}

/// The model store. One process at a time may hold it (a lock file).
pub struct Models<T> {
    dir: PathBuf,
    _lock: std::fs::File,
    factory: Factory,
    factory_slot: Slot,
    policy: ModelPolicy,
    clinic: String,
    device: String,
    loader: Loader<T>,
    report: Reporter,
    state: Mutex<State>,
}

/// Where the models stand, for the UI and `appliance models`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    /// The model in use.
    pub active: Slot,
    /// The model to return to.
    pub previous: Option<Slot>,
    /// Set while the active model is new.
    pub probation: Option<Probation>,
    /// Fields a new model must process before it is confirmed.
    pub probation_fields: u32,
    /// Sequence of the trusted key list (0: the provisioned keys).
    pub key_sequence: u64,
    /// The trusted keys' ids.
    pub key_ids: Vec<String>,
}

/// The status in words.
pub fn describe(s: &Status) -> String {
    let slot = |s: &Slot| match &s.file {
        Some(f) => format!("version {} ({f})", s.model_version),
        None => format!("version {} (factory model)", s.model_version),
    };
    let mut out = format!("active model: {}", slot(&s.active));
    if let Some(p) = &s.probation {
        out += &format!(
            ", on probation ({} of {} fields, {} failures, {} crashed starts)",
            p.fields_ok, s.probation_fields, p.failures, p.crashed_starts
        );
    }
    out += &match &s.previous {
        Some(p) => format!("\nfallback: {}", slot(p)),
        None => "\nfallback: none".into(),
    };
    out += &format!(
        "\ntrusted keys: {} (key list {})",
        s.key_ids.join(", "),
        if s.key_sequence == 0 {
            "as provisioned".to_string()
        } else {
            s.key_sequence.to_string()
        }
    );
    out
}

fn msg(event: ModelEvent, model_version: u64, detail: String) -> ModelMessage {
    ModelMessage {
        event,
        model_version,
        detail,
    }
}
