//! The appliance's configuration (TOML), as data: every key, its default, its documentation and
//! its checks, shared by the appliance, `firmware-config` (check, schema, provision) and the
//! web UI's schema, without the appliance's runtime. Every field has a default, so
//! `appliance run` with no file runs on the embedded model, a local data folder, an inbox
//! folder inside it and the web UI on localhost.
#![deny(missing_docs)]

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use wbc_protocol::broker::BrokerConfig;
use wbc_protocol::slide::SlideSettings;

pub use wbc_web::auth::User;

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {}: {cause}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the system said.
        cause: std::io::Error,
    },
    /// The file is not TOML of this shape (an unknown key, a wrong type).
    #[error("{} is not a valid configuration: {cause}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said (it names the key and the line).
        cause: toml::de::Error,
    },
    /// A value the appliance cannot run with; the message names the key.
    #[error("{0}")]
    Invalid(String),
}

/// The web UI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct WebConfig {
    /// Address to listen on.
    pub listen: String,
    /// Accounts. With none, the daemon creates `admin` with a random password on first start,
    /// writes the password to `<data_dir>/first-admin-password` (mode 0600) and keeps only its
    /// hash (in `<data_dir>/web-users.toml`).
    pub users: Vec<User>,
    /// Largest upload accepted, bytes.
    pub max_upload_bytes: usize,
    /// Language of the pages and the slide report (`en`, `fr`, `pt`); a user's own `language`
    /// wins for their pages, and `?lang=` chooses another for one report.
    pub language: String,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            listen: "127.0.0.1:8080".into(),
            users: Vec::new(),
            max_upload_bytes: 64 << 20,
            language: "en".into(),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where results, original images and slides are kept.
    pub data_dir: PathBuf,
    /// Folder watched for images copied in (USB stick, network share); default
    /// `<data_dir>/inbox`.
    pub inbox: Option<PathBuf>,
    /// How often the inbox is looked at, milliseconds.
    pub inbox_poll_ms: u64,
    /// Model bundle; default the embedded one.
    pub bundle: Option<PathBuf>,
    /// Trusted public keys (PEM); default the default bundle's key.
    pub trust: Vec<PathBuf>,
    /// Pixel size of the camera's fields, µm (its calibration at the objective in use).
    pub microns_per_pixel: f32,
    /// Below this confidence a cell is Unidentified, for review.
    pub min_confidence: f32,
    /// Clinic id (letters, digits, `-`, `_`): the first level of this device's MQTT topics.
    pub clinic: String,
    /// Device id, unique within the clinic.
    pub device: String,
    /// Retention of images and delivered results, and the free space kept (`[store]`).
    pub store: Retention,
    /// The uplink to central (`[uplink]`); without it results wait in the outbox.
    pub uplink: Option<UplinkConfig>,
    /// Model updates by USB stick and network, probation and limits (`[update]`).
    pub update: UpdateConfig,
    /// Slide counting and flags.
    pub slide: SlideSettings,
    /// Web UI.
    pub web: WebConfig,
    /// Compute backend: `auto` (a GPU adapter if there is one), `cpu` or `gpu`.
    pub backend: BackendChoice,
    /// The microscope camera, if one is attached (`[camera.v4l2]` or `[camera.replay]`).
    pub camera: Option<CameraConfig>,
    /// Adaptation to this clinic's stain and camera from the cells it classifies
    /// (`[adaptation]`).
    pub adaptation: AdaptationConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("appliance-data"),
            inbox: None,
            inbox_poll_ms: 1000,
            bundle: None,
            trust: Vec::new(),
            microns_per_pixel: 0.1,
            min_confidence: 0.5,
            clinic: "unassigned".into(),
            device: "appliance".into(),
            store: Default::default(),
            uplink: None,
            update: Default::default(),
            slide: SlideSettings::default(),
            web: WebConfig::default(),
            backend: Default::default(),
            camera: None,
            adaptation: AdaptationConfig::default(),
        }
    }
}

