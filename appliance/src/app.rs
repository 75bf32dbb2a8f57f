//! The appliance's daily work, whatever the capture source: take an image, find and classify
//! its white cells, store the field with its original image, and keep the current slide's
//! differential and flags; record the technician's reviews.

use crate::classify_field_for_site;
use crate::gate::Gate;
use crate::store::{SlideState, Store};
use anyhow::{Context, Result, bail};
use image::RgbImage;
use sha2::{Digest, Sha256};
use std::sync::{Arc, Mutex, RwLock};
use wbc_cells::finder::{FinderConfig, cell_picture};
use wbc_cells::image::{DecodeLimits, decode_rgb};
use wbc_models::classify::Classifier;
use wbc_protocol::classes::CellClass;
use wbc_protocol::messages::{CellRecord, CellResult, FieldHeader, FieldRecord, Review, SCHEMA_VERSION};
use wbc_protocol::slide::Flag;
use wbc_protocol::slide::{SlideReport, SlideSettings, report};
use wbc_protocol::uplink::{Body, PICTURE_SIDE, SlideMessage};

pub use wbc_protocol::clock::now;

/// An input that no retry can make usable (not an image, or larger than an image may be), as
/// against a failure of the moment (a full disk, a store error, a model that failed): the
/// inbox moves the first aside and keeps the second for another try.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unusable(pub String);

/// Whether an error says its input is [`Unusable`].
pub fn is_unusable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Unusable>())
}

/// What the appliance runs with.
pub struct AppSettings {
    /// Pixel size of the camera's fields, µm.
    pub microns_per_pixel: f32,
    /// How cells are found.
    pub finder: FinderConfig,
    /// How slides are counted and flagged.
    pub slide: SlideSettings,
    /// Decoding limits for every incoming image.
    pub limits: DecodeLimits,
    /// Backend in use, in words (shown in the UI).
    pub backend: String,
    /// Adaptation to the site from the cells classified.
    pub adaptation: crate::site::AdaptationConfig,
}

/// The longest side of a cell's picture on the review pages, in pixels.
pub const CELL_PICTURE_SIDE: u32 = 256;

/// How many images may be decoded (and held decoded) at once: each may take up to the decode
/// limit's memory, and one more than the model can work on only waits.
pub const DECODES_AT_ONCE: usize = 2;

/// The models on disk, which decide which classifier runs.
pub type ModelStore = crate::models::Models<Arc<Classifier>>;

/// The appliance: a classifier, a store and the current slide.
pub struct App {
    classifier: Arc<RwLock<Arc<Classifier>>>,
    /// The site adaptation being fitted in the background, if any.
    site_fit: Mutex<Option<std::thread::JoinHandle<()>>>,
    models: Option<Arc<ModelStore>>,
    store: Arc<Store>,
    /// Settings.
    pub settings: AppSettings,
    current: Mutex<SlideState>,
    camera: Mutex<Option<Box<dyn crate::capture::FrameSource>>>,
    /// Serialises ingestion, so that two copies of one image never race into two fields.
    ingest_lock: Mutex<()>,
    /// Bounds the images decoded at once ([`DECODES_AT_ONCE`]).
    decodes: Gate,
    /// The kinds of flag last sent to central for the current slide.
    sent_flags: Mutex<Vec<String>>,
    /// Inbox files waiting for another try, as the inbox last reported them.
    inbox_waiting: Mutex<Vec<crate::inbox::Waiting>>,
}

/// The flags' keys ([`Flag::key`]), sorted: what central has heard of.
fn flag_keys(flags: &[Flag]) -> Vec<String> {
    let mut k: Vec<String> = flags.iter().map(Flag::key).collect();
    k.sort();
    k
}

/// What became of an incoming image.
#[derive(Debug)]
pub enum Ingested {
    /// A new field, stored.
    New(FieldRecord),
    /// The same image was taken before: its field.
    Duplicate(FieldRecord),
}

impl Ingested {
    /// The field either way.
    pub fn field(&self) -> &FieldRecord {
        match self {
            Ingested::New(f) | Ingested::Duplicate(f) => f,
        }
    }
}

