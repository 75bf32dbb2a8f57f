//! Where results live on the appliance: a sled database that survives power cuts.
//!
//! Trees (keys are big-endian numbers, so that byte order is numeric order; every value starts
//! with a one-byte format version, then JSON):
//!
//! | tree | key | value |
//! |---|---|---|
//! | `fields` | field seq | [`FieldRecord`] without reviews |
//! | `field_ids` | field id | field seq |
//! | `reviews` | field seq ‖ cell index (u32) | [`Review`] |
//! | `slides` | slide seq | [`SlideState`] |
//! | `slide_ids` | slide id | slide seq |
//! | `slide_fields` | slide seq ‖ field seq | — |
//! | `images` | field seq | original image bytes |
//! | `image_meta` | field seq | stored at (u64) ‖ length (u64) |
//! | `outbox` | message seq | field seq (u64, `u64::MAX` for none) ‖ [`Envelope`] |
//! | `meta` | name | the active model's version, … |
//!
//! Every change that carries results is one transaction over the trees it touches, followed
//! by a flush: when a write returns, the result is on disk, and a crash at any moment leaves
//! either all of the change or none of it. A result goes into the outbox in the same
//! transaction as the field, so nothing is stored that the uplink will not eventually send.
//! Sequence numbers come from sled's persistent id generator: increasing, never reused. A
//! message's wire sequence number puts a random 24-bit store epoch (drawn when the store is
//! created) above the 40-bit counter, so that a wiped or replaced store does not reuse the
//! message ids central has already seen. A message that cannot be read back (damaged, or
//! written by a newer build) is moved to the `outbox_quarantine` tree, never deleted.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::{Transactional, Tree};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use wbc_shared::messages::{FieldRecord, Review};
use wbc_shared::uplink::{Body, Envelope, MAX_PAYLOAD_BYTES, ModelMessage, ReviewMessage, valid_id};

/// Format version of every stored value.
const VALUE_VERSION: u8 = 1;

/// A slide: the fields counted together for one differential.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlideState {
    /// Slide id.
    pub id: String,
    /// When it was started, seconds since the Unix epoch.
    pub started_at: u64,
    /// When the technician closed it.
    #[serde(default)]
    pub finished_at: Option<u64>,
}

/// How long things are kept and how much room is left free.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    /// Original images are kept up to this many bytes in all (oldest removed first; the
    /// results stay).
    pub max_image_bytes: u64,
    /// Original images older than this many days are removed (0: kept until the byte limit).
    pub image_max_age_days: u32,
    /// Results that central has received and are older than this many days are removed
    /// (0: kept). Results not yet delivered are never removed.
    pub result_max_age_days: u32,
    /// Below this much free disk space, new fields are refused (with a message saying so)
    /// instead of risking a full disk.
    pub min_free_bytes: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_image_bytes: 4 << 30,
            image_max_age_days: 0,
            result_max_age_days: 365,
            min_free_bytes: 512 << 20,
        }
    }
}

/// Who the appliance is, for the messages it queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Clinic id.
    pub clinic: String,
    /// Device id.
    pub device: String,
}

/// What a retention pass removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Original images removed.
    pub images: u64,
    /// Delivered fields (with their cells and reviews) removed.
    pub fields: u64,
}

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

/// The appliance's store.
pub struct Store {
    db: sled::Db,
    dir: PathBuf,
    identity: Identity,
    retention: Retention,
    fields: Tree,
    field_ids: Tree,
    reviews: Tree,
    slides: Tree,
    slide_ids: Tree,
    slide_fields: Tree,
    images: Tree,
    image_meta: Tree,
    outbox: Tree,
    quarantine: Tree,
    model_log: Tree,
    meta: Tree,
    /// Random epoch of this store, above the counter in wire sequence numbers.
    epoch: u64,
    /// Messages in the outbox (sled counts a tree by walking it). Signed: an acknowledgement
    /// can be counted a moment before the write that queued the message is.
    queued: std::sync::atomic::AtomicI64,
    /// Serialises read-modify-write of reviews and slides (sled transactions would retry; a
    /// lock keeps it simple).
    lock: std::sync::Mutex<()>,
    /// Wakes the uplink when something is queued.
    notify: tokio::sync::Notify,
}

