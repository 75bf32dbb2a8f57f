//! The local web UI, for the clinic's small screen: log in, upload a field or a cell image and
//! see its cells (boxes, classes, probabilities, descriptions), the current slide's
//! differential and flags, a review page to confirm or reclassify cells, the slide's gallery
//! (`gallery.rs`: every cell by class, moved with a click or a key), the slide report for the
//! patient record (`report.rs`: printable HTML and PDF), and the model in use.
//! Nothing is served without a login except `/health`.

use crate::app::{App, Ingested};
use crate::config::User;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Multipart, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use std::fmt::Write as _;
use std::sync::Arc;
use wbc_protocol::classes::CellClass;
use wbc_protocol::messages::FieldRecord;
use wbc_web::i18n::Lang;
use wbc_web::login::{LoggedIn, Login};

mod cells;
mod gallery;
mod report;

/// The web UI's state.
pub struct Web {
    app: Arc<App>,
    login: Arc<Login>,
    max_upload_bytes: usize,
    uplink: Option<Arc<crate::uplink::UplinkState>>,
}

impl Web {
    /// A web UI over an appliance, with its accounts, the clinic's language (each account may
    /// have its own) and, where configured, its uplink.
    pub fn new(
        app: Arc<App>,
        users: Vec<User>,
        language: Lang,
        max_upload_bytes: usize,
        uplink: Option<Arc<crate::uplink::UplinkState>>,
    ) -> Arc<Self> {
        Arc::new(Web {
            app,
            login: Login::required(users, |lang, title, body| page_in(lang, title, None, body).0, language),
            max_upload_bytes,
            uplink,
        })
    }

    /// The language of a user's pages.
    fn lang(&self, user: &str) -> Lang {
        self.login.language(Some(user))
    }

    /// The uplink in words: connected or not, the two backlogs (not yet at the broker; at the
    /// broker and not yet confirmed by central), messages set aside.
    fn uplink_text(&self, lang: Lang) -> String {
        let store = self.app.store();
        let waiting = lang.t(
            "uplink_waiting",
            &[("unsent", &store.unsent()), ("unconfirmed", &store.unconfirmed())],
        );
        let state = match &self.uplink {
            None => lang.t("uplink_none", &[("n", &store.backlog())]),
            Some(u) if u.connected() => lang.t("uplink_connected", &[("waiting", &waiting)]),
            Some(u) => lang.t(
                "uplink_disconnected",
                &[
                    (
                        "why",
                        &u.last_error().unwrap_or_else(|| lang.t("uplink_connecting", &[])),
                    ),
                    ("waiting", &waiting),
                ],
            ),
        };
        match store.quarantined() {
            0 => state,
            n => lang.t("uplink_quarantined", &[("state", &state), ("n", &n)]),
        }
    }
}

/// The slide page's script: several images are sent one after the other, with how far it has
/// got ("image 2 of 5"); one image is sent by the form itself, with a word that it is being
/// classified. And the page follows new fields (the inbox, the camera, another screen): every
/// 5 s it asks `/api/slide` and reloads when the slide changed, unless the technician is in a
/// form field.
const UPLOAD_JS: &str = include_str!("upload.js");

/// The router: `/health` and `/login` open, everything else behind the login.
pub fn router(web: Arc<Web>) -> Router {
    let private = Router::new()
        .route("/", get(index))
        .route("/upload", post(upload))
        .route("/capture", post(capture))
        .route("/field/{id}", get(cells::field_page))
        .route("/field/{id}/image", get(field_image))
        .route("/field/{id}/cell/{n}/review", post(cells::review))
        .route("/field/{id}/cell/{n}/image", get(cell_picture))
        .route("/review", get(cells::review_page))
        .route("/gallery", get(gallery::gallery))
        .route("/slide/report", get(report::html))
        .route("/slide/report.pdf", get(report::pdf))
        .route("/api/config-schema", get(config_schema))
        .route("/models", get(models_page))
        .route("/api/models", get(api_models))
        .route("/slide/finish", post(finish_slide))
        .route("/site/reset", post(reset_site))
        .route("/api/slide", get(api_slide))
        .route("/api/field/{id}", get(api_field));
    Router::new()
        .route("/health", get(health))
        .merge(web.login.routes())
        .merge(web.login.guard(private))
        .layer(DefaultBodyLimit::max(web.max_upload_bytes))
        .with_state(web)
}

