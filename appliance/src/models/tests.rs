//! Tests of the model store: installing, refusing, probation, rollback (on failures, crashes,
//! damage or the lab's signed instruction), key rotation and the process lock, each on the
//! embedded default bundle signed again with test keys.

use super::*;
use ed25519_dalek::SigningKey;
use wbc_models::classify::{Classifier, SELFTEST_PART, SelfTest};
use wbc_protocol::bundle::{BundleBuilder, sha256_hex};
use wbc_protocol::signed::{KeyList, Rollback, SignedDoc};

type Events = Arc<Mutex<Vec<ModelMessage>>>;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn default_bundle() -> Bundle {
    Bundle::from_bytes(crate::DEFAULT_BUNDLE, &crate::trusted_keys(&[]).unwrap()).unwrap()
}

/// The default bundle signed again by `k` as `version`, after `tweak`.
fn bundle(version: u64, k: &SigningKey, tweak: impl FnOnce(BundleBuilder) -> BundleBuilder) -> Vec<u8> {
    let b = Bundle::from_bytes(&crate::default_bundle_as(version, k), &[k.verifying_key()]).unwrap();
    tweak(BundleBuilder::from_bundle(&b)).finish(k).unwrap()
}

fn factory_version() -> u64 {
    default_bundle().manifest.model_version
}

