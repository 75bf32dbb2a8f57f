//! A bundle file that lies about its size: refused without the memory it claims. Its own test
//! binary, so that a counting allocator sees every allocation of the path under test.

use appliance::models::{Factory, ModelPolicy, Models, Outcome};

mod counting;

/// A 1 KiB file: a tar header for `name` claiming 7 GiB, and 512 bytes.
fn liar(name: &str) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.set_path(name).unwrap();
    h.set_size(7 << 30);
    h.set_mode(0o644);
    h.set_cksum();
    let mut bytes = h.as_bytes().to_vec();
    bytes.extend(std::iter::repeat_n(b'{', 512));
    bytes
}

#[test]
fn a_1_kib_file_whose_header_claims_7_gib_is_refused_in_little_memory_and_not_tried_again() {
    let dir = tempfile::tempdir().unwrap();
    let trusted = appliance::trusted_keys(&[]).unwrap();
    let (models, ()) = Models::open(
        &dir.path().join("models"),
        Factory {
            source: appliance::models::FactorySource::Embedded(appliance::DEFAULT_BUNDLE.into()),
            name: "embedded".into(),
            trusted: trusted.clone(),
            update_keys: trusted,
        },
        // The default limit: a bundle of up to 8 GiB is allowed in.
        ModelPolicy::default(),
        ("clinic-1", "scope-1"),
        Box::new(|_| Ok(())),
        Box::new(|_| {}),
    )
    .unwrap();
    for name in ["manifest.json", "weights.safetensors"] {
        let file = dir.path().join(format!("{name}.bundle"));
        std::fs::write(&file, liar(name)).unwrap();
        let before = counting::reset();
        let outcome = models.install(&file, "USB", &[]);
        let peak = counting::peak_since(before);
        let Outcome::Rejected(why) = outcome else {
            panic!("{name}: {outcome:?}")
        };
        assert!(
            why.contains("more than the 1024-byte file holds") || why.contains("manifest"),
            "{name}: {why}"
        );
        assert!(peak < 100 << 20, "{name}: {peak} bytes held at the peak");
        match models.install(&file, "USB", &[]) {
            Outcome::Skipped(o) => assert!(o.starts_with("rejected"), "{o}"),
            other => panic!("{name}, offered again: {other:?}"),
        }
    }
}
