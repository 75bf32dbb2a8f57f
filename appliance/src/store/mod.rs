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
//! | `pictures` | field seq ‖ cell index (u32) | the cell's picture for the review pages (JPEG) |
//! | `outbox` | message seq | field seq (u64, `u64::MAX` for none) ‖ [`Envelope`](wbc_protocol::uplink::Envelope) |
//! | `sent` | message seq | sent at (u64) ‖ times sent (u64) ‖ wire seq (u64): the broker has it, central has not confirmed it |
//! | `meta` | name | the active model's version, … |
//! | `site_features` | model version ‖ seq | a site cell's unadapted features (f32 LE) |
//! | `site_pictures` | model version ‖ seq | a site cell's picture (PNG) and pixel size, for models that adapt their backbone |
//! | `adaptations` | model version | [`StoredAdaptation`] |
//!
//! Every change that carries results is one transaction over the trees it touches, followed
//! by a flush: when a write returns, the result is on disk, and a crash at any moment leaves
//! either all of the change or none of it. A result goes into the outbox in the same
//! transaction as the field, so nothing is stored that the uplink will not eventually send.
//! Sequence numbers come from sled's persistent id generator: increasing, never reused. A
//! message's wire sequence number puts a 24-bit store epoch above the 40-bit counter; the epoch
//! is new at every start (one more than the last, and at least the clock's minute since 2026),
//! so that a wiped store, or one put back from a backup (whose counter is rewound), does not
//! reuse message ids central has already seen, given a clock that is not set back. A message
//! that cannot be read back (damaged, or written by a newer build) is moved to the
//! `outbox_quarantine` tree, never deleted. A message stays in the outbox until central's
//! receipt names it; from the broker's acknowledgement on, `sent` says when it went.
//!
//! This file holds the trees, their keys and encodings, and the fields, reviews, slides and
//! images; `outbox` the messages waiting for the broker; `model_log` the model log and the
//! model in use; `retention` what is removed and when (images by age and bytes, delivered
//! results by age) and the free-space floor; `site` what the appliance learnt of its site (the
//! cells a site adaptation is fitted on, and the adaptations).

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::{Transactional, Tree};
use std::path::{Path, PathBuf};
use wbc_protocol::clock::now;
use wbc_protocol::messages::{FieldRecord, Review};
use wbc_protocol::uplink::{Body, CellMessage, MAX_PICTURE_BYTES, ReviewMessage, valid_id};

mod model_log;
mod outbox;
mod retention;
mod site;
#[cfg(test)]
mod tests;

pub use model_log::ModelLogEntry;
pub use outbox::Outgoing;
pub use retention::Pruned;
pub use site::{SiteCells, StoredAdaptation};

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

pub use wbc_config::Retention;

/// Who the appliance is, for the messages it queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Clinic id.
    pub clinic: String,
    /// Device id.
    pub device: String,
}

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
    pictures: Tree,
    outbox: Tree,
    sent: Tree,
    quarantine: Tree,
    model_log: Tree,
    meta: Tree,
    site_features: Tree,
    site_pictures: Tree,
    adaptations: Tree,
    /// This start's epoch, above the counter in wire sequence numbers.
    epoch: u64,
    /// Where this store's counter starts in wire sequence numbers (random, drawn at creation).
    counter_offset: u64,
    /// Messages in the outbox (sled counts a tree by walking it). Signed: an acknowledgement
    /// can be counted a moment before the write that queued the message is.
    queued: std::sync::atomic::AtomicI64,
    /// Of those, messages the broker has and central has not confirmed (the `sent` tree).
    awaiting: std::sync::atomic::AtomicI64,
    /// Serialises read-modify-write of reviews and slides (sled transactions would retry; a
    /// lock keeps it simple).
    lock: std::sync::Mutex<()>,
    /// Wakes the uplink when something is queued.
    notify: tokio::sync::Notify,
}

/// The key of a field's cell in `reviews` and `pictures`: field seq ‖ cell index (u32).
fn cell_key(field_seq: u64, cell: usize) -> [u8; 12] {
    let mut key = [0u8; 12];
    key[..8].copy_from_slice(&be(field_seq));
    key[8..].copy_from_slice(&(cell as u32).to_be_bytes());
    key
}

/// The store epoch's bits in a wire sequence number (above the 40-bit counter).
const EPOCH_MASK: u64 = 0xff_ffff;
/// The counter's bits in a wire sequence number.
const COUNTER_MASK: u64 = (1 << 40) - 1;

