//! Result types that cross process and network boundaries, versioned.
//!
//! Every wire message carries `schema_version`; readers refuse versions they do not know
//! instead of guessing. Bump [`SCHEMA_VERSION`] on any incompatible change.

use crate::attributes::AttributeSet;
use crate::classes::CellClass;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Schema version of the types in this module.
pub const SCHEMA_VERSION: u32 = 1;

/// What a classifier says about one cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellResult {
    /// Schema version ([`SCHEMA_VERSION`]).
    pub schema_version: u32,
    /// Predicted class, or `None` when the cell is left for review (Unidentified).
    pub class: Option<CellClass>,
    /// Probability of every class, by class name.
    pub probabilities: BTreeMap<String, f32>,
    /// Confidence in the reported class (the top probability).
    pub confidence: f32,
    /// Predicted morphology attributes (compact family); empty where the model has none.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Description of the cell.
    pub description: String,
    /// Cell's box in the source image's pixels `[x0, y0, x1, y1]`, where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bbox: Option<[u32; 4]>,
    /// Version of the model that produced the result.
    pub model_version: u64,
    /// Why the cell was left for review (set when `class` is `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review_reason: Option<ReviewReason>,
    /// How much the cell looks like the training cells, 0..1 (cosine to the k-th nearest
    /// training cell), where the model measures it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub familiarity: Option<f32>,
}

/// What an edge-cut cell's description says.
pub const EDGE_CUT_DESCRIPTION: &str =
    "Unidentified: cut by the edge of the field, so not classified; move the stage to see it whole.";

/// Why a cell is Unidentified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReviewReason {
    /// The top probability is below the review threshold.
    LowConfidence,
    /// The cell does not look like the training data (out of distribution).
    Unfamiliar,
    /// The model's class differs from the class of the most similar training cells.
    NeighboursDisagree,
    /// No stained cell was found in the image.
    NoCell,
    /// The cell is cut by the field's edge: not classified.
    EdgeCut,
}

impl CellResult {
    /// A cell cut by the edge of a field: reported, not classified.
    pub fn edge_cut(bbox: [u32; 4], model_version: u64) -> Self {
        CellResult {
            schema_version: SCHEMA_VERSION,
            class: None,
            probabilities: BTreeMap::new(),
            confidence: 0.0,
            attributes: BTreeMap::new(),
            description: EDGE_CUT_DESCRIPTION.into(),
            bbox: Some(bbox),
            model_version,
            review_reason: Some(ReviewReason::EdgeCut),
            familiarity: None,
        }
    }

    /// Builds a result from class probabilities in class order, applying a review threshold:
    /// below `min_confidence` the class is `None` (Unidentified).
    pub fn from_probabilities(
        probs: &[f32; crate::classes::NUM_CLASSES],
        attributes: &AttributeSet,
        description: String,
        min_confidence: f32,
        model_version: u64,
    ) -> Self {
        let (best, &conf) = probs
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .expect("six probabilities");
        let class = (conf >= min_confidence).then(|| CellClass::ALL[best]);
        CellResult {
            schema_version: SCHEMA_VERSION,
            class,
            probabilities: CellClass::ALL
                .iter()
                .map(|c| (c.name().to_string(), probs[c.index()]))
                .collect(),
            confidence: conf,
            attributes: attributes.to_map(),
            description,
            bbox: None,
            model_version,
            review_reason: (conf < min_confidence).then_some(ReviewReason::LowConfidence),
            familiarity: None,
        }
    }

    /// Display name of the reported class (`Unidentified` when left for review).
    pub fn class_name(&self) -> &'static str {
        self.class.map(CellClass::name).unwrap_or("Unidentified")
    }

    /// The classes by falling probability, whatever was reported (known class names and
    /// finite probabilities only; empty for a cell cut by the edge).
    pub fn likeliest(&self) -> Vec<(CellClass, f32)> {
        let mut v: Vec<(CellClass, f32)> = CellClass::ALL
            .into_iter()
            .filter_map(|c| self.probabilities.get(c.name()).map(|p| (c, *p)))
            .filter(|(_, p)| p.is_finite())
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    }

    /// The class with the highest probability, whatever was reported; `None` without
    /// probabilities (a cell cut by the edge).
    pub fn most_probable(&self) -> Option<CellClass> {
        self.likeliest().first().map(|l| l.0)
    }

    /// A cell the model set aside although its most probable class is Blast: it was not
    /// called a blast (too unsure, too small a nucleus, unlike the training cells or its
    /// neighbours), but it is the first cell a technician should look at.
    pub fn possible_blast(&self) -> bool {
        self.class.is_none()
            && matches!(
                self.review_reason,
                Some(ReviewReason::LowConfidence | ReviewReason::Unfamiliar | ReviewReason::NeighboursDisagree)
            )
            && self.most_probable() == Some(CellClass::Blast)
    }
}

/// A technician's review of one cell: the class they confirm or assign (`None`: not a white
/// cell, or cannot tell), stored next to the model's answer, never over it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Review {
    /// The technician's class.
    pub class: Option<CellClass>,
    /// Who reviewed (login name).
    pub by: String,
    /// When, seconds since the Unix epoch.
    pub at: u64,
}

