//! Appliance → Mosquitto (TLS, passwords, per-clinic ACL) → central, with outages: the broker
//! down for a while and back, the appliance killed mid-stream and restarted, central
//! restarted. Central must end up with every acknowledged result exactly once, in its slide.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wbc_integration_tests::{Account, Broker, synthetic_field, synthetic_slide};
use wbc_protocol::uplink::{Body, Envelope};

const PER_SLIDE: u64 = 25;

/// The appliance stand-in, with its acknowledgements as they come.
struct Sim {
    child: Child,
    acked: Arc<Mutex<Vec<u64>>>,
    /// The broker has every message.
    sent: Arc<Mutex<bool>>,
    /// Central has confirmed every message.
    drained: Arc<Mutex<bool>>,
}

impl Sim {
    fn spawn(store: &Path, uplink: &Path, count: u64, pace_ms: u64) -> Sim {
        let mut child = Command::new(env!("CARGO_BIN_EXE_appliance-sim"))
            .arg("--store")
            .arg(store)
            .arg("--uplink")
            .arg(uplink)
            .args(["--count", &count.to_string(), "--per-slide", &PER_SLIDE.to_string()])
            .args(["--pace-ms", &pace_ms.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (acked, sent, drained) = (
            Arc::new(Mutex::new(Vec::new())),
            Arc::new(Mutex::new(false)),
            Arc::new(Mutex::new(false)),
        );
        let stdout = child.stdout.take().unwrap();
        let (a, s, d) = (acked.clone(), sent.clone(), drained.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(k) = line.strip_prefix("ACK ") {
                    a.lock().unwrap().push(k.parse().unwrap());
                } else if line == "SENT" {
                    *s.lock().unwrap() = true;
                } else if line == "DRAINED" {
                    *d.lock().unwrap() = true;
                }
            }
        });
        Sim {
            child,
            acked,
            sent,
            drained,
        }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn central_config(dir: &Path, broker: &Broker) -> central::Config {
    central::Config {
        db: dir.join("central.sqlite"),
        listen: "127.0.0.1:0".into(),
        client_id: "wbc-central-test".into(),
        broker: broker.config_for(&Account::central()).unwrap(),
        ..Default::default()
    }
}

/// Starts central on a new runtime and waits until it is connected to the broker.
fn start_central(dir: &Path, broker: &Broker) -> (tokio::runtime::Runtime, central::Running) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let central = rt.block_on(central::start(&central_config(dir, broker))).unwrap();
    wait_until("central to connect", Duration::from_secs(20), || {
        central.stats.connected.load(std::sync::atomic::Ordering::Relaxed)
    });
    (rt, central)
}

fn uplink_file(dir: &Path, broker: &Broker, clinic: &str, device: &str) -> std::path::PathBuf {
    let mut broker_config = broker.config_for(&Account::device(clinic, device)).unwrap();
    // A dead device is noticed after 1.5 keep-alive intervals.
    broker_config.keep_alive_s = 5;
    let config = appliance::uplink::UplinkConfig {
        broker: broker_config,
        inflight: 16,
        status_every_s: 1,
        max_backoff_s: 1,
        confirm_after_s: 5,
    };
    let p = dir.join("uplink.toml");
    std::fs::write(&p, toml::to_string(&config).unwrap()).unwrap();
    p
}

#[test]
fn results_reach_central_exactly_once_through_broker_appliance_and_central_outages() {
    let _ = tracing_subscriber::fmt().with_env_filter("warn").try_init();
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(&[Account::device("clinic-a", "dev1"), Account::central()]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cfg = central_config(dir.path(), &broker);
    let mut central = rt.block_on(central::start(&cfg)).unwrap();
    // Results published before central's first subscription reach no one (the broker keeps
    // messages only for sessions it knows): the device starts once central is subscribed.
    wait_until("central to subscribe", Duration::from_secs(20), || {
        central.stats.connected.load(std::sync::atomic::Ordering::Relaxed)
    });
    let uplink = uplink_file(dir.path(), &broker, "clinic-a", "dev1");
    let store = dir.path().join("store");
    const N: u64 = 500;
    let sim = Sim::spawn(&store, &uplink, N, 3);

    // (a) The broker goes down for a while, and comes back.
    wait_until("100 results", Duration::from_secs(60), || sim.acked() >= 100);
    broker.stop().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    broker.resume().unwrap();

    // (b) The appliance is killed mid-stream and restarted on its store.
    wait_until("250 results", Duration::from_secs(60), || sim.acked() >= 250);
    sim.kill();
    let sim2 = Sim::spawn(&store, &uplink, N, 3);

    // (c) Central restarts.
    wait_until("400 results", Duration::from_secs(60), || sim2.acked() >= 400);
    rt.block_on(central.stop());
    std::thread::sleep(Duration::from_millis(1000));
    central = rt.block_on(central::start(&cfg)).unwrap();

    wait_until("the outbox to drain", Duration::from_secs(120), || {
        *sim2.drained.lock().unwrap()
    });
    let expected: BTreeMap<String, u64> = (0..N).fold(BTreeMap::new(), |mut m, k| {
        *m.entry(synthetic_slide(k, PER_SLIDE)).or_default() += synthetic_field(k, PER_SLIDE).cells.len() as u64;
        m
    });
    let total: u64 = expected.values().sum();
    let held = || central.db.cell_counts().unwrap().values().sum::<u64>();
    let t = Instant::now();
    while held() < total && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(50));
    }
    if held() < total {
        let counts = central.db.cell_counts().unwrap();
        let missing: Vec<_> = expected
            .iter()
            .filter(|(s, n)| counts.get(&("clinic-a".into(), "dev1".into(), (*s).clone())) != Some(n))
            .collect();
        panic!(
            "central holds {} of {total} cells; stats {:?}; short slides {missing:?}\nbroker log:\n{}",
            held(),
            central.stats,
            broker.log()
        );
    }
    std::thread::sleep(Duration::from_millis(500));

