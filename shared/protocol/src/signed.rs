//! What the lab tells devices about models, besides bundles: signed documents (a new list of
//! trusted keys, an instruction to roll back) and the unsigned network announcement of a new
//! bundle (its integrity comes from the sha256 it names and the bundle's own signature).
//!
//! A signed document is JSON `{ "payload": "<JSON text>", "key_id": .., "signature": hex }`; the
//! ed25519 signature covers the exact bytes of `payload`, and the payload names its own `type`,
//! so a key list can never be taken for a rollback or the other way round.

use crate::bundle::{BundleError, check_signature, key_id, keys};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Largest signed document or announcement accepted, bytes.
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024;

/// A signed document as it travels (a file on a USB stick, a field of an announcement).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedDoc {
    /// The document, JSON text; the signature covers exactly these bytes.
    pub payload: String,
    /// The signing key's id ([`key_id`]).
    pub key_id: String,
    /// Hex ed25519 signature of `payload`.
    pub signature: String,
}

/// A document that can be signed.
pub trait Payload: Serialize + DeserializeOwned {
    /// Its `type` tag.
    const TYPE: &'static str;
}

#[derive(Serialize, Deserialize)]
struct Tagged<T> {
    #[serde(rename = "type")]
    kind: String,
    #[serde(flatten)]
    body: T,
}

impl SignedDoc {
    /// Signs `doc` with `key`.
    pub fn sign<T: Payload>(doc: &T, key: &SigningKey) -> Self {
        let payload = serde_json::to_string(&Tagged {
            kind: T::TYPE.to_string(),
            body: doc,
        })
        .expect("a document serialises");
        SignedDoc {
            signature: hex::encode(key.sign(payload.as_bytes()).to_bytes()),
            key_id: key_id(&key.verifying_key()),
            payload,
        }
    }

    /// Parses a document file's bytes (bounded).
    pub fn parse(bytes: &[u8]) -> Result<Self, BundleError> {
        if bytes.len() > MAX_DOCUMENT_BYTES {
            return Err(BundleError::TooLarge(format!(
                "a signed document of {} bytes (limit {MAX_DOCUMENT_BYTES})",
                bytes.len()
            )));
        }
        serde_json::from_slice(bytes).map_err(|e| BundleError::Corrupt(format!("signed document: {e}")))
    }

    /// Checks the signature against `trusted` and returns the document, which must be a `T`.
    pub fn verify<T: Payload>(&self, trusted: &[VerifyingKey]) -> Result<T, BundleError> {
        check_signature(trusted, &self.key_id, &self.signature, self.payload.as_bytes())?;
        let tagged: Tagged<T> = serde_json::from_str(&self.payload)
            .map_err(|e| BundleError::BadManifest(format!("signed {} document: {e}", T::TYPE)))?;
        if tagged.kind != T::TYPE {
            return Err(BundleError::BadManifest(format!(
                "a signed {:?} document where a {:?} was expected",
                tagged.kind,
                T::TYPE
            )));
        }
        Ok(tagged.body)
    }
}

/// A new set of trusted update keys. It replaces the device's set when it is signed by a key of
/// the current set and its `sequence` is higher than the current list's: this is how keys are
/// rotated (add the new key, later drop the old one) and how a lost key is revoked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyList {
    /// Increases with every list the lab issues.
    pub sequence: u64,
    /// Public keys, SPKI PEM.
    pub keys: Vec<String>,
    /// Creation time, RFC 3339 UTC.
    pub created_at: String,
}

impl Payload for KeyList {
    const TYPE: &'static str = "key_list";
}

impl KeyList {
    /// The keys, parsed; an empty list or a key that does not parse is refused.
    pub fn public_keys(&self) -> Result<Vec<VerifyingKey>, BundleError> {
        if self.keys.is_empty() {
            return Err(BundleError::BadManifest("a key list with no keys".into()));
        }
        self.keys.iter().map(|k| keys::parse_public(k)).collect()
    }
}