fn be(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

fn be2(a: u64, b: u64) -> [u8; 16] {
    let mut k = [0; 16];
    k[..8].copy_from_slice(&a.to_be_bytes());
    k[8..].copy_from_slice(&b.to_be_bytes());
    k
}

fn read_u64(b: &[u8]) -> Result<u64> {
    Ok(u64::from_be_bytes(b.get(..8).context("short key")?.try_into()?))
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![VALUE_VERSION];
    serde_json::to_writer(&mut out, v).expect("serialising to memory");
    out
}

fn decode<T: for<'de> Deserialize<'de>>(b: &[u8], what: &str) -> Result<T> {
    match b.first() {
        Some(&VALUE_VERSION) => serde_json::from_slice(&b[1..]).with_context(|| format!("damaged {what} record")),
        Some(v) => bail!("{what} record in format {v}, which this build does not know"),
        None => bail!("empty {what} record"),
    }
}

fn check_id(id: &str) -> Result<()> {
    if !valid_id(id) {
        bail!("invalid id {:?}", id.chars().take(80).collect::<String>());
    }
    Ok(())
}

type TxResult<T> = std::result::Result<T, ConflictableTransactionError<anyhow::Error>>;

fn abort<T>(e: anyhow::Error) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

fn tx_error(e: TransactionError<anyhow::Error>) -> anyhow::Error {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => anyhow::Error::new(e).context("store write failed"),
    }
}

/// Seconds since the Unix epoch.
fn now() -> u64 {
    crate::app::now()
}

impl Store {
    /// Opens (creating) the store in `dir`. Another process holding it is an error.
    pub fn open(dir: &Path, identity: Identity, retention: Retention) -> Result<Self> {
        check_id(&identity.clinic)?;
        check_id(&identity.device)?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let db = sled::Config::new().path(dir).open().with_context(|| {
            format!(
                "opening the store in {} (is another appliance using it?)",
                dir.display()
            )
        })?;
        let t = |n: &str| db.open_tree(n).with_context(|| format!("opening tree {n}"));
        let meta = t("meta")?;
        let epoch = match meta.get(b"epoch")? {
            Some(v) => read_u64(&v)?,
            None => {
                let e = rand::random::<u64>() & 0xff_ffff;
                meta.insert(b"epoch", &be(e))?;
                db.flush()?;
                e
            }
        };
        let outbox_len = t("outbox")?.len();
        Ok(Store {
            fields: t("fields")?,
            field_ids: t("field_ids")?,
            reviews: t("reviews")?,
            slides: t("slides")?,
            slide_ids: t("slide_ids")?,
            slide_fields: t("slide_fields")?,
            images: t("images")?,
            image_meta: t("image_meta")?,
            outbox: t("outbox")?,
            quarantine: t("outbox_quarantine")?,
            model_log: t("model_log")?,
            queued: std::sync::atomic::AtomicI64::new(outbox_len as i64),
            meta,
            epoch,
            dir: dir.to_path_buf(),
            identity,
            retention,
            db,
            lock: std::sync::Mutex::new(()),
            notify: tokio::sync::Notify::new(),
        })
    }

    /// Who the messages come from.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Makes everything written so far durable.
    fn flush(&self) -> Result<()> {
        self.db.flush().context("flushing the store to disk")?;
        Ok(())
    }

