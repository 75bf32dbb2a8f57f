//! The slide report for the patient record: one page with the clinic, device, slide, dates,
//! the differential against reference ranges, the flags in words, what the technicians
//! reviewed, the model version, and the line that it is a pre-classification for a qualified
//! person to confirm. As HTML with print styles (the browser prints it) and as a PDF made here,
//! without a browser (a clinic's box has none to spare). The appliance and central serve the
//! same report.

use crate::html_escape as esc;
use crate::i18n::Lang;
use crate::utc_minute as when;
use pdf_writer::{Content, Finish, Name, Pdf, Rect, Ref, Str};
use std::collections::BTreeMap;
use std::fmt::Write;
use wbc_protocol::classes::CellClass;
use wbc_protocol::messages::FieldRecord;
use wbc_protocol::slide::{ClassCount, SlideReport};

/// The order the differential is read in.
const ORDER: [CellClass; 6] = [
    CellClass::Neutrophil,
    CellClass::Lymphocyte,
    CellClass::Monocyte,
    CellClass::Eosinophil,
    CellClass::Basophil,
    CellClass::Blast,
];

/// What a report says.
#[derive(Debug, Clone, PartialEq)]
pub struct SlideReportDoc {
    /// Clinic id.
    pub clinic: String,
    /// Device id.
    pub device: String,
    /// Slide id.
    pub slide_id: String,
    /// When the slide was started, seconds since the Unix epoch.
    pub started_at: u64,
    /// When it was finished, if it was.
    pub finished_at: Option<u64>,
    /// When the report was made.
    pub made_at: u64,
    /// The differential and flags.
    pub report: SlideReport,
    /// Model versions that classified the slide's cells.
    pub model_versions: Vec<u64>,
    /// Cells a technician reviewed.
    pub reviewed: u32,
    /// Of those, cells whose class the technician changed.
    pub changed: u32,
    /// Who reviewed.
    pub reviewers: Vec<String>,
    /// The reference ranges, percent (low, high), as the slide's flags use them
    /// (`[slide] reference_ranges`); a class without one shows none.
    pub reference_ranges: BTreeMap<CellClass, [f32; 2]>,
    /// The language it is written in.
    pub lang: Lang,
}

/// The review figures of a slide's fields: model versions, reviewed, changed, reviewers.
pub fn review_summary<'a>(
    cells: impl IntoIterator<Item = &'a wbc_protocol::messages::CellRecord>,
) -> (Vec<u64>, u32, u32, Vec<String>) {
    let (mut versions, mut reviewed, mut changed, mut who) = (Vec::new(), 0, 0, Vec::new());
    for c in cells {
        if !versions.contains(&c.result.model_version) {
            versions.push(c.result.model_version);
        }
        if let Some(r) = &c.review {
            reviewed += 1;
            if r.class != c.result.class {
                changed += 1;
            }
            if !who.contains(&r.by) {
                who.push(r.by.clone());
            }
        }
    }
    versions.sort_unstable();
    who.sort();
    (versions, reviewed, changed, who)
}

/// [`review_summary`] of a slide's fields.
pub fn fields_summary(fields: &[FieldRecord]) -> (Vec<u64>, u32, u32, Vec<String>) {
    review_summary(fields.iter().flat_map(|f| f.cells.iter()))
}

/// One row of the differential: class, count, percent, reference, and `H`/`L` outside it.
fn rows(r: &SlideReport, ranges: &BTreeMap<CellClass, [f32; 2]>, lang: Lang) -> Vec<[String; 5]> {
    ORDER
        .iter()
        .map(|&c| {
            let cc = r
                .per_class
                .get(c.name())
                .copied()
                .unwrap_or(ClassCount { count: 0, percent: 0.0 });
            let (range, mark) = match ranges.get(&c) {
                Some(&[lo, hi]) => (
                    format!("{lo}–{hi}"),
                    if r.classified == 0 {
                        ""
                    } else if cc.percent > hi {
                        "H"
                    } else if cc.percent < lo {
                        "L"
                    } else {
                        ""
                    },
                ),
                None => ("—".to_string(), ""),
            };
            [
                lang.class(c),
                cc.count.to_string(),
                format!("{:.1}", cc.percent),
                range,
                mark.to_string(),
            ]
        })
        .collect()
}

