//! Tests of the bundle module.

use super::*;

fn manifest() -> Manifest {
    Manifest {
        format_version: 0,
        family: Family::Compact,
        model_config: serde_json::json!({"backbone": "test"}),
        classes: vec!["A".into(), "B".into()],
        preprocess: Preprocess::imagenet(224),
        model_version: 3,
        min_appliance_version: "0.1.0".into(),
        created_at: "2026-01-01T00:00:00Z".into(),
        training: serde_json::json!({}),
        metrics: serde_json::json!({"macro_f1": 0.5}),
        parts: BTreeMap::new(),
        clinic: None,
    }
}

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn build(k: &SigningKey) -> Vec<u8> {
    BundleBuilder::new(manifest())
        .part("weights.safetensors", vec![7; 1000])
        .unwrap()
        .part("selftest/cell.png", vec![1, 2, 3])
        .unwrap()
        .finish(k)
        .unwrap()
}

/// Verifies `bytes` in memory, streamed, and as a file mapped into memory: all three must
/// reach the same verdict, and the mapped bundle's parts must be the bytes read in memory.
fn verified(bytes: &[u8], trusted: &[VerifyingKey]) -> Result<Bundle, BundleError> {
    let streamed = verify_stream(bytes, trusted, &ReadLimits::default(), Some(bytes.len() as u64));
    let whole = Bundle::from_bytes(bytes, trusted);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file.bundle");
    std::fs::write(&file, bytes).unwrap();
    let mapped = Bundle::open_mapped(&file, trusted, &ReadLimits::default());
    match (&whole, &mapped) {
        (Ok(w), Ok(m)) => {
            assert_eq!((&w.manifest, &w.signed_by), (&m.manifest, &m.signed_by));
            assert_eq!(m.file_sha256(), Some(sha256_hex(bytes).as_str()));
            assert_eq!(w.file_sha256(), None);
            assert!(w.part_names().eq(m.part_names()));
            for name in w.part_names() {
                assert_eq!(w.part(name).unwrap(), m.part(name).unwrap(), "{name}");
            }
        }
        (Err(a), Err(b)) => assert_eq!(
            std::mem::discriminant(a),
            std::mem::discriminant(b),
            "in memory: {a}; mapped: {b}"
        ),
        _ => panic!(
            "in memory {:?}, mapped {:?}",
            whole.as_ref().err(),
            mapped.as_ref().err()
        ),
    }
    match (&whole, &streamed) {
        (Ok(b), Ok((m, by))) => assert_eq!((&b.manifest, &b.signed_by), (m, by)),
        (Err(a), Err(b)) => assert_eq!(
            std::mem::discriminant(a),
            std::mem::discriminant(b),
            "in memory: {a}; streamed: {b}"
        ),
        _ => panic!(
            "in memory {:?}, streamed {:?}",
            whole.as_ref().err(),
            streamed.as_ref().err()
        ),
    }
    whole
}

/// A tar header for `name` that claims `size` bytes, and `held` bytes after it.
fn claiming(name: &str, size: u64, held: usize) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.set_path(name).unwrap();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_cksum();
    let mut bytes = h.as_bytes().to_vec();
    bytes.extend(std::iter::repeat_n(b'{', held));
    bytes
}

#[test]
fn a_header_that_claims_gigabytes_is_refused_without_allocating_them() {
    // 1 KiB on disk, 7 GiB claimed: as the manifest, and as a part after the good signed
    // manifest.
    let dir = tempfile::tempdir().unwrap();
    let k = key(1);
    let signed: Vec<u8> = entries(&build(&k))[..2]
        .iter()
        .flat_map(|(h, d)| {
            let mut b = h.as_bytes().to_vec();
            b.extend_from_slice(d);
            b.resize(512 + d.len().div_ceil(512) * 512, 0);
            b
        })
        .collect();
    for (what, bytes) in [
        ("manifest", claiming("manifest.json", 7 << 30, 512)),
        (
            "part",
            [&signed[..], &claiming("weights.safetensors", 7 << 30, 0)].concat(),
        ),
    ] {
        let p = dir.path().join(format!("{what}.bundle"));
        std::fs::write(&p, &bytes).unwrap();
        let e = UnverifiedBundle::read_file(&p, &ReadLimits::default()).unwrap_err();
        assert!(matches!(e, BundleError::Corrupt(_)), "{what}: {e}");
        let e = UnverifiedBundle::verify_file(&p, &[k.verifying_key()], &ReadLimits::default()).unwrap_err();
        assert!(
            matches!(e, BundleError::Corrupt(_) | BundleError::MissingManifest),
            "{what}: {e}"
        );
        // A reader of unknown length: read as it comes, truncated.
        let e = UnverifiedBundle::read(&bytes[..], &ReadLimits::default()).unwrap_err();
        assert!(matches!(e, BundleError::Corrupt(_)), "{what}: {e}");
    }
}