    // Exactly once, each in its slide, each intact.
    let counts = central.db.cell_counts().unwrap();
    for (slide, n) in &expected {
        assert_eq!(
            counts.get(&("clinic-a".into(), "dev1".into(), slide.clone())),
            Some(n),
            "{slide}"
        );
    }
    assert_eq!(counts.len(), expected.len(), "no cells in slides that do not exist");
    for k in (0..N).step_by(37) {
        let want = synthetic_field(k, PER_SLIDE);
        let fields = central.db.slide_fields("clinic-a", "dev1", &want.slide_id).unwrap();
        let got = fields.iter().find(|f| f.id == want.id).expect("field at central");
        assert_eq!(got, &want, "field {k} arrived intact");
    }
    assert_eq!(central.db.message_count().unwrap(), total, "each message stored once");

    // The API shows it.
    let base = format!("http://{}", central.addr);
    let slides: serde_json::Value = http_get(&format!("{base}/api/slides?clinic=clinic-a"));
    assert_eq!(slides.as_array().unwrap().len(), expected.len());
    let devices: serde_json::Value = http_get(&format!("{base}/api/devices"));
    assert_eq!(devices[0]["device"], "dev1");
    // Power cut: the broker publishes the device's last will, and central shows it offline.
    sim2.kill();
    wait_until("the device to show offline", Duration::from_secs(30), || {
        central.db.devices().unwrap()[0].state == "offline"
    });
    rt.block_on(central.stop());
}

