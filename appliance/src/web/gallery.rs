//! The slide's gallery: every cell of the current slide as a picture, grouped by the class it
//! counts as (blasts, possible blasts and the cells set aside first), so that a technician
//! checks a whole slide by eye and moves a wrong cell to its class with one click, or with a
//! key on the focused cell (`b` Basophil, `e` Eosinophil, `l` Lymphocyte, `m` Monocyte, `n`
//! Neutrophil, `x` Blast, `0` not a white cell). A move is a review, as on the field page: the
//! differential follows it.

use super::{LoggedIn, Web, esc, page_in};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use std::fmt::Write;
use std::sync::Arc;
use wbc_protocol::classes::CellClass;
use wbc_protocol::messages::{CellRecord, ReviewReason};
use wbc_web::i18n::Lang;

/// The groups, in the order shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Group {
    Blast,
    PossibleBlast,
    SetAside,
    Class(usize),
    NotAWhiteCell,
    EdgeCut,
}

impl Group {
    fn of(c: &CellRecord) -> Group {
        match &c.review {
            Some(r) => match r.class {
                Some(CellClass::Blast) => Group::Blast,
                Some(k) => Group::Class(order(k)),
                None => Group::NotAWhiteCell,
            },
            None => match c.result.class {
                Some(CellClass::Blast) => Group::Blast,
                Some(k) => Group::Class(order(k)),
                None if c.result.review_reason == Some(ReviewReason::EdgeCut) => Group::EdgeCut,
                None if c.result.possible_blast() => Group::PossibleBlast,
                None => Group::SetAside,
            },
        }
    }

    fn title(self, lang: Lang) -> String {
        match self {
            Group::Blast => lang.class(CellClass::Blast),
            Group::PossibleBlast => lang.t("group_possible", &[]),
            Group::SetAside => lang.t("group_set_aside", &[]),
            Group::Class(i) => lang.class(SHOWN[i]),
            Group::NotAWhiteCell => lang.t("group_not_cell", &[]),
            Group::EdgeCut => lang.t("group_edge_cut", &[]),
        }
    }
}

/// The classes after Blast, in the order a differential is read.
const SHOWN: [CellClass; 5] = [
    CellClass::Neutrophil,
    CellClass::Lymphocyte,
    CellClass::Monocyte,
    CellClass::Eosinophil,
    CellClass::Basophil,
];

fn order(k: CellClass) -> usize {
    SHOWN.iter().position(|&c| c == k).unwrap_or(0)
}

/// The one-click moves: class (none: not a white cell) and key.
const MOVES: [(Option<CellClass>, &str); 7] = [
    (Some(CellClass::Neutrophil), "n"),
    (Some(CellClass::Lymphocyte), "l"),
    (Some(CellClass::Monocyte), "m"),
    (Some(CellClass::Eosinophil), "e"),
    (Some(CellClass::Basophil), "b"),
    (Some(CellClass::Blast), "x"),
    (None, "0"),
];

const GALLERY_CSS: &str = ".gallery{display:flex;flex-wrap:wrap;gap:.4em}.gallery figure{margin:0;width:140px;\
border:2px solid #ccc;padding:2px}.gallery figure:focus{outline:3px solid #06c}.gallery figcaption{font-size:.75em}\
.gallery form{display:flex;flex-wrap:wrap;gap:1px}.gallery button{font-size:.7em;padding:1px 3px}.gallery figure.reviewed{border-color:#393}\
.gallery figure.g-urgent{border-color:#c00}";

/// Keys on a focused cell submit its form with that class.
const GALLERY_JS: &str = "document.addEventListener('keydown',function(e){var f=document.activeElement;\
if(!f||!f.classList||!f.classList.contains('cell')||e.ctrlKey||e.metaKey||e.altKey)return;\
var b=f.querySelector('button[data-key=\"'+e.key.toLowerCase()+'\"]');if(b){e.preventDefault();b.click();}});";

