//! Device configuration and provisioning.
//!
//! The appliance's configuration is `wbc_config::Config` (typed, TOML, unknown keys
//! refused, every key with a default); this crate checks a file against it and provisions a
//! new device: its configuration, its MQTT password (a file readable by the appliance only),
//! the matching lines for the lab's Mosquitto password file and ACL, the systemd unit and the
//! udev rule that mounts USB sticks for updates.
#![deny(missing_docs)]

use anyhow::{Context, Result, bail};
use base64::Engine;
use std::path::{Path, PathBuf};

/// Checks an appliance configuration file: the error names the file, the key and what is
/// allowed.
pub fn check(path: &Path) -> Result<wbc_config::Config> {
    Ok(wbc_config::Config::load(path)?)
}

/// What `provision` needs to know.
#[derive(Debug, Clone)]
pub struct Provision {
    /// Clinic id.
    pub clinic: String,
    /// Device id.
    pub device: String,
    /// The lab's broker host.
    pub broker_host: String,
    /// Its TLS port.
    pub broker_port: u16,
    /// Where the device will find its files once installed (`/etc/wbc`).
    pub install_dir: PathBuf,
    /// The lab's update signing keys (public, PEM): the device trusts them for updates (until
    /// a signed key list replaces them). None: the release key alone.
    pub update_keys: Vec<PathBuf>,
    /// The language of the device's pages and slide reports (`en`, `fr`, `pt`).
    pub language: String,
}

/// Where the udev rule mounts a USB update stick, and the appliance looks for updates.
pub const USB_MOUNT: &str = "/media/wbc-update";

/// A Mosquitto password-file line (`user:$7$…`, PBKDF2-SHA512 with 101 iterations and a random
/// 12-byte salt — what `mosquitto_passwd` writes).
pub fn mosquitto_password_line(user: &str, password: &str) -> String {
    let salt: [u8; 12] = rand::random();
    let mut hash = [0u8; 64];
    pbkdf2::pbkdf2::<hmac::Hmac<sha2::Sha512>>(password.as_bytes(), &salt, 101, &mut hash);
    let b64 = base64::engine::general_purpose::STANDARD;
    format!("{user}:$7$101${}${}", b64.encode(salt), b64.encode(hash))
}

fn random_password() -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"abcdefghjkmnpqrstuvwxyzABCDEFGHJKMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rngs::OsRng;
    (0..24).map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char).collect()
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// The files `provision` writes, by name.
pub const FILES: [&str; 6] = [
    "appliance.toml",
    "mqtt.password",
    "mosquitto.passwd",
    "mosquitto.acl",
    "wbc-appliance.service",
    "99-wbc-usb-update.rules",
];

