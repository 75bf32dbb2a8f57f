//! The appliance: runs the active model bundle on cell images and reports each cell's class,
//! probabilities and description.

use anyhow::{Context, Result, bail};
use ed25519_dalek::VerifyingKey;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use wbc_shared::bundle::{Bundle, keys};
use wbc_shared::classify::Classifier;
use wbc_shared::image::{DecodeLimits, load_rgb};
use wbc_shared::messages::{CellResult, ReviewReason};

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
        Some(p) => Bundle::open(p, trusted).with_context(|| format!("model bundle {}", p.display())),
        None => Bundle::from_bytes(DEFAULT_BUNDLE, trusted).context("embedded default model bundle"),
    }
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
    /// Why the cell is Unidentified (`low_confidence`, `unfamiliar`, `no_cell`).
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

const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "bmp", "tif", "tiff", "webp", "gif"];

/// Expands folders into their image files (sorted); files are kept as given.
pub fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in inputs {
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading folder {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.is_file()
                        && f.extension()
                            .and_then(|e| e.to_str())
                            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
                })
                .collect();
            files.sort();
            out.extend(files);
        } else {
            out.push(p.clone());
        }
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

/// Human-readable report of one image.
pub fn render_text(img: &ImageJson) -> String {
    let mut s = String::new();
    for c in &img.cells {
        s.push_str(&format!(
            "{}: {} (confidence {:.3})\n",
            img.image, c.class, c.confidence
        ));
        let probs: Vec<String> = wbc_shared::CellClass::ALL
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
