//! The model bundle: one signed file that carries everything the appliance needs to run a model.
//!
//! Layout: an uncompressed tar archive whose entries are
//! - `manifest.json`: [`Manifest`], including the sha256 and size of every other part;
//! - `manifest.sig`: JSON `{ "key_id": .., "signature": hex }`, an ed25519 signature over the
//!   exact bytes of `manifest.json`;
//! - the parts listed in the manifest (weights, self-test images and expected outputs, ...).
//!
//! Reading is bounded (total size, entry count, entry size, simple entry names only) and
//! verification checks, in order: format version, signature by a trusted key, that the parts
//! present are exactly the parts listed, and the sha256 of every part. Nothing in a bundle is
//! used before [`UnverifiedBundle::verify`] has succeeded.

use crate::preprocess::Preprocess;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

/// Bundle format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
const MANIFEST: &str = "manifest.json";
const SIGNATURE: &str = "manifest.sig";

/// Model family inside a bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Small CNN with 4-bit frozen backbone, LoRA and class + attribute heads.
    Compact,
    /// Llama 3.2 Vision (mllama).
    Mllama,
}

/// One part listed in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartEntry {
    /// Hex sha256 of the part's bytes.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// The bundle's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Bundle format version ([`FORMAT_VERSION`]).
    pub format_version: u32,
    /// Model family.
    pub family: Family,
    /// Family-specific model configuration.
    pub model_config: serde_json::Value,
    /// Class names in output order.
    pub classes: Vec<String>,
    /// Input preprocessing.
    pub preprocess: Preprocess,
    /// Model version; updates only move to strictly newer versions.
    pub model_version: u64,
    /// Oldest appliance version (semver) that can run this bundle.
    pub min_appliance_version: String,
    /// Creation time, RFC 3339 UTC.
    pub created_at: String,
    /// Free-form summary of the training data and run.
    pub training: serde_json::Value,
    /// Measured metrics (val figures).
    pub metrics: serde_json::Value,
    /// Every other part of the bundle: name to hash and size.
    pub parts: BTreeMap<String, PartEntry>,
    /// The clinic a site bundle was made for (`trainer adapt`, from that clinic's reviewed
    /// cells): the appliances of every other clinic refuse it. `None` for a bundle any clinic
    /// may run. Older appliances refuse a manifest that names a clinic (they know no such
    /// field), which is the safe answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clinic: Option<String>,
}

/// Signature file contents.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SignatureFile {
    key_id: String,
    signature: String,
}

/// Limits on what a bundle reader accepts.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    /// Largest bundle file.
    pub max_total: u64,
    /// Largest single entry.
    pub max_entry: u64,
    /// Most entries.
    pub max_entries: usize,
}

impl Default for ReadLimits {
    fn default() -> Self {
        ReadLimits {
            max_total: 16 << 30,
            max_entry: 16 << 30,
            max_entries: 4096,
        }
    }
}

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// I/O error reading or writing the file.
    #[error("bundle I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The archive is damaged or cut short.
    #[error("bundle archive is corrupt or truncated: {0}")]
    Corrupt(String),
    /// Over a size or count limit.
    #[error("bundle exceeds a limit: {0}")]
    TooLarge(String),
    /// An entry name that is not a plain relative name.
    #[error("bundle entry has a disallowed name {0:?}")]
    BadEntryName(String),
    /// `manifest.json` missing.
    #[error("bundle has no manifest.json")]
    MissingManifest,
    /// `manifest.json` does not parse.
    #[error("bundle manifest is invalid: {0}")]
    BadManifest(String),
    /// `manifest.sig` missing.
    #[error("bundle is not signed (no manifest.sig)")]
    Unsigned,
    /// Signature does not verify.
    #[error("bundle signature does not verify (key {key_id})")]
    BadSignature {
        /// Key the bundle claims.
        key_id: String,
    },
    /// Signed by a key that is not trusted.
    #[error("bundle is signed by key {key_id}, which this device does not trust")]
    UntrustedKey {
        /// Key the bundle claims.
        key_id: String,
    },
    /// Format version not supported.
    #[error("bundle format version {found} is not supported (this build reads version {supported})")]
    UnsupportedFormat {
        /// Found version.
        found: u32,
        /// Supported version.
        supported: u32,
    },
    /// A part listed in the manifest is absent.
    #[error("bundle part {0:?} listed in the manifest is missing")]
    MissingPart(String),
    /// A part present in the archive is not listed.
    #[error("bundle contains {0:?}, which the manifest does not list")]
    UnlistedPart(String),
    /// A part's hash or size differs from the manifest.
    #[error("bundle part {0:?} does not match its sha256 in the manifest (tampered or damaged)")]
    HashMismatch(String),
    /// Asked for a part that does not exist.
    #[error("bundle has no part {0:?}")]
    NoSuchPart(String),
}