/// A bundle's entries: header and data.
fn entries(bytes: &[u8]) -> Vec<(tar::Header, Vec<u8>)> {
    tar::Archive::new(bytes)
        .entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            (e.header().clone(), data)
        })
        .collect()
}

#[test]
fn streamed_verification_needs_the_signed_manifest_first() {
    let k = key(1);
    // The same entries with a part first.
    let mut out = tar::Builder::new(Vec::new());
    let mut entries = entries(&build(&k));
    entries.rotate_left(2);
    for (h, d) in &entries {
        out.append(h, &d[..]).unwrap();
    }
    let moved = out.into_inner().unwrap();
    assert!(
        Bundle::from_bytes(&moved, &[k.verifying_key()]).is_ok(),
        "in memory, order is free"
    );
    assert!(matches!(
        verify_stream(&moved[..], &[k.verifying_key()], &ReadLimits::default(), None),
        Err(BundleError::MissingManifest)
    ));
}

#[test]
fn round_trip_verifies_and_returns_parts() {
    let k = key(1);
    let b = verified(&build(&k), &[k.verifying_key()]).unwrap();
    assert_eq!(b.manifest.model_version, 3);
    assert_eq!(b.manifest.format_version, FORMAT_VERSION);
    assert_eq!(b.part("weights.safetensors").unwrap(), &[7; 1000][..]);
    assert_eq!(b.part_names().count(), 2);
    assert!(matches!(b.part("nope"), Err(BundleError::NoSuchPart(_))));
}

#[test]
fn a_verified_bundle_can_be_signed_again_with_another_key() {
    let (k1, k2) = (key(1), key(2));
    let b = verified(&build(&k1), &[k1.verifying_key()]).unwrap();
    let mut again = BundleBuilder::from_bundle(&b);
    again.manifest_mut().model_version = 4;
    let bytes = again.finish(&k2).unwrap();
    let b2 = verified(&bytes, &[k2.verifying_key()]).unwrap();
    assert_eq!(b2.manifest.model_version, 4);
    assert_eq!(
        b2.part("weights.safetensors").unwrap(),
        b.part("weights.safetensors").unwrap()
    );
    assert!(verified(&bytes, &[k1.verifying_key()]).is_err());
}

#[test]
fn wrong_key_is_untrusted() {
    let bytes = build(&key(1));
    assert!(matches!(
        verified(&bytes, &[key(2).verifying_key()]),
        Err(BundleError::UntrustedKey { .. })
    ));
}

#[test]
fn tampered_weights_fail_the_hash_check() {
    let k = key(1);
    let mut bytes = build(&k);
    // Flip a byte inside the weights payload (a run of 7s).
    let pos = bytes.windows(16).position(|w| w.iter().all(|&b| b == 7)).unwrap();
    bytes[pos + 5] = 8;
    let err = verified(&bytes, &[k.verifying_key()]).unwrap_err();
    assert!(
        matches!(err, BundleError::HashMismatch(ref p) if p == "weights.safetensors"),
        "{err}"
    );
}

#[test]
fn tampered_manifest_fails_the_signature() {
    let k = key(1);
    let mut bytes = build(&k);
    let needle = b"\"model_version\": 3";
    let pos = bytes.windows(needle.len()).position(|w| w == needle).unwrap();
    bytes[pos + needle.len() - 1] = b'9';
    // The tar header checksum does not cover data, so the archive still reads.
    let err = verified(&bytes, &[k.verifying_key()]).unwrap_err();
    assert!(matches!(err, BundleError::BadSignature { .. }), "{err}");
}

#[test]
fn truncated_bundle_is_corrupt_at_every_cut() {
    let k = key(1);
    let bytes = build(&k);
    for cut in [10, 511, 512, 1500, bytes.len() / 2, bytes.len() - 1100] {
        let err = verified(&bytes[..cut], &[k.verifying_key()]).unwrap_err();
        assert!(
            matches!(
                err,
                BundleError::Corrupt(_)
                    | BundleError::MissingManifest
                    | BundleError::Unsigned
                    | BundleError::MissingPart(_)
            ),
            "cut {cut}: {err}"
        );
    }
}

