//! `trainer adapt`: a site bundle from the cells a clinic's technicians reviewed.
//!
//! The backbone stays exactly as signed (its 4-bit bytes are copied); what learns the site is
//! what reads its features:
//! - the class head, fine-tuned on the reviewed cells' pooled features (each seen in a few
//!   flipped and rotated views) with replay of the bundle's own training cells — the
//!   familiarity bank, 200 training cells per class whose features the bundle already carries —
//!   and a pull towards the signed head, so that the in-domain answers hold;
//! - the familiarity bank, which gains the reviewed cells with their reviewed classes: the
//!   site's cells are no longer unfamiliar, and their nearest neighbours vote the site's
//!   classes;
//! - with `--val`, the temperature, the blast rules and the familiarity threshold, fitted again
//!   on in-domain val (and the val figures measured before and after: a site bundle that costs
//!   in-domain macro F1 more than `max_val_drop` is refused).
//!
//! The bundle names its clinic; the appliances of other clinics refuse it.

use crate::compact::export::{RawOutputs, familiarity, leave_out_scores, raw_outputs, sign_and_write, val_rules};
use crate::compact::site_guard::{GuardReport, blasts_flagged, with_guard};
use crate::dataset::{Sample, load_images, read_samples};
use crate::eval::{EvalOptions, argmax, evaluate_classifier};
use anyhow::{Context, Result, bail};
use burn::module::Param;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Tensor, TensorData};
use ed25519_dalek::SigningKey;
use image::RgbImage;
use std::path::Path;
use wbc_cells::image::DecodeLimits;
use wbc_models::calibrate::{CALIBRATION_PART, GUARD_PART, KnnBank, OOD_BANK_PART, quantile};
use wbc_models::classify::{Classifier, SELFTEST_PART, SelfTest};
use wbc_models::compact::mobilenet::FEATURES;
use wbc_models::compact::weights::{NamedTensor, Weights};
use wbc_models::compact::{CompactModel, WEIGHTS_PART};
use wbc_protocol::bundle::{Bundle, BundleBuilder, Family, Manifest};
use wbc_protocol::classes::{CellClass, NUM_CLASSES};

/// How a site bundle is made.
pub struct SiteOptions<'a> {
    /// The bundle the clinic runs now (verified).
    pub bundle: &'a Bundle,
    /// The reviewed cells: a CSV with `path` and `label` (paths relative to it).
    pub reviewed: &'a Path,
    /// Signing key.
    pub key: &'a SigningKey,
    /// Bundle file to write.
    pub out: &'a Path,
    /// Model version of the site bundle (above the bundle's).
    pub model_version: u64,
    /// The clinic it is for (`None`: every clinic's appliance would take it).
    pub clinic: Option<String>,
    /// In-domain labelled val CSV: calibration fitted again, and the figures checked.
    pub val: Option<&'a Path>,
    /// Largest loss of in-domain val macro F1 (points) a site bundle may cost.
    pub max_val_drop: f64,
    /// Optimiser steps (full batch).
    pub steps: usize,
    /// Learning rate (AdamW).
    pub lr: f64,
    /// Share of the loss that the site's cells carry (the rest: replay of training cells).
    pub site_share: f64,
    /// Pull towards the signed head: weight of the squared distance of the weights.
    pub anchor: f64,
    /// Views of each reviewed cell (1–8: the cell, then flipped and rotated).
    pub views: usize,
    /// Turn on the cell normalisation's dark-nucleus rule in the site bundle (for a stain that
    /// colours the red cells like the nucleus; `CellNorm::dark_nucleus`).
    pub dark_nucleus: bool,
    /// Views of each reviewed cell that join the familiarity bank (1 to `views`).
    pub bank_views: usize,
    /// Training images to replay while the backbone's last blocks learn the clinic too (`None`:
    /// only the class head learns, against the bundle's own bank of training cells).
    pub replay: Option<&'a Path>,
    /// Training images per class replayed.
    pub replay_per_class: usize,
    /// How the backbone is tuned, with `replay`.
    pub tune: crate::compact::site_tune::TuneSettings,
    /// How many times another class a replayed blast weighs.
    pub blast_replay_weight: f64,
    /// With `val`: the share of the val blasts the site bundle must flag (reported Blast, or
    /// set aside with Blast the most probable class); below it nothing is written.
    pub min_blasts_flagged: f64,
    /// With `val`: keep the signed model beside the taught one as a blast guard
    /// ([`wbc_models::calibrate::BlastGuard`]), its threshold fitted on the val blasts.
    pub blast_guard: bool,
    /// With `val`: the familiarity threshold is also fitted on the reviewed cells (each against
    /// the bank without its own views), and the larger of that and val's is kept: the site's
    /// own confirmed cells define how far a familiar cell of this site may lie from the bank.
    pub site_familiarity: bool,
}