impl Config {
    /// Reads a TOML file; every missing field takes its default, unknown fields are refused.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.to_path_buf(),
            cause,
        })?;
        let c: Config = toml::from_str(&text).map_err(|cause| ConfigError::Parse {
            path: path.to_path_buf(),
            cause,
        })?;
        c.validate()
            .map_err(|e| ConfigError::Invalid(format!("{}: {e}", path.display())))?;
        Ok(c)
    }

    /// Refuses values the daemon cannot run with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.microns_per_pixel.is_finite() && self.microns_per_pixel > 0.0 && self.microns_per_pixel < 100.0) {
            return Err(ConfigError::Invalid(
                "microns_per_pixel must be a positive number of micrometres".to_string(),
            ));
        }
        if !(0.0..=1.0).contains(&self.min_confidence) {
            return Err(ConfigError::Invalid(
                "min_confidence must be between 0 and 1".to_string(),
            ));
        }
        if self.inbox_poll_ms == 0 {
            return Err(ConfigError::Invalid("inbox_poll_ms must be at least 1".to_string()));
        }
        if wbc_web::i18n::Lang::from_code(&self.web.language).is_none() {
            return Err(ConfigError::Invalid(format!(
                "web.language {:?} is not one of en, fr, pt",
                self.web.language
            )));
        }
        self.slide.validate().map_err(|e| ConfigError::Invalid(e.to_string()))?;
        for (key, id) in [("clinic", &self.clinic), ("device", &self.device)] {
            if !wbc_protocol::uplink::valid_id(id) {
                return Err(ConfigError::Invalid(format!(
                    "{key} must be 1 to 64 letters, digits, `-` or `_` (it is a topic level), not {id:?}"
                )));
            }
        }
        if let Some(u) = &self.uplink {
            u.validate()?;
        }
        self.update.validate()?;
        self.adaptation.validate()?;
        for u in &self.web.users {
            u.validate().map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        Ok(())
    }

    /// The inbox folder.
    pub fn inbox_dir(&self) -> PathBuf {
        self.inbox.clone().unwrap_or_else(|| self.data_dir.join("inbox"))
    }
}

/// The configuration's JSON schema (every key, its type, its documentation; unknown keys not
/// allowed), for editors, `firmware-config schema` and the web UI (`/api/config-schema`).
pub fn schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(Config)).expect("a schema is JSON")
}

/// Fewest cells a site adaptation is fitted on (the model crate's `adapt::MIN_CELLS`, which
/// a test keeps equal to this).
pub const MIN_ADAPTATION_CELLS: usize = 30;

/// Adaptation to the site without labels (`[adaptation]`): the appliance keeps the pooled
/// features of the last cells it classified and, once it has `after_cells` of them, moves the
/// model's features onto the training cells' statistics (never its signed weights); it fits
/// again after each further `after_cells` cells, and starts over with a new model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptationConfig {
    /// Whether the appliance adapts to its site (off: the model's answers as signed).
    pub enabled: bool,
    /// Cells classified before the first adaptation, and between two fits (at least 30).
    pub after_cells: usize,
    /// The most recent cells kept to fit on (at least `after_cells`; about 5 KiB each).
    pub keep_cells: usize,
}

impl Default for AdaptationConfig {
    fn default() -> Self {
        AdaptationConfig {
            enabled: true,
            after_cells: 300,
            keep_cells: 3000,
        }
    }
}

impl AdaptationConfig {
    /// Refuses settings adaptation cannot run with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.after_cells < MIN_ADAPTATION_CELLS {
            return Err(ConfigError::Invalid(format!(
                "adaptation.after_cells must be at least {MIN_ADAPTATION_CELLS}: fewer cells' statistics are noise"
            )));
        }
        if self.keep_cells < self.after_cells || self.keep_cells > 100_000 {
            return Err(ConfigError::Invalid(
                "adaptation.keep_cells must be at least adaptation.after_cells and at most 100000".to_string(),
            ));
        }
        Ok(())
    }
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

