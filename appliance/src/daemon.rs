//! `appliance run`: the inbox watcher and the web UI over one appliance, until stopped.

use crate::app::{App, AppSettings};
use crate::config::{Config, users_or_first_run};
use crate::inbox::Inbox;
use crate::store::DirStore;
use crate::{open_bundle, trusted_keys};
use anyhow::{Context, Result};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use wbc_shared::classify::Classifier;
use wbc_shared::finder::FinderConfig;
use wbc_shared::image::DecodeLimits;

/// Runs until SIGINT or SIGTERM. Prints the web UI's address (and, on first start, the
/// generated password) on standard error.
pub fn run(config: Config) -> Result<()> {
    config.validate()?;
    let bundle = open_bundle(config.bundle.as_deref(), &trusted_keys(&config.trust)?)?;
    let crate::backend::Backend { device, name: backend } = crate::backend::select(config.backend)?;
    eprintln!("compute backend: {backend}");
    let classifier = Classifier::from_bundle(&bundle, &device)?.with_min_confidence(config.min_confidence);
    tracing::info!(%backend, model_version = bundle.manifest.model_version, "model loaded");
    let store = Arc::new(DirStore::open(&config.data_dir.join("store"), config.max_image_bytes)?);
    let mut app = App::new(
        classifier,
        store,
        AppSettings {
            microns_per_pixel: config.microns_per_pixel,
            finder: FinderConfig::default(),
            slide: config.slide.clone(),
            limits: DecodeLimits::default(),
            backend,
        },
    )?;
    if let Some(c) = &config.camera {
        let cam = crate::capture::open(c)?;
        tracing::info!(camera = %cam.describe(), "camera attached");
        app = app.with_camera(cam);
    }
    let app = Arc::new(app);
    let (users, first_password) = users_or_first_run(&config)?;
    if let Some(pw) = first_password {
        eprintln!(
            "first start: web UI user `admin`, password `{pw}` — shown once; only its hash is kept in {}",
            config.data_dir.join("web-users.toml").display()
        );
    }
    let mut inbox = Inbox::new(&config.inbox_dir(), Duration::from_secs(1))?;
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (app, stop) = (app.clone(), stop.clone());
        let poll = Duration::from_millis(config.inbox_poll_ms);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match inbox.pass(&app) {
                    Ok(s) if s != Default::default() => tracing::info!(?s, "inbox pass"),
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "inbox pass failed; retrying"),
                }
                std::thread::sleep(poll);
            }
        })
    };
    let web = crate::web::Web::new(app, users, config.web.max_upload_bytes);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let served = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&config.web.listen)
            .await
            .with_context(|| format!("listening on {}", config.web.listen))?;
        eprintln!("web UI on http://{}", listener.local_addr()?);
        eprintln!("inbox {}", config.inbox_dir().display());
        axum::serve(listener, crate::web::router(web))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("web UI")
    });
    stop.store(true, Ordering::Relaxed);
    let _ = watcher.join();
    served
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("stopping");
}
