//! One cell image in, one [`CellResult`] out: the bundle's model behind one interface, used by
//! the trainer's evaluation and by the appliance alike.

use crate::bundle::{Bundle, Family};
use crate::classes::NUM_CLASSES;
use crate::compact::{CompactModel, ModelError, Prediction};
use crate::describe::describe;
use crate::image::Preprocess;
use crate::messages::CellResult;
use burn::tensor::Device;
use image::RgbImage;

/// Images per forward pass.
const BATCH: usize = 32;

/// A loaded, verified model ready to classify cell images.
#[derive(Debug, Clone)]
pub struct Classifier {
    model: CompactModel,
    pre: Preprocess,
    /// Model version from the bundle manifest.
    pub model_version: u64,
    /// Below this top probability a cell is reported as Unidentified.
    pub min_confidence: f32,
}

impl Classifier {
    /// Builds a classifier from a verified bundle on a device.
    pub fn from_bundle(bundle: &Bundle, device: &Device) -> Result<Self, ModelError> {
        match bundle.manifest.family {
            Family::Compact => {}
            other => {
                return Err(ModelError::Config(format!(
                    "model family {other:?} is not supported by this build"
                )));
            }
        }
        if bundle.manifest.classes.len() != NUM_CLASSES {
            return Err(ModelError::Config(format!(
                "bundle lists {} classes, expected {NUM_CLASSES}",
                bundle.manifest.classes.len()
            )));
        }
        Ok(Self::new(
            CompactModel::from_bundle(bundle, device)?,
            bundle.manifest.preprocess.clone(),
            bundle.manifest.model_version,
        ))
    }

    /// A classifier around a model that is already loaded (e.g. one being exported).
    pub fn new(model: CompactModel, pre: Preprocess, model_version: u64) -> Self {
        Classifier {
            model,
            pre,
            model_version,
            min_confidence: 0.0,
        }
    }

    /// Sets the review threshold.
    pub fn with_min_confidence(mut self, c: f32) -> Self {
        self.min_confidence = c;
        self
    }

    /// Preprocessing of this model.
    pub fn preprocess(&self) -> &Preprocess {
        &self.pre
    }

    /// Raw predictions for cell images (any size: centre-cropped and resized).
    pub fn predict(&self, images: &[RgbImage]) -> Vec<Prediction> {
        let s = self.pre.input_size as usize;
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(BATCH) {
            let mut buf = Vec::with_capacity(chunk.len() * 3 * s * s);
            for img in chunk {
                self.pre.normalise_into(&self.pre.to_square(img), &mut buf);
            }
            out.extend(self.model.predict(buf, chunk.len(), s));
        }
        out
    }

    /// Classifies and describes cell images.
    pub fn classify(&self, images: &[RgbImage]) -> Vec<CellResult> {
        self.predict(images).into_iter().map(|p| self.result(&p)).collect()
    }

    /// Turns a prediction into a result: class (or Unidentified), probabilities, description
    /// grounded in the predicted attributes.
    pub fn result(&self, p: &Prediction) -> CellResult {
        let best = p
            .probs
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap_or(0);
        let class = crate::classes::CellClass::ALL[best];
        // Attributes are reported only for classes whose attributes the heads were trained on.
        let attributes = if self.model.config.attribute_classes.contains(&best) {
            p.attributes
        } else {
            crate::attributes::AttributeSet::default()
        };
        let mut r = CellResult::from_probabilities(
            &p.probs,
            &attributes,
            describe(class, &attributes),
            self.min_confidence,
            self.model_version,
        );
        if r.class.is_none() {
            r.description = format!(
                "Unidentified (confidence {:.2}); left for review. Closest: {}",
                r.confidence, r.description
            );
        }
        r
    }
}

/// Name of the self-test description inside a bundle.
pub const SELFTEST_PART: &str = "selftest.json";

/// One golden self-test case stored in a bundle.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SelfTestCase {
    /// Part holding the image (PNG).
    pub image: String,
    /// Expected class probabilities, in class order.
    pub probabilities: Vec<f32>,
}

/// The bundle's self-test: cases and the tolerance on each probability.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SelfTest {
    /// Largest allowed absolute difference of any probability.
    pub tolerance: f32,
    /// Cases.
    pub cases: Vec<SelfTestCase>,
}

/// Why a bundle failed its self-test.
#[derive(Debug, thiserror::Error)]
pub enum SelfTestError {
    /// The bundle has no or a malformed self-test.
    #[error("self-test is missing or malformed: {0}")]
    Malformed(String),
    /// A case's output differs from the expected one.
    #[error("self-test case {image}: probability differs by {diff:.5} (tolerance {tolerance})")]
    Mismatch {
        /// Case image.
        image: String,
        /// Largest difference.
        diff: f32,
        /// Tolerance.
        tolerance: f32,
    },
}

impl Classifier {
    /// Runs the bundle's golden self-test images and compares with the expected outputs.
    /// Returns the number of cases checked.
    pub fn self_test(&self, bundle: &Bundle) -> Result<usize, SelfTestError> {
        let bad = |e: String| SelfTestError::Malformed(e);
        let spec: SelfTest = serde_json::from_slice(bundle.part(SELFTEST_PART).map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(e.to_string()))?;
        if spec.cases.is_empty() {
            return Err(bad("no cases".into()));
        }
        let mut images = Vec::new();
        for c in &spec.cases {
            let bytes = bundle.part(&c.image).map_err(|e| bad(e.to_string()))?;
            images.push(
                crate::image::decode_rgb(bytes, &crate::image::DecodeLimits::default())
                    .map_err(|e| bad(format!("{}: {e}", c.image)))?,
            );
        }
        for (case, p) in spec.cases.iter().zip(self.predict(&images)) {
            if case.probabilities.len() != NUM_CLASSES {
                return Err(bad(format!("{}: expected {NUM_CLASSES} probabilities", case.image)));
            }
            let diff = case
                .probabilities
                .iter()
                .zip(p.probs)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            if diff.is_nan() || diff > spec.tolerance {
                return Err(SelfTestError::Mismatch {
                    image: case.image.clone(),
                    diff,
                    tolerance: spec.tolerance,
                });
            }
        }
        Ok(spec.cases.len())
    }
}
