//! The six white-blood-cell classes, in the reference study's order.
//!
//! The order is part of every bundle, every metric table and every wire message:
//! 0 Basophil (BASO), 1 Eosinophil (EO), 2 Lymphocyte (LYM), 3 Monocyte (MONO),
//! 4 Neutrophil (SEG), 5 Blast (BLAST).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// One of the six cell classes the models distinguish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema)]
pub enum CellClass {
    /// Basophil (BASO): coarse dark-purple granules that often hide the nucleus.
    Basophil,
    /// Eosinophil (EO): bilobed nucleus, large orange-red granules.
    Eosinophil,
    /// Lymphocyte (LYM): small round cell, dense round nucleus, scant blue cytoplasm.
    Lymphocyte,
    /// Monocyte (MONO): large cell, folded or kidney-shaped nucleus, grey-blue cytoplasm.
    Monocyte,
    /// Neutrophil (SEG): segmented nucleus with 2–5 lobes, fine pink granules.
    Neutrophil,
    /// Blast (BLAST): immature precursor; large nucleus with fine chromatin and nucleoli.
    Blast,
}

/// Number of classes.
pub const NUM_CLASSES: usize = 6;

impl CellClass {
    /// All classes in label order.
    pub const ALL: [CellClass; NUM_CLASSES] = [
        CellClass::Basophil,
        CellClass::Eosinophil,
        CellClass::Lymphocyte,
        CellClass::Monocyte,
        CellClass::Neutrophil,
        CellClass::Blast,
    ];

    /// Label id (0..6) as used in the datasets and the model's output.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Class for a label id, if valid.
    pub fn from_index(i: usize) -> Option<CellClass> {
        Self::ALL.get(i).copied()
    }

    /// Full English name, e.g. `Neutrophil`.
    pub fn name(self) -> &'static str {
        match self {
            CellClass::Basophil => "Basophil",
            CellClass::Eosinophil => "Eosinophil",
            CellClass::Lymphocyte => "Lymphocyte",
            CellClass::Monocyte => "Monocyte",
            CellClass::Neutrophil => "Neutrophil",
            CellClass::Blast => "Blast",
        }
    }

    /// Abbreviation used in the reference study's tables, e.g. `SEG`.
    pub fn abbreviation(self) -> &'static str {
        match self {
            CellClass::Basophil => "BASO",
            CellClass::Eosinophil => "EO",
            CellClass::Lymphocyte => "LYM",
            CellClass::Monocyte => "MONO",
            CellClass::Neutrophil => "SEG",
            CellClass::Blast => "BLAST",
        }
    }

    /// Words that name this class in free text (lower case), most specific first.
    fn synonyms(self) -> &'static [&'static str] {
        match self {
            CellClass::Basophil => &["basophils", "basophil", "baso"],
            CellClass::Eosinophil => &["eosinophils", "eosinophil", "eos", "eo"],
            CellClass::Lymphocyte => &["lymphocytes", "lymphocyte", "lymph", "lym", "ly"],
            CellClass::Monocyte => &["monocytes", "monocyte", "mono", "mo"],
            CellClass::Neutrophil => &[
                "neutrophils",
                "neutrophil",
                "segmented",
                "band",
                "seg",
                "neut",
                "sne",
                "bne",
            ],
            CellClass::Blast => &["myeloblasts", "myeloblast", "blasts", "blast", "myo"],
        }
    }

    /// Finds the class named in a free-text answer such as `"This is a neutrophil."`.
    ///
    /// Matching is on whole words, case-insensitive, and accepts names, abbreviations and
    /// common synonyms. When several classes are named, the one named first wins; when none
    /// is named, `None`.
    pub fn parse_free_text(text: &str) -> Option<CellClass> {
        let lower = text.to_lowercase();
        let words: Vec<&str> = lower
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .collect();
        for word in words {
            for class in Self::ALL {
                if class.synonyms().contains(&word) {
                    return Some(class);
                }
            }
        }
        None
    }
}

impl fmt::Display for CellClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Error for a string that names no class.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "unknown cell class {0:?}: expected one of Basophil, Eosinophil, Lymphocyte, Monocyte, Neutrophil, Blast (or BASO, EO, LYM, MONO, SEG, BLAST, or 0-5)"
)]
pub struct UnknownClass(pub String);

impl FromStr for CellClass {
    type Err = UnknownClass;

    /// Strict parse of a name, an abbreviation or a label id (`"4"`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if let Ok(i) = t.parse::<usize>() {
            return CellClass::from_index(i).ok_or_else(|| UnknownClass(s.to_string()));
        }
        CellClass::ALL
            .into_iter()
            .find(|c| c.name().eq_ignore_ascii_case(t) || c.abbreviation().eq_ignore_ascii_case(t))
            .ok_or_else(|| UnknownClass(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_matches_the_reference_study() {
        let abbr: Vec<_> = CellClass::ALL.iter().map(|c| c.abbreviation()).collect();
        assert_eq!(abbr, ["BASO", "EO", "LYM", "MONO", "SEG", "BLAST"]);
        for (i, c) in CellClass::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
            assert_eq!(CellClass::from_index(i), Some(*c));
        }
        assert_eq!(CellClass::from_index(6), None);
    }

    #[test]
    fn strict_parse_accepts_names_abbreviations_and_ids() {
        assert_eq!("neutrophil".parse(), Ok(CellClass::Neutrophil));
        assert_eq!("SEG".parse(), Ok(CellClass::Neutrophil));
        assert_eq!(" 5 ".parse(), Ok(CellClass::Blast));
        assert!("7".parse::<CellClass>().is_err());
        assert!("platelet".parse::<CellClass>().is_err());
    }

    #[test]
    fn free_text_finds_the_first_named_class_on_word_boundaries() {
        assert_eq!(
            CellClass::parse_free_text("The image shows a Lymphocyte with dense chromatin."),
            Some(CellClass::Lymphocyte)
        );
        assert_eq!(
            CellClass::parse_free_text("Myeloblast; not a monocyte"),
            Some(CellClass::Blast)
        );
        // "mono" inside "monochrome" must not count.
        assert_eq!(CellClass::parse_free_text("a monochrome picture"), None);
        assert_eq!(CellClass::parse_free_text(""), None);
    }
}
