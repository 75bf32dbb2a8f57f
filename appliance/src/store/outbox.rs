//! The outbox: messages for central waiting for the broker's acknowledgement. Each is queued
//! inside the transaction that stores what it reports, under a wire sequence number with the
//! store's epoch above sled's counter; read back oldest first (an unreadable one is moved to
//! `outbox_quarantine`), removed once acknowledged, and counted for the backlog.

use super::{Store, TxResult, VALUE_VERSION, abort, be, read_u64, tx_error};
use anyhow::Result;
use sled::Transactional;
use sled::transaction::TransactionalTree;
use std::collections::HashSet;
use wbc_protocol::clock::now;
use wbc_protocol::uplink::{Body, Envelope, MAX_PAYLOAD_BYTES};

/// An outbox message waiting for the broker's acknowledgement.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// Outbox key (the message's sequence number).
    pub seq: u64,
    /// Topic.
    pub topic: String,
    /// JSON payload.
    pub payload: Vec<u8>,
}

impl Store {
    /// Puts messages into the outbox inside a transaction.
    pub(super) fn queue(&self, outbox: &TransactionalTree, field_seq: Option<u64>, bodies: &[Body]) -> TxResult<()> {
        for body in bodies {
            let seq = outbox.generate_id()?;
            let wire_seq = (self.epoch << 40) | (self.counter_offset.wrapping_add(seq) & ((1 << 40) - 1));
            let env = Envelope::new(
                &self.identity.clinic,
                &self.identity.device,
                wire_seq,
                now(),
                body.clone(),
            );
            let mut v = vec![VALUE_VERSION];
            v.extend_from_slice(&field_seq.unwrap_or(u64::MAX).to_be_bytes());
            serde_json::to_writer(&mut v, &env).expect("serialising to memory");
            // A message the broker and central would refuse must not block the queue behind it.
            if v.len() - 9 > MAX_PAYLOAD_BYTES {
                return abort(anyhow::anyhow!(
                    "a {} message of {} bytes is over the uplink limit of {MAX_PAYLOAD_BYTES}",
                    body.kind().as_str(),
                    v.len() - 9
                ));
            }
            outbox.insert(&be(seq), v)?;
        }
        Ok(())
    }

    /// Up to `limit` outbox messages from sequence number `from` on, oldest first.
    pub fn outbox_from(&self, from: u64, limit: usize) -> Result<Vec<Outgoing>> {
        let mut out = Vec::new();
        for r in self.outbox.range(be(from)..).take(limit) {
            let (k, v) = r?;
            let seq = read_u64(&k)?;
            let env = if v.first() != Some(&VALUE_VERSION) || v.len() < 9 {
                Err("a format this build does not know".to_string())
            } else {
                serde_json::from_slice::<Envelope>(&v[9..]).map_err(|e| e.to_string())
            };
            let env = match env {
                Ok(e) => e,
                Err(why) => {
                    tracing::error!(seq, %why, "outbox message cannot be sent: kept aside in outbox_quarantine");
                    (&self.outbox, &self.quarantine)
                        .transaction(|(o, q)| {
                            o.remove(&k)?;
                            q.insert(&k, &v)?;
                            Ok(())
                        })
                        .map_err(tx_error)?;
                    self.queued.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
            };
            out.push(Outgoing {
                seq,
                topic: env.topic(),
                payload: v[9..].to_vec(),
            });
        }
        Ok(out)
    }

    /// The broker has the message: it leaves the outbox. (Not flushed at once: losing the
    /// removal in a crash only means sending the message again, which central ignores.)
    pub fn acknowledged(&self, seq: u64) -> Result<()> {
        if self.outbox.remove(be(seq))?.is_some() {
            self.queued.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    pub(super) fn count_queued(&self, n: usize) {
        self.queued.fetch_add(n as i64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Messages waiting for the broker.
    pub fn backlog(&self) -> usize {
        self.queued.load(std::sync::atomic::Ordering::Relaxed).max(0) as usize
    }

    /// Messages set aside because they could not be read back (kept for a maintainer).
    pub fn quarantined(&self) -> usize {
        self.quarantine.len()
    }

    /// Resolves when something is queued.
    pub async fn queued(&self) {
        self.notify.notified().await
    }

    /// Fields with messages still in the outbox.
    pub(super) fn undelivered_fields(&self) -> Result<HashSet<u64>> {
        let mut s = HashSet::new();
        for r in self.outbox.iter() {
            let (_, v) = r?;
            if v.len() >= 9 {
                let f = read_u64(&v[1..9])?;
                if f != u64::MAX {
                    s.insert(f);
                }
            }
        }
        Ok(s)
    }
}