/// Escapes text for HTML.
use wbc_web::html_escape as esc;

/// A page in `lang` (its navigation; the body is the caller's).
fn page_in(lang: Lang, title: &str, user: Option<&str>, body: &str) -> Html<String> {
    let t = |k: &str| esc(&lang.t(k, &[]));
    let nav = match user {
        Some(u) => format!(
            "<nav><a href=\"/\">{}</a> <a href=\"/gallery\">{}</a> <a href=\"/review\">{}</a> <span class=\"who\">{}</span> \
             <form method=\"post\" action=\"/logout\" class=\"inline\"><button>{}</button></form></nav>",
            t("nav_slide"),
            t("nav_gallery"),
            t("nav_review"),
            esc(u),
            t("logout")
        ),
        None => String::new(),
    };
    Html(format!(
        "<!doctype html><html lang=\"{code}\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{t} — {app}</title><style>{CSS}</style></head>\
         <body><header><h1>{t}</h1>{nav}</header><main>{body}</main></body></html>",
        t = esc(title),
        app = esc(&lang.t("app_title", &[])),
        code = lang.code()
    ))
}

const CSS: &str = "body{font-family:sans-serif;margin:0;font-size:16px}header{background:#234;color:#fff;padding:.4em .8em}\
header h1{font-size:1.2em;margin:.2em 0}nav a{color:#fff;margin-right:1em}.who{margin-right:.5em}\
main{padding:.8em;max-width:60em}table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ccc;padding:.3em;text-align:left;vertical-align:top}\
.urgent{background:#c00;color:#fff;padding:.5em;font-weight:bold}.flag{background:#fd0;padding:.4em;margin:.2em 0}\
.error{background:#fdd;padding:.5em}.inline{display:inline}svg{max-width:100%;height:auto}button{font-size:1em}\
.probs{font-size:.85em;color:#444}";

/// An error page for what went wrong inside the appliance (the cause as it was written).
fn internal_error(w: &Web, user: &str, why: &dyn std::fmt::Display) -> Response {
    error_page(
        w,
        StatusCode::INTERNAL_SERVER_ERROR,
        user,
        "internal_error",
        &[("why", why)],
    )
}

/// A page that says what was not done and why: the text `key` in the user's language, filled
/// from `args`.
fn error_page(w: &Web, status: StatusCode, user: &str, key: &str, args: &[(&str, &dyn std::fmt::Display)]) -> Response {
    let lang = w.lang(user);
    let message = lang.t(key, args);
    (
        status,
        page_in(
            lang,
            &lang.t("not_done", &[]),
            Some(user),
            &format!(
                "<p class=\"error\" id=\"error\">{}</p><p><a href=\"/\">{}</a></p>",
                esc(&message),
                esc(&lang.t("back", &[]))
            ),
        ),
    )
        .into_response()
}

async fn config_schema() -> Response {
    axum::Json(crate::config::schema()).into_response()
}

async fn health(State(w): State<Arc<Web>>) -> Response {
    axum::Json(serde_json::json!({
        "status": "ok",
        "model_version": w.app.model_version(),
        "backend": w.app.settings.backend,
        "uplink": {
            "configured": w.uplink.is_some(),
            "connected": w.uplink.as_ref().is_some_and(|u| u.connected()),
            "backlog": w.app.store().backlog(),
            "unsent": w.app.store().unsent(),
            "unconfirmed": w.app.store().unconfirmed(),
            "confirmed_since_start": w.uplink.as_ref().map_or(0, |u| u.confirmed()),
            "resent_since_start": w.uplink.as_ref().map_or(0, |u| u.resent()),
            "quarantined": w.app.store().quarantined(),
        },
        "adaptation": site_json(&w.app),
        "inbox_waiting": w.app.inbox_waiting().iter().map(|f| serde_json::json!({
            "file": f.name, "failures": f.failures, "reason": f.reason,
        })).collect::<Vec<_>>(),
    }))
    .into_response()
}