impl<'a> SiteOptions<'a> {
    /// The project's defaults.
    pub fn new(bundle: &'a Bundle, reviewed: &'a Path, key: &'a SigningKey, out: &'a Path, model_version: u64) -> Self {
        SiteOptions {
            bundle,
            reviewed,
            key,
            out,
            model_version,
            clinic: None,
            val: None,
            max_val_drop: 0.5,
            steps: 300,
            lr: 3e-3,
            site_share: 0.5,
            anchor: 1e-3,
            views: 4,
            dark_nucleus: false,
            bank_views: 4,
            replay: None,
            replay_per_class: 100,
            tune: Default::default(),
            blast_replay_weight: 3.0,
            min_blasts_flagged: 0.97,
            blast_guard: true,
            site_familiarity: true,
        }
    }
}

/// What `trainer adapt` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SiteReport {
    /// Reviewed cells used, per class (in class order).
    pub reviewed: [usize; NUM_CLASSES],
    /// Reviewed cells that could not be read.
    pub unreadable: usize,
    /// Of the reviewed cells, how many the bundle reported as their reviewed class before,
    /// and how many the site bundle reports so after (cells it was fitted on: a check that it
    /// learnt them, not a measure of the site).
    pub reviewed_right_before: usize,
    /// See `reviewed_right_before`.
    pub reviewed_right_after: usize,
    /// Of the replayed training cells, how many the head puts in their class before and after.
    pub replay_right_before: usize,
    /// See `replay_right_before`.
    pub replay_right_after: usize,
    /// Replayed training cells.
    pub replayed: usize,
    /// In-domain val macro F1 (reported answers, Unidentified a miss) before and after, with
    /// `--val`.
    pub val_macro_f1: Option<(f64, f64)>,
    /// Val blasts flagged (reported Blast, or set aside with Blast most probable) before and
    /// after, and val blasts, with `--val`.
    pub val_blasts_flagged: Option<(usize, usize, usize)>,
    /// With a blast guard: the taught model's Blast probability it needs, and how many val
    /// blasts the taught model alone would flag.
    pub guard: Option<GuardReport>,
    /// The familiarity threshold fitted on val and the one fitted on the reviewed cells (the
    /// bundle keeps the larger), with `--val` and the site's familiarity on.
    pub familiarity: Option<(f32, f32)>,
    /// The written bundle's manifest.
    #[serde(skip)]
    pub manifest: Option<Manifest>,
}

const GUARD_KEPT: &str = "the bundle carries a blast guard, which a site bundle taught from it must keep: give --val (and not --no-blast-guard)";

/// The `i`-th view of a cell: itself, mirrored, flipped, rotated.
fn view(img: &RgbImage, i: usize) -> RgbImage {
    use image::imageops as op;
    match i % 8 {
        0 => img.clone(),
        1 => op::flip_horizontal(img),
        2 => op::flip_vertical(img),
        3 => op::rotate90(img),
        4 => op::rotate180(img),
        5 => op::rotate270(img),
        6 => op::rotate90(&op::flip_horizontal(img)),
        _ => op::rotate270(&op::flip_horizontal(img)),
    }
}

/// The clinic named by a reviewed-cells CSV's `clinic` column, when every row names the same
/// one (`central export-reviews` writes it).
fn csv_clinic(csv: &Path) -> Result<Option<String>> {
    let mut rdr = csv::Reader::from_path(csv).with_context(|| format!("opening {}", csv.display()))?;
    let Some(col) = rdr.headers()?.iter().position(|h| h.trim() == "clinic") else {
        return Ok(None);
    };
    let mut found: Option<String> = None;
    for r in rdr.records() {
        let c = r?.get(col).unwrap_or("").trim().to_string();
        match &found {
            _ if c.is_empty() => {}
            None => found = Some(c),
            Some(f) if *f != c => bail!(
                "{} holds the cells of more than one clinic ({f:?}, {c:?}): a site bundle is made for one",
                csv.display()
            ),
            Some(_) => {}
        }
    }
    Ok(found)
}

