//! `trainer eval`: the reference study's tables for a bundle on a CSV, as text, JSON and PNG.

use crate::dataset::{Sample, load_images, read_samples};
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use wbc_cells::image::DecodeLimits;
use wbc_models::classify::Classifier;
use wbc_models::describe::describe;
use wbc_models::embed::MiniLm;
use wbc_models::metrics::{BootstrapClass, ConfusionMatrix, MeanSd, Report, bootstrap, render_matrix, render_tables};
use wbc_protocol::attributes::NUM_ATTRIBUTES;
use wbc_protocol::classes::{CellClass, NUM_CLASSES};

const UNIDENTIFIED: &str = "Unidentified";

/// What a generated answer that names no class is counted as.
pub const NO_CLASS_NAMED: &str = "No class named";

/// Where the predicted class of a cell comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Predict {
    /// The most probable class of the model's class scores (for mllama: the likelihood of each
    /// class name as the answer's start).
    #[default]
    Score,
    /// The first class name in the generated description, as the reference study read its
    /// model's answers (mllama bundles only); an answer that names none counts against its
    /// class's recall.
    Generate,
}

/// Evaluation settings.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Bootstrap resamples for the Mean ± SD table.
    pub resamples: usize,
    /// Folder of all-MiniLM-L6-v2 for description similarity (skipped when `None`).
    pub minilm: Option<PathBuf>,
    /// Where the predicted class comes from.
    pub predict: Predict,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            resamples: 1000,
            minilm: None,
            predict: Predict::Score,
        }
    }
}

/// The first class named in a generated answer (a whole word, any case, singular or plural:
/// "Neutrophils" names Neutrophil, "basophilic" names nothing).
pub fn first_class_named(text: &str) -> Option<CellClass> {
    let lower = text.to_lowercase();
    let bytes = lower.as_bytes();
    let is_word = |b: u8| b.is_ascii_alphanumeric();
    CellClass::ALL
        .iter()
        .filter_map(|c| {
            let name = c.name().to_lowercase();
            lower.match_indices(&name).find_map(|(i, _)| {
                let mut end = i + name.len();
                if bytes.get(end) == Some(&b's') {
                    end += 1;
                }
                let starts = i == 0 || !is_word(bytes[i - 1]);
                let ends = bytes.get(end).is_none_or(|&b| !is_word(b));
                (starts && ends).then_some((i, *c))
            })
        })
        .min_by_key(|&(i, _)| i)
        .map(|(_, c)| c)
}

/// Per-class row of the JSON report.
#[derive(Debug, Clone, Serialize)]
pub struct ClassRow {
    /// Class name.
    pub class: String,
    /// Precision.
    pub precision: f64,
    /// Recall.
    pub recall: f64,
    /// F1.
    pub f1: f64,
    /// Support.
    pub support: u64,
}

/// Everything `trainer eval` measures.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Images evaluated.
    pub evaluated: usize,
    /// Images that could not be read, with reasons.
    pub rejected: Vec<(String, String)>,
    /// Accuracy (labelled sets).
    pub accuracy: Option<f64>,
    /// Macro F1.
    pub macro_f1: Option<f64>,
    /// Weighted F1.
    pub weighted_f1: Option<f64>,
    /// Per class.
    pub per_class: Vec<ClassRow>,
    /// Confusion matrix, rows true.
    pub confusion_matrix: Option<Vec<Vec<u64>>>,
    /// Full report with averages.
    pub report: Option<Report>,
    /// Mean ± SD over bootstrap resamples.
    pub bootstrap: Vec<BootstrapClass>,
    /// Attribute accuracy over cells with known attributes.
    pub attribute_accuracy: Option<f64>,
    /// Confusion matrix per source.
    pub per_source: BTreeMap<String, Vec<Vec<u64>>>,
    /// Fraction of cells predicted as each class (all sets, labelled or not).
    pub predicted_distribution: BTreeMap<String, f64>,
    /// Cosine similarity of generated and reference descriptions.
    pub description_similarity: Option<MeanSd>,
    /// Where the predicted class came from.
    pub predict: Predict,
    /// With `--predict generate`: the cells whose generated answer named no class.
    pub no_class_named: Option<usize>,
    /// What the classifier reports once review rules apply (familiarity, confidence, no cell):
    /// the fraction of cells reported as each class or as Unidentified.
    pub called_distribution: BTreeMap<String, f64>,
    /// Fraction of cells set aside as Unidentified, by reason.
    pub unidentified_by_reason: BTreeMap<String, f64>,
    /// Labelled sets: recall of each class counting Unidentified as a miss.
    pub recall_with_review: BTreeMap<String, f64>,
    /// Labelled sets: accuracy over the cells not set aside.
    pub accuracy_accepted: Option<f64>,
    /// Labelled sets: macro F1 of what is reported, Unidentified counting as a miss of the true
    /// class (recall) but not as a wrong call of any class (precision).
    pub macro_f1_with_review: Option<f64>,
    /// Labelled sets: expected calibration error of the top probability (15 bins).
    pub ece: Option<f64>,
    #[serde(skip)]
    text: String,
    #[serde(skip)]
    cells: Vec<CellRow>,
}

