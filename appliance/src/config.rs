//! The daemon's configuration (TOML). Every field has a default, so `appliance run` with no
//! file runs on the embedded model, a local data folder, an inbox folder inside it and the web
//! UI on localhost.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use wbc_shared::slide::SlideSettings;

pub use wbc_shared::auth::{User, verify_password};

/// The web UI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct WebConfig {
    /// Address to listen on.
    pub listen: String,
    /// Accounts. With none, the daemon creates `admin` with a random password on first start,
    /// prints the password once and keeps only its hash (in `<data_dir>/web-users.toml`).
    pub users: Vec<User>,
    /// Largest upload accepted, bytes.
    pub max_upload_bytes: usize,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            listen: "127.0.0.1:8080".into(),
            users: Vec::new(),
            max_upload_bytes: 64 << 20,
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
    pub store: crate::store::Retention,
    /// The uplink to central (`[uplink]`); without it results wait in the outbox.
    pub uplink: Option<crate::uplink::UplinkConfig>,
    /// Model updates by USB stick and network, probation and limits (`[update]`).
    pub update: crate::update::UpdateConfig,
    /// Slide counting and flags.
    pub slide: SlideSettings,
    /// Web UI.
    pub web: WebConfig,
    /// Compute backend: `auto` (a GPU adapter if there is one), `cpu` or `gpu`.
    pub backend: crate::backend::BackendChoice,
    /// The microscope camera, if one is attached (`[camera.v4l2]` or `[camera.replay]`).
    pub camera: Option<crate::capture::CameraConfig>,
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
        }
    }
}

impl Config {
    /// Reads a TOML file; every missing field takes its default, unknown fields are refused.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let c: Config =
            toml::from_str(&text).with_context(|| format!("{} is not a valid configuration", path.display()))?;
        c.validate().with_context(|| format!("{}", path.display()))?;
        Ok(c)
    }

    /// Refuses values the daemon cannot run with.
    pub fn validate(&self) -> Result<()> {
        if !(self.microns_per_pixel.is_finite() && self.microns_per_pixel > 0.0 && self.microns_per_pixel < 100.0) {
            bail!("microns_per_pixel must be a positive number of micrometres");
        }
        if !(0.0..=1.0).contains(&self.min_confidence) {
            bail!("min_confidence must be between 0 and 1");
        }
        if self.inbox_poll_ms == 0 {
            bail!("inbox_poll_ms must be at least 1");
        }
        self.slide.validate().map_err(anyhow::Error::msg)?;
        for (key, id) in [("clinic", &self.clinic), ("device", &self.device)] {
            if !wbc_shared::uplink::valid_id(id) {
                bail!("{key} must be 1 to 64 letters, digits, `-` or `_` (it is a topic level), not {id:?}");
            }
        }
        if let Some(u) = &self.uplink {
            u.validate()?;
        }
        self.update.validate()?;
        for u in &self.web.users {
            u.validate().map_err(anyhow::Error::msg)?;
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

/// Hashes a password for the configuration (Argon2id, random salt).
pub fn hash_password(password: &str) -> Result<String> {
    wbc_shared::auth::hash_password(password).map_err(anyhow::Error::msg)
}

/// The accounts to use: the configured ones, else those kept in `<data_dir>/web-users.toml`,
/// else a new `admin` with a random password, which is returned once (to be shown to whoever
/// started the daemon) and stored only as a hash.
pub fn users_or_first_run(config: &Config) -> Result<(Vec<User>, Option<String>)> {
    if !config.web.users.is_empty() {
        return Ok((config.web.users.clone(), None));
    }
    #[derive(Serialize, Deserialize)]
    struct Kept {
        users: Vec<User>,
    }
    let path = config.data_dir.join("web-users.toml");
    if path.exists() {
        let text = std::fs::read_to_string(&path)?;
        let k: Kept = toml::from_str(&text).with_context(|| format!("{} is damaged", path.display()))?;
        return Ok((k.users, None));
    }
    let password: String = {
        use rand::Rng;
        let mut rng = rand::rngs::OsRng;
        (0..16)
            .map(|_| {
                const CHARS: &[u8] = b"abcdefghjkmnpqrstuvwxyzABCDEFGHJKMNPQRSTUVWXYZ23456789";
                CHARS[rng.gen_range(0..CHARS.len())] as char
            })
            .collect()
    };
    let users = vec![User {
        name: "admin".into(),
        password_hash: hash_password(&password)?,
    }];
    std::fs::create_dir_all(&config.data_dir)?;
    std::fs::write(&path, toml::to_string(&Kept { users: users.clone() })?)?;
    Ok((users, Some(password)))
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
            "data_dir", "clinic", "device", "store", "uplink", "slide", "web", "backend", "camera",
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

    #[test]
    fn passwords_are_hashed_and_verified() {
        let h = hash_password("s3cret").unwrap();
        assert!(!h.contains("s3cret"));
        let u = User {
            name: "t".into(),
            password_hash: h,
        };
        assert!(verify_password(&u, "s3cret"));
        assert!(!verify_password(&u, "S3cret"));
        let broken = User {
            name: "t".into(),
            password_hash: "nonsense".into(),
        };
        assert!(!verify_password(&broken, ""));
    }

    #[test]
    fn first_run_makes_one_admin_and_keeps_only_the_hash() {
        let dir = tempfile::tempdir().unwrap();
        let c = Config {
            data_dir: dir.path().to_path_buf(),
            ..Default::default()
        };
        let (users, pw) = users_or_first_run(&c).unwrap();
        let pw = pw.expect("a new password is shown once");
        assert!(verify_password(&users[0], &pw));
        let kept = std::fs::read_to_string(dir.path().join("web-users.toml")).unwrap();
        assert!(!kept.contains(&pw));
        let (again, none) = users_or_first_run(&c).unwrap();
        assert_eq!(again, users);
        assert!(none.is_none(), "shown only the first time");
    }
}