/// Permission to move from one model version back to an older one. It applies only while
/// `from_version` is active (so replaying it later does nothing) and only to the bundle whose
/// file has `to_sha256`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollback {
    /// The version being left.
    pub from_version: u64,
    /// The version to return to.
    pub to_version: u64,
    /// Hex sha256 of the bundle file to return to.
    pub to_sha256: String,
    /// Clinic it is for; `None`: any.
    #[serde(default)]
    pub clinic: Option<String>,
    /// Device it is for; `None`: any device of the clinic.
    #[serde(default)]
    pub device: Option<String>,
    /// Why, in words (shown on the device and reported to central).
    pub reason: String,
    /// Creation time, RFC 3339 UTC.
    pub created_at: String,
}

impl Payload for Rollback {
    const TYPE: &'static str = "rollback";
}

impl Rollback {
    /// Whether the instruction is addressed to this device.
    pub fn addressed_to(&self, clinic: &str, device: &str) -> bool {
        self.clinic.as_deref().is_none_or(|c| c == clinic) && self.device.as_deref().is_none_or(|d| d == device)
    }
}

/// Announcement of a bundle to download, published (retained) by central on
/// [`announcement_topics`]. Not signed itself: the device downloads at most `size` bytes,
/// checks `sha256`, and then verifies the bundle's signature like any other.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Announcement {
    /// The bundle's model version.
    pub model_version: u64,
    /// The bundle file's size, bytes.
    pub size: u64,
    /// Hex sha256 of the bundle file.
    pub sha256: String,
    /// Where to download it: an `https://` URL.
    pub url: String,
    /// A new trusted key list to apply first, if the bundle is signed by a new key.
    #[serde(default)]
    pub keys: Option<SignedDoc>,
    /// A rollback instruction, when the bundle is older than the active model.
    #[serde(default)]
    pub rollback: Option<SignedDoc>,
}

/// Why an announcement was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnouncementError {
    /// Larger than [`MAX_DOCUMENT_BYTES`].
    #[error("announcement of {0} bytes is over the limit")]
    TooLarge(usize),
    /// Not JSON of the announcement's shape.
    #[error("announcement: {0}")]
    Malformed(String),
    /// The download address is not `https://`.
    #[error("announcement URL {0:?} is not https://")]
    NotHttps(String),
    /// The hash is not a SHA-256 in hex.
    #[error("announcement sha256 is not 64 hex digits")]
    BadSha256,
    /// The size is zero.
    #[error("announcement size is 0")]
    Empty,
}

impl Announcement {
    /// Parses and checks an announcement's payload.
    pub fn parse(bytes: &[u8]) -> Result<Self, AnnouncementError> {
        if bytes.len() > MAX_DOCUMENT_BYTES {
            return Err(AnnouncementError::TooLarge(bytes.len()));
        }
        let a: Announcement = serde_json::from_slice(bytes).map_err(|e| AnnouncementError::Malformed(e.to_string()))?;
        if !a.url.starts_with("https://") {
            return Err(AnnouncementError::NotHttps(a.url));
        }
        if a.sha256.len() != 64 || !a.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(AnnouncementError::BadSha256);
        }
        if a.size == 0 {
            return Err(AnnouncementError::Empty);
        }
        Ok(a)
    }
}

/// Topic root of update announcements.
pub const ANNOUNCE_ROOT: &str = "wbc-update";

