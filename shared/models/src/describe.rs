//! Cell descriptions: the reference study's per-class phrasings and descriptions grounded in a
//! cell's WBCAtt attributes.
//!
//! The reference study trained its vision-language model on five phrasings per class; the
//! compact model instead renders its description from the attributes it predicted, so every
//! clause it writes is something its heads saw.

use wbc_protocol::attributes::{AttributeSet, NUM_ATTRIBUTES};
use wbc_protocol::classes::CellClass;

/// Five phrasings per class, in the style of the reference study's training descriptions.
pub fn class_phrasings(class: CellClass) -> [&'static str; 5] {
    match class {
        CellClass::Basophil => [
            "This is a basophil: a granulocyte whose coarse, dark purple granules obscure the nucleus.",
            "Basophil with dense basophilic granules covering a lobed nucleus.",
            "The cell shows abundant coarse purple-black granules typical of a basophil.",
            "A basophil, recognised by its dark granules that fill the cytoplasm and overlie the nucleus.",
            "Granulocyte with large dark-blue to purple granules; the features are those of a basophil.",
        ],
        CellClass::Eosinophil => [
            "This is an eosinophil: a bilobed nucleus and cytoplasm packed with orange-red granules.",
            "Eosinophil with large refractile eosinophilic granules and a two-lobed nucleus.",
            "The cell has a spectacle-shaped nucleus and bright red-orange granules, typical of an eosinophil.",
            "An eosinophil, recognised by its coarse round red granules filling the cytoplasm.",
            "Granulocyte with a bilobed nucleus and uniform orange granules; the features are those of an eosinophil.",
        ],
        CellClass::Lymphocyte => [
            "This is a lymphocyte: a small round cell with a dense round nucleus and scant blue cytoplasm.",
            "Lymphocyte with a high nuclear-to-cytoplasmic ratio and condensed chromatin.",
            "The cell is small, with a round dark nucleus and a thin rim of pale blue cytoplasm, typical of a lymphocyte.",
            "A mature lymphocyte, recognised by its clumped chromatin and little agranular cytoplasm.",
            "Small mononuclear cell with a round nucleus filling most of the cell; the features are those of a lymphocyte.",
        ],
        CellClass::Monocyte => [
            "This is a monocyte: a large cell with a folded, kidney-shaped nucleus and grey-blue cytoplasm.",
            "Monocyte with an indented nucleus, lacy chromatin and abundant frosted cytoplasm.",
            "The cell is large with an irregular nucleus and grey-blue cytoplasm that may contain vacuoles, typical of a monocyte.",
            "A monocyte, recognised by its convoluted nucleus and ground-glass cytoplasm.",
            "Large mononuclear cell with a bean-shaped nucleus and fine vacuoles; the features are those of a monocyte.",
        ],
        CellClass::Neutrophil => [
            "This is a neutrophil: a segmented nucleus with three to five lobes and fine pink granules.",
            "Segmented neutrophil with condensed chromatin in lobes joined by thin strands.",
            "The cell has a multilobed nucleus and pale cytoplasm with fine neutral granules, typical of a neutrophil.",
            "A mature neutrophil, recognised by its lobulated nucleus and faintly granular pink cytoplasm.",
            "Granulocyte with a segmented nucleus and fine lilac granules; the features are those of a neutrophil.",
        ],
        CellClass::Blast => [
            "This is a blast: a large immature cell with a high nuclear-to-cytoplasmic ratio and fine chromatin.",
            "Blast with a large round nucleus, open chromatin, visible nucleoli and a narrow rim of basophilic cytoplasm.",
            "The cell is large with delicate chromatin and scant deep-blue cytoplasm, typical of a blast.",
            "An immature myeloid precursor (blast), recognised by its fine chromatin and prominent nucleoli.",
            "Large cell whose nucleus fills most of the cytoplasm with finely dispersed chromatin; the features are those of a blast.",
        ],
    }
}

fn article(word: &str) -> &'static str {
    match word.chars().next() {
        Some('a' | 'e' | 'i' | 'o' | 'u' | 'A' | 'E' | 'I' | 'O' | 'U') => "an",
        _ => "a",
    }
}

fn nucleus_phrase(v: &str) -> &'static str {
    match v {
        "unsegmented-round" => "round, unsegmented nucleus",
        "unsegmented-indented" => "indented, kidney-shaped nucleus",
        "unsegmented-band" => "band-shaped, unsegmented nucleus",
        "segmented-bilobed" => "segmented nucleus with 2 lobes",
        "segmented-multilobed" => "segmented nucleus with 3–5 lobes",
        _ => "irregular nucleus",
    }
}

