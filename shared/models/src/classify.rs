//! One cell image in, one [`CellResult`] out: the bundle's model behind one interface, used by
//! the trainer's evaluation and by the appliance alike.

use crate::adapt::{AdaptError, Adaptation, SourceStats};
use crate::calibrate::{CALIBRATION_PART, Calibration, KnnBank, OOD_BANK_PART};
use crate::compact::mobilenet::FEATURES;
use crate::compact::{CellSize, CompactModel, ModelError, Prediction};
use crate::describe::describe;
use burn::tensor::Device;
use image::RgbImage;
use rayon::prelude::*;
use wbc_cells::Prepare;
use wbc_cells::image::Preprocess;
use wbc_protocol::bundle::{Bundle, Family};
use wbc_protocol::classes::NUM_CLASSES;
use wbc_protocol::messages::{CellResult, ReviewReason};

/// Images preprocessed together and handed to the model in one call (a GPU runs them in one
/// forward pass; the CPU in runs of [`crate::compact::CPU_CELLS_PER_RUN`]).
pub(crate) const BATCH: usize = 32;

/// Llama 3.2 Vision behind the classifier: classes scored by the likelihood of their names as
/// the answer's start, the description generated.
pub struct MllamaEngine {
    model: crate::mllama::Mllama,
    prompting: crate::mllama::cell::Prompting,
    device: Device,
}

/// Tokens a generated description may take, at most.
const DESCRIPTION_TOKENS: usize = 64;

impl MllamaEngine {
    fn predict(&self, img: &RgbImage) -> Result<Prediction, crate::mllama::MllamaError> {
        let (probs, text) = crate::mllama::cell::classify_and_describe(
            &self.model,
            &self.prompting,
            img,
            DESCRIPTION_TOKENS,
            &self.device,
        )?;
        let probs: [f32; NUM_CLASSES] = probs
            .try_into()
            .map_err(|_| crate::mllama::MllamaError::Other("expected six class probabilities".into()))?;
        Ok(Prediction::from_probabilities(
            probs,
            (!text.is_empty()).then_some(text),
        ))
    }
}

/// The model behind a classifier.
#[derive(Clone)]
enum Engine {
    Compact(Box<CompactModel>),
    Mllama(std::sync::Arc<MllamaEngine>),
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Engine::Compact(m) => m.fmt(f),
            Engine::Mllama(_) => f.write_str("Mllama"),
        }
    }
}

/// A loaded, verified model ready to classify cell images.
#[derive(Debug, Clone)]
pub struct Classifier {
    model: Engine,
    pre: Preprocess,
    calibration: Calibration,
    knn: Option<KnnBank>,
    /// The training cells' feature statistics (from the familiarity bank), to adapt to a site.
    source: Option<std::sync::Arc<SourceStats>>,
    /// The site adaptation in use, if any.
    adaptation: Option<Adaptation>,
    /// The training cells' per-class moments of every backbone unit (a bundle's
    /// `unit-moments` part), to adapt the backbone itself to a site.
    unit_reference: Option<std::sync::Arc<crate::compact::site_norm::UnitReference>>,
    /// The signed model, kept while `model` is a copy whose backbone a site adaptation changed.
    signed: Option<Box<CompactModel>>,
    /// The bundle's preprocessing, kept while a site adaptation reads the site's pictures
    /// otherwise (the dark-nucleus rule).
    signed_pre: Option<Preprocess>,
    /// The clinic whose reviewed cells taught this model (a site bundle's manifest names it).
    taught_for: Option<String>,
    /// A blast guard's own preprocessing, where it differs from the taught model's (the site
    /// turned the dark-nucleus rule on; the signed model it guards with was not trained so).
    guard_pre: Option<Preprocess>,
    /// Model version from the bundle manifest.
    pub model_version: u64,
    /// Below this top probability a cell is reported as Unidentified.
    pub min_confidence: f32,
    /// Pixel size of the images this classifier is given (the camera's calibration), for
    /// models that see cells at a physical scale; the bundle's default when `None`.
    pub microns_per_pixel: Option<f32>,
}

