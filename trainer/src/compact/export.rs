//! `trainer export`: merges the LoRA adapters into the 4-bit base, quantizes, adds golden
//! self-test images with their expected outputs and the measured val figures, and signs.

use crate::compact::train::{RunDir, RunRecord, frozen_base, load_trainable};
use crate::eval::{EvalOptions, argmax, evaluate_classifier};
use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use ed25519_dalek::SigningKey;
use std::io::Cursor;
use std::path::Path;
use wbc_cells::image::DecodeLimits;
use wbc_models::calibrate::{
    CALIBRATION_PART, Calibration, KnnBank, OOD_BANK_PART, OodConfig, ece, fit_temperature, quantile,
};
use wbc_models::classify::{Classifier, SELFTEST_PART, SelfTest, SelfTestCase};
use wbc_models::compact::mobilenet::{Backbone, FEATURES};
use wbc_models::compact::site_norm::{UNIT_MOMENTS_PART, UnitReference};
use wbc_models::compact::weights::Weights;
use wbc_models::compact::{CompactModel, WEIGHTS_PART, softmax_t};
use wbc_protocol::bundle::{Bundle, BundleBuilder, Family, Manifest};
use wbc_protocol::classes::{CellClass, NUM_CLASSES};

/// Where the model of an export comes from.
pub enum ModelSource<'a> {
    /// A run of `trainer train`: the LoRA adapters are merged into the 4-bit base and quantized.
    Run {
        /// Run directory.
        run: &'a Path,
        /// Pretrained backbone checkpoint the run used.
        backbone_pth: &'a Path,
    },
    /// A verified compact bundle whose weights are kept byte for byte: only the calibration,
    /// the familiarity bank, the review rules, the measured figures and the self-test are made
    /// anew (`trainer recalibrate`, when the review rules change and the model does not).
    Bundle(&'a Bundle),
}

/// Export settings.
pub struct ExportOptions<'a> {
    /// The model.
    pub source: ModelSource<'a>,
    /// Signing key.
    pub key: &'a SigningKey,
    /// Output bundle file.
    pub out: &'a Path,
    /// Labelled val CSV: measured figures go into the manifest, self-test images come from it.
    pub val: Option<&'a Path>,
    /// Model version to stamp.
    pub model_version: u64,
    /// Training sample list: a stratified subset becomes the familiarity bank. Without it the
    /// bundle has no out-of-distribution score.
    pub train: Option<&'a Path>,
    /// Training cells per class in the familiarity bank.
    pub bank_per_class: usize,
    /// Val quantile of the familiarity score above which cells are Unidentified.
    pub ood_quantile: f64,
    /// Neighbour whose similarity is the familiarity score (and neighbours that vote).
    pub knn_k: usize,
    /// Send cells whose class differs from their neighbours' vote to review.
    pub require_agreement: bool,
    /// Share of the correctly called val blasts whose probability a Blast call must reach
    /// (1 = no blast threshold).
    pub blast_keep: f64,
    /// Share of the correctly called val blasts whose nucleus size a Blast call must reach
    /// (1 = no size check).
    pub blast_size_keep: f64,
    /// Unlabelled other-site cell sets whose reported distribution (Blast and Unidentified
    /// fractions) goes into the manifest: (name, sample list).
    pub other_sites: Vec<(String, &'a Path)>,
    /// Turn on the cell normalisation's dark-nucleus rule (`CellNorm::dark_nucleus`) in the
    /// bundle's own view: calibrated, measured and shipped with it.
    pub dark_nucleus: bool,
}

impl<'a> ExportOptions<'a> {
    /// Options with the project's defaults for the calibration settings.
    pub fn new(run: &'a Path, backbone_pth: &'a Path, key: &'a SigningKey, out: &'a Path, model_version: u64) -> Self {
        Self::of(ModelSource::Run { run, backbone_pth }, key, out, model_version)
    }

    /// Options for recalibrating a bundle's model, with the project's defaults.
    pub fn recalibrate(bundle: &'a Bundle, key: &'a SigningKey, out: &'a Path, model_version: u64) -> Self {
        Self::of(ModelSource::Bundle(bundle), key, out, model_version)
    }

