//! The uplink to central: one task owns the MQTT connection and drains the store's outbox.
//!
//! Every result is in the outbox (on disk) before anything is sent. The task publishes the
//! outbox in order with QoS 1, at most `inflight` messages unacknowledged at a time. The
//! broker's PUBACK only marks a message as sent: it leaves the outbox when central's receipt
//! (on `wbc-receipt/<clinic>/<device>`) names it, because a broker that crashes before saving,
//! or an access list that silently drops a publish, acknowledges too. A message the broker
//! took that central has not confirmed after `confirm_after_s` is sent again (then after twice
//! as long each time, up to a day). A lost connection ends the session: the next one (after a
//! back-off) starts again from the oldest message not yet taken by the broker, so a message
//! whose PUBACK was lost is sent again — with the same id, which central keeps once and
//! confirms again. The device's status is published retained (`online`, with the backlog) and
//! the broker publishes `offline`, the connection's last will, when the device disappears.

use crate::store::Store;
use anyhow::{Context, Result};
use rumqttc::{AsyncClient, Event, LastWill, Outgoing, Packet, QoS};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use wbc_protocol::mqtt::{Backoff, drive};
use wbc_protocol::shutdown::Shutdown;
use wbc_protocol::signed::{Announcement, announcement_topics};
use wbc_protocol::uplink::{
    DeviceState, Kind, Receipt, Status, UPLINK_SCHEMA_VERSION, device_identity, receipt_topic, topic,
};

pub use wbc_config::UplinkConfig;

/// What the uplink is doing, for the UI and `/health`.
#[derive(Debug, Default)]
pub struct UplinkState {
    connected: AtomicBool,
    delivered: AtomicU64,
    confirmed: AtomicU64,
    resent: AtomicU64,
    last_error: std::sync::Mutex<Option<String>>,
}

impl UplinkState {
    /// Connected to the broker now.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Messages the broker acknowledged since the start.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Messages central confirmed since the start.
    pub fn confirmed(&self) -> u64 {
        self.confirmed.load(Ordering::Relaxed)
    }

    /// Messages sent again since the start because central had not confirmed them in time.
    pub fn resent(&self) -> u64 {
        self.resent.load(Ordering::Relaxed)
    }

    /// Why the last connection ended, if it failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().expect("uplink state").clone()
    }
}

/// The uplink task.
pub struct Uplink {
    store: Arc<Store>,
    config: UplinkConfig,
    model_version: u64,
    state: Arc<UplinkState>,
    announcements: Option<std::sync::mpsc::SyncSender<Announcement>>,
}

impl Uplink {
    /// An uplink draining `store`.
    pub fn new(store: Arc<Store>, config: UplinkConfig, model_version: u64) -> Self {
        Uplink {
            store,
            config,
            model_version,
            state: Arc::default(),
            announcements: None,
        }
    }

    /// Subscribes to central's update announcements for this device and hands them to `tx`
    /// (the updater).
    pub fn with_announcements(mut self, tx: std::sync::mpsc::SyncSender<Announcement>) -> Self {
        self.announcements = Some(tx);
        self
    }

    /// Its state, to show.
    pub fn state(&self) -> Arc<UplinkState> {
        self.state.clone()
    }

    fn status(&self, state: DeviceState) -> Vec<u8> {
        let id = self.store.identity();
        serde_json::to_vec(&Status {
            schema_version: UPLINK_SCHEMA_VERSION,
            clinic: id.clinic.clone(),
            device: id.device.clone(),
            state,
            at: crate::app::now(),
            backlog: Some(self.store.backlog() as u64),
            model_version: Some(self.store.active_model().unwrap_or(self.model_version)),
        })
        .expect("serialising to memory")
    }

    fn status_topic(&self) -> String {
        let id = self.store.identity();
        topic(&id.clinic, &id.device, Kind::Status)
    }

