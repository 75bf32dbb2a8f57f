//! A cell's description in the reader's language.
//!
//! The model writes its description in English (the compact model from the attributes it
//! predicted, the mllama family in its own words), and that text is what is stored and sent.
//! A page in another language renders the description again from what the result holds: why
//! the cell was set aside, its most probable class, and its attributes, clause by clause, with
//! the words in `locales/<code>.toml` (`[describe]`, `[value.<attribute>]`, `[phrase]`). An
//! attribute value a locale does not know is shown as it is, never dropped silently.

use crate::i18n::Lang;
use std::collections::BTreeMap;
use std::fmt::Display;
use wbc_protocol::classes::CellClass;
use wbc_protocol::messages::{CellResult, ReviewReason};

impl Lang {
    /// The cell's description for a reader of this language: in English the model's own text;
    /// otherwise rendered from the result (see the module's text).
    pub fn description(self, r: &CellResult) -> String {
        if self == Lang::En {
            return r.description.clone();
        }
        let top = r.most_probable();
        let about = |class: Option<CellClass>| match class {
            Some(c) => self.grounded(c, &r.attributes),
            None => String::new(),
        };
        let confidence = format!("{:.2}", r.confidence);
        let t = |key: &str, args: &[(&str, &dyn Display)]| self.t(key, args).trim().to_string();
        match (r.review_reason, r.class) {
            (None, Some(c)) => about(Some(c)),
            (Some(ReviewReason::EdgeCut), _) => t("describe.edge_cut", &[]),
            (Some(ReviewReason::NoCell), _) => t("describe.no_cell", &[]),
            (Some(ReviewReason::Unfamiliar), _) => t("describe.unfamiliar", &[("closest", &about(top))]),
            (Some(ReviewReason::NeighboursDisagree), _) => t(
                "describe.neighbours",
                &[("class", &top.map(|c| self.class(c)).unwrap_or_default())],
            ),
            (Some(ReviewReason::LowConfidence), _) if top == Some(CellClass::Blast) => t(
                "describe.possible_blast",
                &[("p", &confidence), ("closest", &about(top))],
            ),
            (Some(ReviewReason::LowConfidence), _) | (None, None) => t(
                "describe.low_confidence",
                &[("c", &confidence), ("closest", &about(top))],
            ),
        }
    }