    fn of(source: ModelSource<'a>, key: &'a SigningKey, out: &'a Path, model_version: u64) -> Self {
        ExportOptions {
            source,
            key,
            out,
            val: None,
            model_version,
            train: None,
            bank_per_class: 200,
            ood_quantile: 0.99,
            knn_k: 5,
            require_agreement: true,
            blast_keep: 0.98,
            blast_size_keep: 0.99,
            other_sites: Vec::new(),
            dark_nucleus: false,
        }
    }
}

/// What the raw model gives for a set of labelled cells.
pub(crate) struct RawOutputs {
    pub logits: Vec<[f32; NUM_CLASSES]>,
    /// `n × FEATURES`, row-major.
    pub features: Vec<f32>,
    pub labels: Vec<usize>,
    /// Nucleus extent (µm) where the cell was found and its pixel size is known.
    pub nucleus_um: Vec<Option<f32>>,
}

/// The size a Blast call's nucleus must reach: the `1 − keep` quantile of the nucleus extents
/// (µm) of the val blasts the model calls Blast, so that `keep` of them pass. 0 (no check) when
/// `keep` is 1 or more or no such blast has a known size.
pub fn blast_nucleus_threshold(
    probs: &[[f32; NUM_CLASSES]],
    labels: &[usize],
    nucleus_um: &[Option<f32>],
    keep: f64,
) -> f32 {
    let blast = CellClass::Blast.index();
    let sizes: Vec<f32> = probs
        .iter()
        .zip(labels)
        .zip(nucleus_um)
        .filter(|((p, y), _)| **y == blast && argmax(p) == blast)
        .filter_map(|(_, n)| *n)
        .collect();
    if keep >= 1.0 || sizes.is_empty() {
        0.0
    } else {
        quantile(&sizes, 1.0 - keep)
    }
}

/// At most `per_class` samples of each class, evenly spaced within the class (and so across its
/// sources, which the lists keep together): deterministic and representative. A class with
/// fewer gives all it has and no other class takes its place.
pub(crate) fn stratified(samples: &[crate::dataset::Sample], per_class: usize) -> Vec<crate::dataset::Sample> {
    let mut keep = Vec::new();
    for c in CellClass::ALL {
        let of: Vec<_> = samples.iter().filter(|s| s.label == Some(c)).collect();
        let step = (of.len() as f64 / per_class as f64).max(1.0);
        let mut x = 0.0;
        let mut taken = 0;
        while (x as usize) < of.len() && taken < per_class {
            keep.push(of[x as usize].clone());
            taken += 1;
            x += step;
        }
    }
    keep
}

/// Logits, features and labels of the labelled cells of a sample list, through a classifier
/// (uncalibrated: the raw model); at most `per_class` cells per class when it is not 0.
pub(crate) fn raw_outputs(classifier: &Classifier, list: &Path, per_class: usize) -> Result<RawOutputs> {
    let (samples, images) = load_labelled(list, per_class)?;
    let scales: Vec<_> = samples.iter().map(|s| s.microns_per_pixel).collect();
    let preds = classifier.predict_at(&images, &scales);
    let labels = samples.iter().map(|s| s.label.expect("labelled").index()).collect();
    let logits = preds.iter().map(|p| p.logits).collect();
    let nucleus_um = preds
        .iter()
        .map(|p| {
            p.cell_size
                .filter(|_| p.cell_found == Some(true))
                .and_then(|c| c.nucleus_um())
        })
        .collect();
    let features = preds.into_iter().flat_map(|p| p.features).collect();
    Ok(RawOutputs {
        logits,
        features,
        labels,
        nucleus_um,
    })
}