/// Hex sha256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Hex sha256 and size of a file, read in pieces (a bundle may be larger than memory allows).
pub fn file_sha256(path: &Path) -> std::io::Result<(String, u64)> {
    let mut h = Sha256::new();
    let size = std::io::copy(&mut std::fs::File::open(path)?, &mut h)?;
    Ok((hex::encode(h.finalize()), size))
}

/// Short identifier of a public key: the first 8 bytes of its sha256, hex.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// Checks a hex ed25519 `signature` of `message` by the key `key_id`, which must be one of
/// `trusted`.
pub(crate) fn check_signature(
    trusted: &[VerifyingKey],
    key_id_claimed: &str,
    signature: &str,
    message: &[u8],
) -> Result<(), BundleError> {
    let key = trusted
        .iter()
        .find(|k| key_id(k) == key_id_claimed)
        .ok_or_else(|| BundleError::UntrustedKey {
            key_id: key_id_claimed.to_string(),
        })?;
    let bad = || BundleError::BadSignature {
        key_id: key_id_claimed.to_string(),
    };
    let raw: [u8; 64] = hex::decode(signature)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(bad)?;
    key.verify(message, &Signature::from_bytes(&raw)).map_err(|_| bad())
}

/// Builds and signs a bundle.
pub struct BundleBuilder {
    manifest: Manifest,
    parts: BTreeMap<String, Vec<u8>>,
}

impl BundleBuilder {
    /// Starts from a manifest; its `parts` and `format_version` are filled in by [`Self::finish`].
    pub fn new(manifest: Manifest) -> Self {
        BundleBuilder {
            manifest,
            parts: BTreeMap::new(),
        }
    }

    /// Starts from a verified bundle's manifest and parts, to sign them again (with a new key
    /// when keys are rotated) after any change to the manifest ([`Self::manifest_mut`]).
    pub fn from_bundle(bundle: &Bundle) -> Self {
        BundleBuilder {
            manifest: bundle.manifest.clone(),
            parts: bundle
                .parts
                .iter()
                .map(|(n, b)| (n.clone(), b.as_slice().to_vec()))
                .collect(),
        }
    }

    /// The manifest to be signed.
    pub fn manifest_mut(&mut self) -> &mut Manifest {
        &mut self.manifest
    }

    /// Replaces a part's bytes, or adds it.
    pub fn replace_part(mut self, name: &str, bytes: Vec<u8>) -> Result<Self, BundleError> {
        self.parts.remove(name);
        self.part(name, bytes)
    }

    /// Adds a part under a plain name (`[A-Za-z0-9._-/]`, no `..`).
    pub fn part(mut self, name: &str, bytes: Vec<u8>) -> Result<Self, BundleError> {
        check_name(name)?;
        if name == MANIFEST || name == SIGNATURE {
            return Err(BundleError::BadEntryName(name.to_string()));
        }
        self.parts.insert(name.to_string(), bytes);
        Ok(self)
    }

    /// Hashes the parts, signs the manifest and returns the bundle file's bytes.
    pub fn finish(self, key: &SigningKey) -> Result<Vec<u8>, BundleError> {
        self.finish_into(key, Vec::new())
    }