/// The current slide's flags, progress and differential, from its report (read once by the
/// caller).
fn differential_html(w: &Web, lang: Lang, report: &anyhow::Result<wbc_protocol::slide::SlideReport>) -> String {
    let r = match report {
        Ok(r) => r,
        Err(e) => return format!("<p class=\"error\">{}</p>", esc(&format!("{e:#}"))),
    };
    let mut s = String::new();
    for f in w.app.inbox_waiting() {
        let _ = write!(
            s,
            "<p class=\"flag\">{}</p>",
            esc(&lang.t(
                "inbox_waiting",
                &[("name", &f.name), ("tries", &f.failures), ("reason", &f.reason)]
            ))
        );
    }
    for f in &r.flags {
        let class = if f.urgent() { "urgent" } else { "flag" };
        let _ = write!(s, "<p class=\"{class}\">{}</p>", esc(&lang.flag(f)));
    }
    let complete = if r.complete {
        lang.t("target_reached", &[])
    } else {
        String::new()
    };
    let _ = write!(
        s,
        "<p id=\"progress\">{}</p>",
        esc(&lang.t(
            "progress_line",
            &[
                ("classified", &r.classified as &dyn std::fmt::Display),
                ("target", &w.app.settings.slide.target),
                ("complete", &complete),
                ("unidentified", &r.unidentified),
                ("edge_cut", &r.edge_cut),
                ("fields", &r.fields),
            ]
        ))
    );
    let _ = write!(
        s,
        "<table id=\"differential\"><tr><th>{}</th><th>{}</th><th>%</th></tr>",
        esc(&lang.t("class_column", &[])),
        esc(&lang.t("count", &[]))
    );
    for c in CellClass::ALL {
        let cc = &r.per_class[c.name()];
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{:.1}</td></tr>",
            esc(&lang.class(c)),
            cc.count,
            cc.percent
        );
    }
    s.push_str("</table>");
    s
}

async fn index(State(w): State<Arc<Web>>, axum::Extension(LoggedIn(user)): axum::Extension<LoggedIn>) -> Response {
    let lang = w.lang(&user);
    let slide = w.app.current_slide();
    let report = w.app.report();
    let probation = match w.app.models().map(|m| m.status()) {
        Some(crate::models::Status {
            probation: Some(p),
            probation_fields,
            ..
        }) => lang.t("probation_note", &[("ok", &p.fields_ok), ("needed", &probation_fields)]),
        _ => String::new(),
    };
    let mut body = format!(
        "<p id=\"model\">{} (<a href=\"/models\">{}</a>). <span id=\"site\">{}</span></p><p id=\"uplink\">{}</p><h2>{}</h2><p id=\"report-links\"><a href=\"/gallery\">{}</a> · <a href=\"/slide/report\">{}</a> · <a href=\"/slide/report.pdf\">PDF</a></p>{}",
        esc(&lang.t(
            "model_line",
            &[
                ("version", &w.app.model_version()),
                ("backend", &w.app.settings.backend),
                ("probation", &probation),
            ]
        )),
        esc(&lang.t("models_link", &[])),
        esc(&site_text(&w.app, lang)),
        esc(&w.uplink_text(lang)),
        esc(&lang.t("slide_heading", &[("id", &slide.id)])),
        esc(&lang.t("nav_gallery", &[])),
        esc(&lang.t("report_print", &[])),
        differential_html(&w, lang, &report)
    );
    let camera = match w.app.camera() {
        Some(c) => format!(
            "<form method=\"post\" action=\"/capture\"><p><button id=\"capture\">{}</button> {}</p></form>",
            esc(&lang.t("capture", &[])),
            esc(&lang.t("capture_from", &[("camera", &c)]))
        ),
        None => String::new(),
    };
    // What the script compares with `/api/slide` to see that the slide changed.
    let state = match &report {
        Ok(r) => esc(&format!(
            "{}/{}/{}/{}/{}",
            r.slide_id,
            r.fields,
            r.classified,
            r.unidentified,
            r.flags.len()
        )),
        Err(_) => String::new(),
    };
    let t = |k: &str| esc(&lang.t(k, &[]));
    let _ = write!(
        body,
        "<h2>{add}</h2><form method=\"post\" action=\"/upload\" enctype=\"multipart/form-data\">\
         <p><input type=\"file\" name=\"image\" id=\"image\" accept=\"image/*\" multiple></p>\
         <p><label><input type=\"checkbox\" name=\"single_cell\" id=\"single_cell\"> {one}</label></p>\
         <p><button id=\"upload\">{classify}</button> <span id=\"upload-progress\" aria-live=\"polite\"></span></p></form>\
         <span id=\"slide-state\" hidden>{state}</span><script>var T={texts};{UPLOAD_JS}</script>\
         {camera}<form method=\"post\" action=\"/slide/finish\"><p><button id=\"finish\">{finish}</button></p></form>",
        add = t("add_image"),
        one = t("one_cell"),
        classify = t("classify"),
        finish = t("finish"),
        texts = script_texts(lang),
    );
    if let Ok(fields) = w.app.store().fields_of_slide(&slide.id) {
        let _ = write!(body, "<h2>{}</h2><ul>", t("fields_of_slide"));
        for f in fields.iter().rev().take(50) {
            let _ = write!(
                body,
                "<li><a href=\"/field/{id}\">{name}</a> — {n}</li>",
                id = esc(&f.id),
                name = esc(&f.name),
                n = esc(&lang.t("n_cells", &[("n", &f.cells.len())]))
            );
        }
        body.push_str("</ul>");
    }
    page_in(lang, &lang.t("app_title", &[]), Some(&user), &body).into_response()
}