/// The labelled samples of a list and their images (unreadable ones skipped with a warning);
/// at most `per_class` of each class when it is not 0.
fn load_labelled(list: &Path, per_class: usize) -> Result<(Vec<crate::dataset::Sample>, Vec<image::RgbImage>)> {
    let mut samples: Vec<_> = crate::dataset::read_samples(list)?
        .into_iter()
        .filter(|s| s.label.is_some())
        .collect();
    if per_class > 0 {
        samples = stratified(&samples, per_class);
    }
    let (loaded, rejected) = crate::dataset::load_images(samples, &DecodeLimits::default());
    for r in &rejected {
        tracing::warn!(path = %r.path.display(), reason = %r.reason, "skipping image");
    }
    Ok(loaded.into_iter().unzip())
}

/// The moments of every backbone unit over the bank's training cells, class by class: what a
/// site adapts the backbone towards (`appliance classify --adapt-to`).
fn unit_reference(classifier: &Classifier, train: &Path, per_class: usize) -> Result<UnitReference> {
    let (samples, images) = load_labelled(train, per_class)?;
    let mut classes = vec![None; NUM_CLASSES];
    for (c, slot) in classes.iter_mut().enumerate() {
        let (imgs, scales): (Vec<_>, Vec<_>) = samples
            .iter()
            .zip(&images)
            .filter(|(s, _)| s.label.map(|l| l.index()) == Some(c))
            .map(|(s, i)| (i.clone(), s.microns_per_pixel))
            .unzip();
        if !imgs.is_empty() {
            *slot = Some(classifier.unit_moments(&imgs, &scales)?);
        }
    }
    Ok(UnitReference::new(classes))
}

/// Writes a signed bundle and returns its manifest.
pub fn export(o: &ExportOptions) -> Result<Manifest> {
    let device = Device::flex();
    let (model, weights_bytes, manifest) = match o.source {
        ModelSource::Run { run, backbone_pth } => merge_run(run, backbone_pth, o.model_version, &device)?,
        ModelSource::Bundle(bundle) => from_bundle(bundle, o.model_version, &device)?,
    };
    finish(o, model, weights_bytes, manifest, &device)
}

/// The model of a bundle, its weights as they are, and a manifest for a new version of it that
/// remembers which version it was made from.
fn from_bundle(bundle: &Bundle, model_version: u64, device: &Device) -> Result<(CompactModel, Vec<u8>, Manifest)> {
    let old = &bundle.manifest;
    if old.family != Family::Compact {
        bail!(
            "only compact bundles can be recalibrated (this one is {:?})",
            old.family
        );
    }
    if model_version <= old.model_version {
        bail!(
            "the new model version ({model_version}) must be above the bundle's ({}): devices refuse older or equal versions",
            old.model_version
        );
    }
    let weights_bytes = bundle.part(WEIGHTS_PART)?.to_vec();
    let model = CompactModel::from_bundle(bundle, device)?;
    let mut training = old.training.clone();
    if let Some(t) = training.as_object_mut() {
        t.insert(
            "recalibrated_from".into(),
            serde_json::json!({"model_version": old.model_version, "created_at": old.created_at}),
        );
    }
    let manifest = Manifest {
        model_version,
        min_appliance_version: env!("CARGO_PKG_VERSION").to_string(),
        created_at: time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339)?,
        training,
        metrics: serde_json::Value::Null,
        parts: Default::default(),
        ..old.clone()
    };
    Ok((model, weights_bytes, manifest))
}

