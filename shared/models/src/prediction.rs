//! What a model says of one cell, in a form neither family owns: the class probabilities
//! every family gives, and, where a family has them, features, attributes and a description of
//! its own. The classifier ([`crate::classify`]) turns it into a `CellResult`.

use wbc_protocol::attributes::{AttributeSet, NUM_ATTRIBUTES};
use wbc_protocol::classes::NUM_CLASSES;

/// One cell's prediction, whichever family made it: what every family gives (class
/// probabilities) and, each as an option, what only some give.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Probability of each class, in class order (calibrated where the bundle has a
    /// temperature).
    pub probs: [f32; NUM_CLASSES],
    /// Raw class logits.
    pub logits: [f32; NUM_CLASSES],
    /// Pooled backbone features (the space the out-of-distribution score is measured in).
    pub features: Vec<f32>,
    /// The pooled features before the pooled adaptation moved them into `features` (from the
    /// backbone in use: a site norm's copy where one is in use); `None` when they are
    /// `features`. A model that adapts only its pooled features fits the next adaptation on
    /// these.
    pub unadapted_features: Option<Vec<f32>>,
    /// How unlike the training cells this cell is (higher = less familiar), where the bundle
    /// has an out-of-distribution model.
    pub ood_score: Option<f32>,
    /// Whether the cell normalisation found a stained cell (`None` without normalisation).
    pub cell_found: Option<bool>,
    /// The cell's size as the normalisation measured it (`None` without normalisation).
    pub cell_size: Option<CellSize>,
    /// Whether the cell is cut by a black bar padding its picture: it lay at its field's edge,
    /// and no Blast call is made on it (`None` without normalisation).
    pub cell_cut: Option<bool>,
    /// Majority class of the most similar training cells, where the bundle has a bank.
    pub neighbour_class: Option<usize>,
    /// The morphology attributes, where the family has attribute heads (compact).
    pub attributes: Option<AttributeScores>,
    /// A description the model wrote itself (the mllama family generates one).
    pub description: Option<String>,
    /// The class logits of a site bundle's blast guard (the signed model it was taught
    /// from), where it has one.
    pub guard_logits: Option<[f32; NUM_CLASSES]>,
}

/// A cell's size as the cell normalisation measured it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CellSize {
    /// Cell diameter in the input image's pixels.
    pub diameter_px: f32,
    /// Extent of the nucleus in the input image's pixels.
    pub nucleus_px: f32,
    /// Pixel size of the input image (µm), where known.
    pub microns_per_pixel: Option<f32>,
}

impl CellSize {
    /// Nucleus extent in micrometres, where the pixel size is known.
    pub fn nucleus_um(&self) -> Option<f32> {
        self.microns_per_pixel.map(|u| self.nucleus_px * u)
    }
}

/// The attribute heads' answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttributeScores {
    /// Most probable value of each attribute.
    pub values: AttributeSet,
    /// Probability of the chosen value of each attribute.
    pub confidence: [f32; NUM_ATTRIBUTES],
}

impl Prediction {
    /// The pooled features before the pooled adaptation (see `unadapted_features`; empty for
    /// a family without pooled features).
    pub fn site_features(&self) -> &[f32] {
        self.unadapted_features.as_deref().unwrap_or(&self.features)
    }

    /// A prediction that is only class probabilities and, maybe, a description (a family
    /// without features or attribute heads); the logits are the log-probabilities.
    pub fn from_probabilities(probs: [f32; NUM_CLASSES], description: Option<String>) -> Self {
        Prediction {
            probs,
            logits: probs.map(|q| q.max(f32::MIN_POSITIVE).ln()),
            features: Vec::new(),
            unadapted_features: None,
            ood_score: None,
            cell_found: None,
            cell_size: None,
            cell_cut: None,
            neighbour_class: None,
            attributes: None,
            description,
            guard_logits: None,
        }
    }
}
