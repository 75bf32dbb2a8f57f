//! The uplink protocol between the appliances and central (MQTT).
//!
//! Every message of a device lives under `wbc/<clinic>/<device>/<kind>` and is JSON with a
//! `schema_version`. Results, reviews, slide reports and model events travel in an
//! [`Envelope`] whose `id` (`<clinic>:<device>:<seq>`) is stable across resends: the appliance
//! stores each message in its outbox before sending it and resends it until the broker
//! acknowledges it, so central sees some messages twice and keeps the first. The device status
//! ([`Status`]) is published retained, with `offline` as the connection's last will.
//!
//! The broker's acknowledgement only says that the broker has a message; a broker that crashes
//! before it saves it, or an access list that drops it, loses it. So central confirms what it
//! has committed with a [`Receipt`] on `wbc-receipt/<clinic>/<device>`, and the appliance keeps
//! every message until a receipt names it, sending again what stays unconfirmed.

use crate::messages::{CellRecord, FieldHeader, FieldRecord, Review, SCHEMA_VERSION};
use crate::slide::SlideReport;
use serde::{Deserialize, Serialize};

/// Schema version of the uplink messages.
pub const UPLINK_SCHEMA_VERSION: u32 = 1;

/// Largest payload either side sends or accepts, bytes.
pub const MAX_PAYLOAD_BYTES: usize = 256 * 1024;

/// Largest cell picture (JPEG, before base64) either side sends or keeps, bytes.
pub const MAX_PICTURE_BYTES: usize = 48 * 1024;

/// Longest side of a cell picture sent to central, pixels.
pub const PICTURE_SIDE: u32 = 128;

/// Topic prefix of every device topic.
pub const TOPIC_ROOT: &str = "wbc";

/// What a message is about: the last level of its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// One cell's result ([`CellMessage`]).
    Cell,
    /// A technician's review of one cell ([`ReviewMessage`]).
    Review,
    /// A slide's report ([`SlideMessage`]).
    Slide,
    /// A model event ([`ModelMessage`]).
    Model,
    /// The device's status ([`Status`]), retained; not in an envelope.
    Status,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 5] = [Kind::Cell, Kind::Review, Kind::Slide, Kind::Model, Kind::Status];

    /// The topic level.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Cell => "cell",
            Kind::Review => "review",
            Kind::Slide => "slide",
            Kind::Model => "model",
            Kind::Status => "status",
        }
    }
}

/// Why an uplink message was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UplinkError {
    /// The topic is not `wbc/<clinic>/<device>/<kind>`.
    #[error("unexpected topic {0:?}")]
    Topic(String),
    /// Over [`MAX_PAYLOAD_BYTES`].
    #[error("payload of {0} bytes is over the limit of {MAX_PAYLOAD_BYTES}")]
    TooLarge(usize),
    /// Not valid JSON for the kind.
    #[error("invalid payload: {0}")]
    Invalid(String),
    /// A schema version this build does not know.
    #[error("unsupported uplink schema version {0} (this build speaks {UPLINK_SCHEMA_VERSION})")]
    UnsupportedVersion(u32),
    /// The payload names another clinic, device or kind than its topic, or a wrong id.
    #[error("payload does not match its topic: {0}")]
    Mismatch(String),
}

/// Clinic and device ids: 1 to 64 letters, digits, `-` or `_` (they are topic levels and
/// file names, so nothing that MQTT or a file system treats specially).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A device's identity at the broker (its MQTT user name; its client id is this with a `wbc.`
/// prefix): `clinic.device`. `.` is never part of an id, so no two devices share one, whereas
/// `clinic-device` made ("north-lab", "1") and ("north", "lab-1") the same user, who could then
/// write into both clinics' topics and knock the other device off the broker.
pub fn device_identity(clinic: &str, device: &str) -> String {
    format!("{clinic}.{device}")
}

/// The topic of a device's messages of one kind.
pub fn topic(clinic: &str, device: &str, kind: Kind) -> String {
    format!("{TOPIC_ROOT}/{clinic}/{device}/{}", kind.as_str())
}

/// The subscription that receives every clinic's messages.
pub const ALL_DEVICES: &str = "wbc/+/+/+";

