//! The model log (updates, rollbacks, the model in use; the newest entries kept) and the
//! model version last recorded as in use. Every entry is queued for central in the same
//! transaction.

use super::{Store, be, decode, encode, read_u64, tx_error};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use sled::Transactional;
use wbc_protocol::clock::now;
use wbc_protocol::uplink::{Body, ModelEvent, ModelMessage, clean_text};

/// One event of the model log (updates, rollbacks, the model in use), newest first in the UI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelLogEntry {
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// The event, as sent to central.
    pub message: ModelMessage,
}

/// Model log entries kept.
const MODEL_LOG_KEEP: usize = 500;

impl Store {
    /// Tells central which model is active, once per model: queues a `model` message when
    /// `version` differs from the last one noted. Returns whether it did.
    pub fn note_active_model(&self, version: u64, detail: &str) -> Result<bool> {
        let m = ModelMessage {
            event: ModelEvent::Active,
            model_version: version,
            detail: detail.into(),
        };
        self.log_model(&m, true)
    }

    /// Records a model event (the update path: downloaded, verified, rejected, active, rolled
    /// back, ...) in the model log and queues it for central, in one transaction. `active` and
    /// `rolled_back` also record the model now in use.
    pub fn model_event(&self, m: &ModelMessage) -> Result<()> {
        self.log_model(m, false).map(|_| ())
    }

    fn log_model(&self, m: &ModelMessage, only_if_changed: bool) -> Result<bool> {
        // A refusal's reason may repeat what a USB stick or a server claimed: kept short and
        // clean, so that it always fits a message and any database.
        let m = &ModelMessage {
            detail: clean_text(&m.detail),
            ..m.clone()
        };
        let body = Body::Model(m.clone());
        let entry = encode(&ModelLogEntry {
            at: now(),
            message: m.clone(),
        });
        let switches = m.event.switches();
        let _g = self.lock.lock().expect("store lock");
        let queued = (&self.meta, &self.outbox, &self.model_log)
            .transaction(|(meta, ob, log)| {
                if switches {
                    if only_if_changed && meta.get(b"active_model")?.as_deref() == Some(&be(m.model_version)[..]) {
                        return Ok(false);
                    }
                    meta.insert(&b"active_model"[..], &be(m.model_version))?;
                }
                log.insert(&be(log.generate_id()?), entry.clone())?;
                self.queue(ob, None, std::slice::from_ref(&body))?;
                Ok(true)
            })
            .map_err(tx_error)?;
        self.flush()?;
        if queued {
            self.count_queued(1);
            self.notify.notify_one();
            while self.model_log.len() > MODEL_LOG_KEEP {
                if let Some((k, _)) = self.model_log.first()? {
                    self.model_log.remove(k)?;
                }
            }
        }
        Ok(queued)
    }

    /// The model log, newest first, at most `limit` entries.
    pub fn model_log(&self, limit: usize) -> Result<Vec<ModelLogEntry>> {
        self.model_log
            .iter()
            .rev()
            .take(limit)
            .map(|r| decode(&r?.1, "model log"))
            .collect()
    }

    /// The model version last recorded as in use.
    pub fn active_model(&self) -> Option<u64> {
        self.meta
            .get(b"active_model")
            .ok()
            .flatten()
            .and_then(|v| read_u64(&v).ok())
    }
}