struct Fixture {
    dir: tempfile::TempDir,
    events: Events,
    /// How each bundle the loader was given held its weights (`Debug` of the part: held bytes,
    /// or mapped from a file).
    loaded: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Fixture {
    fn new() -> Self {
        Fixture {
            dir: tempfile::tempdir().unwrap(),
            events: Arc::default(),
            loaded: Arc::default(),
        }
    }

    fn open_with(
        &self,
        trusted: Vec<VerifyingKey>,
        policy: ModelPolicy,
    ) -> Result<(Models<Arc<Classifier>>, Arc<Classifier>)> {
        let device = crate::backend::select(crate::backend::BackendChoice::Cpu)
            .unwrap()
            .device;
        let loaded = self.loaded.clone();
        let loader: Loader<Arc<Classifier>> = Box::new(move |b| {
            loaded.lock().unwrap().push(format!("{b:?}"));
            let c = Classifier::from_bundle(b, &device)?;
            c.self_test(b)?;
            Ok(Arc::new(c))
        });
        let events = self.events.clone();
        let mut trusted_all = crate::trusted_keys(&[]).unwrap();
        trusted_all.extend(trusted);
        Models::open(
            &self.dir.path().join("models"),
            Factory {
                source: crate::models::FactorySource::Embedded(crate::DEFAULT_BUNDLE.into()),
                name: "embedded".into(),
                trusted: trusted_all.clone(),
                update_keys: trusted_all,
            },
            policy,
            ("clinic-1", "scope-1"),
            loader,
            Box::new(move |m| events.lock().unwrap().push(m.clone())),
        )
    }

    /// Trusts the factory key and key(1).
    fn open(&self) -> (Models<Arc<Classifier>>, Arc<Classifier>) {
        self.open_with(vec![key(1).verifying_key()], ModelPolicy::default())
            .unwrap()
    }

    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn last_event(&self) -> ModelMessage {
        self.events.lock().unwrap().last().cloned().expect("an event")
    }

    fn slots(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.dir.path().join("models"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("slot-") || n.ends_with(".tmp"))
            .collect();
        v.sort();
        v
    }
}

fn active<T>(o: Outcome<T>) -> T {
    match o {
        Outcome::Active(t) => t,
        Outcome::Skipped(s) => panic!("skipped: {s}"),
        Outcome::Rejected(r) => panic!("rejected: {r}"),
    }
}

fn rejected<T>(o: Outcome<T>) -> String {
    match o {
        Outcome::Rejected(r) => r,
        Outcome::Active(_) => panic!("became active"),
        Outcome::Skipped(s) => panic!("skipped: {s}"),
    }
}

#[test]
fn a_bundle_the_appliance_stopped_on_twice_while_checking_is_refused_not_tried_a_third_time() {
    let v0 = factory_version();
    let bytes = bundle(v0 + 1, &key(1), |b| b);
    let sha = sha256_hex(&bytes);
    // As a crash leaves it: the file noted as being checked, no verdict after.
    for (attempts, installs) in [(1, true), (2, false)] {
        let f = Fixture::new();
        let dir = f.dir.path().join("models");
        std::fs::create_dir_all(&dir).unwrap();
        let seen = BTreeMap::from([(sha.clone(), format!("{} {attempts}", super::install::CHECKING))]);
        std::fs::write(dir.join("seen.json"), serde_json::to_vec(&seen).unwrap()).unwrap();
        let (m, _) = f.open();
        let p = f.file("new.bundle", &bytes);
        if installs {
            assert_eq!(
                active(m.install(&p, "USB", &[])).model_version,
                v0 + 1,
                "one crash: tried again"
            );
        } else {
            let why = rejected(m.install(&p, "USB", &[]));
            assert!(why.contains("stopped 2 times while checking"), "{why}");
            assert!(m.settled(&sha, false).unwrap().starts_with("rejected"));
        }
    }
}

#[test]
fn a_fallback_while_an_update_is_being_written_leaves_that_slot_alone() {
    let f = Fixture::new();
    let v0 = factory_version();
    let (m, _) = f.open();
    active(m.install(&f.file("v1.bundle", &bundle(v0 + 1, &key(1), |b| b)), "t", &[]));
    // Another update is being written into its slot when the new model fails its probation.
    let slot = format!("slot-v{}-0123456789ab.bundle", v0 + 2);
    let dir = f.dir.path().join("models");
    std::fs::write(dir.join(&slot), b"half written").unwrap();
    std::fs::write(dir.join(&slot).with_extension("tmp"), b"being written").unwrap();
    let staging = Staging::new(&m, &slot);
    let mut back = None;
    for _ in 0..ModelPolicy::default().max_failures {
        back = back.or(m.field_done(v0 + 1, false, "a model panic"));
    }
    assert_eq!(back.expect("back on the fallback").model_version, v0);
    assert!(dir.join(&slot).exists() && dir.join(&slot).with_extension("tmp").exists());
    drop(staging);
    // Once the install is over (here: given up), the next clean-up removes what no model needs.
    m.remove_unreferenced(&m.state.lock().unwrap());
    assert!(!dir.join(&slot).exists());
}

#[test]
fn a_newer_signed_bundle_becomes_active_with_the_old_one_as_fallback() {
    let f = Fixture::new();
    let v0 = factory_version();
    let (m, c) = f.open();
    assert_eq!(c.model_version, v0);
    assert_eq!(m.status().active.file, None);
    let p = f.file("new.bundle", &bundle(v0 + 1, &key(1), |b| b));
    let c = active(m.install(&p, "test", &[]));
    assert_eq!(c.model_version, v0 + 1);
    let s = m.status();
    assert_eq!(s.active.model_version, v0 + 1);
    assert_eq!(s.previous.as_ref().unwrap().model_version, v0);
    assert_eq!(s.probation, Some(Probation::default()));
    let events: Vec<String> = f.events.lock().unwrap().iter().map(|e| e.event.to_string()).collect();
    assert_eq!(events, ["verified", "active"]);
    assert_eq!(f.slots().len(), 1);
    // The factory model is built from the bytes embedded in the program; the new one from its
    // installed copy, mapped rather than read onto the heap.
    {
        let loaded = f.loaded.lock().unwrap();
        assert!(!loaded[0].contains("mapped"), "{}", loaded[0]);
        assert!(loaded[1].contains("bytes mapped"), "{}", loaded[1]);
    }
    // The same file again: nothing to do.
    assert!(matches!(m.install(&p, "test", &[]), Outcome::Skipped(_)));
    m.close().unwrap();
    drop(m);
    // A clean restart keeps it (verified and self-tested again, from the mapped copy), not
    // counted as a crash.
    let (m, c) = f.open();
    assert_eq!(c.model_version, v0 + 1);
    assert!(f.loaded.lock().unwrap().last().unwrap().contains("bytes mapped"));
    assert_eq!(m.status().probation.unwrap().crashed_starts, 0);
}

#[test]
fn wrong_damaged_old_or_failing_bundles_are_refused_and_change_nothing() {
    let f = Fixture::new();
    let v0 = factory_version();
    let (m, _) = f.open();
    let good = bundle(v0 + 1, &key(1), |b| b);
    let flip = |needle: &[u8], at: usize| {
        let mut b = good.clone();
        let pos = b.windows(needle.len()).position(|w| w == needle).unwrap();
        b[pos + at] ^= 1;
        b
    };
    let weights_at = good.len() / 2;
    let mut tampered_weights = good.clone();
    tampered_weights[weights_at] ^= 0x40;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "tampered-manifest",
            flip(b"\"model_version\"", 3),
            "signature does not verify",
        ),
        ("tampered-weights", tampered_weights, "does not match its sha256"),
        ("wrong-key", bundle(v0 + 1, &key(9), |b| b), "does not trust"),
        ("truncated", good[..good.len() / 3].to_vec(), "corrupt or truncated"),
        ("empty", Vec::new(), ""),
        ("older", bundle(v0, &key(1), |b| b), "not newer than the active version"),
        (
            "needs-newer-appliance",
            bundle(v0 + 1, &key(1), |mut b| {
                b.manifest_mut().min_appliance_version = "99.0.0".into();
                b
            }),
            "needs appliance 99.0.0",
        ),
        (
            "another-clinics",
            bundle(v0 + 1, &key(1), |mut b| {
                b.manifest_mut().clinic = Some("clinic-2".into());
                b
            }),
            "made for clinic \"clinic-2\"",
        ),
        (
            "fails-self-test",
            bundle(v0 + 2, &key(1), |b| {
                let spec: SelfTest = serde_json::from_slice(default_bundle().part(SELFTEST_PART).unwrap()).unwrap();
                let wrong = SelfTest {
                    tolerance: spec.tolerance,
                    cases: spec
                        .cases
                        .into_iter()
                        .map(|mut c| {
                            c.probabilities.reverse();
                            c
                        })
                        .collect(),
                };
                b.replace_part(SELFTEST_PART, serde_json::to_vec(&wrong).unwrap())
                    .unwrap()
            }),
            "fails its self-test",
        ),
    ];
    for (name, bytes, why) in cases {
        let p = f.file(&format!("{name}.bundle"), &bytes);
        let r = rejected(m.install(&p, name, &[]));
        assert!(r.contains(why), "{name}: {r}");
        assert_eq!(f.last_event().event, ModelEvent::Rejected, "{name}");
        assert!(f.last_event().detail.contains(why), "{name}");
        let s = m.status();
        assert_eq!(s.active.model_version, v0, "{name}: the factory model stays");
        assert_eq!(s.active.file, None, "{name}");
        assert!(f.slots().is_empty(), "{name}: nothing staged is left: {:?}", f.slots());
        // Offered again, it is not looked at again.
        assert!(
            matches!(m.install(&p, name, &[]), Outcome::Skipped(_) | Outcome::Rejected(_)),
            "{name}"
        );
    }
    // The good one still goes in after all that.
    let p = f.file("good.bundle", &good);
    assert_eq!(active(m.install(&p, "good", &[])).model_version, v0 + 1);
}

