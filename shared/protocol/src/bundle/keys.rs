//! Signing keys: generation and PEM files (PKCS#8 for private keys, SPKI for public keys).

use super::BundleError;
use ed25519_dalek::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, spki::der::pem::LineEnding,
};
use ed25519_dalek::{SigningKey, VerifyingKey};
use std::path::Path;

/// A new random signing key from the operating system's RNG.
pub fn generate() -> SigningKey {
    SigningKey::generate(&mut rand::rngs::OsRng)
}

/// Writes a private key as PKCS#8 PEM, readable by the owner only (0600 on Unix).
pub fn write_private(path: &Path, key: &SigningKey) -> Result<(), BundleError> {
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| BundleError::BadManifest(e.to_string()))?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    use std::io::Write;
    opts.open(path)?.write_all(pem.as_bytes())?;
    Ok(())
}

/// Writes a public key as SPKI PEM.
pub fn write_public(path: &Path, key: &VerifyingKey) -> Result<(), BundleError> {
    let pem = key
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| BundleError::BadManifest(e.to_string()))?;
    std::fs::write(path, pem)?;
    Ok(())
}

/// Reads a PKCS#8 PEM private key.
pub fn read_private(path: &Path) -> Result<SigningKey, BundleError> {
    let pem = std::fs::read_to_string(path)?;
    SigningKey::from_pkcs8_pem(&pem)
        .map_err(|e| BundleError::BadManifest(format!("{}: not an ed25519 private key: {e}", path.display())))
}

/// The keys in the given SPKI PEM files, or those of `default_pem` when no file is given.
/// Each file is a key ring (see [`parse_ring`]).
pub fn trusted(paths: &[std::path::PathBuf], default_pem: &str) -> Result<Vec<VerifyingKey>, BundleError> {
    if paths.is_empty() {
        return parse_ring(default_pem);
    }
    let mut all = Vec::new();
    for p in paths {
        let pem = std::fs::read_to_string(p)?;
        all.extend(parse_ring(&pem).map_err(|e| BundleError::BadManifest(format!("{}: {e}", p.display())))?);
    }
    Ok(all)
}

const BEGIN: &str = "-----BEGIN PUBLIC KEY-----";
const END: &str = "-----END PUBLIC KEY-----";

/// Parses a key ring: one or more SPKI PEM public keys one after the other, with any text
/// between them (comments such as "retired 2026-11: signed model versions 1-3"). A signing
/// key replaced by a new one stays in the ring so that bundles it signed still verify. An
/// empty ring, an unterminated block or a block that is not an ed25519 key is an error
/// naming the block.
pub fn parse_ring(pem: &str) -> Result<Vec<VerifyingKey>, BundleError> {
    let mut keys = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find(BEGIN) {
        let n = keys.len() + 1;
        let end = rest[start..]
            .find(END)
            .map(|e| start + e + END.len())
            .ok_or_else(|| BundleError::BadManifest(format!("public key {n} has no end line")))?;
        let key =
            parse_public(&rest[start..end]).map_err(|e| BundleError::BadManifest(format!("public key {n}: {e}")))?;
        keys.push(key);
        rest = &rest[end..];
    }
    if keys.is_empty() {
        return Err(BundleError::BadManifest(
            "no public key (expected a PEM block \"BEGIN PUBLIC KEY\")".into(),
        ));
    }
    Ok(keys)
}

/// Parses a SPKI PEM public key.
pub fn parse_public(pem: &str) -> Result<VerifyingKey, BundleError> {
    VerifyingKey::from_public_key_pem(pem)
        .map_err(|e| BundleError::BadManifest(format!("not an ed25519 public key: {e}")))
}
