//! A stand-in for the appliance's pipeline in the store and uplink tests: the real store and
//! the real uplink, fed with synthetic fields instead of classified images (so that a test can
//! write thousands of results quickly and kill the process at any moment).
//!
//! `appliance-sim --store DIR --count N [--per-slide P] [--pace-ms M] [--uplink FILE.toml]`
//! prints `ACK <k>` once field `k` is durable, and (with an uplink) `SENT` once the broker has
//! every message and `DRAINED` once central has confirmed every one (the outbox is empty), then
//! keeps running until killed. Fields already stored (a restart) are
//! acknowledged again without being written twice.

use anyhow::{Context, Result};
use appliance::store::SlideState;
use appliance::uplink::{Uplink, UplinkConfig};
use clap::Parser;
use std::io::Write;
use std::path::PathBuf;
use wbc_integration_tests::{open_store, synthetic_field, synthetic_slide};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    store: PathBuf,
    #[arg(long, default_value = "clinic-a")]
    clinic: String,
    #[arg(long, default_value = "dev1")]
    device: String,
    #[arg(long)]
    count: u64,
    #[arg(long, default_value_t = 25)]
    per_slide: u64,
    #[arg(long, default_value_t = 0)]
    pace_ms: u64,
    #[arg(long)]
    uplink: Option<PathBuf>,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let store = open_store(&a.store, &a.clinic, &a.device)?;
    let rt = tokio::runtime::Runtime::new()?;
    let never = wbc_protocol::shutdown::Shutdown::new();
    if let Some(p) = &a.uplink {
        let text = std::fs::read_to_string(p)?;
        let config: UplinkConfig = toml::from_str(&text).context("uplink config")?;
        rt.spawn(Uplink::new(store.clone(), config, 1).run(never.clone()));
    }
    let mut out = std::io::stdout().lock();
    let mut slides = std::collections::HashSet::new();
    for k in 0..a.count {
        let slide = synthetic_slide(k, a.per_slide);
        if slides.insert(slide.clone()) {
            store.put_slide(
                &SlideState {
                    id: slide,
                    started_at: 1,
                    finished_at: None,
                },
                &[],
            )?;
        }
        store.add_field(&synthetic_field(k, a.per_slide), None)?;
        writeln!(out, "ACK {k}")?;
        out.flush()?;
        if a.pace_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(a.pace_ms));
        }
    }
    if a.uplink.is_some() {
        while store.unsent() > 0 {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        writeln!(out, "SENT")?;
        out.flush()?;
        while store.backlog() > 0 {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        writeln!(out, "DRAINED")?;
        out.flush()?;
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