/// A description grounded in the given attributes, ending with the class.
///
/// Unknown attributes are left out rather than guessed. With no attribute known it falls back
/// to the first class phrasing.
pub fn describe(class: CellClass, attrs: &AttributeSet) -> String {
    if attrs.is_empty() {
        return class_phrasings(class)[0].to_string();
    }
    let a = |k: &str| attrs.get(k);
    let mut clauses: Vec<String> = Vec::with_capacity(NUM_ATTRIBUTES);

    let size = a("cell_size").map(|s| if s == "big" { "large" } else { "small" });
    let shape = a("cell_shape");
    let cell = match (size, shape) {
        (Some(s), Some(sh)) => format!("{s} {sh} cell"),
        (Some(s), None) => format!("{s} cell"),
        (None, Some(sh)) => format!("{sh} cell"),
        (None, None) => String::new(),
    };
    if !cell.is_empty() {
        let mut c = cell;
        c[..1].make_ascii_uppercase();
        clauses.push(c);
    }
    if let Some(n) = a("nucleus_shape") {
        let mut s = nucleus_phrase(n).to_string();
        if let Some(ch) = a("chromatin_density") {
            s.push_str(if ch == "densely" {
                " with dense chromatin"
            } else {
                " with loose, open chromatin"
            });
        }
        clauses.push(s);
    } else if let Some(ch) = a("chromatin_density") {
        clauses.push(if ch == "densely" {
            "dense chromatin".into()
        } else {
            "loose, open chromatin".into()
        });
    }
    if let Some(r) = a("nuclear_cytoplasmic_ratio") {
        clauses.push(format!("{r} nuclear-cytoplasmic ratio"));
    }
    let texture = a("cytoplasm_texture");
    let colour = a("cytoplasm_colour");
    if texture.is_some() || colour.is_some() {
        let mut s = String::new();
        if let Some(t) = texture {
            s.push_str(t);
            s.push(' ');
        }
        if let Some(c) = colour {
            s.push_str(c);
            s.push(' ');
        }
        s.push_str("cytoplasm");
        match a("cytoplasm_vacuole") {
            Some("yes") => s.push_str(" with vacuoles"),
            Some(_) => s.push_str(" without vacuoles"),
            None => {}
        }
        clauses.push(s);
    } else if a("cytoplasm_vacuole") == Some("yes") {
        clauses.push("vacuolated cytoplasm".into());
    }
    let granular = a("granularity");
    let gtype = a("granule_type").filter(|t| *t != "nil");
    let gcolour = a("granule_colour").filter(|c| *c != "nil");
    match (granular, gtype, gcolour) {
        (Some("no"), _, _) => clauses.push("no granules".into()),
        (_, None, None) if granular == Some("yes") => clauses.push("granules present".into()),
        (_, t, c) if t.is_some() || c.is_some() => {
            let mut s = String::new();
            if let Some(t) = t {
                s.push_str(if t == "small" { "fine" } else { t });
                s.push(' ');
            }
            if let Some(c) = c {
                s.push_str(c);
                s.push(' ');
            }
            s.push_str("granules");
            clauses.push(s);
        }
        _ => {}
    }
    let name = class.name().to_lowercase();
    format!("{}. Consistent with {} {}.", clauses.join("; "), article(&name), name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wbc_protocol::attributes::AttributeSet;

    #[test]
    fn five_distinct_phrasings_per_class_each_naming_the_class() {
        for class in CellClass::ALL {
            let p = class_phrasings(class);
            let unique: std::collections::HashSet<_> = p.iter().collect();
            assert_eq!(unique.len(), 5);
            for s in p {
                assert_eq!(CellClass::parse_free_text(s), Some(class), "{s}");
            }
        }
    }

    #[test]
    fn grounded_description_says_what_the_attributes_say() {
        let attrs = AttributeSet::from_strs(&[
            "big",
            "round",
            "segmented-multilobed",
            "low",
            "densely",
            "no",
            "clear",
            "light blue",
            "small",
            "pink",
            "yes",
        ])
        .unwrap();
        let d = describe(CellClass::Neutrophil, &attrs);
        assert_eq!(
            d,
            "Large round cell; segmented nucleus with 3–5 lobes with dense chromatin; low nuclear-cytoplasmic ratio; \
             clear light blue cytoplasm without vacuoles; fine pink granules. Consistent with a neutrophil."
        );
        assert_eq!(CellClass::parse_free_text(&d), Some(CellClass::Neutrophil));
    }

    #[test]
    fn agranular_cell_and_unknown_attributes() {
        let mut row = [""; 11];
        row[10] = "no";
        row[0] = "small";
        let d = describe(CellClass::Lymphocyte, &AttributeSet::from_strs(&row).unwrap());
        assert_eq!(d, "Small cell; no granules. Consistent with a lymphocyte.");
        let none = describe(CellClass::Eosinophil, &AttributeSet::default());
        assert_eq!(none, class_phrasings(CellClass::Eosinophil)[0]);
    }
}