/// The lowest epoch a store opened at `now` takes: minutes since 2026-01-01 (24 bits last 31
/// years).
fn epoch_floor(now: u64) -> u64 {
    now.saturating_sub(1_767_225_600) / 60
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

impl Store {
    /// Opens (creating) the store in `dir`. Another process holding it is an error.
    pub fn open(dir: &Path, identity: Identity, retention: Retention) -> Result<Self> {
        Self::open_at(dir, identity, retention, epoch_floor(now()))
    }

    /// [`Store::open`] with the epoch at least `floor` (the minute of the clock; given by tests
    /// that play a restore from a backup).
    fn open_at(dir: &Path, identity: Identity, retention: Retention, floor: u64) -> Result<Self> {
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
        // A new epoch at every start, after the last one and not before the clock's minute:
        // messages queued before keep the ids they were given, and a store put back from a
        // backup (whose counter is rewound) does not give new results ids central already has.
        let stored_epoch = meta.get(b"epoch")?;
        let fresh = stored_epoch.is_none();
        let epoch = match stored_epoch {
            Some(v) => (read_u64(&v)? + 1).max(floor),
            // A clock set before 2026 says nothing: a random epoch then.
            None if floor == 0 => rand::random::<u64>() | 1,
            None => floor,
        } & EPOCH_MASK;
        meta.insert(b"epoch", &be(epoch))?;
        // A new store's counter starts at a random place, so that a store wiped and made again
        // within the minute does not repeat the old one's ids either.
        let counter_offset = match meta.get(b"counter_offset")? {
            Some(v) => read_u64(&v)?,
            None if fresh => {
                let o = rand::random::<u64>() & (COUNTER_MASK >> 1);
                meta.insert(b"counter_offset", &be(o))?;
                o
            }
            None => 0,
        };
        db.flush()?;
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
            pictures: t("pictures")?,
            outbox: t("outbox")?,
            awaiting: std::sync::atomic::AtomicI64::new(t("sent")?.len() as i64),
            sent: t("sent")?,
            quarantine: t("outbox_quarantine")?,
            model_log: t("model_log")?,
            site_features: t("site_features")?,
            site_pictures: t("site_pictures")?,
            adaptations: t("adaptations")?,
            queued: std::sync::atomic::AtomicI64::new(outbox_len as i64),
            meta,
            epoch,
            counter_offset,
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

    /// Stores a new field, its original image and one outbox message per cell as one durable
    /// step. A field whose id is already stored is left as it is (returns `false`).
    pub fn add_field(&self, field: &FieldRecord, image: Option<&[u8]>) -> Result<bool> {
        self.add_field_with(field, image, &[], Body::cells_of(field))
    }

    /// [`Store::add_field`] with the cells' pictures for the review pages (`pictures[i]` is
    /// cell `i`'s; kept as long as the field, whatever becomes of the original image) and the
    /// field's cell messages made by the caller (with the pictures of the cells that carry
    /// one, [`Body::cells_with_pictures`]).
    pub fn add_field_with(
        &self,
        field: &FieldRecord,
        image: Option<&[u8]>,
        pictures: &[Vec<u8>],
        bodies: Vec<Body>,
    ) -> Result<bool> {
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
            &self.pictures,
            &self.outbox,
        )
            .transaction(|(fields, ids, slide_fields, images, image_meta, pics, outbox)| {
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
                for (i, p) in pictures.iter().enumerate().take(field.cells.len()) {
                    pics.insert(&cell_key(seq, i), p.as_slice())?;
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

    /// Records a technician's review of one cell (replacing an earlier one) and queues it; a
    /// review that names a class travels with the cell's picture, when the store has one that
    /// fits a message (the clinic's teaching material: `central export-reviews`).
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
        let key = cell_key(seq, cell);
        let picture = match review.class {
            Some(_) => self
                .pictures
                .get(key)?
                .filter(|p| !p.is_empty() && p.len() <= MAX_PICTURE_BYTES),
            None => None,
        };
        let body = Body::Review(ReviewMessage {
            field_id: field_id.into(),
            slide_id: f.slide_id.clone(),
            index: cell as u32,
            review: review.clone(),
            picture: picture.map(|p| CellMessage::encode_picture(&p)),
        });
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

    /// A cell's picture for the review pages, if it was made.
    pub fn picture(&self, field_id: &str, cell: usize) -> Result<Option<Vec<u8>>> {
        check_id(field_id)?;
        let Some(seq) = self.field_seq(field_id)? else {
            return Ok(None);
        };
        Ok(self.pictures.get(cell_key(seq, cell))?.map(|v| v.to_vec()))
    }

    /// Keeps the pictures of a field's cells made after it was stored (a field stored before
    /// pictures were kept). Nothing happens for a field that is gone.
    pub fn put_pictures(&self, field_id: &str, pictures: &[Vec<u8>]) -> Result<()> {
        check_id(field_id)?;
        let _g = self.lock.lock().expect("store lock");
        let Some(seq) = self.field_seq(field_id)? else {
            return Ok(());
        };
        let cells = self.load_field(seq)?.map_or(0, |f| f.cells.len());
        let mut batch = sled::Batch::default();
        for (i, p) in pictures.iter().enumerate().take(cells) {
            batch.insert(&cell_key(seq, i), p.as_slice());
        }
        self.pictures.apply_batch(batch)?;
        Ok(())
    }

    /// Writes a slide (new or changed) and queues `outbox` messages with it, durably.
    /// A finished slide is never made unfinished again.
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
                // A finished slide stays finished: a report of it made a moment before it was
                // finished (a field's new flag racing the technician's "finish") must not open
                // it again.
                let finished_before = slides
                    .get(be(seq))?
                    .and_then(|v| decode::<SlideState>(&v, "slide").ok())
                    .is_some_and(|old| old.finished_at.is_some());
                if !(finished_before && slide.finished_at.is_none()) {
                    slides.insert(&be(seq), value.as_slice())?;
                }
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
}