    /// Puts messages into the outbox inside a transaction.
    fn queue(&self, outbox: &TransactionalTree, field_seq: Option<u64>, bodies: &[Body]) -> TxResult<()> {
        for body in bodies {
            let seq = outbox.generate_id()?;
            let wire_seq = (self.epoch << 40) | (seq & ((1 << 40) - 1));
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

    /// Free bytes on the store's file system.
    pub fn free_bytes(&self) -> Result<u64> {
        let s =
            rustix::fs::statvfs(&self.dir).with_context(|| format!("checking free space of {}", self.dir.display()))?;
        Ok(s.f_bavail.saturating_mul(s.f_frsize))
    }

    /// Refuses new work when the disk is nearly full.
    pub fn check_space(&self) -> Result<()> {
        let free = self.free_bytes()?;
        if free < self.retention.min_free_bytes {
            bail!(
                "the disk is nearly full ({} MB free, {} MB are kept free): new fields are refused until space is \
                 freed; everything already stored is intact",
                free >> 20,
                self.retention.min_free_bytes >> 20
            );
        }
        Ok(())
    }

    /// Stores a new field, its original image and one outbox message per cell as one durable
    /// step. A field whose id is already stored is left as it is (returns `false`).
    pub fn add_field(&self, field: &FieldRecord, image: Option<&[u8]>) -> Result<bool> {
        self.add_field_with(field, image, Body::cells_of(field))
    }

    /// [`Store::add_field`] with the field's cell messages made by the caller (with the
    /// pictures of the cells that carry one, [`Body::cells_with_pictures`]).
    pub fn add_field_with(&self, field: &FieldRecord, image: Option<&[u8]>, bodies: Vec<Body>) -> Result<bool> {
        check_id(&field.id)?;
        check_id(&field.slide_id)?;
        let _g = self.lock.lock().expect("store lock");
        let slide_seq = self
            .slide_seq(&field.slide_id)?
            .with_context(|| format!("no slide {}", field.slide_id))?;
        let mut stored = field.clone();
        for c in &mut stored.cells {
            c.review = None;
        }
        let value = encode(&stored);
        let added = (
            &self.fields,
            &self.field_ids,
            &self.slide_fields,
            &self.images,
            &self.image_meta,
            &self.outbox,
        )
            .transaction(|(fields, ids, slide_fields, images, image_meta, outbox)| {
                if ids.get(field.id.as_bytes())?.is_some() {
                    return Ok(false);
                }
                let seq = fields.generate_id()?;
                fields.insert(&be(seq), value.as_slice())?;
                ids.insert(field.id.as_bytes(), &be(seq))?;
                slide_fields.insert(&be2(slide_seq, seq), &[])?;
                if let Some(img) = image {
                    images.insert(&be(seq), img)?;
                    image_meta.insert(&be(seq), &be2(now(), img.len() as u64))?;
                }
                self.queue(outbox, Some(seq), &bodies)?;
                Ok(true)
            })
            .map_err(tx_error)?;
        self.flush()?;
        drop(_g);
        if added {
            self.count_queued(bodies.len());
            self.notify.notify_one();
            if image.is_some() {
                self.enforce_image_quota()?;
            }
        }
        Ok(added)
    }

    fn field_seq(&self, id: &str) -> Result<Option<u64>> {
        self.field_ids.get(id.as_bytes())?.map(|v| read_u64(&v)).transpose()
    }

    fn slide_seq(&self, id: &str) -> Result<Option<u64>> {
        self.slide_ids.get(id.as_bytes())?.map(|v| read_u64(&v)).transpose()
    }

    fn load_field(&self, seq: u64) -> Result<Option<FieldRecord>> {
        let Some(v) = self.fields.get(be(seq))? else {
            return Ok(None);
        };
        let mut f: FieldRecord = decode(&v, "field")?;
        for r in self.reviews.scan_prefix(be(seq)) {
            let (k, v) = r?;
            let cell = u64::from(u32::from_be_bytes(k[8..12].try_into()?)) as usize;
            if let Some(c) = f.cells.get_mut(cell) {
                c.review = Some(decode(&v, "review")?);
            }
        }
        Ok(Some(f))
    }

    /// A field by id, with its reviews.
    pub fn field(&self, id: &str) -> Result<Option<FieldRecord>> {
        check_id(id)?;
        match self.field_seq(id)? {
            Some(seq) => self.load_field(seq),
            None => Ok(None),
        }
    }

    /// The fields of a slide, oldest first. A damaged record is logged and skipped, so that
    /// one bad record never hides the others.
    pub fn fields_of_slide(&self, slide_id: &str) -> Result<Vec<FieldRecord>> {
        check_id(slide_id)?;
        let Some(s) = self.slide_seq(slide_id)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for r in self.slide_fields.scan_prefix(be(s)) {
            let (k, _) = r?;
            let seq = read_u64(&k[8..])?;
            match self.load_field(seq) {
                Ok(Some(f)) => out.push(f),
                Ok(None) => {}
                Err(e) => tracing::error!(error = %format!("{e:#}"), seq, "skipping a damaged field"),
            }
        }
        Ok(out)
    }

    /// Records a technician's review of one cell (replacing an earlier one) and queues it.
    pub fn put_review(&self, field_id: &str, cell: usize, review: &Review) -> Result<FieldRecord> {
        check_id(field_id)?;
        let _g = self.lock.lock().expect("store lock");
        let seq = self
            .field_seq(field_id)?
            .with_context(|| format!("no field {field_id}"))?;
        let f = self.load_field(seq)?.with_context(|| format!("no field {field_id}"))?;
        if cell >= f.cells.len() {
            bail!("field {field_id} has no cell {cell}");
        }
        let body = Body::Review(ReviewMessage {
            field_id: field_id.into(),
            slide_id: f.slide_id.clone(),
            index: cell as u32,
            review: review.clone(),
        });
        let mut key = [0u8; 12];
        key[..8].copy_from_slice(&be(seq));
        key[8..].copy_from_slice(&(cell as u32).to_be_bytes());
        let value = encode(review);
        (&self.reviews, &self.outbox)
            .transaction(|(reviews, outbox)| {
                reviews.insert(&key, value.as_slice())?;
                self.queue(outbox, Some(seq), std::slice::from_ref(&body))
            })
            .map_err(tx_error)?;
        self.flush()?;
        self.count_queued(1);
        self.notify.notify_one();
        drop(_g);
        self.load_field(seq)?.context("field vanished")
    }

    /// A field's original image, unless retention removed it.
    pub fn image(&self, field_id: &str) -> Result<Option<Vec<u8>>> {
        check_id(field_id)?;
        let Some(seq) = self.field_seq(field_id)? else {
            return Ok(None);
        };
        Ok(self.images.get(be(seq))?.map(|v| v.to_vec()))
    }

    /// Writes a slide (new or changed) and queues `outbox` messages with it, durably.
    pub fn put_slide(&self, slide: &SlideState, outbox: &[Body]) -> Result<()> {
        check_id(&slide.id)?;
        let _g = self.lock.lock().expect("store lock");
        let value = encode(slide);
        (&self.slides, &self.slide_ids, &self.outbox)
            .transaction(|(slides, ids, ob)| {
                let seq = match ids.get(slide.id.as_bytes())? {
                    Some(v) => match read_u64(&v) {
                        Ok(s) => s,
                        Err(e) => return abort(e),
                    },
                    None => {
                        let s = slides.generate_id()?;
                        ids.insert(slide.id.as_bytes(), &be(s))?;
                        s
                    }
                };
                slides.insert(&be(seq), value.as_slice())?;
                self.queue(ob, None, outbox)
            })
            .map_err(tx_error)?;
        self.flush()?;
        if !outbox.is_empty() {
            self.count_queued(outbox.len());
            self.notify.notify_one();
        }
        Ok(())
    }

    /// Tells central which model is active, once per model: queues a `model` message when
    /// `version` differs from the last one noted. Returns whether it did.
    pub fn note_active_model(&self, version: u64, detail: &str) -> Result<bool> {
        let m = ModelMessage {
            event: "active".into(),
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
        let body = Body::Model(m.clone());
        let entry = encode(&ModelLogEntry {
            at: now(),
            message: m.clone(),
        });
        let switches = matches!(m.event.as_str(), "active" | "rolled_back");
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

    /// All slides, oldest first.
    pub fn slides(&self) -> Result<Vec<SlideState>> {
        let mut out = Vec::new();
        for r in self.slides.iter() {
            let (_, v) = r?;
            match decode(&v, "slide") {
                Ok(s) => out.push(s),
                Err(e) => tracing::error!(error = %format!("{e:#}"), "skipping a damaged slide"),
            }
        }
        Ok(out)
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

    fn count_queued(&self, n: usize) {
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
    fn undelivered_fields(&self) -> Result<HashSet<u64>> {
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

    fn remove_image(&self, seq: u64) -> Result<()> {
        (&self.images, &self.image_meta)
            .transaction(|(i, m)| {
                i.remove(&be(seq))?;
                m.remove(&be(seq))?;
                Ok(())
            })
            .map_err(tx_error)
    }

    /// Removes the oldest images until the total is within the limit.
    fn enforce_image_quota(&self) -> Result<u64> {
        let mut metas = Vec::new();
        let mut total = 0u64;
        for r in self.image_meta.iter() {
            let (k, v) = r?;
            let (at, len) = (read_u64(&v)?, read_u64(&v[8..])?);
            total += len;
            metas.push((at, read_u64(&k)?, len));
        }
        metas.sort();
        let mut removed = 0;
        for (_, seq, len) in metas {
            if total <= self.retention.max_image_bytes {
                break;
            }
            self.remove_image(seq)?;
            total -= len;
            removed += 1;
        }
        if removed > 0 {
            tracing::info!(removed, "original images removed by the byte limit");
        }
        Ok(removed)
    }

    /// One retention pass at time `now`: images past their age or over the byte limit, and
    /// delivered results past their age. Undelivered results stay, whatever their age.
    pub fn prune(&self, now: u64) -> Result<Pruned> {
        let day = 86_400u64;
        let mut p = Pruned::default();
        if self.retention.image_max_age_days > 0 {
            let cutoff = now.saturating_sub(u64::from(self.retention.image_max_age_days) * day);
            for r in self.image_meta.iter() {
                let (k, v) = r?;
                if read_u64(&v)? < cutoff {
                    self.remove_image(read_u64(&k)?)?;
                    p.images += 1;
                }
            }
        }
        p.images += self.enforce_image_quota()?;
        if self.retention.result_max_age_days > 0 {
            let cutoff = now.saturating_sub(u64::from(self.retention.result_max_age_days) * day);
            let _g = self.lock.lock().expect("store lock");
            let pending = self.undelivered_fields()?;
            let mut kept_undelivered = 0u64;
            for r in self.fields.iter() {
                let (k, v) = r?;
                let seq = read_u64(&k)?;
                let f: FieldRecord = match decode(&v, "field") {
                    Ok(f) => f,
                    Err(_) => continue,
                };
                if f.received_at >= cutoff {
                    continue;
                }
                if pending.contains(&seq) {
                    kept_undelivered += 1;
                    continue;
                }
                self.remove_field(seq, &f)?;
                p.fields += 1;
            }
            if kept_undelivered > 0 {
                tracing::warn!(kept_undelivered, "old fields kept: central has not received them yet");
            }
        }
        self.flush()?;
        if p != Pruned::default() {
            tracing::info!(images = p.images, fields = p.fields, "retention pass");
        }
        Ok(p)
    }

    fn remove_field(&self, seq: u64, f: &FieldRecord) -> Result<()> {
        let slide = self.slide_seq(&f.slide_id)?;
        let review_keys: Vec<_> = self.reviews.scan_prefix(be(seq)).keys().collect::<Result<_, _>>()?;
        (
            &self.fields,
            &self.field_ids,
            &self.slide_fields,
            &self.reviews,
            &self.images,
            &self.image_meta,
        )
            .transaction(|(fields, ids, slide_fields, reviews, images, image_meta)| {
                fields.remove(&be(seq))?;
                ids.remove(f.id.as_bytes())?;
                if let Some(s) = slide {
                    slide_fields.remove(&be2(s, seq))?;
                }
                for k in &review_keys {
                    reviews.remove(k)?;
                }
                images.remove(&be(seq))?;
                image_meta.remove(&be(seq))?;
                Ok(())
            })
            .map_err(tx_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wbc_shared::messages::{CellRecord, CellResult, SCHEMA_VERSION};

    pub(crate) fn identity() -> Identity {
        Identity {
            clinic: "clinic-a".into(),
            device: "dev1".into(),
        }
    }

    fn field(id: &str, slide: &str, at: u64, cells: usize) -> FieldRecord {
        let probs = [0.0, 0.0, 0.0, 0.0, 1.0, 0.0];
        FieldRecord {
            schema_version: SCHEMA_VERSION,
            id: id.into(),
            slide_id: slide.into(),
            received_at: at,
            source: "test".into(),
            name: "x.jpg".into(),
            image_sha256: String::new(),
            width: 1,
            height: 1,
            single_cell: false,
            microns_per_pixel: 0.1,
            cells: (0..cells)
                .map(|_| CellRecord {
                    result: CellResult::from_probabilities(&probs, &Default::default(), "d".into(), 0.5, 1),
                    review: None,
                })
                .collect(),
        }
    }

    fn slide(id: &str, at: u64) -> SlideState {
        SlideState {
            id: id.into(),
            started_at: at,
            finished_at: None,
        }
    }

    /// Opens the store; after a drop in this process sled's background flusher may hold the
    /// file lock a moment longer, so a refusal is retried for a while.
    fn open(dir: &Path, r: Retention) -> Store {
        let t = std::time::Instant::now();
        loop {
            match Store::open(dir, identity(), r.clone()) {
                Ok(s) => return s,
                Err(_) if t.elapsed() < std::time::Duration::from_secs(10) => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("opening the store: {e:#}"),
            }
        }
    }

    #[test]
    fn fields_slides_reviews_and_images_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), Retention::default());
        s.put_slide(&slide("s1", 1), &[]).unwrap();
        s.put_slide(&slide("s2", 2), &[]).unwrap();
        assert!(s.add_field(&field("b", "s1", 2, 2), Some(b"img")).unwrap());
        assert!(s.add_field(&field("a", "s1", 1, 1), None).unwrap());
        assert!(s.add_field(&field("c", "s2", 3, 0), None).unwrap());
        assert!(
            !s.add_field(&field("a", "s1", 9, 5), None).unwrap(),
            "the same id is one field"
        );
        let review = Review {
            class: None,
            by: "tech".into(),
            at: 4,
        };
        s.put_review("b", 1, &review).unwrap();
        assert!(s.put_review("b", 2, &review).is_err());
        assert!(s.add_field(&field("d", "nope", 1, 1), None).is_err(), "unknown slide");
        drop(s);
        let s = open(dir.path(), Retention::default());
        let ids: Vec<_> = s.fields_of_slide("s1").unwrap().into_iter().map(|f| f.id).collect();
        assert_eq!(ids, ["b", "a"], "in the order they were stored");
        let b = s.field("b").unwrap().unwrap();
        assert_eq!(b.cells[1].review.as_ref(), Some(&review));
        assert_eq!(b.cells[0].review, None);
        assert_eq!(s.field("c").unwrap().unwrap().slide_id, "s2");
        assert_eq!(s.field("zz").unwrap(), None);
        assert_eq!(s.image("b").unwrap().as_deref(), Some(&b"img"[..]));
        assert_eq!(s.image("a").unwrap(), None);
        assert_eq!(
            s.slides().unwrap().iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
            ["s1", "s2"]
        );
        // 2 + 1 cells and one review.
        let out = s.outbox_from(0, 100).unwrap();
        assert_eq!(out.len(), 4);
        assert!(out.windows(2).all(|w| w[0].seq < w[1].seq));
        assert_eq!(out[3].topic, "wbc/clinic-a/dev1/review");
        let env = Envelope::decode(&out[0].topic, &out[0].payload).unwrap();
        assert_eq!(env.id, format!("clinic-a:dev1:{}", env.seq));
        assert_eq!(
            env.seq & ((1 << 40) - 1),
            out[0].seq,
            "the store's epoch above its counter"
        );
    }

    #[test]
    fn acknowledged_messages_leave_the_outbox_and_the_rest_stays_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), Retention::default());
        s.put_slide(&slide("s", 1), &[]).unwrap();
        s.add_field(&field("a", "s", 1, 3), None).unwrap();
        let out = s.outbox_from(0, 10).unwrap();
        s.acknowledged(out[1].seq).unwrap();
        assert_eq!(s.backlog(), 2);
        let rest: Vec<_> = s.outbox_from(0, 10).unwrap().into_iter().map(|o| o.seq).collect();
        assert_eq!(rest, [out[0].seq, out[2].seq]);
        assert_eq!(s.outbox_from(out[0].seq + 1, 10).unwrap()[0].seq, out[2].seq);
    }

    #[test]
    fn the_active_model_is_announced_once_per_version() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), Retention::default());
        assert!(s.note_active_model(2, "cpu").unwrap());
        assert!(!s.note_active_model(2, "cpu").unwrap());
        drop(s);
        let s = open(dir.path(), Retention::default());
        assert!(!s.note_active_model(2, "cpu").unwrap(), "remembered across restarts");
        assert!(s.note_active_model(3, "cpu").unwrap());
        let topics: Vec<_> = s.outbox_from(0, 10).unwrap().into_iter().map(|o| o.topic).collect();
        assert_eq!(topics, ["wbc/clinic-a/dev1/model", "wbc/clinic-a/dev1/model"]);
    }