#[test]
fn a_bundle_made_for_this_clinic_installs() {
    let f = Fixture::new();
    let v0 = factory_version();
    let (m, _) = f.open();
    let ours = bundle(v0 + 1, &key(1), |mut b| {
        b.manifest_mut().clinic = Some("clinic-1".into());
        b
    });
    let c = active(m.install(&f.file("ours.bundle", &ours), "usb", &[]));
    assert_eq!(c.model_version, v0 + 1);
    assert_eq!(m.status().active.model_version, v0 + 1);
}

#[test]
fn probation_confirms_a_good_model_and_restores_the_fallback_after_failures() {
    let f = Fixture::new();
    let v0 = factory_version();
    let policy = ModelPolicy {
        probation_fields: 3,
        max_failures: 2,
        ..Default::default()
    };
    let (m, _) = f.open_with(vec![key(1).verifying_key()], policy.clone()).unwrap();
    active(m.install(&f.file("a.bundle", &bundle(v0 + 1, &key(1), |b| b)), "t", &[]));
    for _ in 0..3 {
        assert!(m.field_done(v0 + 1, true, "").is_none());
    }
    assert_eq!(m.status().probation, None);
    assert_eq!(f.last_event().event, ModelEvent::Confirmed);
    // Outside probation, failures change nothing.
    assert!(m.field_done(v0 + 1, false, "x").is_none());
    active(m.install(&f.file("b.bundle", &bundle(v0 + 2, &key(1), |b| b)), "t", &[]));
    // A field that began on the version left behind says nothing about the new one.
    assert!(m.field_done(v0 + 1, false, "late").is_none());
    assert_eq!(m.status().probation.map(|p| p.failures), Some(0));
    assert!(m.field_done(v0 + 2, false, "boom").is_none());
    let back = m
        .field_done(v0 + 2, false, "boom")
        .expect("the fallback after two failures");
    assert_eq!(back.model_version, v0 + 1);
    let e = f.last_event();
    assert_eq!((e.event, e.model_version), (ModelEvent::RolledBack, v0 + 1));
    assert!(e.detail.contains("failed the pipeline 2 times"), "{}", e.detail);
    let s = m.status();
    assert_eq!((s.active.model_version, s.previous.clone()), (v0 + 1, None));
    assert_eq!(f.slots().len(), 1, "the failed model's slot is removed");
    // The failed bundle is not taken again.
    assert!(matches!(
        m.install(&f.file("b.bundle", &bundle(v0 + 2, &key(1), |b| b)), "t", &[]),
        Outcome::Skipped(s) if s.starts_with("rolled back")
    ));
}

