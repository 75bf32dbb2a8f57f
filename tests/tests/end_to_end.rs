//! Train → export → verify → self-test → classify → evaluate, on the real cell fixtures and the
//! real pretrained backbone, with a signing key made for the test. Then the ways a bundle must be
//! refused: tampered weights, another key, truncation.

use std::path::{Path, PathBuf};
use trainer::compact::export::{ExportOptions, export};
use trainer::compact::train::{TrainSettings, train};
use trainer::eval::{EvalOptions, evaluate_classifier};
use wbc_models::classify::Classifier;
use wbc_models::compact::CompactConfig;
use wbc_protocol::bundle::{Bundle, BundleError, keys};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn backbone_pth() -> PathBuf {
    let dir = std::env::var_os("WBC_WEIGHTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".cache/weights/unpacked"));
    let p = dir.join("mobilenet_v2-b0353104.pth");
    assert!(
        p.is_file(),
        "{} missing: run scripts/fetch-weights.sh (scripts/test.sh does it)",
        p.display()
    );
    p
}

/// A dataset folder: the seven fixture cells as both train and val, plus one corrupt file in train.
fn dataset(dir: &Path) {
    let cells = repo().join("shared/fixtures/cells");
    let csv = std::fs::read_to_string(cells.join("cells.csv")).unwrap();
    for entry in std::fs::read_dir(&cells).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "jpg") {
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    }
    std::fs::write(dir.join("val.csv"), &csv).unwrap();
    std::fs::write(dir.join("broken.jpg"), b"\xff\xd8\xff not really a jpeg").unwrap();
    let mut train = csv.clone();
    train.push_str("broken.jpg,2,Lymphocyte,pbc,,,,,,,,,,,\n");
    std::fs::write(dir.join("train.csv"), train).unwrap();
    // An unlabelled "other site" list: no label column.
    std::fs::write(
        dir.join("unlabelled.csv"),
        "path,source\nMYO_0024.jpg,elsewhere\nBA_120688.jpg,elsewhere\nLY_106354.jpg,elsewhere\n",
    )
    .unwrap();
}

/// The fixture dataset in `tmp/data` and the run folder `tmp/run`.
fn fixture_run(tmp: &Path) -> (PathBuf, PathBuf) {
    let data = tmp.join("data");
    std::fs::create_dir(&data).unwrap();
    dataset(&data);
    (data, tmp.join("run"))
}

/// A short training on the fixtures: two epochs, one view, adapters on the last two blocks.
fn quick(batch: usize) -> TrainSettings {
    TrainSettings {
        epochs: 2,
        batch,
        views: 1,
        model: CompactConfig {
            tune_from: 17,
            ..CompactConfig::default()
        },
        ..TrainSettings::default()
    }
}

/// The rows of a run's `curves.csv` and a column finder.
fn curves_of(run: &Path) -> (String, Vec<String>) {
    let curves = std::fs::read_to_string(run.join("curves.csv")).unwrap();
    let headers = curves.lines().next().unwrap().split(',').map(str::to_owned).collect();
    (curves, headers)
}