impl SlideReportDoc {
    /// The header lines: label and value.
    fn header(&self) -> Vec<(String, String)> {
        let l = self.lang;
        let versions: Vec<String> = self.model_versions.iter().map(|v| v.to_string()).collect();
        let r = &self.report;
        vec![
            (l.t("clinic", &[]), self.clinic.clone()),
            (l.t("device", &[]), self.device.clone()),
            (l.t("slide", &[]), self.slide_id.clone()),
            (l.t("started", &[]), when(self.started_at)),
            (
                l.t("finished", &[]),
                self.finished_at.map_or_else(|| l.t("not_finished", &[]), when),
            ),
            (
                l.t("cells", &[]),
                l.t(
                    "cells_line",
                    &[
                        ("classified", &r.classified as &dyn std::fmt::Display),
                        ("unidentified", &r.unidentified),
                        ("edge_cut", &r.edge_cut),
                        ("fields", &r.fields),
                    ],
                ),
            ),
            (
                l.t("model_version", &[]),
                if versions.is_empty() {
                    "—".into()
                } else {
                    versions.join(", ")
                },
            ),
        ]
    }

    fn flags(&self) -> Vec<String> {
        if self.report.flags.is_empty() {
            vec![self.lang.t("no_flags", &[])]
        } else {
            self.report.flags.iter().map(|f| self.lang.flag(f)).collect()
        }
    }

    fn reviews(&self) -> String {
        let who = self.reviewers.join(", ");
        let confirmed = self.reviewed - self.changed;
        match self.reviewed {
            0 => self.lang.t("no_reviews", &[]),
            1 => self.lang.t(
                "reviewed_one",
                &[
                    ("who", &who as &dyn std::fmt::Display),
                    ("confirmed", &confirmed),
                    ("changed", &self.changed),
                ],
            ),
            n => self.lang.t(
                "reviewed_many",
                &[
                    ("n", &n),
                    ("who", &who as &dyn std::fmt::Display),
                    ("confirmed", &confirmed),
                    ("changed", &self.changed),
                ],
            ),
        }
    }

    /// The line every report carries, in its language.
    pub fn disclaimer(&self) -> String {
        self.lang.t("disclaimer", &[])
    }

    /// A file name for the PDF: the slide id with anything but letters, digits, `-` and `_`
    /// replaced.
    pub fn file_name(&self) -> String {
        let id: String = self
            .slide_id
            .chars()
            .take(64)
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        format!("{id}.pdf")
    }