/// A minimal HTTP GET over a TCP stream (no client library needed for two JSON calls).
fn http_get(url: &str) -> serde_json::Value {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = std::net::TcpStream::connect(host).unwrap();
    write!(s, "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let text = String::from_utf8(resp).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    serde_json::from_str(body).unwrap()
}

/// Publishes QoS 1 messages as a device and waits for the broker's acknowledgements; an error
/// if the broker closes the connection instead.
fn publish_as(broker: &Broker, account: &Account, msgs: Vec<(String, Vec<u8>)>) -> anyhow::Result<()> {
    publish_with(&broker.config_for(account).unwrap(), account, msgs)
}

fn publish_with(
    config: &wbc_protocol::mqtt::BrokerConfig,
    account: &Account,
    msgs: Vec<(String, Vec<u8>)>,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let opts = config.options(&format!("test-{}", account.user))?;
        let (client, mut events) = rumqttc::AsyncClient::new(opts, 64);
        let n = msgs.len();
        for (t, p) in msgs {
            client.publish(t, rumqttc::QoS::AtLeastOnce, false, p).await.unwrap();
        }
        let mut acks = 0;
        while acks < n {
            match tokio::time::timeout(Duration::from_secs(20), events.poll()).await {
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => acks += 1,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => anyhow::bail!("publishing as {}: {e}", account.user),
                Err(_) => anyhow::bail!("no acknowledgement"),
            }
        }
        let _ = client.disconnect().await;
        Ok(())
    })
}

