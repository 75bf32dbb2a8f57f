//! Central's HTTP API (JSON) and dashboard.
//!
//! | route | what |
//! |---|---|
//! | `GET /` | dashboard: devices (online, backlog, model), slides with blasts first |
//! | `GET /health` | `{"status":"ok","broker_connected":…}` |
//! | `GET /api/devices` | every device: state, backlog, model version, last seen |
//! | `GET /api/slides?clinic=C` | slides with differential and flags, blasts first |
//! | `GET /api/results?clinic=C&days=N` | cells per day and class |
//! | `GET /api/stats` | messages stored, duplicates ignored, rejected |

use crate::db::Db;
use crate::ingest::Stats;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// What the handlers share.
pub struct Web {
    /// The database.
    pub db: Arc<Db>,
    /// Ingest counters.
    pub stats: Arc<Stats>,
}

/// The routes.
pub fn router(w: Arc<Web>) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/health", get(health))
        .route("/api/devices", get(devices))
        .route("/api/slides", get(slides))
        .route("/api/results", get(results))
        .route("/api/stats", get(stats))
        .route("/api/model-events", get(model_events))
        .with_state(w)
}

fn internal(e: anyhow::Error) -> Response {
    tracing::error!(error = %format!("{e:#}"), "request failed");
    (StatusCode::INTERNAL_SERVER_ERROR, "internal error (see central's log)").into_response()
}

/// Runs a database call off the async workers (PostgreSQL's client blocks on its own
/// runtime, and SQLite blocks on the disk) and answers with its JSON.
async fn json<T: serde::Serialize + Send + 'static>(
    w: &Arc<Web>,
    f: impl FnOnce(&Web) -> anyhow::Result<T> + Send + 'static,
) -> Response {
    match blocking(w, f).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => internal(e),
    }
}

async fn blocking<T: Send + 'static>(
    w: &Arc<Web>,
    f: impl FnOnce(&Web) -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let w = w.clone();
    tokio::task::spawn_blocking(move || f(&w))
        .await
        .map_err(|e| anyhow::anyhow!("database task: {e}"))?
}

#[derive(Deserialize)]
struct Filter {
    clinic: Option<String>,
    days: Option<u32>,
}

async fn health(State(w): State<Arc<Web>>) -> Response {
    axum::Json(serde_json::json!({
        "status": "ok",
        "broker_connected": w.stats.connected.load(Ordering::Relaxed),
    }))
    .into_response()
}

async fn devices(State(w): State<Arc<Web>>) -> Response {
    json(&w, |w| w.db.devices()).await
}

async fn model_events(State(w): State<Arc<Web>>, Query(f): Query<Filter>) -> Response {
    json(&w, move |w| w.db.model_events(f.clinic.as_deref(), 500)).await
}

async fn slides(State(w): State<Arc<Web>>, Query(f): Query<Filter>) -> Response {
    json(&w, move |w| w.db.slides(f.clinic.as_deref())).await
}

async fn results(State(w): State<Arc<Web>>, Query(f): Query<Filter>) -> Response {
    json(&w, move |w| {
        w.db.results_over_time(f.clinic.as_deref(), f.days.unwrap_or(30).min(3650))
    })
    .await
}

async fn stats(State(w): State<Arc<Web>>) -> Response {
    json(&w, |w| {
        let s = &w.stats;
        Ok(serde_json::json!({
            "messages": w.db.message_count()?,
            "stored_since_start": s.stored.load(Ordering::Relaxed),
            "duplicates_since_start": s.duplicates.load(Ordering::Relaxed),
            "rejected_since_start": s.rejected.load(Ordering::Relaxed),
            "rejected_total": w.db.rejected_count()?,
        }))
    })
    .await
}

use wbc_shared::html_escape as esc;

fn when(t: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t as i64)
        .ok()
        .and_then(|d| {
            d.format(&time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]"
            ))
            .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