impl Classifier {
    /// Builds a classifier from a verified bundle on a device.
    pub fn from_bundle(bundle: &Bundle, device: &Device) -> Result<Self, ModelError> {
        if bundle.manifest.family == Family::Mllama {
            let (prompting, model) = crate::mllama::cell::from_bundle(bundle, device)
                .map_err(|e| ModelError::Config(format!("mllama bundle: {e}")))?;
            return Ok(Classifier {
                model: Engine::Mllama(std::sync::Arc::new(MllamaEngine {
                    model,
                    prompting,
                    device: device.clone(),
                })),
                pre: bundle.manifest.preprocess.clone(),
                calibration: Calibration::default(),
                knn: None,
                source: None,
                adaptation: None,
                unit_reference: None,
                signed: None,
                signed_pre: None,
                taught_for: None,
                guard_pre: None,
                model_version: bundle.manifest.model_version,
                min_confidence: 0.0,
                microns_per_pixel: None,
            });
        }
        if bundle.manifest.classes.len() != NUM_CLASSES {
            return Err(ModelError::Config(format!(
                "bundle lists {} classes, expected {NUM_CLASSES}",
                bundle.manifest.classes.len()
            )));
        }
        let classifier = Self::new(
            CompactModel::from_bundle(bundle, device)?,
            bundle.manifest.preprocess.clone(),
            bundle.manifest.model_version,
        );
        // Bundles made before calibration existed have neither part.
        if !bundle.manifest.parts.contains_key(CALIBRATION_PART) {
            return Ok(classifier);
        }
        let cal: Calibration = serde_json::from_slice(bundle.part(CALIBRATION_PART)?)
            .map_err(|e| ModelError::Config(format!("{CALIBRATION_PART}: {e}")))?;
        let mut source = None;
        let knn = match &cal.ood {
            Some(o) => {
                let (features, labels) = KnnBank::from_safetensors(bundle.part(OOD_BANK_PART)?)
                    .map_err(|e| ModelError::Config(e.to_string()))?;
                source = Some(std::sync::Arc::new(SourceStats::from_bank(&features, &labels)));
                Some(KnnBank::new(features, labels, o.k, device).map_err(|e| ModelError::Config(e.to_string()))?)
            }
            None => None,
        };
        let mut classifier = classifier.with_calibration(cal, knn)?;
        classifier.source = source;
        classifier.unit_reference = site_norm::unit_reference(bundle, &classifier.model)?;
        classifier.taught_for = bundle.manifest.clinic.clone();
        Ok(classifier)
    }

    /// Applies a temperature and, with `ood` in the calibration, a familiarity bank.
    pub fn with_calibration(mut self, cal: Calibration, knn: Option<KnnBank>) -> Result<Self, ModelError> {
        if !(cal.temperature.is_finite() && cal.temperature > 0.0) {
            return Err(ModelError::Config(format!(
                "temperature {} is not a positive number",
                cal.temperature
            )));
        }
        if !(0.0..=1.0).contains(&cal.blast_min_confidence) {
            return Err(ModelError::Config(format!(
                "blast threshold {} is not a probability",
                cal.blast_min_confidence
            )));
        }
        if !(cal.blast_min_nucleus_um.is_finite() && cal.blast_min_nucleus_um >= 0.0) {
            return Err(ModelError::Config(format!(
                "blast nucleus size {} is not a size in µm",
                cal.blast_min_nucleus_um
            )));
        }
        if cal.ood.is_some() != knn.is_some() {
            return Err(ModelError::Config(
                "a familiarity threshold needs its feature bank and vice versa".into(),
            ));
        }
        let has_guard = matches!(&self.model, Engine::Compact(m) if m.has_guard());
        if cal.guard.is_some() != has_guard {
            return Err(ModelError::Config(format!(
                "a blast guard needs both its settings in the calibration and its weights ({})",
                crate::calibrate::GUARD_PART
            )));
        }
        if let Some(g) = &cal.guard
            && !(g.temperature.is_finite() && g.temperature > 0.0 && (0.0..=1.0).contains(&g.min_taught_blast))
        {
            return Err(ModelError::Config(format!(
                "blast guard: temperature {} or taught blast probability {} out of range",
                g.temperature, g.min_taught_blast
            )));
        }
        self.guard_pre = cal.guard.as_ref().and_then(|g| {
            let mut pre = self.pre.clone();
            let cell = pre.cell.as_mut()?;
            if cell.dark_nucleus == g.dark_nucleus {
                return None;
            }
            cell.dark_nucleus = g.dark_nucleus;
            Some(pre)
        });
        self.calibration = cal;
        self.knn = knn;
        Ok(self)
    }

