//! `trainer adapt` on the default bundle: a "clinic" whose pictures the model has never seen
//! the like of (the committed fixture cells in negative) teaches it with one
//! reviewed cell per class; the site bundle then answers that clinic's cells, still answers the
//! training sources' cells, keeps the signed backbone byte for byte, and names its clinic.

use burn::tensor::Device;
use image::RgbImage;
use std::path::{Path, PathBuf};
use std::process::Command;
use wbc_cells::Prepare;
use wbc_models::classify::Classifier;
use wbc_models::compact::WEIGHTS_PART;
use wbc_protocol::bundle::{Bundle, keys};
use wbc_protocol::classes::CellClass;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn default_bundle() -> Bundle {
    let trusted = keys::trusted(&[], include_str!("../../appliance/keys/default.pub")).unwrap();
    Bundle::open(&repo().join("appliance/models/default.bundle"), &trusted).unwrap()
}

/// The fixture cells: (file name, class).
fn cells() -> Vec<(String, CellClass)> {
    let mut rdr = csv::Reader::from_path(repo().join("shared/fixtures/cells/cells.csv")).unwrap();
    let h = rdr.headers().unwrap().clone();
    let col = |n: &str| h.iter().position(|c| c == n).unwrap();
    let (p, c) = (col("path"), col("class_name"));
    rdr.records()
        .map(|r| {
            let r = r.unwrap();
            (r[p].to_string(), r[c].parse().unwrap())
        })
        .collect()
}

fn load(name: &str) -> RgbImage {
    image::open(repo().join("shared/fixtures/cells").join(name))
        .unwrap()
        .to_rgb8()
}

/// A smear whose stain colours the red cells blue-violet like the nucleus (as at LISC): lavender
/// plasma, violet red cells, one white cell with a dark nucleus in the middle.
fn violet_smear() -> RgbImage {
    let (c, wbc, rbc) = (112.0f32, 80.0f32, 34.0f32);
    RgbImage::from_fn(224, 224, |x, y| {
        let (x, y) = (x as f32, y as f32);
        let d = ((x - c).powi(2) + (y - c).powi(2)).sqrt();
        let (gx, gy) = ((x / (rbc * 1.15)).fract() - 0.5, (y / (rbc * 1.15)).fract() - 0.5);
        let in_rbc = (gx * gx + gy * gy).sqrt() * rbc * 1.15 < rbc / 2.0;
        image::Rgb(if d < wbc * 0.3 {
            [90, 50, 150]
        } else if d < wbc / 2.0 {
            [215, 200, 210]
        } else if in_rbc && d > wbc / 2.0 + rbc / 2.0 {
            [170, 160, 215]
        } else {
            [235, 215, 205]
        })
    })
}

/// A clinic whose pictures the model has never seen the like of: the negative of each picture
/// (the model is robust to hue, so a mere change of stain colour would not do).
fn stained(img: &RgbImage) -> RgbImage {
    RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let [r, g, b] = img.get_pixel(x, y).0;
        image::Rgb([255 - r, 255 - g, 255 - b])
    })
}