/// A field id from the image's content: the same image is the same field, across restarts.
pub fn field_id(bytes: &[u8]) -> (String, String) {
    let sha = hex::encode(Sha256::digest(bytes));
    (sha[..20].to_string(), sha)
}

impl Drop for App {
    /// A fit under way finishes (its adaptation and central's event are stored together)
    /// before the store can be closed.
    fn drop(&mut self) {
        self.wait_for_site_fit();
    }
}

fn new_slide_id() -> String {
    format!("slide-{}-{:08x}", now(), rand::random::<u32>())
}

impl App {
    /// Opens the appliance on a store: continues the last unfinished slide, or starts one.
    pub fn new(classifier: Arc<Classifier>, store: Arc<Store>, settings: AppSettings) -> Result<Self> {
        settings.slide.validate()?;
        let current = match store.slides()?.into_iter().rev().find(|s| s.finished_at.is_none()) {
            Some(s) => s,
            None => {
                let s = SlideState {
                    id: new_slide_id(),
                    started_at: now(),
                    finished_at: None,
                };
                store.put_slide(&s, &[])?;
                s
            }
        };
        let classifier = crate::site::adapted(&store, classifier, &settings.adaptation);
        Ok(App {
            classifier: Arc::new(RwLock::new(classifier)),
            site_fit: Mutex::new(None),
            models: None,
            store,
            settings,
            current: Mutex::new(current),
            camera: Mutex::new(None),
            inbox_waiting: Mutex::new(Vec::new()),
            ingest_lock: Mutex::new(()),
            decodes: Gate::new(DECODES_AT_ONCE),
            sent_flags: Mutex::new(Vec::new()),
        })
    }

    /// Attaches the model store: fields processed count towards a new model's probation, and
    /// a model that keeps failing is replaced by its fallback.
    pub fn with_models(mut self, models: Arc<ModelStore>) -> Self {
        self.models = Some(models);
        self
    }

    /// The model store, if attached.
    pub fn models(&self) -> Option<&Arc<ModelStore>> {
        self.models.as_ref()
    }

    /// Inbox files waiting for another try after a failure of the moment (for the UI).
    pub fn inbox_waiting(&self) -> Vec<crate::inbox::Waiting> {
        self.inbox_waiting.lock().expect("inbox lock").clone()
    }

    /// What the inbox is waiting to try again.
    pub fn set_inbox_waiting(&self, waiting: Vec<crate::inbox::Waiting>) {
        *self.inbox_waiting.lock().expect("inbox lock") = waiting;
    }

    /// The classifier in use.
    pub fn classifier(&self) -> Arc<Classifier> {
        self.classifier.read().expect("classifier lock").clone()
    }

    /// Switches to another classifier (an update or a rollback); fields being processed finish
    /// on the one they started with.
    pub fn set_classifier(&self, c: Arc<Classifier>) {
        tracing::info!(model_version = c.model_version, "model switched");
        // Under the lock: a background fit that finishes meanwhile puts its adaptation to use
        // under the same lock, so neither overwrites the other with a stale one.
        let mut in_use = self.classifier.write().expect("classifier lock");
        *in_use = crate::site::adapted(&self.store, c, &self.settings.adaptation);
    }

    /// Where the adaptation to the site stands for the model in use.
    pub fn site_status(&self) -> Result<crate::site::SiteStatus> {
        crate::site::status(&self.store, &self.classifier(), &self.settings.adaptation)
    }

    /// Forgets what the model in use learnt of the site; it answers as signed from now on,
    /// until it has seen enough cells to adapt again.
    pub fn reset_site(&self, by: &str) -> Result<()> {
        let _g = self.ingest_lock.lock().expect("ingest lock");
        // A fit under way would store what the reset forgets.
        self.wait_for_site_fit();
        let c = self.classifier();
        crate::site::reset(&self.store, c.model_version, by)?;
        self.set_classifier(c);
        Ok(())
    }