    /// Calibration in use.
    pub fn calibration(&self) -> &Calibration {
        &self.calibration
    }

    /// The familiarity bank in use, where the bundle has one.
    pub fn bank(&self) -> Option<&KnnBank> {
        self.knn.as_ref()
    }

    /// A classifier around a model that is already loaded (e.g. one being exported).
    pub fn new(model: CompactModel, pre: Preprocess, model_version: u64) -> Self {
        Classifier {
            model: Engine::Compact(Box::new(model)),
            pre,
            calibration: Calibration::default(),
            knn: None,
            source: None,
            adaptation: None,
            unit_reference: None,
            signed: None,
            signed_pre: None,
            taught_for: None,
            guard_pre: None,
            model_version,
            min_confidence: 0.0,
            microns_per_pixel: None,
        }
    }

    /// Sets the review threshold.
    pub fn with_min_confidence(mut self, c: f32) -> Self {
        self.min_confidence = c;
        self
    }

    /// Sets the pixel size of the images to come (µm per pixel).
    pub fn with_microns_per_pixel(mut self, um: Option<f32>) -> Self {
        self.microns_per_pixel = um;
        self
    }

    /// Whether the model writes its answers (mllama: a generated description with each cell),
    /// rather than only scoring the classes.
    pub fn generates_text(&self) -> bool {
        matches!(self.model, Engine::Mllama(_))
    }

    /// Preprocessing of this model.
    pub fn preprocess(&self) -> &Preprocess {
        &self.pre
    }

    /// Raw predictions for cell images (any size), at the classifier's pixel size.
    pub fn predict(&self, images: &[RgbImage]) -> Vec<Prediction> {
        self.predict_at(images, &vec![self.microns_per_pixel; images.len()])
    }

    /// Raw predictions for cell images, each with its own pixel size (µm; the bundle's
    /// default where `None`). `scales` has one entry per image.
    pub fn predict_at(&self, images: &[RgbImage], scales: &[Option<f32>]) -> Vec<Prediction> {
        self.predict_adapted(images, scales, self.adaptation.as_ref())
    }

    /// The site adaptation in use, if any.
    pub fn adaptation(&self) -> Option<&Adaptation> {
        self.adaptation.as_ref()
    }

    /// Uses an adaptation fitted earlier (by [`Classifier::fit_adaptation`]; stored by the
    /// appliance), after checking that it was fitted for this model.
    pub fn with_adaptation(mut self, adaptation: Option<Adaptation>) -> Result<Self, AdaptError> {
        if let Some(a) = &adaptation {
            if self.source.is_none() {
                return Err(AdaptError::NoBank);
            }
            a.check(self.model_version)?;
        }
        self = self.with_site_norm(adaptation.as_ref().and_then(|a| a.units.as_ref()))?;
        self.adaptation = adaptation;
        Ok(self)
    }

    /// The pooled features of cell images before the pooled adaptation (`images.len() ×
    /// FEATURES`, row-major), from the backbone in use (the signed one, or a copy a site norm
    /// adapted): what the pooled adaptation is fitted on.
    /// `scales` has one pixel size per image, as for [`Classifier::predict_at`].
    pub fn site_features(&self, images: &[RgbImage], scales: &[Option<f32>]) -> Result<Vec<f32>, AdaptError> {
        if self.source.is_none() {
            return Err(AdaptError::NoBank);
        }
        Ok(self
            .predict_adapted(images, scales, None)
            .into_iter()
            .flat_map(|p| p.features)
            .collect())
    }

    /// Whether this model can adapt to a site (a compact model with a bank of training cells'
    /// features, not already taught a clinic's cells: a site bundle's head and bank were fitted
    /// to the site's own features, which an adaptation would move).
    pub fn can_adapt(&self) -> bool {
        self.source.is_some() && matches!(self.model, Engine::Compact(_)) && self.taught_for.is_none()
    }