/// One evaluated cell: what the model said about it and what was reported.
#[derive(Debug, Clone)]
struct CellRow {
    path: PathBuf,
    source: String,
    label: Option<CellClass>,
    probs: [f32; NUM_CLASSES],
    familiarity: Option<f32>,
    neighbours: Option<usize>,
    reported: String,
    reason: String,
    cell_size: Option<wbc_models::compact::CellSize>,
}

impl EvalReport {
    /// The figures recorded in a bundle manifest.
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "split": "val",
            "evaluated": self.evaluated,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "weighted_f1": self.weighted_f1,
            "per_class": self.per_class,
            "attribute_accuracy": self.attribute_accuracy,
            "confusion_matrix": self.confusion_matrix,
            "ece": self.ece,
            "called_distribution": self.called_distribution,
            "unidentified_by_reason": self.unidentified_by_reason,
            "recall_with_review": self.recall_with_review,
            "accuracy_accepted": self.accuracy_accepted,
            "macro_f1_with_review": self.macro_f1_with_review,
        })
    }

    /// The figures recorded in a bundle manifest for an unlabelled other-site set.
    pub fn other_site_summary(&self, name: &str) -> serde_json::Value {
        serde_json::json!({
            "set": name,
            "evaluated": self.evaluated,
            "blast_fraction": self.called_distribution.get(CellClass::Blast.name()).copied().unwrap_or(0.0),
            "unidentified_fraction": self.called_distribution.get(UNIDENTIFIED).copied().unwrap_or(0.0),
            "called_distribution": self.called_distribution,
            "unidentified_by_reason": self.unidentified_by_reason,
            "argmax_distribution": self.predicted_distribution,
        })
    }

    /// The printed tables.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Writes one CSV row per evaluated cell: path, source, true class (labelled sets), the
    /// model's most probable class and every class probability, familiarity, the nearest
    /// training cells' vote, what was reported and why, and the cell's measured size — for a
    /// maintainer who wants to look at the cells behind a figure.
    pub fn write_cells(&self, out: &Path) -> Result<()> {
        let mut w = csv::Writer::from_path(out).with_context(|| format!("writing {}", out.display()))?;
        let mut header = vec!["path".to_string(), "source".into(), "label".into(), "predicted".into()];
        header.extend(CellClass::ALL.iter().map(|c| format!("p_{}", c.name().to_lowercase())));
        header.extend(
            [
                "familiarity",
                "neighbours",
                "reported",
                "review_reason",
                "microns_per_pixel",
                "cell_diameter_px",
                "nucleus_px",
                "nucleus_um",
            ]
            .map(String::from),
        );
        w.write_record(&header)?;
        let opt = |v: Option<f32>| v.map(|v| format!("{v:.4}")).unwrap_or_default();
        for c in &self.cells {
            let mut row = vec![
                c.path.display().to_string(),
                c.source.clone(),
                c.label.map(|l| l.name().to_string()).unwrap_or_default(),
                CellClass::ALL[argmax(&c.probs)].name().to_string(),
            ];
            row.extend(c.probs.iter().map(|p| format!("{p:.6}")));
            row.extend([
                opt(c.familiarity),
                c.neighbours
                    .map(|n| CellClass::ALL[n].name().to_string())
                    .unwrap_or_default(),
                c.reported.clone(),
                c.reason.clone(),
                opt(c.cell_size.and_then(|s| s.microns_per_pixel)),
                opt(c.cell_size.map(|s| s.diameter_px)),
                opt(c.cell_size.map(|s| s.nucleus_px)),
                opt(c.cell_size.and_then(|s| s.nucleus_um())),
            ]);
            w.write_record(&row)?;
        }
        w.flush().with_context(|| format!("writing {}", out.display()))?;
        Ok(())
    }
}

