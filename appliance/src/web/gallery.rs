//! The slide's gallery: every cell of the current slide as a picture, grouped by the class it
//! counts as (blasts, possible blasts and the cells set aside first), so that a technician
//! checks a whole slide by eye and moves a wrong cell to its class with one click, or with a
//! key on the focused cell (`b` Basophil, `e` Eosinophil, `l` Lymphocyte, `m` Monocyte, `n`
//! Neutrophil, `x` Blast, `0` not a white cell). A move is a review, as on the field page: the
//! differential follows it.

use super::{LoggedIn, Web, esc, page};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use std::fmt::Write;
use std::sync::Arc;
use wbc_protocol::classes::CellClass;
use wbc_protocol::messages::{CellRecord, ReviewReason};

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

    fn title(self) -> &'static str {
        match self {
            Group::Blast => "Blast",
            Group::PossibleBlast => "Possible blasts (set aside, Blast most probable)",
            Group::SetAside => "Unidentified (set aside for review)",
            Group::Class(i) => SHOWN[i].name(),
            Group::NotAWhiteCell => "Not a white cell / cannot tell",
            Group::EdgeCut => "Cut by the field's edge (not counted)",
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

/// The one-click moves: value, button text, key.
const MOVES: [(&str, &str, &str); 7] = [
    ("Neutrophil", "Neutrophil", "n"),
    ("Lymphocyte", "Lymphocyte", "l"),
    ("Monocyte", "Monocyte", "m"),
    ("Eosinophil", "Eosinophil", "e"),
    ("Basophil", "Basophil", "b"),
    ("Blast", "Blast", "x"),
    ("none", "Not a cell", "0"),
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
            return super::error_page(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                Some(&user),
                &format!("{e:#}"),
            );
        }
    };
    let mut cells: Vec<(Group, usize, usize)> = Vec::new();
    for (fi, f) in fields.iter().enumerate() {
        for (ci, c) in f.cells.iter().enumerate() {
            cells.push((Group::of(c), fi, ci));
        }
    }
    cells.sort();
    let mut body = format!(
        "<style>{GALLERY_CSS}</style>{}<p>Every cell of slide {} by what it counts as. Move a wrong cell with its \
         button, or focus it (Tab or a click on its picture) and press a key: <kbd>n</kbd> Neutrophil, <kbd>l</kbd> \
         Lymphocyte, <kbd>m</kbd> Monocyte, <kbd>e</kbd> Eosinophil, <kbd>b</kbd> Basophil, <kbd>x</kbd> Blast, \
         <kbd>0</kbd> not a white cell. Reviewed cells have a green frame.</p>",
        super::differential_html(&w),
        esc(&slide.id)
    );
    let mut current = None;
    for &(g, fi, ci) in &cells {
        if current != Some(g) {
            if current.is_some() {
                body.push_str("</div>");
            }
            let n = cells.iter().filter(|c| c.0 == g).count();
            let _ = write!(body, "<h2>{} ({n})</h2><div class=\"gallery\">", esc(g.title()));
            current = Some(g);
        }
        let (f, c) = (&fields[fi], &fields[fi].cells[ci]);
        let id = esc(&f.id);
        let anchor = format!("g-{id}-{ci}");
        let mut buttons = String::new();
        for (value, text, key) in MOVES {
            let _ = write!(
                buttons,
                "<button name=\"class\" value=\"{value}\" data-key=\"{key}\" title=\"{text} (key {key})\">{text}</button>"
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
             alt=\"cell {k} of {name}\" width=\"136\" height=\"136\" loading=\"lazy\"><figcaption><a href=\"/field/{id}#cell-{k}\">\
             {name} {k}</a>: model {model}{rev}</figcaption><form method=\"post\" action=\"/field/{id}/cell/{ci}/review\">\
             <input type=\"hidden\" name=\"next\" value=\"gallery\">{buttons}</form></figure>",
            k = ci + 1,
            name = esc(&f.name),
            model = esc(c.result.class_name()),
            rev = match &c.review {
                Some(r) => format!(", reviewed: {}", esc(r.class.map_or("not a white cell", |k| k.name()))),
                None => String::new(),
            },
        );
    }
    if current.is_some() {
        body.push_str("</div>");
    } else {
        body.push_str("<p>No cells on this slide yet.</p>");
    }
    let _ = write!(body, "<script>{GALLERY_JS}</script>");
    page("Gallery", Some(&user), &body).into_response()
}
