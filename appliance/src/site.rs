//! The daemon's adaptation to its site, without labels: the unadapted features of every cell
//! it classifies are kept (a window of the newest), and once there are enough of them the
//! classifier's features are moved onto the training cells' statistics
//! ([`wbc_models::adapt`]); fitted again after each further batch of cells, kept in the store
//! for the model version it was fitted for, started over by a new model, reported to central
//! as a model event. A bundle with its training cells' unit moments adapts its backbone too
//! ([`wbc_models::compact::site_norm`]): the daemon then keeps the last cells' pictures
//! ([`MAX_NORM_CELLS`] at most) and fits the backbone on them first, then the pooled features
//! as that backbone computes them. The signed weights never change. `appliance classify
//! --adapt-to` fits with the same [`Classifier::fit_site_norm`] and
//! [`Classifier::fit_adaptation`].

use crate::store::{SiteCells, Store, StoredAdaptation};
use anyhow::Result;
use image::RgbImage;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use wbc_models::adapt::Adaptation;
use wbc_models::classify::{Classifier, MAX_NORM_CELLS};
use wbc_models::compact::mobilenet::FEATURES;
use wbc_protocol::classes::CellClass;
use wbc_protocol::clock::now;
use wbc_protocol::uplink::{ModelEvent, ModelMessage};

pub use wbc_config::AdaptationConfig;

/// Where the adaptation to the site stands (for the UI and `/health`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum SiteStatus {
    /// Turned off in the configuration: the model answers as signed.
    Off,
    /// The model in use cannot be adapted (no bank of training cells' features).
    Unavailable,
    /// The model in use was taught this clinic's reviewed cells (a site bundle): it answers
    /// as taught, without a further adaptation.
    Taught {
        /// The clinic it was made for.
        clinic: String,
    },
    /// Collecting the site's cells before the first fit.
    Collecting {
        /// Cells seen by this model at the site.
        seen: u64,
        /// Cells needed before the first fit.
        needed: u64,
    },
    /// In use.
    Adapted {
        /// Cells it was fitted on.
        cells: usize,
        /// When, seconds since the Unix epoch.
        fitted_at: u64,
        /// Cells seen by this model at the site.
        seen: u64,
        /// Cells seen when it is fitted again.
        next_fit_at: u64,
        /// The site's class mix as the adapted model sees it.
        class_mix: BTreeMap<String, f32>,
        /// The backbone adapted too (not only the pooled features).
        backbone: bool,
    },
}

/// Where the adaptation of `classifier`'s model stands.
pub fn status(store: &Store, classifier: &Classifier, config: &AdaptationConfig) -> Result<SiteStatus> {
    if !config.enabled {
        return Ok(SiteStatus::Off);
    }
    if let Some(clinic) = classifier.taught_for() {
        return Ok(SiteStatus::Taught { clinic: clinic.into() });
    }
    if !classifier.can_adapt() {
        return Ok(SiteStatus::Unavailable);
    }
    let v = classifier.model_version;
    let cells = store.site_cells(v)?;
    Ok(match store.adaptation(v)? {
        None => SiteStatus::Collecting {
            seen: cells.seen,
            needed: config.after_cells as u64,
        },
        Some(a) => SiteStatus::Adapted {
            cells: a.adaptation.cells,
            fitted_at: a.fitted_at,
            seen: cells.seen,
            next_fit_at: a.seen_at_fit + config.after_cells as u64,
            class_mix: mix_by_name(&a.adaptation.class_mix),
            // What the classifier in use has: a stored norm that no longer fits is not used.
            backbone: classifier.adaptation().is_some_and(|a| a.units.is_some()),
        },
    })
}

fn mix_by_name(mix: &[f32]) -> BTreeMap<String, f32> {
    CellClass::ALL
        .iter()
        .zip(mix)
        .map(|(c, p)| (c.name().to_string(), *p))
        .collect()
}

/// The classifier with the adaptation stored for its model version (none when there is none,
/// or adaptation is off).
pub fn adapted(store: &Store, classifier: Arc<Classifier>, config: &AdaptationConfig) -> Arc<Classifier> {
    let stored = if config.enabled && classifier.can_adapt() {
        store.adaptation(classifier.model_version).unwrap_or_else(|e| {
            tracing::warn!(error = %format!("{e:#}"), "could not read the site adaptation");
            None
        })
    } else {
        None
    };
    let want = stored.map(|s| s.adaptation);
    if classifier.adaptation() == want.as_ref() {
        return classifier;
    }
    match (*classifier).clone().with_adaptation(want) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            tracing::warn!(error = %e, "the site adaptation does not fit the model; answering without it");
            classifier
        }
    }
}

