//! The appliance: runs the active model bundle on microscope fields and cell images, reports
//! each cell's class, probabilities and description, and keeps the slide's differential.

pub mod app;
pub mod backend;
pub mod capture;
pub mod config;
pub mod daemon;
pub mod gate;
pub mod inbox;
pub mod models;
pub mod site;
pub mod store;
pub mod update;
pub mod uplink;
pub mod web;

use anyhow::{Context, Result, bail};
use ed25519_dalek::VerifyingKey;
use image::RgbImage;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use wbc_cells::finder::{FinderConfig, cell_crop, find_cells, mean_colour};
use wbc_cells::image::{DecodeLimits, load_rgb};
use wbc_models::adapt::Adaptation;
use wbc_models::classify::Classifier;
use wbc_protocol::bundle::{Bundle, keys};
use wbc_protocol::messages::{CellResult, ReviewReason};

/// The default model bundle, built by `trainer export` from `../shared/data/wbc/train.csv`.
pub static DEFAULT_BUNDLE: &[u8] = include_bytes!("../models/default.bundle");
/// Public key that signed the default bundle.
pub static DEFAULT_KEY: &str = include_str!("../keys/default.pub");

/// Keys this appliance trusts: the given PEM files, or the default key.
pub fn trusted_keys(paths: &[PathBuf]) -> Result<Vec<VerifyingKey>> {
    keys::trusted(paths, DEFAULT_KEY).context("loading trusted keys")
}

/// Opens and verifies a bundle file, or the embedded default when `path` is `None`.
pub fn open_bundle(path: Option<&Path>, trusted: &[VerifyingKey]) -> Result<Bundle> {
    match path {
        // Mapped, not read: a multi-GB bundle's weights are paged in as the model is built.
        Some(p) => Bundle::open_mapped(p, trusted, &wbc_protocol::bundle::ReadLimits::default())
            .with_context(|| format!("model bundle {}", p.display())),
        None => Bundle::from_bytes(DEFAULT_BUNDLE, trusted).context("embedded default model bundle"),
    }
}

/// The embedded default bundle signed again by `key` as model `version`: a real, runnable
/// update for update drills and tests of the update path.
pub fn default_bundle_as(version: u64, key: &ed25519_dalek::SigningKey) -> Vec<u8> {
    let factory = Bundle::from_bytes(DEFAULT_BUNDLE, &trusted_keys(&[]).expect("the release key parses"))
        .expect("the embedded bundle verifies");
    let mut b = wbc_protocol::bundle::BundleBuilder::from_bundle(&factory);
    b.manifest_mut().model_version = version;
    b.finish(key).expect("signing in memory")
}

/// Opens the model store in `<data_dir>/models`: the factory model is the configured bundle
/// (else the embedded one), verified with the configured keys or the release key; updates are
/// verified with the configured keys (the release key when none is configured) until a signed
/// key list replaces them; every model is self-tested when
/// loaded; model events go to the store's model log and outbox, and the model in use is
/// reported (once per version, with `backend`) — also when a crash came between an update's
/// switch and its report. Returns the store and the classifier to run.
pub fn open_models(
    config: &config::Config,
    store: std::sync::Arc<store::Store>,
    backend::Backend { device, name: backend }: backend::Backend,
) -> Result<(std::sync::Arc<app::ModelStore>, std::sync::Arc<Classifier>)> {
    let factory = models::Factory {
        source: match &config.bundle {
            Some(p) => models::FactorySource::File(p.clone()),
            None => models::FactorySource::Embedded(DEFAULT_BUNDLE.into()),
        },
        name: config
            .bundle
            .as_ref()
            .map_or("the embedded default".into(), |p| p.display().to_string()),
        // The embedded model is part of the firmware: its release key always verifies it.
        trusted: {
            let mut k = trusted_keys(&config.trust)?;
            k.extend(trusted_keys(&[])?);
            k
        },
        update_keys: trusted_keys(&config.trust)?,
    };
    let min_confidence = config.min_confidence;
    let loader: models::Loader<std::sync::Arc<Classifier>> = Box::new(move |b| {
        let c = Classifier::from_bundle(b, &device)?.with_min_confidence(min_confidence);
        let cases = c.self_test(b)?;
        tracing::info!(model_version = c.model_version, cases, "model passes its self-test");
        Ok(std::sync::Arc::new(c))
    });
    let log = store.clone();
    let report: models::Reporter = Box::new(move |m| {
        tracing::info!(event = %m.event, model_version = m.model_version, detail = %m.detail, "model event");
        if let Err(e) = log.model_event(m) {
            tracing::error!(error = %format!("{e:#}"), "could not record a model event");
        }
    });
    let (models, classifier) = models::Models::open(
        &config.data_dir.join("models"),
        factory,
        config.update.policy(),
        (&config.clinic, &config.device),
        loader,
        report,
    )?;
    store.note_active_model(classifier.model_version, &backend)?;
    Ok((std::sync::Arc::new(models), classifier))
}