    /// As [`Self::finish`], written to `path` as it is assembled (a multi-GB bundle is not
    /// copied into memory a second time); returns its size in bytes.
    pub fn finish_to_file(self, key: &SigningKey, path: &Path) -> Result<u64, BundleError> {
        let mut out = self.finish_into(key, std::io::BufWriter::new(std::fs::File::create(path)?))?;
        std::io::Write::flush(&mut out)?;
        Ok(out.get_ref().metadata()?.len())
    }

    /// Hashes the parts, signs the manifest and writes the bundle to `w`.
    pub fn finish_into<W: std::io::Write>(mut self, key: &SigningKey, w: W) -> Result<W, BundleError> {
        self.manifest.format_version = FORMAT_VERSION;
        self.manifest.parts = self
            .parts
            .iter()
            .map(|(n, b)| {
                (
                    n.clone(),
                    PartEntry {
                        sha256: sha256_hex(b),
                        size: b.len() as u64,
                    },
                )
            })
            .collect();
        let manifest_bytes =
            serde_json::to_vec_pretty(&self.manifest).map_err(|e| BundleError::BadManifest(e.to_string()))?;
        let sig = SignatureFile {
            key_id: key_id(&key.verifying_key()),
            signature: hex::encode(key.sign(&manifest_bytes).to_bytes()),
        };
        let sig_bytes = serde_json::to_vec(&sig).map_err(|e| BundleError::BadManifest(e.to_string()))?;
        let mut tar = tar::Builder::new(w);
        let mut add = |name: &str, bytes: &[u8]| -> std::io::Result<()> {
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_cksum();
            tar.append_data(&mut h, name, bytes)
        };
        add(MANIFEST, &manifest_bytes)?;
        add(SIGNATURE, &sig_bytes)?;
        for (n, b) in &self.parts {
            add(n, b)?;
        }
        Ok(tar.into_inner()?)
    }
}

/// Largest `manifest.json` or `manifest.sig` read.
const MAX_MANIFEST_BYTES: u64 = 16 << 20;

fn corrupt(e: std::io::Error) -> BundleError {
    BundleError::Corrupt(e.to_string())
}

/// A bundle file's length, within the limit.
fn file_len(path: &Path, limits: &ReadLimits) -> Result<u64, BundleError> {
    within_limits(std::fs::metadata(path)?.len(), limits)
}

fn within_limits(len: u64, limits: &ReadLimits) -> Result<u64, BundleError> {
    if len > limits.max_total {
        return Err(BundleError::TooLarge(format!(
            "file is {len} bytes, limit {}",
            limits.max_total
        )));
    }
    Ok(len)
}

/// Checks an entry's header against the limits, and the sizes claimed so far against the
/// file's length (when known): its name and claimed size.
fn checked_entry<R: Read>(
    entry: &tar::Entry<R>,
    count: usize,
    limits: &ReadLimits,
    total: &mut u64,
    file_len: Option<u64>,
) -> Result<(String, u64), BundleError> {
    if count >= limits.max_entries {
        return Err(BundleError::TooLarge(format!(
            "more than {} entries",
            limits.max_entries
        )));
    }
    if !entry.header().entry_type().is_file() {
        return Err(BundleError::Corrupt("entry is not a regular file".into()));
    }
    let name = entry.path().map_err(corrupt)?.to_string_lossy().into_owned();
    check_name(&name)?;
    let size = entry.header().size().map_err(corrupt)?;
    *total = total.saturating_add(size);
    if size > limits.max_entry || *total > limits.max_total {
        return Err(BundleError::TooLarge(format!("entry {name:?} is {size} bytes")));
    }
    if let Some(len) = file_len
        && *total > len
    {
        return Err(BundleError::Corrupt(format!(
            "entry {name:?} claims {size} bytes, more than the {len}-byte file holds"
        )));
    }
    Ok((name, size))
}

/// An entry's bytes: read as they come (never allocated from the size its header claims),
/// refused when there are fewer than claimed.
fn read_entry(entry: &mut impl Read, name: &str, size: u64) -> Result<Vec<u8>, BundleError> {
    let mut bytes = Vec::with_capacity(size.min(1 << 20) as usize);
    entry.take(size).read_to_end(&mut bytes).map_err(corrupt)?;
    if bytes.len() as u64 != size {
        return Err(BundleError::Corrupt(format!("entry {name:?} is truncated")));
    }
    Ok(bytes)
}