    #[test]
    fn an_unreadable_outbox_message_is_set_aside_not_lost_and_oversized_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), Retention::default());
        s.put_slide(&slide("s", 1), &[]).unwrap();
        s.add_field(&field("a", "s", 1, 2), None).unwrap();
        let first = s.outbox_from(0, 1).unwrap()[0].seq;
        s.outbox.insert(be(first), &b"\x09future format"[..]).unwrap();
        let out = s.outbox_from(0, 10).unwrap();
        assert_eq!(out.len(), 1, "the readable one is still sent");
        assert_eq!((s.backlog(), s.quarantined()), (1, 1));
        let mut huge = field("b", "s", 1, 1);
        huge.cells[0].result.description = "x".repeat(MAX_PAYLOAD_BYTES);
        let e = s.add_field(&huge, None).unwrap_err().to_string();
        assert!(e.contains("over the uplink limit"), "{e}");
        assert_eq!(s.field("b").unwrap(), None, "nothing of it stored");
    }

    #[test]
    fn a_new_store_does_not_reuse_the_message_ids_of_an_old_one() {
        let ids = |dir: &Path| {
            let s = open(dir, Retention::default());
            s.put_slide(&slide("s", 1), &[]).unwrap();
            s.add_field(&field("a", "s", 1, 1), None).unwrap();
            let o = &s.outbox_from(0, 1).unwrap()[0];
            Envelope::decode(&o.topic, &o.payload).unwrap().id
        };
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        assert_ne!(ids(d1.path()), ids(d2.path()));
    }

    #[test]
    fn hostile_ids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), Retention::default());
        for id in ["", "../x", "a/b", "a.json", &"x".repeat(65)] {
            assert!(s.field(id).is_err(), "{id}");
            assert!(s.put_slide(&slide(id, 1), &[]).is_err(), "{id}");
        }
    }

    #[test]
    fn images_go_by_the_byte_limit_and_by_age_and_results_stay() {
        let dir = tempfile::tempdir().unwrap();
        let r = Retention {
            max_image_bytes: 25,
            image_max_age_days: 1,
            ..Default::default()
        };
        let s = open(dir.path(), r);
        s.put_slide(&slide("s", 1), &[]).unwrap();
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            s.add_field(&field(id, "s", 1, 1), Some(&[i as u8; 10])).unwrap();
            // Distinct storage times (seconds).
            if i == 0 {
                std::thread::sleep(std::time::Duration::from_millis(1100));
            }
        }
        assert_eq!(s.image("a").unwrap(), None, "oldest removed by the byte limit");
        assert!(s.image("b").unwrap().is_some() && s.image("c").unwrap().is_some());
        let p = s.prune(now() + 2 * 86_400).unwrap();
        assert_eq!(p.images, 2, "both older than a day by then");
        assert_eq!(s.fields_of_slide("s").unwrap().len(), 3, "results stay");
    }

    #[test]
    fn old_results_go_only_once_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let r = Retention {
            result_max_age_days: 30,
            ..Default::default()
        };
        let s = open(dir.path(), r);
        s.put_slide(&slide("s", 1), &[]).unwrap();
        s.add_field(&field("old", "s", 1000, 2), Some(b"x")).unwrap();
        s.add_field(&field("old2", "s", 1000, 1), None).unwrap();
        s.add_field(&field("new", "s", now(), 1), None).unwrap();
        s.put_review(
            "old",
            0,
            &Review {
                class: None,
                by: "t".into(),
                at: 2,
            },
        )
        .unwrap();
        assert_eq!(s.prune(now()).unwrap().fields, 0, "nothing delivered yet");
        // Central has everything of `old` (its two cells and the review), but not `old2`.
        for o in s.outbox_from(0, 100).unwrap() {
            let e = Envelope::decode(&o.topic, &o.payload).unwrap();
            let of_old = match &e.body {
                Body::Cell(c) => c.field.id == "old",
                Body::Review(r) => r.field_id == "old",
                _ => false,
            };
            if of_old {
                s.acknowledged(o.seq).unwrap();
            }
        }
        assert_eq!(s.prune(now()).unwrap().fields, 1);
        assert_eq!(s.field("old").unwrap(), None);
        assert_eq!(s.image("old").unwrap(), None);
        assert!(s.field("old2").unwrap().is_some(), "undelivered: kept");
        assert!(s.field("new").unwrap().is_some(), "young: kept");
        assert_eq!(s.fields_of_slide("s").unwrap().len(), 2);
    }

    #[test]
    fn a_nearly_full_disk_refuses_new_work_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(
            dir.path(),
            Retention {
                min_free_bytes: u64::MAX,
                ..Default::default()
            },
        );
        let e = s.check_space().unwrap_err().to_string();
        assert!(e.contains("nearly full") && e.contains("intact"), "{e}");
        let dir2 = tempfile::tempdir().unwrap();
        let ok = open(
            dir2.path(),
            Retention {
                min_free_bytes: 0,
                ..Default::default()
            },
        );
        ok.check_space().unwrap();
    }

    #[test]
    fn a_second_process_cannot_open_the_same_store() {
        // sled locks the database file; within one process a second open of the same path
        // fails the same way.
        let dir = tempfile::tempdir().unwrap();
        let _s = open(dir.path(), Retention::default());
        assert!(Store::open(dir.path(), identity(), Retention::default()).is_err());
    }

    mod model {
        //! The store against an in-memory model, over generated sequences of operations.
        use super::*;
        use proptest::prelude::*;
        use std::collections::{BTreeMap, VecDeque};
        use wbc_shared::classes::CellClass;

        #[derive(Debug, Clone)]
        enum Op {
            Slide(u8),
            Field { id: u8, slide: u8, cells: u8 },
            Review { id: u8, cell: u8, class: Option<u8> },
            Ack(u8),
            Reopen,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                (0u8..3).prop_map(Op::Slide),
                (0u8..10, 0u8..3, 0u8..4).prop_map(|(id, slide, cells)| Op::Field { id, slide, cells }),
                (0u8..10, 0u8..4, proptest::option::of(0u8..6)).prop_map(|(id, cell, class)| Op::Review {
                    id,
                    cell,
                    class
                }),
                (0u8..6).prop_map(Op::Ack),
                Just(Op::Reopen),
            ]
        }

        #[derive(Default)]
        struct Model {
            slides: Vec<String>,
            fields: BTreeMap<String, FieldRecord>,
            order: Vec<String>,
            outbox: VecDeque<Body>,
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(48))]
            #[test]
            fn the_store_behaves_like_its_model(ops in proptest::collection::vec(op(), 1..40)) {
                let dir = tempfile::tempdir().unwrap();
                let mut s = open(dir.path(), Retention::default());
                let mut m = Model::default();
                for (step, op) in ops.into_iter().enumerate() {
                    match op {
                        Op::Slide(i) => {
                            let id = format!("s{i}");
                            s.put_slide(&slide(&id, u64::from(i)), &[]).unwrap();
                            if !m.slides.contains(&id) {
                                m.slides.push(id);
                            }
                        }
                        Op::Field { id, slide, cells } => {
                            let f = field(&format!("f{id}"), &format!("s{slide}"), u64::from(id), cells.into());
                            let r = s.add_field(&f, None);
                            if !m.slides.contains(&f.slide_id) {
                                prop_assert!(r.is_err(), "step {step}: field into a missing slide");
                            } else if m.fields.contains_key(&f.id) {
                                prop_assert!(!r.unwrap());
                            } else {
                                prop_assert!(r.unwrap());
                                m.outbox.extend(Body::cells_of(&f));
                                m.order.push(f.id.clone());
                                m.fields.insert(f.id.clone(), f);
                            }
                        }
                        Op::Review { id, cell, class } => {
                            let review = Review {
                                class: class.map(|c| CellClass::ALL[usize::from(c)]),
                                by: "t".into(),
                                at: u64::from(id),
                            };
                            let fid = format!("f{id}");
                            let r = s.put_review(&fid, cell.into(), &review);
                            match m.fields.get_mut(&fid).and_then(|f| f.cells.get_mut(usize::from(cell))) {
                                Some(c) => {
                                    c.review = Some(review.clone());
                                    prop_assert_eq!(&r.unwrap(), &m.fields[&fid]);
                                    m.outbox.push_back(Body::Review(ReviewMessage {
                                        field_id: fid.clone(),
                                        slide_id: m.fields[&fid].slide_id.clone(),
                                        index: cell.into(),
                                        review,
                                    }));
                                }
                                None => prop_assert!(r.is_err()),
                            }
                        }
                        Op::Ack(n) => {
                            for o in s.outbox_from(0, n.into()).unwrap() {
                                s.acknowledged(o.seq).unwrap();
                                m.outbox.pop_front();
                            }
                        }
                        Op::Reopen => {
                            drop(s);
                            s = open(dir.path(), Retention::default());
                        }
                    }
                    for (id, f) in &m.fields {
                        let got = s.field(id).unwrap();
                        prop_assert_eq!(got.as_ref(), Some(f), "step {}", step);
                    }
                    for sl in &m.slides {
                        let want: Vec<&String> = m.order.iter().filter(|id| &m.fields[*id].slide_id == sl).collect();
                        let got: Vec<String> = s.fields_of_slide(sl).unwrap().into_iter().map(|f| f.id).collect();
                        prop_assert_eq!(got.iter().collect::<Vec<_>>(), want);
                    }
                    let queued: Vec<Body> = s
                        .outbox_from(0, usize::MAX)
                        .unwrap()
                        .into_iter()
                        .map(|o| Envelope::decode(&o.topic, &o.payload).unwrap().body)
                        .collect();
                    prop_assert_eq!(queued, m.outbox.iter().cloned().collect::<Vec<_>>());
                    prop_assert_eq!(s.backlog(), m.outbox.len());
                }
            }
        }
    }
}