/// One cell in the JSON output.
#[derive(Debug, Serialize)]
pub struct CellJson {
    /// Box in the input image's pixels `[x0, y0, x1, y1]`.
    #[serde(rename = "box")]
    pub bbox: [u32; 4],
    /// Class name, or `Unidentified`.
    pub class: String,
    /// Probability of each class.
    pub probabilities: BTreeMap<String, f32>,
    /// Top probability.
    pub confidence: f32,
    /// Description.
    pub description: String,
    /// Predicted morphology attributes.
    pub attributes: BTreeMap<String, String>,
    /// Why the cell is Unidentified (`low_confidence`, `unfamiliar`, `neighbours_disagree`,
    /// `no_cell`, `edge_cut`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub review_reason: Option<ReviewReason>,
    /// How much the cell looks like the training cells (0..1), where the model measures it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub familiarity: Option<f32>,
}

/// One input image in the JSON output.
#[derive(Debug, Serialize)]
pub struct ImageJson {
    /// The input path.
    pub image: String,
    /// Cells found.
    pub cells: Vec<CellJson>,
}

impl CellJson {
    /// From a result and its box.
    pub fn new(r: &CellResult, bbox: [u32; 4]) -> Self {
        CellJson {
            bbox,
            class: r.class_name().to_string(),
            probabilities: r.probabilities.clone(),
            confidence: r.confidence,
            description: r.description.clone(),
            attributes: r.attributes.clone(),
            review_reason: r.review_reason.filter(|_| r.class.is_none()),
            familiarity: r.familiarity,
        }
    }
}

/// Rounds a box to whole pixels within a `w × h` image.
fn pixel_box(b: [f32; 4], w: u32, h: u32) -> [u32; 4] {
    let c = |v: f32, max: u32| (v.round().max(0.0) as u32).min(max);
    [c(b[0], w), c(b[1], h), c(b[2], w), c(b[3], h)]
}

/// Finds every white cell of a field whose pixels are `microns_per_pixel` µm, and classifies
/// those not cut by its edge (the classifier is told the same pixel size). Cells in reading
/// order, each with its box.
pub fn classify_field(
    classifier: &Classifier,
    field: &RgbImage,
    microns_per_pixel: f32,
    finder: &FinderConfig,
) -> Vec<CellResult> {
    classify_field_for_site(classifier, field, microns_per_pixel, finder).0
}

/// As [`classify_field`], and the unadapted pooled features of the cells it classified (row
/// after row; empty for a model without them) with the crops they were classified from: what
/// the appliance learns its site from.
pub fn classify_field_for_site(
    classifier: &Classifier,
    field: &RgbImage,
    microns_per_pixel: f32,
    finder: &FinderConfig,
) -> (Vec<CellResult>, Vec<f32>, Vec<RgbImage>) {
    let found = find_cells(field, microns_per_pixel, finder);
    let pad = mean_colour(field);
    let whole: Vec<_> = found.iter().filter(|c| !c.edge_cut).collect();
    let crops: Vec<RgbImage> = whole.iter().map(|c| cell_crop(field, c.bbox, pad)).collect();
    let preds = classifier.predict_at(&crops, &vec![Some(microns_per_pixel); crops.len()]);
    let features = preds.iter().flat_map(|p| p.site_features().iter().copied()).collect();
    let mut results = preds.iter().map(|p| classifier.result(p));
    let (w, h) = field.dimensions();
    let cells = found
        .iter()
        .map(|c| {
            let b = pixel_box(c.bbox, w, h);
            if c.edge_cut {
                CellResult::edge_cut(b, classifier.model_version)
            } else {
                let mut r = results.next().expect("one result per whole cell");
                r.bbox = Some(b);
                r
            }
        })
        .collect();
    (cells, features, crops)
}

