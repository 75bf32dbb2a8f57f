//! The outbox: messages for central waiting for central's receipt. Each is queued inside the
//! transaction that stores what it reports, under a wire sequence number with the store's
//! epoch above sled's counter; read back oldest first (an unreadable one is moved to
//! `outbox_quarantine`); marked in `sent` when the broker acknowledges it (with the time and
//! how many times it went, for sending again what central does not confirm); removed once
//! central's receipt names it; and counted for the backlogs.

use super::{COUNTER_MASK, Store, TxResult, VALUE_VERSION, abort, be, read_u64, tx_error};
use anyhow::Result;
use sled::Transactional;
use sled::transaction::TransactionalTree;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use wbc_protocol::clock::now;
use wbc_protocol::uplink::{Body, Envelope, MAX_PAYLOAD_BYTES};

/// An outbox message waiting to be sent, or to be confirmed.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// Outbox key (the message's sequence number).
    pub seq: u64,
    /// Its sequence number on the wire ([`Envelope::seq`]), which central's receipt names.
    pub wire: u64,
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

    /// Up to `limit` outbox messages from sequence number `from` on, oldest first, sent or not.
    pub fn outbox_from(&self, from: u64, limit: usize) -> Result<Vec<Outgoing>> {
        let mut out = Vec::new();
        for r in self.outbox.range(be(from)..) {
            if out.len() == limit {
                break;
            }
            let (k, v) = r?;
            if let Some(o) = self.readable(&k, &v)? {
                out.push(o);
            }
        }
        Ok(out)
    }

    /// Up to `limit` messages not sent yet, oldest first, from sequence number `from` on,
    /// and where the next look should start (past every key looked at: at most `limit` + 4096
    /// of them, so that a long run of sent messages does not make each call long).
    pub fn unsent_from(&self, from: u64, limit: usize) -> Result<(Vec<Outgoing>, u64)> {
        let (mut out, mut next) = (Vec::new(), from);
        for r in self.outbox.range(be(from)..).take(limit + 4096) {
            if out.len() == limit {
                break;
            }
            let (k, v) = r?;
            let seq = read_u64(&k)?;
            next = seq + 1;
            if self.sent.contains_key(&k)? {
                continue;
            }
            if let Some(o) = self.readable(&k, &v)? {
                out.push(o);
            }
        }
        Ok((out, next))
    }

    /// Up to `limit` messages the broker took that central has not confirmed in time, oldest
    /// first: `after_s` seconds after they went the first time, twice as long after the second,
    /// and so on, up to a day.
    pub fn overdue(&self, now: u64, after_s: u64, limit: usize) -> Result<Vec<Outgoing>> {
        let mut out = Vec::new();
        for r in self.sent.iter() {
            if out.len() == limit {
                break;
            }
            let (k, v) = r?;
            let Some(sent) = SentRecord::read(&v) else {
                continue;
            };
            let wait = after_s
                .saturating_mul(1 << sent.times.saturating_sub(1).min(20))
                .min(86_400);
            if now < sent.at.saturating_add(wait) {
                continue;
            }
            match self.outbox.get(&k)? {
                Some(v) => {
                    if let Some(o) = self.readable(&k, &v)? {
                        out.push(o);
                    }
                }
                // Confirmed in the meantime.
                None => {
                    self.sent.remove(&k)?;
                }
            }
        }
        Ok(out)
    }

    /// An outbox entry as a message to send; an unreadable one is moved to the quarantine.
    fn readable(&self, k: &[u8], v: &[u8]) -> Result<Option<Outgoing>> {
        let seq = read_u64(k)?;
        let env = if v.first() != Some(&VALUE_VERSION) || v.len() < 9 {
            Err("a format this build does not know".to_string())
        } else {
            serde_json::from_slice::<Envelope>(&v[9..]).map_err(|e| e.to_string())
        };
        match env {
            Ok(env) => Ok(Some(Outgoing {
                seq,
                wire: env.seq,
                topic: env.topic(),
                payload: v[9..].to_vec(),
            })),
            Err(why) => {
                tracing::error!(seq, %why, "outbox message cannot be sent: kept aside in outbox_quarantine");
                let was_sent = (&self.outbox, &self.quarantine, &self.sent)
                    .transaction(|(o, q, sent)| {
                        o.remove(k)?;
                        q.insert(k, v)?;
                        Ok(sent.remove(k)?.is_some())
                    })
                    .map_err(tx_error)?;
                self.queued.fetch_sub(1, Ordering::Relaxed);
                if was_sent {
                    self.awaiting.fetch_sub(1, Ordering::Relaxed);
                }
                Ok(None)
            }
        }
    }

    /// The broker has the message: it waits for central's receipt from now on. (Not flushed at
    /// once: losing this in a crash only means sending the message again, which central
    /// confirms again and ignores.)
    pub fn broker_has(&self, seq: u64, wire: u64) -> Result<()> {
        if !self.outbox.contains_key(be(seq))? {
            return Ok(()); // confirmed before the broker's acknowledgement came
        }
        let times = self
            .sent
            .get(be(seq))?
            .and_then(|v| SentRecord::read(&v))
            .map_or(0, |s| s.times);
        let rec = SentRecord {
            at: now(),
            times: times + 1,
            wire,
        };
        if self.sent.insert(be(seq), &rec.bytes())?.is_none() {
            self.awaiting.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Central has these messages (its receipt's wire sequence numbers): they leave the outbox.
    /// A number that names no message of this store is ignored. Returns how many left.
    pub fn confirmed(&self, wires: &[u64]) -> Result<usize> {
        let mut gone = 0;
        for &wire in wires {
            let seq = (wire & COUNTER_MASK).wrapping_sub(self.counter_offset) & COUNTER_MASK;
            let k = be(seq);
            let matches = match self.sent.get(k)?.and_then(|v| SentRecord::read(&v)) {
                Some(s) => s.wire == wire,
                // A receipt that came before the broker's acknowledgement was handled.
                None => match self.outbox.get(k)? {
                    Some(v) => self.readable(&k, &v)?.is_some_and(|o| o.wire == wire),
                    None => false,
                },
            };
            if !matches {
                continue;
            }
            let (removed, was_sent) = (&self.outbox, &self.sent)
                .transaction(|(o, sent)| Ok((o.remove(&k)?.is_some(), sent.remove(&k)?.is_some())))
                .map_err(tx_error)?;
            if removed {
                self.queued.fetch_sub(1, Ordering::Relaxed);
                gone += 1;
            }
            if was_sent {
                self.awaiting.fetch_sub(1, Ordering::Relaxed);
            }
        }
        Ok(gone)
    }

    pub(super) fn count_queued(&self, n: usize) {
        self.queued.fetch_add(n as i64, Ordering::Relaxed);
    }

    /// Messages central has not confirmed yet (whether the broker has them or not).
    pub fn backlog(&self) -> usize {
        self.queued.load(Ordering::Relaxed).max(0) as usize
    }

    /// Of the backlog, messages the broker took that central has not confirmed yet.
    pub fn unconfirmed(&self) -> usize {
        (self.awaiting.load(Ordering::Relaxed).max(0) as usize).min(self.backlog())
    }

    /// Of the backlog, messages not yet taken by the broker.
    pub fn unsent(&self) -> usize {
        self.backlog() - self.unconfirmed()
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

/// When a message went to the broker, how many times, and under which wire sequence number.
struct SentRecord {
    at: u64,
    times: u64,
    wire: u64,
}

impl SentRecord {
    fn read(v: &[u8]) -> Option<Self> {
        let n = |i: usize| Some(u64::from_be_bytes(v.get(i * 8..i * 8 + 8)?.try_into().ok()?));
        Some(SentRecord {
            at: n(0)?,
            times: n(1)?,
            wire: n(2)?,
        })
    }

    fn bytes(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&self.at.to_be_bytes());
        b[8..16].copy_from_slice(&self.times.to_be_bytes());
        b[16..].copy_from_slice(&self.wire.to_be_bytes());
        b
    }
}
