//! Central's HTTP API (JSON) and dashboard.
//!
//! | route | what |
//! |---|---|
//! | `GET /` | dashboard: devices (online, backlog, model), slides with blasts first (50 a page, `?offset=K`) |
//! | `GET /health` | `{"status":"ok","broker_connected":…}` (open without a login) |
//! | `GET`/`POST /login`, `POST /logout` | where `[[users]]` are configured, every other route needs a login |
//! | `GET /api/devices` | every device: state, backlog, model version, last seen |
//! | `GET /api/slides?clinic=C&limit=N&offset=K` | slides with differential and flags, blasts first (a page: 100 unless `limit`, at most 1000) |
//! | `GET /slide?clinic=C&device=D&slide=S` | one slide: flags, differential, every cell (those waiting for review first) |
//! | `GET /api/slide?clinic=C&device=D&slide=S` | the same in JSON |
//! | `GET /slide/report?…` and `/slide/report.pdf?…` (the same keys) | the slide report for the patient record, printable and as PDF |
//! | `GET /cell-picture?clinic=C&device=D&field=F&index=I` | a cell's picture (JPEG), for the cells sent with one |
//! | `GET /api/results?clinic=C&days=N` | cells per day and class |
//! | `GET /api/stats` | messages stored, duplicates ignored, rejected |
//! | `GET /api/agreement?clinic=C&days=N` | per clinic and model version: reviews that confirm the model, the classes changed, week by week, `low` below the threshold |

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
use wbc_protocol::classes::CellClass;
use wbc_web::i18n::Lang;
use wbc_web::login::{LoggedIn, Login};
use wbc_web::utc_minute as when;

/// What the handlers share.
pub struct Web {
    /// The database.
    pub db: Arc<Db>,
    /// Ingest counters.
    pub stats: Arc<Stats>,
    /// Accounts and sessions, and the lab's language (a user's own where set); with no
    /// accounts, no login is asked for.
    pub login: Arc<Login>,
    /// When a clinic's agreement with its reviewers is flagged.
    pub agreement: crate::db::AgreementSettings,
}

/// The logged-in user, where there are accounts.
type User = Option<axum::Extension<LoggedIn>>;

impl Web {
    /// The language of a user's pages (the lab's where the user has none, or where there are
    /// no accounts).
    fn lang(&self, user: &User) -> Lang {
        self.login.language(user.as_ref().map(|u| u.0.0.as_str()))
    }
}

/// `?lang=en|fr|pt`.
#[derive(Deserialize)]
struct LangParam {
    lang: Option<String>,
}

/// The routes: `/health` and `/login` always open; the rest behind the login where there are
/// accounts.
pub fn router(w: Arc<Web>) -> Router {
    let private = Router::new()
        .route("/", get(dashboard))
        .route("/api/devices", get(devices))
        .route("/api/slides", get(slides))
        .route("/slide", get(slide_page))
        .route("/slide/report", get(slide_report))
        .route("/slide/report.pdf", get(slide_report_pdf))
        .route("/api/slide", get(slide_json))
        .route("/cell-picture", get(cell_picture))
        .route("/api/results", get(results))
        .route("/api/stats", get(stats))
        .route("/api/model-events", get(model_events))
        .route("/api/agreement", get(agreement));
    Router::new()
        .route("/health", get(health))
        .merge(w.login.routes())
        .merge(w.login.guard(private))
        .with_state(w)
}

/// A page in central's look around the login form (for [`Login`]).
pub fn login_page(lang: Lang, title: &str, body: &str) -> String {
    format!(
        "{}<h1>{}</h1>{body}</body></html>",
        head(lang, title),
        esc(&lang.t("c_title", &[]))
    )
}

/// A table's start: its id and its header row, the columns' texts by key.
fn table(lang: Lang, id: &str, columns: &[&str]) -> String {
    let heads: String = columns
        .iter()
        .map(|k| format!("<th>{}</th>", esc(&lang.t(k, &[]))))
        .collect();
    format!("<table id=\"{id}\"><tr>{heads}</tr>")
}

/// A page's start, up to its `<body>`.
fn head(lang: Lang, title: &str) -> String {
    format!(
        "<!doctype html><html lang=\"{code}\"><head><meta charset=\"utf-8\"><title>{t}</title><style>{STYLE}</style></head><body>",
        code = lang.code(),
        t = esc(title)
    )
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
    /// Slides per page (at most [`crate::db::MAX_PAGE`]).
    limit: Option<u32>,
    /// Slides skipped: the page's start.
    offset: Option<u64>,
}