/// The texts of the upload script in the user's language, as a JavaScript object (`T`); the
/// script fills in `{name}`-style placeholders itself.
fn script_texts(lang: Lang) -> String {
    let texts: serde_json::Map<String, serde_json::Value> = [
        "js_classifying_one",
        "js_classifying",
        "js_done",
        "js_done_failed",
        "js_no_answer",
    ]
    .into_iter()
    .map(|k| (k.to_string(), lang.t(k, &[]).into()))
    .collect();
    // Inside <script>, "</" could end the element: JSON allows it written as "<\/".
    serde_json::Value::Object(texts).to_string().replace("</", "<\\/")
}

/// The models page: the active model, its fallback, the trusted keys and the model log (every
/// update found, verified, refused, activated or rolled back, with the reason).
async fn models_page(
    State(w): State<Arc<Web>>,
    axum::Extension(LoggedIn(user)): axum::Extension<LoggedIn>,
) -> Response {
    let lang = w.lang(&user);
    let t = |k: &str| esc(&lang.t(k, &[]));
    let mut body = String::new();
    if let Some(m) = w.app.models() {
        // The status in detail (versions, hashes, files) is for maintenance: it stays as the
        // model manager writes it, in English.
        let _ = write!(
            body,
            "<h2>{}</h2><pre id=\"model-status\" lang=\"en\">{}</pre>",
            t("model_status"),
            esc(&crate::models::describe(&m.status()))
        );
        let withdrawn = m.withdrawn();
        if !withdrawn.is_empty() {
            let _ = write!(body, "<h2>{}</h2><ul id=\"withdrawn\">", t("withdrawn_title"));
            for (sha, x) in withdrawn {
                let _ = write!(
                    body,
                    "<li>{}</li>",
                    esc(&lang.t(
                        "withdrawn_line",
                        &[
                            ("version", &x.model_version),
                            ("sha", &&sha[..sha.len().min(12)]),
                            ("when", &utc(x.at)),
                            ("reason", &x.reason),
                        ]
                    ))
                );
            }
            body.push_str("</ul>");
        }
    }
    let _ = write!(
        body,
        "<h2>{}</h2><p id=\"site-status\">{}</p><p>{}</p>\
         <form method=\"post\" action=\"/site/reset\"><p><button id=\"site-reset\">{}</button></p></form>",
        t("site_title"),
        esc(&site_text(&w.app, lang)),
        t("site_explain"),
        t("site_reset"),
    );
    let _ = write!(
        body,
        "<h2>{}</h2><table id=\"model-log\"><tr><th>{}</th><th>{}</th><th>{}</th><th>{}</th></tr>",
        t("model_log"),
        t("log_when"),
        t("log_event"),
        t("log_version"),
        t("log_detail")
    );
    for e in w.app.store().model_log(100).unwrap_or_default() {
        let _ = write!(
            body,
            "<tr class=\"{cls}\"><td>{t}</td><td>{ev}</td><td>{v}</td><td>{d}</td></tr>",
            cls = e.message.event,
            t = utc(e.at),
            ev = esc(&lang.term(e.message.event.as_str())),
            v = e.message.model_version,
            d = esc(&e.message.detail)
        );
    }
    let _ = write!(body, "</table><p>{}</p>", t("updates_explain"));
    page_in(lang, &lang.t("models_title", &[]), Some(&user), &body).into_response()
}