/// Keeps the unadapted features of cells `classifier` has just classified (`features`, row
/// after row) and, for a model that adapts its backbone, their pictures (`pictures`, one per
/// row, with the pixel size they were classified at). Returns the site's cells when enough
/// new ones have come since the last fit for [`fit`] to be due.
pub fn keep(
    store: &Store,
    classifier: &Classifier,
    config: &AdaptationConfig,
    features: &[f32],
    pictures: &[(&RgbImage, Option<f32>)],
) -> Result<Option<SiteCells>> {
    if !config.enabled || !classifier.can_adapt() || features.is_empty() {
        return Ok(None);
    }
    let v = classifier.model_version;
    let cells = store.add_site_features(v, features, FEATURES, config.keep_cells)?;
    if classifier.can_adapt_backbone() {
        let png: Vec<(Vec<u8>, Option<f32>)> = pictures
            .iter()
            .filter_map(|(img, um)| {
                let (img, um) = kept_picture(img, *um);
                let mut png = Vec::new();
                img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                    .map_err(|e| tracing::warn!(error = %e, "a site cell's picture could not be kept"))
                    .ok()?;
                Some((png, um))
            })
            .collect();
        store.add_site_pictures(v, &png, config.keep_cells.min(MAX_NORM_CELLS))?;
    }
    let last = store.adaptation(v)?;
    let due_at = last.as_ref().map_or(0, |a| a.seen_at_fit) + config.after_cells as u64;
    Ok((cells.seen >= due_at).then_some(cells))
}

/// Longest side of a site picture as kept: a whole single-cell upload may be a large image,
/// and the model's view of a cell is 224 px.
const KEPT_PICTURE_SIDE: u32 = 448;

/// A site cell's picture as it is kept: shrunk to [`KEPT_PICTURE_SIDE`] where larger, its
/// pixel size (where known) scaled alike.
fn kept_picture(img: &RgbImage, um: Option<f32>) -> (std::borrow::Cow<'_, RgbImage>, Option<f32>) {
    let (w, h) = img.dimensions();
    let side = w.max(h);
    if side <= KEPT_PICTURE_SIDE {
        return (std::borrow::Cow::Borrowed(img), um);
    }
    let f = KEPT_PICTURE_SIDE as f32 / side as f32;
    let (nw, nh) = (
        ((w as f32 * f).round() as u32).max(1),
        ((h as f32 * f).round() as u32).max(1),
    );
    let small = image::imageops::resize(img, nw, nh, image::imageops::FilterType::Triangle);
    (
        std::borrow::Cow::Owned(small),
        um.map(|u| u * side as f32 / KEPT_PICTURE_SIDE as f32),
    )
}

/// Fits the adaptation to the site's kept cells, keeps it, and tells central.
pub fn fit(store: &Store, classifier: &Classifier, cells: SiteCells) -> Result<StoredAdaptation> {
    let started = std::time::Instant::now();
    let adaptation = match backbone_site_cells(store, classifier, cells.model_version)? {
        Some(kept) => fit_to(classifier, Some(&kept), |normed| {
            Ok(normed.site_features(&kept.0, &kept.1)?)
        })?,
        None => classifier.fit_adaptation(&store.site_features(cells.model_version, FEATURES)?)?,
    };
    let stored = StoredAdaptation {
        adaptation,
        fitted_at: now(),
        seen_at_fit: cells.seen,
    };
    store.put_adaptation(&stored)?;
    let backbone = match &stored.adaptation.units {
        Some(n) => format!(" (the backbone's {} blocks too)", n.blocks),
        None => String::new(),
    };
    let detail = format!(
        "fitted on the site's last {} cells (of {} seen){backbone}; their class mix as the adapted model sees it: {}",
        stored.adaptation.cells,
        cells.seen,
        crate::render_mix(&stored.adaptation.class_mix)
    );
    tracing::info!(
        model_version = cells.model_version,
        cells = stored.adaptation.cells,
        ms = started.elapsed().as_millis() as u64,
        "adapted to the site"
    );
    store.model_event(&ModelMessage {
        event: ModelEvent::Adapted,
        model_version: cells.model_version,
        detail,
    })?;
    Ok(stored)
}

