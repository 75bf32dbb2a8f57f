//! The slide report for the patient record (`wbc_web::report`), of the current slide or of one
//! named by `?slide=ID`: `/slide/report` as a printable page, `/slide/report.pdf` as a PDF;
//! in `[web] language`, or `?lang=en|fr|pt`.

use super::{LoggedIn, Web, error_page, internal_error};
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;
use std::sync::Arc;
use wbc_web::i18n::Lang;
use wbc_web::report::{SlideReportDoc, fields_summary};

/// Which slide: the current one without `slide`.
#[derive(Deserialize)]
pub(super) struct Which {
    slide: Option<String>,
    /// `en`, `fr` or `pt`; the configured language otherwise.
    lang: Option<String>,
}

fn doc(w: &Web, slide: Option<String>, lang: Lang) -> anyhow::Result<Option<SlideReportDoc>> {
    let store = w.app.store();
    let state = match slide {
        None => w.app.current_slide(),
        Some(id) => match store.slides()?.into_iter().find(|s| s.id == id) {
            Some(s) => s,
            None => return Ok(None),
        },
    };
    let fields = store.fields_of_slide(&state.id)?;
    let report = wbc_protocol::slide::report(&state.id, &fields, &w.app.settings.slide, state.finished_at.is_some());
    let (model_versions, reviewed, changed, reviewers) = fields_summary(&fields);
    let id = store.identity();
    Ok(Some(SlideReportDoc {
        clinic: id.clinic.clone(),
        device: id.device.clone(),
        slide_id: state.id,
        started_at: state.started_at,
        finished_at: state.finished_at,
        made_at: crate::app::now(),
        report,
        model_versions,
        reviewed,
        changed,
        reviewers,
        reference_ranges: w.app.settings.slide.reference_ranges.clone(),
        lang,
    }))
}

async fn made(w: Arc<Web>, user: &str, q: Which) -> Result<SlideReportDoc, Response> {
    let lang = match q.lang.as_deref().map(Lang::from_code) {
        None => w.lang(user),
        Some(Some(l)) => l,
        Some(None) => return Err(error_page(&w, StatusCode::BAD_REQUEST, user, "unknown_language", &[])),
    };
    let web = w.clone();
    match tokio::task::spawn_blocking(move || doc(&web, q.slide, lang)).await {
        Ok(Ok(Some(d))) => Ok(d),
        Ok(Ok(None)) => Err(error_page(&w, StatusCode::NOT_FOUND, user, "no_such_slide", &[])),
        Ok(Err(e)) => Err(internal_error(&w, user, &format!("{e:#}"))),
        Err(e) => Err(internal_error(&w, user, &e)),
    }
}

/// `GET /slide/report`.
pub(super) async fn html(
    State(w): State<Arc<Web>>,
    axum::Extension(LoggedIn(user)): axum::Extension<LoggedIn>,
    Query(q): Query<Which>,
) -> Response {
    match made(w, &user, q).await {
        Ok(d) => Html(d.html()).into_response(),
        Err(r) => r,
    }
}

/// `GET /slide/report.pdf`.
pub(super) async fn pdf(
    State(w): State<Arc<Web>>,
    axum::Extension(LoggedIn(user)): axum::Extension<LoggedIn>,
    Query(q): Query<Which>,
) -> Response {
    match made(w, &user, q).await {
        Ok(d) => (
            [
                (header::CONTENT_TYPE, "application/pdf".to_string()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"{}\"", d.file_name()),
                ),
            ],
            d.pdf(),
        )
            .into_response(),
        Err(r) => r,
    }
}