    /// A description from the attributes, ending with the class; without attributes, the
    /// class's phrase.
    fn grounded(self, class: CellClass, attrs: &BTreeMap<String, String>) -> String {
        let class_name = self.class(class);
        if attrs.is_empty() {
            return self.t(&format!("phrase.{}", class.name()), &[]);
        }
        let word = |attr: &str| {
            attrs.get(attr).map(|v| {
                self.lookup(&format!("value.{attr}.{v}"))
                    .map_or_else(|| v.clone(), str::to_string)
            })
        };
        let list = |parts: Vec<Option<String>>| parts.into_iter().flatten().collect::<Vec<_>>().join(", ");
        let mut clauses = Vec::new();
        let cell = list(vec![word("cell_size"), word("cell_shape")]);
        if !cell.is_empty() {
            clauses.push(self.t("describe.cell", &[("list", &cell)]));
        }
        let nucleus = list(vec![word("nucleus_shape"), word("chromatin_density")]);
        if !nucleus.is_empty() {
            clauses.push(self.t("describe.nucleus", &[("list", &nucleus)]));
        }
        if let Some(ratio) = word("nuclear_cytoplasmic_ratio") {
            clauses.push(self.t("describe.ratio", &[("value", &ratio)]));
        }
        let cytoplasm = list(vec![
            word("cytoplasm_texture"),
            word("cytoplasm_colour"),
            word("cytoplasm_vacuole"),
        ]);
        if !cytoplasm.is_empty() {
            clauses.push(self.t("describe.cytoplasm", &[("list", &cytoplasm)]));
        }
        let known = |attr: &str| word(attr).filter(|_| attrs.get(attr).is_some_and(|v| v != "nil"));
        let granules = list(vec![known("granule_type"), known("granule_colour")]);
        match attrs.get("granularity").map(String::as_str) {
            Some("no") => clauses.push(self.t("describe.no_granules", &[])),
            _ if !granules.is_empty() => clauses.push(self.t("describe.granules", &[("list", &granules)])),
            Some("yes") => clauses.push(self.t("describe.granules_present", &[])),
            _ => {}
        }
        self.t(
            "describe.consistent",
            &[
                ("clauses", &clauses.join(&self.t("describe.separator", &[]))),
                ("class", &class_name),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wbc_protocol::attributes::AttributeSet;

    fn result(
        class: Option<CellClass>,
        top: CellClass,
        attrs: &[(&str, &str)],
        reason: Option<ReviewReason>,
    ) -> CellResult {
        let mut probs = [0.02f32; 6];
        probs[top.index()] = 0.9;
        let none = AttributeSet::default();
        let mut r = CellResult::from_probabilities(&probs, &none, "the model's own words".into(), 0.5, 4);
        r.attributes = attrs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        r.class = class;
        r.review_reason = reason;
        r
    }

    const NEUTROPHIL: &[(&str, &str)] = &[
        ("cell_size", "big"),
        ("cell_shape", "round"),
        ("nucleus_shape", "segmented-multilobed"),
        ("chromatin_density", "densely"),
        ("nuclear_cytoplasmic_ratio", "low"),
        ("cytoplasm_texture", "clear"),
        ("cytoplasm_colour", "light blue"),
        ("cytoplasm_vacuole", "no"),
        ("granularity", "yes"),
        ("granule_type", "small"),
        ("granule_colour", "pink"),
    ];

    #[test]
    fn english_keeps_the_models_words_and_french_and_portuguese_say_what_the_attributes_say() {
        let r = result(Some(CellClass::Neutrophil), CellClass::Neutrophil, NEUTROPHIL, None);
        assert_eq!(Lang::En.description(&r), "the model's own words");
        assert_eq!(
            Lang::Fr.description(&r),
            "Cellule : grande, ronde ; noyau : segmenté en 3 à 5 lobes, chromatine dense ; rapport \
             nucléo-cytoplasmique bas ; cytoplasme : clair, bleu clair, sans vacuoles ; granulations : fines, \
             roses. Évoque : Neutrophile."
        );
        assert_eq!(
            Lang::Pt.description(&r),
            "Célula: grande, redonda; núcleo: segmentado com 3 a 5 lóbulos, cromatina densa; relação \
             núcleo-citoplasma baixa; citoplasma: claro, azul-claro, sem vacúolos; grânulos: finos, rosados. \
             Compatível com: Neutrófilo."
        );
    }

    #[test]
    fn a_cell_set_aside_says_why_in_the_readers_language() {
        let blast = result(None, CellClass::Blast, &[], Some(ReviewReason::LowConfidence));
        let fr = Lang::Fr.description(&blast);
        assert!(fr.contains("blaste possible") && fr.contains("0.90"), "{fr}");
        assert!(fr.contains("C'est un blaste"), "the class's phrase: {fr}");
        let pt = Lang::Pt.description(&result(None, CellClass::Monocyte, &[], Some(ReviewReason::Unfamiliar)));
        assert!(pt.contains("não se parece") && pt.contains("monócito"), "{pt}");
        let edge = CellResult::edge_cut([0, 0, 4, 4], 4);
        assert!(Lang::Fr.description(&edge).contains("bord du champ"));
        let other = result(None, CellClass::Lymphocyte, &[], Some(ReviewReason::NeighboursDisagree));
        assert!(Lang::Pt.description(&other).contains("Linfócito"));
        let none = result(None, CellClass::Lymphocyte, &[], Some(ReviewReason::NoCell));
        assert!(Lang::Fr.description(&none).contains("aucun globule blanc"));
    }

    #[test]
    fn an_attribute_value_the_locale_does_not_know_is_shown_as_it_came() {
        let mut r = result(Some(CellClass::Basophil), CellClass::Basophil, &[], None);
        r.attributes.insert("cell_shape".into(), "<hexagonal>".into());
        let fr = Lang::Fr.description(&r);
        assert!(fr.contains("<hexagonal>") && fr.contains("Basophile"), "{fr}");
    }
}