/// Merges a run's adapters into the 4-bit base: the model as it will ship, its quantized weights
/// and a manifest without figures yet.
fn merge_run(
    run: &Path,
    backbone_pth: &Path,
    model_version: u64,
    device: &Device,
) -> Result<(CompactModel, Vec<u8>, Manifest)> {
    let run = RunDir(run.to_path_buf());
    let record: RunRecord = serde_json::from_slice(
        &std::fs::read(run.record()).with_context(|| format!("reading {}", run.record().display()))?,
    )
    .with_context(|| format!("parsing {}", run.record().display()))?;
    let cfg = record.settings.model.clone();
    let sha = wbc_protocol::bundle::sha256_hex(
        &std::fs::read(backbone_pth).with_context(|| format!("reading {}", backbone_pth.display()))?,
    );
    if sha != record.backbone_sha256 {
        bail!(
            "{} is not the backbone this run was trained on (sha256 {sha}, run used {})",
            backbone_pth.display(),
            record.backbone_sha256
        );
    }
    let (_, base) = frozen_base(backbone_pth, cfg.q4_group)?;
    let backbone = Backbone::new(&base, device)?;
    let trainable = load_trainable(&run, &backbone, &cfg, device)?;
    let merged = trainable.merged_weights(&base, &backbone, cfg.tune_from)?;
    let weights_bytes = merged.to_safetensors(cfg.q4_group)?;
    // Everything after this measures the model exactly as it will ship: from the quantized bytes.
    let model = CompactModel::from_weights(cfg.clone(), &Weights::from_safetensors(&weights_bytes)?, device)?;
    let manifest = Manifest {
        format_version: 0,
        family: Family::Compact,
        model_config: serde_json::to_value(&cfg)?,
        classes: CellClass::ALL.iter().map(|c| c.name().to_string()).collect(),
        preprocess: record.settings.preprocess(),
        model_version,
        min_appliance_version: env!("CARGO_PKG_VERSION").to_string(),
        created_at: time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339)?,
        training: serde_json::json!({
            "backbone": "torchvision mobilenet_v2 IMAGENET1K_V1",
            "backbone_sha256": record.backbone_sha256,
            "train_counts": record.train_counts,
            "val_counts": record.val_counts,
            "train_sources": record.train_sources,
            "epochs": record.settings.epochs,
            "best_epoch": record.best_epoch,
            "seconds": record.seconds,
            "hardware": record.hardware,
            "settings": record.settings,
        }),
        metrics: serde_json::Value::Null,
        parts: Default::default(),
        clinic: None,
    };
    Ok((model, weights_bytes, manifest))
}

