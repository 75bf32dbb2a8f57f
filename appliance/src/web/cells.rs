//! The cells one by one: a field's page (boxes, classes, probabilities, descriptions, and a
//! review for each cell) and the review list (the cells the model left for review or called
//! Blast), where a technician confirms or reclassifies them.

use super::{LoggedIn, Web, error_page, esc, load_field, page_in};
use axum::extract::{Form, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use std::fmt::Write as _;
use std::sync::Arc;
use wbc_protocol::classes::CellClass;
use wbc_protocol::slide::ReviewPriority;
use wbc_web::i18n::Lang;

/// The review choices. `chosen`: the reviewer's earlier answer (`Some(None)`: not a white cell);
/// with none, nothing is chosen and the form cannot be saved until a choice is made, so that a
/// hurried "save" never records an answer nobody gave.
fn class_options(lang: Lang, chosen: Option<Option<CellClass>>) -> String {
    let mut s = format!(
        "<option value=\"\" disabled{}>{}</option>",
        if chosen.is_none() { " selected" } else { "" },
        esc(&lang.t("choose_class", &[]))
    );
    for c in CellClass::ALL {
        let sel = if chosen == Some(Some(c)) { " selected" } else { "" };
        let _ = write!(
            s,
            "<option value=\"{}\"{sel}>{}</option>",
            c.name(),
            esc(&lang.class(c))
        );
    }
    let _ = write!(
        s,
        "<option value=\"none\"{}>{}</option>",
        if chosen == Some(None) { " selected" } else { "" },
        esc(&lang.t("group_not_cell", &[]))
    );
    s
}

pub(super) async fn field_page(
    State(w): State<Arc<Web>>,
    axum::Extension(LoggedIn(user)): axum::Extension<LoggedIn>,
    Path(id): Path<String>,
) -> Response {
    let f = match load_field(&w, &id) {
        Ok(f) => f,
        Err(s) => return error_page(&w, s, &user, "no_such_field", &[]),
    };
    let lang = w.lang(&user);
    let scale = if f.single_cell {
        String::new()
    } else {
        lang.t("um_per_px", &[("um", &f.microns_per_pixel)])
    };
    let mut body = format!(
        "<p>{}</p>",
        esc(&lang.t(
            "field_line",
            &[
                ("name", &f.name as &dyn std::fmt::Display),
                ("w", &f.width),
                ("h", &f.height),
                (
                    "kind",
                    &lang.t(if f.single_cell { "kind_cell" } else { "kind_field" }, &[])
                ),
                ("scale", &scale),
                ("source", &lang.term(&f.source)),
            ]
        ))
    );
    let _ = write!(
        body,
        "<svg id=\"boxes\" viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\"><image href=\"/field/{id}/image\" width=\"{w}\" height=\"{h}\"/>",
        w = f.width,
        h = f.height,
        id = esc(&f.id)
    );
    for (i, c) in f.cells.iter().enumerate() {
        if let Some([x0, y0, x1, y1]) = c.result.bbox {
            let colour = match c.result.class {
                Some(CellClass::Blast) => "#e00",
                Some(_) => "#0a0",
                None => "#f80",
            };
            let _ = write!(
                body,
                "<rect x=\"{x0}\" y=\"{y0}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"3\"/>\
                 <text x=\"{}\" y=\"{}\" fill=\"{colour}\" font-size=\"20\">{} {}</text>",
                x1.saturating_sub(x0),
                y1.saturating_sub(y0),
                x0 + 4,
                y0 + 20,
                i + 1,
                esc(&c
                    .result
                    .class
                    .map_or_else(|| lang.t("unidentified", &[]), |k| lang.class(k)))
            );
        }
    }
    body.push_str("</svg>");
    if f.cells.is_empty() {
        let _ = write!(body, "<p id=\"nocells\">{}</p>", esc(&lang.t("no_cells_found", &[])));
    }
    let _ = write!(
        body,
        "<table id=\"cells\"><tr><th>#</th><th>{}</th><th>{}</th><th>{}</th></tr>",
        esc(&lang.t("class_column", &[])),
        esc(&lang.t("details", &[])),
        esc(&lang.t("nav_review", &[]))
    );
    for (i, c) in f.cells.iter().enumerate() {
        let r = &c.result;
        let probs: Vec<String> = CellClass::ALL
            .iter()
            .filter_map(|k| {
                r.probabilities
                    .get(k.name())
                    .map(|p| format!("{} {:.3}", k.abbreviation(), p))
            })
            .collect();
        let reviewed = match &c.review {
            Some(rv) => format!(
                "<p>{} <b>{}</b></p>",
                esc(&lang.t("reviewed_by", &[("who", &rv.by)])),
                esc(&rv.class.map_or_else(|| lang.t("reviewed_none", &[]), |c| lang.class(c)))
            ),
            None => String::new(),
        };
        let _ = write!(
            body,
            "<tr class=\"cell\" id=\"cell-{n}\"><td>{n}<br><img class=\"cell-picture\" src=\"/field/{id}/cell/{i}/image\" alt=\"{alt}\" width=\"96\" height=\"96\" loading=\"lazy\"></td><td class=\"class\"><b>{class}</b><br>{confidence}</td>\
             <td><span class=\"probs\">{probs}</span><p class=\"description\">{desc}</p></td>\
             <td>{reviewed}<form method=\"post\" action=\"/field/{id}/cell/{i}/review\"><select name=\"class\" required>{opts}</select> \
             <button>{save}</button></form></td></tr>",
            n = i + 1,
            alt = esc(&lang.t("cell_alt", &[("k", &(i + 1)), ("name", &f.name)])),
            class = esc(&r.class.map_or_else(|| lang.t("unidentified", &[]), |k| lang.class(k))),
            confidence = esc(&lang.t("confidence", &[("c", &format!("{:.3}", r.confidence))])),
            save = esc(&lang.t("save", &[])),
            probs = esc(&probs.join("  ")),
            desc = esc(&lang.description(r)),
            id = esc(&f.id),
            opts = class_options(lang, c.review.as_ref().map(|v| v.class)),
        );
    }
    let _ = write!(
        body,
        "</table><p><a href=\"/\">{}</a></p>",
        esc(&lang.t("back_to_slide", &[]))
    );
    page_in(lang, &lang.t("field_title", &[]), Some(&user), &body).into_response()
}

#[derive(Deserialize)]
pub(super) struct ReviewForm {
    /// A class name, `none` (not a white cell / cannot tell), or empty: nothing chosen.
    #[serde(default)]
    class: String,
    /// Where to go afterwards: `review` (back to the review list), `gallery` (back to the
    /// cell in the slide's gallery), else the cell's field.
    #[serde(default)]
    next: Option<String>,
}

pub(super) async fn review(
    State(w): State<Arc<Web>>,
    axum::Extension(LoggedIn(user)): axum::Extension<LoggedIn>,
    Path((id, n)): Path<(String, usize)>,
    Form(f): Form<ReviewForm>,
) -> Response {
    if f.class.is_empty() {
        return error_page(&w, StatusCode::BAD_REQUEST, &user, "choose_first", &[]);
    }
    let class = if f.class == "none" {
        None
    } else {
        match f.class.parse::<CellClass>() {
            Ok(c) => Some(c),
            Err(_) => return error_page(&w, StatusCode::BAD_REQUEST, &user, "unknown_class", &[]),
        }
    };
    match w.app.review(&id, n, class, &user) {
        Ok(_) if f.next.as_deref() == Some("review") => Redirect::to("/review").into_response(),
        Ok(_) if f.next.as_deref() == Some("gallery") => Redirect::to(&format!("/gallery#g-{id}-{n}")).into_response(),
        Ok(_) => Redirect::to(&format!("/field/{id}#cell-{}", n + 1)).into_response(),
        Err(e) => error_page(
            &w,
            StatusCode::BAD_REQUEST,
            &user,
            "not_saved",
            &[("why", &format!("{e:#}"))],
        ),
    }
}

pub(super) async fn review_page(
    State(w): State<Arc<Web>>,
    axum::Extension(LoggedIn(user)): axum::Extension<LoggedIn>,
) -> Response {
    let slide = w.app.current_slide();
    let fields = w.app.store().fields_of_slide(&slide.id).unwrap_or_default();
    let lang = w.lang(&user);
    let mut body = format!("<p>{}</p><ul id=\"to-review\">", esc(&lang.t("review_intro", &[])));
    let queue = wbc_protocol::slide::review_queue(&fields);
    for &(priority, fi, ci) in &queue {
        let (f, c) = (&fields[fi], &fields[fi].cells[ci]);
        // One click for the model's two likeliest classes; the full list for anything else.
        let likeliest = c.result.likeliest();
        let action = format!("/field/{}/cell/{ci}/review", esc(&f.id));
        let mut quick = String::new();
        for (k, p) in likeliest.iter().take(2) {
            let _ = write!(
                quick,
                "<form method=\"post\" action=\"{action}\" class=\"quick\"><input type=\"hidden\" name=\"next\" value=\"review\">\
                 <button name=\"class\" value=\"{k}\">{shown} ({p:.2})</button></form> ",
                k = k.name(),
                shown = esc(&lang.class(*k))
            );
        }
        let _ = write!(
            body,
            "<li{cls} id=\"wait-{id}-{k}\"><img class=\"cell-picture\" src=\"/field/{id}/cell/{ci}/image\" alt=\"{alt}\" width=\"128\" height=\"128\" loading=\"lazy\"> \
             <a href=\"/field/{id}#cell-{k}\">{cell_of}</a>: {class}{possible} — {desc}<br>{quick}\
             <form method=\"post\" action=\"{action}\" class=\"quick\"><input type=\"hidden\" name=\"next\" value=\"review\">\
             <select name=\"class\" required>{opts}</select> <button>{save}</button></form></li>",
            cell_of = esc(&lang.t("cell_of", &[("name", &f.name), ("k", &(ci + 1))])),
            alt = esc(&lang.t("cell_alt", &[("k", &(ci + 1)), ("name", &f.name)])),
            save = esc(&lang.t("save", &[])),
            cls = match priority {
                ReviewPriority::Blast => " class=\"urgent\"",
                ReviewPriority::PossibleBlast => " class=\"flag\"",
                ReviewPriority::Other => "",
            },
            id = esc(&f.id),
            k = ci + 1,
            class = esc(&c
                .result
                .class
                .map_or_else(|| lang.t("unidentified", &[]), |k| lang.class(k))),
            possible = if priority == ReviewPriority::PossibleBlast {
                esc(&lang.t("possible_suffix", &[]))
            } else {
                String::new()
            },
            desc = esc(&lang.description(&c.result)),
            opts = class_options(lang, None),
        );
    }
    body.push_str("</ul>");
    if queue.is_empty() {
        let _ = write!(body, "<p>{}</p>", esc(&lang.t("nothing_waits", &[])));
    }
    page_in(lang, &lang.t("nav_review", &[]), Some(&user), &body).into_response()
}