    /// The report as one printable HTML page.
    pub fn html(&self) -> String {
        let l = self.lang;
        let t = |k: &str| esc(&l.t(k, &[]));
        let mut s = format!(
            "<!doctype html><html lang=\"{code}\"><head><meta charset=\"utf-8\"><title>{title}</title><style>\
             body{{font-family:sans-serif;max-width:48em;margin:1em auto;font-size:14px}}table{{border-collapse:collapse;width:100%}}\
             td,th{{border-bottom:1px solid #999;padding:.25em;text-align:left}}.urgent{{font-weight:bold;color:#c00}}\
             .disclaimer{{border:1px solid #000;padding:.5em;margin-top:1em}}.noprint{{margin:1em 0}}\
             @media print{{.noprint{{display:none}}body{{margin:0;max-width:none}}@page{{size:A4;margin:15mm}}}}\
             </style></head><body><h1>{title}</h1><table id=\"report-header\">",
            code = l.code(),
            title = t("title"),
        );
        for (k, v) in self.header() {
            let _ = write!(s, "<tr><th>{}</th><td>{}</td></tr>", esc(&k), esc(&v));
        }
        let _ = write!(
            s,
            "</table><h2>{}</h2><table id=\"report-differential\"><tr><th>{}</th><th>{}</th>\
             <th>%</th><th>{}</th><th></th></tr>",
            t("differential"),
            t("class_column"),
            t("count"),
            t("reference")
        );
        for r in rows(&self.report, &self.reference_ranges, l) {
            let _ = write!(
                s,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&r[0]),
                r[1],
                r[2],
                r[3],
                r[4]
            );
        }
        let _ = write!(
            s,
            "</table><p>{}</p><h2>{}</h2><ul id=\"report-flags\">",
            t("reference_note"),
            t("flags")
        );
        let urgent = self
            .report
            .flags
            .iter()
            .map(|f| f.urgent())
            .chain(std::iter::once(false));
        for (u, m) in urgent.zip(self.flags()) {
            let cls = if u { " class=\"urgent\"" } else { "" };
            let _ = write!(s, "<li{cls}>{}</li>", esc(&m));
        }
        let _ = write!(
            s,
            "</ul><h2>{}</h2><p id=\"report-reviews\">{}</p><p class=\"disclaimer\" id=\"disclaimer\">{}</p>\
             <p>{}</p><p class=\"noprint\"><button onclick=\"window.print()\">{}</button></p></body></html>",
            t("review"),
            esc(&self.reviews()),
            esc(&self.disclaimer()),
            esc(&l.t("made", &[("when", &when(self.made_at))])),
            t("print")
        );
        s
    }

    /// The report as a one-page A4 PDF (Helvetica, WinAnsi: characters outside it print as `?`).
    pub fn pdf(&self) -> Vec<u8> {
        let l = self.lang;
        let (catalog, tree, page, font, bold, content_id) = (
            Ref::new(1),
            Ref::new(2),
            Ref::new(3),
            Ref::new(4),
            Ref::new(5),
            Ref::new(6),
        );
        let mut pdf = Pdf::new();
        pdf.catalog(catalog).pages(tree);
        pdf.pages(tree).kids([page]).count(1);
        let mut p = pdf.page(page);
        p.media_box(Rect::new(0.0, 0.0, 595.0, 842.0));
        p.parent(tree);
        p.contents(content_id);
        let mut res = p.resources();
        let mut fonts = res.fonts();
        fonts.pair(Name(b"F1"), font);
        fonts.pair(Name(b"F2"), bold);
        fonts.finish();
        res.finish();
        p.finish();
        for (id, name) in [(font, &b"Helvetica"[..]), (bold, &b"Helvetica-Bold"[..])] {
            pdf.type1_font(id)
                .base_font(Name(name))
                .encoding_predefined(Name(b"WinAnsiEncoding"));
        }
        let mut c = Content::new();
        let mut y = 800.0;
        let text = |c: &mut Content, x: f32, y: f32, size: f32, bold: bool, s: &str| {
            c.begin_text();
            c.set_font(Name(if bold { b"F2" } else { b"F1" }), size);
            c.next_line(x, y);
            c.show(Str(&win_ansi(s)));
            c.end_text();
        };
        text(&mut c, 50.0, y, 16.0, true, &l.t("title", &[]));
        y -= 26.0;
        for (k, v) in self.header() {
            text(&mut c, 50.0, y, 10.0, true, &k);
            text(&mut c, 150.0, y, 10.0, false, &v);
            y -= 14.0;
        }
        y -= 10.0;
        text(&mut c, 50.0, y, 12.0, true, &l.t("differential", &[]));
        y -= 16.0;
        let cols = [50.0, 170.0, 230.0, 290.0, 380.0];
        for (i, h) in [
            l.t("class_column", &[]),
            l.t("count", &[]),
            "%".into(),
            l.t("reference", &[]),
            String::new(),
        ]
        .iter()
        .enumerate()
        {
            text(&mut c, cols[i], y, 10.0, true, h);
        }
        y -= 14.0;
        for r in rows(&self.report, &self.reference_ranges, self.lang) {
            for (i, v) in r.iter().enumerate() {
                text(&mut c, cols[i], y, 10.0, i == 4, v);
            }
            y -= 14.0;
        }
        text(&mut c, 50.0, y, 8.0, false, &l.t("reference_note", &[]));
        y -= 22.0;
        text(&mut c, 50.0, y, 12.0, true, &l.t("flags", &[]));
        y -= 16.0;
        let urgent_flags = self
            .report
            .flags
            .iter()
            .map(|f| f.urgent())
            .chain(std::iter::once(false));
        for (urgent, f) in urgent_flags.zip(self.flags()) {
            for line in wrap(&f, 95) {
                text(&mut c, 50.0, y, 10.0, urgent, &line);
                y -= 13.0;
            }
        }
        y -= 10.0;
        text(&mut c, 50.0, y, 12.0, true, &l.t("review", &[]));
        y -= 16.0;
        for line in wrap(&self.reviews(), 95) {
            text(&mut c, 50.0, y, 10.0, false, &line);
            y -= 13.0;
        }
        y -= 14.0;
        for line in wrap(&self.disclaimer(), 90) {
            text(&mut c, 50.0, y, 10.0, true, &line);
            y -= 13.0;
        }
        y -= 10.0;
        text(
            &mut c,
            50.0,
            y,
            8.0,
            false,
            &l.t("made", &[("when", &when(self.made_at))]),
        );
        pdf.stream(content_id, &c.finish());
        pdf.finish()
    }
}

