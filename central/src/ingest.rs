//! Receives every clinic's messages from the broker.
//!
//! Central keeps a persistent MQTT session (clean session off, a fixed client id), so the
//! broker holds QoS 1 messages while central is down, and acknowledges each message only
//! after it is committed to the database: a crash before the commit means the broker sends it
//! again. Anything malformed or unexpected is recorded as rejected, logged, acknowledged (so it
//! is not sent again forever) and otherwise ignored; so is a message the database refuses for
//! its content. Only a database that is down (or full, or busy) stops ingest.
//!
//! Once a device's message is committed (or refused for good), central says so in a receipt
//! on `wbc-receipt/<clinic>/<device>`, sent in batches: the device keeps every message until
//! a receipt names it, since the broker's own acknowledgement does not mean central has it.

use crate::db::{Applied, Db};
use crate::sql::refused_for_content;
use anyhow::{Context, Result};
use rumqttc::{AsyncClient, Event, Packet, Publish, QoS};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use wbc_protocol::mqtt::{Backoff, BrokerConfig, drive};
use wbc_protocol::shutdown::Shutdown;
use wbc_protocol::uplink::{
    ALL_DEVICES, Envelope, Kind, MAX_RECEIPT_SEQS, Receipt, Status, parse_topic, receipt_topic,
};

/// Counters, for the API and the logs.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connected to the broker and subscribed to the devices' results now.
    pub connected: AtomicBool,
    /// Messages stored (first time seen).
    pub stored: AtomicU64,
    /// Messages seen again and ignored.
    pub duplicates: AtomicU64,
    /// Messages refused.
    pub rejected: AtomicU64,
    /// Status updates.
    pub statuses: AtomicU64,
    /// Messages confirmed to their device in a receipt.
    pub confirmed: AtomicU64,
}

/// A device's message central is done with, to confirm: clinic, device, sequence number.
pub type Done = (String, String, u64);

/// Handles one received message; never fails on bad input (only on a database error).
/// Returns the device message to confirm: one stored now or before, or one whose content the
/// database refuses (recorded as rejected: sending it again would not help).
pub fn handle(db: &Db, stats: &Stats, topic: &str, payload: &[u8]) -> Result<Option<Done>> {
    let reject = |reason: String| -> Result<()> {
        tracing::warn!(topic = %topic.chars().take(200).collect::<String>(), %reason, "message rejected");
        stats.rejected.fetch_add(1, Ordering::Relaxed);
        db.note_rejected(topic, &reason)
    };
    let kind = match parse_topic(topic) {
        Ok((_, _, k)) => k,
        Err(e) => return reject(e.to_string()).map(|()| None),
    };
    if kind == Kind::Status {
        // An empty retained payload clears a status; nothing to store.
        if payload.is_empty() {
            return Ok(None);
        }
        return match Status::decode(topic, payload) {
            Ok(s) => match db.set_status(&s) {
                Ok(()) => {
                    stats.statuses.fetch_add(1, Ordering::Relaxed);
                    Ok(None)
                }
                Err(err) if refused_for_content(&err) => {
                    reject(format!("the database refused its content: {err:#}")).map(|()| None)
                }
                Err(err) => Err(err),
            },
            Err(e) => reject(e.to_string()).map(|()| None),
        };
    }
    match Envelope::decode(topic, payload) {
        Ok(e) => {
            match db.apply(&e) {
                Ok(Applied::New) => stats.stored.fetch_add(1, Ordering::Relaxed),
                Ok(Applied::Duplicate) => stats.duplicates.fetch_add(1, Ordering::Relaxed),
                Err(err) if refused_for_content(&err) => {
                    reject(format!("the database refused its content: {err:#}"))?;
                    0
                }
                Err(err) => return Err(err),
            };
            Ok(Some((e.clinic, e.device, e.seq)))
        }
        Err(e) => reject(e.to_string()).map(|()| None),
    }
}

/// Receipts waiting to be handed to the connection, per device.
#[derive(Default)]
struct Receipts(HashMap<(String, String), Vec<u64>>);

impl Receipts {
    fn add(&mut self, (clinic, device, seq): Done) {
        self.0.entry((clinic, device)).or_default().push(seq);
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Hands every waiting receipt to the client, as far as it takes them; the rest waits.
    fn send(&mut self, client: &AsyncClient, stats: &Stats) {
        self.0.retain(|(clinic, device), seqs| {
            while !seqs.is_empty() {
                let n = seqs.len().min(MAX_RECEIPT_SEQS);
                let receipt = Receipt::new(seqs[..n].to_vec());
                if client
                    .try_publish(receipt_topic(clinic, device), QoS::AtLeastOnce, false, receipt.encode())
                    .is_err()
                {
                    return true;
                }
                stats.confirmed.fetch_add(n as u64, Ordering::Relaxed);
                seqs.drain(..n);
            }
            false
        });
    }
}

/// Central's connection to the broker.
pub struct Ingest {
    /// The database.
    pub db: Arc<Db>,
    /// The broker.
    pub broker: BrokerConfig,
    /// MQTT client id: fixed, so that the broker keeps central's session.
    pub client_id: String,
    /// Counters.
    pub stats: Arc<Stats>,
}

impl Ingest {
    /// Runs until `stop` is triggered, reconnecting with back-off.
    pub async fn run(self, stop: Shutdown) {
        let mut backoff = Backoff::new(Duration::from_secs(30));
        loop {
            let r = self.session(&stop, &mut backoff).await;
            self.stats.connected.store(false, Ordering::Relaxed);
            match r {
                Ok(()) => return,
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "broker connection lost; will retry"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = stop.wait() => return,
            }
        }
    }