/// Provisions a device into `out` (which must not hold a provisioned device already). The
/// MQTT password is written once, to `mqtt.password` (mode 0600), and never printed.
pub fn provision(p: &Provision, out: &Path) -> Result<()> {
    for (key, id) in [("clinic", &p.clinic), ("device", &p.device)] {
        if !wbc_protocol::uplink::valid_id(id) {
            bail!("--{key} must be 1 to 64 letters, digits, `-` or `_`, not {id:?}");
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    if out.join("appliance.toml").exists() {
        bail!(
            "{} already holds a provisioned device; choose another folder",
            out.display()
        );
    }
    let user = wbc_protocol::uplink::device_identity(&p.clinic, &p.device);
    let dir = &p.install_dir;
    // The update keys, checked, under their key ids.
    let mut keys = Vec::new();
    for k in &p.update_keys {
        let pem = std::fs::read_to_string(k).with_context(|| format!("reading the update key {}", k.display()))?;
        let key = wbc_protocol::bundle::keys::parse_public(&pem)
            .with_context(|| format!("{} is not an ed25519 public key (PEM)", k.display()))?;
        keys.push((format!("update-keys/{}.pub", wbc_protocol::bundle::key_id(&key)), pem));
    }
    let password = random_password();
    let config = wbc_config::Config {
        data_dir: "/var/lib/wbc".into(),
        clinic: p.clinic.clone(),
        device: p.device.clone(),
        trust: keys.iter().map(|(name, _)| dir.join(name)).collect(),
        update: wbc_config::UpdateConfig {
            usb_dir: Some(USB_MOUNT.into()),
            ..Default::default()
        },
        uplink: Some(wbc_config::UplinkConfig {
            broker: wbc_protocol::broker::BrokerConfig {
                host: p.broker_host.clone(),
                port: Some(p.broker_port),
                ca_file: Some(dir.join("lab-ca.pem")),
                username: Some(user.clone()),
                password_file: Some(dir.join("mqtt.password")),
                ..Default::default()
            },
            ..Default::default()
        }),
        web: wbc_config::WebConfig {
            language: p.language.clone(),
            ..Default::default()
        },
        ..Default::default()
    };
    config.validate()?;
    let toml = format!(
        "# Appliance {user}: written by `firmware-config provision`. Copy to {}/appliance.toml with\n\
         # mqtt.password (mode 0600) and the lab's CA as lab-ca.pem.\n{}",
        dir.display(),
        toml::to_string(&config)?
    );
    std::fs::write(out.join("appliance.toml"), toml)?;
    if !keys.is_empty() {
        std::fs::create_dir_all(out.join("update-keys"))?;
    }
    for (name, pem) in &keys {
        std::fs::write(out.join(name), pem)?;
    }
    write_private(&out.join("mqtt.password"), &format!("{password}\n"))?;
    std::fs::write(
        out.join("mosquitto.passwd"),
        format!("{}\n", mosquitto_password_line(&user, &password)),
    )?;
    std::fs::write(
        out.join("mosquitto.acl"),
        format!(
            "# Append to the lab broker's ACL file: {user} may write only under its own topics,\n\
             # hears its clinic's and its own update announcements, and central's receipts.\n\
             user {user}\ntopic write wbc/{c}/{d}/#\ntopic read wbc-update/{c}\ntopic read wbc-update/{c}/{d}\n\
             topic read wbc-receipt/{c}/{d}\n",
            c = p.clinic,
            d = p.device
        ),
    )?;
    std::fs::write(
        out.join("wbc-appliance.service"),
        format!(
            "[Unit]\nDescription=WBC differential appliance ({user})\nAfter=network-online.target\n\
             Wants=network-online.target\n\n[Service]\nExecStart=/usr/local/bin/appliance run --config {cfg}\n\
             Restart=always\nRestartSec=5\nUser=wbc\nGroup=wbc\nStateDirectory=wbc\n\n[Install]\n\
             WantedBy=multi-user.target\n",
            cfg = dir.join("appliance.toml").display()
        ),
    )?;
    std::fs::write(
        out.join("99-wbc-usb-update.rules"),
        "# Mount a USB stick labelled WBC-UPDATE read-only at /media/wbc-update for model updates.\n\
         ACTION==\"add\", SUBSYSTEM==\"block\", ENV{ID_FS_LABEL}==\"WBC-UPDATE\", \
         RUN{program}+=\"/usr/bin/systemd-mount --no-block --automount=no --options=ro,nosuid,nodev,noexec \
         $devnode /media/wbc-update\"\n\
         ACTION==\"remove\", SUBSYSTEM==\"block\", ENV{ID_FS_LABEL}==\"WBC-UPDATE\", \
         RUN{program}+=\"/usr/bin/systemd-umount /media/wbc-update\"\n",
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(clinic: &str) -> Provision {
        Provision {
            clinic: clinic.into(),
            device: "scope-1".into(),
            broker_host: "mqtt.lab.example".into(),
            broker_port: 8883,
            install_dir: "/etc/wbc".into(),
            update_keys: Vec::new(),
            language: "en".into(),
        }
    }

    #[test]
    fn a_provisioned_device_has_a_valid_configuration_and_a_private_password() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        provision(&p("clinic-07"), dir.path()).unwrap();
        for f in FILES {
            assert!(dir.path().join(f).is_file(), "{f}");
        }
        let c = check(&dir.path().join("appliance.toml")).unwrap();
        assert_eq!((c.clinic.as_str(), c.device.as_str()), ("clinic-07", "scope-1"));
        let broker = c.uplink.unwrap().broker;
        assert_eq!(broker.username.as_deref(), Some("clinic-07.scope-1"));
        let pw_file = dir.path().join("mqtt.password");
        let mode = std::fs::metadata(&pw_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let pw = std::fs::read_to_string(&pw_file).unwrap();
        for f in [
            "appliance.toml",
            "mosquitto.passwd",
            "mosquitto.acl",
            "wbc-appliance.service",
        ] {
            assert!(
                !std::fs::read_to_string(dir.path().join(f)).unwrap().contains(pw.trim()),
                "{f}"
            );
        }
        let acl = std::fs::read_to_string(dir.path().join("mosquitto.acl")).unwrap();
        assert!(acl.contains(
            "user clinic-07.scope-1\ntopic write wbc/clinic-07/scope-1/#\ntopic read wbc-update/clinic-07\n\
             topic read wbc-update/clinic-07/scope-1\ntopic read wbc-receipt/clinic-07/scope-1\n"
        ));
        assert!(
            provision(&p("clinic-07"), dir.path()).is_err(),
            "never over a provisioned device"
        );
        assert!(provision(&p("clinic/07"), tempfile::tempdir().unwrap().path()).is_err());
    }

    /// Ids may hold `-`; two devices whose `clinic-device` spelled the same must still get
    /// two broker accounts.
    #[test]
    fn devices_whose_ids_run_together_get_distinct_broker_accounts() {
        let user = |clinic: &str, device: &str| {
            let dir = tempfile::tempdir().unwrap();
            let mut prov = p(clinic);
            prov.device = device.into();
            provision(&prov, dir.path()).unwrap();
            check(&dir.path().join("appliance.toml"))
                .unwrap()
                .uplink
                .unwrap()
                .broker
                .username
                .unwrap()
        };
        let (a, b) = (user("north-lab", "1"), user("north", "lab-1"));
        assert_ne!(a, b);
        assert_eq!((a.as_str(), b.as_str()), ("north-lab.1", "north.lab-1"));
    }

    #[test]
    fn the_labs_update_keys_are_trusted_and_the_usb_folder_watched() {
        let dir = tempfile::tempdir().unwrap();
        let k = wbc_protocol::bundle::keys::generate();
        let pubk = dir.path().join("lab.pub");
        wbc_protocol::bundle::keys::write_public(&pubk, &k.verifying_key()).unwrap();
        let out = dir.path().join("out");
        let mut prov = p("clinic-07");
        prov.update_keys = vec![pubk];
        provision(&prov, &out).unwrap();
        let id = wbc_protocol::bundle::key_id(&k.verifying_key());
        let c = check(&out.join("appliance.toml")).unwrap();
        assert_eq!(c.trust, vec![PathBuf::from(format!("/etc/wbc/update-keys/{id}.pub"))]);
        assert_eq!(c.update.usb_dir.as_deref(), Some(Path::new(USB_MOUNT)));
        let copied = std::fs::read_to_string(out.join(format!("update-keys/{id}.pub"))).unwrap();
        assert_eq!(
            wbc_protocol::bundle::keys::parse_public(&copied).unwrap(),
            k.verifying_key()
        );
        let rule = std::fs::read_to_string(out.join("99-wbc-usb-update.rules")).unwrap();
        assert!(rule.contains(USB_MOUNT) && rule.contains("ro,nosuid,nodev,noexec"));
        // Not a key: refused, nothing written.
        let bad = dir.path().join("bad.pub");
        std::fs::write(&bad, "hello").unwrap();
        let mut prov = p("clinic-07");
        prov.update_keys = vec![bad];
        let e = provision(&prov, &dir.path().join("out2")).unwrap_err();
        assert!(format!("{e:#}").contains("bad.pub"), "{e:#}");
        assert!(!dir.path().join("out2/appliance.toml").exists());
    }

    #[test]
    fn a_device_is_provisioned_in_its_clinics_language_and_only_a_known_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut prov = p("clinic-07");
        prov.language = "pt-BR".into();
        provision(&prov, &dir.path().join("pt")).unwrap();
        assert_eq!(
            check(&dir.path().join("pt/appliance.toml")).unwrap().web.language,
            "pt-BR"
        );
        prov.language = "tlh".into();
        let e = format!("{:#}", provision(&prov, &dir.path().join("tlh")).unwrap_err());
        assert!(e.contains("web.language"), "{e}");
        assert!(!dir.path().join("tlh/appliance.toml").exists());
    }

    #[test]
    fn a_configuration_error_names_the_file_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.toml");
        std::fs::write(&f, "clinic = \"x\"\n[uplink]\ninflite = 3\n").unwrap();
        let e = format!("{:#}", check(&f).unwrap_err());
        assert!(e.contains("a.toml") && e.contains("inflite"), "{e}");
    }

    #[test]
    fn password_lines_are_in_mosquittos_pbkdf2_format() {
        let line = mosquitto_password_line("u", "pw");
        let parts: Vec<&str> = line.split('$').collect();
        assert_eq!(parts[0], "u:");
        assert_eq!((parts[1], parts[2]), ("7", "101"));
        let b64 = base64::engine::general_purpose::STANDARD;
        assert_eq!(b64.decode(parts[3]).unwrap().len(), 12);
        assert_eq!(b64.decode(parts[4]).unwrap().len(), 64);
        assert_ne!(line, mosquitto_password_line("u", "pw"), "salted");
    }
}