    /// A message from the broker: central's receipt confirms messages; an update announcement
    /// goes to the updater; anything else is dropped (with a warning).
    fn incoming(&self, id: &crate::store::Identity, topic: &str, payload: &[u8]) -> Result<()> {
        let shown: String = topic.chars().take(200).collect();
        if topic == receipt_topic(&id.clinic, &id.device) {
            match Receipt::decode(payload) {
                Ok(r) => {
                    let n = self.store.confirmed(&r.seqs)?;
                    self.state.confirmed.fetch_add(n as u64, Ordering::Relaxed);
                    tracing::debug!(named = r.seqs.len(), confirmed = n, "central's receipt");
                }
                Err(e) => tracing::warn!(error = %e, "unusable receipt ignored"),
            }
            return Ok(());
        }
        let tx = match &self.announcements {
            Some(tx) if announcement_topics(&id.clinic, &id.device).iter().any(|t| t == topic) => tx,
            _ => {
                tracing::warn!(topic = %shown, "unexpected incoming message dropped");
                return Ok(());
            }
        };
        if payload.is_empty() {
            return Ok(()); // a withdrawn (cleared) announcement
        }
        match Announcement::parse(payload) {
            Ok(a) => {
                tracing::info!(topic = %shown, model_version = a.model_version, "update announced");
                if tx.try_send(a).is_err() {
                    tracing::warn!("the updater is busy: announcement dropped (it is retained and comes again)");
                }
            }
            Err(e) => tracing::warn!(topic = %shown, error = %e, "unusable update announcement ignored"),
        }
        Ok(())
    }