/// The manifest, once its signature by a trusted key and its format version have checked:
/// nothing in it is parsed as a manifest before.
fn signed_manifest(
    manifest_bytes: &[u8],
    sig_bytes: &[u8],
    trusted: &[VerifyingKey],
) -> Result<(Manifest, String), BundleError> {
    let sig: SignatureFile =
        serde_json::from_slice(sig_bytes).map_err(|e| BundleError::Corrupt(format!("manifest.sig: {e}")))?;
    check_signature(trusted, &sig.key_id, &sig.signature, manifest_bytes)?;
    let version: serde_json::Value =
        serde_json::from_slice(manifest_bytes).map_err(|e| BundleError::BadManifest(e.to_string()))?;
    let found = version.get("format_version").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
    if found != FORMAT_VERSION {
        return Err(BundleError::UnsupportedFormat {
            found,
            supported: FORMAT_VERSION,
        });
    }
    let manifest = serde_json::from_slice(manifest_bytes).map_err(|e| BundleError::BadManifest(e.to_string()))?;
    Ok((manifest, sig.key_id))
}

/// Writes nothing; hashes what it is given.
struct HashSink(Sha256, u64);

impl std::io::Write for HashSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.update(b);
        self.1 += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// [`UnverifiedBundle::verify_file`] on any reader (`file_len`: what it holds, when known).
pub fn verify_stream(
    reader: impl Read,
    trusted: &[VerifyingKey],
    limits: &ReadLimits,
    file_len: Option<u64>,
) -> Result<(Manifest, String), BundleError> {
    verify_entries(reader, trusted, limits, file_len).map(|(m, k, _)| (m, k))
}

/// Where each part's bytes lie in the bundle file.
type PartRanges = BTreeMap<String, std::ops::Range<u64>>;

/// [`verify_stream`], with where each verified part lies in what was read.
fn verify_entries(
    reader: impl Read,
    trusted: &[VerifyingKey],
    limits: &ReadLimits,
    file_len: Option<u64>,
) -> Result<(Manifest, String, PartRanges), BundleError> {
    let mut ranges = PartRanges::new();
    let mut archive = tar::Archive::new(reader.take(limits.max_total.saturating_add(1)));
    let mut manifest_bytes = None;
    let mut signed: Option<(Manifest, String)> = None;
    let mut seen = std::collections::BTreeSet::new();
    let mut total = 0u64;
    for (count, entry) in archive.entries().map_err(corrupt)?.enumerate() {
        let mut entry = entry.map_err(corrupt)?;
        let (name, size) = checked_entry(&entry, count, limits, &mut total, file_len)?;
        match (count, name.as_str()) {
            (0, MANIFEST) | (1, SIGNATURE) if size > MAX_MANIFEST_BYTES => {
                return Err(BundleError::TooLarge(format!("{name} is {size} bytes")));
            }
            (0, MANIFEST) => manifest_bytes = Some(read_entry(&mut entry, &name, size)?),
            (1, SIGNATURE) => {
                let sig = read_entry(&mut entry, &name, size)?;
                let m = manifest_bytes.as_deref().ok_or(BundleError::MissingManifest)?;
                signed = Some(signed_manifest(m, &sig, trusted)?);
            }
            (0, _) => return Err(BundleError::MissingManifest),
            (1, _) => return Err(BundleError::Unsigned),
            _ => {
                let (manifest, _) = signed.as_ref().expect("entries 0 and 1 were the signed manifest");
                let listed = manifest
                    .parts
                    .get(&name)
                    .ok_or_else(|| BundleError::UnlistedPart(name.clone()))?;
                if !seen.insert(name.clone()) {
                    return Err(BundleError::Corrupt(format!("entry {name:?} appears twice")));
                }
                if listed.size != size {
                    return Err(BundleError::HashMismatch(name));
                }
                let start = entry.raw_file_position();
                let mut sink = HashSink(Sha256::new(), 0);
                std::io::copy(&mut (&mut entry).take(size), &mut sink).map_err(corrupt)?;
                if sink.1 != size {
                    return Err(BundleError::Corrupt(format!("entry {name:?} is truncated")));
                }
                if hex::encode(sink.0.finalize()) != listed.sha256 {
                    return Err(BundleError::HashMismatch(name));
                }
                ranges.insert(name, start..start + size);
            }
        }
    }
    let (manifest, signed_by) = match (manifest_bytes, signed) {
        (None, _) => return Err(BundleError::MissingManifest),
        (Some(_), None) => return Err(BundleError::Unsigned),
        (Some(_), Some(s)) => s,
    };
    if let Some(name) = manifest.parts.keys().find(|n| !seen.contains(*n)) {
        return Err(BundleError::MissingPart(name.clone()));
    }
    Ok((manifest, signed_by, ranges))
}

