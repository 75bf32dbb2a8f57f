//! `central`: the lab side. Receives every clinic's results over MQTT, validates and
//! deduplicates them, stores them in SQLite, and serves a JSON API and a dashboard.
#![deny(missing_docs)]

pub mod announce;
pub mod db;
pub mod export;
pub mod ingest;
pub mod sql;
pub mod web;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use wbc_protocol::mqtt::BrokerConfig;
use wbc_protocol::shutdown::Shutdown;

/// Central's configuration (TOML; every field has a default, unknown keys are refused).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The SQLite database file, or a `postgres://user@host/db` URL (build with
    /// `--features postgres`).
    pub db: PathBuf,
    /// Address of the HTTP API and dashboard.
    pub listen: String,
    /// MQTT client id: keep it fixed, the broker holds messages for it while central is down.
    pub client_id: String,
    /// The broker (`[broker]`).
    pub broker: BrokerConfig,
    /// Accounts of the dashboard and API (`[[users]]`, `name` and an Argon2 `password_hash`
    /// from `appliance hash-password`). With any, everything but `/health` needs a login;
    /// with none, nothing does (keep `listen` on loopback then).
    pub users: Vec<wbc_web::auth::User>,
    /// How long message ids and rejected messages are kept (`[retention]`).
    pub retention: db::Retention,
    /// When a clinic's agreement with its reviewers is flagged (`[agreement]`).
    pub agreement: db::AgreementSettings,
    /// Language of the pages and the slide reports (`en`, `fr`, `pt`; a user's own `language`
    /// wins, and `?lang=` for one report).
    pub language: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            db: PathBuf::from("central.sqlite"),
            listen: "127.0.0.1:8090".into(),
            client_id: "wbc-central".into(),
            broker: BrokerConfig::default(),
            users: Vec::new(),
            retention: db::Retention::default(),
            agreement: db::AgreementSettings::default(),
            language: "en".into(),
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
        for u in &c.users {
            u.validate()
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("{}: [[users]]", path.display()))?;
        }
        if wbc_web::i18n::Lang::from_code(&c.language).is_none() {
            anyhow::bail!("{}: language {:?} is not one of en, fr, pt", path.display(), c.language);
        }
        if !(0.0..=1.0).contains(&c.agreement.threshold) {
            anyhow::bail!(
                "{}: [agreement] threshold must be a share between 0 and 1 (0.85 is 85 %)",
                path.display()
            );
        }
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
    stop: Shutdown,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops ingest and the HTTP server and waits for them.
    pub async fn stop(self) {
        self.stop.trigger();
        for t in self.tasks {
            let _ = t.await;
        }
        // The database may be closed only off the async workers (a PostgreSQL client blocks).
        let db = self.db;
        let _ = tokio::task::spawn_blocking(move || drop(db)).await;
    }
}

/// Runs central until `shutdown` resolves (`main` passes [`wbc_protocol::shutdown::signal`],
/// SIGINT or SIGTERM; tests pass anything), then stops ingest and the HTTP server through one
/// [`Shutdown`] and waits for them. Says where the dashboard is on standard error.
pub async fn run(config: &Config, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    let running = start(config).await?;
    eprintln!(
        "central: dashboard on http://{}, database {}",
        running.addr,
        config.db.display()
    );
    shutdown.await;
    running.stop().await;
    Ok(())
}

/// Runs a retention pass at the start and every hour until `stop`.
async fn retention(db: Arc<db::Db>, r: db::Retention, stop: Shutdown) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let (db, r) = (db.clone(), r.clone());
                match tokio::task::spawn_blocking(move || db.prune(db::now(), &r)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "retention pass failed; tried again in an hour"),
                    Err(e) => tracing::warn!(error = %e, "retention task failed"),
                }
            }
            _ = stop.wait() => return,
        }
    }
}

