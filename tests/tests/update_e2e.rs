//! Model updates end to end: central announces a bundle over a real broker (TLS, ACL), the
//! appliance daemon downloads it over HTTPS from the lab's server — which drops the first
//! transfer, so the download resumes — verifies, self-tests and activates it, and central hears
//! every step; a forged bundle is refused and central hears why; bundles on a USB stick are
//! installed or refused the same way.

use ed25519_dalek::SigningKey;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use wbc_integration_tests::{Account, Broker, FileServer};
use wbc_protocol::bundle::{Bundle, keys};
use wbc_protocol::uplink::ModelEvent;

const CLINIC: &str = "clinic-1";
const DEVICE: &str = "scope-1";

fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t.elapsed() < Duration::from_secs(secs), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn updates_by_network_and_usb_are_verified_activated_or_refused_and_central_hears_each_step() {
    let device = Account::device(CLINIC, DEVICE);
    let central_account = Account::central();
    let broker = Broker::start(&[device.clone(), central_account.clone()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lab = SigningKey::from_bytes(&[7; 32]);
    let forger = SigningKey::from_bytes(&[9; 32]);
    keys::write_public(&dir.path().join("lab.pub"), &lab.verifying_key()).unwrap();
    let default_pub = write(dir.path(), "default.pub", appliance::DEFAULT_KEY.as_bytes());
    let v0 = Bundle::from_bytes(appliance::DEFAULT_BUNDLE, &appliance::trusted_keys(&[]).unwrap())
        .unwrap()
        .manifest
        .model_version;
    let good = appliance::default_bundle_as(v0 + 1, &lab);
    let forged = appliance::default_bundle_as(v0 + 2, &forger);
    let good_path = write(dir.path(), "good.bundle", &good);
    let forged_path = write(dir.path(), "forged.bundle", &forged);
    let (cert, key) = broker.server_identity();
    let server = FileServer::start(
        (&cert, &key),
        HashMap::from([
            ("good.bundle".to_string(), good.clone()),
            ("forged.bundle".to_string(), forged),
        ]),
        Some(good.len() / 3),
    )
    .unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let central_broker = broker.config_for(&central_account).unwrap();
    let central = rt
        .block_on(central::start(&central::Config {
            db: dir.path().join("central.sqlite"),
            listen: "127.0.0.1:0".into(),
            client_id: "wbc-central".into(),
            broker: central_broker.clone(),
            ..Default::default()
        }))
        .unwrap();

    let usb = dir.path().join("usb");
    std::fs::create_dir(&usb).unwrap();
    let config = appliance::config::Config {
        data_dir: dir.path().join("appliance"),
        clinic: CLINIC.into(),
        device: DEVICE.into(),
        trust: vec![default_pub, dir.path().join("lab.pub")],
        backend: appliance::backend::BackendChoice::Cpu,
        web: appliance::config::WebConfig {
            listen: "127.0.0.1:0".into(),
            ..Default::default()
        },
        uplink: Some(appliance::uplink::UplinkConfig {
            broker: broker.config_for(&device).unwrap(),
            status_every_s: 1,
            max_backoff_s: 2,
            ..Default::default()
        }),
        update: appliance::update::UpdateConfig {
            usb_dir: Some(usb.clone()),
            poll_s: 1,
            ca_file: Some(broker.ca()),
            timeout_s: 10,
            ..Default::default()
        },
        ..Default::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = std::thread::spawn(move || {
        appliance::daemon::run(config, async move {
            let _ = stopped.await;
        })
    });

    let db = central.db.clone();
    let event = |ev: &str, version: u64| {
        let db = db.clone();
        let ev = ev.to_string();
        move || {
            db.model_events(Some(CLINIC), 500)
                .unwrap()
                .into_iter()
                .find(|e| e.event.as_str() == ev && e.model_version == version && e.device == DEVICE)
        }
    };
    let announce = |topic: &str, a: &wbc_protocol::signed::Announcement| {
        rt.block_on(central::announce::publish_retained(
            &central_broker,
            "wbc-central-announce",
            topic,
            serde_json::to_vec(a).unwrap(),
        ))
        .unwrap();
    };

    // The factory model is reported active first.
    wait_for("the factory model's report", 120, event("active", v0));

    // 1. Over the network, to the whole clinic; the first transfer is cut at a third.
    let a = central::announce::announcement(&good_path, &server.url("good.bundle"), None, None).unwrap();
    announce(&central::announce::topic(CLINIC, None).unwrap(), &a);
    let active = wait_for("the new model active at central", 180, event("active", v0 + 1));
    assert!(active.detail.contains("network"), "{}", active.detail);
    assert!(
        active.detail.contains(&format!("version {v0} kept as the fallback")),
        "{}",
        active.detail
    );
    let downloaded = event("downloaded", v0 + 1)().expect("a downloaded event");
    assert!(
        downloaded.detail.contains(&good.len().to_string()),
        "{}",
        downloaded.detail
    );
    assert!(event("verified", v0 + 1)().is_some());
    let ranges = server.ranges();
    assert_eq!(ranges[0], None, "the first request asks for the whole file");
    assert_eq!(
        ranges[1].as_deref(),
        Some(format!("bytes={}-", good.len() / 3).as_str()),
        "the second resumes where the cut left it: {ranges:?}"
    );
    // The device's retained status reports the new model.
    wait_for("the device's status with the new model", 60, || {
        db.devices()
            .unwrap()
            .into_iter()
            .find(|d| d.device == DEVICE && d.model_version == Some(v0 + 1))
    });

    // 2. A bundle signed by a key the device does not trust, to this device only.
    let a = central::announce::announcement(&forged_path, &server.url("forged.bundle"), None, None).unwrap();
    announce(&central::announce::topic(CLINIC, Some(DEVICE)).unwrap(), &a);
    let refused = wait_for("the forged bundle's refusal", 120, event("rejected", v0 + 2));
    assert!(refused.detail.contains("does not trust"), "{}", refused.detail);

    // 3. A USB stick: a damaged copy is refused, a good newer bundle becomes active.
    let usb_good = appliance::default_bundle_as(v0 + 3, &lab);
    write(&usb, "damaged.bundle", &usb_good[..usb_good.len() / 2]);
    let refused = wait_for("the damaged USB bundle's refusal", 60, || {
        db.model_events(Some(CLINIC), 500)
            .unwrap()
            .into_iter()
            .find(|e| e.event == ModelEvent::Rejected && e.detail.contains("damaged.bundle"))
    });
    assert!(refused.detail.contains("corrupt or truncated"), "{}", refused.detail);
    write(&usb, "v-next.bundle", &usb_good);
    let active = wait_for("the USB model active at central", 120, event("active", v0 + 3));
    assert!(active.detail.contains("USB (v-next.bundle)"), "{}", active.detail);

    stop.send(()).unwrap();
    daemon.join().unwrap().unwrap();
    rt.block_on(central.stop());
    // The events central lists are the appliance's own log, in the same words.
    let store = wbc_integration_tests::open_store(&dir.path().join("appliance/store"), CLINIC, DEVICE).unwrap();
    let log = store.model_log(100).unwrap();
    assert!(
        log.iter()
            .any(|e| e.message.event == ModelEvent::Rejected && e.message.detail.contains("does not trust"))
    );
    assert_eq!(log[0].message.event, ModelEvent::Active);
    assert_eq!(log[0].message.model_version, v0 + 3);
}
