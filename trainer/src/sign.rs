//! What the lab signs besides bundles: trusted key lists (key rotation and revocation), rollback
//! instructions, and bundles signed again by a new key. The documents are written where the
//! appliance looks for them on a USB stick (`*.keys.json`, `*.rollback.json`) or sent with a
//! network announcement (`central announce --keys/--rollback`).

use anyhow::{Context, Result, bail};
use ed25519_dalek::{SigningKey, VerifyingKey};
use std::path::Path;
use wbc_protocol::bundle::{Bundle, BundleBuilder, ReadLimits, UnverifiedBundle, keys, sha256_hex};
use wbc_protocol::signed::{KeyList, Rollback, SignedDoc};

fn now() -> Result<String> {
    Ok(time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339)?)
}

/// Writes a signed document to `out`, whose name must end with `suffix` (what the appliance
/// looks for), never over an existing file.
pub fn write_doc(doc: &SignedDoc, out: &Path, suffix: &str) -> Result<()> {
    if !out.to_string_lossy().ends_with(suffix) {
        bail!(
            "{}: the file name must end with {suffix} (the appliance looks for those)",
            out.display()
        );
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .with_context(|| format!("creating {}", out.display()))?;
    use std::io::Write;
    f.write_all(&serde_json::to_vec_pretty(doc)?)?;
    Ok(())
}

/// A key list of the public keys in `public_keys` (PEM files), signed by `key` (a key the
/// devices trust now).
pub fn key_list(key: &SigningKey, sequence: u64, public_keys: &[impl AsRef<Path>]) -> Result<SignedDoc> {
    if sequence == 0 {
        bail!("--sequence must be at least 1 (0 is the provisioned keys)");
    }
    if public_keys.is_empty() {
        bail!("a key list needs at least one public key");
    }
    let mut pems = Vec::new();
    for p in public_keys {
        let p = p.as_ref();
        let pem = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        keys::parse_public(&pem).with_context(|| format!("{}", p.display()))?;
        pems.push(pem);
    }
    Ok(SignedDoc::sign(
        &KeyList {
            sequence,
            keys: pems,
            created_at: now()?,
        },
        key,
    ))
}

/// Who a rollback instruction is for.
#[derive(Debug, Clone, Default)]
pub struct Audience {
    /// Clinic id; `None`: every clinic.
    pub clinic: Option<String>,
    /// Device id; `None`: every device of the clinic.
    pub device: Option<String>,
}

/// Permission to leave `from_version` for the bundle file `to` (its version and sha256 are
/// read from it), signed by `key`.
pub fn rollback(key: &SigningKey, to: &Path, from_version: u64, audience: Audience, reason: &str) -> Result<SignedDoc> {
    let bytes = std::fs::read(to).with_context(|| format!("reading {}", to.display()))?;
    let manifest = UnverifiedBundle::read(&bytes[..], &ReadLimits::default())
        .and_then(|b| b.claimed_manifest())
        .with_context(|| format!("{} is not a model bundle", to.display()))?;
    if manifest.model_version >= from_version {
        bail!(
            "{} is version {}, not older than {from_version}: a newer bundle needs no rollback instruction",
            to.display(),
            manifest.model_version
        );
    }
    if reason.trim().is_empty() {
        bail!("give the reason (--reason): technicians and central see it");
    }
    Ok(SignedDoc::sign(
        &Rollback {
            from_version,
            to_version: manifest.model_version,
            to_sha256: sha256_hex(&bytes),
            clinic: audience.clinic,
            device: audience.device,
            reason: reason.to_string(),
            created_at: now()?,
        },
        key,
    ))
}

/// The bundle at `path`, verified with `trusted`, signed again by `key` (the manifest and parts
/// unchanged).
pub fn resign(path: &Path, trusted: &[VerifyingKey], key: &SigningKey) -> Result<Vec<u8>> {
    let b = Bundle::open_mapped(path, trusted, &Default::default()).with_context(|| format!("{}", path.display()))?;
    Ok(BundleBuilder::from_bundle(&b).finish(key)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_verify_with_the_signing_key_and_name_what_they_are_about() {
        let dir = tempfile::tempdir().unwrap();
        let old = SigningKey::from_bytes(&[1; 32]);
        let new = SigningKey::from_bytes(&[2; 32]);
        let new_pub = dir.path().join("new.pub");
        keys::write_public(&new_pub, &new.verifying_key()).unwrap();
        let doc = key_list(&old, 3, &[&new_pub]).unwrap();
        let l: KeyList = doc.verify(&[old.verifying_key()]).unwrap();
        assert_eq!((l.sequence, l.public_keys().unwrap()), (3, vec![new.verifying_key()]));
        assert!(key_list(&old, 0, &[&new_pub]).is_err());
        assert!(key_list(&old, 1, &[dir.path().join("missing.pub")]).is_err());

        // A bundle signed by the old key, signed again by the new one.
        let manifest: wbc_protocol::bundle::Manifest = serde_json::from_value(serde_json::json!({
            "format_version": 1, "family": "compact", "model_config": {}, "classes": [],
            "preprocess": wbc_cells::image::Preprocess::imagenet(224), "model_version": 4,
            "min_appliance_version": "0.1.0", "created_at": "", "training": {}, "metrics": {}, "parts": {}
        }))
        .unwrap();
        let bytes = BundleBuilder::new(manifest)
            .part("w", vec![5; 64])
            .unwrap()
            .finish(&old)
            .unwrap();
        let v4 = dir.path().join("v4.bundle");
        std::fs::write(&v4, &bytes).unwrap();
        let again = resign(&v4, &[old.verifying_key()], &new).unwrap();
        assert_eq!(
            Bundle::from_bytes(&again, &[new.verifying_key()])
                .unwrap()
                .manifest
                .model_version,
            4
        );
        assert!(
            resign(&v4, &[new.verifying_key()], &new).is_err(),
            "only a verified bundle is signed again"
        );

        let doc = rollback(&new, &v4, 5, Audience::default(), "v5 miscounts").unwrap();
        let r: Rollback = doc.verify(&[new.verifying_key()]).unwrap();
        assert_eq!((r.from_version, r.to_version, r.to_sha256), (5, 4, sha256_hex(&bytes)));
        assert!(rollback(&new, &v4, 4, Audience::default(), "x").is_err(), "not older");
        assert!(rollback(&new, &v4, 5, Audience::default(), " ").is_err(), "no reason");

        let out = dir.path().join("r.rollback.json");
        write_doc(&doc, &out, ".rollback.json").unwrap();
        assert!(write_doc(&doc, &out, ".rollback.json").is_err(), "never overwritten");
        assert!(write_doc(&doc, &dir.path().join("r.json"), ".rollback.json").is_err());
        let back = SignedDoc::parse(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(back, doc);
    }
}