/// Classifies each image as a microscope field: every white cell found in it.
pub fn classify_fields(
    classifier: &Classifier,
    paths: &[PathBuf],
    microns_per_pixel: f32,
    finder: &FinderConfig,
) -> Vec<(PathBuf, Result<ImageJson>)> {
    paths
        .iter()
        .map(|p| {
            let r = load_rgb(p, &DecodeLimits::default())
                .map_err(anyhow::Error::from)
                .map(|img| ImageJson {
                    image: p.display().to_string(),
                    cells: classify_field(classifier, &img, microns_per_pixel, finder)
                        .iter()
                        .map(|r| CellJson::new(r, r.bbox.unwrap_or_default()))
                        .collect(),
                });
            (p.clone(), r)
        })
        .collect()
}

/// Images read for a site adaptation at a time (bounded memory whatever the folder holds).
const ADAPT_CHUNK: usize = 64;

/// Fits a site adaptation to the unlabelled images under `dir` (subfolders included): each a
/// single cell, or, with `fields`, microscope fields whose whole white cells the finder cuts out
/// first (at the given pixel size). Unreadable files are skipped with a warning; the images are
/// read a few at a time.
pub fn adapt_to_site(classifier: &Classifier, dir: &Path, fields: Option<(f32, &FinderConfig)>) -> Result<Adaptation> {
    if let Some(clinic) = classifier.taught_for() {
        bail!("this model was taught the reviewed cells of clinic {clinic}; it is not adapted further without labels");
    }
    let mut paths = Vec::new();
    collect_images(dir, &mut paths).with_context(|| format!("reading {}", dir.display()))?;
    paths.sort();
    if paths.is_empty() {
        bail!("{} holds no images to adapt to", dir.display());
    }
    // The backbone first (where the bundle can): on an evenly spaced share of the images.
    let mut unreadable = 0;
    let norm_cells = if classifier.can_adapt_backbone() {
        let step = paths.len().div_ceil(wbc_models::classify::MAX_NORM_CELLS).max(1);
        let some: Vec<PathBuf> = paths.iter().step_by(step).cloned().collect();
        Some(site_cells(classifier, &some, fields, &mut unreadable))
    } else {
        None
    };
    let adaptation = crate::site::fit_to(classifier, norm_cells.as_ref(), |normed| {
        unreadable = 0;
        let mut features = Vec::new();
        for chunk in paths.chunks(ADAPT_CHUNK) {
            let (cells, scales) = site_cells(classifier, chunk, fields, &mut unreadable);
            features.extend(normed.site_features(&cells, &scales)?);
        }
        Ok(features)
    })?;
    tracing::info!(cells = adaptation.cells, unreadable, class_mix = ?adaptation.class_mix, "adapted to the site");
    Ok(adaptation)
}

/// The cells of some site images with their pixel sizes: each image a cell, or, with
/// `fields`, the whole white cells the finder cuts from it. Unreadable files are counted and
/// skipped with a warning.
fn site_cells(
    classifier: &Classifier,
    paths: &[PathBuf],
    fields: Option<(f32, &FinderConfig)>,
    unreadable: &mut usize,
) -> (Vec<RgbImage>, Vec<Option<f32>>) {
    let mut cells = Vec::new();
    let mut scales = Vec::new();
    for p in paths {
        let img = match load_rgb(p, &DecodeLimits::default()) {
            Ok(img) => img,
            Err(e) => {
                tracing::warn!(path = %p.display(), error = %e, "not used for the site adaptation");
                *unreadable += 1;
                continue;
            }
        };
        match fields {
            None => {
                cells.push(img);
                scales.push(classifier.microns_per_pixel);
            }
            Some((um, finder)) => {
                let pad = mean_colour(&img);
                for c in find_cells(&img, um, finder).iter().filter(|c| !c.edge_cut) {
                    cells.push(cell_crop(&img, c.bbox, pad));
                    scales.push(Some(um));
                }
            }
        }
    }
    (cells, scales)
}