#[test]
fn repeated_crashes_on_a_new_model_return_to_the_fallback() {
    let f = Fixture::new();
    let v0 = factory_version();
    let policy = ModelPolicy {
        max_failures: 2,
        ..Default::default()
    };
    let open = || f.open_with(vec![key(1).verifying_key()], policy.clone()).unwrap();
    let (m, _) = open();
    active(m.install(&f.file("a.bundle", &bundle(v0 + 1, &key(1), |b| b)), "t", &[]));
    drop(m); // no clean stop: a crash
    let (m, c) = open();
    assert_eq!(c.model_version, v0 + 1, "one crash is tolerated");
    drop(m);
    let (m, c) = open();
    assert_eq!(c.model_version, v0, "the second crash restores the factory model");
    assert_eq!(f.last_event().event, ModelEvent::RolledBack);
    assert!(f.last_event().detail.contains("without a clean shutdown 2 times"));
    m.close().unwrap();
}

#[test]
fn a_damaged_pointer_or_slot_falls_back_to_a_verified_model() {
    let f = Fixture::new();
    let v0 = factory_version();
    let (m, _) = f.open();
    active(m.install(&f.file("a.bundle", &bundle(v0 + 1, &key(1), |b| b)), "t", &[]));
    for _ in 0..20 {
        m.field_done(v0 + 1, true, "");
    }
    active(m.install(&f.file("b.bundle", &bundle(v0 + 2, &key(1), |b| b)), "t", &[]));
    m.close().unwrap();
    let slot = m.status().active.file.unwrap();
    drop(m);
    // Bit rot in the active slot: the fallback (v0 + 1) is used, and said so.
    let p = f.dir.path().join("models").join(&slot);
    let mut b = std::fs::read(&p).unwrap();
    let n = b.len() / 2;
    b[n] ^= 1;
    std::fs::write(&p, b).unwrap();
    let (m, c) = f.open();
    assert_eq!(c.model_version, v0 + 1);
    assert!(f.last_event().detail.contains("damaged"), "{}", f.last_event().detail);
    m.close().unwrap();
    drop(m);
    // A damaged pointer: the factory model.
    std::fs::write(f.dir.path().join("models/current.json"), b"{garbage").unwrap();
    let (_m, c) = f.open();
    assert_eq!(c.model_version, v0);
    assert!(
        f.events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.detail.contains("current.json is damaged"))
    );
}