/// The class head fitted by weighted cross-entropy on `x` (rows of [`FEATURES`]) with labels
/// `y` and row weights `w` (summing to 1), plus `anchor`·‖W − W₀‖², from `(w0, b0)`.
fn fit_head(
    (w0, b0): (&[f32], &[f32]),
    x: &[f32],
    y: &[usize],
    w: &[f32],
    o: &SiteOptions,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let ad = Device::flex().autodiff();
    let n = y.len();
    let mut head: Linear = LinearConfig::new(FEATURES, NUM_CLASSES).init(&ad);
    let w0t = || Tensor::<2>::from_data(TensorData::new(w0.to_vec(), [FEATURES, NUM_CLASSES]), &ad);
    head.weight = Param::from_tensor(w0t().require_grad());
    head.bias = Some(Param::from_tensor(
        Tensor::<1>::from_data(TensorData::new(b0.to_vec(), [NUM_CLASSES]), &ad).require_grad(),
    ));
    let anchor = w0t();
    let xs = Tensor::<2>::from_data(TensorData::new(x.to_vec(), [n, FEATURES]), &ad);
    let mut target = vec![0f32; n * NUM_CLASSES];
    for (i, (&c, &wi)) in y.iter().zip(w).enumerate() {
        target[i * NUM_CLASSES + c] = wi;
    }
    let target = Tensor::<2>::from_data(TensorData::new(target, [n, NUM_CLASSES]), &ad);
    let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
    for step in 0..o.steps {
        let ce = (log_softmax(head.forward(xs.clone()), 1) * target.clone()).sum().neg();
        let d = head.weight.val() - anchor.clone();
        let loss = ce + (d.clone() * d).sum().mul_scalar(o.anchor);
        let lv = loss.clone().into_scalar::<f32>();
        if !lv.is_finite() {
            bail!("the head's loss became {lv} at step {step}; lower --lr");
        }
        if step % 50 == 0 || step + 1 == o.steps {
            tracing::debug!(step, loss = lv, "fitting the class head");
        }
        let grads = GradientsParams::from_grads(loss.backward(), &head);
        head = optim.step(o.lr, head, grads);
    }
    let vec = |d: TensorData| d.try_into_vec_as::<f32>().expect("f32 tensor");
    let b = head.bias.as_ref().context("the head has a bias")?.val().into_data();
    Ok((vec(head.weight.val().into_data()), vec(b)))
}

/// Classes the head gives rows of `x`.
fn head_classes(w: &[f32], b: &[f32], x: &[f32]) -> Vec<usize> {
    x.chunks_exact(FEATURES)
        .map(|f| {
            let mut l = [0f32; NUM_CLASSES];
            for (c, lc) in l.iter_mut().enumerate() {
                *lc = b[c]
                    + f.iter()
                        .enumerate()
                        .map(|(k, v)| v * w[k * NUM_CLASSES + c])
                        .sum::<f32>();
            }
            argmax(&l)
        })
        .collect()
}

/// Each replayed training cell's weight: `share` spread over the classes present, a blast
/// class counting `blast_weight` times another, and each class's part over its cells. A clinic
/// rarely reviews a blast, so its cells pull the boundaries of the classes it does review into
/// blast territory; the replay is what keeps the training blasts flagged.
pub(crate) fn replay_weights(labels: &[usize], share: f64, blast_weight: f64) -> Vec<f32> {
    let mut counts = [0usize; NUM_CLASSES];
    labels.iter().for_each(|&y| counts[y] += 1);
    let class_weight = |c: usize| {
        if c == CellClass::Blast.index() {
            blast_weight
        } else {
            1.0
        }
    };
    let total: f64 = (0..NUM_CLASSES).filter(|&c| counts[c] > 0).map(class_weight).sum();
    labels
        .iter()
        .map(|&y| (share * class_weight(y) / total / counts[y] as f64) as f32)
        .collect()
}

/// Training cells per class in a bank rebuilt from `--replay` (as `export` builds it).
const BANK_PER_CLASS: usize = 200;

/// Where the replayed training cells came from, and how many the head put right.
enum Replay<'a> {
    /// The bundle's bank (head only): right before and after.
    Bank { before: usize, after: usize },
    /// A training list (backbone tuned): the bank is rebuilt from it.
    Images(&'a Path),
}