fn check_name(name: &str) -> Result<(), BundleError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('/')
        && name.split('/').all(|seg| !seg.is_empty() && seg != "." && seg != "..")
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c));
    if ok {
        Ok(())
    } else {
        Err(BundleError::BadEntryName(name.to_string()))
    }
}

/// A bundle read from disk whose signature and hashes have not been checked yet.
#[derive(Debug)]
pub struct UnverifiedBundle {
    manifest_bytes: Vec<u8>,
    signature: Option<Vec<u8>>,
    parts: BTreeMap<String, Vec<u8>>,
}

/// A bundle whose signature, format and hashes verified.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The verified manifest.
    pub manifest: Manifest,
    /// Key that signed it.
    pub signed_by: String,
    parts: BTreeMap<String, PartBytes>,
    file_sha256: Option<String>,
}

/// Reads a byte slice, hashing what it hands out.
struct HashingReader<'a> {
    bytes: &'a [u8],
    pos: usize,
    hash: Sha256,
}

impl Read for HashingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let chunk = &self.bytes[self.pos..(self.pos + buf.len()).min(self.bytes.len())];
        buf[..chunk.len()].copy_from_slice(chunk);
        self.hash.update(chunk);
        self.pos += chunk.len();
        Ok(chunk.len())
    }
}

/// A verified part's bytes: held in memory, or a range of a bundle file mapped into memory
/// ([`Bundle::open_mapped`]), which the kernel pages in as they are read and may drop again.
#[derive(Clone)]
enum PartBytes {
    Held(Vec<u8>),
    Mapped(std::sync::Arc<memmap2::Mmap>, std::ops::Range<usize>),
}

impl PartBytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            PartBytes::Held(b) => b,
            PartBytes::Mapped(map, r) => &map[r.clone()],
        }
    }
}

impl std::fmt::Debug for PartBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PartBytes::Held(b) => write!(f, "{} bytes", b.len()),
            PartBytes::Mapped(_, r) => write!(f, "{} bytes mapped", r.len()),
        }
    }
}

impl UnverifiedBundle {
    /// Reads a bundle file within the given limits. An entry that claims more bytes than the
    /// file holds is refused before anything is read for it.
    pub fn read_file(path: &Path, limits: &ReadLimits) -> Result<Self, BundleError> {
        let len = file_len(path, limits)?;
        Self::read_bounded(std::fs::File::open(path)?, limits, Some(len))
    }

    /// Reads a bundle from any reader within the given limits. Memory grows with what the
    /// reader holds, never with what a header claims.
    pub fn read(reader: impl Read, limits: &ReadLimits) -> Result<Self, BundleError> {
        Self::read_bounded(reader, limits, None)
    }

