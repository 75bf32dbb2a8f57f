//! Adaptation to a site without labels: the features the heads read, moved so that the site's
//! cells have the statistics the training cells had.
//!
//! A clinic's stain, camera and optics shift every channel of the pooled backbone features;
//! the heads, the familiarity bank and the calibration were all fitted to the training
//! sources' channels. As AdaBN (Li et al. 2016) re-estimates batch statistics on the target
//! domain, this re-estimates the per-channel mean and spread of the pooled features on the
//! site's unlabelled cells and maps each channel onto the training cells' mean and spread
//! (`f' = shift + scale · f`). The signed weights never change; the heads, the bank and the
//! calibration then see features in the space they were fitted in.
//!
//! The site's mix of classes is not the bank's (the bank holds as many blasts as
//! neutrophils; a normal slide holds none), and matching the site's mean to a mix it does not
//! have would pull its cells towards the classes it lacks. So the training side's statistics
//! are those of a mixture of the bank's classes, weighted by the site's class mix, which is
//! estimated from the adapted predictions themselves and refined a few times (the EM of
//! Saerens et al. 2002 for a prior shift), starting from normal cells only.

use crate::compact::mobilenet::FEATURES;
use serde::{Deserialize, Serialize};
use wbc_protocol::classes::{CellClass, NUM_CLASSES};

const BLAST: usize = CellClass::Blast as usize;

/// Fewest site cells an adaptation is fitted on: below it the statistics are noise.
pub const MIN_CELLS: usize = 30;
/// EM rounds over the site's class mix.
const ROUNDS: usize = 4;
/// A channel's spread is scaled by at most this factor (and at least its inverse): a channel
/// that is nearly constant at the site must not be blown up into noise.
const MAX_SCALE: f32 = 4.0;
/// Added to variances before their ratio is taken.
const EPS: f64 = 1e-4;
/// Share of blasts assumed at the start of the EM (a site's slides are mostly normal).
const START_BLAST_SHARE: f64 = 0.02;

/// The class mix a site is assumed to have before anything is known of it: normal cells of
/// every class alike, and a few blasts.
pub fn start_mix() -> [f64; NUM_CLASSES] {
    let mut mix = [(1.0 - START_BLAST_SHARE) / (NUM_CLASSES - 1) as f64; NUM_CLASSES];
    mix[BLAST] = START_BLAST_SHARE;
    mix
}

/// The mix a backbone adaptation's second fit is made towards: the site's normal classes as a
/// first adaptation estimated them, and blasts at the starting share whatever was estimated (a
/// site whose cells the network reads as blasts must not pull the reference towards blasts).
pub fn normal_mix(estimated: &[f32; NUM_CLASSES]) -> [f64; NUM_CLASSES] {
    let normal: f64 = (0..NUM_CLASSES)
        .filter(|&c| c != BLAST)
        .map(|c| estimated[c] as f64)
        .sum();
    if !(normal.is_finite() && normal > 0.0) {
        return start_mix();
    }
    let mut mix = [0f64; NUM_CLASSES];
    for c in (0..NUM_CLASSES).filter(|&c| c != BLAST) {
        mix[c] = estimated[c] as f64 / normal * (1.0 - START_BLAST_SHARE);
    }
    mix[BLAST] = START_BLAST_SHARE;
    mix
}

/// Per-class first and second moments of the training cells' features (from the bundle's
/// familiarity bank, which holds training cells of every class).
#[derive(Debug, Clone, PartialEq)]
pub struct SourceStats {
    mean: Vec<[f64; FEATURES]>,
    second: Vec<[f64; FEATURES]>,
    present: [bool; NUM_CLASSES],
}

impl SourceStats {
    /// From `n × FEATURES` row-major features and their classes.
    pub fn from_bank(features: &[f32], labels: &[u8]) -> SourceStats {
        let mut mean = vec![[0f64; FEATURES]; NUM_CLASSES];
        let mut second = vec![[0f64; FEATURES]; NUM_CLASSES];
        let mut count = [0usize; NUM_CLASSES];
        for (row, &c) in features.chunks_exact(FEATURES).zip(labels) {
            let c = c as usize;
            if c >= NUM_CLASSES {
                continue;
            }
            count[c] += 1;
            for (j, &v) in row.iter().enumerate() {
                mean[c][j] += v as f64;
                second[c][j] += (v as f64) * (v as f64);
            }
        }
        for c in 0..NUM_CLASSES {
            let n = count[c].max(1) as f64;
            mean[c].iter_mut().for_each(|v| *v /= n);
            second[c].iter_mut().for_each(|v| *v /= n);
        }
        SourceStats {
            mean,
            second,
            present: count.map(|n| n > 0),
        }
    }