#[test]
fn unsigned_bundle_is_refused() {
    let m = serde_json::to_vec(&manifest()).unwrap();
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(m.len() as u64);
    h.set_cksum();
    tar.append_data(&mut h, "manifest.json", &m[..]).unwrap();
    let bytes = tar.into_inner().unwrap();
    assert!(matches!(
        verified(&bytes, &[key(1).verifying_key()]),
        Err(BundleError::Unsigned)
    ));
}

#[test]
fn hostile_entry_names_and_extra_parts_are_refused() {
    assert!(BundleBuilder::new(manifest()).part("../etc/passwd", vec![]).is_err());
    assert!(BundleBuilder::new(manifest()).part("/abs", vec![]).is_err());
    assert!(BundleBuilder::new(manifest()).part("manifest.json", vec![]).is_err());
    // Append an unlisted entry after signing.
    let k = key(1);
    let bytes = build(&k);
    let mut archive_entries = tar::Builder::new(Vec::new());
    for (h, data) in entries(&bytes) {
        archive_entries.append(&h, &data[..]).unwrap();
    }
    let mut h = tar::Header::new_gnu();
    h.set_size(3);
    h.set_cksum();
    archive_entries.append_data(&mut h, "extra.bin", &b"abc"[..]).unwrap();
    let bytes = archive_entries.into_inner().unwrap();
    assert!(matches!(
        verified(&bytes, &[k.verifying_key()]),
        Err(BundleError::UnlistedPart(_))
    ));
}

#[test]
fn over_limit_bundle_is_refused_before_reading_it_whole() {
    let k = key(1);
    let bytes = build(&k);
    let limits = ReadLimits {
        max_total: 100_000,
        max_entry: 500,
        max_entries: 10,
    };
    assert!(matches!(
        UnverifiedBundle::read(&bytes[..], &limits),
        Err(BundleError::TooLarge(_))
    ));
}

#[test]
fn keys_round_trip_through_pem_with_private_file_mode_0600() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys::generate();
    let p = dir.path().join("k.pem");
    keys::write_private(&p, &k).unwrap();
    assert_eq!(keys::read_private(&p).unwrap().to_bytes(), k.to_bytes());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
    }
    // Never overwrites an existing key.
    assert!(keys::write_private(&p, &k).is_err());
    let pubp = dir.path().join("k.pub");
    keys::write_public(&pubp, &k.verifying_key()).unwrap();
    let pk = keys::parse_public(&std::fs::read_to_string(&pubp).unwrap()).unwrap();
    assert_eq!(pk, k.verifying_key());
}

fn pem(k: &SigningKey) -> String {
    use ed25519_dalek::pkcs8::{EncodePublicKey, spki::der::pem::LineEnding};
    k.verifying_key().to_public_key_pem(LineEnding::LF).unwrap()
}

#[test]
fn a_key_ring_trusts_every_key_in_it_and_a_bundle_signed_by_a_retired_key_still_verifies() {
    let (new, retired) = (key(7), key(8));
    let ring = format!(
        "# current\n{}\n# retired: signed model versions 1-3\n{}",
        pem(&new),
        pem(&retired)
    );
    let trusted = keys::trusted(&[], &ring).unwrap();
    assert_eq!(trusted, vec![new.verifying_key(), retired.verifying_key()]);
    assert!(verified(&build(&retired), &trusted).is_ok());
    assert!(verified(&build(&new), &trusted).is_ok());
    assert!(matches!(
        verified(&build(&key(9)), &trusted),
        Err(BundleError::UntrustedKey { .. })
    ));
    // Files given instead of the default are rings too, and their keys add up.
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.pub"), dir.path().join("b.pub"));
    std::fs::write(&a, ring).unwrap();
    std::fs::write(&b, pem(&key(9))).unwrap();
    assert_eq!(keys::trusted(&[a, b], "").unwrap().len(), 3);
}

#[test]
fn a_broken_key_ring_is_refused_naming_the_block() {
    let good = pem(&key(7));
    let err = |ring: &str| keys::parse_ring(ring).unwrap_err().to_string();
    assert!(err("").contains("no public key"), "{}", err(""));
    assert!(err("just a comment\n").contains("no public key"));
    let truncated = format!("{good}{}", &good[..good.len() / 2]);
    assert!(
        err(&truncated).contains("public key 2 has no end line"),
        "{}",
        err(&truncated)
    );
    let corrupt = format!("{good}{}", good.replace("MCow", "MCox"));
    assert!(err(&corrupt).contains("public key 2:"), "{}", err(&corrupt));
}