/// The uplink's settings (`[uplink]`; without it nothing is sent, results wait in the
/// outbox).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct UplinkConfig {
    /// The broker (`[uplink.broker]`).
    pub broker: BrokerConfig,
    /// Messages sent and not yet acknowledged, at most.
    pub inflight: u16,
    /// How often the status (with the backlog) is republished, seconds.
    pub status_every_s: u64,
    /// Longest wait between connection attempts, seconds.
    pub max_backoff_s: u64,
    /// A message the broker took but central has not confirmed within this many seconds is
    /// sent again (then after twice as long each time, up to a day).
    pub confirm_after_s: u64,
}

impl Default for UplinkConfig {
    fn default() -> Self {
        UplinkConfig {
            broker: BrokerConfig::default(),
            inflight: 32,
            status_every_s: 60,
            max_backoff_s: 60,
            confirm_after_s: 600,
        }
    }
}

impl UplinkConfig {
    /// Refuses settings the uplink cannot run with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.broker
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("[uplink.broker]: {e}")))?;
        if !(1..=1000).contains(&self.inflight) {
            return Err(ConfigError::Invalid(
                "uplink.inflight must be between 1 and 1000".to_string(),
            ));
        }
        if self.status_every_s == 0 || self.max_backoff_s == 0 || self.confirm_after_s == 0 {
            return Err(ConfigError::Invalid(
                "uplink.status_every_s, uplink.max_backoff_s and uplink.confirm_after_s must be at least 1".to_string(),
            ));
        }
        Ok(())
    }
}

/// Model updates (`[update]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct UpdateConfig {
    /// Folder watched for update files: the USB stick's mount point. Unset: no USB updates.
    pub usb_dir: Option<PathBuf>,
    /// How often the USB folder is looked at, seconds.
    pub poll_s: u64,
    /// CA certificate (PEM) that signed the download server's certificate. Default: the
    /// uplink broker's `ca_file`, else the public web roots.
    pub ca_file: Option<PathBuf>,
    /// Network timeout of a download (connecting, and between two reads), seconds.
    pub timeout_s: u64,
    /// Largest bundle accepted, bytes (by USB or download).
    pub max_bundle_bytes: u64,
    /// Fields a new model must process before it is confirmed (its probation).
    pub probation_fields: u32,
    /// Pipeline failures, or starts after a crash, during probation before the fallback model
    /// is restored.
    pub max_failures: u32,
}

impl Default for UpdateConfig {
    fn default() -> Self {
        let p = ModelPolicy::default();
        UpdateConfig {
            usb_dir: None,
            poll_s: 5,
            ca_file: None,
            timeout_s: 30,
            max_bundle_bytes: p.max_bundle_bytes,
            probation_fields: p.probation_fields,
            max_failures: p.max_failures,
        }
    }
}

impl UpdateConfig {
    /// Refuses settings the update path cannot run with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=3600).contains(&self.poll_s) {
            return Err(ConfigError::Invalid(
                "update.poll_s must be between 1 and 3600 seconds".to_string(),
            ));
        }
        if !(1..=3600).contains(&self.timeout_s) {
            return Err(ConfigError::Invalid(
                "update.timeout_s must be between 1 and 3600 seconds".to_string(),
            ));
        }
        if self.max_bundle_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "update.max_bundle_bytes must be at least 1024".to_string(),
            ));
        }
        if self.probation_fields == 0 || self.max_failures == 0 {
            return Err(ConfigError::Invalid(
                "update.probation_fields and update.max_failures must be at least 1".to_string(),
            ));
        }
        Ok(())
    }

    /// The model store's policy.
    pub fn policy(&self) -> ModelPolicy {
        ModelPolicy {
            max_bundle_bytes: self.max_bundle_bytes,
            probation_fields: self.probation_fields,
            max_failures: self.max_failures,
        }
    }
}