    /// Mean and variance of each channel for a mixture of the classes weighted by `mix`.
    fn mixture(&self, mix: &[f64; NUM_CLASSES]) -> (Vec<f64>, Vec<f64>) {
        let total: f64 = (0..NUM_CLASSES).filter(|&c| self.present[c]).map(|c| mix[c]).sum();
        let mut m = vec![0f64; FEATURES];
        let mut s = vec![0f64; FEATURES];
        for c in (0..NUM_CLASSES).filter(|&c| self.present[c]) {
            let w = mix[c] / total.max(1e-12);
            for j in 0..FEATURES {
                m[j] += w * self.mean[c][j];
                s[j] += w * self.second[c][j];
            }
        }
        let var = s.iter().zip(&m).map(|(s, m)| (s - m * m).max(0.0)).collect();
        (m, var)
    }
}

/// What an adaptation changes: each feature channel's scale and shift, and what it was fitted
/// on. Tied to the model it was fitted for: another model's features are another space.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Adaptation {
    /// Model version whose features this adapts.
    pub model_version: u64,
    /// Site cells it was fitted on.
    pub cells: usize,
    /// The site's class mix as the adapted model sees it (class order).
    pub class_mix: [f32; NUM_CLASSES],
    /// Per-channel scale.
    pub scale: Vec<f32>,
    /// Per-channel shift.
    pub shift: Vec<f32>,
    /// The backbone's own adaptation, unit by unit (bundles with the training cells' unit
    /// moments); the pooled features above are then those of the adapted backbone.
    #[serde(default)]
    pub units: Option<crate::compact::site_norm::SiteNorm>,
}

/// Why an adaptation could not be fitted.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AdaptError {
    /// Too few site cells.
    #[error("{got} cells are too few to adapt to a site (at least {MIN_CELLS})")]
    TooFewCells {
        /// Cells given.
        got: usize,
    },
    /// Features of the wrong width or not finite.
    #[error("site features are not {FEATURES}-wide finite rows")]
    BadFeatures,
    /// The model has no training cells' features to adapt towards (no familiarity bank, or a
    /// family without pooled features).
    #[error("this model has no feature bank of training cells to adapt to a site against")]
    NoBank,
    /// A backbone adaptation does not fit this model's backbone (another model's, or damaged).
    #[error("the backbone adaptation does not fit this model's backbone")]
    NormDoesNotFit,
    /// A backbone adaptation was given for a bundle without its training cells' unit moments.
    #[error("this model's bundle has no unit moments of training cells to adapt its backbone against")]
    NoUnitMoments,
    /// The stored adaptation does not fit this model.
    #[error("the adaptation was fitted for model version {fitted}, not {model}")]
    OtherModel {
        /// Model version it was fitted for.
        fitted: u64,
        /// Model version in use.
        model: u64,
    },
}

impl Adaptation {
    /// Fits the adaptation to `site` (`m × FEATURES` unadapted pooled features of the site's
    /// cells). `probs` gives the (calibrated) class probabilities of features, row by row; it
    /// is how the site's class mix is estimated.
    pub fn fit(
        site: &[f32],
        source: &SourceStats,
        model_version: u64,
        probs: impl Fn(&[f32]) -> Vec<[f32; NUM_CLASSES]>,
    ) -> Result<Adaptation, AdaptError> {
        if !site.len().is_multiple_of(FEATURES) || site.iter().any(|v| !v.is_finite()) {
            return Err(AdaptError::BadFeatures);
        }
        let m = site.len() / FEATURES;
        if m < MIN_CELLS {
            return Err(AdaptError::TooFewCells { got: m });
        }
        let mut mean = vec![0f64; FEATURES];
        let mut second = vec![0f64; FEATURES];
        for row in site.chunks_exact(FEATURES) {
            for (j, &v) in row.iter().enumerate() {
                mean[j] += v as f64;
                second[j] += (v as f64) * (v as f64);
            }
        }
        mean.iter_mut().for_each(|v| *v /= m as f64);
        second.iter_mut().for_each(|v| *v /= m as f64);
        let var: Vec<f64> = second.iter().zip(&mean).map(|(s, m)| (s - m * m).max(0.0)).collect();

        let mut mix = start_mix();
        let mut adaptation = Adaptation {
            model_version,
            cells: m,
            class_mix: [0.0; NUM_CLASSES],
            scale: vec![1.0; FEATURES],
            shift: vec![0.0; FEATURES],
            units: None,
        };
        let mut adapted = vec![0f32; site.len()];
        for _ in 0..ROUNDS {
            let (src_mean, src_var) = source.mixture(&mix);
            for j in 0..FEATURES {
                let s = ((src_var[j] + EPS) / (var[j] + EPS)).sqrt() as f32;
                let s = s.clamp(1.0 / MAX_SCALE, MAX_SCALE);
                adaptation.scale[j] = s;
                adaptation.shift[j] = (src_mean[j] - s as f64 * mean[j]) as f32;
            }
            adapted.copy_from_slice(site);
            adapted.chunks_exact_mut(FEATURES).for_each(|f| adaptation.apply(f));
            let p = probs(&adapted);
            let mut next = [0f64; NUM_CLASSES];
            for row in &p {
                for c in 0..NUM_CLASSES {
                    next[c] += row[c] as f64 / p.len().max(1) as f64;
                }
            }
            // No class vanishes from the mixture altogether: a rare class still shapes it.
            let floor = 0.01;
            let total: f64 = next.iter().map(|v| v.max(floor)).sum();
            mix = next.map(|v| v.max(floor) / total);
            adaptation.class_mix = mix.map(|v| v as f32);
        }
        Ok(adaptation)
    }

