//! The languages of the clinics: English, French and Portuguese. The texts live in
//! `shared/web/locales/<code>.toml`, one file per language with the same keys, for a translator
//! to edit without touching the code; they are built into the program. They cover every page of
//! the appliance and central, the login, the slide report (`report.rs`), the class names, the
//! flags and the cells' descriptions (`describe.rs`). Each side has a language in its
//! configuration, and each account may have its own (`language` of a `[[users]]` entry).

use std::collections::BTreeMap;
use std::sync::OnceLock;
use wbc_protocol::classes::CellClass;
use wbc_protocol::slide::Flag;

/// A language of the pages and the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Lang {
    /// English.
    #[default]
    En,
    /// French.
    Fr,
    /// Portuguese.
    Pt,
}

impl Lang {
    /// Every language, with its code.
    pub const ALL: [(Lang, &'static str); 3] = [(Lang::En, "en"), (Lang::Fr, "fr"), (Lang::Pt, "pt")];

    /// The language of a code (`en`, `fr`, `pt`; `fr-FR` and `pt_BR` too), if known.
    pub fn from_code(code: &str) -> Option<Lang> {
        let base = code.split(['-', '_']).next()?.to_ascii_lowercase();
        Self::ALL.iter().find(|(_, c)| *c == base).map(|(l, _)| *l)
    }

    /// Its code.
    pub fn code(self) -> &'static str {
        Self::ALL.iter().find(|(l, _)| *l == self).map_or("en", |(_, c)| c)
    }

    fn source(self) -> &'static str {
        match self {
            Lang::En => include_str!("../locales/en.toml"),
            Lang::Fr => include_str!("../locales/fr.toml"),
            Lang::Pt => include_str!("../locales/pt.toml"),
        }
    }

    fn texts(self) -> &'static BTreeMap<String, String> {
        static TEXTS: OnceLock<Vec<BTreeMap<String, String>>> = OnceLock::new();
        let all = TEXTS.get_or_init(|| Self::ALL.iter().map(|(l, _)| parse(l.source())).collect());
        &all[Self::ALL.iter().position(|(l, _)| *l == self).unwrap_or(0)]
    }

    /// The text of `key` in this language, if the file has it (no fallback).
    pub(crate) fn lookup(self, key: &str) -> Option<&'static str> {
        self.texts().get(key).map(String::as_str)
    }

    /// The text of `key`, with `{name}` placeholders filled from `args`. A key missing from
    /// this language falls back to English, then to the key itself (the tests keep both from
    /// happening).
    pub fn t(self, key: &str, args: &[(&str, &dyn std::fmt::Display)]) -> String {
        let text = self
            .texts()
            .get(key)
            .or_else(|| Lang::En.texts().get(key))
            .cloned()
            .unwrap_or_else(|| key.to_string());
        fill(&text, args)
    }

    /// A word the program shows as it is in English (a device's state, a model event, a
    /// slide's state) in this language; an unknown word as it came.
    pub fn term(self, word: &str) -> String {
        self.lookup(&format!("term.{word}"))
            .map_or_else(|| word.to_string(), str::to_string)
    }

    /// A class's name.
    pub fn class(self, c: CellClass) -> String {
        self.t(&format!("class.{}", c.name()), &[])
    }

    /// A flag in words.
    pub fn flag(self, f: &Flag) -> String {
        match f {
            Flag::Blast { count: 1 } => self.t("flag_blast_one", &[]),
            Flag::Blast { count } => self.t("flag_blast_many", &[("count", count)]),
            Flag::PossibleBlast { count: 1 } => self.t("flag_possible_one", &[]),
            Flag::PossibleBlast { count } => self.t("flag_possible_many", &[("count", count)]),
            Flag::OutOfRange {
                class,
                percent,
                low,
                high,
            } => self.t(
                "flag_out_of_range",
                &[
                    ("class", &self.class(*class) as &dyn std::fmt::Display),
                    ("percent", &format!("{percent:.1}")),
                    ("low", low),
                    ("high", high),
                ],
            ),
            Flag::TooFewCells { counted, minimum } => self.t(
                "flag_too_few",
                &[("counted", counted as &dyn std::fmt::Display), ("minimum", minimum)],
            ),
            Flag::Unknown => self.t("flag_unknown", &[]),
        }
    }
}