/// Limits of the update path (`[update]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ModelPolicy {
    /// Largest bundle accepted, bytes (by USB or download).
    pub max_bundle_bytes: u64,
    /// Fields a new model must process before it is confirmed (its probation).
    pub probation_fields: u32,
    /// Pipeline failures, or starts after a crash, during probation before the fallback model
    /// is restored.
    pub max_failures: u32,
}

impl Default for ModelPolicy {
    fn default() -> Self {
        ModelPolicy {
            max_bundle_bytes: 8 << 30,
            probation_fields: 20,
            max_failures: 3,
        }
    }
}

/// What the configuration asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum BackendChoice {
    /// A GPU adapter if there is one, else the CPU.
    #[default]
    Auto,
    /// The CPU backend.
    Cpu,
    /// The wgpu backend on any adapter, a software one included (an error if there is none).
    Gpu,
}

/// Which camera the daemon uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum CameraConfig {
    /// A V4L2 device (`/dev/video0`), MJPEG at the given size (needs the `camera` feature).
    V4l2 {
        /// Device path.
        device: PathBuf,
        /// Frame width.
        width: u32,
        /// Frame height.
        height: u32,
    },
    /// Frames recorded in a folder, replayed in name order.
    Replay {
        /// The folder.
        folder: PathBuf,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_is_the_default_and_unknown_or_bad_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "").unwrap();
        assert_eq!(Config::load(&p).unwrap(), Config::default());
        std::fs::write(&p, "[web]\nlanguage = \"pt-BR\"\n").unwrap();
        assert_eq!(Config::load(&p).unwrap().web.language, "pt-BR");
        std::fs::write(&p, "[web]\nlanguage = \"klingon\"\n").unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains("web.language"), "{e}");
        std::fs::write(
            &p,
            "data_dir = \"d\"\n[slide]\ntarget = 200\nmin_cells = 150\n[slide.reference_ranges]\nBlast = [0.0, 0.0]\n",
        )
        .unwrap();
        let c = Config::load(&p).unwrap();
        assert_eq!(c.slide.target, 200);
        assert_eq!(c.inbox_dir(), PathBuf::from("d/inbox"));
        for bad in [
            "colour = 1",
            "microns_per_pixel = -1.0",
            "min_confidence = 2.0",
            "[slide]\ntarget = 0\nmin_cells = 1\nreference_ranges = {}",
            "[[web.users]]\nname = \"a\"\npassword_hash = \"plain\"",
            "data_dir = [",
            "clinic = \"a/b\"",
            "device = \"\"",
            "[store]\nmax_image = 1",
            "[uplink]\ninflight = 0",
            "[uplink.broker]\nhost = \"\"",
            "[update]\npoll_s = 0",
            "[update]\nprobation_fields = 0",
            "[update]\nusb = \"/media\"",
            "[adaptation]\nafter_cells = 29",
            "[adaptation]\nafter_cells = 100\nkeep_cells = 99",
            "[adaptation]\nevery = 5",
        ] {
            std::fs::write(&p, bad).unwrap();
            assert!(Config::load(&p).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_schema_documents_every_key_and_allows_no_others() {
        let s = schema();
        assert_eq!(s["additionalProperties"], false);
        let props = s["properties"].as_object().unwrap();
        for key in [
            "data_dir",
            "clinic",
            "device",
            "store",
            "uplink",
            "slide",
            "web",
            "backend",
            "camera",
            "adaptation",
        ] {
            assert!(props.contains_key(key), "{key}");
        }
        assert!(props["clinic"]["description"].as_str().unwrap().contains("Clinic id"));
        let text = s.to_string();
        for nested in [
            "UplinkConfig",
            "BrokerConfig",
            "Retention",
            "SlideSettings",
            "UpdateConfig",
        ] {
            assert!(text.contains(nested), "{nested}");
        }
    }
}