async fn dashboard(State(w): State<Arc<Web>>, Query(f): Query<Filter>) -> Response {
    let fetched = blocking(&w, move |w| {
        let c = f.clinic.as_deref();
        Ok((w.db.devices()?, w.db.slides(c)?, w.db.model_events(c, 20)?))
    });
    let (devices, slides, events) = match fetched.await {
        Ok(v) => v,
        Err(e) => return internal(e),
    };
    let mut b = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>WBC central</title><style>\
         body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}td,th{border:1px solid #bbb;\
         padding:.25em .5em}tr.blast{background:#fdd}tr.possible-blast{background:#ffe8cc}.offline{color:#a00}.online{color:#070}</style></head><body>\
         <h1>WBC differentials: central lab</h1><h2>Devices</h2><table id=\"devices\"><tr><th>clinic</th><th>device</th>\
         <th>state</th><th>waiting to send</th><th>model</th><th>last heard</th></tr>",
    );
    for d in &devices {
        let _ = write!(
            b,
            "<tr><td><a href=\"/?clinic={c}\">{c}</a></td><td>{dev}</td><td class=\"{st}\">{st}</td><td>{bl}</td>\
             <td>{m}</td><td>{seen}</td></tr>",
            c = esc(&d.clinic),
            dev = esc(&d.device),
            st = esc(&d.state),
            bl = d.backlog.map(|b| b.to_string()).unwrap_or_default(),
            m = d.model_version.map(|m| m.to_string()).unwrap_or_default(),
            seen = when(d.last_seen)
        );
    }
    b.push_str("</table><h2>Slides (blasts first)</h2><table id=\"slides\"><tr><th>clinic</th><th>device</th><th>slide</th><th>started</th><th>state</th><th>cells</th><th>differential</th><th>flags</th></tr>");
    for s in &slides {
        let diff: Vec<String> = s
            .report
            .per_class
            .iter()
            .filter(|(_, c)| c.count > 0)
            .map(|(k, c)| format!("{k} {:.0} %", c.percent))
            .collect();
        let flags: Vec<String> = s.report.flags.iter().map(|f| esc(&f.message())).collect();
        let _ = write!(
            b,
            "<tr class=\"{cls}\"><td>{c}</td><td>{d}</td><td>{id}</td><td>{t}</td><td>{st}</td><td>{n}</td><td>{diff}</td><td>{flags}</td></tr>",
            cls = if s.blast {
                "blast"
            } else if s.possible_blast {
                "possible-blast"
            } else {
                ""
            },
            c = esc(&s.clinic),
            d = esc(&s.device),
            id = esc(&s.report.slide_id),
            t = when(s.started_at),
            st = if s.finished_at.is_some() {
                "finished"
            } else {
                "in progress"
            },
            n = s.report.classified,
            diff = esc(&diff.join(", ")),
            flags = flags.join("<br>")
        );
    }
    b.push_str("</table><h2>Model updates (latest)</h2><table id=\"model-events\"><tr><th>clinic</th><th>device</th><th>when</th><th>event</th><th>version</th><th>detail</th></tr>");
    for e in &events {
        let _ = write!(
            b,
            "<tr class=\"{cls}\"><td>{c}</td><td>{d}</td><td>{t}</td><td>{ev}</td><td>{v}</td><td>{detail}</td></tr>",
            cls = if matches!(e.event.as_str(), "rejected" | "rolled_back") {
                "blast"
            } else {
                ""
            },
            c = esc(&e.clinic),
            d = esc(&e.device),
            t = when(e.at),
            ev = esc(&e.event),
            v = e.model_version,
            detail = esc(&e.detail)
        );
    }
    b.push_str("</table><p>JSON: <a href=\"/api/devices\">devices</a>, <a href=\"/api/slides\">slides</a>, <a href=\"/api/results\">results over time</a>, <a href=\"/api/model-events\">model events</a>, <a href=\"/api/stats\">ingest</a>.</p></body></html>");
    Html(b).into_response()
}