/// Splits a topic into clinic, device and kind.
pub fn parse_topic(t: &str) -> Result<(String, String, Kind), UplinkError> {
    let bad = || UplinkError::Topic(t.chars().take(200).collect());
    let parts: Vec<&str> = t.split('/').collect();
    let [root, clinic, device, kind] = parts[..] else {
        return Err(bad());
    };
    if root != TOPIC_ROOT || !valid_id(clinic) || !valid_id(device) {
        return Err(bad());
    }
    let kind = Kind::ALL.into_iter().find(|k| k.as_str() == kind).ok_or_else(bad)?;
    Ok((clinic.into(), device.into(), kind))
}

/// What central needs to know of the field a cell came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldInfo {
    /// The image (its keys sit beside `cells` on the wire).
    #[serde(flatten)]
    pub header: FieldHeader,
    /// Number of cells found in the field.
    pub cells: u32,
}

impl std::ops::Deref for FieldInfo {
    type Target = FieldHeader;

    fn deref(&self) -> &FieldHeader {
        &self.header
    }
}

impl FieldInfo {
    /// The field's description, without its cells.
    pub fn of(f: &FieldRecord) -> Self {
        FieldInfo {
            header: f.header.clone(),
            cells: f.cells.len() as u32,
        }
    }

    /// A field record holding the given cells (central rebuilds fields to count slides).
    pub fn to_record(&self, cells: Vec<CellRecord>) -> FieldRecord {
        FieldRecord {
            schema_version: SCHEMA_VERSION,
            header: self.header.clone(),
            cells,
        }
    }
}

/// One cell's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellMessage {
    /// Its field.
    pub field: FieldInfo,
    /// Its position among the field's cells.
    pub index: u32,
    /// The model's answer (and a review, if there was one before sending).
    pub cell: CellRecord,
    /// A small JPEG of the cell (base64, at most [`PICTURE_SIDE`] pixels across), sent with the
    /// cells that need the lab's eyes — called Blast, or held back as a possible blast — so
    /// that central can review what it is asked to review; other cells travel without one.
    /// Older centrals ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub picture: Option<String>,
}

/// The JPEG bytes of a cell picture's text when it is valid base64, within
/// [`MAX_PICTURE_BYTES`] and starts like a JPEG; whether it decodes is for the reader to find
/// out, within its decode limits.
pub fn decode_picture(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    if text.len() > MAX_PICTURE_BYTES.div_ceil(3) * 4 {
        return None;
    }
    let bytes = base64::engine::general_purpose::STANDARD.decode(text).ok()?;
    (bytes.len() <= MAX_PICTURE_BYTES && bytes.starts_with(&[0xFF, 0xD8, 0xFF])).then_some(bytes)
}

impl CellMessage {
    /// Whether a cell's message carries its picture (see [`CellMessage::picture`]).
    pub fn wants_picture(cell: &CellRecord) -> bool {
        cell.result.class == Some(crate::classes::CellClass::Blast) || cell.result.possible_blast()
    }

    /// The picture's JPEG bytes, when it has one ([`decode_picture`]).
    pub fn picture_jpeg(&self) -> Option<Vec<u8>> {
        decode_picture(self.picture.as_deref()?)
    }

    /// Encodes JPEG bytes for [`CellMessage::picture`].
    pub fn encode_picture(jpeg: &[u8]) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(jpeg)
    }
}

/// A technician's review of one cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReviewMessage {
    /// Field id.
    pub field_id: String,
    /// Slide id.
    pub slide_id: String,
    /// The cell's position in the field.
    pub index: u32,
    /// The review.
    pub review: Review,
    /// The cell's picture as the technician saw it (JPEG, base64, at most
    /// [`MAX_PICTURE_BYTES`]), sent with a review that names a class: the clinic's teaching
    /// material (`central export-reviews`, then `trainer adapt`). Older centrals ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub picture: Option<String>,
}

impl ReviewMessage {
    /// The picture's JPEG bytes, when it has a valid one ([`decode_picture`]).
    pub fn picture_jpeg(&self) -> Option<Vec<u8>> {
        decode_picture(self.picture.as_deref()?)
    }
}