    async fn session(&self, stop: &Shutdown, backoff: &mut Backoff) -> Result<()> {
        let mut opts = self.broker.options(&self.client_id)?;
        opts.set_clean_session(false);
        opts.set_manual_acks(true);
        let (client, events) = AsyncClient::new(opts, 1024);
        let mut events = drive(events);
        // Acknowledgements not yet handed to the event loop. A broker with a backlog for central
        // may push thousands of messages without waiting, faster than the event loop takes
        // requests; waiting for room here would stop this loop from taking events, and the event
        // loop from taking acknowledgements. So acknowledgements queue here instead.
        let mut acks: VecDeque<Publish> = VecDeque::new();
        let mut receipts = Receipts::default();
        let mut receipt_tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            while let Some(p) = acks.front() {
                if client.try_ack(p).is_err() {
                    break;
                }
                acks.pop_front();
            }
            tokio::select! {
                ev = events.recv() => match ev.context("connection task ended")?.context("connection to the broker")? {
                    Event::Incoming(Packet::ConnAck(ack)) => {
                        backoff.reset();
                        tracing::info!(session_present = ack.session_present, "connected to the broker");
                        client.subscribe(ALL_DEVICES, QoS::AtLeastOnce).await?;
                    }
                    // Connected for ingest once subscribed: before the broker has the
                    // subscription (the very first start) it keeps nothing for central.
                    Event::Incoming(Packet::SubAck(_)) => {
                        self.stats.connected.store(true, Ordering::Relaxed);
                    }
                    Event::Incoming(Packet::Publish(p)) => {
                        let db = self.db.clone();
                        let stats = self.stats.clone();
                        let topic = p.topic.clone();
                        let payload = p.payload.clone();
                        let done = tokio::task::spawn_blocking(move || handle(&db, &stats, &topic, &payload))
                            .await
                            .context("message handler")??;
                        // Only now, committed, may the broker forget it, and the device too.
                        acks.push_back(p);
                        if let Some(d) = done {
                            receipts.add(d);
                        }
                    }
                    _ => {}
                },
                _ = receipt_tick.tick(), if !receipts.is_empty() => receipts.send(&client, &self.stats),
                _ = tokio::time::sleep(std::time::Duration::from_millis(5)), if !acks.is_empty() => {}
                _ = stop.wait() => {
                    let _ = client.try_disconnect();
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::{Conn, databases, is_postgres_url};
    use wbc_protocol::uplink::{Body, ModelEvent, ModelMessage};

    fn event(clinic: &str, device: &str, seq: u64, detail: &str) -> Envelope {
        Envelope::new(
            clinic,
            device,
            seq,
            seq,
            Body::Model(ModelMessage {
                event: ModelEvent::Rejected,
                model_version: 3,
                detail: detail.into(),
            }),
        )
    }

    fn send(db: &Db, stats: &Stats, e: &Envelope) -> Result<Option<Done>> {
        handle(db, stats, &e.topic(), &serde_json::to_vec(e).unwrap())
    }

    #[test]
    fn a_message_with_a_nul_is_kept_cleaned_and_another_clinics_messages_still_arrive() {
        for (_guard, path) in databases() {
            let db = Db::open(&path).unwrap();
            let stats = Stats::default();
            // What a USB stick's refused bundle puts in a `rejected` event: its claimed key id.
            send(&db, &stats, &event("north", "scope-1", 1, "unknown key \u{0}\u{0}id")).unwrap();
            send(&db, &stats, &event("south", "scope-2", 1, "fine")).unwrap();
            assert_eq!(stats.stored.load(Ordering::Relaxed), 2, "{}", path.display());
            let events = db.model_events(None, 10).unwrap();
            assert!(
                events
                    .iter()
                    .any(|e| e.clinic == "north" && e.detail == "unknown key id")
            );
            assert!(events.iter().any(|e| e.clinic == "south"));
        }
    }

    #[test]
    fn content_the_database_refuses_is_rejected_and_only_a_database_that_is_down_stops_ingest() {
        for (server, path) in databases() {
            let url = path.to_string_lossy().to_string();
            let db = Db::open(&path).unwrap();
            // Past the decoder's cleaning, straight to the database: PostgreSQL refuses a NUL.
            match db.apply(&event("north", "scope-1", 7, "a\u{0}b")) {
                Ok(_) => assert!(!is_postgres_url(&url), "PostgreSQL took a NUL"),
                Err(e) => assert!(refused_for_content(&e), "{e:#}"),
            }
            let mut c = Conn::open(&url).unwrap();
            let e = c
                .exec(
                    "INSERT INTO rejected (topic, reason, at) VALUES ($1, NULL, 1)",
                    &["t".into()],
                )
                .unwrap_err();
            assert!(refused_for_content(&e), "a constraint: {e:#}");
            drop(c);
            if is_postgres_url(&url) {
                // The server stops: the message waits at the broker, unacknowledged.
                drop(server);
                let stats = Stats::default();
                let e = send(&db, &stats, &event("south", "scope-2", 1, "fine")).unwrap_err();
                assert!(!refused_for_content(&e), "{e:#}");
                assert_eq!(stats.rejected.load(Ordering::Relaxed), 0);
            }
        }
    }
}