#[test]
fn trained_run_exports_a_signed_bundle_that_verifies_self_tests_and_classifies() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, run) = fixture_run(tmp.path());
    let settings = quick(4);
    let record = train(&data, &run, &backbone_pth(), settings).unwrap();
    assert_eq!(record.rejected, 1, "the corrupt image is reported, not fatal");
    assert!(
        std::fs::read_to_string(run.join("rejected.csv"))
            .unwrap()
            .contains("broken.jpg")
    );
    assert_eq!(record.train_counts.iter().sum::<usize>(), 7);
    let curves = std::fs::read_to_string(run.join("curves.csv")).unwrap();
    assert_eq!(curves.lines().count(), 3, "header + one row per epoch:\n{curves}");
    assert!(!curves.contains("critic"), "no critic, no critic columns:\n{curves}");
    assert!(image::open(run.join("curves.png")).is_ok());

    let key = keys::generate();
    let bundle_path = tmp.path().join("model.bundle");
    let pth = backbone_pth();
    let manifest = export(&ExportOptions {
        val: Some(&data.join("val.csv")),
        train: Some(&data.join("train.csv")),
        bank_per_class: 2,
        knn_k: 1,
        other_sites: vec![("unlabelled".into(), &data.join("unlabelled.csv"))],
        ..ExportOptions::new(&run, &pth, &key, &bundle_path, 7)
    })
    .unwrap();
    assert_eq!(manifest.model_version, 7);
    assert_eq!(manifest.metrics["evaluated"], 7);
    let t = manifest.metrics["calibration"]["temperature"].as_f64().unwrap();
    assert!(t > 0.0 && t.is_finite(), "temperature {t}");
    assert!(manifest.metrics["calibration"]["ood_threshold"].is_number());
    let other = &manifest.metrics["other_sites"][0];
    assert_eq!(other["set"], "unlabelled");
    assert_eq!(other["evaluated"], 3);
    let (blast, unid) = (
        other["blast_fraction"].as_f64().unwrap(),
        other["unidentified_fraction"].as_f64().unwrap(),
    );
    assert!((0.0..=1.0).contains(&blast) && (0.0..=1.0).contains(&unid));
    assert!(manifest.preprocess.cell.is_some(), "trained with cell normalisation");

    let bundle = Bundle::open(&bundle_path, &[key.verifying_key()]).unwrap();
    let device = burn::tensor::Device::flex();
    let classifier = Classifier::from_bundle(&bundle, &device).unwrap();
    assert_eq!(classifier.self_test(&bundle).unwrap(), 6, "one golden image per class");
    let img = image::open(data.join("MYO_0024.jpg")).unwrap().to_rgb8();
    let r = classifier.classify(&[img]).remove(0);
    let total: f32 = r.probabilities.values().sum();
    assert!((total - 1.0).abs() < 1e-4);
    assert_eq!(r.model_version, 7);
    assert!(!r.description.is_empty());
    let ood = classifier
        .calibration()
        .ood
        .clone()
        .expect("familiarity model in the bundle");
    assert_eq!(
        ood.bank_size, 7,
        "at most two readable training cells per class: 2 neutrophils, 1 of each other"
    );
    let fam = r.familiarity.expect("familiarity reported");
    assert!((-1.0..=1.0).contains(&fam), "{fam}");
    // A blank picture has no cell: it is left for review, not forced into a class.
    let blank = image::RgbImage::from_pixel(200, 200, image::Rgb([235, 230, 228]));
    let r = classifier.classify(&[blank]).remove(0);
    assert_eq!(r.class, None);
    assert_eq!(r.review_reason, Some(wbc_protocol::messages::ReviewReason::NoCell));

    let report = evaluate_classifier(
        &classifier,
        &data.join("val.csv"),
        &EvalOptions {
            resamples: 50,
            minilm: None,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(report.evaluated, 7);
    let cm = report.confusion_matrix.clone().unwrap();
    assert_eq!(cm.iter().flatten().sum::<u64>(), 7);
    assert_eq!(
        report.per_source.keys().cloned().collect::<Vec<_>>(),
        vec!["munich".to_string(), "pbc".to_string()]
    );
    assert!(report.attribute_accuracy.is_some());
    // One row per cell for whoever wants to look at the cells behind the figures.
    let cells_csv = tmp.path().join("cells.csv");
    report.write_cells(&cells_csv).unwrap();
    let mut rows = csv::Reader::from_path(&cells_csv).unwrap();
    let headers = rows.headers().unwrap().clone();
    let col = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let rows: Vec<csv::StringRecord> = rows.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 7);
    for r in &rows {
        let p: f64 = (0..6).map(|i| r[col("p_basophil") + i].parse::<f64>().unwrap()).sum();
        assert!((p - 1.0).abs() < 1e-4, "{r:?}");
        assert!(!r[col("reported")].is_empty() && !r[col("label")].is_empty(), "{r:?}");
        // Both fixture sources have a known pixel size, so every found nucleus has a size.
        let um: f64 = r[col("nucleus_um")].parse().unwrap();
        assert!((3.0..30.0).contains(&um), "{r:?}");
    }
    let json = serde_json::to_value(&report).unwrap();
    for k in [
        "accuracy",
        "macro_f1",
        "weighted_f1",
        "per_class",
        "confusion_matrix",
        "attribute_accuracy",
    ] {
        assert!(!json[k].is_null(), "{k} missing from the JSON report");
    }

    // Other-site smear fields: the annotated white cells are cut out and evaluated unlabelled.
    let crops = tmp.path().join("crops");
    let n = trainer::dataset::crop_fields(&repo().join("tests/fixtures/fields"), &crops, "bccd").unwrap();
    assert_eq!(n, 2, "one WBC box in each fixture field");
    let csv = std::fs::read_to_string(crops.join("cells.csv")).unwrap();
    assert!(csv.starts_with("path,source,field,") && !csv.contains("label"), "{csv}");
    // The pixel size comes from each field's red cells (about 104 px = 7.5 µm in BCCD).
    for row in csv.lines().skip(1) {
        let um: f32 = row.rsplit(',').next().unwrap().parse().unwrap();
        assert!((0.06..0.09).contains(&um), "{row}");
    }
    let r = evaluate_classifier(
        &classifier,
        &crops.join("cells.csv"),
        &EvalOptions {
            resamples: 10,
            minilm: None,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(r.evaluated, 2);
    assert!(r.accuracy.is_none() && r.confusion_matrix.is_none());
    let total: f64 = r.called_distribution.values().sum();
    assert!((total - 1.0).abs() < 1e-9, "{:?}", r.called_distribution);
    let summary = r.other_site_summary("bccd");
    assert!(summary["blast_fraction"].is_number() && summary["unidentified_fraction"].is_number());

    // Refusals.
    let bytes = std::fs::read(&bundle_path).unwrap();
    let other = keys::generate();
    assert!(matches!(
        Bundle::from_bytes(&bytes, &[other.verifying_key()]),
        Err(BundleError::UntrustedKey { .. })
    ));
    let mut tampered = bytes.clone();
    let at = tampered.len() * 2 / 3;
    tampered[at] ^= 0x55;
    assert!(Bundle::from_bytes(&tampered, &[key.verifying_key()]).is_err());
    assert!(Bundle::from_bytes(&bytes[..bytes.len() / 2], &[key.verifying_key()]).is_err());

    // A new version with the same weights and a new calibration, signed with a new key.
    let bundle = Bundle::from_bytes(&bytes, &[key.verifying_key()]).unwrap();
    let new_key = keys::generate();
    let again = tmp.path().join("again.bundle");
    let recal = |version| {
        export(&ExportOptions {
            val: Some(&data.join("val.csv")),
            train: Some(&data.join("train.csv")),
            bank_per_class: 2,
            knn_k: 1,
            dark_nucleus: true,
            ..ExportOptions::recalibrate(&bundle, &new_key, &again, version)
        })
    };
    let err = recal(7).unwrap_err().to_string();
    assert!(err.contains("must be above"), "{err}");
    assert!(!again.exists(), "nothing written for a refused version");
    let m = recal(8).unwrap();
    assert_eq!(m.model_version, 8);
    assert_eq!(m.training["recalibrated_from"]["model_version"], 7);
    let size = m.metrics["calibration"]["blast_min_nucleus_um"].as_f64().unwrap();
    assert!(size >= 0.0, "{size}");
    let b8 = Bundle::open(&again, &[new_key.verifying_key()]).unwrap();
    assert_eq!(
        b8.part(wbc_models::compact::WEIGHTS_PART).unwrap(),
        bundle.part(wbc_models::compact::WEIGHTS_PART).unwrap(),
        "the weights are kept byte for byte"
    );
    let rule = |b: &Bundle| b.manifest.preprocess.cell.as_ref().is_some_and(|c| c.dark_nucleus);
    assert!(
        rule(&b8) && !rule(&bundle),
        "the new calibration's own view has the dark-nucleus rule on"
    );
    let c8 = Classifier::from_bundle(&b8, &device).unwrap();
    assert_eq!(c8.self_test(&b8).unwrap(), 6);
    assert_eq!(c8.calibration().blast_min_nucleus_um, size as f32);
    assert!(
        Bundle::open(&again, &[key.verifying_key()]).is_err(),
        "signed by the new key only"
    );
}

#[test]
fn training_against_the_source_critic_shows_it_the_neutrophils_of_both_sources() {
    // The fixture neutrophils come from `pbc` and `munich`: the critic sees exactly those two.
    let tmp = tempfile::tempdir().unwrap();
    let (data, run) = fixture_run(tmp.path());
    let settings = TrainSettings {
        source_adversary: 1.0,
        ..quick(8)
    };
    let record = train(&data, &run, &backbone_pth(), settings).unwrap();
    assert_eq!(record.settings.source_adversary, 1.0);
    let (curves, headers) = curves_of(&run);
    let lines = curves.lines().skip(1);
    let col = |name: &str| {
        headers
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("{name}: {curves}"))
    };
    let (loss, accuracy) = (col("train_critic_loss"), col("critic_accuracy"));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 2, "{curves}");
    for row in rows {
        assert_eq!(row.len(), headers.len(), "{curves}");
        let l: f64 = row[loss].parse().unwrap();
        let a: f64 = row[accuracy].parse().unwrap();
        // Two neutrophils per batch (batch 8 holds all seven cells): a cross-entropy over two
        // sources, and a share of two guesses.
        assert!(l.is_finite() && l > 0.0, "{curves}");
        assert!([0.0, 0.5, 1.0].contains(&a), "{curves}");
    }
    assert!(image::open(run.join("curves.png")).is_ok());
}

#[test]
fn training_with_mixstyle_records_it_and_keeps_the_losses_finite() {
    // The fixture batch holds cells of both sources, so every mixed batch mixes across them.
    let tmp = tempfile::tempdir().unwrap();
    let (data, run) = fixture_run(tmp.path());
    let mix = trainer::compact::mixstyle::MixStyle { p: 1.0, alpha: 0.1 };
    let settings = TrainSettings {
        mixstyle: Some(mix),
        ..quick(8)
    };
    let record = train(&data, &run, &backbone_pth(), settings).unwrap();
    assert_eq!(record.settings.mixstyle, Some(mix));
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("run.json")).unwrap()).unwrap();
    assert_eq!(saved["settings"]["mixstyle"]["p"], 1.0, "{saved}");
    let (curves, headers) = curves_of(&run);
    let loss = headers.iter().position(|h| h == "train_loss").unwrap();
    let rows: Vec<&str> = curves.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{curves}");
    for row in rows {
        let l: f64 = row.split(',').nth(loss).unwrap().parse().unwrap();
        assert!(l.is_finite() && l > 0.0, "{curves}");
    }
}