/// A slide's report: sent when a flag appears and when the slide is finished.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlideMessage {
    /// When the slide was started.
    pub started_at: u64,
    /// When it was finished, if it was.
    pub finished_at: Option<u64>,
    /// The appliance's differential and flags.
    pub report: SlideReport,
}

/// What happened to a model on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelEvent {
    /// The model is in use: at start, and when an update or a rollback switches.
    Active,
    /// An announced bundle was downloaded.
    Downloaded,
    /// A bundle passed verification and its self-test.
    Verified,
    /// A bundle, key list or instruction was refused (the detail says why).
    Rejected,
    /// A new model passed its probation.
    Confirmed,
    /// The fallback model was restored.
    RolledBack,
    /// A signed key list replaced the trusted keys.
    KeysUpdated,
    /// The model was adapted to the site's stain and camera from the cells it classified (or
    /// that adaptation was reset); the detail says on how many cells and the class mix seen.
    Adapted,
    /// An event this version does not know (from a newer appliance).
    #[serde(other)]
    Unknown,
}

impl ModelEvent {
    /// The event's name on the wire and in the logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelEvent::Active => "active",
            ModelEvent::Downloaded => "downloaded",
            ModelEvent::Verified => "verified",
            ModelEvent::Rejected => "rejected",
            ModelEvent::Confirmed => "confirmed",
            ModelEvent::RolledBack => "rolled_back",
            ModelEvent::KeysUpdated => "keys_updated",
            ModelEvent::Adapted => "adapted",
            ModelEvent::Unknown => "unknown",
        }
    }

    /// Whether a person should look at it (a refusal or a rollback).
    pub fn is_problem(self) -> bool {
        matches!(self, ModelEvent::Rejected | ModelEvent::RolledBack)
    }

    /// Whether the model in use changed with it.
    pub fn switches(self) -> bool {
        matches!(self, ModelEvent::Active | ModelEvent::RolledBack)
    }
}

impl std::str::FromStr for ModelEvent {
    type Err = std::convert::Infallible;

    /// An event's name; one this version does not know is [`ModelEvent::Unknown`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(serde_json::from_value(serde_json::Value::String(s.to_string())).unwrap_or(ModelEvent::Unknown))
    }
}

impl std::fmt::Display for ModelEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A model event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMessage {
    /// What happened.
    pub event: ModelEvent,
    /// The model version concerned.
    pub model_version: u64,
    /// Details in words (the reason of a rejection, the backend in use).
    #[serde(default)]
    pub detail: String,
}

/// An envelope's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Body {
    /// One cell's result (boxed: with its picture it is much larger than the other bodies).
    Cell(Box<CellMessage>),
    /// A review.
    Review(ReviewMessage),
    /// A slide report.
    Slide(SlideMessage),
    /// A model event.
    Model(ModelMessage),
}

impl Body {
    /// The topic kind of the body.
    pub fn kind(&self) -> Kind {
        match self {
            Body::Cell(_) => Kind::Cell,
            Body::Review(_) => Kind::Review,
            Body::Slide(_) => Kind::Slide,
            Body::Model(_) => Kind::Model,
        }
    }

    /// One message per cell of a field, without pictures.
    pub fn cells_of(field: &FieldRecord) -> Vec<Body> {
        Self::cells_with_pictures(field, |_| None)
    }

    /// One message per cell of a field; `picture(i)` gives the JPEG of the cell at `i` for
    /// the cells that carry one ([`CellMessage::wants_picture`]); it is not asked for others.
    pub fn cells_with_pictures(field: &FieldRecord, mut picture: impl FnMut(usize) -> Option<Vec<u8>>) -> Vec<Body> {
        let info = FieldInfo::of(field);
        field
            .cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                Body::Cell(Box::new(CellMessage {
                    field: info.clone(),
                    index: i as u32,
                    cell: c.clone(),
                    picture: CellMessage::wants_picture(c)
                        .then(|| picture(i))
                        .flatten()
                        .filter(|j| j.len() <= MAX_PICTURE_BYTES)
                        .map(|j| CellMessage::encode_picture(&j)),
                }))
            })
            .collect()
    }
}