/// Site cell pictures and the pixel size each was classified at.
pub type SitePictures = (Vec<RgbImage>, Vec<Option<f32>>);

/// Fits a site adaptation, the daemon's and `classify --adapt-to`'s alike. With `norm_cells`
/// (site cell pictures and their pixel sizes, for a model that adapts its backbone) the
/// backbone is fitted first towards the training cells in the starting class mix, then the
/// pooled features as it computes them (`features` gives them for a classifier); then both
/// again, the backbone towards the normal classes as that first fit estimated them (at home
/// this keeps the adaptation from moving cells the reference mix does not have; blasts stay
/// at the starting share). Without, the pooled features alone, once.
pub fn fit_to(
    classifier: &Classifier,
    norm_cells: Option<&SitePictures>,
    mut features: impl FnMut(&Classifier) -> Result<Vec<f32>>,
) -> Result<Adaptation> {
    let Some((cells, scales)) = norm_cells else {
        return Ok(classifier.fit_adaptation(&features(classifier)?)?);
    };
    let mut mix = wbc_models::adapt::start_mix();
    let mut fitted = None;
    for _ in 0..2 {
        let norm = classifier.fit_site_norm_for(cells, scales, &mix)?;
        let normed = classifier.clone().with_site_norm(norm.as_ref())?;
        let mut a = normed.fit_adaptation(&features(&normed)?)?;
        a.units = norm;
        mix = wbc_models::adapt::normal_mix(&a.class_mix);
        fitted = Some(a);
    }
    Ok(fitted.expect("two fits"))
}

/// The kept pictures of the site's cells, decoded, where the model adapts its backbone; `None`
/// for a model that does not (its pooled features alone are fitted, on the kept features). An
/// error where too few are readable: the features kept beside them came from an adapted
/// backbone, so a pooled-only fit on them would not fit the signed one; the adaptation in use
/// stays.
fn backbone_site_cells(store: &Store, classifier: &Classifier, version: u64) -> Result<Option<SitePictures>> {
    if !classifier.can_adapt_backbone() {
        return Ok(None);
    }
    let limits = wbc_cells::image::DecodeLimits::default();
    let (pictures, scales): (Vec<RgbImage>, Vec<Option<f32>>) = store
        .site_pictures(version)?
        .into_iter()
        .filter_map(|(png, um)| match wbc_cells::image::decode_rgb(&png, &limits) {
            Ok(img) => Some((img, um)),
            Err(e) => {
                tracing::warn!(error = %e, "a kept site picture is unreadable; not used");
                None
            }
        })
        .unzip();
    if pictures.len() < wbc_models::adapt::MIN_CELLS {
        anyhow::bail!(
            "only {} of the site's kept pictures are readable (at least {} are needed); the adaptation in use stays",
            pictures.len(),
            wbc_models::adapt::MIN_CELLS
        );
    }
    Ok(Some((pictures, scales)))
}

/// Forgets the site adaptation of model `version` and the cells kept for it (a technician's
/// or the lab's decision: a new stain protocol, another camera); tells central.
pub fn reset(store: &Store, version: u64, by: &str) -> Result<()> {
    store.reset_site(version)?;
    store.model_event(&ModelMessage {
        event: ModelEvent::Adapted,
        model_version: version,
        detail: format!("site adaptation reset by {by}: the model answers as signed until it has adapted again"),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_configuration_and_the_model_agree_on_the_fewest_cells() {
        assert_eq!(wbc_config::MIN_ADAPTATION_CELLS, wbc_models::adapt::MIN_CELLS);
    }

    #[test]
    fn a_large_picture_is_kept_shrunk_with_its_pixel_size_scaled_alike() {
        let big = image::RgbImage::new(1000, 500);
        let (kept, um) = super::kept_picture(&big, Some(0.1));
        assert_eq!(kept.dimensions(), (448, 224));
        assert!((um.unwrap() - 0.1 * 1000.0 / 448.0).abs() < 1e-6);
        let (_, none) = super::kept_picture(&big, None);
        assert_eq!(none, None, "an unknown pixel size stays unknown");
        let small = image::RgbImage::new(300, 200);
        let (kept, um) = super::kept_picture(&small, Some(0.1));
        assert_eq!(
            (kept.dimensions(), um),
            ((300, 200), Some(0.1)),
            "a cell's crop is kept as it is"
        );
    }
}