    fn read_bounded(reader: impl Read, limits: &ReadLimits, file_len: Option<u64>) -> Result<Self, BundleError> {
        let mut archive = tar::Archive::new(reader.take(limits.max_total.saturating_add(1)));
        let mut manifest_bytes = None;
        let mut signature = None;
        let mut parts = BTreeMap::new();
        let mut total = 0u64;
        for (count, entry) in archive.entries().map_err(corrupt)?.enumerate() {
            let mut entry = entry.map_err(corrupt)?;
            let (name, size) = checked_entry(&entry, count, limits, &mut total, file_len)?;
            let bytes = read_entry(&mut entry, &name, size)?;
            let slot = match name.as_str() {
                MANIFEST => &mut manifest_bytes,
                SIGNATURE => &mut signature,
                _ => {
                    if parts.insert(name.clone(), bytes).is_some() {
                        return Err(BundleError::Corrupt(format!("entry {name:?} appears twice")));
                    }
                    continue;
                }
            };
            if slot.replace(bytes).is_some() {
                return Err(BundleError::Corrupt(format!("entry {name:?} appears twice")));
            }
        }
        let manifest_bytes = manifest_bytes.ok_or(BundleError::MissingManifest)?;
        Ok(UnverifiedBundle {
            manifest_bytes,
            signature,
            parts,
        })
    }

    /// Verifies a bundle file while reading it, in memory that does not grow with the bundle:
    /// the manifest and its signature (which come first) are checked before any part is read,
    /// then each part is hashed as it streams past and compared with the signed manifest. For
    /// a file from a USB stick or a download: nothing of it is held, or trusted, before its
    /// signature has verified. Returns the signed manifest and the key that signed it.
    pub fn verify_file(
        path: &Path,
        trusted: &[VerifyingKey],
        limits: &ReadLimits,
    ) -> Result<(Manifest, String), BundleError> {
        let len = file_len(path, limits)?;
        verify_stream(std::fs::File::open(path)?, trusted, limits, Some(len))
    }

    /// The model version a bundle file claims, unverified, read from its first entry alone
    /// (at most 16 MiB): for telling the lab which version a refused file said it was.
    pub fn claimed_version(path: &Path) -> Option<u64> {
        serde_json::from_slice::<serde_json::Value>(&Self::manifest_entry(path).ok()?)
            .ok()?
            .get("model_version")?
            .as_u64()
    }

    /// The manifest a bundle file claims, unverified, read from its first entry alone (at most
    /// 16 MiB; nothing else of the file is read).
    pub fn claimed_manifest_of_file(path: &Path) -> Result<Manifest, BundleError> {
        serde_json::from_slice(&Self::manifest_entry(path)?).map_err(|e| BundleError::BadManifest(e.to_string()))
    }

    fn manifest_entry(path: &Path) -> Result<Vec<u8>, BundleError> {
        let mut archive = tar::Archive::new(std::fs::File::open(path)?);
        let mut entry = archive
            .entries()
            .map_err(corrupt)?
            .next()
            .ok_or(BundleError::MissingManifest)?
            .map_err(corrupt)?;
        let size = entry.header().size().map_err(corrupt)?;
        if entry.path().map_err(corrupt)?.to_str() != Some(MANIFEST) {
            return Err(BundleError::MissingManifest);
        }
        if size > MAX_MANIFEST_BYTES {
            return Err(BundleError::TooLarge(format!("{MANIFEST} is {size} bytes")));
        }
        read_entry(&mut entry, MANIFEST, size)
    }

    /// Parses the manifest without trusting it (for showing what a refused bundle claimed).
    pub fn claimed_manifest(&self) -> Result<Manifest, BundleError> {
        serde_json::from_slice(&self.manifest_bytes).map_err(|e| BundleError::BadManifest(e.to_string()))
    }

    /// Verifies signature (by one of `trusted`), format version and every part's hash.
    pub fn verify(self, trusted: &[VerifyingKey]) -> Result<Bundle, BundleError> {
        let sig_bytes = self.signature.as_ref().ok_or(BundleError::Unsigned)?;
        let (manifest, signed_by) = signed_manifest(&self.manifest_bytes, sig_bytes, trusted)?;
        for name in manifest.parts.keys() {
            if !self.parts.contains_key(name) {
                return Err(BundleError::MissingPart(name.clone()));
            }
        }
        for (name, bytes) in &self.parts {
            let entry = manifest
                .parts
                .get(name)
                .ok_or_else(|| BundleError::UnlistedPart(name.clone()))?;
            if entry.size != bytes.len() as u64 || entry.sha256 != sha256_hex(bytes) {
                return Err(BundleError::HashMismatch(name.clone()));
            }
        }
        Ok(Bundle {
            manifest,
            signed_by,
            parts: self.parts.into_iter().map(|(n, b)| (n, PartBytes::Held(b))).collect(),
            file_sha256: None,
        })
    }
}