#[test]
fn a_device_cannot_write_into_another_clinics_topics_and_garbage_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let a = Account::device("clinic-a", "dev1");
    let broker = Broker::start(&[a.clone(), Account::device("clinic-b", "dev2"), Account::central()]).unwrap();
    let (rt, central) = start_central(dir.path(), &broker);
    let cells = Body::cells_of(&synthetic_field(0, PER_SLIDE));
    let forged = Envelope::new("clinic-b", "dev2", 1, 1, cells[0].clone());
    let own = Envelope::new("clinic-a", "dev1", 1, 1, cells[0].clone());
    let json = |e: &Envelope| serde_json::to_vec(e).unwrap();
    // Into another clinic's topic: the broker's ACL drops it (Mosquitto 2.0 also closes the
    // connection; either way nothing reaches central).
    let _ = publish_as(&broker, &a, vec![(forged.topic(), json(&forged))]);
    publish_as(
        &broker,
        &a,
        vec![
            // Own topic, but not a message: central rejects it and carries on.
            (own.topic(), b"{\"schema_version\":1,\"garbage\":true}".to_vec()),
            (own.topic(), vec![0xff; 100]),
            // Own topic, claiming to be another clinic: central rejects it.
            (own.topic(), json(&forged)),
            (own.topic(), json(&own)),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", broker.log()));
    wait_until("the valid message", Duration::from_secs(20), || {
        central.db.message_count().unwrap() == 1
    });
    wait_until("the rejections", Duration::from_secs(20), || {
        central.db.rejected_count().unwrap() == 3
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(central.db.message_count().unwrap(), 1);
    let devices = central.db.devices().unwrap();
    assert!(devices.iter().all(|d| d.clinic == "clinic-a"), "{devices:?}");
    rt.block_on(central.stop());
}

#[test]
fn the_daemon_sends_what_it_classifies_to_central() {
    let dir = tempfile::tempdir().unwrap();
    let device = Account::device("clinic-a", "scope-1");
    let broker = Broker::start(&[device.clone(), Account::central()]).unwrap();
    let (rt, central) = start_central(dir.path(), &broker);
    let config = appliance::config::Config {
        data_dir: dir.path().join("appliance"),
        clinic: "clinic-a".into(),
        device: "scope-1".into(),
        microns_per_pixel: 0.072,
        inbox_poll_ms: 50,
        uplink: Some(appliance::uplink::UplinkConfig {
            broker: broker.config_for(&device).unwrap(),
            status_every_s: 1,
            ..Default::default()
        }),
        web: appliance::config::WebConfig {
            listen: "127.0.0.1:0".into(),
            ..Default::default()
        },
        ..Default::default()
    };
    let inbox = config.inbox_dir();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = std::thread::spawn(move || {
        appliance::daemon::run(config, async {
            let _ = stopped.await;
        })
    });
    wait_until("the inbox", Duration::from_secs(60), || inbox.is_dir());
    let field = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/fields/images/BloodImage_00000.jpg");
    std::fs::copy(&field, inbox.join("field.jpg.part")).unwrap();
    std::fs::rename(inbox.join("field.jpg.part"), inbox.join("field.jpg")).unwrap();

    // The field's white cell reaches central, and the device shows as online with its model.
    wait_until("the cell at central", Duration::from_secs(60), || {
        central
            .db
            .cell_counts()
            .unwrap()
            .keys()
            .any(|(c, d, _)| c == "clinic-a" && d == "scope-1")
    });
    wait_until("the device's status", Duration::from_secs(20), || {
        central
            .db
            .devices()
            .unwrap()
            .iter()
            .any(|d| d.device == "scope-1" && d.state == "online" && d.model_version.is_some())
    });
    let slides = central.db.slides(Some("clinic-a")).unwrap();
    assert_eq!(slides.len(), 1);
    assert_eq!(slides[0].report.fields, 1);
    assert!(slides[0].report.classified + slides[0].report.unidentified >= 1);
    stop.send(()).unwrap();
    daemon.join().unwrap().unwrap();
    // A clean stop says so: the device goes offline at central.
    wait_until("the offline status", Duration::from_secs(20), || {
        central
            .db
            .devices()
            .unwrap()
            .iter()
            .any(|d| d.device == "scope-1" && d.state == "offline")
    });
    rt.block_on(central.stop());
}

#[test]
fn central_catches_up_on_a_backlog_queued_while_it_was_down() {
    // The broker pushes a queued backlog to central without waiting for acknowledgements:
    // more messages than central's request queue holds must not stall it.
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&[Account::device("clinic-a", "dev1"), Account::central()]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cfg = central_config(dir.path(), &broker);
    // Central subscribes once (its session persists), then goes away.
    let central = rt.block_on(central::start(&cfg)).unwrap();
    wait_until("central to connect", Duration::from_secs(20), || {
        central.stats.connected.load(std::sync::atomic::Ordering::Relaxed)
    });
    rt.block_on(central.stop());
    const N: u64 = 1500;
    let sim = Sim::spawn(
        &dir.path().join("store"),
        &uplink_file(dir.path(), &broker, "clinic-a", "dev1"),
        N,
        0,
    );
    wait_until("the outbox to drain into the broker", Duration::from_secs(120), || {
        *sim.sent.lock().unwrap()
    });
    assert!(!*sim.drained.lock().unwrap(), "kept until central confirms");
    let total: u64 = (0..N).map(|k| synthetic_field(k, PER_SLIDE).cells.len() as u64).sum();
    assert!(total > 2 * 1024, "more than central's request queue");
    let central = rt.block_on(central::start(&cfg)).unwrap();
    wait_until("central to hold the backlog", Duration::from_secs(120), || {
        central.db.message_count().unwrap() == total
    });
    wait_until(
        "central's receipts to empty the outbox",
        Duration::from_secs(60),
        || *sim.drained.lock().unwrap(),
    );
    sim.kill();
    rt.block_on(central.stop());
}

/// A store with `n` synthetic fields in their slides, and how many messages they make.
fn filled_store(dir: &Path, n: u64) -> (Arc<appliance::store::Store>, u64) {
    let s = wbc_integration_tests::open_store(dir, "clinic-a", "dev1").unwrap();
    let mut messages = 0;
    for k in 0..n {
        if k % PER_SLIDE == 0 {
            let slide = appliance::store::SlideState {
                id: synthetic_slide(k, PER_SLIDE),
                started_at: 1,
                finished_at: None,
            };
            s.put_slide(&slide, &[]).unwrap();
        }
        let f = synthetic_field(k, PER_SLIDE);
        messages += f.cells.len() as u64;
        s.add_field(&f, None).unwrap();
    }
    (s, messages)
}

/// The real uplink on `store`, on `rt`, sending again after 2 s what central has not confirmed.
fn start_uplink(
    rt: &tokio::runtime::Runtime,
    broker: &Broker,
    account: &Account,
    store: Arc<appliance::store::Store>,
) -> (Arc<appliance::uplink::UplinkState>, wbc_protocol::shutdown::Shutdown) {
    let config = appliance::uplink::UplinkConfig {
        broker: broker.config_for(account).unwrap(),
        max_backoff_s: 1,
        confirm_after_s: 2,
        ..Default::default()
    };
    let uplink = appliance::uplink::Uplink::new(store, config, 1);
    let state = uplink.state();
    let stop = wbc_protocol::shutdown::Shutdown::new();
    rt.spawn(uplink.run(stop.clone()));
    (state, stop)
}

#[test]
fn results_a_crashing_broker_loses_after_acknowledging_them_are_sent_again_until_central_confirms_them() {
    let dir = tempfile::tempdir().unwrap();
    let device = Account::device("clinic-a", "dev1");
    // The broker saves its state every 10 s: what it takes between two saves dies with it.
    let mut broker = Broker::start_saving_every(&[device.clone(), Account::central()], 10).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cfg = central_config(dir.path(), &broker);
    // Central subscribes, then is away: the broker holds the results for it, in memory.
    let (_, central) = start_central(dir.path(), &broker);
    rt.block_on(central.stop());
    let (store, messages) = filled_store(&dir.path().join("store"), 60);
    let (uplink, stop) = start_uplink(&rt, &broker, &device, store.clone());
    wait_until("the broker's acknowledgements", Duration::from_secs(60), || {
        uplink.delivered() >= messages
    });
    // Right after its acknowledgements, before its next save, the broker dies.
    broker.kill().unwrap();
    assert_eq!(store.backlog() as u64, messages, "nothing is confirmed: all kept");
    assert_eq!(store.unconfirmed() as u64, messages);
    broker.resume().unwrap();
    let central = rt.block_on(central::start(&cfg)).unwrap();
    wait_until("central to hold every result", Duration::from_secs(90), || {
        central.db.message_count().unwrap() == messages
    });
    wait_until(
        "central's receipts to empty the outbox",
        Duration::from_secs(60),
        || store.backlog() == 0,
    );
    assert_eq!(central.db.message_count().unwrap(), messages, "each stored once");
    assert!(uplink.confirmed() >= messages);
    stop.trigger();
    rt.block_on(central.stop());
}

#[test]
fn results_the_broker_acknowledges_and_nobody_receives_stay_unconfirmed_and_are_sent_again_until_central_has_them() {
    let dir = tempfile::tempdir().unwrap();
    let device = Account::device("clinic-a", "dev1");
    let broker = Broker::start(&[device.clone(), Account::central()]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Central has never subscribed (a new lab, or its subscription lost): the broker takes the
    // results, acknowledges them and drops them.
    let (store, messages) = filled_store(&dir.path().join("store"), 30);
    let (uplink, stop) = start_uplink(&rt, &broker, &device, store.clone());
    wait_until("the broker's acknowledgements", Duration::from_secs(60), || {
        uplink.delivered() >= messages
    });
    wait_until("a second sending", Duration::from_secs(30), || uplink.resent() >= 1);
    assert_eq!(uplink.confirmed(), 0);
    assert_eq!(store.backlog() as u64, messages, "every result kept");
    assert_eq!(store.unsent(), 0);
    assert_eq!(
        store.unconfirmed() as u64,
        messages,
        "shown as waiting for central, not as delivered"
    );
    // Central comes: what is sent again reaches it, and its receipts empty the outbox.
    let (_crt, central) = start_central(dir.path(), &broker);
    wait_until(
        "central's receipts to empty the outbox",
        Duration::from_secs(90),
        || store.backlog() == 0,
    );
    assert_eq!(central.db.message_count().unwrap(), messages);
    stop.trigger();
    _crt.block_on(central.stop());
}

#[test]
fn a_device_whose_acl_block_is_missing_keeps_every_result_and_shows_it_waiting() {
    let dir = tempfile::tempdir().unwrap();
    // The device may log in, but nobody wrote its ACL block. (Mosquitto 2.0 then ends the
    // connection at its first result; a broker that acknowledges and drops is the test above.)
    let mut device = Account::device("clinic-a", "dev1");
    device.acl.clear();
    let broker = Broker::start(&[device.clone(), Account::central()]).unwrap();
    let (rt, central) = start_central(dir.path(), &broker);
    let (store, messages) = filled_store(&dir.path().join("store"), 10);
    let (uplink, stop) = start_uplink(&rt, &broker, &device, store.clone());
    wait_until("the uplink to fail", Duration::from_secs(30), || {
        uplink.last_error().is_some()
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(central.db.message_count().unwrap(), 0, "central never had them");
    assert_eq!(uplink.confirmed(), 0);
    assert_eq!(store.backlog() as u64, messages, "every result kept");
    stop.trigger();
    rt.block_on(central.stop());
}

#[test]
fn a_device_may_log_in_with_a_client_certificate_instead_of_a_password() {
    let dir = tempfile::tempdir().unwrap();
    let a = Account::device("clinic-a", "dev1");
    let broker = Broker::start(&[a.clone(), Account::central()]).unwrap();
    let (rt, central) = start_central(dir.path(), &broker);
    let own = Envelope::new(
        "clinic-a",
        "dev1",
        1,
        1,
        Body::cells_of(&synthetic_field(0, PER_SLIDE))[0].clone(),
    );
    // Without a certificate the certificate port refuses the device.
    let mut no_cert = broker.cert_config_for(&a);
    no_cert.client_cert = None;
    no_cert.client_key = None;
    assert!(publish_with(&no_cert, &a, vec![(own.topic(), serde_json::to_vec(&own).unwrap())]).is_err());
    publish_with(
        &broker.cert_config_for(&a),
        &a,
        vec![(own.topic(), serde_json::to_vec(&own).unwrap())],
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", broker.log()));
    wait_until("the message at central", Duration::from_secs(20), || {
        central.db.message_count().unwrap() == 1
    });
    rt.block_on(central.stop());
}

#[test]
fn a_provisioned_device_logs_in_with_its_generated_credentials_and_only_under_its_topics() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("provisioned");
    firmware_config::provision(
        &firmware_config::Provision {
            clinic: "clinic-07".into(),
            device: "scope-1".into(),
            broker_host: "localhost".into(),
            broker_port: 8883,
            install_dir: "/etc/wbc".into(),
            update_keys: Vec::new(),
            language: "en".into(),
        },
        &out,
    )
    .unwrap();
    let read = |f: &str| std::fs::read_to_string(out.join(f)).unwrap();
    let broker = Broker::start_with(&[Account::central()], &read("mosquitto.passwd"), &read("mosquitto.acl")).unwrap();
    let (rt, central) = start_central(dir.path(), &broker);
    // The provisioned configuration, pointed at this test's broker and files.
    let config = firmware_config::check(&out.join("appliance.toml")).unwrap();
    let mut b = config.uplink.unwrap().broker;
    b.port = Some(broker.port);
    b.ca_file = Some(broker.ca());
    b.password_file = Some(out.join("mqtt.password"));
    let me = Account {
        user: b.username.clone().unwrap(),
        password: String::new(),
        acl: vec![],
    };
    let cell = Body::cells_of(&synthetic_field(0, PER_SLIDE))[0].clone();
    let own = Envelope::new("clinic-07", "scope-1", 1, 1, cell.clone());
    let other = Envelope::new("clinic-08", "scope-1", 1, 1, cell);
    let _ = publish_with(&b, &me, vec![(other.topic(), serde_json::to_vec(&other).unwrap())]);
    publish_with(&b, &me, vec![(own.topic(), serde_json::to_vec(&own).unwrap())])
        .unwrap_or_else(|e| panic!("{e}\n{}", broker.log()));
    wait_until("the message at central", Duration::from_secs(20), || {
        central.db.message_count().unwrap() == 1
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(central.db.devices().unwrap().iter().all(|d| d.clinic == "clinic-07"));
    // A wrong password is refused.
    let wrong = dir.path().join("wrong.password");
    std::fs::write(&wrong, "nope\n").unwrap();
    b.password_file = Some(wrong);
    assert!(publish_with(&b, &me, vec![(own.topic(), b"{}".to_vec())]).is_err());
    rt.block_on(central.stop());
}
