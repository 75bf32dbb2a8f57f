//! The 11 WBCAtt morphology attributes (Tsutsui et al., NeurIPS 2023 Datasets and Benchmarks).
//!
//! Each attribute takes one of a small fixed set of values; the value lists and their order are
//! part of the compact model's heads and therefore of every bundle.

use serde::{Deserialize, Serialize};

/// One morphology attribute and its allowed values, as spelled in the WBCAtt CSVs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attribute {
    /// Column name in the dataset CSV, e.g. `nucleus_shape`.
    pub key: &'static str,
    /// Human-readable name, e.g. `nucleus shape`.
    pub label: &'static str,
    /// Allowed values in head order.
    pub values: &'static [&'static str],
}

/// Number of WBCAtt attributes.
pub const NUM_ATTRIBUTES: usize = 11;

/// The attributes in the order of the dataset columns.
pub const ATTRIBUTES: [Attribute; NUM_ATTRIBUTES] = [
    Attribute {
        key: "cell_size",
        label: "cell size",
        values: &["small", "big"],
    },
    Attribute {
        key: "cell_shape",
        label: "cell shape",
        values: &["round", "irregular"],
    },
    Attribute {
        key: "nucleus_shape",
        label: "nucleus shape",
        values: &[
            "unsegmented-round",
            "unsegmented-indented",
            "unsegmented-band",
            "segmented-bilobed",
            "segmented-multilobed",
            "irregular",
        ],
    },
    Attribute {
        key: "nuclear_cytoplasmic_ratio",
        label: "nuclear-cytoplasmic ratio",
        values: &["low", "high"],
    },
    Attribute {
        key: "chromatin_density",
        label: "chromatin density",
        values: &["densely", "loosely"],
    },
    Attribute {
        key: "cytoplasm_vacuole",
        label: "cytoplasm vacuoles",
        values: &["no", "yes"],
    },
    Attribute {
        key: "cytoplasm_texture",
        label: "cytoplasm texture",
        values: &["clear", "frosted"],
    },
    Attribute {
        key: "cytoplasm_colour",
        label: "cytoplasm colour",
        values: &["light blue", "blue", "purple blue"],
    },
    Attribute {
        key: "granule_type",
        label: "granule type",
        values: &["nil", "small", "round", "coarse"],
    },
    Attribute {
        key: "granule_colour",
        label: "granule colour",
        values: &["nil", "pink", "red", "purple"],
    },
    Attribute {
        key: "granularity",
        label: "granularity",
        values: &["no", "yes"],
    },
];

/// Error for an attribute value that is not in the attribute's list.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("attribute {key}: unknown value {value:?} (allowed: {allowed})")]
pub struct UnknownAttributeValue {
    /// Attribute key.
    pub key: String,
    /// The offending value.
    pub value: String,
    /// Allowed values, comma separated.
    pub allowed: String,
}

impl Attribute {
    /// Index of `value` among the allowed values (case-insensitive, trimmed).
    pub fn value_index(&self, value: &str) -> Result<usize, UnknownAttributeValue> {
        let v = value.trim();
        self.values
            .iter()
            .position(|a| a.eq_ignore_ascii_case(v))
            .ok_or_else(|| UnknownAttributeValue {
                key: self.key.to_string(),
                value: value.to_string(),
                allowed: self.values.join(", "),
            })
    }

    /// Number of values (the width of this attribute's head).
    pub fn arity(&self) -> usize {
        self.values.len()
    }
}

/// A cell's attribute values, one optional index per attribute (None where unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AttributeSet(pub [Option<u8>; NUM_ATTRIBUTES]);

impl AttributeSet {
    /// Parses the 11 attribute columns of a dataset row; all empty gives an empty set.
    /// A partly filled row keeps what is there.
    pub fn from_strs(values: &[&str; NUM_ATTRIBUTES]) -> Result<Self, UnknownAttributeValue> {
        let mut out = [None; NUM_ATTRIBUTES];
        for (i, (attr, v)) in ATTRIBUTES.iter().zip(values).enumerate() {
            if !v.trim().is_empty() {
                out[i] = Some(attr.value_index(v)? as u8);
            }
        }
        Ok(AttributeSet(out))
    }

    /// True when no attribute is known.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(Option::is_none)
    }

    /// The value string of attribute `i`, if known.
    pub fn value(&self, i: usize) -> Option<&'static str> {
        self.0[i].map(|v| ATTRIBUTES[i].values[v as usize])
    }

    /// Value of the attribute with the given key, if known.
    pub fn get(&self, key: &str) -> Option<&'static str> {
        ATTRIBUTES.iter().position(|a| a.key == key).and_then(|i| self.value(i))
    }

    /// Map of attribute key to value string, for JSON output.
    pub fn to_map(&self) -> std::collections::BTreeMap<String, String> {
        (0..NUM_ATTRIBUTES)
            .filter_map(|i| self.value(i).map(|v| (ATTRIBUTES[i].key.to_string(), v.to_string())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_real_dataset_row_and_round_trips() {
        let row = [
            "big",
            "round",
            "segmented-bilobed",
            "low",
            "densely",
            "no",
            "clear",
            "light blue",
            "round",
            "red",
            "yes",
        ];
        let set = AttributeSet::from_strs(&row).unwrap();
        for (i, v) in row.iter().enumerate() {
            assert_eq!(set.value(i), Some(*v));
        }
        assert_eq!(set.get("granule_colour"), Some("red"));
        assert_eq!(set.to_map().len(), NUM_ATTRIBUTES);
    }

    #[test]
    fn empty_row_is_unknown_and_bad_value_is_an_error_naming_the_key() {
        let empty = AttributeSet::from_strs(&[""; NUM_ATTRIBUTES]).unwrap();
        assert!(empty.is_empty());
        let mut row = [""; NUM_ATTRIBUTES];
        row[2] = "trilobed";
        let err = AttributeSet::from_strs(&row).unwrap_err();
        assert_eq!(err.key, "nucleus_shape");
        assert!(err.to_string().contains("segmented-bilobed"));
    }
}
