//! Telling devices of a new model: `central announce` publishes, retained, on
//! `wbc-update/<clinic>` (every device of the clinic) or `wbc-update/<clinic>/<device>`, the
//! bundle's version, size, sha256 and HTTPS address, with a signed key list or rollback
//! instruction when one is needed. A device that connects later still hears it; an empty
//! retained message withdraws it. The announcement is not signed: the device checks the
//! downloaded file against the sha256 and then the bundle's own signature.

use anyhow::{Context, Result, bail};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use std::path::Path;
use std::time::Duration;
use wbc_protocol::bundle::UnverifiedBundle;
use wbc_protocol::mqtt::{BrokerConfig, drive};
use wbc_protocol::signed::{ANNOUNCE_ROOT, Announcement, SignedDoc};
use wbc_protocol::uplink::valid_id;

/// The announcement topic for a clinic, or one device of it.
pub fn topic(clinic: &str, device: Option<&str>) -> Result<String> {
    for id in std::iter::once(clinic).chain(device) {
        if !valid_id(id) {
            bail!("{id:?} is not a clinic or device id (1 to 64 letters, digits, `-` or `_`)");
        }
    }
    Ok(match device {
        Some(d) => format!("{ANNOUNCE_ROOT}/{clinic}/{d}"),
        None => format!("{ANNOUNCE_ROOT}/{clinic}"),
    })
}

fn read_doc(path: &Path) -> Result<SignedDoc> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    SignedDoc::parse(&bytes).with_context(|| format!("{} is not a signed document", path.display()))
}

/// The announcement of `bundle`, to be served at `url`: its version (from its manifest, which
/// must be signed), size and sha256, with the signed documents given.
pub fn announcement(bundle: &Path, url: &str, keys: Option<&Path>, rollback: Option<&Path>) -> Result<Announcement> {
    // The manifest alone: a multi-GB bundle is hashed as it streams, never read whole.
    let manifest = UnverifiedBundle::claimed_manifest_of_file(bundle)
        .with_context(|| format!("{} is not a model bundle", bundle.display()))?;
    let (sha256, size) = wbc_protocol::bundle::file_sha256(bundle)?;
    let a = Announcement {
        model_version: manifest.model_version,
        size,
        sha256,
        url: url.to_string(),
        keys: keys.map(read_doc).transpose()?,
        rollback: rollback.map(read_doc).transpose()?,
    };
    // What devices will check first.
    Announcement::parse(&serde_json::to_vec(&a)?)?;
    Ok(a)
}

/// Refuses to announce a site bundle (one `trainer adapt` made for one clinic) to another
/// clinic: its devices would refuse it anyway, and the lab has mixed up two clinics.
pub fn check_clinic(bundle: &Path, clinic: &str) -> Result<()> {
    let manifest = UnverifiedBundle::claimed_manifest_of_file(bundle)
        .with_context(|| format!("{} is not a model bundle", bundle.display()))?;
    match manifest.clinic {
        Some(c) if c != clinic => anyhow::bail!(
            "{} was made for clinic {c:?} from its reviewed cells; it is not for clinic {clinic:?}",
            bundle.display()
        ),
        _ => Ok(()),
    }
}

/// Publishes `payload` retained with QoS 1 on `topic` and returns once the broker has
/// acknowledged it (an empty payload withdraws what was retained there).
pub async fn publish_retained(broker: &BrokerConfig, client_id: &str, topic: &str, payload: Vec<u8>) -> Result<()> {
    let mut opts = broker.options(client_id)?;
    opts.set_clean_session(true);
    let (client, events) = AsyncClient::new(opts, 8);
    let mut events = drive(events);
    let wait = async {
        loop {
            match events
                .recv()
                .await
                .context("connection ended")?
                .context("connecting to the broker")?
            {
                Event::Incoming(Packet::ConnAck(_)) => {
                    client.publish(topic, QoS::AtLeastOnce, true, payload.clone()).await?;
                }
                Event::Incoming(Packet::PubAck(_)) => return anyhow::Ok(()),
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .context("the broker did not acknowledge the announcement within 30 s")??;
    let _ = client.disconnect().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_per_clinic_or_device_and_ids_are_checked() {
        assert_eq!(topic("c1", None).unwrap(), "wbc-update/c1");
        assert_eq!(topic("c1", Some("d-2")).unwrap(), "wbc-update/c1/d-2");
        assert!(topic("c/1", None).is_err());
        assert!(topic("c1", Some("#")).is_err());
    }

    #[test]
    fn an_announcement_describes_the_file_and_refuses_what_is_not_a_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.bundle");
        let k = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let manifest: wbc_protocol::bundle::Manifest = serde_json::from_value(serde_json::json!({
            "format_version": 1, "family": "compact", "model_config": {}, "classes": [],
            "preprocess": wbc_protocol::preprocess::Preprocess::imagenet(224), "model_version": 9,
            "min_appliance_version": "0.1.0", "created_at": "", "training": {}, "metrics": {}, "parts": {}
        }))
        .unwrap();
        let bytes = wbc_protocol::bundle::BundleBuilder::new(manifest.clone())
            .part("w", vec![1; 100])
            .unwrap()
            .finish(&k)
            .unwrap();
        std::fs::write(&p, &bytes).unwrap();
        let a = announcement(&p, "https://lab.example/m.bundle", None, None).unwrap();
        assert_eq!(a.model_version, 9);
        assert_eq!(a.size, bytes.len() as u64);
        assert_eq!(a.sha256, wbc_protocol::bundle::sha256_hex(&bytes));
        assert!(announcement(&p, "http://lab.example/m.bundle", None, None).is_err());
        check_clinic(&p, "any-clinic").unwrap();
        let site = |clinic: &str| {
            let mut m = manifest.clone();
            m.clinic = Some(clinic.into());
            let bytes = wbc_protocol::bundle::BundleBuilder::new(m)
                .part("w", vec![1; 100])
                .unwrap()
                .finish(&k)
                .unwrap();
            std::fs::write(&p, bytes).unwrap();
        };
        site("clinic-a");
        check_clinic(&p, "clinic-a").unwrap();
        let e = check_clinic(&p, "clinic-b").unwrap_err().to_string();
        assert!(e.contains("made for clinic \"clinic-a\""), "{e}");
        std::fs::write(&p, b"not a bundle").unwrap();
        assert!(announcement(&p, "https://lab.example/m.bundle", None, None).is_err());
    }
}
