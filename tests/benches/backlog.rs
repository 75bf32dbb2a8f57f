//! How long a backlog of 100,000 results takes to drain after an outage: an appliance store
//! filled while offline, then the uplink started against a local Mosquitto (TLS, QoS 1) with
//! central running. Prints the time until the outbox is empty and until central holds every
//! result. `cargo bench -p wbc-integration-tests --bench backlog` (several minutes; set
//! `BACKLOG_RESULTS` for another size).

use appliance::store::SlideState;
use appliance::uplink::{Uplink, UplinkConfig};
use std::time::{Duration, Instant};
use wbc_integration_tests::{Account, Broker, open_store, synthetic_field, synthetic_slide};

fn main() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .try_init();
    let want: u64 = std::env::var("BACKLOG_RESULTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let dir = tempfile::tempdir().unwrap();
    let s = open_store(&dir.path().join("store"), "clinic-a", "dev1").unwrap();
    // Fill the outbox while offline.
    let t = Instant::now();
    let (mut k, mut results) = (0u64, 0u64);
    while results < want {
        let f = synthetic_field(k, 100);
        if k % 100 == 0 {
            s.put_slide(
                &SlideState {
                    id: synthetic_slide(k, 100),
                    started_at: 0,
                    finished_at: None,
                },
                &[],
            )
            .unwrap();
        }
        results += f.cells.len() as u64;
        s.add_field(&f, None).unwrap();
        k += 1;
    }
    let fill = t.elapsed();
    println!(
        "filled: {results} results in {k} fields, {:.1} s ({:.0} fields/s, each flushed)",
        fill.as_secs_f64(),
        k as f64 / fill.as_secs_f64()
    );

    let device = Account::device("clinic-a", "dev1");
    let broker = Broker::start(&[device.clone(), Account::central()]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let central = rt
        .block_on(central::start(&central::Config {
            db: dir.path().join("central.sqlite"),
            listen: "127.0.0.1:0".into(),
            client_id: "wbc-central-bench".into(),
            broker: broker.config_for(&Account::central()).unwrap(),
            ..Default::default()
        }))
        .unwrap();
    while !central.stats.connected.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let config = UplinkConfig {
        broker: broker.config_for(&device).unwrap(),
        ..Default::default()
    };
    let stop = wbc_protocol::shutdown::Shutdown::new();
    let t = Instant::now();
    let task = rt.spawn(Uplink::new(s.clone(), config, 1).run(stop.clone()));
    while s.backlog() > 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let drained = t.elapsed();
    while central.db.message_count().unwrap() < results {
        std::thread::sleep(Duration::from_millis(20));
    }
    let at_central = t.elapsed();
    println!(
        "outbox empty (central confirmed every message) after {:.1} s ({:.0} results/s); central held all {results} after {:.1} s ({:.0} results/s)",
        drained.as_secs_f64(),
        results as f64 / drained.as_secs_f64(),
        at_central.as_secs_f64(),
        results as f64 / at_central.as_secs_f64()
    );
    stop.trigger();
    rt.block_on(task).unwrap();
    rt.block_on(central.stop());
}