    /// The clinic whose reviewed cells taught this model (`trainer adapt`), if any.
    pub fn taught_for(&self) -> Option<&str> {
        self.taught_for.as_deref()
    }

    /// Fits a site adaptation to the unadapted features of the site's cells (from
    /// [`Classifier::site_features`]); it is not put to use until [`Classifier::with_adaptation`].
    pub fn fit_adaptation(&self, site_features: &[f32]) -> Result<Adaptation, AdaptError> {
        let (Some(source), Engine::Compact(model)) = (&self.source, &self.model) else {
            return Err(AdaptError::NoBank);
        };
        let t = self.calibration.temperature;
        Adaptation::fit(site_features, source, self.model_version, |f| {
            model
                .predict_features(f.to_vec(), f.len() / FEATURES)
                .iter()
                .map(|p| crate::compact::softmax_t(&p.logits, t))
                .collect()
        })
    }

    fn predict_adapted(
        &self,
        images: &[RgbImage],
        scales: &[Option<f32>],
        adaptation: Option<&Adaptation>,
    ) -> Vec<Prediction> {
        assert_eq!(images.len(), scales.len(), "one pixel size per image");
        let model = match &self.model {
            Engine::Compact(m) => m,
            Engine::Mllama(e) => {
                // The whole cell image goes to the image processor; a failure (a tokenizer
                // error) leaves the cell unclassified rather than guessing.
                return images
                    .iter()
                    .map(|img| {
                        e.predict(img).unwrap_or_else(|err| {
                            tracing::error!(error = %err, "mllama could not classify a cell");
                            // Uninformative, and sent to review as a cell that could not be read.
                            let mut p = Prediction::from_probabilities([1.0 / NUM_CLASSES as f32; NUM_CLASSES], None);
                            p.cell_found = Some(false);
                            p
                        })
                    })
                    .collect();
            }
        };
        let s = self.pre.input_size as usize;
        let mut out = Vec::with_capacity(images.len());
        for (chunk, um) in images.chunks(BATCH).zip(scales.chunks(BATCH)) {
            // Each image's segmentation and colour normalisation is independent of the others':
            // on all cores (on two, a 32-cell batch's preprocessing takes half the time).
            let prepared: Vec<_> = chunk
                .par_iter()
                .zip(um)
                .map(|(img, um)| {
                    let (view, cell) = self.pre.prepare(img, None, *um);
                    let mut values = Vec::with_capacity(3 * s * s);
                    self.pre.normalise_into(&view, &mut values);
                    // The guard's own view, only where it is not the taught model's: with the
                    // rule on for the site and off for the guard, where the rule fired.
                    let site_rule = self.pre.cell.as_ref().is_some_and(|c| c.dark_nucleus);
                    let differs = !site_rule || cell.as_ref().is_some_and(|c| c.dark_split);
                    let guard = self.guard_pre.as_ref().filter(|_| differs).and_then(|g| {
                        let (view, _) = g.prepare(img, None, *um);
                        let mut v = Vec::with_capacity(3 * s * s);
                        g.normalise_into(&view, &mut v);
                        (v != values).then_some(v)
                    });
                    let found = cell.map(|c| {
                        (
                            c.found,
                            CellSize {
                                diameter_px: c.diameter_px,
                                nucleus_px: c.nucleus_px,
                                microns_per_pixel: c.microns_per_pixel,
                            },
                            c.cut_by_border,
                        )
                    });
                    (values, guard, found)
                })
                .collect();
            let mut buf = Vec::with_capacity(chunk.len() * 3 * s * s);
            let mut found = Vec::with_capacity(chunk.len());
            // Where no cell of the batch looks different to the guard, it shares the
            // taught model's first blocks; otherwise it sees the whole batch its own way.
            let guard_views = prepared.iter().any(|(_, g, _)| g.is_some()).then(|| {
                prepared
                    .iter()
                    .flat_map(|(v, g, _)| g.as_ref().unwrap_or(v).iter().copied())
                    .collect::<Vec<f32>>()
            });
            for (values, _, f) in prepared {
                buf.extend_from_slice(&values);
                found.push(f);
            }
            let mut preds = model.predict_guarded(buf, guard_views, chunk.len(), s);
            if let Some(a) = adaptation {
                let mut f: Vec<f32> = preds.iter().flat_map(|p| p.features.iter().copied()).collect();
                f.chunks_exact_mut(FEATURES).for_each(|row| a.apply(row));
                let adapted = model.predict_features(f, chunk.len());
                preds = preds
                    .into_iter()
                    .zip(adapted)
                    .map(|(raw, mut p)| {
                        p.unadapted_features = Some(raw.features);
                        p.guard_logits = raw.guard_logits;
                        p
                    })
                    .collect();
            }
            let t = self.calibration.temperature;
            let scores = self.knn.as_ref().map(|k| {
                let f: Vec<f32> = preds.iter().flat_map(|p| p.features.iter().copied()).collect();
                k.scores(&f)
            });
            for (i, p) in preds.iter_mut().enumerate() {
                if t != 1.0 {
                    p.probs = crate::compact::softmax_t(&p.logits, t);
                }
                p.ood_score = scores.as_ref().map(|s| s[i].score);
                p.neighbour_class = scores.as_ref().map(|s| s[i].vote);
                p.cell_found = found[i].map(|f| f.0);
                p.cell_size = found[i].map(|f| f.1);
                p.cell_cut = found[i].map(|f| f.2);
            }
            out.extend(preds);
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
        let class = wbc_protocol::classes::CellClass::ALL[best];
        // Attributes are reported only for classes whose attributes the heads were trained on.
        let trained_on = match &self.model {
            Engine::Compact(m) => m.config.attribute_classes.contains(&best),
            Engine::Mllama(_) => false,
        };
        let attributes = if let Some(a) = p.attributes.filter(|_| trained_on) {
            a.values
        } else {
            wbc_protocol::attributes::AttributeSet::default()
        };
        let mut r = CellResult::from_probabilities(
            &p.probs,
            &attributes,
            p.description.clone().unwrap_or_else(|| describe(class, &attributes)),
            self.min_confidence,
            self.model_version,
        );
        r.familiarity = p.ood_score.map(|s| 1.0 - s);
        let reason = review_reason(p, best, &self.calibration, self.min_confidence);
        // A blast call held back by its size alone (its probability was enough).
        let small = small_for_a_blast(p, &self.calibration).filter(|_| {
            class == wbc_protocol::classes::CellClass::Blast && r.confidence >= self.calibration.blast_min_confidence
        });
        r.description = match reason {
            None => r.description,
            Some(ReviewReason::EdgeCut) => wbc_protocol::messages::EDGE_CUT_DESCRIPTION.into(),
            Some(ReviewReason::NoCell) => {
                "Unidentified: no stained white cell was found in the image; left for review.".into()
            }
            Some(ReviewReason::Unfamiliar) => format!(
                "Unidentified: this cell does not look like the cells the model was trained on; left for review. Closest: {}",
                r.description
            ),
            Some(ReviewReason::NeighboursDisagree) => format!(
                "Unidentified: the model says {} but the most similar training cells are {}; left for review.",
                class.name(),
                wbc_protocol::classes::CellClass::ALL[p.neighbour_class.unwrap_or(best)].name()
            ),
            Some(ReviewReason::LowConfidence) if small.is_some() => format!(
                "Unidentified: possibly a blast, but its nucleus ({:.1} µm) is smaller than those of the blasts the model learnt from (at least {:.1} µm); held back for review as a possible blast. {}",
                small.unwrap_or_default(),
                self.calibration.blast_min_nucleus_um,
                r.description
            ),
            Some(ReviewReason::LowConfidence)
                if class == wbc_protocol::classes::CellClass::Blast && p.cell_cut == Some(true) =>
            {
                format!(
                    "Unidentified: possibly a blast, but the cell is cut by the edge of its field (its picture was padded there), so its size cannot be judged; held back for review as a possible blast. {}",
                    r.description
                )
            }
            Some(ReviewReason::LowConfidence) if class == wbc_protocol::classes::CellClass::Blast => format!(
                "Unidentified: possibly a blast (probability {:.2}, below the {:.2} a blast call needs); held back for review as a possible blast. {}",
                r.confidence, self.calibration.blast_min_confidence, r.description
            ),
            Some(ReviewReason::LowConfidence) => format!(
                "Unidentified (confidence {:.2}); left for review. Closest: {}",
                r.confidence, r.description
            ),
        };
        if reason.is_some() {
            r.class = None;
        }
        r.review_reason = reason;
        if let Some(signed) = guard_holds_back(p, best, reason, &self.calibration) {
            let g = self.calibration.guard.as_ref().expect("a guard held the cell back");
            let blast = wbc_protocol::classes::CellClass::Blast;
            r.description = format!(
                "Unidentified: possibly a blast. The model this clinic's model was taught from (version {}) calls it a blast \
                 (probability {:.2}); this clinic's model says {} ({:.2}; Blast {:.3}). Held back for review as a possible blast. {}",
                g.from_model_version,
                signed[blast.index()],
                class.name(),
                p.probs[best],
                p.probs[blast.index()],
                describe(class, &attributes)
            );
            r.probabilities = wbc_protocol::classes::CellClass::ALL
                .iter()
                .map(|c| (c.name().to_string(), signed[c.index()]))
                .collect();
            r.confidence = signed[blast.index()];
            r.class = None;
            r.review_reason = Some(ReviewReason::LowConfidence);
        }
        r
    }
}

/// The signed model's probabilities, where a site bundle's blast guard holds the cell back as
/// a possible blast: the taught model neither calls it a blast nor holds it back as one, the
/// signed model's most probable class is Blast, and the taught model gives Blast at least the
/// guard's `min_taught_blast` (see [`crate::calibrate::BlastGuard`]). A picture without a cell
/// stays what it is.
pub fn guard_holds_back(
    p: &Prediction,
    best: usize,
    reason: Option<ReviewReason>,
    cal: &Calibration,
) -> Option<[f32; NUM_CLASSES]> {
    let blast = wbc_protocol::classes::CellClass::Blast.index();
    let (g, logits) = (cal.guard.as_ref()?, p.guard_logits?);
    if best == blast || reason == Some(ReviewReason::NoCell) || p.probs[blast] < g.min_taught_blast {
        return None;
    }
    let signed = crate::compact::softmax_t(&logits, g.temperature);
    let top = (0..NUM_CLASSES).max_by(|&a, &b| signed[a].total_cmp(&signed[b]))?;
    (top == blast).then_some(signed)
}

/// The nucleus extent (µm) of a cell whose nucleus is too small for a Blast call under `cal`'s
/// size check; `None` when it is large enough, its size is unknown or there is no check.
pub fn small_for_a_blast(p: &Prediction, cal: &Calibration) -> Option<f32> {
    let nucleus = p.cell_size.and_then(|c| c.nucleus_um())?;
    (cal.blast_min_nucleus_um > 0.0 && nucleus < cal.blast_min_nucleus_um).then_some(nucleus)
}

/// Why a prediction whose most probable class is `best` must go to review, if it must; the
/// first rule that applies wins: no cell found, unfamiliar, neighbours disagree, a blast below
/// the blast threshold, with a nucleus too small for one or cut by a bar padding its picture
/// (mirrored, half a cell looks like a large one), below the general review threshold.
pub fn review_reason(p: &Prediction, best: usize, cal: &Calibration, min_confidence: f32) -> Option<ReviewReason> {
    let confidence = p.probs[best];
    let ood = cal.ood.as_ref();
    if p.cell_found == Some(false) {
        Some(ReviewReason::NoCell)
    } else if ood.zip(p.ood_score).is_some_and(|(o, s)| s > o.threshold) {
        Some(ReviewReason::Unfamiliar)
    } else if ood
        .zip(p.neighbour_class)
        .is_some_and(|(o, v)| o.require_agreement && v != best)
    {
        Some(ReviewReason::NeighboursDisagree)
    } else if (best == wbc_protocol::classes::CellClass::Blast.index()
        && (confidence < cal.blast_min_confidence || small_for_a_blast(p, cal).is_some() || p.cell_cut == Some(true)))
        || confidence < min_confidence
    {
        Some(ReviewReason::LowConfidence)
    } else {
        None
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
                wbc_cells::image::decode_rgb(bytes, &wbc_cells::image::DecodeLimits::default())
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

mod site_norm;
pub use site_norm::{MAX_NORM_CELLS, NORM_BLOCKS};
#[cfg(test)]
mod tests;