/// Index of the largest probability.
pub(crate) fn argmax(p: &[f32; NUM_CLASSES]) -> usize {
    p.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap_or(0)
}

/// Macro F1 over the classes when some cells are not called (`None`): those count against
/// their true class's recall only.
pub fn macro_f1_with_review(truth: &[usize], called: &[Option<usize>]) -> f64 {
    let mut f1s = Vec::new();
    for c in 0..NUM_CLASSES {
        let support = truth.iter().filter(|&&t| t == c).count();
        if support == 0 {
            continue;
        }
        let calls = called.iter().filter(|&&p| p == Some(c)).count();
        let tp = truth
            .iter()
            .zip(called)
            .filter(|&(&t, &p)| t == c && p == Some(c))
            .count();
        let (p, r) = (tp as f64 / calls.max(1) as f64, tp as f64 / support as f64);
        f1s.push(if p + r > 0.0 { 2.0 * p * r / (p + r) } else { 0.0 });
    }
    f1s.iter().sum::<f64>() / f1s.len().max(1) as f64
}

/// The reference description of a sample: its own text, or one rendered from its true label and
/// attributes when it has attributes.
fn reference_description(s: &Sample) -> Option<String> {
    if let Some(d) = &s.description {
        return Some(d.clone());
    }
    let label = s.label?;
    (!s.attrs.is_empty()).then(|| describe(label, &s.attrs))
}