    /// Adapts one cell's features in place.
    pub fn apply(&self, features: &mut [f32]) {
        for ((f, s), b) in features.iter_mut().zip(&self.scale).zip(&self.shift) {
            // Pooled ReLU6 features are never negative.
            *f = (*f * s + b).max(0.0);
        }
    }

    /// Checks that this adaptation fits `model_version` and has the right width.
    pub fn check(&self, model_version: u64) -> Result<(), AdaptError> {
        if self.model_version != model_version {
            return Err(AdaptError::OtherModel {
                fitted: self.model_version,
                model: model_version,
            });
        }
        if self.scale.len() != FEATURES
            || self.shift.len() != FEATURES
            || self.scale.iter().chain(&self.shift).any(|v| !v.is_finite())
        {
            return Err(AdaptError::BadFeatures);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_second_fits_mix_keeps_the_normal_classes_estimated_and_blasts_at_the_start_share() {
        let mix = normal_mix(&[0.1, 0.2, 0.0, 0.1, 0.2, 0.4]);
        assert!((mix[BLAST] - START_BLAST_SHARE).abs() < 1e-12);
        assert!((mix.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert!((mix[1] / mix[0] - 2.0).abs() < 1e-6 && mix[2] == 0.0, "{mix:?}");
        // Nothing normal estimated (or garbage): the start mix.
        assert_eq!(normal_mix(&[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]), start_mix());
        assert_eq!(normal_mix(&[f32::NAN; NUM_CLASSES]), start_mix());
    }

    /// Two classes whose features sit at different places; the "site" sees them shifted and
    /// shrunk by a stain: after adaptation each site cell lies where its class's training cells
    /// do.
    #[test]
    fn a_shifted_and_scaled_site_is_mapped_back_onto_the_training_classes() {
        let mut bank = Vec::new();
        let mut labels = Vec::new();
        let centre = |c: usize, j: usize| if j.is_multiple_of(2) == (c == 0) { 3.0 } else { 1.0 };
        for i in 0..200 {
            let c = if i % 2 == 0 { 0 } else { 4 };
            let jitter = (i % 7) as f32 * 0.01;
            bank.extend((0..FEATURES).map(|j| centre(c, j) + jitter));
            labels.push(c as u8);
        }
        let source = SourceStats::from_bank(&bank, &labels);
        // The site: both classes, every channel at half the spread and moved by +2.
        let site: Vec<f32> = bank.iter().map(|v| 0.5 * v + 2.0).collect();
        // A "head" that tells the classes apart by channel 0 in the training space.
        let probs = |f: &[f32]| -> Vec<[f32; NUM_CLASSES]> {
            f.chunks_exact(FEATURES)
                .map(|row| {
                    let mut p = [0f32; NUM_CLASSES];
                    if row[0] > 2.0 {
                        p[0] = 1.0
                    } else {
                        p[4] = 1.0
                    }
                    p
                })
                .collect()
        };
        let before = probs(&site);
        assert!(
            before.iter().all(|p| p[0] == 1.0),
            "unadapted, every site cell looks like class 0"
        );
        let a = Adaptation::fit(&site, &source, 7, probs).unwrap();
        let mut adapted = site.clone();
        adapted.chunks_exact_mut(FEATURES).for_each(|f| a.apply(f));
        for (x, y) in adapted.iter().zip(&bank) {
            assert!((x - y).abs() < 0.05, "{x} against {y}");
        }
        assert!(
            (a.class_mix[0] - 0.5).abs() < 0.05 && (a.class_mix[4] - 0.5).abs() < 0.05,
            "{:?}",
            a.class_mix
        );
        assert_eq!(a.check(7), Ok(()));
        assert_eq!(a.check(8), Err(AdaptError::OtherModel { fitted: 7, model: 8 }));
    }

    #[test]
    fn too_few_or_broken_site_features_are_refused() {
        let source = SourceStats::from_bank(&vec![1.0; FEATURES * 4], &[0, 1, 2, 3]);
        let none = |_: &[f32]| Vec::new();
        assert_eq!(
            Adaptation::fit(&vec![1.0; FEATURES * 5], &source, 1, none),
            Err(AdaptError::TooFewCells { got: 5 })
        );
        let mut nan = vec![1.0; FEATURES * MIN_CELLS];
        nan[3] = f32::NAN;
        assert_eq!(Adaptation::fit(&nan, &source, 1, none), Err(AdaptError::BadFeatures));
        assert_eq!(
            Adaptation::fit(&[1.0; 7], &source, 1, none),
            Err(AdaptError::BadFeatures)
        );
    }
}
