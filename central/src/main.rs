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
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            let config = match config {
                Some(p) => central::Config::load(&p)?,
                None => central::Config::default(),
            };
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async {
                let running = central::start(&config).await?;
                eprintln!(
                    "central: dashboard on http://{}, database {}",
                    running.addr,
                    config.db.display()
                );
                tokio::signal::ctrl_c().await?;
                running.stop().await;
                anyhow::Ok(())
            })
        }
    }
}
