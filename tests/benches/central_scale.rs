//! Central with a long history: 10 million cells (100,000 slides of 100 cells, 200 clinics,
//! two years) in SQLite or PostgreSQL, filled in bulk by SQL; then the dashboard's queries, the
//! slide list, a slide, results over time, and the ingest rate of new results alone and while
//! the dashboard is read over and over. Prints one table row per measurement (medians).
//!
//! `cargo bench -p wbc-integration-tests --features central/postgres --bench central_scale`
//! (SQLite in a temporary folder); `CENTRAL_SCALE_DB=postgres://…` for PostgreSQL
//! (`bench/central-scale.sh` starts a throwaway server and runs both);
//! `CENTRAL_SCALE_CELLS` for another size.

use central::db::Db;
use central::sql::{Conn, is_postgres_url};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use wbc_integration_tests::synthetic_field;
use wbc_protocol::clock::now;
use wbc_protocol::slide::{SlideSettings, report};
use wbc_protocol::uplink::{Body, Envelope, FieldInfo};

const PER_SLIDE: u64 = 100;
const CLINICS: u64 = 200;

fn sql_text(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Fills the tables as `n` cells received would: cells, their message ids, and a summary per
/// slide (as computed when the slides were read).
fn fill(url: &str, n: u64) {
    let mut conn = Conn::open(url).unwrap();
    let f = synthetic_field(0, PER_SLIDE);
    let mut info = FieldInfo::of(&f);
    info.header.id = "FIELDID".into();
    let field_json = serde_json::to_string(&info).unwrap();
    let cell_json = serde_json::to_string(&f.cells[0]).unwrap();
    // A slide's report as a hundred such cells make it.
    let mut hundred = f.clone();
    hundred.cells = (0..PER_SLIDE).map(|_| f.cells[0].clone()).collect();
    let report_json = serde_json::to_string(&report("SLIDEID", &[hundred], &SlideSettings::default(), false)).unwrap();
    let t0 = now();
    let numbers = |n: u64| {
        if is_postgres_url(url) {
            format!(
                "(SELECT i FROM generate_series(0::bigint, {}::bigint) AS g(i)) AS n",
                n - 1
            )
        } else {
            format!(
                "(WITH RECURSIVE r(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM r WHERE i < {}) SELECT i FROM r) AS n",
                n - 1
            )
        }
    };
    let class = CASE_CLASS;
    conn.batch(&format!(
        "BEGIN;
         INSERT INTO cells (clinic, device, field_id, idx, slide_id, received_at, class, field_json, cell_json, message_id)
         SELECT 'c' || ((i / {PER_SLIDE}) % {CLINICS}), 'dev1', 'f' || (i / 5), i % 5, 's' || (i / {PER_SLIDE}),
                {t0} - i * 6, {class}, replace({fj}, '\"FIELDID\"', '\"f' || (i / 5) || '\"'), {cj},
                'c' || ((i / {PER_SLIDE}) % {CLINICS}) || ':dev1:' || i
         FROM {nums};
         INSERT INTO messages (id, clinic, device, seq, kind, sent_at, received_at)
         SELECT 'c' || ((i / {PER_SLIDE}) % {CLINICS}) || ':dev1:' || i, 'c' || ((i / {PER_SLIDE}) % {CLINICS}), 'dev1',
                i, 'cell', {t0} - i * 6, {t0} - i * 6
         FROM {nums};
         INSERT INTO slide_summaries (clinic, device, slide_id, started_at, finished_at, blast, possible_blast,
                                      report_json, dirty)
         SELECT 'c' || (i % {CLINICS}), 'dev1', 's' || i, {t0} - i * {PER_SLIDE} * 6, {t0} - i * {PER_SLIDE} * 6 + 600,
                CASE WHEN i % 50 = 0 THEN 1 ELSE 0 END, CASE WHEN i % 20 = 0 THEN 1 ELSE 0 END,
                replace({rj}, 'SLIDEID', 's' || i), 0
         FROM {snums};
         INSERT INTO devices (clinic, device, state, at, backlog, model_version, last_seen)
         SELECT 'c' || i, 'dev1', 'online', {t0}, 0, 4, {t0} FROM {cnums};
         COMMIT;",
        fj = sql_text(&field_json),
        cj = sql_text(&cell_json),
        rj = sql_text(&report_json),
        nums = numbers(n),
        snums = numbers(n.div_ceil(PER_SLIDE)),
        cnums = numbers(CLINICS),
    ))
    .unwrap();
    if !is_postgres_url(url) {
        conn.batch("ANALYZE").unwrap();
    } else {
        conn.batch("VACUUM ANALYZE").unwrap();
    }
}

/// The classes the cells are spread over, by their number.
const CASE_CLASS: &str = "CASE i % 7 WHEN 0 THEN 'Lymphocyte' WHEN 1 THEN 'Monocyte' WHEN 2 THEN 'Eosinophil'
    WHEN 3 THEN 'Basophil' WHEN 6 THEN 'Blast' ELSE 'Neutrophil' END";

/// The median of `runs` timings of `f`, in milliseconds.
fn median_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// New cell messages, each a new result of clinic c7.
fn new_cells(from: u64, n: u64) -> Vec<Envelope> {
    let mut out = Vec::new();
    let mut k = from;
    while (out.len() as u64) < n {
        let mut f = synthetic_field(k, PER_SLIDE);
        f.header.id = format!("new-{k}");
        f.header.slide_id = format!("new-slide-{}", k / PER_SLIDE);
        for b in Body::cells_of(&f) {
            out.push(Envelope::new(
                "c7",
                "dev1",
                1_000_000_000 + out.len() as u64 + from * 10,
                now(),
                b,
            ));
        }
        k += 1;
    }
    out.truncate(n as usize);
    out
}

fn main() {
    let n: u64 = std::env::var("CENTRAL_SCALE_CELLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let dir = tempfile::tempdir().unwrap();
    let url = std::env::var("CENTRAL_SCALE_DB")
        .unwrap_or_else(|_| dir.path().join("central.sqlite").to_string_lossy().into_owned());
    let kind = if is_postgres_url(&url) { "PostgreSQL" } else { "SQLite" };
    drop(Db::open(std::path::Path::new(&url)).unwrap());
    let t = Instant::now();
    fill(&url, n);
    println!(
        "{kind}: filled {n} cells ({} slides) in {:.0} s",
        n.div_ceil(PER_SLIDE),
        t.elapsed().as_secs_f64()
    );
    let db = Arc::new(Db::open(std::path::Path::new(&url)).unwrap());
    let row = |what: &str, ms: f64| println!("| {kind} | {n} | {what} | {ms:.1} ms |");
    let dashboard = |db: &Db| {
        db.slides_page(None, 51, 0).unwrap();
        db.devices().unwrap();
        db.model_events(None, 20).unwrap();
    };
    row(
        "dashboard (first 50 slides, 200 devices, 20 model events)",
        median_ms(20, || dashboard(&db)),
    );
    row(
        "dashboard of one clinic",
        median_ms(20, || {
            db.slides_page(Some("c7"), 51, 0).unwrap();
        }),
    );
    row(
        "/api/slides (100 slides)",
        median_ms(20, || {
            db.slides_page(None, 100, 0).unwrap();
        }),
    );
    row(
        "/api/slides page at offset 50,000",
        median_ms(5, || {
            db.slides_page(None, 100, 50_000).unwrap();
        }),
    );
    row(
        "one slide (100 cells)",
        median_ms(20, || {
            db.slide("c7", "dev1", "s7").unwrap().unwrap();
        }),
    );
    row(
        "results over the last 30 days",
        median_ms(5, || {
            db.results_over_time(None, 30).unwrap();
        }),
    );

    // Ingest alone, then while the dashboard is read again and again.
    const BATCH: u64 = 5000;
    let rate = |msgs: &[Envelope]| {
        let t = Instant::now();
        for m in msgs {
            db.apply(m).unwrap();
        }
        msgs.len() as f64 / t.elapsed().as_secs_f64()
    };
    let alone = rate(&new_cells(0, BATCH));
    println!("| {kind} | {n} | ingest alone | {alone:.0} messages/s |");
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (db, stop) = (db.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut times = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let s = Instant::now();
                dashboard(&db);
                times.push(s.elapsed().as_secs_f64() * 1e3);
                std::thread::sleep(Duration::from_millis(10));
            }
            times.sort_by(f64::total_cmp);
            (times.len(), times.get(times.len() / 2).copied().unwrap_or(0.0))
        })
    };
    let busy = rate(&new_cells(100_000, BATCH));
    stop.store(true, Ordering::Relaxed);
    let (reads, median) = reader.join().unwrap();
    println!(
        "| {kind} | {n} | ingest while the dashboard is read ({reads} reads, median {median:.1} ms) | {busy:.0} messages/s |"
    );
}
