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
        Command::ExportReviews { config, clinic, out } => {
            let db = central::db::Db::open(&load(config)?.db)?;
            let e = central::export::export_reviews(&db, &clinic, &out)?;
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
