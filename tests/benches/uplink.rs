//! Durable result writes on the appliance (with the flush durability needs), outbox drain rate
//! to a local Mosquitto broker (TLS, QoS 1, 32 in flight), and central's ingest rate into
//! SQLite (one transaction and a full sync per message).

use appliance::store::{SlideState, Store};
use appliance::uplink::{Uplink, UplinkConfig};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wbc_integration_tests::{Account, Broker, open_store, synthetic_field};
use wbc_protocol::uplink::{Body, Envelope};

const ONE_SLIDE: u64 = u64::MAX;

fn store(dir: &std::path::Path) -> Arc<Store> {
    let s = open_store(dir, "clinic-a", "dev1").unwrap();
    s.put_slide(
        &SlideState {
            id: "slide-0".into(),
            started_at: 0,
            finished_at: None,
        },
        &[],
    )
    .unwrap();
    s
}

fn store_writes(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let mut k = 0u64;
    let mut g = c.benchmark_group("store");
    g.throughput(Throughput::Elements(1));
    g.bench_function("durable_field_write", |b| {
        b.iter(|| {
            s.add_field(&synthetic_field(k, ONE_SLIDE), None).unwrap();
            k += 1;
        })
    });
    g.finish();
}

fn outbox_drain(c: &mut Criterion) {
    let device = Account::device("clinic-a", "dev1");
    let broker = Broker::start(std::slice::from_ref(&device)).unwrap();
    let config = UplinkConfig {
        broker: broker.config_for(&device).unwrap(),
        ..Default::default()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    const FIELDS: u64 = 1000;
    let mut next = 0u64;
    let mut g = c.benchmark_group("uplink");
    g.sample_size(10);
    // 1000 fields of 1–3 cells: 2000 messages.
    let messages: u64 = (0..FIELDS)
        .map(|k| synthetic_field(k, ONE_SLIDE).cells.len() as u64)
        .sum();
    g.throughput(Throughput::Elements(messages));
    g.bench_function("drain_2000_messages_to_mosquitto", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // Same cell counts every round: k advances by FIELDS, a multiple of 3.
                for k in next..next + FIELDS {
                    s.add_field(&synthetic_field(k, ONE_SLIDE), None).unwrap();
                }
                next += FIELDS;
                let stop = wbc_protocol::shutdown::Shutdown::new();
                let t = Instant::now();
                let task = rt.spawn(Uplink::new(s.clone(), config.clone(), 1).run(stop.clone()));
                // No central here: drained once the broker has every message.
                while s.unsent() > 0 {
                    std::thread::sleep(Duration::from_micros(200));
                }
                total += t.elapsed();
                stop.trigger();
                rt.block_on(task).unwrap();
            }
            total
        })
    });
    g.finish();
}

fn central_ingest(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let db = central::db::Db::open(&dir.path().join("central.sqlite")).unwrap();
    let mut seq = 0u64;
    let mut k = 0u64;
    let mut pending: Vec<Envelope> = Vec::new();
    let mut g = c.benchmark_group("central");
    g.throughput(Throughput::Elements(1));
    g.bench_function("ingest_one_cell_message", |b| {
        b.iter(|| {
            if pending.is_empty() {
                for body in Body::cells_of(&synthetic_field(k, 25)) {
                    seq += 1;
                    pending.push(Envelope::new("clinic-a", "dev1", seq, 0, body));
                }
                k += 1;
            }
            db.apply(&pending.pop().unwrap()).unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, store_writes, outbox_drain, central_ingest);
criterion_main!(benches);
