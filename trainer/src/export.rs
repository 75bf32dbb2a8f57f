//! `trainer export`: merges the LoRA adapters into the 4-bit base, quantizes, adds golden
//! self-test images with their expected outputs and the measured val figures, and signs.

use crate::eval::{EvalOptions, evaluate_classifier};
use crate::train::{RunDir, RunRecord, frozen_base, load_trainable};
use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use ed25519_dalek::SigningKey;
use std::io::Cursor;
use std::path::Path;
use wbc_shared::bundle::{Bundle, BundleBuilder, Family, Manifest};
use wbc_shared::classes::{CellClass, NUM_CLASSES};
use wbc_shared::classify::{Classifier, SELFTEST_PART, SelfTest, SelfTestCase};
use wbc_shared::compact::mobilenet::Backbone;
use wbc_shared::compact::weights::Weights;
use wbc_shared::compact::{CompactModel, WEIGHTS_PART};
use wbc_shared::image::{DecodeLimits, Preprocess};

/// Export settings.
pub struct ExportOptions<'a> {
    /// Run directory from `trainer train`.
    pub run: &'a Path,
    /// Pretrained backbone checkpoint the run used.
    pub backbone_pth: &'a Path,
    /// Signing key.
    pub key: &'a SigningKey,
    /// Output bundle file.
    pub out: &'a Path,
    /// Labelled val CSV: measured figures go into the manifest, self-test images come from it.
    pub val: Option<&'a Path>,
    /// Model version to stamp.
    pub model_version: u64,
}

/// Writes a signed bundle and returns its manifest.
pub fn export(o: &ExportOptions) -> Result<Manifest> {
    let run = RunDir(o.run.to_path_buf());
    let record: RunRecord = serde_json::from_slice(
        &std::fs::read(run.record()).with_context(|| format!("reading {}", run.record().display()))?,
    )
    .with_context(|| format!("parsing {}", run.record().display()))?;
    let cfg = record.settings.model.clone();
    let sha = wbc_shared::bundle::sha256_hex(
        &std::fs::read(o.backbone_pth).with_context(|| format!("reading {}", o.backbone_pth.display()))?,
    );
    if sha != record.backbone_sha256 {
        bail!(
            "{} is not the backbone this run was trained on (sha256 {sha}, run used {})",
            o.backbone_pth.display(),
            record.backbone_sha256
        );
    }
    let device = Device::flex();
    let (_, base) = frozen_base(o.backbone_pth, cfg.q4_group)?;
    let backbone = Backbone::new(&base, &device)?;
    let trainable = load_trainable(&run, &backbone, &cfg, &device)?;
    let merged = trainable.merged_weights(&base, &backbone, cfg.tune_from)?;
    let weights_bytes = merged.to_safetensors(cfg.q4_group)?;
    // Everything below measures the model exactly as it will ship: from the quantized bytes.
    let model = CompactModel::from_weights(cfg.clone(), &Weights::from_safetensors(&weights_bytes)?, &device)?;
    let pre = Preprocess::imagenet(224);

    let mut manifest = Manifest {
        format_version: 0,
        family: Family::Compact,
        model_config: serde_json::to_value(&cfg)?,
        classes: CellClass::ALL.iter().map(|c| c.name().to_string()).collect(),
        preprocess: pre.clone(),
        model_version: o.model_version,
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
    };
    let classifier = Classifier::new(model, pre.clone(), o.model_version);

    let mut selftest_images: Vec<(String, Vec<u8>)> = Vec::new();
    if let Some(val) = o.val {
        let report = evaluate_classifier(&classifier, val, &EvalOptions::default())?;
        manifest.metrics = report.summary();
        // One golden image per class, the first of each in the val list.
        let samples = crate::dataset::read_samples(val)?;
        let mut seen = [false; NUM_CLASSES];
        for s in samples {
            let Some(l) = s.label else { continue };
            if seen[l.index()] {
                continue;
            }
            let Ok(img) = wbc_shared::image::load_rgb(&s.path, &DecodeLimits::default()) else {
                continue;
            };
            let img = pre.to_square(&img);
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
        .map(|(_, b)| wbc_shared::image::decode_rgb(b, &DecodeLimits::default()))
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
    for (name, bytes) in selftest_images {
        builder = builder.part(&name, bytes)?;
    }
    let bytes = builder.finish(o.key)?;
    // Check what we are about to ship: it verifies and passes its own self-test.
    let bundle = Bundle::from_bytes(&bytes, &[o.key.verifying_key()])?;
    let n = Classifier::from_bundle(&bundle, &device)?.self_test(&bundle)?;
    tracing::info!(cases = n, "exported bundle passes its self-test");
    let tmp = o.out.with_extension("bundle.partial");
    std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, o.out).with_context(|| format!("renaming to {}", o.out.display()))?;
    Ok(bundle.manifest)
}