fn trainer(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_trainer")).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The network's own class of each image.
fn argmax(c: &Classifier, images: &[RgbImage]) -> Vec<usize> {
    c.predict(images)
        .iter()
        .map(|p| {
            (0..p.probs.len())
                .max_by(|&a, &b| p.probs[a].total_cmp(&p.probs[b]))
                .unwrap()
        })
        .collect()
}

fn right(got: &[usize], truth: &[usize]) -> usize {
    got.iter().zip(truth).filter(|(a, b)| a == b).count()
}

struct Site {
    dir: tempfile::TempDir,
}

impl Site {
    /// A folder with the stained cells, `reviewed.csv` and a signing key.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("cells")).unwrap();
        let mut csv = String::from("path,label\n");
        for (name, class) in cells() {
            let png = format!("cells/{}.png", name.trim_end_matches(".jpg"));
            stained(&load(&name)).save(dir.path().join(&png)).unwrap();
            csv.push_str(&format!("{png},{}\n", class.name()));
        }
        std::fs::write(dir.path().join("reviewed.csv"), csv).unwrap();
        let (ok, out) = trainer(&["keygen", "--out", &s(&dir.path().join("lab.key"))]);
        assert!(ok, "{out}");
        Site { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `trainer adapt` with the usual arguments and `extra`.
    fn adapt(&self, csv: &str, version: u64, out: &str, extra: &[&str]) -> (bool, String) {
        let mut args = vec![
            "adapt".to_string(),
            "--bundle".into(),
            s(&repo().join("appliance/models/default.bundle")),
            "--csv".into(),
            s(&self.path(csv)),
            "--key".into(),
            s(&self.path("lab.key")),
            "--model-version".into(),
            version.to_string(),
            "--out".into(),
            s(&self.path(out)),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        trainer(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[test]
fn a_clinic_teaches_its_stain_with_one_reviewed_cell_per_class_and_the_training_sources_still_hold() {
    let site = Site::new();
    let old = default_bundle();
    let v = old.manifest.model_version;
    let (ok, out) = site.adapt("reviewed.csv", v + 1, "site.bundle", &["--clinic", "clinic-7"]);
    assert!(ok, "{out}");
    assert!(out.contains("for clinic clinic-7"), "{out}");

    let public = keys::trusted(&[site.path("lab.key.pub")], "").unwrap();
    let b = Bundle::open(&site.path("site.bundle"), &public).unwrap();
    assert_eq!(b.manifest.model_version, v + 1);
    assert_eq!(b.manifest.clinic.as_deref(), Some("clinic-7"));
    assert_eq!(b.manifest.training["site_adaptation"]["from_model_version"], v);
    // The signed backbone is kept byte for byte; only the class head changed.
    let (st_old, st_new) = (
        safetensors::SafeTensors::deserialize(old.part(WEIGHTS_PART).unwrap()).unwrap(),
        safetensors::SafeTensors::deserialize(b.part(WEIGHTS_PART).unwrap()).unwrap(),
    );
    let mut changed = Vec::new();
    for (name, t) in st_old.tensors() {
        if st_new.tensor(&name).unwrap().data() != t.data() {
            changed.push(name);
        }
    }
    changed.sort();
    assert_eq!(changed, ["head.class.bias", "head.class.weight"]);

    let device = Device::flex();
    let (before, after) = (
        Classifier::from_bundle(&old, &device).unwrap(),
        Classifier::from_bundle(&b, &device).unwrap(),
    );
    assert_eq!(after.taught_for(), Some("clinic-7"));
    assert!(
        !after.can_adapt(),
        "a taught model is not adapted further without labels"
    );
    let cells = cells();
    let truth: Vec<usize> = cells.iter().map(|(_, c)| c.index()).collect();
    let home: Vec<RgbImage> = cells.iter().map(|(n, _)| load(n)).collect();
    let away: Vec<RgbImage> = home.iter().map(stained).collect();
    let (away_before, away_after) = (
        right(&argmax(&before, &away), &truth),
        right(&argmax(&after, &away), &truth),
    );
    assert!(
        away_before <= 3,
        "the pictures must be ones the model gets wrong: {away_before} of 7 right"
    );
    assert_eq!(away_after, 7, "taught: {away_before} → {away_after} of 7");
    // The clinic's cells are less unfamiliar: they are in the bank now.
    let unfamiliar = |c: &Classifier| {
        let t = c.calibration().ood.as_ref().unwrap().threshold;
        c.predict(&away).iter().filter(|p| p.ood_score.unwrap() > t).count()
    };
    let (unfamiliar_before, unfamiliar_after) = (unfamiliar(&before), unfamiliar(&after));
    assert!(
        unfamiliar_before >= 3,
        "{unfamiliar_before} of 7 unfamiliar to the signed model"
    );
    // Each is in the bank in four views; the fifth neighbour (the score) is another cell, and
    // with one cell per class some stay far from every other.
    assert!(
        unfamiliar_after < unfamiliar_before,
        "unfamiliar: {unfamiliar_before} → {unfamiliar_after} of 7"
    );
    // The training sources' cells keep their answers.
    assert_eq!(right(&argmax(&before, &home), &truth), 7);
    assert_eq!(right(&argmax(&after, &home), &truth), 7);
}

#[test]
fn what_adapt_refuses() {
    let site = Site::new();
    let v = default_bundle().manifest.model_version;
    // Not newer than the bundle.
    let (ok, out) = site.adapt("reviewed.csv", v, "a.bundle", &[]);
    assert!(!ok && out.contains("must be above"), "{out}");
    // A clinic id that could go anywhere.
    let (ok, out) = site.adapt("reviewed.csv", v + 1, "b.bundle", &["--clinic", "../x"]);
    assert!(!ok && out.contains("not a clinic id"), "{out}");
    // Cells of two clinics in one export.
    std::fs::write(
        site.path("mixed.csv"),
        "path,label,clinic\ncells/BA_120688.png,Basophil,a\ncells/LY_106354.png,Lymphocyte,b\n",
    )
    .unwrap();
    let (ok, out) = site.adapt("mixed.csv", v + 1, "c.bundle", &[]);
    assert!(!ok && out.contains("more than one clinic"), "{out}");
    // The CSV names one clinic and --clinic another.
    std::fs::write(
        site.path("one.csv"),
        "path,label,clinic\ncells/BA_120688.png,Basophil,a\ncells/LY_106354.png,Lymphocyte,a\n",
    )
    .unwrap();
    let (ok, out) = site.adapt("one.csv", v + 1, "d.bundle", &["--clinic", "b"]);
    assert!(!ok && out.contains("holds cells of clinic"), "{out}");
    // Nothing readable: a truncated file and a missing one.
    std::fs::write(
        site.path("cells/broken.png"),
        &std::fs::read(site.path("cells/BA_120688.png")).unwrap()[..50],
    )
    .unwrap();
    std::fs::write(
        site.path("broken.csv"),
        "path,label\ncells/broken.png,Basophil\ncells/missing.png,Monocyte\n",
    )
    .unwrap();
    let (ok, out) = site.adapt("broken.csv", v + 1, "e.bundle", &[]);
    assert!(!ok && out.contains("no readable labelled cells"), "{out}");
    // The in-domain checks, with the fixture cells as val (one blast among them): a bundle
    // that would cost more val macro F1, or flag fewer val blasts, than allowed is not written
    // (here the bars are set where nothing can pass them).
    let val = s(&repo().join("shared/fixtures/cells/cells.csv"));
    let (ok, out) = site.adapt(
        "reviewed.csv",
        v + 1,
        "g.bundle",
        &["--val", &val, "--max-val-drop=-101"],
    );
    assert!(!ok && out.contains("points of in-domain val macro F1"), "{out}");
    let (ok, out) = site.adapt(
        "reviewed.csv",
        v + 1,
        "h.bundle",
        &["--val", &val, "--min-blasts-flagged", "1.01"],
    );
    assert!(
        !ok && out.contains("val blasts") && out.contains("not written"),
        "{out}"
    );
    // Tuning the backbone with nothing to check it against is refused.
    let (ok, out) = site.adapt("reviewed.csv", v + 1, "i.bundle", &["--replay", &val]);
    assert!(!ok && out.contains("--val is needed"), "{out}");
    // No bundle was written by any of them.
    for f in ["a", "b", "c", "d", "e", "g", "h", "i"] {
        assert!(!site.path(&format!("{f}.bundle")).exists(), "{f}");
    }
    // The clinic comes from the CSV when --clinic is not given.
    let (ok, out) = site.adapt("one.csv", v + 1, "f.bundle", &["--steps", "20"]);
    assert!(ok && out.contains("for clinic a"), "{out}");
}

#[test]
fn a_site_bundle_checked_on_val_keeps_the_signed_model_beside_it_as_a_blast_guard() {
    use wbc_models::calibrate::GUARD_PART;
    use wbc_protocol::messages::ReviewReason;
    let site = Site::new();
    let old = default_bundle();
    let v = old.manifest.model_version;
    let val = s(&repo().join("shared/fixtures/cells/cells.csv"));
    let (ok, out) = site.adapt(
        "reviewed.csv",
        v + 1,
        "site.bundle",
        &[
            "--val",
            &val,
            "--max-val-drop",
            "100",
            "--min-blasts-flagged",
            "0",
            "--clinic",
            "c",
            "--dark-nucleus",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("blast guard"), "{out}");
    let public = keys::trusted(&[site.path("lab.key.pub")], "").unwrap();
    let b = Bundle::open(&site.path("site.bundle"), &public).unwrap();
    // The guard is the signed model, byte for byte.
    assert_eq!(b.part(GUARD_PART).unwrap(), old.part(WEIGHTS_PART).unwrap());
    let device = Device::flex();
    let (signed, taught) = (
        Classifier::from_bundle(&old, &device).unwrap(),
        Classifier::from_bundle(&b, &device).unwrap(),
    );
    let guard = taught.calibration().guard.clone().expect("a guard in the calibration");
    assert_eq!(guard.from_model_version, v);
    assert_eq!(guard.temperature, signed.calibration().temperature);
    assert!((0.0..=1.0).contains(&guard.min_taught_blast), "{guard:?}");
    assert!(b.manifest.training["site_adaptation"]["blast_guard"]["min_taught_blast"].is_number());
    // The familiarity threshold is the larger of val's and the reviewed cells' (each reviewed
    // cell measured against the bank without its own views).
    let fam = &b.manifest.metrics["site_adaptation"]["familiarity"];
    let (from_val, from_site) = (fam[0].as_f64().unwrap() as f32, fam[1].as_f64().unwrap() as f32);
    assert_eq!(
        taught.calibration().ood.as_ref().unwrap().threshold,
        from_val.max(from_site),
        "{fam}"
    );
    assert!(from_site > 0.0 && out.contains("from the reviewed cells"), "{out}");

    // Beside each answer of the taught model, the signed model's own logits, on the signed
    // bundle's own view of the cell: the site turned the dark-nucleus rule on, the guard did
    // not, and on a smear whose stain colours the red cells the two views differ.
    assert!(!guard.dark_nucleus);
    let mut home: Vec<RgbImage> = cells().iter().map(|(n, _)| load(n)).collect();
    home.push(violet_smear());
    let view = |c: &Classifier| c.preprocess().prepare(home.last().unwrap(), None, None).0;
    assert_ne!(
        view(&taught),
        view(&signed),
        "the dark-nucleus rule changes this smear's view"
    );
    for (p, q) in taught.predict(&home).iter().zip(signed.predict(&home)) {
        let g = p.guard_logits.expect("the guard's logits");
        for (a, b) in g.iter().zip(q.logits) {
            assert!((a - b).abs() < 1e-3, "{g:?} against {:?}", q.logits);
        }
    }
    home.pop();

    // A cell the taught model calls a monocyte and the signed model a blast is held back as a
    // possible blast, with the signed model's probabilities, once the taught model gives Blast
    // what the guard needs; below that, the taught answer stands.
    let mut cal = taught.calibration().clone();
    cal.guard.as_mut().unwrap().min_taught_blast = 0.25;
    cal.ood = None;
    let strict = taught.clone().with_calibration(cal, None).unwrap();
    let mut p = taught.predict(&home[..1]).remove(0);
    p.guard_logits = Some([0.0, 0.0, 0.0, 1.0, 0.0, 4.0]);
    p.probs = [0.0, 0.0, 0.0, 0.8, 0.0, 0.2];
    let r = strict.result(&p);
    assert_eq!(r.class, Some(CellClass::Monocyte), "{r:?}");
    p.probs = [0.0, 0.0, 0.0, 0.7, 0.0, 0.3];
    let r = strict.result(&p);
    assert_eq!(r.class, None);
    assert_eq!(r.review_reason, Some(ReviewReason::LowConfidence));
    assert!(r.possible_blast(), "{r:?}");
    // Shown with the signed model's probabilities (at its own temperature): Blast leads.
    assert_eq!(r.most_probable(), Some(CellClass::Blast), "{r:?}");
    assert!(r.confidence > 0.5 && r.description.contains("taught from"), "{r:?}");
    // The signed model calling it a monocyte too: nothing to guard.
    p.guard_logits = Some([0.0, 0.0, 0.0, 4.0, 0.0, 1.0]);
    assert_eq!(strict.result(&p).class, Some(CellClass::Monocyte));

    // A guard's settings without its weights (or weights without settings) do not load.
    let mut cal = signed.calibration().clone();
    cal.guard = Some(guard);
    let bank = signed.bank().cloned();
    assert!(signed.clone().with_calibration(cal, bank).is_err());

    // Taught again, the site bundle keeps the signed model as its guard; without --val it
    // cannot (the guard's threshold is fitted on val), and nothing is written.
    let again = |out: &str, extra: &[&str]| {
        let (bundle, trust) = (s(&site.path("site.bundle")), s(&site.path("lab.key.pub")));
        let (csv, key, out) = (
            s(&site.path("reviewed.csv")),
            s(&site.path("lab.key")),
            s(&site.path(out)),
        );
        let version = (v + 2).to_string();
        let mut args = vec![
            "adapt",
            "--bundle",
            &bundle,
            "--trust",
            &trust,
            "--csv",
            &csv,
            "--key",
            &key,
            "--model-version",
            &version,
            "--out",
            &out,
        ];
        args.extend(extra);
        trainer(&args)
    };
    let (ok, out) = again("bare.bundle", &[]);
    assert!(!ok && out.contains("must keep"), "{out}");
    assert!(!site.path("bare.bundle").exists());
    let (ok, out) = again(
        "again.bundle",
        &["--val", &val, "--max-val-drop", "100", "--min-blasts-flagged", "0"],
    );
    assert!(ok, "{out}");
    let b2 = Bundle::open(&site.path("again.bundle"), &public).unwrap();
    assert_eq!(b2.part(GUARD_PART).unwrap(), old.part(WEIGHTS_PART).unwrap());
    let c2 = Classifier::from_bundle(&b2, &device).unwrap();
    assert_eq!(c2.calibration().guard.as_ref().unwrap().from_model_version, v);
}