impl Bundle {
    /// Reads and verifies a bundle file in one step.
    pub fn open(path: &Path, trusted: &[VerifyingKey]) -> Result<Bundle, BundleError> {
        UnverifiedBundle::read_file(path, &ReadLimits::default())?.verify(trusted)
    }

    /// Verifies a bundle file and keeps it mapped into memory instead of reading it: its parts
    /// are slices of the mapping, paged in by the kernel as a model is built from them and
    /// dropped again under memory pressure, so a multi-GB bundle is never copied onto the heap.
    /// Verification streams through the mapping once (signature first, then every part's hash)
    /// and the parts are the very bytes it hashed.
    ///
    /// Only for files that nothing changes while the bundle is in use: the appliance maps its
    /// own installed copies and its configured factory bundle, and a file given on the command
    /// line. The bytes are verified once, as they are mapped; a process that could write the
    /// file could change them afterwards, and a file cut short (or on a medium pulled out)
    /// while mapped stops the process with a bus error at the next read of what it lost.
    /// Files offered from outside (USB, downloads) are verified as streams and copied first.
    pub fn open_mapped(path: &Path, trusted: &[VerifyingKey], limits: &ReadLimits) -> Result<Bundle, BundleError> {
        let file = std::fs::File::open(path)?;
        if within_limits(file.metadata()?.len(), limits)? == 0 {
            return Err(BundleError::MissingManifest);
        }
        // SAFETY: read-only, of a file that nothing changes while the bundle lives (the
        // contract above); its bytes are verified before any is used.
        let map = std::sync::Arc::new(unsafe { memmap2::Mmap::map(&file)? });
        let len = map.len() as u64;
        // The whole file's sha256 in the same pass: what the archive reader reads, then the rest.
        let mut reading = HashingReader {
            bytes: &map[..],
            pos: 0,
            hash: Sha256::new(),
        };
        let (manifest, signed_by, ranges) = verify_entries(&mut reading, trusted, limits, Some(len))?;
        let HashingReader { pos, mut hash, .. } = reading;
        hash.update(&map[pos..]);
        let file_sha256 = Some(hex::encode(hash.finalize()));
        let parts = ranges
            .into_iter()
            .map(|(name, r)| {
                let (start, end) = (usize::try_from(r.start), usize::try_from(r.end));
                let (Ok(start), Ok(end)) = (start, end) else {
                    return Err(BundleError::Corrupt(format!(
                        "entry {name:?} lies beyond what can be mapped"
                    )));
                };
                let r = start..end;
                if r.end > map.len() {
                    return Err(BundleError::Corrupt(format!("entry {name:?} lies beyond the file")));
                }
                Ok((name, PartBytes::Mapped(map.clone(), r)))
            })
            .collect::<Result<_, BundleError>>()?;
        Ok(Bundle {
            manifest,
            signed_by,
            parts,
            file_sha256,
        })
    }

    /// The sha256 (hex) of the whole file a mapped bundle was opened from ([`Self::open_mapped`]
    /// hashes it in the pass that verifies it); `None` for a bundle read from bytes.
    pub fn file_sha256(&self) -> Option<&str> {
        self.file_sha256.as_deref()
    }

    /// Reads and verifies bundle bytes in one step.
    pub fn from_bytes(bytes: &[u8], trusted: &[VerifyingKey]) -> Result<Bundle, BundleError> {
        UnverifiedBundle::read(bytes, &ReadLimits::default())?.verify(trusted)
    }

    /// A verified part's bytes.
    pub fn part(&self, name: &str) -> Result<&[u8], BundleError> {
        self.parts
            .get(name)
            .map(PartBytes::as_slice)
            .ok_or_else(|| BundleError::NoSuchPart(name.to_string()))
    }

    /// Names of all parts.
    pub fn part_names(&self) -> impl Iterator<Item = &str> {
        self.parts.keys().map(String::as_str)
    }
}

pub mod keys;

#[cfg(test)]
mod tests;
