//! `central`: the lab side. Receives every clinic's results over MQTT, validates and
//! deduplicates them, stores them in SQLite, and serves a JSON API and a dashboard.
#![deny(missing_docs)]

pub mod db;
pub mod ingest;
pub mod web;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use wbc_shared::mqtt::BrokerConfig;

/// Central's configuration (TOML; every field has a default, unknown keys are refused).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The SQLite database file.
    pub db: PathBuf,
    /// Address of the HTTP API and dashboard.
    pub listen: String,
    /// MQTT client id: keep it fixed, the broker holds messages for it while central is down.
    pub client_id: String,
    /// The broker (`[broker]`).
    pub broker: BrokerConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            db: PathBuf::from("central.sqlite"),
            listen: "127.0.0.1:8090".into(),
            client_id: "wbc-central".into(),
            broker: BrokerConfig::default(),
        }
    }
}

impl Config {
    /// Reads a TOML file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let c: Config =
            toml::from_str(&text).with_context(|| format!("{} is not a valid configuration", path.display()))?;
        c.broker
            .validate()
            .with_context(|| format!("{}: [broker]", path.display()))?;
        Ok(c)
    }
}

/// A running central: ingest and HTTP, until [`Running::stop`].
pub struct Running {
    /// The database.
    pub db: Arc<db::Db>,
    /// Ingest counters.
    pub stats: Arc<ingest::Stats>,
    /// Where the HTTP API listens.
    pub addr: std::net::SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops ingest and the HTTP server and waits for them.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Starts central on the current tokio runtime.
pub async fn start(config: &Config) -> Result<Running> {
    let db = Arc::new(db::Db::open(&config.db)?);
    let stats = Arc::new(ingest::Stats::default());
    let (stop, rx) = tokio::sync::watch::channel(false);
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let ingest = ingest::Ingest {
        db: db.clone(),
        broker: config.broker.clone(),
        client_id: config.client_id.clone(),
        stats: stats.clone(),
    };
    let mut http_stop = rx.clone();
    let app = web::router(Arc::new(web::Web {
        db: db.clone(),
        stats: stats.clone(),
    }));
    let tasks = vec![
        tokio::spawn(ingest.run(rx)),
        tokio::spawn(async move {
            let r = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = http_stop.changed().await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "HTTP server failed");
            }
        }),
    ];
    Ok(Running {
        db,
        stats,
        addr,
        stop,
        tasks,
    })
}