/// A device's message with its stable id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// [`UPLINK_SCHEMA_VERSION`].
    pub schema_version: u32,
    /// `<clinic>:<device>:<seq>`: the same on every resend.
    pub id: String,
    /// Clinic id.
    pub clinic: String,
    /// Device id.
    pub device: String,
    /// The device's sequence number (increasing; gaps allowed).
    pub seq: u64,
    /// When the message was made, seconds since the Unix epoch.
    pub at: u64,
    /// The content.
    pub body: Body,
}

/// The message id of a device's sequence number.
pub fn message_id(clinic: &str, device: &str, seq: u64) -> String {
    format!("{clinic}:{device}:{seq}")
}

/// Longest device-supplied text kept, in characters (a cell's picture is bounded by
/// [`MAX_PICTURE_BYTES`] instead).
pub const MAX_TEXT_CHARS: usize = 2000;

/// Device text as it is kept: without control characters other than line breaks and tabs (a
/// NUL, which PostgreSQL refuses, belongs in no name, reason or description), at most
/// [`MAX_TEXT_CHARS`] characters.
pub fn clean_text(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control() || matches!(c, '\n' | '\t'))
        .take(MAX_TEXT_CHARS)
        .collect()
}

fn needs_cleaning(s: &str, cap: bool) -> bool {
    s.chars().any(|c| c.is_control() && !matches!(c, '\n' | '\t')) || (cap && s.chars().nth(MAX_TEXT_CHARS).is_some())
}

/// Cleans every text of a decoded message in place (see [`clean_text`]); the picture's text is
/// only rid of control characters.
fn clean_value(v: &mut serde_json::Value, cap: bool) {
    use serde_json::Value;
    match v {
        Value::String(s) if needs_cleaning(s, cap) => {
            *s = if cap {
                clean_text(s)
            } else {
                s.chars().filter(|c| !c.is_control()).collect()
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| clean_value(x, cap)),
        Value::Object(o) => {
            if o.keys().any(|k| needs_cleaning(k, true)) {
                let old = std::mem::take(o);
                o.extend(old.into_iter().map(|(k, v)| (clean_text(&k), v)));
            }
            for (k, x) in o.iter_mut() {
                clean_value(x, cap && k != "picture");
            }
        }
        _ => {}
    }
}

/// Parses a device's message with every text cleaned ([`clean_text`]) before it is typed: what
/// central stores is never refused by its database for a character a device put in it.
fn decode_clean<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, UplinkError> {
    let mut v: serde_json::Value = serde_json::from_slice(payload).map_err(|e| UplinkError::Invalid(e.to_string()))?;
    clean_value(&mut v, true);
    serde_json::from_value(v).map_err(|e| UplinkError::Invalid(e.to_string()))
}

fn check_version(payload: &[u8]) -> Result<(), UplinkError> {
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(UplinkError::TooLarge(payload.len()));
    }
    #[derive(Deserialize)]
    struct Probe {
        schema_version: u32,
    }
    let p: Probe = serde_json::from_slice(payload).map_err(|e| UplinkError::Invalid(e.to_string()))?;
    if p.schema_version != UPLINK_SCHEMA_VERSION {
        return Err(UplinkError::UnsupportedVersion(p.schema_version));
    }
    Ok(())
}

fn check_origin(clinic: &str, device: &str, topic: &(String, String, Kind)) -> Result<(), UplinkError> {
    if clinic != topic.0 || device != topic.1 {
        return Err(UplinkError::Mismatch(format!(
            "sent as {clinic}/{device} under {}/{}",
            topic.0, topic.1
        )));
    }
    Ok(())
}

impl Envelope {
    /// A message of a device.
    pub fn new(clinic: &str, device: &str, seq: u64, at: u64, body: Body) -> Self {
        Envelope {
            schema_version: UPLINK_SCHEMA_VERSION,
            id: message_id(clinic, device, seq),
            clinic: clinic.into(),
            device: device.into(),
            seq,
            at,
            body,
        }
    }

    /// Refuses numbers that JSON cannot carry back (an infinite probability would be stored as
    /// `null` and break every later reading of the slide).
    fn check_numbers(&self) -> Result<(), UplinkError> {
        let bad = |what: &str| Err(UplinkError::Invalid(format!("{what} is not a finite number")));
        if let Body::Cell(c) = &self.body {
            let r = &c.cell.result;
            if !r.confidence.is_finite() || !r.probabilities.values().all(|p| p.is_finite()) {
                return bad("a probability");
            }
            if r.familiarity.is_some_and(|f| !f.is_finite()) {
                return bad("familiarity");
            }
            if !c.field.microns_per_pixel.is_finite() {
                return bad("microns_per_pixel");
            }
        }
        Ok(())
    }