#[test]
fn an_older_version_needs_a_signed_rollback_instruction_for_the_active_one() {
    let f = Fixture::new();
    let v0 = factory_version();
    let (m, _) = f.open();
    let older = bundle(v0 + 1, &key(1), |b| b);
    active(m.install(&f.file("new.bundle", &bundle(v0 + 2, &key(1), |b| b)), "t", &[]));
    let older_path = f.file("older.bundle", &older);
    let r = |from: u64, sha: &str, device: Option<&str>| Rollback {
        from_version: from,
        to_version: v0 + 1,
        to_sha256: sha.to_string(),
        clinic: Some("clinic-1".into()),
        device: device.map(str::to_string),
        reason: "v2 miscounts".into(),
        created_at: "2026-11-28T00:00:00Z".into(),
    };
    let sha = sha256_hex(&older);
    for (doc, why) in [
        (SignedDoc::sign(&r(v0 + 2, &sha, None), &key(9)), "does not trust"),
        (SignedDoc::sign(&r(v0 + 3, &sha, None), &key(1)), "another version"),
        (
            SignedDoc::sign(&r(v0 + 2, &"0".repeat(64), None), &key(1)),
            "another bundle",
        ),
        (
            SignedDoc::sign(&r(v0 + 2, &sha, Some("scope-2")), &key(1)),
            "another device",
        ),
    ] {
        let e = rejected(m.install(&older_path, "t", &[doc]));
        assert!(e.contains(why), "{e}");
        assert_eq!(m.status().active.model_version, v0 + 2);
    }
    let c = active(m.install(
        &older_path,
        "t",
        &[SignedDoc::sign(&r(v0 + 2, &sha, Some("scope-1")), &key(1))],
    ));
    assert_eq!(c.model_version, v0 + 1);
    assert_eq!(f.last_event().event, ModelEvent::RolledBack);
    let s = m.status();
    assert_eq!((s.active.model_version, s.previous, s.probation), (v0 + 1, None, None));
}

#[test]
fn a_rollback_instruction_can_return_to_the_model_kept_on_the_device() {
    let f = Fixture::new();
    let v0 = factory_version();
    let (m, _) = f.open();
    active(m.install(&f.file("new.bundle", &bundle(v0 + 1, &key(1), |b| b)), "t", &[]));
    let factory_sha = sha256_hex(crate::DEFAULT_BUNDLE);
    let doc = SignedDoc::sign(
        &Rollback {
            from_version: v0 + 1,
            to_version: v0,
            to_sha256: factory_sha,
            clinic: None,
            device: None,
            reason: "recall".into(),
            created_at: String::new(),
        },
        &key(1),
    );
    let c = active(m.rollback_installed(&doc, "t"));
    assert_eq!(c.model_version, v0);
    assert_eq!(m.status().active.file, None);
    // Replayed later, it no longer applies.
    assert!(matches!(m.rollback_installed(&doc, "t"), Outcome::Skipped(_)));
}