/// Starts central on the current tokio runtime; [`Running::stop`] stops it.
pub async fn start(config: &Config) -> Result<Running> {
    // Opening may block (a file, or a PostgreSQL connection with its own runtime).
    let path = config.db.clone();
    let db = Arc::new(tokio::task::spawn_blocking(move || db::Db::open(&path)).await??);
    let stats = Arc::new(ingest::Stats::default());
    let stop = Shutdown::new();
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
    let http_stop = stop.clone();
    let app = web::router(Arc::new(web::Web {
        db: db.clone(),
        stats: stats.clone(),
        login: wbc_web::login::Login::where_accounts(
            config.users.clone(),
            web::login_page,
            wbc_web::i18n::Lang::from_code(&config.language).unwrap_or_default(),
        ),
        agreement: config.agreement.clone(),
    }));
    let tasks = vec![
        tokio::spawn(ingest.run(stop.clone())),
        tokio::spawn(retention(db.clone(), config.retention.clone(), stop.clone())),
        tokio::spawn(async move {
            let r = axum::serve(
                listener,
                app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .with_graceful_shutdown(async move { http_stop.wait().await })
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use wbc_protocol::messages::{CellRecord, CellResult, FieldRecord, SCHEMA_VERSION};
    use wbc_protocol::uplink::{Body, Envelope};

    fn get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        (head.to_string(), body.to_string())
    }

    /// One request; returns the status line and headers, and the body.
    fn request(addr: std::net::SocketAddr, method: &str, path: &str, headers: &str, body: &str) -> (String, String) {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        (head.to_string(), body.to_string())
    }

    /// A central on `db` with these accounts, on any free port, with no broker (ingest keeps
    /// retrying while the API serves).
    fn serving(db: std::path::PathBuf, users: Vec<wbc_web::auth::User>) -> Config {
        Config {
            db,
            listen: "127.0.0.1:0".into(),
            broker: BrokerConfig {
                host: "127.0.0.1".into(),
                port: Some(1),
                ..Default::default()
            },
            users,
            ..Default::default()
        }
    }

    #[test]
    fn an_account_that_could_never_log_in_is_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("central.toml");
        std::fs::write(&path, "[[users]]\nname = \"lab\"\npassword_hash = \"microscope\"\n").unwrap();
        let err = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(err.contains("[[users]]") && err.contains("not a PHC string"), "{err}");
        let hash = wbc_web::auth::hash_password("microscope").unwrap();
        std::fs::write(
            &path,
            format!("[[users]]\nname = \"lab\"\npassword_hash = \"{hash}\"\n"),
        )
        .unwrap();
        assert_eq!(Config::load(&path).unwrap().users[0].name, "lab");
    }

    #[test]
    fn with_accounts_everything_but_health_needs_a_login() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let config = serving(
            dir.path().join("c.sqlite"),
            vec![wbc_web::auth::User {
                name: "lab".into(),
                password_hash: wbc_web::auth::hash_password("microscope").unwrap(),
                language: None,
            }],
        );
        let running = rt.block_on(start(&config)).unwrap();
        let a = running.addr;
        let (head, _) = get(a, "/health");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        for page in [
            "/",
            "/slide?clinic=c&device=d&slide=s",
            "/cell-picture?clinic=c&device=d&field=f&index=0",
        ] {
            let (head, _) = get(a, page);
            assert!(
                head.starts_with("HTTP/1.1 303") && head.contains("location: /login"),
                "{page}: {head}"
            );
        }
        for api in ["/api/slides", "/api/slide?clinic=c&device=d&slide=s", "/api/devices"] {
            let (head, _) = get(a, api);
            assert!(head.starts_with("HTTP/1.1 401"), "{api}: {head}");
        }
        let form = "Content-Type: application/x-www-form-urlencoded\r\n";
        let (head, body) = request(a, "POST", "/login", form, "user=lab&password=wrong");
        assert!(
            head.starts_with("HTTP/1.1 401") && body.contains("Wrong user or password"),
            "{head}"
        );
        assert!(!head.to_lowercase().contains("set-cookie"));
        let (head, _) = request(a, "POST", "/login", form, "user=lab&password=microscope");
        assert!(head.starts_with("HTTP/1.1 303"), "{head}");
        let cookie = head
            .lines()
            .find_map(|l| l.strip_prefix("set-cookie: "))
            .and_then(|c| c.split(';').next())
            .unwrap()
            .to_string();
        let with = format!("Cookie: {cookie}\r\n");
        let (head, html) = request(a, "GET", "/", &with, "");
        assert!(
            head.starts_with("HTTP/1.1 200") && html.contains("id=\"logout\""),
            "{head}"
        );
        let (head, _) = request(a, "GET", "/api/slides", &with, "");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let (head, _) = request(a, "GET", "/api/slides", "Cookie: wbc_session=forged\r\n", "");
        assert!(head.starts_with("HTTP/1.1 401"), "a forged cookie: {head}");
        request(a, "POST", "/logout", &with, "");
        let (head, _) = request(a, "GET", "/api/slides", &with, "");
        assert!(head.starts_with("HTTP/1.1 401"), "logged out: {head}");
        rt.block_on(running.stop());
    }

    /// A field of slide `s1` with one cell, a blast, in a file with a hostile name.
    fn blast_field() -> FieldRecord {
        let mut p = [0.0f32; 6];
        p[wbc_protocol::CellClass::Blast.index()] = 1.0;
        FieldRecord {
            schema_version: SCHEMA_VERSION,
            header: wbc_protocol::messages::FieldHeader {
                id: "f1".into(),
                slide_id: "s1".into(),
                received_at: db::now(),
                source: "camera".into(),
                name: "<script>.jpg".into(),
                image_sha256: String::new(),
                width: 1,
                height: 1,
                single_cell: false,
                microns_per_pixel: 0.1,
            },
            cells: vec![CellRecord {
                result: CellResult::from_probabilities(&p, &Default::default(), "d".into(), 0.5, 1),
                review: None,
            }],
        }
    }

    /// Logs in; returns the cookie header to send.
    fn log_in(a: std::net::SocketAddr, user: &str, password: &str) -> String {
        let form = "Content-Type: application/x-www-form-urlencoded\r\n";
        let (head, _) = request(a, "POST", "/login", form, &format!("user={user}&password={password}"));
        assert!(head.starts_with("HTTP/1.1 303"), "{head}");
        let cookie = head
            .lines()
            .find_map(|l| l.strip_prefix("set-cookie: "))
            .and_then(|c| c.split(';').next())
            .unwrap();
        format!("Cookie: {cookie}\r\n")
    }

    #[test]
    fn the_lab_reads_its_pages_in_its_language_and_each_user_in_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let hash = wbc_web::auth::hash_password("microscope").unwrap();
        let user = |name: &str, language: Option<&str>| wbc_web::auth::User {
            name: name.into(),
            password_hash: hash.clone(),
            language: language.map(String::from),
        };
        let config = Config {
            language: "fr".into(),
            ..serving(
                dir.path().join("c.sqlite"),
                vec![user("lab", None), user("ana", Some("pt"))],
            )
        };
        let running = rt.block_on(start(&config)).unwrap();
        let a = running.addr;
        for b in Body::cells_with_pictures(&blast_field(), |_| None) {
            running.db.apply(&Envelope::new("clinic-a", "dev1", 1, 1, b)).unwrap();
        }
        let (_, form) = get(a, "/login");
        assert!(
            form.contains("<html lang=\"fr\"") && form.contains("Mot de passe"),
            "{form}"
        );
        let lab = log_in(a, "lab", "microscope");
        let (_, html) = request(a, "GET", "/", &lab, "");
        for want in [
            "<html lang=\"fr\"",
            "Formules leucocytaires : laboratoire central",
            "<h2>Appareils</h2>",
            "Lames (blastes d&#39;abord)",
            "URGENT : 1 blaste",
            "Blaste 100 %",
            "Le modèle face aux relectures des techniciens",
            ">Se déconnecter</button>",
        ] {
            assert!(html.contains(want), "{want}: {html}");
        }
        assert!(!html.contains("Slides (blasts first)"), "{html}");
        let slide = "/slide?clinic=clinic-a&device=dev1&slide=s1";
        let (_, page) = request(a, "GET", slide, &lab, "");
        for want in [
            "Toutes les lames",
            "<h1>Lame s1</h1>",
            "<td>Blaste</td>",
            "C&#39;est un blaste",
            "en cours",
        ] {
            assert!(page.contains(want), "{want}: {page}");
        }
        let (_, report) = request(a, "GET", "/slide/report?clinic=clinic-a&device=dev1&slide=s1", &lab, "");
        assert!(report.contains("pré-classification"), "{report}");
        let ana = log_in(a, "ana", "microscope");
        let (_, html) = request(a, "GET", "/", &ana, "");
        assert!(
            html.contains("<html lang=\"pt\"") && html.contains("Lâminas (blastos primeiro)"),
            "{html}"
        );
        let (_, page) = request(a, "GET", slide, &ana, "");
        assert!(
            page.contains("É um blasto") && page.contains("Todas as lâminas"),
            "{page}"
        );
        let (head, missing) = request(a, "GET", "/slide?clinic=clinic-a&device=dev1&slide=nope", &ana, "");
        assert!(
            head.starts_with("HTTP/1.1 404") && missing.contains("Esta lâmina não existe."),
            "{missing}"
        );
        rt.block_on(running.stop());
    }

    #[test]
    fn the_api_and_dashboard_serve_what_the_database_holds_on_every_database() {
        for (_guard, db) in sql::databases() {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let config = serving(db, Vec::new());
            let running = rt.block_on(start(&config)).unwrap();
            let field = blast_field();
            let picture = db::tests::jpeg(32);
            for b in Body::cells_with_pictures(&field, |_| Some(picture.clone())) {
                running.db.apply(&Envelope::new("clinic-a", "dev1", 1, 1, b)).unwrap();
            }
            let (head, body) = get(running.addr, "/api/slides?clinic=clinic-a");
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v[0]["blast"], true);
            let (_, days) = get(running.addr, "/api/results?days=2");
            assert!(days.contains("\"Blast\""), "{days}");
            let (head, html) = get(running.addr, "/");
            assert!(head.starts_with("HTTP/1.1 200"));
            assert!(html.contains("class=\"blast\"") && html.contains("URGENT"), "{html}");
            assert!(
                html.contains("id=\"agreement\""),
                "the model against the reviews: {html}"
            );
            let (head, body) = get(running.addr, "/api/agreement?days=7");
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            assert_eq!(body, "[]", "no reviews yet");
            // Each slide links to its page, which lists its cells, those waiting for review first.
            let link = "/slide?clinic=clinic-a&amp;device=dev1&amp;slide=s1";
            assert!(html.contains(&format!("href=\"{link}\"")), "{html}");
            let (head, page) = get(running.addr, &link.replace("&amp;", "&"));
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            assert!(
                page.contains("&lt;script&gt;.jpg") && !page.contains("<script>"),
                "{page}"
            );
            assert!(
                page.contains("URGENT") && page.contains("<tr class=\"blast\"><td>Blast</td>"),
                "{page}"
            );
            // Its report for the patient record, printable and as PDF.
            assert!(page.contains("id=\"report\""), "{page}");
            let (head, report) = get(running.addr, "/slide/report?clinic=clinic-a&device=dev1&slide=s1");
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            assert!(
                report.contains("URGENT") && report.contains("id=\"disclaimer\""),
                "{report}"
            );
            assert!(report.contains("<td>clinic-a</td>"), "{report}");
            let mut s = std::net::TcpStream::connect(running.addr).unwrap();
            write!(
                s,
                "GET /slide/report.pdf?clinic=clinic-a&device=dev1&slide=s1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut r = Vec::new();
            s.read_to_end(&mut r).unwrap();
            let split = r.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
            let head = String::from_utf8_lossy(&r[..split]).to_lowercase();
            assert!(head.contains("content-type: application/pdf"), "{head}");
            assert!(r[split + 4..].starts_with(b"%PDF-"));
            let (_, fr) = get(
                running.addr,
                "/slide/report?clinic=clinic-a&device=dev1&slide=s1&lang=fr",
            );
            assert!(
                fr.contains("Formule leucocytaire") && fr.contains("URGENT : 1 blaste"),
                "{fr}"
            );
            let (head, _) = get(
                running.addr,
                "/slide/report?clinic=clinic-a&device=dev1&slide=s1&lang=xx",
            );
            assert!(head.starts_with("HTTP/1.1 400"), "{head}");
            let (head, _) = get(running.addr, "/slide/report?clinic=clinic-a&device=dev1&slide=nope");
            assert!(head.starts_with("HTTP/1.1 404"), "{head}");
            // The blast came with its picture, which the page shows.
            let src = "/cell-picture?clinic=clinic-a&amp;device=dev1&amp;field=f1&amp;index=0";
            assert!(page.contains(&format!("<img src=\"{src}\"")), "{page}");
            let mut s = std::net::TcpStream::connect(running.addr).unwrap();
            write!(
                s,
                "GET {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                src.replace("&amp;", "&")
            )
            .unwrap();
            let mut r = Vec::new();
            s.read_to_end(&mut r).unwrap();
            let split = r.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
            let head = String::from_utf8_lossy(&r[..split]).to_lowercase();
            assert!(
                head.starts_with("http/1.1 200") && head.contains("content-type: image/jpeg"),
                "{head}"
            );
            assert_eq!(&r[split + 4..], &picture[..]);
            let (head, _) = get(
                running.addr,
                "/cell-picture?clinic=clinic-a&device=dev1&field=f1&index=1",
            );
            assert!(head.starts_with("HTTP/1.1 404"), "{head}");
            let (head, body) = get(running.addr, "/api/slide?clinic=clinic-a&device=dev1&slide=s1");
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["cells"][0]["waiting"], "blast");
            assert_eq!(v["cells"][0]["cell"]["result"]["class"], "Blast");
            assert_eq!(v["slide"]["report"]["slide_id"], "s1");
            let (head, _) = get(running.addr, "/api/slide?clinic=clinic-a&device=dev1&slide=nope");
            assert!(head.starts_with("HTTP/1.1 404"), "{head}");
            let (head, _) = get(running.addr, "/slide?clinic=clinic-a");
            assert!(head.starts_with("HTTP/1.1 400"), "a slide needs its whole key: {head}");
            let (_, health) = get(running.addr, "/health");
            assert!(health.contains("\"broker_connected\":false"));
            rt.block_on(running.stop());
        }
    }
}