/// Text in Windows-1252 (what WinAnsiEncoding prints); other characters become `?`.
fn win_ansi(s: &str) -> Vec<u8> {
    s.chars()
        .map(|ch| match ch {
            '\u{20}'..='\u{7e}' | '\u{a0}'..='\u{ff}' => ch as u8,
            '–' => 0x96,
            '—' => 0x97,
            '’' => 0x92,
            '…' => 0x85,
            _ => b'?',
        })
        .collect()
}

/// Splits text into lines of at most `width` characters, at spaces.
fn wrap(s: &str, width: usize) -> Vec<String> {
    let mut out = vec![String::new()];
    for w in s.split_whitespace() {
        let last = out.last_mut().expect("one line at least");
        if !last.is_empty() && last.chars().count() + 1 + w.chars().count() > width {
            out.push(w.to_string());
        } else {
            if !last.is_empty() {
                last.push(' ');
            }
            last.push_str(w);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use wbc_protocol::slide::{Flag, SlideSettings, report};

    fn doc() -> SlideReportDoc {
        let mut r = report("s-1", &[], &SlideSettings::default(), true);
        r.classified = 100;
        r.per_class.get_mut("Neutrophil").unwrap().count = 88;
        r.per_class.get_mut("Neutrophil").unwrap().percent = 88.0;
        r.per_class.get_mut("Blast").unwrap().count = 2;
        r.per_class.get_mut("Blast").unwrap().percent = 2.0;
        r.flags = vec![Flag::Blast { count: 2 }];
        SlideReportDoc {
            clinic: "clinic-<7>".into(),
            device: "scope-1".into(),
            slide_id: "s-1".into(),
            started_at: 1_800_000_000,
            finished_at: Some(1_800_003_600),
            made_at: 1_800_007_200,
            report: r,
            model_versions: vec![4],
            reviewed: 3,
            changed: 1,
            reviewers: vec!["tech".into()],
            reference_ranges: SlideSettings::default().reference_ranges,
            lang: Lang::En,
        }
    }

    #[test]
    fn the_html_report_says_what_the_patient_record_needs() {
        let h = doc().html();
        assert!(h.contains("clinic-&lt;7&gt;") && !h.contains("clinic-<7>"), "escaped");
        assert!(
            h.contains("<tr><td>Neutrophil</td><td>88</td><td>88.0</td><td>40–75</td><td>H</td></tr>"),
            "{h}"
        );
        assert!(
            h.contains("<tr><td>Blast</td><td>2</td><td>2.0</td><td>0–0</td><td>H</td></tr>"),
            "{h}"
        );
        assert!(h.contains("class=\"urgent\">URGENT: 2 blasts"), "{h}");
        assert!(h.contains("3 cells reviewed by tech (2 confirmed, 1 changed)"), "{h}");
        assert!(h.contains("2027-01-15 08:00 UTC"), "started: {h}");
        assert!(h.contains(&doc().disclaimer()) && h.contains("@media print"));
        assert!(h.contains("pre-classification"));
    }

    #[test]
    fn the_pdf_report_is_a_pdf_with_the_same_content() {
        let p = doc().pdf();
        assert!(p.starts_with(b"%PDF-"));
        assert!(p.ends_with(b"%%EOF\n") || p.ends_with(b"%%EOF"));
        let text = String::from_utf8_lossy(&p);
        for want in [
            "(Neutrophil)",
            "(88.0)",
            "(Reference %)",
            "(URGENT: 2 blasts",
            "(scope-1)",
            "(Model version)",
        ] {
            // Text with a character beyond ASCII (the flag's dash) is written in hex.
            let hex: String = want[1..].bytes().map(|b| format!("{b:02X}")).collect();
            assert!(
                text.contains(want) || text.to_uppercase().contains(&format!("<{hex}")),
                "{want} in the PDF"
            );
        }
        assert!(text.contains("/BaseFont /Helvetica"));
    }

    #[test]
    fn the_report_uses_the_reference_ranges_the_flags_use() {
        let mut d = doc();
        d.reference_ranges.insert(CellClass::Neutrophil, [40.0, 90.0]);
        d.reference_ranges.remove(&CellClass::Basophil);
        let h = d.html();
        assert!(
            h.contains("<tr><td>Neutrophil</td><td>88</td><td>88.0</td><td>40–90</td><td></td></tr>"),
            "{h}"
        );
        assert!(
            h.contains("<tr><td>Basophil</td><td>0</td><td>0.0</td><td>—</td><td></td></tr>"),
            "{h}"
        );
    }

    #[test]
    fn the_report_speaks_the_clinics_language() {
        let mut d = doc();
        d.lang = Lang::Fr;
        let h = d.html();
        assert!(
            h.contains("<html lang=\"fr\"") && h.contains("<h1>Formule leucocytaire</h1>"),
            "{h}"
        );
        assert!(h.contains("<tr><td>Neutrophile</td><td>88</td>"), "{h}");
        assert!(h.contains("URGENT : 2 blastes trouvés"), "{h}");
        assert!(
            h.contains("3 cellules relues par tech (2 confirmées, 1 modifiées)"),
            "{h}"
        );
        assert!(h.contains("pré-classification") && h.contains("Imprimer"), "{h}");
        d.lang = Lang::Pt;
        let h = d.html();
        assert!(
            h.contains("Contagem diferencial de leucócitos") && h.contains("Neutrófilo"),
            "{h}"
        );
        // The PDF in French: its accents in WinAnsi.
        d.lang = Lang::Fr;
        let p = d.pdf();
        let hex: String = win_ansi("Éosinophile").iter().map(|b| format!("{b:02X}")).collect();
        assert!(
            String::from_utf8_lossy(&p).to_uppercase().contains(&hex),
            "Éosinophile in the PDF"
        );
    }

    #[test]
    fn the_pdf_file_name_is_safe_in_a_header() {
        let mut d = doc();
        d.slide_id = "s\"; x=\r\n../1".into();
        assert_eq!(d.file_name(), "s___x______1.pdf");
    }

    #[test]
    fn text_outside_win_ansi_prints_as_a_question_mark_and_lines_wrap() {
        assert_eq!(
            win_ansi("Éosinophile – 2 µm ✓"),
            b"\xc9osinophile \x96 2 \xb5m ?".to_vec()
        );
        assert_eq!(wrap("a bb ccc dddd", 6), ["a bb", "ccc", "dddd"]);
    }
}