#[test]
fn a_withdrawn_model_stays_out_after_many_other_offers_a_restart_and_a_damaged_seen_list() {
    let f = Fixture::new();
    let v0 = factory_version();
    let (m, _) = f.open();
    let v1 = bundle(v0 + 1, &key(1), |b| b);
    let v1_path = f.file("v1.bundle", &v1);
    active(m.install(&v1_path, "t", &[]));
    let doc = SignedDoc::sign(
        &Rollback {
            from_version: v0 + 1,
            to_version: v0,
            to_sha256: sha256_hex(crate::DEFAULT_BUNDLE),
            clinic: None,
            device: None,
            reason: "recall: eosinophils called neutrophils".into(),
            created_at: String::new(),
        },
        &key(1),
    );
    active(m.rollback_installed(&doc, "t"));
    // 201 other files fill the bounded memory of offers.
    for i in 0..201u32 {
        rejected(m.install(&f.file("junk.bundle", &i.to_le_bytes()), "USB", &[]));
    }
    let skipped = |m: &Models<Arc<Classifier>>| match m.install(&v1_path, "USB", &[]) {
        Outcome::Skipped(why) => why,
        Outcome::Active(_) => panic!("the withdrawn model came back"),
        Outcome::Rejected(why) => panic!("refused instead of skipped: {why}"),
    };
    assert!(skipped(&m).contains("withdrawn by the lab"), "{}", skipped(&m));
    m.close().unwrap();
    drop(m);
    // A restart with seen.json damaged: still out.
    std::fs::write(f.dir.path().join("models/seen.json"), b"{broken").unwrap();
    let (m, c) = f.open();
    assert_eq!(c.model_version, v0);
    assert!(skipped(&m).contains("recall"));
    assert_eq!(m.withdrawn().len(), 1);
    m.close().unwrap();
    drop(m);
    // A damaged withdrawn list is not guessed at: updates wait until it is restored.
    std::fs::write(f.dir.path().join("models/withdrawn.json"), b"[").unwrap();
    let (m, _) = f.open();
    let newer = f.file("v2.bundle", &bundle(v0 + 2, &key(1), |b| b));
    assert!(rejected(m.install(&newer, "USB", &[])).contains("withdrawn.json is damaged"));
}

