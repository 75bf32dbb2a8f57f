//! `central`: the lab side (MQTT ingest, deduplication, storage, HTTP API and dashboard).
//! Only the crate exists so far.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("central has no commands yet: ingest, storage and the dashboard are still to be built")
}