    /// Learns the site from cells `classifier` has just classified: keeps them and, when a fit
    /// is due, fits the adaptation in the background (fitting a backbone takes tens of seconds
    /// on a mini-PC; fields go on meanwhile with the adaptation in use). The new adaptation is
    /// put to use when its model is still the one in use. Never fails a field: a failure is
    /// logged.
    fn learn_site(&self, classifier: &Arc<Classifier>, features: &[f32], pictures: &[(&RgbImage, Option<f32>)]) {
        let config = &self.settings.adaptation;
        let due = match crate::site::keep(&self.store, classifier, config, features, pictures) {
            Ok(Some(cells)) => cells,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "could not keep the site's cells");
                return;
            }
        };
        let mut running = self.site_fit.lock().expect("site fit lock");
        if running.as_ref().is_some_and(|h| !h.is_finished()) {
            // The fit under way is as good as this one; the next cells ask again after it.
            return;
        }
        let (store, lock, fitted_for, config) = (
            self.store.clone(),
            self.classifier.clone(),
            classifier.clone(),
            config.clone(),
        );
        let fit = move || match crate::site::fit(&store, &fitted_for, due) {
            Ok(_) => {
                let mut in_use = lock.write().expect("classifier lock");
                if in_use.model_version == fitted_for.model_version {
                    *in_use = crate::site::adapted(&store, in_use.clone(), &config);
                }
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "could not adapt to the site"),
        };
        match std::thread::Builder::new().name("site-fit".into()).spawn(fit) {
            Ok(h) => *running = Some(h),
            Err(e) => tracing::warn!(error = %e, "could not start fitting the site adaptation"),
        }
    }

    /// Waits for the site adaptation being fitted, if any.
    pub fn wait_for_site_fit(&self) {
        let handle = self.site_fit.lock().expect("site fit lock").take();
        if let Some(h) = handle
            && h.join().is_err()
        {
            tracing::warn!("fitting the site adaptation failed");
        }
    }

    /// Attaches a camera.
    pub fn with_camera(self, camera: Box<dyn crate::capture::FrameSource>) -> Self {
        *self.camera.lock().expect("camera lock") = Some(camera);
        self
    }

    /// The camera, in words, if one is attached.
    pub fn camera(&self) -> Option<String> {
        self.camera.lock().expect("camera lock").as_ref().map(|c| c.describe())
    }

    /// Grabs one frame from the camera and processes it as a field.
    pub fn capture(&self) -> Result<Ingested> {
        let frame = {
            let mut cam = self.camera.lock().expect("camera lock");
            let Some(cam) = cam.as_mut() else {
                bail!("no camera is attached");
            };
            cam.grab()?.context("the camera gave no frame (end of the recording)")?
        };
        self.ingest(&frame.bytes, &frame.name, "camera", false)
    }

    /// The store.
    pub fn store(&self) -> &Store {
        self.store.as_ref()
    }

    /// The store, shared (for the uplink).
    pub fn store_arc(&self) -> Arc<Store> {
        self.store.clone()
    }

    /// The model's version.
    pub fn model_version(&self) -> u64 {
        self.classifier().model_version
    }

    /// The current slide.
    pub fn current_slide(&self) -> SlideState {
        self.current.lock().expect("slide lock").clone()
    }

    /// Takes one image: decodes it within the limits (a corrupt, truncated, empty, enormous or
    /// non-image file is refused with the reason and changes nothing), finds and classifies
    /// its cells (or, with `single_cell`, classifies it as one cell), and stores the field and
    /// the original in the current slide. The same image twice is one field. It returns once
    /// the field is on disk and queued for central; a nearly full disk refuses new fields.
    pub fn ingest(&self, bytes: &[u8], name: &str, source: &str, single_cell: bool) -> Result<Ingested> {
        // Held to the end: a decoded image waiting for the model counts as much as one decoding.
        let _seat = self.decodes.enter();
        let img = decode_rgb(bytes, &self.settings.limits)
            .map_err(|e| Unusable(format!("{name}: not a usable image: {e}")))?;
        let (id, sha) = field_id(bytes);
        let _g = self.ingest_lock.lock().expect("ingest lock");
        if let Some(f) = self.store.field(&id)? {
            return Ok(Ingested::Duplicate(f));
        }
        self.store.check_space()?;
        let um = self.settings.microns_per_pixel;
        let (w, h) = img.dimensions();
        let classifier = self.classifier();
        // A model that panics fails this field only; during a new model's probation it counts
        // towards returning to the fallback.
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if single_cell {
                // A single-cell image is a crop of unknown scale: the model's reference applies.
                let p = classifier.predict(std::slice::from_ref(&img));
                let mut r = classifier.result(&p[0]);
                r.bbox = Some([0, 0, w, h]);
                (vec![r], p[0].site_features().to_vec(), Vec::new())
            } else {
                classify_field_for_site(&classifier, &img, um, &self.settings.finder)
            }
        }));
        let (cells, site_features, crops): (Vec<CellResult>, Vec<f32>, Vec<RgbImage>) = match run {
            Ok(c) => {
                self.probation(classifier.model_version, true, "");
                c
            }
            Err(p) => {
                let what = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "a panic".into());
                let detail = format!("model version {} failed on {name}: {what}", classifier.model_version);
                self.probation(classifier.model_version, false, &detail);
                bail!("{detail}; nothing was stored");
            }
        };
        let field = FieldRecord {
            schema_version: SCHEMA_VERSION,
            header: FieldHeader {
                id: id.clone(),
                slide_id: self.current_slide().id,
                received_at: now(),
                source: source.into(),
                name: name.chars().take(200).collect(),
                image_sha256: sha,
                width: w,
                height: h,
                single_cell,
                microns_per_pixel: um,
            },
            cells: cells
                .into_iter()
                .map(|result| CellRecord { result, review: None })
                .collect(),
        };
        // The cells the lab must see travel with their picture.
        let bodies = Body::cells_with_pictures(&field, |i| {
            let c = &field.cells[i];
            let picture = cell_picture(&img, c.result.bbox, single_cell, PICTURE_SIDE);
            let mut jpeg = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 85)
                .encode_image(&picture)
                .map_err(|e| tracing::warn!(error = %e, "a cell's picture could not be encoded; sent without it"))
                .ok()?;
            Some(jpeg)
        });
        let pictures = review_pictures(&img, &field);
        if !self.store.add_field_with(&field, Some(bytes), &pictures, bodies)? {
            let f = self.store.field(&id)?.context("field vanished")?;
            return Ok(Ingested::Duplicate(f));
        }
        tracing::info!(field = %id, source, cells = field.cells.len(), "field stored");
        // The pictures the site's cells were classified from: a single-cell image at the
        // model's reference scale, a field's crops at the camera's.
        let pictures: Vec<(&RgbImage, Option<f32>)> = match single_cell {
            true => vec![(&img, classifier.microns_per_pixel)],
            false => crops.iter().map(|c| (c, Some(um))).collect(),
        };
        self.learn_site(&classifier, &site_features, &pictures);
        self.send_new_flags()?;
        Ok(Ingested::New(field))
    }

    fn probation(&self, version: u64, ok: bool, detail: &str) {
        if let Some(m) = &self.models
            && let Some(fallback) = m.field_done(version, ok, detail)
        {
            self.set_classifier(fallback);
        }
    }

    /// Queues the current slide's report for central when a new kind of flag appeared (a
    /// blast above all: central hears of it with the field that showed it).
    fn send_new_flags(&self) -> Result<()> {
        // Held until the report is queued: the technician's "finish" waits for it rather than
        // being overwritten by it.
        let current = self.current.lock().expect("slide lock");
        let s = current.clone();
        let r = for_central(self.report_of(&s)?);
        let keys = flag_keys(&r.flags);
        let mut sent = self.sent_flags.lock().expect("flags lock");
        if keys.iter().any(|k| !sent.contains(k)) {
            self.store.put_slide(&s, &[slide_message(&s, r)])?;
            *sent = keys;
        }
        Ok(())
    }

    /// The current slide's differential and flags.
    pub fn report(&self) -> Result<SlideReport> {
        let s = self.current_slide();
        self.report_of(&s)
    }

    /// A slide's differential and flags.
    pub fn report_of(&self, s: &SlideState) -> Result<SlideReport> {
        let fields = self.store.fields_of_slide(&s.id)?;
        Ok(report(&s.id, &fields, &self.settings.slide, s.finished_at.is_some()))
    }

    /// Closes the current slide (its report keeps its flags) and starts a new one. Returns the
    /// closed slide's final report.
    pub fn finish_slide(&self) -> Result<SlideReport> {
        let mut cur = self.current.lock().expect("slide lock");
        let mut done = cur.clone();
        done.finished_at = Some(now());
        let final_report = self.report_of(&done)?;
        self.store
            .put_slide(&done, &[slide_message(&done, final_report.clone())])?;
        let next = SlideState {
            id: new_slide_id(),
            started_at: now(),
            finished_at: None,
        };
        self.store.put_slide(&next, &[])?;
        *cur = next;
        self.sent_flags.lock().expect("flags lock").clear();
        Ok(final_report)
    }

    /// The picture of one cell of a stored field, for the technician who reviews it: the
    /// square the classifier saw (three times the cell's box, padded with the field's mean
    /// colour beyond its edges; a single-cell image whole), at most [`CELL_PICTURE_SIDE`]
    /// pixels across, as JPEG. Made when the field is stored (and kept as long as it); for a
    /// field stored before that, made for all its cells from one decoding of the original at
    /// the first request. `None` when the field or the cell is not kept, or neither the
    /// pictures nor the original are.
    pub fn cell_picture(&self, field_id: &str, cell: usize) -> Result<Option<Vec<u8>>> {
        if let Some(p) = self.store.picture(field_id, cell)? {
            return Ok(Some(p).filter(|p| !p.is_empty()));
        }
        let Some(field) = self.store.field(field_id)? else {
            return Ok(None);
        };
        if cell >= field.cells.len() {
            return Ok(None);
        }
        let _seat = self.decodes.enter();
        // Another request may have made them while this one waited.
        if let Some(p) = self.store.picture(field_id, cell)? {
            return Ok(Some(p).filter(|p| !p.is_empty()));
        }
        let Some(bytes) = self.store.image(field_id)? else {
            return Ok(None);
        };
        let img = decode_rgb(&bytes, &self.settings.limits).context("the field's stored image")?;
        let mut pictures = review_pictures(&img, &field);
        self.store.put_pictures(field_id, &pictures)?;
        Ok(Some(pictures.swap_remove(cell)).filter(|p| !p.is_empty()))
    }

    /// Records a technician's review of one cell, next to the model's answer.
    pub fn review(&self, field_id: &str, cell: usize, class: Option<CellClass>, by: &str) -> Result<FieldRecord> {
        // The review travels with the cell's picture (the clinic's teaching material); a field
        // stored before pictures were kept gets them now. Without one the review still counts.
        if class.is_some()
            && let Err(e) = self.cell_picture(field_id, cell)
        {
            tracing::warn!(error = %format!("{e:#}"), field = field_id, cell, "no picture for a reviewed cell");
        }
        self.store.put_review(
            field_id,
            cell,
            &Review {
                class,
                by: by.into(),
                at: now(),
            },
        )
    }
}