/// The class head fitted on the reviewed cells' features in every view and the bank's
/// training cells; the weights part with only the head changed.
fn head_only<'a>(
    o: &SiteOptions,
    classifier: &Classifier,
    (images, scales, labels): (&[RgbImage], &[Option<f32>], &[usize]),
    (bank_x, bank_y): (&[f32], &[u8]),
) -> Result<(Vec<u8>, Replay<'a>)> {
    let mut reviewed = [0usize; NUM_CLASSES];
    labels.iter().for_each(|&y| reviewed[y] += 1);
    let mut x = Vec::new();
    let mut y = Vec::new();
    for v in 0..o.views {
        let imgs: Vec<RgbImage> = images.iter().map(|i| view(i, v)).collect();
        x.extend(classifier.site_features(&imgs, scales)?);
        y.extend(labels);
    }
    // Weights: the site's share spread evenly over its classes (technicians review many more
    // neutrophils than basophils), the replay's over its classes, blasts weighing more.
    let present = reviewed.iter().filter(|&&n| n > 0).count() as f64;
    let mut w: Vec<f32> = y
        .iter()
        .map(|&c| (o.site_share / present / (reviewed[c] * o.views) as f64) as f32)
        .collect();
    let replay_labels: Vec<usize> = bank_y.iter().map(|&l| l as usize).collect();
    w.extend(replay_weights(
        &replay_labels,
        1.0 - o.site_share,
        o.blast_replay_weight,
    ));
    x.extend(bank_x);
    y.extend(bank_y.iter().map(|&l| l as usize));

    let weights = Weights::from_safetensors(o.bundle.part(WEIGHTS_PART)?)?;
    let (w0, b0) = (weights.get("head.class.weight")?, weights.get("head.class.bias")?);
    let replay_y: Vec<usize> = bank_y.iter().map(|&l| l as usize).collect();
    let right = |cls: Vec<usize>| cls.iter().zip(&replay_y).filter(|(a, b)| a == b).count();
    let before = right(head_classes(&w0.values, &b0.values, bank_x));
    let (w1, b1) = fit_head((&w0.values, &b0.values), &x, &y, &w, o)?;
    let after = right(head_classes(&w1, &b1, bank_x));
    tracing::info!(before, after, replayed = bank_y.len(), "class head fitted");
    let mut head = Weights::default();
    head.insert(
        "head.class.weight".into(),
        NamedTensor {
            shape: w0.shape.clone(),
            values: w1,
        },
    );
    head.insert(
        "head.class.bias".into(),
        NamedTensor {
            shape: b0.shape.clone(),
            values: b1,
        },
    );
    Ok((
        Weights::replace_f32(o.bundle.part(WEIGHTS_PART)?, &head)?,
        Replay::Bank { before, after },
    ))
}

/// Reviewed cells that a classifier reports as their reviewed class.
fn reported_right(c: &Classifier, images: &[RgbImage], scales: &[Option<f32>], labels: &[usize]) -> usize {
    c.predict_at(images, scales)
        .iter()
        .zip(labels)
        .filter(|(p, y)| c.result(p).class.map(|k| k.index()) == Some(**y))
        .count()
}