/// Slides on one page of the dashboard.
const DASHBOARD_SLIDES: u32 = 50;

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
    json(&w, move |w| {
        w.db.slides_page(f.clinic.as_deref(), f.limit.unwrap_or(100), f.offset.unwrap_or(0))
    })
    .await
}

/// Which slide: the three parts of its key.
#[derive(Deserialize, serde::Serialize)]
struct SlideKey {
    clinic: String,
    device: String,
    slide: String,
}

impl SlideKey {
    /// The slide page's address.
    fn href(clinic: &str, device: &str, slide: &str) -> String {
        let q =
            serde_urlencoded::to_string([("clinic", clinic), ("device", device), ("slide", slide)]).unwrap_or_default();
        format!("/slide?{q}")
    }
}

/// Which cell: its device, field and index.
#[derive(Deserialize, serde::Serialize)]
struct CellKey {
    clinic: String,
    device: String,
    field: String,
    index: u32,
}

impl CellKey {
    /// The picture's address.
    fn href(clinic: &str, device: &str, field: &str, index: u32) -> String {
        let key = CellKey {
            clinic: clinic.into(),
            device: device.into(),
            field: field.into(),
            index,
        };
        format!(
            "/cell-picture?{}",
            serde_urlencoded::to_string(&key).unwrap_or_default()
        )
    }
}

async fn cell_picture(State(w): State<Arc<Web>>, Query(k): Query<CellKey>) -> Response {
    match blocking(&w, move |w| w.db.cell_picture(&k.clinic, &k.device, &k.field, k.index)).await {
        Ok(Some(jpeg)) => ([(axum::http::header::CONTENT_TYPE, "image/jpeg")], jpeg).into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, "no picture of this cell was sent").into_response(),
        Err(e) => internal(e),
    }
}

async fn slide_json(State(w): State<Arc<Web>>, Query(k): Query<SlideKey>) -> Response {
    match blocking(&w, move |w| w.db.slide(&k.clinic, &k.device, &k.slide)).await {
        Ok(Some(d)) => axum::Json(d).into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, "no such slide").into_response(),
        Err(e) => internal(e),
    }
}

/// A slide's report for the patient record, as central holds the slide.
async fn report_doc(
    w: &Arc<Web>,
    user: &User,
    k: SlideKey,
    l: LangParam,
) -> Result<wbc_web::report::SlideReportDoc, Response> {
    let lang = match l.lang.as_deref().map(Lang::from_code) {
        None => w.lang(user),
        Some(Some(lang)) => lang,
        Some(None) => return Err((StatusCode::BAD_REQUEST, w.lang(user).t("unknown_language", &[])).into_response()),
    };
    let d = match blocking(w, move |w| w.db.slide(&k.clinic, &k.device, &k.slide)).await {
        Ok(Some(d)) => d,
        Ok(None) => return Err(no_slide(lang)),
        Err(e) => return Err(internal(e)),
    };
    let (model_versions, reviewed, changed, reviewers) =
        wbc_web::report::review_summary(d.cells.iter().map(|c| &c.cell));
    let s = d.slide;
    Ok(wbc_web::report::SlideReportDoc {
        slide_id: s.report.slide_id.clone(),
        clinic: s.clinic,
        device: s.device,
        started_at: s.started_at,
        finished_at: s.finished_at,
        made_at: crate::db::now(),
        report: s.report,
        model_versions,
        reviewed,
        changed,
        reviewers,
        // The ranges central's own flags use (it computes reports with the default settings).
        reference_ranges: wbc_protocol::slide::SlideSettings::default().reference_ranges,
        lang,
    })
}

/// The page for a slide central does not hold.
fn no_slide(lang: Lang) -> Response {
    let text = lang.t("no_such_slide", &[]);
    (
        StatusCode::NOT_FOUND,
        Html(format!("{}<p>{}</p></body></html>", head(lang, &text), esc(&text))),
    )
        .into_response()
}

async fn slide_report(
    State(w): State<Arc<Web>>,
    user: User,
    Query(k): Query<SlideKey>,
    Query(l): Query<LangParam>,
) -> Response {
    match report_doc(&w, &user, k, l).await {
        Ok(d) => Html(d.html()).into_response(),
        Err(r) => r,
    }
}

async fn slide_report_pdf(
    State(w): State<Arc<Web>>,
    user: User,
    Query(k): Query<SlideKey>,
    Query(l): Query<LangParam>,
) -> Response {
    match report_doc(&w, &user, k, l).await {
        Ok(d) => (
            [
                (axum::http::header::CONTENT_TYPE, "application/pdf".to_string()),
                (
                    axum::http::header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"{}\"", d.file_name()),
                ),
            ],
            d.pdf(),
        )
            .into_response(),
        Err(r) => r,
    }
}