/// One cell of a field: the model's answer and, once reviewed, the technician's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellRecord {
    /// What the model said (with the cell's box).
    pub result: CellResult,
    /// The technician's review, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review: Option<Review>,
}

/// What is known of a captured image apart from its cells: the part the appliance's record
/// ([`FieldRecord`]) and central's copy (`uplink::FieldInfo`) share, flattened into both on the
/// wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldHeader {
    /// Stable id: derived from the image's content, so the same image is one field.
    pub id: String,
    /// Slide the field belongs to.
    pub slide_id: String,
    /// When it was received, seconds since the Unix epoch.
    pub received_at: u64,
    /// Where it came from (`upload`, `inbox`, `camera`).
    pub source: String,
    /// Its file name where it had one.
    pub name: String,
    /// SHA-256 of the original image bytes (hex).
    pub image_sha256: String,
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
    /// Taken as one centred cell rather than a field.
    pub single_cell: bool,
    /// Pixel size used, µm.
    pub microns_per_pixel: f32,
}

/// One captured image (a microscope field, or a single-cell image) and its cells.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldRecord {
    /// Schema version ([`SCHEMA_VERSION`]).
    pub schema_version: u32,
    /// The image: id, slide, source, size, pixel size (its keys sit beside `cells`).
    #[serde(flatten)]
    pub header: FieldHeader,
    /// Cells found, in reading order.
    pub cells: Vec<CellRecord>,
}

impl std::ops::Deref for FieldRecord {
    type Target = FieldHeader;

    fn deref(&self) -> &FieldHeader {
        &self.header
    }
}

impl std::ops::DerefMut for FieldRecord {
    fn deref_mut(&mut self) -> &mut FieldHeader {
        &mut self.header
    }
}

/// Parses a wire message, refusing unknown schema versions.
pub fn parse_versioned<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, MessageError> {
    #[derive(Deserialize)]
    struct Probe {
        schema_version: u32,
    }
    let probe: Probe = serde_json::from_slice(bytes).map_err(|e| MessageError::Invalid(e.to_string()))?;
    if probe.schema_version != SCHEMA_VERSION {
        return Err(MessageError::UnsupportedVersion(probe.schema_version));
    }
    serde_json::from_slice(bytes).map_err(|e| MessageError::Invalid(e.to_string()))
}

/// Why a wire message was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MessageError {
    /// Not valid JSON for the type.
    #[error("invalid message: {0}")]
    Invalid(String),
    /// A schema version this build does not know.
    #[error("unsupported schema version {0} (this build speaks {SCHEMA_VERSION})")]
    UnsupportedVersion(u32),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_confidence_is_unidentified_and_round_trips_through_json() {
        let p = [0.05, 0.05, 0.3, 0.4, 0.1, 0.1];
        let r = CellResult::from_probabilities(&p, &AttributeSet::default(), "d".into(), 0.5, 2);
        assert_eq!(r.class, None);
        assert_eq!(r.class_name(), "Unidentified");
        assert_eq!(r.confidence, 0.4);
        let sure = CellResult::from_probabilities(&p, &AttributeSet::default(), "d".into(), 0.3, 2);
        assert_eq!(sure.class, Some(CellClass::Monocyte));
        let json = serde_json::to_vec(&sure).unwrap();
        let back: CellResult = parse_versioned(&json).unwrap();
        assert_eq!(back, sure);
    }

    #[test]
    fn the_likeliest_classes_come_by_falling_probability_whatever_was_reported() {
        let p = [0.05, 0.05, 0.3, 0.4, 0.1, 0.1];
        let mut r = CellResult::from_probabilities(&p, &AttributeSet::default(), "d".into(), 0.5, 2);
        let order: Vec<CellClass> = r.likeliest().iter().map(|l| l.0).collect();
        assert_eq!(&order[..2], &[CellClass::Monocyte, CellClass::Lymphocyte]);
        assert_eq!(order.len(), 6);
        assert_eq!(r.most_probable(), Some(CellClass::Monocyte), "though Unidentified");
        // A damaged probability and an unknown name are left out, not ranked.
        r.probabilities.insert("Monocyte".into(), f32::NAN);
        r.probabilities.insert("Megakaryocyte".into(), 0.9);
        assert_eq!(r.most_probable(), Some(CellClass::Lymphocyte));
        assert_eq!(r.likeliest().len(), 5);
        assert_eq!(CellResult::edge_cut([0, 0, 1, 1], 1).most_probable(), None);
    }

    #[test]
    fn unknown_schema_version_and_garbage_are_refused() {
        let p = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let mut v = serde_json::to_value(CellResult::from_probabilities(
            &p,
            &AttributeSet::default(),
            String::new(),
            0.0,
            1,
        ))
        .unwrap();
        v["schema_version"] = 99.into();
        let bytes = serde_json::to_vec(&v).unwrap();
        assert_eq!(
            parse_versioned::<CellResult>(&bytes),
            Err(MessageError::UnsupportedVersion(99))
        );
        assert!(matches!(
            parse_versioned::<CellResult>(b"{not json"),
            Err(MessageError::Invalid(_))
        ));
    }
}