#[test]
fn a_bundle_written_to_a_file_as_it_is_assembled_is_the_bundle_built_in_memory() {
    let k = key(9);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.bundle");
    let size = BundleBuilder::new(manifest())
        .part("weights.safetensors", vec![7; 1000])
        .unwrap()
        .part("selftest/cell.png", vec![1, 2, 3])
        .unwrap()
        .finish_to_file(&k, &path)
        .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len() as u64, size);
    assert!(bytes == build(&k), "the same bytes either way");
    let b = Bundle::open(&path, &[k.verifying_key()]).unwrap();
    assert_eq!(b.part("weights.safetensors").unwrap(), &[7; 1000][..]);
}

#[test]
fn a_mapped_bundle_serves_its_parts_from_the_file_and_can_be_signed_again() {
    let k = key(1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.bundle");
    std::fs::write(&path, build(&k)).unwrap();
    let limits = ReadLimits::default();
    let b = Bundle::open_mapped(&path, &[k.verifying_key()], &limits).unwrap();
    assert_eq!(b.part("weights.safetensors").unwrap(), &[7u8; 1000][..]);
    assert_eq!(b.part("selftest/cell.png").unwrap(), &[1u8, 2, 3][..]);
    assert!(format!("{b:?}").contains("1000 bytes mapped"), "{b:?}");
    // A clone shares the mapping; re-signing copies the parts out of it.
    let again = BundleBuilder::from_bundle(&b.clone()).finish(&key(2)).unwrap();
    drop(b);
    let v = verified(&again, &[key(2).verifying_key()]).unwrap();
    assert_eq!(v.part("weights.safetensors").unwrap(), &[7u8; 1000][..]);
    // An empty file, a missing one, a directory.
    std::fs::write(&path, b"").unwrap();
    let trusted = [k.verifying_key()];
    assert!(matches!(
        Bundle::open_mapped(&path, &trusted, &limits),
        Err(BundleError::MissingManifest)
    ));
    assert!(matches!(
        Bundle::open_mapped(&dir.path().join("none"), &trusted, &limits),
        Err(BundleError::Io(_))
    ));
    assert!(Bundle::open_mapped(dir.path(), &trusted, &limits).is_err());
}

#[test]
fn a_part_with_a_long_name_is_found_where_its_bytes_are_in_every_reading() {
    // Over tar's 100-byte name field: written with a GNU long-name entry before it, which
    // the mapped reading must step over to find the part's bytes.
    let name = format!("{}/weights.bin", "d".repeat(150));
    let k = key(1);
    let bytes = BundleBuilder::new(manifest())
        .part(&name, (0..5000u32).map(|i| (i % 251) as u8).collect())
        .unwrap()
        .part("selftest/cell.png", vec![1, 2, 3])
        .unwrap()
        .finish(&k)
        .unwrap();
    let b = verified(&bytes, &[k.verifying_key()]).unwrap();
    assert_eq!(b.part(&name).unwrap().len(), 5000);
    assert_eq!(b.part(&name).unwrap()[4999], (4999 % 251) as u8);
}

#[test]
fn the_claimed_manifest_of_a_file_is_read_from_its_first_entry_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.bundle");
    let bytes = build(&key(1));
    // Only the manifest entry is there: the parts are not needed (or read).
    let first = 512 + serde_json::to_vec_pretty(&manifest()).unwrap().len().div_ceil(512) * 512 + 1024;
    std::fs::write(&path, &bytes[..first.min(bytes.len())]).unwrap();
    assert_eq!(
        UnverifiedBundle::claimed_manifest_of_file(&path).unwrap().model_version,
        3
    );
    assert_eq!(UnverifiedBundle::claimed_version(&path), Some(3));
    std::fs::write(&path, b"garbage").unwrap();
    assert!(UnverifiedBundle::claimed_manifest_of_file(&path).is_err());
    assert_eq!(UnverifiedBundle::claimed_version(&path), None);
    std::fs::write(&path, claiming("weights.safetensors", 10, 10)).unwrap();
    assert!(matches!(
        UnverifiedBundle::claimed_manifest_of_file(&path),
        Err(BundleError::MissingManifest)
    ));
    std::fs::write(&path, claiming(MANIFEST, 1 << 40, 100)).unwrap();
    assert!(matches!(
        UnverifiedBundle::claimed_manifest_of_file(&path),
        Err(BundleError::TooLarge(_))
    ));
}