/// The review pages' picture of every cell of `field`, cut from its decoded image.
fn review_pictures(img: &image::RgbImage, field: &FieldRecord) -> Vec<Vec<u8>> {
    field
        .cells
        .iter()
        .map(|c| {
            let crop = cell_picture(img, c.result.bbox, field.single_cell, CELL_PICTURE_SIDE);
            let mut jpeg = Vec::new();
            // Encoding into memory fails only for an empty picture: then none is shown.
            if let Err(e) = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90).encode_image(&crop) {
                tracing::warn!(error = %e, field = %field.id, "a cell's review picture could not be made");
                jpeg.clear();
            }
            jpeg
        })
        .collect()
}

fn slide_message(s: &SlideState, report: SlideReport) -> Body {
    Body::Slide(SlideMessage {
        started_at: s.started_at,
        finished_at: s.finished_at,
        report: for_central(report),
    })
}

/// The report as central is sent it: without the possible-blast flag, which a central built
/// before it would refuse the whole message for (and with it the slide's finishing), and
/// which every central recomputes from the cells anyway.
fn for_central(mut report: SlideReport) -> SlideReport {
    report.flags.retain(|f| !matches!(f, Flag::PossibleBlast { .. }));
    report
}

#[cfg(test)]
pub(crate) mod tests;