/// `{name}` placeholders of a text filled in one pass: what an argument says (a file name
/// holding `{reason}`, say) is never read as a placeholder itself. A placeholder without an
/// argument stays as it is.
fn fill(text: &str, args: &[(&str, &dyn std::fmt::Display)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let arg = after.find('}').and_then(|close| {
            args.iter()
                .find(|(n, _)| *n == &after[..close])
                .map(|(_, v)| (v, close))
        });
        match arg {
            Some((v, close)) => {
                out.push_str(&v.to_string());
                rest = &after[close + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// A locale file as flat keys (`[class] Blast` becomes `class.Blast`).
fn parse(source: &str) -> BTreeMap<String, String> {
    fn walk(prefix: &str, t: &toml::Table, out: &mut BTreeMap<String, String>) {
        for (k, v) in t {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                toml::Value::String(s) => {
                    out.insert(key, s.clone());
                }
                toml::Value::Table(t) => walk(&key, t, out),
                _ => {}
            }
        }
    }
    let mut out = BTreeMap::new();
    // A broken file is caught by the tests; at run time its texts fall back to English.
    if let Ok(t) = toml::from_str::<toml::Table>(source) {
        walk("", &t, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placeholders(s: &str) -> Vec<&str> {
        let mut v: Vec<&str> = s.split('{').skip(1).filter_map(|p| p.split('}').next()).collect();
        v.sort();
        v
    }

    #[test]
    fn every_key_exists_in_every_language_with_the_same_placeholders() {
        for (lang, code) in Lang::ALL {
            if let Err(e) = toml::from_str::<toml::Table>(lang.source()) {
                panic!("{code}.toml is not valid TOML: {e}");
            }
        }
        let en = parse(Lang::En.source());
        assert!(en.len() > 30, "the English file parses: {} keys", en.len());
        for (lang, code) in Lang::ALL {
            let other = parse(lang.source());
            assert_eq!(
                other.keys().collect::<Vec<_>>(),
                en.keys().collect::<Vec<_>>(),
                "{code}.toml has the same keys as en.toml"
            );
            for (k, v) in &en {
                assert_eq!(placeholders(&other[k]), placeholders(v), "{code}: {k}");
                assert!(!other[k].trim().is_empty(), "{code}: {k} is empty");
            }
        }
        for c in CellClass::ALL {
            assert!(en.contains_key(&format!("class.{}", c.name())), "{c:?}");
        }
    }

    #[test]
    fn texts_are_filled_in_and_codes_are_read() {
        assert_eq!(Lang::from_code("fr-FR"), Some(Lang::Fr));
        assert_eq!(Lang::from_code("pt_BR"), Some(Lang::Pt));
        assert_eq!(Lang::from_code("de"), None);
        assert_eq!(Lang::Fr.class(CellClass::Eosinophil), "Éosinophile");
        assert_eq!(
            Lang::Pt.flag(&Flag::Blast { count: 3 }),
            "URGENTE: 3 blastos encontrados — envie a lâmina para revisão"
        );
        assert_eq!(
            Lang::En.flag(&Flag::Blast { count: 2 }),
            Flag::Blast { count: 2 }.message()
        );
        let f = Flag::OutOfRange {
            class: CellClass::Eosinophil,
            percent: 12.0,
            low: 1.0,
            high: 6.0,
        };
        assert_eq!(
            Lang::Fr.flag(&f),
            "Éosinophile 12.0 % hors de l'intervalle de référence 1–6 %"
        );
        assert_eq!(Lang::En.flag(&f), f.message());
        assert_eq!(Lang::En.t("no such key", &[]), "no such key");
        // An argument is never read as a placeholder, and an unknown placeholder stays.
        assert_eq!(
            Lang::En.t(
                "inbox_waiting",
                &[("name", &"{reason}.jpg"), ("tries", &2), ("reason", &"disk full")]
            ),
            "Inbox image {reason}.jpg not processed yet (2 tries; it will be tried again): disk full"
        );
        assert_eq!(fill("{a} {b} {", &[("a", &"{b}")]), "{b} {b} {");
    }
}
