//! Power cuts: the appliance's store is killed (SIGKILL) at random moments while it writes,
//! many times over; after each restart every result it had acknowledged is there, intact, and
//! queued for central.

use appliance::store::{Identity, Retention, Store};
use rand::Rng;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use wbc_integration_tests::synthetic_field;
use wbc_protocol::uplink::{Body, Envelope};

const PER_SLIDE: u64 = 25;

#[test]
fn every_acknowledged_result_survives_sigkill_at_random_moments() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let mut rng = rand::thread_rng();
    let mut acked = BTreeSet::new();
    for round in 0..20 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_appliance-sim"))
            .arg("--store")
            .arg(&store)
            .args(["--count", "1000000", "--per-slide", &PER_SLIDE.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        // Read acknowledgements on a thread; kill after a random time.
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(k) = line.strip_prefix("ACK ") {
                    got.push(k.parse::<u64>().unwrap());
                }
            }
            got
        });
        let wait = Duration::from_millis(rng.gen_range(150..900));
        let t = Instant::now();
        while t.elapsed() < wait {
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let got = reader.join().unwrap();
        acked.extend(got);

        let s = Store::open(
            &store,
            Identity {
                clinic: "clinic-a".into(),
                device: "dev1".into(),
            },
            Retention::default(),
        )
        .unwrap_or_else(|e| panic!("round {round}: the store does not reopen after SIGKILL: {e:#}"));
        for &k in &acked {
            let want = synthetic_field(k, PER_SLIDE);
            let f = s
                .field(&want.id)
                .unwrap()
                .unwrap_or_else(|| panic!("round {round}: acknowledged field {k} is missing"));
            assert_eq!(f, want, "round {round}: field {k} damaged");
        }
        // Every cell of every acknowledged field is queued for central, exactly once.
        let mut queued = BTreeSet::new();
        for o in s.outbox_from(0, usize::MAX).unwrap() {
            if let Body::Cell(c) = Envelope::decode(&o.topic, &o.payload).unwrap().body {
                assert!(queued.insert((c.field.id.clone(), c.index)), "a cell queued twice");
            }
        }
        for &k in &acked {
            let f = synthetic_field(k, PER_SLIDE);
            for i in 0..f.cells.len() as u32 {
                assert!(
                    queued.contains(&(f.id.clone(), i)),
                    "round {round}: cell {i} of field {k} not queued"
                );
            }
        }
        // Each slide holds exactly its fields.
        let slides = acked.iter().map(|&k| k / PER_SLIDE).collect::<BTreeSet<_>>();
        for sl in slides {
            let ids: BTreeSet<String> = s
                .fields_of_slide(&format!("slide-{sl}"))
                .unwrap()
                .into_iter()
                .map(|f| f.header.id)
                .collect();
            for &k in acked.iter().filter(|&&k| k / PER_SLIDE == sl) {
                assert!(ids.contains(&format!("f{k}")));
            }
            assert!(
                ids.iter().all(|id| id[1..].parse::<u64>().unwrap() / PER_SLIDE == sl),
                "a field in the wrong slide"
            );
        }
    }
    assert!(acked.len() > 100, "the writer made progress ({} fields)", acked.len());
}