/// Evaluates a classifier on a CSV (or class-folder) set.
pub fn evaluate_classifier(classifier: &Classifier, csv: &Path, opts: &EvalOptions) -> Result<EvalReport> {
    let samples = read_samples(csv)?;
    let (loaded, rejected) = load_images(samples, &DecodeLimits::default());
    if loaded.is_empty() {
        bail!("{}: no readable images", csv.display());
    }
    let (samples, images): (Vec<Sample>, Vec<_>) = loaded.into_iter().unzip();
    let scales: Vec<_> = samples.iter().map(|s| s.microns_per_pixel).collect();
    let preds = classifier.predict_at(&images, &scales);
    // The class each cell is predicted as; with generated answers, index NUM_CLASSES is an
    // answer that names no class (a column of its own in the confusion matrix).
    let generate = opts.predict == Predict::Generate;
    if generate && !classifier.generates_text() {
        bail!(
            "--predict generate needs a bundle whose model writes its answers (mllama); this one scores classes only"
        );
    }
    let predicted: Vec<usize> = if generate {
        preds
            .iter()
            .map(|p| {
                let named = p.description.as_deref().and_then(first_class_named);
                named.map_or(NUM_CLASSES, |c| c.index())
            })
            .collect()
    } else {
        preds.iter().map(|p| argmax(&p.probs)).collect()
    };
    let columns = NUM_CLASSES + usize::from(generate);
    let no_class_named = generate.then(|| predicted.iter().filter(|&&p| p == NUM_CLASSES).count());
    let mut dist = BTreeMap::new();
    for c in CellClass::ALL {
        let n = predicted.iter().filter(|&&p| p == c.index()).count();
        dist.insert(c.name().to_string(), n as f64 / predicted.len() as f64);
    }
    if let Some(n) = no_class_named {
        dist.insert(NO_CLASS_NAMED.to_string(), n as f64 / predicted.len() as f64);
    }
    let results: Vec<_> = preds.iter().map(|p| classifier.result(p)).collect();
    let n_all = results.len() as f64;
    let mut called = BTreeMap::new();
    let mut reasons = BTreeMap::new();
    let mut cells = Vec::with_capacity(results.len());
    for ((r, p), s) in results.iter().zip(&preds).zip(&samples) {
        *called.entry(r.class_name().to_string()).or_insert(0.0) += 1.0 / n_all;
        let mut reason = String::new();
        if let Some(why) = r.review_reason.filter(|_| r.class.is_none()) {
            reason = serde_json::to_value(why)?.as_str().unwrap_or("other").to_string();
            *reasons.entry(reason.clone()).or_insert(0.0) += 1.0 / n_all;
        }
        cells.push(CellRow {
            path: s.path.clone(),
            source: s.source.clone(),
            label: s.label,
            probs: p.probs,
            familiarity: r.familiarity,
            neighbours: p.neighbour_class,
            reported: r.class_name().to_string(),
            reason,
            cell_size: p.cell_size,
        });
    }
    let mut names: Vec<&str> = CellClass::ALL.iter().map(|c| c.name()).collect();
    if generate {
        names.push(NO_CLASS_NAMED);
    }
    let labelled = samples.iter().all(|s| s.label.is_some());
    let mut report = EvalReport {
        evaluated: samples.len(),
        rejected: rejected
            .iter()
            .map(|r| (r.path.display().to_string(), r.reason.clone()))
            .collect(),
        accuracy: None,
        macro_f1: None,
        weighted_f1: None,
        per_class: vec![],
        confusion_matrix: None,
        report: None,
        bootstrap: vec![],
        attribute_accuracy: None,
        per_source: BTreeMap::new(),
        predicted_distribution: dist,
        description_similarity: None,
        predict: opts.predict,
        no_class_named,
        called_distribution: called,
        unidentified_by_reason: reasons,
        recall_with_review: BTreeMap::new(),
        accuracy_accepted: None,
        macro_f1_with_review: None,
        ece: None,
        text: String::new(),
        cells,
    };
    if labelled {
        let truth: Vec<usize> = samples.iter().map(|s| s.label.expect("labelled").index()).collect();
        let cm = ConfusionMatrix::from_labels(columns, &truth, &predicted);
        let r = cm.report_over(NUM_CLASSES);
        let mut boot = bootstrap(columns, &truth, &predicted, opts.resamples, 0);
        boot.truncate(NUM_CLASSES);
        report.text = render_tables(&names, &r, &boot, &cm);
        if let Some(n) = no_class_named {
            report.text.push_str(&format!(
                "Predicted from the generated answers: {n} of {} named no class (counted as misses)\n",
                truth.len()
            ));
        }
        report.accuracy = Some(r.accuracy);
        report.macro_f1 = Some(r.macro_avg.f1);
        report.weighted_f1 = Some(r.weighted_avg.f1);
        report.per_class = names
            .iter()
            .zip(&r.per_class)
            .map(|(n, m)| ClassRow {
                class: n.to_string(),
                precision: m.precision,
                recall: m.recall,
                f1: m.f1,
                support: m.support,
            })
            .collect();
        report.confusion_matrix = Some(cm.counts.clone());
        let probs: Vec<[f32; NUM_CLASSES]> = preds.iter().map(|p| p.probs).collect();
        report.ece = Some(wbc_models::calibrate::ece(&probs, &truth, 15));
        let (mut ok, mut accepted) = (0usize, 0usize);
        for c in CellClass::ALL {
            let idx: Vec<usize> = (0..truth.len()).filter(|&i| truth[i] == c.index()).collect();
            if idx.is_empty() {
                continue;
            }
            let hit = idx.iter().filter(|&&i| results[i].class == Some(c)).count();
            report
                .recall_with_review
                .insert(c.name().to_string(), hit as f64 / idx.len() as f64);
        }
        for (r, &t) in results.iter().zip(&truth) {
            if let Some(c) = r.class {
                accepted += 1;
                ok += usize::from(c.index() == t);
            }
        }
        report.accuracy_accepted = (accepted > 0).then(|| ok as f64 / accepted as f64);
        let called: Vec<Option<usize>> = results.iter().map(|r| r.class.map(|c| c.index())).collect();
        report.macro_f1_with_review = Some(macro_f1_with_review(&truth, &called));
        report.report = Some(r);
        report.bootstrap = boot;
        let mut by_source: BTreeMap<String, (Vec<usize>, Vec<usize>)> = BTreeMap::new();
        for (s, (&t, &p)) in samples.iter().zip(truth.iter().zip(&predicted)) {
            let e = by_source.entry(s.source.clone()).or_default();
            e.0.push(t);
            e.1.push(p);
        }
        for (src, (t, p)) in by_source {
            report
                .per_source
                .insert(src, ConfusionMatrix::from_labels(columns, &t, &p).counts);
        }
        for (src, m) in &report.per_source {
            report.text.push_str(&format!(
                "\nConfusion matrix, source {src} (rows true, columns predicted):\n"
            ));
            report.text.push_str(&render_matrix(&names, m));
        }
        report.text.push_str(&format!(
            "\nCalibration: ECE {:.4} (15 bins)\nWith review rules: macro F1 {:.4}, accuracy on accepted cells {:.4}; recall counting Unidentified as a miss: {}\n",
            report.ece.unwrap_or(f64::NAN),
            report.macro_f1_with_review.unwrap_or(f64::NAN),
            report.accuracy_accepted.unwrap_or(f64::NAN),
            report
                .recall_with_review
                .iter()
                .map(|(k, v)| format!("{k} {v:.4}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    } else {
        report.text = format!("Unlabelled set: {} cells\nArgmax distribution:\n", samples.len());
        for (k, v) in &report.predicted_distribution {
            report.text.push_str(&format!("  {k:<12} {:6.2} %\n", v * 100.0));
        }
    }
    report.text.push_str("Reported (after review rules):\n");
    for (k, v) in &report.called_distribution {
        report.text.push_str(&format!("  {k:<12} {:6.2} %\n", v * 100.0));
    }
    for (k, v) in &report.unidentified_by_reason {
        report
            .text
            .push_str(&format!("  Unidentified because {k}: {:6.2} %\n", v * 100.0));
    }
    let (mut ok, mut n) = (0usize, 0usize);
    for (s, p) in samples.iter().zip(&preds) {
        for i in 0..NUM_ATTRIBUTES {
            if let Some(t) = s.attrs.0[i] {
                n += 1;
                ok += usize::from(p.attributes.is_some_and(|a| a.values.0[i] == Some(t)));
            }
        }
    }
    if n > 0 {
        let acc = ok as f64 / n as f64;
        report.attribute_accuracy = Some(acc);
        report
            .text
            .push_str(&format!("\nAttribute accuracy: {:.4} over {n} attribute labels\n", acc));
    }
    // Load the 90 MB embedder only when some cell has a reference description to compare with.
    let has_references = samples.iter().any(|s| reference_description(s).is_some());
    if let Some(dir) = opts.minilm.as_ref().filter(|_| has_references) {
        let embedder = MiniLm::load(dir, &burn::tensor::Device::flex())?;
        let mut sims = Vec::new();
        for (s, p) in samples.iter().zip(&preds) {
            if let Some(reference) = reference_description(s) {
                let generated = classifier.result(p).description;
                sims.push(embedder.similarity(&generated, &reference)? as f64);
            }
        }
        if !sims.is_empty() {
            let mean = sims.iter().sum::<f64>() / sims.len() as f64;
            let sd = (sims.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (sims.len().max(2) - 1) as f64).sqrt();
            report.description_similarity = Some(MeanSd { mean, sd });
            report.text.push_str(&format!(
                "Description similarity (all-MiniLM-L6-v2 cosine): {mean:.4} ± {sd:.4} over {} cells\n",
                sims.len()
            ));
        }
    }
    if !rejected.is_empty() {
        report
            .text
            .push_str(&format!("\n{} images could not be read:\n", rejected.len()));
        for r in &rejected {
            report.text.push_str(&format!("  {}: {}\n", r.path.display(), r.reason));
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_answer_names_its_first_class_as_a_whole_word() {
        let named = |t: &str| first_class_named(t);
        assert_eq!(named("This is a Neutrophil, segmented."), Some(CellClass::Neutrophil));
        assert_eq!(named("neutrophils and one blast"), Some(CellClass::Neutrophil));
        assert_eq!(named("Looks like a BLAST, not a lymphocyte"), Some(CellClass::Blast));
        assert_eq!(named("A monocyte-like cell"), Some(CellClass::Monocyte));
        assert_eq!(named("Eosinophil"), Some(CellClass::Eosinophil));
        // Inside a longer word it names nothing.
        assert_eq!(named("basophilic stippling in a prolymphocyte"), None);
        assert_eq!(named("blasts"), Some(CellClass::Blast));
        assert_eq!(named("blastic"), None);
        assert_eq!(named(""), None);
        assert_eq!(named("ööö lymphocyte"), Some(CellClass::Lymphocyte));
    }

    #[test]
    fn unidentified_cells_cost_recall_not_precision() {
        let truth = [0, 0, 1, 1];
        assert!((macro_f1_with_review(&truth, &[Some(0), Some(0), Some(1), Some(1)]) - 1.0).abs() < 1e-12);
        // One class-1 cell set aside: class 1 has precision 1, recall 0.5, F1 2/3.
        let f = macro_f1_with_review(&truth, &[Some(0), Some(0), Some(1), None]);
        assert!((f - (1.0 + 2.0 / 3.0) / 2.0).abs() < 1e-12, "{f}");
        // A wrong call costs the called class's precision as well.
        let f = macro_f1_with_review(&truth, &[Some(0), Some(1), Some(1), Some(1)]);
        assert!(f < 0.9, "{f}");
    }
}
