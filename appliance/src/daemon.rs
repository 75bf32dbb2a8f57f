//! `appliance run`: the inbox watcher and the web UI over one appliance, until stopped.

use crate::app::{App, AppSettings};
use crate::config::{Config, users_or_first_run};
use crate::inbox::Inbox;
use crate::open_models;
use crate::store::{Identity, Store};
use anyhow::{Context, Result};
use std::sync::Arc;
use std::time::Duration;
use wbc_cells::finder::FinderConfig;
use wbc_cells::image::DecodeLimits;
use wbc_protocol::shutdown::Shutdown;

/// Runs until `shutdown` resolves (`main` passes [`wbc_protocol::shutdown::signal`], SIGINT or
/// SIGTERM; tests pass anything), then stops every task through one [`Shutdown`] and waits for
/// them. Prints the web UI's address (and, on first start, where the generated password was written) on standard
/// error.
pub fn run(config: Config, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Result<()> {
    config.validate()?;
    let backend = crate::backend::select(config.backend)?;
    eprintln!("compute backend: {}", backend.name);
    let store = Arc::new(Store::open(
        &config.data_dir.join("store"),
        Identity {
            clinic: config.clinic.clone(),
            device: config.device.clone(),
        },
        config.store.clone(),
    )?);
    let backend_name = backend.name.clone();
    let (models, classifier) = open_models(&config, store.clone(), backend)?;
    let model_version = classifier.model_version;
    tracing::info!(backend = %backend_name, model_version, "model loaded");
    let mut app = App::new(
        classifier,
        store,
        AppSettings {
            microns_per_pixel: config.microns_per_pixel,
            finder: FinderConfig::default(),
            slide: config.slide.clone(),
            limits: DecodeLimits::default(),
            backend: backend_name,
            adaptation: config.adaptation.clone(),
        },
    )?
    .with_models(models.clone());
    if let Some(c) = &config.camera {
        let cam = crate::capture::open(c)?;
        tracing::info!(camera = %cam.describe(), "camera attached");
        app = app.with_camera(cam);
    }
    let app = Arc::new(app);
    let (users, first_password) = users_or_first_run(&config)?;
    if let Some(file) = first_password {
        eprintln!(
            "first start: web UI user `admin`; its password is in {} (readable by this user only; delete it once noted); only its hash is kept in {}",
            file.display(),
            config.data_dir.join("web-users.toml").display()
        );
    }
    let mut inbox = Inbox::new(&config.inbox_dir(), Duration::from_secs(1))?;
    let stop = Shutdown::new();
    let watcher = {
        let (app, stop) = (app.clone(), stop.clone());
        let poll = Duration::from_millis(config.inbox_poll_ms);
        std::thread::spawn(move || {
            while !stop.is_triggered() {
                match inbox.pass(&app) {
                    Ok(s) if s != Default::default() => tracing::info!(?s, "inbox pass"),
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "inbox pass failed; retrying"),
                }
                app.set_inbox_waiting(inbox.waiting());
                stop.sleep(poll);
            }
        })
    };
    let pruner = {
        let (store, stop) = (app.store_arc(), stop.clone());
        std::thread::spawn(move || {
            while !stop.is_triggered() {
                if let Err(e) = store.prune(crate::app::now()) {
                    tracing::error!(error = %format!("{e:#}"), "retention pass failed");
                }
                stop.sleep(Duration::from_secs(3600));
            }
        })
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (announce_tx, announce_rx) = std::sync::mpsc::sync_channel(4);
    let updater = {
        let up = crate::update::Updater::new(
            app.clone(),
            config.update.clone(),
            config.uplink.as_ref().and_then(|u| u.broker.ca_file.as_deref()),
            &config.data_dir.join("downloads"),
            announce_rx,
        )?;
        if let Some(d) = &config.update.usb_dir {
            eprintln!("USB updates from {}", d.display());
        }
        let stop = stop.clone();
        std::thread::spawn(move || up.run(stop))
    };
    let uplink = match &config.uplink {
        Some(u) => {
            let up =
                crate::uplink::Uplink::new(app.store_arc(), u.clone(), model_version).with_announcements(announce_tx);
            let state = up.state();
            eprintln!("uplink to {}:{}", u.broker.host, u.broker.port());
            Some((rt.spawn(up.run(stop.clone())), state))
        }
        None => {
            tracing::info!("no [uplink] configured: results wait in the outbox");
            None
        }
    };
    let web = crate::web::Web::new(
        app,
        users,
        wbc_web::i18n::Lang::from_code(&config.web.language).unwrap_or_default(),
        config.web.max_upload_bytes,
        uplink.as_ref().map(|u| u.1.clone()),
    );
    let served = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&config.web.listen)
            .await
            .with_context(|| format!("listening on {}", config.web.listen))?;
        eprintln!("web UI on http://{}", listener.local_addr()?);
        eprintln!("inbox {}", config.inbox_dir().display());
        tokio::spawn(stop.clone().trigger_on(shutdown));
        let until = stop.clone();
        axum::serve(
            listener,
            crate::web::router(web).into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(async move { until.wait().await })
        .await
        .context("web UI")
    });
    stop.trigger();
    if let Some((task, _)) = uplink {
        let _ = rt.block_on(task);
    }
    let _ = watcher.join();
    let _ = pruner.join();
    let _ = updater.join();
    models.close()?;
    served
}