async fn slide_page(State(w): State<Arc<Web>>, user: User, Query(k): Query<SlideKey>) -> Response {
    let lang = w.lang(&user);
    let d = match blocking(&w, move |w| w.db.slide(&k.clinic, &k.device, &k.slide)).await {
        Ok(Some(d)) => d,
        Ok(None) => return no_slide(lang),
        Err(e) => return internal(e),
    };
    let t = |k: &str| esc(&lang.t(k, &[]));
    let s = &d.slide;
    let heading = lang.t("slide_heading", &[("id", &s.report.slide_id)]);
    let mut b = format!(
        "{head}<p><a href=\"/\">{all}</a> · <a id=\"report\" href=\"/slide/report?{q}\">{print}</a> · \
         <a href=\"/slide/report.pdf?{q}\">PDF</a></p><h1>{h}</h1><p>{line}</p><ul id=\"flags\">",
        head = head(lang, &heading),
        all = t("c_all_slides"),
        print = t("report_print"),
        h = esc(&heading),
        q = esc(&SlideKey::href(&s.clinic, &s.device, &s.report.slide_id)["/slide?".len()..]),
        line = esc(&lang.t(
            "c_slide_line",
            &[
                ("clinic", &s.clinic),
                ("device", &s.device),
                ("when", &when(s.started_at)),
                ("state", &lang.term(s.state())),
                ("n", &s.report.classified),
                ("u", &s.report.unidentified),
                ("e", &s.report.edge_cut),
            ]
        )),
    );
    for f in &s.report.flags {
        let _ = write!(
            b,
            "<li class=\"{}\">{}</li>",
            if f.urgent() { "blast" } else { "flag" },
            esc(&lang.flag(f))
        );
    }
    b.push_str("</ul>");
    b.push_str(&table(lang, "differential", &["class_column", "count", "percent"]));
    for (class, c) in &s.report.per_class {
        let shown = class
            .parse::<CellClass>()
            .map_or_else(|_| class.clone(), |k| lang.class(k));
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{:.1}</td></tr>",
            esc(&shown),
            c.count,
            c.percent
        );
    }
    let _ = write!(b, "</table><h2>{}</h2>", t("c_cells_title"));
    b.push_str(&table(
        lang,
        "cells",
        &[
            "c_waiting",
            "c_field",
            "c_box",
            "c_picture",
            "c_model",
            "c_likeliest",
            "c_description",
            "c_technician",
        ],
    ));
    for c in &d.cells {
        let r = &c.cell.result;
        let likeliest: Vec<String> = r
            .likeliest()
            .iter()
            .take(3)
            .map(|(k, p)| format!("{} {p:.2}", lang.class(*k)))
            .collect();
        let bbox = r
            .bbox
            .map(|[x0, y0, x1, y1]| format!("{x0},{y0}–{x1},{y1}"))
            .unwrap_or_default();
        let review = match &c.cell.review {
            Some(v) => format!(
                "{} ({})",
                v.class.map_or_else(|| lang.t("reviewed_none", &[]), |k| lang.class(k)),
                v.by
            ),
            None => String::new(),
        };
        let _ = write!(
            b,
            "<tr class=\"{cls}\"><td>{waiting}</td><td>{field}</td><td>{bbox}</td><td>{picture}</td><td>{class}</td>\
             <td>{likeliest}</td><td>{desc}</td><td>{review}</td></tr>",
            picture = if c.picture {
                format!(
                    "<img src=\"{}\" alt=\"{}\" width=\"128\" height=\"128\">",
                    esc(&CellKey::href(&s.clinic, &s.device, &c.field_id, c.index)),
                    t("c_the_cell")
                )
            } else {
                String::new()
            },
            cls = match c.waiting {
                Some("blast") => "blast",
                Some("possible_blast") => "possible-blast",
                _ => "",
            },
            waiting = match c.waiting {
                Some("blast") => esc(&lang.class(CellClass::Blast)),
                Some("possible_blast") => t("c_possible_blast"),
                Some(other) => esc(&other.replace('_', " ")),
                None => String::new(),
            },
            field = esc(&c.field_name),
            class = esc(&r.class.map_or_else(|| lang.t("unidentified", &[]), |k| lang.class(k))),
            likeliest = esc(&likeliest.join(", ")),
            desc = esc(&lang.description(r)),
            review = esc(&review),
        );
    }
    b.push_str("</table></body></html>");
    Html(b).into_response()
}