/// Calibrates and measures a model, adds its self-test, signs and writes the bundle.
fn finish(
    o: &ExportOptions,
    model: CompactModel,
    weights_bytes: Vec<u8>,
    mut manifest: Manifest,
    device: &Device,
) -> Result<Manifest> {
    if o.dark_nucleus {
        let Some(cell) = manifest.preprocess.cell.as_mut() else {
            bail!("the dark-nucleus rule needs the cell normalisation, which this model does not use");
        };
        cell.dark_nucleus = true;
    }
    let mut classifier = Classifier::new(model, manifest.preprocess.clone(), o.model_version);
    let mut calibration_parts: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut calibration_metrics = serde_json::Map::new();
    if let Some(val) = o.val {
        tracing::info!("calibrating on val");
        let RawOutputs {
            logits,
            features,
            labels,
            nucleus_um,
        } = raw_outputs(&classifier, val, 0)?;
        if logits.is_empty() {
            bail!("{}: no labelled val images to calibrate on", val.display());
        }
        let (mut cal, metrics) = val_rules(&logits, &labels, &nucleus_um, o.blast_keep, o.blast_size_keep);
        calibration_metrics = metrics;
        let mut knn = None;
        if let Some(train) = o.train {
            tracing::info!(
                per_class = o.bank_per_class,
                "building the familiarity bank from training cells"
            );
            let train_out = raw_outputs(&classifier, train, o.bank_per_class)?;
            let bank = train_out.features;
            let bank_labels: Vec<u8> = train_out.labels.into_iter().map(|l| l as u8).collect();
            let bank_bytes = KnnBank::to_safetensors(&bank, &bank_labels)?;
            let (ood, bank) = familiarity(
                &bank_bytes,
                &features,
                o.knn_k,
                o.ood_quantile,
                o.require_agreement,
                device,
            )?;
            calibration_metrics.insert("ood_threshold".into(), ood.threshold.into());
            cal.ood = Some(ood);
            knn = Some(bank);
            calibration_parts.push((OOD_BANK_PART, bank_bytes));
            tracing::info!("measuring the backbone's units on the bank's training cells");
            let reference = unit_reference(&classifier, train, o.bank_per_class)?;
            calibration_parts.push((UNIT_MOMENTS_PART, reference.to_safetensors()?));
        }
        calibration_parts.push((CALIBRATION_PART, serde_json::to_vec_pretty(&cal)?));
        classifier = classifier.with_calibration(cal, knn)?;
    }

    let mut selftest_images: Vec<(String, Vec<u8>)> = Vec::new();
    if let Some(val) = o.val {
        let report = evaluate_classifier(&classifier, val, &EvalOptions::default())?;
        manifest.metrics = report.summary();
        manifest.metrics["calibration"] = serde_json::Value::Object(calibration_metrics.clone());
        let mut others = Vec::new();
        for (name, list) in &o.other_sites {
            let r = evaluate_classifier(&classifier, list, &EvalOptions::default())?;
            tracing::info!(set = %name, "{}", r.text());
            others.push(r.other_site_summary(name));
        }
        manifest.metrics["other_sites"] = serde_json::Value::Array(others);
        // One golden image per class, the first of each in the val list.
        let samples = crate::dataset::read_samples(val)?;
        let mut seen = [false; NUM_CLASSES];
        for s in samples {
            let Some(l) = s.label else { continue };
            if seen[l.index()] {
                continue;
            }
            let Ok(img) = wbc_cells::image::load_rgb(&s.path, &DecodeLimits::default()) else {
                continue;
            };
            let mut png = Vec::new();
            img.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)?;
            selftest_images.push((format!("selftest/{}.png", l.name().to_lowercase()), png));
            seen[l.index()] = true;
        }
    }
    if selftest_images.is_empty() {
        bail!("export needs --val with readable labelled images: the bundle's self-test images come from it");
    }
    let decoded: Vec<_> = selftest_images
        .iter()
        .map(|(_, b)| wbc_cells::image::decode_rgb(b, &DecodeLimits::default()))
        .collect::<Result<_, _>>()?;
    let cases = selftest_images
        .iter()
        .zip(classifier.predict(&decoded))
        .map(|((name, _), p)| SelfTestCase {
            image: name.clone(),
            probabilities: p.probs.to_vec(),
        })
        .collect();
    let selftest = SelfTest { tolerance: 2e-3, cases };

    let mut builder = BundleBuilder::new(manifest.clone())
        .part(WEIGHTS_PART, weights_bytes)?
        .part(SELFTEST_PART, serde_json::to_vec_pretty(&selftest)?)?;
    for (name, bytes) in calibration_parts {
        builder = builder.part(name, bytes)?;
    }
    for (name, bytes) in selftest_images {
        builder = builder.part(&name, bytes)?;
    }
    let bundle = sign_and_write(builder, o.key, o.out, device)?;
    Ok(bundle.manifest)
}

/// The temperature and the blast rules fitted on the raw val outputs of a model, and the
/// figures that go into the manifest's `calibration`. No familiarity model yet.
pub(crate) fn val_rules(
    logits: &[[f32; NUM_CLASSES]],
    labels: &[usize],
    nucleus_um: &[Option<f32>],
    blast_keep: f64,
    blast_size_keep: f64,
) -> (Calibration, serde_json::Map<String, serde_json::Value>) {
    let mut metrics = serde_json::Map::new();
    let t = fit_temperature(logits, labels);
    let probs = |t: f32| -> Vec<[f32; NUM_CLASSES]> { logits.iter().map(|l| softmax_t(l, t)).collect() };
    let (before, after) = (ece(&probs(1.0), labels, 15), ece(&probs(t), labels, 15));
    tracing::info!(
        temperature = t,
        ece_before = before,
        ece_after = after,
        "temperature fitted"
    );
    metrics.insert("temperature".into(), t.into());
    metrics.insert("ece_uncalibrated".into(), before.into());
    metrics.insert("ece_calibrated".into(), after.into());
    // Blast calls: as sure as the val blasts the model gets right, bar the least sure
    // `blast_keep` share of them.
    let mut blast_p: Vec<f32> = logits
        .iter()
        .zip(labels)
        .map(|(l, &y)| (softmax_t(l, t), y))
        .filter(|(p, y)| *y == CellClass::Blast.index() && argmax(p) == *y)
        .map(|(p, _)| p[CellClass::Blast.index()])
        .collect();
    blast_p.sort_by(f32::total_cmp);
    let blast_min_confidence = if blast_p.is_empty() {
        0.0
    } else {
        quantile(&blast_p, 1.0 - blast_keep)
    };
    tracing::info!(blast_min_confidence, "blast call threshold");
    metrics.insert("blast_min_confidence".into(), blast_min_confidence.into());
    let blast_min_nucleus_um = blast_nucleus_threshold(&probs(t), labels, nucleus_um, blast_size_keep);
    tracing::info!(blast_min_nucleus_um, "blast size check");
    metrics.insert("blast_min_nucleus_um".into(), blast_min_nucleus_um.into());
    let cal = Calibration {
        temperature: t,
        ood: None,
        blast_min_confidence,
        blast_min_nucleus_um,
        guard: None,
    };
    (cal, metrics)
}