async fn api_models(State(w): State<Arc<Web>>) -> Response {
    axum::Json(serde_json::json!({
        "status": w.app.models().map(|m| m.status()),
        "log": w.app.store().model_log(100).unwrap_or_default(),
        "adaptation": site_json(&w.app),
    }))
    .into_response()
}

async fn upload(
    State(w): State<Arc<Web>>,
    axum::Extension(LoggedIn(user)): axum::Extension<LoggedIn>,
    mut multipart: Multipart,
) -> Response {
    let (mut bytes, mut name, mut single) = (None, String::from("upload"), false);
    loop {
        match multipart.next_field().await {
            Ok(Some(f)) => match f.name() {
                Some("image") => {
                    if let Some(n) = f.file_name() {
                        name = n.to_string();
                    }
                    match f.bytes().await {
                        Ok(b) => bytes = Some(b),
                        Err(e) => {
                            return error_page(&w, e.status(), &user, "upload_failed", &[("why", &e.body_text())]);
                        }
                    }
                }
                Some("single_cell") => single = true,
                _ => {}
            },
            Ok(None) => break,
            Err(e) => return error_page(&w, e.status(), &user, "upload_failed", &[("why", &e.body_text())]),
        }
    }
    let Some(bytes) = bytes.filter(|b| !b.is_empty()) else {
        return error_page(&w, StatusCode::BAD_REQUEST, &user, "no_image", &[]);
    };
    let app = w.app.clone();
    let shown = name.clone();
    let r = tokio::task::spawn_blocking(move || app.ingest(&bytes, &name, "upload", single)).await;
    match r {
        Ok(Ok(Ingested::New(f) | Ingested::Duplicate(f))) => Redirect::to(&format!("/field/{}", f.id)).into_response(),
        Ok(Err(e)) => error_page(
            &w,
            StatusCode::BAD_REQUEST,
            &user,
            "not_classified",
            &[("name", &shown), ("why", &format!("{e:#}"))],
        ),
        Err(e) => internal_error(&w, &user, &e),
    }
}

async fn capture(State(w): State<Arc<Web>>, axum::Extension(LoggedIn(user)): axum::Extension<LoggedIn>) -> Response {
    let app = w.app.clone();
    match tokio::task::spawn_blocking(move || app.capture()).await {
        Ok(Ok(Ingested::New(f) | Ingested::Duplicate(f))) => Redirect::to(&format!("/field/{}", f.id)).into_response(),
        Ok(Err(e)) => error_page(
            &w,
            StatusCode::BAD_REQUEST,
            &user,
            "capture_failed",
            &[("why", &format!("{e:#}"))],
        ),
        Err(e) => internal_error(&w, &user, &e),
    }
}

fn load_field(w: &Web, id: &str) -> Result<FieldRecord, StatusCode> {
    match w.app.store().field(id) {
        Ok(Some(f)) => Ok(f),
        Ok(None) | Err(_) => Err(StatusCode::NOT_FOUND),
    }
}

async fn field_image(State(w): State<Arc<Web>>, Path(id): Path<String>) -> Response {
    match w.app.store().image(&id) {
        Ok(Some(bytes)) => {
            let mime = image::guess_format(&bytes)
                .map(|f| f.to_mime_type())
                .unwrap_or("application/octet-stream");
            ([(header::CONTENT_TYPE, mime)], bytes).into_response()
        }
        _ => (StatusCode::NOT_FOUND, "original image not kept").into_response(),
    }
}