    /// Its topic.
    pub fn topic(&self) -> String {
        topic(&self.clinic, &self.device, self.body.kind())
    }

    /// Decodes and validates a message received on `topic`: size, schema version, JSON, and
    /// that clinic, device, kind and id agree with the topic.
    pub fn decode(topic: &str, payload: &[u8]) -> Result<Self, UplinkError> {
        let t = parse_topic(topic)?;
        if t.2 == Kind::Status {
            return Err(UplinkError::Mismatch("a status is not an envelope".into()));
        }
        check_version(payload)?;
        let e: Envelope = decode_clean(payload)?;
        check_origin(&e.clinic, &e.device, &t)?;
        if e.body.kind() != t.2 {
            return Err(UplinkError::Mismatch(format!(
                "a {} message under a {} topic",
                e.body.kind().as_str(),
                t.2.as_str()
            )));
        }
        if e.id != message_id(&e.clinic, &e.device, e.seq) {
            return Err(UplinkError::Mismatch(format!("id {:?} is not {}", e.id, e.seq)));
        }
        e.check_numbers()?;
        Ok(e)
    }
}

/// Online or offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Connected.
    Online,
    /// Disconnected (the broker publishes this as the device's last will).
    Offline,
}

/// A device's status, retained on `wbc/<clinic>/<device>/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// [`UPLINK_SCHEMA_VERSION`].
    pub schema_version: u32,
    /// Clinic id.
    pub clinic: String,
    /// Device id.
    pub device: String,
    /// Online or offline.
    pub state: DeviceState,
    /// When, seconds since the Unix epoch (for the last will: when the device connected).
    pub at: u64,
    /// Messages in the device's outbox: not yet confirmed by central.
    #[serde(default)]
    pub backlog: Option<u64>,
    /// Active model version.
    #[serde(default)]
    pub model_version: Option<u64>,
}

impl Status {
    /// Decodes and validates a status received on `topic`.
    pub fn decode(topic: &str, payload: &[u8]) -> Result<Self, UplinkError> {
        let t = parse_topic(topic)?;
        if t.2 != Kind::Status {
            return Err(UplinkError::Mismatch("not a status topic".into()));
        }
        check_version(payload)?;
        let s: Status = decode_clean(payload)?;
        check_origin(&s.clinic, &s.device, &t)?;
        Ok(s)
    }
}

/// Topic prefix of central's receipts.
pub const RECEIPT_ROOT: &str = "wbc-receipt";

/// Most sequence numbers one receipt names.
pub const MAX_RECEIPT_SEQS: usize = 2000;

/// The topic of central's receipts for one device.
pub fn receipt_topic(clinic: &str, device: &str) -> String {
    format!("{RECEIPT_ROOT}/{clinic}/{device}")
}

/// Central's word that it has committed (or for good refused) a device's messages: the
/// appliance may forget them. Sent with QoS 1, not retained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// [`UPLINK_SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The messages' sequence numbers ([`Envelope::seq`]).
    pub seqs: Vec<u64>,
}

impl Receipt {
    /// A receipt for `seqs` (at most [`MAX_RECEIPT_SEQS`] of them).
    pub fn new(seqs: Vec<u64>) -> Self {
        Receipt {
            schema_version: UPLINK_SCHEMA_VERSION,
            seqs,
        }
    }

    /// Its payload.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("serialising to memory")
    }

    /// Decodes a receipt: size, schema version, at most [`MAX_RECEIPT_SEQS`] numbers.
    pub fn decode(payload: &[u8]) -> Result<Self, UplinkError> {
        check_version(payload)?;
        let r: Receipt = serde_json::from_slice(payload).map_err(|e| UplinkError::Invalid(e.to_string()))?;
        if r.seqs.len() > MAX_RECEIPT_SEQS {
            return Err(UplinkError::Invalid(format!(
                "a receipt of {} messages (at most {MAX_RECEIPT_SEQS})",
                r.seqs.len()
            )));
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests;