/// The familiarity model of a bank (as stored in a bundle): its threshold is the `quantile`
/// of the val cells' scores, measured exactly as the appliance will, from the stored f16.
pub(crate) fn familiarity(
    bank_bytes: &[u8],
    val_features: &[f32],
    k: usize,
    quantile_at: f64,
    require_agreement: bool,
    device: &Device,
) -> Result<(OodConfig, KnnBank)> {
    let (f, l) = KnnBank::from_safetensors(bank_bytes)?;
    let bank = KnnBank::new(f, l, k, device)?;
    let scores: Vec<f32> = bank.scores(val_features).iter().map(|s| s.score).collect();
    let threshold = quantile(&scores, quantile_at);
    tracing::info!(
        threshold,
        quantile = quantile_at,
        cells = bank.len(),
        "familiarity threshold"
    );
    let ood = OodConfig {
        k,
        threshold,
        quantile: quantile_at,
        bank_size: bank.len(),
        require_agreement,
    };
    Ok((ood, bank))
}

/// Each of some bank cells' familiarity score against the bank without that cell's own rows
/// (leave one cell out): `cells[i]` lists cell i's rows, the first of them its query. A
/// reviewed cell's score says how far the site's cells lie from the rest of the bank.
pub(crate) fn leave_out_scores(
    features: &[f32],
    labels: &[u8],
    cells: &[Vec<usize>],
    k: usize,
    device: &Device,
) -> Result<Vec<f32>> {
    cells
        .iter()
        .map(|rows| {
            let query = *rows.first().context("a cell without rows")?;
            let keep: Vec<usize> = (0..labels.len()).filter(|j| !rows.contains(j)).collect();
            let x = keep
                .iter()
                .flat_map(|&j| &features[j * FEATURES..(j + 1) * FEATURES])
                .copied()
                .collect();
            let bank = KnnBank::new(x, keep.iter().map(|&j| labels[j]).collect(), k, device)?;
            Ok(bank.scores(&features[query * FEATURES..(query + 1) * FEATURES])[0].score)
        })
        .collect()
}