async fn cell_picture(State(w): State<Arc<Web>>, Path((id, n)): Path<(String, usize)>) -> Response {
    if let Err(status) = load_field(&w, &id) {
        return (status, "no such field").into_response();
    }
    // Decoding a field image is seconds of CPU on a small box: off the async workers.
    let app = w.app.clone();
    let field = id.clone();
    match tokio::task::spawn_blocking(move || app.cell_picture(&field, n)).await {
        Ok(Ok(Some(jpeg))) => ([(header::CONTENT_TYPE, "image/jpeg")], jpeg).into_response(),
        Ok(Ok(None)) => (StatusCode::NOT_FOUND, "no such cell, or its field's image is not kept").into_response(),
        Ok(Err(e)) => {
            tracing::error!(error = %format!("{e:#}"), field = %id, "cell picture");
            (StatusCode::INTERNAL_SERVER_ERROR, "the field's image could not be read").into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, field = %id, "cell picture task");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the cell's picture could not be made",
            )
                .into_response()
        }
    }
}

async fn finish_slide(
    State(w): State<Arc<Web>>,
    axum::Extension(LoggedIn(user)): axum::Extension<LoggedIn>,
) -> Response {
    match w.app.finish_slide() {
        Ok(r) => {
            tracing::info!(slide = %r.slide_id, by = %user, classified = r.classified, flags = r.flags.len(), "slide finished");
            Redirect::to("/").into_response()
        }
        Err(e) => internal_error(&w, &user, &format!("{e:#}")),
    }
}

/// Forgets the site adaptation of the model in use.
async fn reset_site(State(w): State<Arc<Web>>, axum::Extension(LoggedIn(user)): axum::Extension<LoggedIn>) -> Response {
    let app = w.app.clone();
    let by = user.clone();
    match tokio::task::spawn_blocking(move || app.reset_site(&by)).await {
        Ok(Ok(())) => {
            tracing::info!(by = %user, "site adaptation reset");
            Redirect::to("/models").into_response()
        }
        Ok(Err(e)) => internal_error(&w, &user, &format!("{e:#}")),
        Err(e) => internal_error(&w, &user, &e),
    }
}

/// A time, seconds since the Unix epoch, as RFC 3339 UTC.
fn utc(at: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(at as i64)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

/// Where the adaptation to the site stands, as `/health` and `/api/models` give it.
fn site_json(app: &App) -> serde_json::Value {
    match app.site_status() {
        Ok(s) => serde_json::to_value(s).unwrap_or_default(),
        Err(e) => serde_json::json!({"state": "error", "error": format!("{e:#}")}),
    }
}

/// Where the adaptation to the site stands, in words.
fn site_text(app: &App, lang: Lang) -> String {
    use crate::site::SiteStatus;
    match app.site_status() {
        Ok(SiteStatus::Off) => lang.t("site_off", &[]),
        Ok(SiteStatus::Unavailable) => lang.t("site_unavailable", &[]),
        Ok(SiteStatus::Taught { clinic }) => lang.t("site_taught", &[("clinic", &clinic)]),
        Ok(SiteStatus::Collecting { seen, needed }) => {
            lang.t("site_collecting", &[("seen", &seen), ("needed", &needed)])
        }
        Ok(SiteStatus::Adapted {
            cells, fitted_at, seen, ..
        }) => lang.t(
            "site_adapted",
            &[("cells", &cells), ("seen", &seen), ("when", &utc(fitted_at))],
        ),
        Err(e) => lang.t("site_error", &[("error", &format!("{e:#}"))]),
    }
}

async fn api_slide(State(w): State<Arc<Web>>) -> Response {
    match w.app.report() {
        Ok(r) => axum::Json(r).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")).into_response(),
    }
}

async fn api_field(State(w): State<Arc<Web>>, Path(id): Path<String>) -> Response {
    match load_field(&w, &id) {
        Ok(f) => axum::Json(f).into_response(),
        Err(s) => (s, "no such field").into_response(),
    }
}