    /// Runs until `stop` is triggered: connects, drains, reconnects with back-off.
    pub async fn run(self, stop: Shutdown) {
        let mut backoff = Backoff::new(Duration::from_secs(self.config.max_backoff_s));
        loop {
            let r = self.session(&stop, &mut backoff).await;
            self.state.connected.store(false, Ordering::Relaxed);
            match r {
                Ok(()) => return,
                Err(e) => {
                    let msg = format!("{e:#}");
                    tracing::warn!(error = %msg, backlog = self.store.backlog(), "uplink disconnected; will retry");
                    *self.state.last_error.lock().expect("uplink state") = Some(msg);
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = stop.wait() => return,
            }
        }
    }

    /// One connection, from connect to its end. `Ok` only when asked to stop.
    async fn session(&self, stop: &Shutdown, backoff: &mut Backoff) -> Result<()> {
        let id = self.store.identity().clone();
        let mut opts = self
            .config
            .broker
            .options(&format!("wbc.{}", device_identity(&id.clinic, &id.device)))?;
        let window = usize::from(self.config.inflight);
        opts.set_clean_session(true);
        opts.set_inflight(self.config.inflight);
        opts.set_last_will(LastWill::new(
            self.status_topic(),
            self.status(DeviceState::Offline),
            QoS::AtLeastOnce,
            true,
        ));
        let (client, events) = AsyncClient::new(opts, window * 2 + 8);
        let mut events = drive(events);
        // Outbox messages (sequence number and wire number; None: a status) in the order they
        // were handed to the client, waiting for their packet id; then by packet id, waiting
        // for their PUBACK. `busy` holds the outbox keys among them.
        let mut unsent: VecDeque<Option<(u64, u64)>> = VecDeque::new();
        let mut inflight: HashMap<u16, Option<(u64, u64)>> = HashMap::new();
        let mut busy: HashSet<u64> = HashSet::new();
        // Messages central has not confirmed in time, to send again before new ones.
        let mut resends: VecDeque<crate::store::Outgoing> = VecDeque::new();
        let mut cursor = 0u64;
        let mut connected = false;
        let mut status_tick = tokio::time::interval(Duration::from_secs(self.config.status_every_s));
        let confirm_after = self.config.confirm_after_s.max(1);
        let mut resend_tick = tokio::time::interval(Duration::from_secs(confirm_after.min(60)));
        loop {
            if connected {
                let room = window.saturating_sub(unsent.len() + inflight.len());
                let mut batch: Vec<(crate::store::Outgoing, bool)> = Vec::new();
                while batch.len() < room
                    && let Some(o) = resends.pop_front()
                {
                    batch.push((o, true));
                }
                if batch.len() < room {
                    let (fresh, next) = self.store.unsent_from(cursor, room - batch.len())?;
                    cursor = next;
                    batch.extend(fresh.into_iter().map(|o| (o, false)));
                }
                for (o, again) in batch {
                    if !busy.insert(o.seq) {
                        continue;
                    }
                    client
                        .publish(o.topic, QoS::AtLeastOnce, false, o.payload)
                        .await
                        .context("queueing a message for the broker")?;
                    unsent.push_back(Some((o.seq, o.wire)));
                    if again {
                        self.state.resent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            tokio::select! {
                ev = events.recv() => match ev.context("connection task ended")?.context("connection to the broker")? {
                    Event::Incoming(Packet::ConnAck(_)) => {
                        connected = true;
                        backoff.reset();
                        self.state.connected.store(true, Ordering::Relaxed);
                        tracing::info!(backlog = self.store.backlog(), "uplink connected");
                        client.subscribe(receipt_topic(&id.clinic, &id.device), QoS::AtLeastOnce).await?;
                        client.publish(self.status_topic(), QoS::AtLeastOnce, true, self.status(DeviceState::Online)).await?;
                        unsent.push_back(None);
                        if self.announcements.is_some() {
                            for t in announcement_topics(&id.clinic, &id.device) {
                                client.subscribe(t, QoS::AtLeastOnce).await?;
                            }
                        }
                    }
                    Event::Outgoing(Outgoing::Publish(pkid)) => {
                        let seq = unsent.pop_front().context("a publish the uplink did not make")?;
                        inflight.insert(pkid, seq);
                    }
                    Event::Incoming(Packet::PubAck(ack)) => {
                        match inflight.remove(&ack.pkid) {
                            Some(Some((seq, wire))) => {
                                busy.remove(&seq);
                                self.store.broker_has(seq, wire)?;
                                self.state.delivered.fetch_add(1, Ordering::Relaxed);
                            }
                            Some(None) => {}
                            None => tracing::warn!(pkid = ack.pkid, "acknowledgement of nothing sent: ignored"),
                        }
                    }
                    Event::Incoming(Packet::Publish(p)) => self.incoming(&id, &p.topic, &p.payload)?,
                    _ => {}
                },
                _ = resend_tick.tick() => {
                    if connected && resends.is_empty() {
                        let due = self.store.overdue(crate::app::now(), confirm_after, window * 4)?;
                        if !due.is_empty() {
                            tracing::info!(messages = due.len(), "sending again what central has not confirmed");
                        }
                        resends.extend(due.into_iter().filter(|o| !busy.contains(&o.seq)));
                    }
                }
                _ = self.store.queued() => {}
                _ = status_tick.tick() => {
                    if connected {
                        client.publish(self.status_topic(), QoS::AtLeastOnce, true, self.status(DeviceState::Online)).await?;
                        unsent.push_back(None);
                    }
                }
                _ = stop.wait() => {
                    if connected {
                        // A clean goodbye: the broker does not publish the will then, so say it.
                        let _ = client.try_publish(self.status_topic(), QoS::AtLeastOnce, true, self.status(DeviceState::Offline));
                        let _ = client.try_disconnect();
                        let deadline = tokio::time::sleep(Duration::from_secs(2));
                        tokio::pin!(deadline);
                        loop {
                            tokio::select! {
                                ev = events.recv() => if !matches!(ev, Some(Ok(_))) { break },
                                _ = &mut deadline => break,
                            }
                        }
                    }
                    return Ok(());
                }
            }
        }
    }
}