/// Signs a bundle, checks that what is about to ship verifies and passes its own self-test,
/// and writes it (through a `.partial` file, so a crash leaves no half bundle under `out`).
pub(crate) fn sign_and_write(builder: BundleBuilder, key: &SigningKey, out: &Path, device: &Device) -> Result<Bundle> {
    let bytes = builder.finish(key)?;
    let bundle = Bundle::from_bytes(&bytes, &[key.verifying_key()])?;
    let n = Classifier::from_bundle(&bundle, device)?.self_test(&bundle)?;
    tracing::info!(cases = n, "the bundle passes its self-test");
    let tmp = out.with_extension("bundle.partial");
    std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("renaming to {}", out.display()))?;
    Ok(bundle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::Sample;

    #[test]
    fn a_cell_left_out_of_the_bank_is_measured_against_the_other_cells_only() {
        let row = |v: &[(usize, f32)]| {
            let mut r = vec![0.0f32; FEATURES];
            v.iter().for_each(|&(i, x)| r[i] = x);
            r
        };
        // Cell A has two views (rows 0 and 1, the same); row 2 is far from it, row 3 halfway.
        let x: Vec<f32> = [
            row(&[(0, 1.0)]),
            row(&[(0, 1.0)]),
            row(&[(1, 1.0)]),
            row(&[(0, 1.0), (1, 1.0)]),
        ]
        .concat();
        let y = [1u8, 1, 2, 1];
        let device = Device::flex();
        let half = 1.0 - std::f32::consts::FRAC_1_SQRT_2;
        let s = leave_out_scores(&x, &y, &[vec![0, 1], vec![2], vec![3]], 1, &device).unwrap();
        for (got, want) in s.iter().zip([half, half, half]) {
            assert!((got - want).abs() < 1e-4, "{s:?}");
        }
        // Without leaving its second view out, cell A would look perfectly familiar.
        let s = leave_out_scores(&x, &y, &[vec![0]], 1, &device).unwrap();
        assert!(s[0].abs() < 1e-4, "{s:?}");
        assert!(leave_out_scores(&x, &y, &[vec![]], 1, &device).is_err());
    }

    #[test]
    fn the_blast_size_check_lets_through_its_share_of_the_val_blasts_it_calls() {
        let (blast, lym) = (CellClass::Blast.index(), CellClass::Lymphocyte.index());
        let mut probs = Vec::new();
        let mut labels = Vec::new();
        let mut sizes = Vec::new();
        // 101 val blasts called Blast, nuclei 10.0..=20.0 µm in steps of 0.1.
        for i in 0..=100 {
            let mut p = [0.0; NUM_CLASSES];
            p[blast] = 1.0;
            probs.push(p);
            labels.push(blast);
            sizes.push(Some(10.0 + i as f32 * 0.1));
        }
        // Cells that must not count: a blast the model misses, a lymphocyte called Blast, a
        // called blast of unknown size.
        let mut missed = [0.0; NUM_CLASSES];
        missed[lym] = 1.0;
        probs.push(missed);
        labels.push(blast);
        sizes.push(Some(1.0));
        let mut called = [0.0; NUM_CLASSES];
        called[blast] = 1.0;
        probs.push(called);
        labels.push(lym);
        sizes.push(Some(2.0));
        probs.push(called);
        labels.push(blast);
        sizes.push(None);
        let t = blast_nucleus_threshold(&probs, &labels, &sizes, 0.99);
        assert!((t - 10.1).abs() < 1e-4, "{t}");
        assert_eq!(
            blast_nucleus_threshold(&probs, &labels, &sizes, 1.0),
            0.0,
            "keep all: no check"
        );
        let unknown = vec![None; probs.len()];
        assert_eq!(
            blast_nucleus_threshold(&probs, &labels, &unknown, 0.99),
            0.0,
            "no sizes: no check"
        );
    }

    #[test]
    fn the_bank_takes_at_most_its_share_of_each_class_evenly_spaced() {
        let mk = |c: CellClass, i: usize| Sample {
            path: format!("{}-{i}.jpg", c.abbreviation()).into(),
            label: Some(c),
            attrs: Default::default(),
            source: "s".into(),
            description: None,
            microns_per_pixel: None,
        };
        // Two basophils only, ten of every other class.
        let mut all: Vec<Sample> = (0..2).map(|i| mk(CellClass::Basophil, i)).collect();
        for c in &CellClass::ALL[1..] {
            all.extend((0..10).map(|i| mk(*c, i)));
        }
        let kept = stratified(&all, 4);
        for c in CellClass::ALL {
            let n = kept.iter().filter(|s| s.label == Some(c)).count();
            assert_eq!(n, if c == CellClass::Basophil { 2 } else { 4 }, "{c:?}");
        }
        // Evenly spaced: 0, 2.5, 5, 7.5 → items 0, 2, 5, 7.
        let eos: Vec<String> = kept
            .iter()
            .filter(|s| s.label == Some(CellClass::Eosinophil))
            .map(|s| s.path.display().to_string())
            .collect();
        assert_eq!(eos, ["EO-0.jpg", "EO-2.jpg", "EO-5.jpg", "EO-7.jpg"]);
    }
}