/// Makes and writes a site bundle (see the module documentation).
pub fn adapt(o: &SiteOptions) -> Result<SiteReport> {
    let old = &o.bundle.manifest;
    if old.family != Family::Compact {
        bail!(
            "only compact bundles can be adapted to a site (this one is {:?})",
            old.family
        );
    }
    if o.model_version <= old.model_version {
        bail!(
            "the site bundle's model version ({}) must be above the bundle's ({}): devices refuse older or equal versions",
            o.model_version,
            old.model_version
        );
    }
    if !(1..=8).contains(&o.views) || !(0.0..1.0).contains(&o.site_share) || o.steps == 0 {
        bail!("--views must be 1 to 8, --site-share in [0, 1), --steps above 0");
    }
    // Checked before any work: a site bundle taught again keeps its blast guard.
    if old.parts.contains_key(GUARD_PART) && (o.val.is_none() || !o.blast_guard) {
        bail!(GUARD_KEPT);
    }
    let clinic = match (o.clinic.clone(), csv_clinic(o.reviewed)?) {
        (Some(c), Some(f)) if c != f => bail!(
            "--clinic {c:?} but {} holds cells of clinic {f:?}",
            o.reviewed.display()
        ),
        (Some(c), _) | (None, Some(c)) => Some(c),
        (None, None) => None,
    };
    if let Some(c) = &clinic
        && !wbc_protocol::uplink::valid_id(c)
    {
        bail!("{c:?} is not a clinic id");
    }
    // The bundle as the site will run it: its preprocessing, with the site's own choices.
    let mut signed = o.bundle.clone();
    if o.dark_nucleus {
        signed
            .manifest
            .preprocess
            .cell
            .as_mut()
            .context("--dark-nucleus needs a bundle with cell normalisation")?
            .dark_nucleus = true;
    }
    let device = Device::flex();
    let original = Classifier::from_bundle(o.bundle, &device)?;
    let classifier = Classifier::from_bundle(&signed, &device)?;
    let bank_bytes = o
        .bundle
        .part(OOD_BANK_PART)
        .context("the bundle has no familiarity bank: there are no training cells to replay")?;
    let (bank_x, bank_y) = KnnBank::from_safetensors(bank_bytes)?;

    // The reviewed cells and their features, in every view.
    let samples: Vec<Sample> = read_samples(o.reviewed)?
        .into_iter()
        .filter(|s| s.label.is_some())
        .collect();
    let (loaded, rejected) = load_images(samples, &DecodeLimits::default());
    for r in &rejected {
        tracing::warn!(path = %r.path.display(), reason = %r.reason, "skipping a reviewed cell");
    }
    if loaded.is_empty() {
        bail!("{}: no readable labelled cells", o.reviewed.display());
    }
    let (samples, images): (Vec<Sample>, Vec<RgbImage>) = loaded.into_iter().unzip();
    let labels: Vec<usize> = samples.iter().map(|s| s.label.expect("labelled").index()).collect();
    let scales: Vec<Option<f32>> = samples.iter().map(|s| s.microns_per_pixel).collect();
    let mut reviewed = [0usize; NUM_CLASSES];
    labels.iter().for_each(|&y| reviewed[y] += 1);
    tracing::info!(?reviewed, views = o.views, "reviewed cells read");
    let config: wbc_models::compact::CompactConfig = serde_json::from_value(old.model_config.clone())?;
    let site = (images.as_slice(), scales.as_slice(), labels.as_slice());
    let (weights_bytes, replay) = match o.replay {
        None => head_only(o, &classifier, site, (&bank_x, &bank_y))?,
        Some(list) => {
            if o.val.is_none() {
                bail!("--replay tunes the backbone: --val is needed to calibrate and check the result");
            }
            let base = Weights::from_safetensors(o.bundle.part(WEIGHTS_PART)?)?;
            let per_class = o.replay_per_class;
            let samples: Vec<Sample> = read_samples(list)?.into_iter().filter(|s| s.label.is_some()).collect();
            let (loaded, _) = load_images(
                crate::compact::export::stratified(&samples, per_class),
                &DecodeLimits::default(),
            );
            let (rs, ri): (Vec<Sample>, Vec<RgbImage>) = loaded.into_iter().unzip();
            tracing::info!(replayed = rs.len(), "training cells read for replay");
            let tune = crate::compact::site_tune::TuneSettings {
                site_share: o.site_share,
                blast_replay_weight: o.blast_replay_weight,
                ..o.tune.clone()
            };
            let merged =
                crate::compact::site_tune::tune(&base, &config, &signed.manifest.preprocess, site, (&rs, &ri), &tune)?;
            (merged.to_safetensors(config.q4_group)?, Replay::Images(list))
        }
    };
    let model = CompactModel::from_weights(config.clone(), &Weights::from_safetensors(&weights_bytes)?, &device)?;
    let bare = Classifier::new(model, signed.manifest.preprocess.clone(), o.model_version);

    // The familiarity bank: training cells as the new model sees them (the bundle's own bank
    // when the backbone did not change), and the reviewed cells under their reviewed class in
    // their first `bank_views` views.
    let (mut new_bank_x, mut new_bank_y, replay_right_before, replay_right_after, replayed) = match replay {
        Replay::Bank { before, after } => (bank_x.clone(), bank_y.clone(), before, after, bank_y.len()),
        Replay::Images(list) => {
            let fresh = raw_outputs(&bare, list, BANK_PER_CLASS)?;
            let old_out = raw_outputs(&original, list, BANK_PER_CLASS)?;
            let right =
                |l: &[[f32; NUM_CLASSES]]| l.iter().zip(&fresh.labels).filter(|(l, y)| argmax(l) == **y).count();
            let (before, after) = (right(&old_out.logits), right(&fresh.logits));
            let y: Vec<u8> = fresh.labels.iter().map(|&l| l as u8).collect();
            let n = y.len();
            (fresh.features, y, before, after, n)
        }
    };
    let (trained_rows, bank_views) = (new_bank_y.len(), o.bank_views.min(o.views));
    for v in 0..bank_views {
        let imgs: Vec<RgbImage> = images.iter().map(|i| view(i, v)).collect();
        new_bank_x.extend(bare.predict_at(&imgs, &scales).into_iter().flat_map(|p| p.features));
        new_bank_y.extend(labels.iter().map(|&l| l as u8));
    }
    let new_bank = KnnBank::to_safetensors(&new_bank_x, &new_bank_y)?;
    // Reviewed cell i's views sit at `trained_rows + v · n + i` (view 0 is its query).
    let n = labels.len();
    let rows: Vec<Vec<usize>> = (0..n)
        .map(|i| (0..bank_views).map(|v| trained_rows + v * n + i).collect())
        .collect();

    let old_cal = classifier.calibration().clone();
    let old_ood = old_cal
        .ood
        .clone()
        .context("the bundle's calibration has no familiarity model")?;
    let mut site_familiarity = None;
    let (cal, cal_metrics, val_before) = match o.val {
        Some(val) => {
            let before = evaluate_classifier(&original, val, &EvalOptions::default())?;
            let RawOutputs {
                logits,
                features,
                labels,
                nucleus_um,
            } = raw_outputs(&bare, val, 0)?;
            let (mut cal, mut metrics) = val_rules(&logits, &labels, &nucleus_um, 0.98, 0.99);
            let (mut ood, _) = familiarity(
                &new_bank,
                &features,
                old_ood.k,
                old_ood.quantile,
                old_ood.require_agreement,
                &device,
            )?;
            if o.site_familiarity && bank_views > 0 {
                let site = quantile(
                    &leave_out_scores(&new_bank_x, &new_bank_y, &rows, old_ood.k, &device)?,
                    old_ood.quantile,
                );
                tracing::info!(val = ood.threshold, reviewed = site, "familiarity thresholds");
                metrics.insert("ood_threshold_val".into(), ood.threshold.into());
                metrics.insert("ood_threshold_reviewed".into(), site.into());
                site_familiarity = Some((ood.threshold, site));
                ood.threshold = ood.threshold.max(site);
            }
            metrics.insert("ood_threshold".into(), ood.threshold.into());
            cal.ood = Some(ood);
            (cal, metrics, Some(before))
        }
        None => {
            let mut cal = old_cal.clone();
            if let Some(ood) = cal.ood.as_mut() {
                ood.bank_size = new_bank_y.len();
            }
            (cal, serde_json::Map::new(), None)
        }
    };
    let bank = KnnBank::new(new_bank_x, new_bank_y, old_ood.k, &device)?;
    let adapted = bare.with_calibration(cal.clone(), Some(bank))?;
    let (adapted, cal, guard) = match o.val.filter(|_| o.blast_guard) {
        Some(val) => {
            let own = Weights::from_safetensors(&weights_bytes)?;
            let model = CompactModel::from_weights(config.clone(), &own, &device)?;
            let (guarded, report) = with_guard(o, &adapted, (model, &own), val, (&images, &scales))?;
            let cal = guarded.calibration().clone();
            (guarded, cal, Some(report))
        }
        None => (adapted, cal, None),
    };

    let reviewed_right_before = reported_right(&original, &images, &scales, &labels);
    let reviewed_right_after = reported_right(&adapted, &images, &scales, &labels);
    let mut report = SiteReport {
        reviewed,
        unreadable: rejected.len(),
        reviewed_right_before,
        reviewed_right_after,
        replay_right_before,
        replay_right_after,
        replayed,
        val_macro_f1: None,
        val_blasts_flagged: None,
        guard,
        familiarity: site_familiarity,
        manifest: None,
    };

    let mut metrics = old.metrics.clone();
    if let (Some(val), Some(before)) = (o.val, val_before) {
        let after = evaluate_classifier(&adapted, val, &EvalOptions::default())?;
        let f1 = |r: &crate::eval::EvalReport| r.macro_f1_with_review.unwrap_or(0.0);
        let (b, a) = (f1(&before), f1(&after));
        report.val_macro_f1 = Some((b, a));
        tracing::info!(before = b, after = a, "in-domain val macro F1 (reported answers)");
        if (b - a) * 100.0 > o.max_val_drop {
            bail!(
                "the site bundle would cost {:.2} points of in-domain val macro F1 ({:.4} → {:.4}; at most {} allowed): not written. \
                 Review more cells, lower --site-share or raise --anchor",
                (b - a) * 100.0,
                b,
                a,
                o.max_val_drop
            );
        }
        let (flagged_before, blasts) = blasts_flagged(&original, val)?;
        let (flagged_after, _) = blasts_flagged(&adapted, val)?;
        report.val_blasts_flagged = Some((flagged_before, flagged_after, blasts));
        tracing::info!(flagged_before, flagged_after, blasts, "val blasts flagged");
        if blasts > 0 && (flagged_after as f64) < o.min_blasts_flagged * blasts as f64 {
            bail!(
                "the site bundle would flag {flagged_after} of {blasts} val blasts ({:.1} %; the bundle it replaces flags \
                 {flagged_before}; at least {:.0} % required): not written. Raise --blast-replay-weight or lower --site-share",
                100.0 * flagged_after as f64 / blasts as f64,
                100.0 * o.min_blasts_flagged
            );
        }
        metrics = after.summary();
        metrics["calibration"] = serde_json::Value::Object(cal_metrics);
        metrics["other_sites"] = old.metrics.get("other_sites").cloned().unwrap_or_default();
    }
    metrics["site_adaptation"] = serde_json::to_value(&report)?;

    let mut training = old.training.clone();
    if let Some(t) = training.as_object_mut() {
        t.insert(
            "site_adaptation".into(),
            serde_json::json!({
                "from_model_version": old.model_version,
                "clinic": clinic,
                "reviewed": CellClass::ALL.iter().map(|c| (c.name().to_string(), reviewed[c.index()])).collect::<std::collections::BTreeMap<_, _>>(),
                "views": o.views, "dark_nucleus": o.dark_nucleus, "steps": o.steps, "lr": o.lr, "site_share": o.site_share, "anchor": o.anchor,
                "replayed_training_cells": replayed,
                "backbone_tuned": o.replay.map(|_| serde_json::json!({"replay_per_class": o.replay_per_class, "settings": o.tune})),
                "val_checked": o.val.is_some(),
                "blast_guard": report.guard,
            }),
        );
    }

    // The self-test: the bundle's own images, answered by the site model.
    let spec: SelfTest = serde_json::from_slice(o.bundle.part(SELFTEST_PART)?)?;
    let decoded: Vec<RgbImage> = spec
        .cases
        .iter()
        .map(|c| wbc_cells::image::decode_rgb(o.bundle.part(&c.image)?, &DecodeLimits::default()).map_err(Into::into))
        .collect::<Result<_>>()?;
    let cases = spec
        .cases
        .iter()
        .zip(adapted.predict(&decoded))
        .map(|(c, p)| wbc_models::classify::SelfTestCase {
            image: c.image.clone(),
            probabilities: p.probs.to_vec(),
        })
        .collect();
    let selftest = SelfTest {
        tolerance: spec.tolerance,
        cases,
    };

    let mut builder = BundleBuilder::from_bundle(&signed);
    if cal.guard.is_some() && !signed.manifest.parts.contains_key(GUARD_PART) {
        builder = builder.part(GUARD_PART, o.bundle.part(WEIGHTS_PART)?.to_vec())?;
    } else if cal.guard.is_none() && signed.manifest.parts.contains_key(GUARD_PART) {
        bail!(GUARD_KEPT);
    }
    let mut builder = builder
        .replace_part(WEIGHTS_PART, weights_bytes)?
        .replace_part(OOD_BANK_PART, new_bank)?
        .replace_part(CALIBRATION_PART, serde_json::to_vec_pretty(&cal)?)?
        .replace_part(SELFTEST_PART, serde_json::to_vec_pretty(&selftest)?)?;
    let m = builder.manifest_mut();
    m.model_version = o.model_version;
    m.min_appliance_version = env!("CARGO_PKG_VERSION").to_string();
    m.created_at = time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339)?;
    m.training = training;
    m.metrics = metrics;
    m.clinic = clinic;
    let bundle = sign_and_write(builder, o.key, o.out, &device)?;
    report.manifest = Some(bundle.manifest);
    Ok(report)
}