#[test]
fn a_signed_key_list_rotates_and_revokes_keys() {
    use ed25519_dalek::pkcs8::{EncodePublicKey, spki::der::pem::LineEnding};
    let f = Fixture::new();
    let v0 = factory_version();
    let (m, _) = f.open();
    let pem = |k: &SigningKey| k.verifying_key().to_public_key_pem(LineEnding::LF).unwrap();
    let list = |seq: u64, keys: Vec<String>| KeyList {
        sequence: seq,
        keys,
        created_at: String::new(),
    };
    // Signed by a key the device does not trust: refused.
    let forged = SignedDoc::sign(&list(1, vec![pem(&key(9))]), &key(9));
    assert!(matches!(m.apply_keys(&forged, "t"), Outcome::Rejected(_)));
    // key(1) hands over to key(2).
    let doc = SignedDoc::sign(&list(1, vec![pem(&key(2))]), &key(1));
    assert!(matches!(m.apply_keys(&doc, "t"), Outcome::Active(())));
    assert_eq!(f.last_event().event, ModelEvent::KeysUpdated);
    assert!(matches!(m.apply_keys(&doc, "t"), Outcome::Skipped(_)), "replay");
    let by_old = rejected(m.install(&f.file("old-key.bundle", &bundle(v0 + 1, &key(1), |b| b)), "t", &[]));
    assert!(by_old.contains("does not trust"), "{by_old}");
    assert_eq!(
        active(m.install(&f.file("new-key.bundle", &bundle(v0 + 1, &key(2), |b| b)), "t", &[])).model_version,
        v0 + 1
    );
    m.close().unwrap();
    drop(m);
    // The list survives a restart; an older list is not taken.
    let (m, _) = f.open();
    assert_eq!(m.status().key_sequence, 1);
    let stale = SignedDoc::sign(&list(1, vec![pem(&key(1))]), &key(2));
    assert!(matches!(m.apply_keys(&stale, "t"), Outcome::Skipped(_)));
    // A list that jumps far ahead (a leaked key making every later list look old): refused.
    let jump = SignedDoc::sign(&list(u64::MAX, vec![pem(&key(2))]), &key(2));
    assert!(rejected(m.apply_keys(&jump, "t")).contains("jumps"));
    assert_eq!(m.status().key_sequence, 1);
    m.close().unwrap();
    drop(m);

    // trust.json lost, damaged or put back from before the rotation: the list kept with the
    // pointer is used and written back; the revoked key(1) is never trusted again.
    let trust = f.dir.path().join("models/trust.json");
    let rotated = std::fs::read(&trust).unwrap();
    let before = br#"{"sequence":0,"keys":[]}"#;
    for (i, damage) in [None, Some(&b"{"[..]), Some(&before[..])].into_iter().enumerate() {
        match damage {
            None => std::fs::remove_file(&trust).unwrap(),
            Some(b) => std::fs::write(&trust, b).unwrap(),
        }
        let (m, c) = f.open();
        assert_eq!(c.model_version, v0 + 1, "the model signed by key(2) still starts");
        assert_eq!(std::fs::read(&trust).unwrap(), rotated, "written back");
        let old_key = bundle(v0 + 2 + i as u64, &key(1), |b| b);
        let by_old = rejected(m.install(&f.file("old-key.bundle", &old_key), "t", &[]));
        assert!(by_old.contains("does not trust"), "{by_old}");
        m.close().unwrap();
    }
    // Both copies gone (an older pointer without the keys): no trust decision until restored.
    let pointer_path = f.dir.path().join("models/current.json");
    let mut pointer: serde_json::Value = serde_json::from_slice(&std::fs::read(&pointer_path).unwrap()).unwrap();
    pointer.as_object_mut().unwrap().remove("keys");
    std::fs::write(&pointer_path, serde_json::to_vec(&pointer).unwrap()).unwrap();
    std::fs::remove_file(&trust).unwrap();
    let (m, _) = f.open();
    let why = rejected(m.install(&f.file("old-key.bundle", &bundle(v0 + 9, &key(1), |b| b)), "t", &[]));
    assert!(
        why.contains("trust.json is missing although key list 1 was applied"),
        "{why}"
    );
    let doc = SignedDoc::sign(&list(2, vec![pem(&key(1))]), &key(1));
    assert!(rejected(m.apply_keys(&doc, "t")).contains("no key list is accepted"));
}

#[test]
fn one_process_at_a_time() {
    let f = Fixture::new();
    let (_m, _) = f.open();
    let e = f.open_with(vec![], ModelPolicy::default()).err().unwrap();
    assert!(
        format!("{e:#}").contains("in use by another appliance process"),
        "{e:#}"
    );
}

#[test]
fn a_configured_factory_bundle_is_mapped_from_its_file_not_read() {
    let f = Fixture::new();
    let path = f.file("factory.bundle", crate::DEFAULT_BUNDLE);
    let open = |folder: &str| {
        let loaded = f.loaded.clone();
        let trusted = crate::trusted_keys(&[]).unwrap();
        Models::open(
            &f.dir.path().join(folder),
            Factory {
                source: FactorySource::File(path.clone()),
                name: path.display().to_string(),
                trusted: trusted.clone(),
                update_keys: trusted,
            },
            ModelPolicy::default(),
            ("clinic-1", "scope-1"),
            Box::new(move |b| {
                loaded.lock().unwrap().push(format!("{b:?}"));
                Ok(b.manifest.model_version)
            }),
            Box::new(|_| {}),
        )
    };
    let (m, version) = open("models").unwrap();
    assert_eq!(version, factory_version());
    assert_eq!(m.status().active.file, None);
    assert!(f.loaded.lock().unwrap()[0].contains("bytes mapped"));
    drop(m);
    // A configured file that is not a bundle: the appliance says which and does not start.
    std::fs::write(&path, b"not a bundle").unwrap();
    let e = open("models2").err().expect("refused");
    assert!(format!("{e:#}").contains("factory.bundle"), "{e:#}");
}
