//! `central serve`: the lab's ingest, database, API and dashboard.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "central",
    about = "The central lab: every clinic's white-cell differentials",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Receives results from the broker and serves the API and dashboard until stopped.
    Serve {
        /// Configuration file (TOML); defaults: `central.sqlite`, 127.0.0.1:8090, a broker on
        /// localhost:1883.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Announces a model bundle to the devices of a clinic (or one device), retained on the
    /// broker: they download it from `--url`, verify it and install it. Serve the file over
    /// HTTPS first.
    Announce {
        /// Configuration file (TOML), for the broker.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The bundle file (as served at --url).
        #[arg(long)]
        bundle: PathBuf,
        /// Its `https://` address.
        #[arg(long)]
        url: String,
        /// Clinic id.
        #[arg(long)]
        clinic: String,
        /// Device id (default: every device of the clinic).
        #[arg(long)]
        device: Option<String>,
        /// A signed key list to send with it (`trainer sign-keys`), when the bundle is signed
        /// by a new key.
        #[arg(long)]
        keys: Option<PathBuf>,
        /// A signed rollback instruction (`trainer sign-rollback`), when the bundle is older
        /// than the devices' model.
        #[arg(long)]
        rollback: Option<PathBuf>,
    },
    /// Writes the cells a clinic's technicians reviewed, each with the picture it was reviewed
    /// on, and `reviews.csv` (`path,label,…`) for `trainer adapt`: the clinic's site bundle is
    /// made from them.
    ExportReviews {
        /// Configuration file (TOML), for the database.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Clinic id.
        #[arg(long)]
        clinic: String,
        /// A new (or empty) folder to write.
        #[arg(long)]
        out: PathBuf,
        /// Only cells reviewed on or after this day (`YYYY-MM-DD`, UTC) or time (seconds since
        /// the Unix epoch): what came in since the last export.
        #[arg(long, value_parser = since_arg)]
        since: Option<u64>,
    },
    /// Withdraws the announcement on a clinic's (or device's) topic.
    Withdraw {
        /// Configuration file (TOML), for the broker.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Clinic id.
        #[arg(long)]
        clinic: String,
        /// Device id.
        #[arg(long)]
        device: Option<String>,
    },
}

fn load(config: Option<PathBuf>) -> Result<central::Config> {
    match config {
        Some(p) => central::Config::load(&p),
        None => Ok(central::Config::default()),
    }
}

/// Publishes retained on the configured broker, under central's client id with `-announce`.
fn publish(config: Option<PathBuf>, topic: &str, payload: Vec<u8>) -> Result<()> {
    let config = load(config)?;
    tokio::runtime::Runtime::new()?.block_on(central::announce::publish_retained(
        &config.broker,
        &format!("{}-announce", config.client_id),
        topic,
        payload,
    ))
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Announce {
            config,
            bundle,
            url,
            clinic,
            device,
            keys,
            rollback,
        } => {
            let topic = central::announce::topic(&clinic, device.as_deref())?;
            central::announce::check_clinic(&bundle, &clinic)?;
            let a = central::announce::announcement(&bundle, &url, keys.as_deref(), rollback.as_deref())?;
            publish(config, &topic, serde_json::to_vec(&a)?)?;
            println!(
                "announced model version {} ({} bytes, sha256 {}) on {topic}",
                a.model_version, a.size, a.sha256
            );
            Ok(())
        }
        Command::ExportReviews {
            config,
            clinic,
            out,
            since,
        } => {
            let db = central::db::Db::open(&load(config)?.db)?;
            let e = central::export::export_reviews(&db, &clinic, &out, since)?;
            let classes: Vec<String> = e.per_class.iter().map(|(c, n)| format!("{c} {n}")).collect();
            println!(
                "{} reviewed cells of clinic {clinic} written to {} ({}); central holds {} reviews of the clinic \
                 (the others say \"not a white cell\" or came without a picture)",
                e.cells(),
                out.join("reviews.csv").display(),
                classes.join(", "),
                e.reviews
            );
            Ok(())
        }
        Command::Withdraw { config, clinic, device } => {
            let topic = central::announce::topic(&clinic, device.as_deref())?;
            publish(config, &topic, Vec::new())?;
            println!("withdrawn: {topic}");
            Ok(())
        }
        Command::Serve { config } => {
            let config = load(config)?;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(central::run(&config, wbc_protocol::shutdown::signal()))
        }
    }
}

/// `--since`: a day (`YYYY-MM-DD`, its start in UTC) or seconds since the Unix epoch.
fn since_arg(s: &str) -> Result<u64, String> {
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(secs);
    }
    let bad = || format!("{s:?} is neither a day (YYYY-MM-DD) nor seconds since 1970");
    let parts: Vec<&str> = s.split('-').collect();
    let [y, m, d] = parts[..] else { return Err(bad()) };
    let (y, m, d) = (
        y.parse::<i32>().map_err(|_| bad())?,
        m.parse::<u8>().map_err(|_| bad())?,
        d.parse::<u8>().map_err(|_| bad())?,
    );
    let month = time::Month::try_from(m).map_err(|_| bad())?;
    let day = time::Date::from_calendar_date(y, month, d).map_err(|_| bad())?;
    u64::try_from(day.midnight().assume_utc().unix_timestamp()).map_err(|_| format!("{s} is before 1970"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn since_is_a_day_in_utc_or_seconds_and_nothing_else() {
        assert_eq!(super::since_arg("2027-01-15"), Ok(1_800_000_000 - 8 * 3600));
        assert_eq!(super::since_arg("1800000000"), Ok(1_800_000_000));
        for bad in [
            "2027-13-01",
            "2027-02-30",
            "yesterday",
            "2027-01",
            "-5",
            "1969-12-31",
            "",
        ] {
            assert!(super::since_arg(bad).is_err(), "{bad}");
        }
    }
}