async fn results(State(w): State<Arc<Web>>, Query(f): Query<Filter>) -> Response {
    json(&w, move |w| {
        w.db.results_over_time(f.clinic.as_deref(), f.days.unwrap_or(30).min(3650))
    })
    .await
}

async fn agreement(State(w): State<Arc<Web>>, Query(f): Query<Filter>) -> Response {
    json(&w, move |w| {
        w.db.agreement(
            f.clinic.as_deref(),
            f.days.unwrap_or(30).min(3650),
            &w.agreement,
            crate::db::now(),
        )
    })
    .await
}

/// The dashboard's table of the model against the reviews of the last 30 days.
fn agreement_html(b: &mut String, lang: Lang, rows: &[crate::db::Agreement], s: &crate::db::AgreementSettings) {
    let t = |k: &str| esc(&lang.t(k, &[]));
    let _ = write!(
        b,
        "<h2>{}</h2><p>{}</p>{}",
        t("c_agreement_title"),
        esc(&lang.t(
            "c_agreement_note",
            &[("pct", &format!("{:.0}", s.threshold * 100.0)), ("n", &s.min_reviews)]
        )),
        table(
            lang,
            "agreement",
            &[
                "c_clinic",
                "c_model",
                "c_reviewed",
                "c_confirmed",
                "c_changed_most",
                "c_set_aside_reviewed",
                "c_weeks"
            ]
        ),
    );
    let class = |name: &str| match name.parse::<CellClass>() {
        Ok(k) => lang.class(k),
        Err(_) if name == crate::db::NOT_A_WHITE_CELL => lang.t("not_a_cell", &[]),
        Err(_) if name == "Unidentified" => lang.t("unidentified", &[]),
        Err(_) => name.to_string(),
    };
    for a in rows {
        let changes: Vec<String> = a
            .changes
            .iter()
            .take(3)
            .map(|c| format!("{} → {} ×{}", class(&c.model), class(&c.review), c.count))
            .collect();
        let weeks: Vec<String> = a
            .weeks
            .iter()
            .map(|w| format!("{}: {}/{}", w.from, w.confirmed, w.reviewed))
            .collect();
        let _ = write!(
            b,
            "<tr class=\"{cls}\"><td><a href=\"/?clinic={c}\">{c}</a></td><td>{v}</td><td>{n}</td><td>{pct}</td>\
             <td>{ch}</td><td>{sa}</td><td>{wk}</td></tr>",
            cls = if a.low { "blast" } else { "" },
            c = esc(&a.clinic),
            v = a.model_version,
            n = a.reviewed,
            pct = a
                .agreement
                .map(|x| {
                    let low = if a.low {
                        format!(" {}", lang.t("c_low", &[]))
                    } else {
                        String::new()
                    };
                    esc(&format!("{:.0} %{low}", x * 100.0))
                })
                .unwrap_or_default(),
            ch = esc(&changes.join(", ")),
            sa = a.set_aside_reviewed,
            wk = esc(&weeks.join(", "))
        );
    }
    b.push_str("</table>");
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

use wbc_web::html_escape as esc;

/// The pages' style sheet.
const STYLE: &str = "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}\
    td,th{border:1px solid #bbb;padding:.25em .5em}tr.blast,li.blast{background:#fdd}\
    tr.possible-blast,li.flag{background:#ffe8cc}.offline{color:#a00}.online{color:#070}";

async fn dashboard(State(w): State<Arc<Web>>, user: User, Query(f): Query<Filter>) -> Response {
    let lang = w.lang(&user);
    let t = |k: &str| esc(&lang.t(k, &[]));
    let (clinic, offset) = (f.clinic.clone(), f.offset.unwrap_or(0));
    let fetched = blocking(&w, move |w| {
        let c = clinic.as_deref();
        let page = w.db.slides_page(c, DASHBOARD_SLIDES + 1, offset)?;
        let agreement = w.db.agreement(c, 30, &w.agreement, crate::db::now())?;
        Ok((w.db.devices()?, page, w.db.model_events(c, 20)?, agreement))
    });
    let (devices, mut slides, events, agreement) = match fetched.await {
        Ok(v) => v,
        Err(e) => return internal(e),
    };
    let more = slides.len() > DASHBOARD_SLIDES as usize;
    slides.truncate(DASHBOARD_SLIDES as usize);
    let mut b = format!(
        "{head}<h1>{title}</h1>{logout}<h2>{devices}</h2>{table}",
        head = head(lang, &lang.t("c_title", &[])),
        title = t("c_title"),
        logout = if !w.login.has_accounts() {
            String::new()
        } else {
            format!(
                "<form method=\"post\" action=\"/logout\"><button id=\"logout\">{}</button></form>",
                t("logout")
            )
        },
        devices = t("c_devices"),
        table = table(
            lang,
            "devices",
            &[
                "c_clinic",
                "c_device",
                "c_state",
                "c_backlog",
                "c_model",
                "c_last_heard"
            ]
        ),
    );
    for d in &devices {
        let _ = write!(
            b,
            "<tr><td><a href=\"/?clinic={c}\">{c}</a></td><td>{dev}</td><td class=\"{st}\">{shown}</td><td>{bl}</td>\
             <td>{m}</td><td>{seen}</td></tr>",
            c = esc(&d.clinic),
            dev = esc(&d.device),
            st = esc(&d.state),
            shown = esc(&lang.term(&d.state)),
            bl = d.backlog.map(|b| b.to_string()).unwrap_or_default(),
            m = d.model_version.map(|m| m.to_string()).unwrap_or_default(),
            seen = when(d.last_seen)
        );
    }
    let _ = write!(b, "</table><h2>{}</h2>", t("c_slides"));
    b.push_str(&table(
        lang,
        "slides",
        &[
            "c_clinic",
            "c_device",
            "c_slide",
            "c_started",
            "c_state",
            "c_cells",
            "c_differential",
            "c_flags",
        ],
    ));
    for s in &slides {
        let diff: Vec<String> = s
            .report
            .per_class
            .iter()
            .filter(|(_, c)| c.count > 0)
            .map(|(k, c)| {
                let shown = k.parse::<CellClass>().map_or_else(|_| k.clone(), |k| lang.class(k));
                format!("{shown} {:.0} %", c.percent)
            })
            .collect();
        let flags: Vec<String> = s.report.flags.iter().map(|f| esc(&lang.flag(f))).collect();
        let _ = write!(
            b,
            "<tr class=\"{cls}\"><td>{c}</td><td>{d}</td><td><a href=\"{href}\">{id}</a></td><td>{t}</td><td>{st}</td><td>{n}</td><td>{diff}</td><td>{flags}</td></tr>",
            href = esc(&SlideKey::href(&s.clinic, &s.device, &s.report.slide_id)),
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
            st = esc(&lang.term(s.state())),
            n = s.report.classified,
            diff = esc(&diff.join(", ")),
            flags = flags.join("<br>")
        );
    }
    b.push_str("</table>");
    if offset > 0 || more {
        let at = |o: u64| {
            let o = o.to_string();
            let q = match &f.clinic {
                Some(c) => serde_urlencoded::to_string([("clinic", c.as_str()), ("offset", &o)]),
                None => serde_urlencoded::to_string([("offset", &o)]),
            };
            esc(&format!("/?{}", q.unwrap_or_default()))
        };
        b.push_str("<p id=\"pages\">");
        if offset > 0 {
            let _ = write!(
                b,
                "<a href=\"{}\">{}</a> ",
                at(offset.saturating_sub(u64::from(DASHBOARD_SLIDES))),
                t("c_newer")
            );
        }
        if more {
            let _ = write!(
                b,
                "<a href=\"{}\">{}</a>",
                at(offset + u64::from(DASHBOARD_SLIDES)),
                t("c_older")
            );
        }
        b.push_str("</p>");
    }
    agreement_html(&mut b, lang, &agreement, &w.agreement);
    let _ = write!(b, "<h2>{}</h2>", t("c_updates"));
    b.push_str(&table(
        lang,
        "model-events",
        &[
            "c_clinic",
            "c_device",
            "c_when",
            "log_event",
            "log_version",
            "log_detail",
        ],
    ));
    for e in &events {
        let _ = write!(
            b,
            "<tr class=\"{cls}\"><td>{c}</td><td>{d}</td><td>{t}</td><td>{ev}</td><td>{v}</td><td>{detail}</td></tr>",
            cls = if e.event.is_problem() { "blast" } else { "" },
            c = esc(&e.clinic),
            d = esc(&e.device),
            t = when(e.at),
            ev = esc(&lang.term(e.event.as_str())),
            v = e.model_version,
            detail = esc(&e.detail)
        );
    }
    // The API's names are the API's: they stay in English.
    b.push_str("</table><p>JSON: <a href=\"/api/devices\">devices</a>, <a href=\"/api/slides\">slides</a>, <a href=\"/api/results\">results over time</a>, <a href=\"/api/model-events\">model events</a>, <a href=\"/api/agreement\">agreement with reviews</a>, <a href=\"/api/stats\">ingest</a>.</p></body></html>");
    Html(b).into_response()
}