/// Where a device hears of updates: the clinic-wide topic and its own.
pub fn announcement_topics(clinic: &str, device: &str) -> [String; 2] {
    [
        format!("{ANNOUNCE_ROOT}/{clinic}"),
        format!("{ANNOUNCE_ROOT}/{clinic}/{device}"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn rollback() -> Rollback {
        Rollback {
            from_version: 5,
            to_version: 4,
            to_sha256: "ab".repeat(32),
            clinic: Some("c1".into()),
            device: None,
            reason: "v5 miscounts eosinophils".into(),
            created_at: "2026-11-28T00:00:00Z".into(),
        }
    }

    #[test]
    fn a_signed_document_verifies_only_with_its_key_and_type() {
        let k = key(1);
        let doc = SignedDoc::sign(&rollback(), &k);
        let text = serde_json::to_vec(&doc).unwrap();
        let back = SignedDoc::parse(&text).unwrap();
        assert_eq!(back.verify::<Rollback>(&[k.verifying_key()]).unwrap(), rollback());
        assert!(matches!(
            back.verify::<Rollback>(&[key(2).verifying_key()]),
            Err(BundleError::UntrustedKey { .. })
        ));
        // A rollback is not a key list, even with a good signature.
        assert!(matches!(
            back.verify::<KeyList>(&[k.verifying_key()]),
            Err(BundleError::BadManifest(_))
        ));
        let mut tampered = back.clone();
        tampered.payload = tampered.payload.replace("\"to_version\":4", "\"to_version\":3");
        assert_ne!(tampered.payload, back.payload);
        assert!(matches!(
            tampered.verify::<Rollback>(&[k.verifying_key()]),
            Err(BundleError::BadSignature { .. })
        ));
        let mut garbled = back;
        garbled.signature = "zz".into();
        assert!(garbled.verify::<Rollback>(&[k.verifying_key()]).is_err());
        assert!(SignedDoc::parse(b"{not json").is_err());
        assert!(SignedDoc::parse(&vec![b' '; MAX_DOCUMENT_BYTES + 1]).is_err());
    }

    #[test]
    fn rollbacks_are_addressed() {
        let r = rollback();
        assert!(r.addressed_to("c1", "any"));
        assert!(!r.addressed_to("c2", "any"));
        let mut d = r;
        d.device = Some("scope-1".into());
        assert!(d.addressed_to("c1", "scope-1"));
        assert!(!d.addressed_to("c1", "scope-2"));
    }

    #[test]
    fn key_lists_parse_their_keys_and_refuse_empty_ones() {
        use ed25519_dalek::pkcs8::{EncodePublicKey, spki::der::pem::LineEnding};
        let pem = key(3).verifying_key().to_public_key_pem(LineEnding::LF).unwrap();
        let l = KeyList {
            sequence: 2,
            keys: vec![pem],
            created_at: "2026-11-28T00:00:00Z".into(),
        };
        assert_eq!(l.public_keys().unwrap(), vec![key(3).verifying_key()]);
        let empty = KeyList {
            keys: vec![],
            ..l.clone()
        };
        assert!(empty.public_keys().is_err());
        let junk = KeyList {
            keys: vec!["junk".into()],
            ..l
        };
        assert!(junk.public_keys().is_err());
    }

    #[test]
    fn announcements_must_name_an_https_url_a_hash_and_a_size() {
        let good = Announcement {
            model_version: 4,
            size: 10,
            sha256: "0f".repeat(32),
            url: "https://lab.example/m.bundle".into(),
            keys: None,
            rollback: None,
        };
        let bytes = serde_json::to_vec(&good).unwrap();
        assert_eq!(Announcement::parse(&bytes).unwrap(), good);
        for bad in [
            Announcement {
                url: "http://lab.example/m".into(),
                ..good.clone()
            },
            Announcement {
                sha256: "xyz".into(),
                ..good.clone()
            },
            Announcement {
                size: 0,
                ..good.clone()
            },
        ] {
            assert!(Announcement::parse(&serde_json::to_vec(&bad).unwrap()).is_err());
        }
        assert!(Announcement::parse(b"[]").is_err());
        assert_eq!(
            announcement_topics("c1", "d1"),
            ["wbc-update/c1".to_string(), "wbc-update/c1/d1".to_string()]
        );
    }
}