/// `GET /gallery`: the current slide's cells by group.
pub(super) async fn gallery(
    State(w): State<Arc<Web>>,
    axum::Extension(LoggedIn(user)): axum::Extension<LoggedIn>,
) -> Response {
    let slide = w.app.current_slide();
    let fields = match w.app.store().fields_of_slide(&slide.id) {
        Ok(f) => f,
        Err(e) => {
            return super::internal_error(&w, &user, &format!("{e:#}"));
        }
    };
    let mut cells: Vec<(Group, usize, usize)> = Vec::new();
    for (fi, f) in fields.iter().enumerate() {
        for (ci, c) in f.cells.iter().enumerate() {
            cells.push((Group::of(c), fi, ci));
        }
    }
    cells.sort();
    let lang = w.lang(&user);
    let mut body = format!(
        "<style>{GALLERY_CSS}</style>{}<p>{}</p>",
        super::differential_html(
            &w,
            lang,
            // From the fields already read, as `App::report_of` would read them again.
            &Ok(wbc_protocol::slide::report(
                &slide.id,
                &fields,
                &w.app.settings.slide,
                slide.finished_at.is_some()
            ))
        ),
        esc(&lang.t("gallery_intro", &[("id", &slide.id)]))
    );
    let mut current = None;
    for &(g, fi, ci) in &cells {
        if current != Some(g) {
            if current.is_some() {
                body.push_str("</div>");
            }
            let n = cells.iter().filter(|c| c.0 == g).count();
            let _ = write!(body, "<h2>{} ({n})</h2><div class=\"gallery\">", esc(&g.title(lang)));
            current = Some(g);
        }
        let (f, c) = (&fields[fi], &fields[fi].cells[ci]);
        let id = esc(&f.id);
        let anchor = format!("g-{id}-{ci}");
        let mut buttons = String::new();
        for (class, key) in MOVES {
            let (value, text) = match class {
                Some(c) => (c.name(), lang.class(c)),
                None => ("none", lang.t("not_a_cell", &[])),
            };
            let hint = esc(&lang.t("key_hint", &[("class", &text), ("key", &key)]));
            let text = esc(&text);
            let _ = write!(
                buttons,
                "<button name=\"class\" value=\"{value}\" data-key=\"{key}\" title=\"{hint}\">{text}</button>"
            );
        }
        let frame = match (&c.review, g) {
            (Some(_), _) => " reviewed",
            (None, Group::Blast | Group::PossibleBlast) => " g-urgent",
            _ => "",
        };
        let _ = write!(
            body,
            "<figure class=\"cell{frame}\" id=\"{anchor}\" tabindex=\"0\"><img src=\"/field/{id}/cell/{ci}/image\" \
             alt=\"{alt}\" width=\"136\" height=\"136\" loading=\"lazy\"><figcaption><a href=\"/field/{id}#cell-{k}\">\
             {name} {k}</a>: {model}{rev}</figcaption><form method=\"post\" action=\"/field/{id}/cell/{ci}/review\">\
             <input type=\"hidden\" name=\"next\" value=\"gallery\">{buttons}</form></figure>",
            k = ci + 1,
            name = esc(&f.name),
            alt = esc(&lang.t("cell_alt", &[("k", &(ci + 1)), ("name", &f.name)])),
            model = esc(&lang.t("model_said", &[("class", &class_name(lang, c.result.class))])),
            rev = match &c.review {
                Some(r) => format!(
                    ", {}",
                    esc(&lang.t("reviewed_as", &[("class", &review_name(lang, r.class))]))
                ),
                None => String::new(),
            },
        );
    }
    if current.is_some() {
        body.push_str("</div>");
    } else {
        let _ = write!(body, "<p>{}</p>", esc(&lang.t("no_cells", &[])));
    }
    let _ = write!(body, "<script>{GALLERY_JS}</script>");
    page_in(lang, &lang.t("gallery_title", &[]), Some(&user), &body).into_response()
}

/// The model's class in words (`Unidentified` for none).
fn class_name(lang: Lang, c: Option<CellClass>) -> String {
    c.map_or_else(|| lang.t("unidentified", &[]), |c| lang.class(c))
}

/// A reviewer's class in words (not a white cell for none).
fn review_name(lang: Lang, c: Option<CellClass>) -> String {
    c.map_or_else(|| lang.t("not_a_cell", &[]), |c| lang.class(c))
}