/// A class mix in words: `Basophil 12 %, Eosinophil 3 %, …`.
pub fn render_mix(mix: &[f32; wbc_protocol::classes::NUM_CLASSES]) -> String {
    wbc_protocol::classes::CellClass::ALL
        .iter()
        .zip(mix)
        .map(|(c, p)| format!("{c} {:.0} %", p * 100.0))
        .collect::<Vec<_>>()
        .join(", ")
}

fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_images(&path, out)?;
        } else if is_image(&path) {
            out.push(path);
        }
    }
    Ok(())
}

const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "bmp", "tif", "tiff", "webp", "gif"];

/// Whether a file's name says it is an image the appliance reads.
fn is_image(f: &Path) -> bool {
    f.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Expands folders into their image files (sorted; subfolders are not searched); files are kept
/// as given. A folder without images is an error that names it (and its subfolders, the usual
/// mistake being a folder of per-class folders), so that a wrong path is not taken for an empty
/// capture.
pub fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in inputs {
        if !p.is_dir() {
            out.push(p.clone());
            continue;
        }
        let entries: Vec<PathBuf> = std::fs::read_dir(p)
            .with_context(|| format!("reading folder {}", p.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        let mut files: Vec<PathBuf> = entries.iter().filter(|f| f.is_file() && is_image(f)).cloned().collect();
        if files.is_empty() {
            let mut subfolders: Vec<String> = entries
                .iter()
                .filter(|f| f.is_dir())
                .filter_map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect();
            subfolders.sort();
            let hint = if subfolders.is_empty() {
                String::new()
            } else {
                format!(
                    "; subfolders are not searched, give them instead: {}",
                    subfolders.join(", ")
                )
            };
            bail!(
                "folder {} has no images ({}){hint}",
                p.display(),
                IMAGE_EXTENSIONS.join(", ")
            );
        }
        files.sort();
        out.extend(files);
    }
    if out.is_empty() {
        bail!("no images given");
    }
    Ok(out)
}

/// Classifies each image as one centred cell. Returns one entry per input: the result or the
/// reason the image could not be used.
pub fn classify_single_cells(classifier: &Classifier, paths: &[PathBuf]) -> Vec<(PathBuf, Result<ImageJson>)> {
    paths
        .iter()
        .map(|p| {
            let r = load_rgb(p, &DecodeLimits::default())
                .map_err(anyhow::Error::from)
                .map(|img| {
                    let (w, h) = img.dimensions();
                    let result = classifier.classify(std::slice::from_ref(&img)).remove(0);
                    ImageJson {
                        image: p.display().to_string(),
                        cells: vec![CellJson::new(&result, [0, 0, w, h])],
                    }
                });
            (p.clone(), r)
        })
        .collect()
}

/// How well the finder finds the annotated white cells of a folder of VOC fields.
#[derive(Debug, Serialize)]
pub struct FinderReport {
    /// Fields evaluated.
    pub fields: usize,
    /// Fields that could not be read (reported and skipped).
    pub unreadable: usize,
    /// Annotated white cells.
    pub annotated: usize,
    /// Cells found (edge-cut ones included: they are reported too).
    pub found: usize,
    /// Found cells cut by the field's edge.
    pub edge_cut: usize,
    /// Matches at the IoU threshold.
    pub matches: wbc_cells::finder::BoxMatch,
    /// IoU threshold.
    pub min_iou: f32,
    /// Recall of annotated white cells.
    pub recall: f64,
    /// Precision of found cells.
    pub precision: f64,
    /// Pixel size used (µm).
    pub microns_per_pixel: f32,
    /// Where it came from: `given` or `red_cells` (the annotated red cells' median size).
    pub pixel_size_from: String,
    /// The fields where the finder was wrong: what it found that matches no annotated cell,
    /// and the annotated cells it missed.
    pub errors: Vec<FinderErrors>,
}

/// Where the finder was wrong in one field.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FinderErrors {
    /// The field's image file.
    pub field: String,
    /// Found cells that match no annotated one.
    pub false_cells: Vec<wbc_cells::finder::FoundCell>,
    /// Annotated boxes no found cell matches.
    pub missed: Vec<[f32; 4]>,
}

/// Runs the finder over a folder with `images/` and `annotations/` (Pascal VOC, `WBC` boxes)
/// and matches what it finds to the annotated white cells at IoU `min_iou`. The pixel size is
/// `microns_per_pixel`, or what the annotated red cells give (one value for the whole folder,
/// as a camera's calibration would be).
pub fn evaluate_finder(
    fields: &Path,
    microns_per_pixel: Option<f32>,
    finder: &FinderConfig,
    min_iou: f32,
) -> Result<FinderReport> {
    let ann = wbc_cells::voc::read_dir(&fields.join("annotations"))?;
    let images: Vec<_> = ann.iter().map(|(_, v)| v.clone()).collect();
    let (um, from) = match microns_per_pixel {
        Some(u) => (u, "given"),
        None => (
            wbc_cells::voc::red_cell_microns_per_pixel(&images)
                .context("no pixel size given and too few annotated red cells to measure one")?,
            "red_cells",
        ),
    };
    let mut r = FinderReport {
        fields: 0,
        unreadable: 0,
        annotated: 0,
        found: 0,
        edge_cut: 0,
        matches: Default::default(),
        min_iou,
        recall: 0.0,
        precision: 0.0,
        microns_per_pixel: um,
        pixel_size_from: from.into(),
        errors: Vec::new(),
    };
    for v in images {
        let path = fields.join("images").join(&v.filename);
        let img = match load_rgb(&path, &DecodeLimits::default()) {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "skipping field");
                r.unreadable += 1;
                continue;
            }
        };
        let truth: Vec<[f32; 4]> = v.objects.iter().filter(|o| o.name == "WBC").map(|o| o.bbox).collect();
        let found = find_cells(&img, um, finder);
        let boxes: Vec<[f32; 4]> = found.iter().map(|c| c.bbox).collect();
        r.fields += 1;
        r.annotated += truth.len();
        r.found += found.len();
        r.edge_cut += found.iter().filter(|c| c.edge_cut).count();
        let (m, extra, missed) = wbc_cells::finder::match_detail(&boxes, &truth, min_iou);
        for (j, c) in found.iter().enumerate() {
            tracing::debug!(field = %v.filename, matched = !extra.contains(&j), cell = ?c, "found");
        }
        r.matches.add(m);
        if !extra.is_empty() || !missed.is_empty() {
            r.errors.push(FinderErrors {
                field: v.filename.clone(),
                false_cells: extra.iter().map(|&j| found[j].clone()).collect(),
                missed: missed.iter().map(|&i| truth[i]).collect(),
            });
        }
    }
    if r.fields == 0 {
        bail!("{}: no readable fields", fields.display());
    }
    r.recall = r.matches.recall();
    r.precision = r.matches.precision();
    Ok(r)
}

/// Human-readable report of one image.
pub fn render_text(img: &ImageJson) -> String {
    let mut s = String::new();
    if img.cells.is_empty() {
        s.push_str(&format!("{}: no white cells found\n", img.image));
    }
    for c in &img.cells {
        s.push_str(&format!(
            "{}: {} (confidence {:.3}) at {:?}\n",
            img.image, c.class, c.confidence, c.bbox
        ));
        if c.probabilities.is_empty() {
            s.push_str(&format!("  {}\n", c.description));
            continue;
        }
        let probs: Vec<String> = wbc_protocol::CellClass::ALL
            .iter()
            .map(|k| {
                format!(
                    "{} {:.3}",
                    k.abbreviation(),
                    c.probabilities.get(k.name()).copied().unwrap_or(0.0)
                )
            })
            .collect();
        s.push_str(&format!("  probabilities: {}\n", probs.join("  ")));
        s.push_str(&format!("  description: {}\n", c.description));
    }
    s
}
