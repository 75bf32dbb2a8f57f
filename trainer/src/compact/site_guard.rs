//! The blast guard of a site bundle: the signed model kept beside the taught one, its
//! threshold fitted on the val blasts (`trainer adapt`, [`super::site`]).

use crate::compact::site::SiteOptions;
use crate::dataset::{Sample, load_images, read_samples};
use crate::eval::argmax;
use anyhow::Result;
use image::RgbImage;
use std::path::Path;
use wbc_cells::image::DecodeLimits;
use wbc_models::calibrate::{BlastGuard, CALIBRATION_PART, Calibration, GUARD_PART};
use wbc_models::classify::{Classifier, guard_holds_back};
use wbc_models::compact::weights::Weights;
use wbc_models::compact::{CompactModel, WEIGHTS_PART};
use wbc_protocol::classes::CellClass;

/// How the blast guard was fitted.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GuardReport {
    /// The taught model's Blast probability the guard needs.
    pub min_taught_blast: f32,
    /// Val blasts the taught model flags alone.
    pub val_blasts_flagged_without: usize,
    /// Val blasts the signed model calls Blast that the taught model does not flag: those the
    /// guard is for.
    pub val_blasts_lost: usize,
    /// Of the clinic's reviewed cells (none a blast, as a rule), how many the guard holds back
    /// as possible blasts: what it will cost at the clinic, as far as its reviews tell (the
    /// taught model learnt these cells, so at the clinic it will hold back more).
    pub reviewed_held: usize,
}

/// What share of the smallest taught Blast probability among the val blasts the guard is
/// fitted on it needs: the blasts a site will see are not the val blasts, so the threshold
/// stays well below the least sure of them.
const GUARD_MARGIN: f32 = 0.5;

/// The guard's threshold from the taught model's Blast probability of the val blasts that the
/// signed model calls Blast and the taught one does not flag (`lost`); with none lost, of all
/// the val blasts the signed model calls Blast (`called`), so that a site's blasts that go the
/// same way are still caught.
pub(crate) fn guard_threshold(lost: &[f32], called: &[f32]) -> f32 {
    let least = |v: &[f32]| v.iter().copied().filter(|p| p.is_finite()).reduce(f32::min);
    least(lost).or_else(|| least(called)).map_or(0.0, |p| p * GUARD_MARGIN)
}

/// The labelled blasts of a list: pictures and pixel sizes.
pub(crate) fn val_blasts(list: &Path) -> Result<(Vec<RgbImage>, Vec<Option<f32>>)> {
    let blasts: Vec<Sample> = read_samples(list)?
        .into_iter()
        .filter(|s| s.label == Some(CellClass::Blast))
        .collect();
    let (loaded, _) = load_images(blasts, &DecodeLimits::default());
    let (samples, images): (Vec<Sample>, Vec<RgbImage>) = loaded.into_iter().unzip();
    Ok((images, samples.iter().map(|s| s.microns_per_pixel).collect()))
}

/// Whether a result flags a blast: reported Blast, or set aside with Blast the most probable
/// class (the probabilities the result shows).
fn flags_blast(r: &wbc_protocol::messages::CellResult) -> bool {
    r.class == Some(CellClass::Blast) || (r.class.is_none() && r.most_probable() == Some(CellClass::Blast))
}

/// Of the labelled blasts of a list, how many a classifier flags, and how many there are.
pub(crate) fn blasts_flagged(c: &Classifier, list: &Path) -> Result<(usize, usize)> {
    let (images, scales) = val_blasts(list)?;
    let flagged = c
        .predict_at(&images, &scales)
        .iter()
        .filter(|p| flags_blast(&c.result(p)))
        .count();
    Ok((flagged, images.len()))
}

/// The taught classifier with the signed model beside it as a blast guard, its threshold
/// fitted on the val blasts (see [`guard_threshold`]).
pub(crate) fn with_guard(
    o: &SiteOptions,
    taught: &Classifier,
    (model, own): (CompactModel, &Weights),
    val: &Path,
    (reviewed, reviewed_scales): (&[RgbImage], &[Option<f32>]),
) -> Result<(Classifier, GuardReport)> {
    let old = &o.bundle.manifest;
    // A site bundle taught again keeps the signed model it came from as its guard.
    let signed_cal: Calibration = serde_json::from_slice(o.bundle.part(CALIBRATION_PART)?)?;
    let (signed, guard) = match signed_cal.guard {
        Some(g) => (o.bundle.part(GUARD_PART)?, g),
        None => (
            o.bundle.part(WEIGHTS_PART)?,
            BlastGuard {
                temperature: signed_cal.temperature,
                min_taught_blast: 0.0,
                from_model_version: old.model_version,
                // The guard sees cells as the signed bundle does, whatever this site turns on.
                dark_nucleus: old.preprocess.cell.as_ref().is_some_and(|c| c.dark_nucleus),
            },
        ),
    };
    let model = model.with_guard(own, &Weights::from_safetensors(signed)?)?;
    let mut cal = taught.calibration().clone();
    cal.guard = Some(guard);
    let guarded = Classifier::new(model, taught.preprocess().clone(), o.model_version)
        .with_calibration(cal.clone(), taught.bank().cloned())?;
    let (images, scales) = val_blasts(val)?;
    let (mut lost, mut called, mut flagged) = (Vec::new(), Vec::new(), 0);
    let blast = CellClass::Blast.index();
    for p in guarded.predict_at(&images, &scales) {
        let alone = taught.result(&p);
        flagged += usize::from(flags_blast(&alone));
        let signed_blast = p.guard_logits.is_some_and(|l| argmax(&l) == blast);
        if signed_blast {
            called.push(p.probs[blast]);
            if !flags_blast(&alone) {
                lost.push(p.probs[blast]);
            }
        }
    }
    let min_taught_blast = guard_threshold(&lost, &called);
    tracing::info!(
        min_taught_blast,
        lost = lost.len(),
        flagged_without_guard = flagged,
        "blast guard fitted"
    );
    cal.guard.as_mut().expect("set above").min_taught_blast = min_taught_blast;
    let guarded = guarded.with_calibration(cal, taught.bank().cloned())?;
    let reviewed_held = guarded
        .predict_at(reviewed, reviewed_scales)
        .iter()
        .filter(|p| {
            let best = argmax(&p.probs);
            guard_holds_back(p, best, taught.result(p).review_reason, guarded.calibration()).is_some()
        })
        .count();
    tracing::info!(
        reviewed_held,
        reviewed = reviewed.len(),
        "reviewed cells the guard holds back"
    );
    Ok((
        guarded,
        GuardReport {
            min_taught_blast,
            val_blasts_flagged_without: flagged,
            val_blasts_lost: lost.len(),
            reviewed_held,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_needs_half_the_least_sure_lost_blast_or_else_half_the_least_sure_blast_the_signed_model_calls() {
        assert_eq!(guard_threshold(&[0.3, 0.1, f32::NAN], &[0.9, 0.1]), 0.05);
        assert_eq!(guard_threshold(&[], &[0.8, 0.4]), 0.2);
        // Nothing known: every cell the signed model calls Blast is held back.
        assert_eq!(guard_threshold(&[], &[]), 0.0);
    }
}
