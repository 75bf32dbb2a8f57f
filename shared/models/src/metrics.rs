//! Classification metrics as the reference study reports them: confusion matrix, per-class
//! precision/recall/F1/support, accuracy, macro and weighted averages, and per-class
//! mean ± standard deviation over bootstrap resamples of the evaluated set.
//!
//! Conventions follow scikit-learn's `classification_report`: a class with no predicted (or no
//! true) sample has precision (or recall) 0, and F1 is 0 when precision + recall is 0.

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::fmt::Write;

/// Square confusion matrix: `counts[truth][predicted]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfusionMatrix {
    /// Row = true class, column = predicted class.
    pub counts: Vec<Vec<u64>>,
}

impl ConfusionMatrix {
    /// Empty matrix for `n` classes.
    pub fn new(n: usize) -> Self {
        ConfusionMatrix {
            counts: vec![vec![0; n]; n],
        }
    }

    /// Builds from paired labels.
    ///
    /// # Panics
    /// If a label is `>= n` or the slices differ in length.
    pub fn from_labels(n: usize, truth: &[usize], predicted: &[usize]) -> Self {
        assert_eq!(truth.len(), predicted.len(), "truth and predictions differ in length");
        let mut m = Self::new(n);
        for (&t, &p) in truth.iter().zip(predicted) {
            m.counts[t][p] += 1;
        }
        m
    }

    /// Number of classes.
    pub fn n(&self) -> usize {
        self.counts.len()
    }

    /// Total number of samples.
    pub fn total(&self) -> u64 {
        self.counts.iter().flatten().sum()
    }

    /// The full report derived from the matrix.
    pub fn report(&self) -> Report {
        self.report_over(self.n())
    }

    /// The report over the first `k` classes only, as scikit-learn's `labels=` argument gives
    /// it: the answers in the other columns (say, a generated answer that names no class) count
    /// against their row's recall and against no class's precision, and the averages run over
    /// the `k` classes.
    pub fn report_over(&self, k: usize) -> Report {
        let n = self.n();
        let k = k.min(n);
        let total = self.total();
        let mut per_class = Vec::with_capacity(k);
        for c in 0..k {
            let tp = self.counts[c][c] as f64;
            let support: u64 = self.counts[c].iter().sum();
            let predicted: u64 = (0..n).map(|r| self.counts[r][c]).sum();
            let precision = if predicted == 0 { 0.0 } else { tp / predicted as f64 };
            let recall = if support == 0 { 0.0 } else { tp / support as f64 };
            let f1 = if precision + recall == 0.0 {
                0.0
            } else {
                2.0 * precision * recall / (precision + recall)
            };
            per_class.push(ClassMetrics {
                precision,
                recall,
                f1,
                support,
            });
        }
        let correct: u64 = (0..k).map(|c| self.counts[c][c]).sum();
        let accuracy = if total == 0 { 0.0 } else { correct as f64 / total as f64 };
        let supported: u64 = per_class.iter().map(|m| m.support).sum();
        let avg = |f: &dyn Fn(&ClassMetrics) -> f64, weighted: bool| -> f64 {
            if weighted {
                if supported == 0 {
                    return 0.0;
                }
                per_class.iter().map(|m| f(m) * m.support as f64).sum::<f64>() / supported as f64
            } else {
                per_class.iter().map(f).sum::<f64>() / k.max(1) as f64
            }
        };
        let macro_avg = Averages {
            precision: avg(&|m| m.precision, false),
            recall: avg(&|m| m.recall, false),
            f1: avg(&|m| m.f1, false),
        };
        let weighted_avg = Averages {
            precision: avg(&|m| m.precision, true),
            recall: avg(&|m| m.recall, true),
            f1: avg(&|m| m.f1, true),
        };
        Report {
            accuracy,
            per_class,
            macro_avg,
            weighted_avg,
            total,
        }
    }
}

/// Precision, recall, F1 and support of one class.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    /// TP / (TP + FP).
    pub precision: f64,
    /// TP / (TP + FN).
    pub recall: f64,
    /// Harmonic mean of precision and recall.
    pub f1: f64,
    /// Number of true samples of the class.
    pub support: u64,
}

/// Averages over classes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Averages {
    /// Averaged precision.
    pub precision: f64,
    /// Averaged recall.
    pub recall: f64,
    /// Averaged F1.
    pub f1: f64,
}

/// Everything derived from one confusion matrix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Fraction of samples predicted correctly.
    pub accuracy: f64,
    /// Metrics of each class, in class order.
    pub per_class: Vec<ClassMetrics>,
    /// Unweighted mean over classes.
    pub macro_avg: Averages,
    /// Mean over classes weighted by support.
    pub weighted_avg: Averages,
    /// Number of samples.
    pub total: u64,
}

/// Mean and standard deviation of one quantity over bootstrap resamples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeanSd {
    /// Mean over resamples.
    pub mean: f64,
    /// Sample standard deviation over resamples.
    pub sd: f64,
}

impl MeanSd {
    fn of(values: &[f64]) -> Self {
        let n = values.len() as f64;
        if values.is_empty() {
            return MeanSd { mean: 0.0, sd: 0.0 };
        }
        let mean = values.iter().sum::<f64>() / n;
        let var = if values.len() < 2 {
            0.0
        } else {
            values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
        };
        MeanSd { mean, sd: var.sqrt() }
    }
}

/// Per-class mean ± SD of precision, recall and F1 (the reference study's Mean ± SD table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootstrapClass {
    /// Precision over resamples.
    pub precision: MeanSd,
    /// Recall over resamples.
    pub recall: MeanSd,
    /// F1 over resamples.
    pub f1: MeanSd,
    /// Support in the original set.
    pub support: u64,
}

/// Resamples the evaluated set with replacement `resamples` times (seeded, reproducible) and
/// returns each class's mean ± SD of precision, recall and F1.
pub fn bootstrap(n: usize, truth: &[usize], predicted: &[usize], resamples: usize, seed: u64) -> Vec<BootstrapClass> {
    assert_eq!(truth.len(), predicted.len());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut samples: Vec<[Vec<f64>; 3]> = (0..n).map(|_| [vec![], vec![], vec![]]).collect();
    let len = truth.len();
    for _ in 0..resamples {
        let mut m = ConfusionMatrix::new(n);
        for _ in 0..len {
            let i = rng.gen_range(0..len);
            m.counts[truth[i]][predicted[i]] += 1;
        }
        for (c, cm) in m.report().per_class.iter().enumerate() {
            samples[c][0].push(cm.precision);
            samples[c][1].push(cm.recall);
            samples[c][2].push(cm.f1);
        }
    }
    let support = ConfusionMatrix::from_labels(n, truth, predicted).report();
    samples
        .iter()
        .enumerate()
        .map(|(c, s)| BootstrapClass {
            precision: MeanSd::of(&s[0]),
            recall: MeanSd::of(&s[1]),
            f1: MeanSd::of(&s[2]),
            support: support.per_class[c].support,
        })
        .collect()
}

/// Cosine similarity of two vectors (0 when either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 { 0.0 } else { dot / (na * nb) }
}

/// Text tables in the reference study's layout.
pub fn render_tables(names: &[&str], report: &Report, boot: &[BootstrapClass], cm: &ConfusionMatrix) -> String {
    let mut s = String::new();
    let w = names.iter().map(|n| n.len()).max().unwrap_or(5).max(12);
    let _ = writeln!(s, "Performance Report 1: per class");
    let _ = writeln!(
        s,
        "{:<w$} {:>9} {:>9} {:>9} {:>9}",
        "class", "precision", "recall", "f1-score", "support"
    );
    for (name, m) in names.iter().zip(&report.per_class) {
        let _ = writeln!(
            s,
            "{:<w$} {:>9.4} {:>9.4} {:>9.4} {:>9}",
            name, m.precision, m.recall, m.f1, m.support
        );
    }
    let _ = writeln!(s, "\nPerformance Report 2: averages");
    let _ = writeln!(
        s,
        "{:<w$} {:>9} {:>9} {:>9} {:>9}",
        "", "precision", "recall", "f1-score", "support"
    );
    let _ = writeln!(
        s,
        "{:<w$} {:>9} {:>9} {:>9.4} {:>9}",
        "accuracy", "", "", report.accuracy, report.total
    );
    for (label, a) in [("macro avg", report.macro_avg), ("weighted avg", report.weighted_avg)] {
        let _ = writeln!(
            s,
            "{:<w$} {:>9.4} {:>9.4} {:>9.4} {:>9}",
            label, a.precision, a.recall, a.f1, report.total
        );
    }
    let _ = writeln!(s, "\nMean ± SD over bootstrap resamples");
    let _ = writeln!(
        s,
        "{:<w$} {:>17} {:>17} {:>17} {:>9}",
        "class", "precision", "recall", "f1-score", "support"
    );
    for (name, b) in names.iter().zip(boot) {
        let f = |m: MeanSd| format!("{:.4} ± {:.4}", m.mean, m.sd);
        let _ = writeln!(
            s,
            "{:<w$} {:>17} {:>17} {:>17} {:>9}",
            name,
            f(b.precision),
            f(b.recall),
            f(b.f1),
            b.support
        );
    }
    let _ = writeln!(s, "\nConfusion matrix (rows: true, columns: predicted)");
    s.push_str(&render_matrix(names, &cm.counts));
    s
}

/// A confusion matrix as aligned text (rows true, columns predicted; names cut to 8 chars).
pub fn render_matrix(names: &[&str], counts: &[Vec<u64>]) -> String {
    let w = names.iter().map(|n| n.len()).max().unwrap_or(0).max(12);
    let mut s = String::new();
    let _ = write!(s, "{:<w$}", "");
    for n in names {
        let _ = write!(s, " {:>8}", &n[..n.len().min(8)]);
    }
    let _ = writeln!(s);
    for (name, row) in names.iter().zip(counts) {
        let _ = write!(s, "{:<w$}", name);
        for v in row {
            let _ = write!(s, " {:>8}", v);
        }
        let _ = writeln!(s);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    // Hand-computed with scikit-learn's `classification_report` conventions for these labels:
    // y_true = [0,0,0,1,1,2,2,2,2,2], y_pred = [0,0,1,1,1,2,2,2,0,1]
    #[test]
    fn matches_scikit_learn_classification_report() {
        let t = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2];
        let p = [0, 0, 1, 1, 1, 2, 2, 2, 0, 1];
        let cm = ConfusionMatrix::from_labels(3, &t, &p);
        assert_eq!(cm.counts, vec![vec![2, 1, 0], vec![0, 2, 0], vec![1, 1, 3]]);
        let r = cm.report();
        let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        close(r.accuracy, 0.7);
        close(r.per_class[0].precision, 0.6667);
        close(r.per_class[0].recall, 0.6667);
        close(r.per_class[1].precision, 0.5);
        close(r.per_class[1].f1, 0.6667);
        close(r.per_class[2].precision, 1.0);
        close(r.per_class[2].recall, 0.6);
        close(r.per_class[2].f1, 0.75);
        close(r.macro_avg.f1, 0.6944);
        close(r.weighted_avg.f1, 0.7083);
        close(r.weighted_avg.precision, 0.8);
    }

    // scikit-learn's `classification_report(t, p, labels=[0, 1, 2])` where class 3 is an answer
    // that names no class: y_true = [0,0,0,1,1,2,2,2,2,2], y_pred = [0,0,3,1,1,2,2,3,0,1].
    #[test]
    fn a_report_over_some_classes_counts_the_other_answers_as_misses() {
        let t = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2];
        let p = [0, 0, 3, 1, 1, 2, 2, 3, 0, 1];
        let r = ConfusionMatrix::from_labels(4, &t, &p).report_over(3);
        let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        assert_eq!(r.per_class.len(), 3);
        close(r.accuracy, 0.6);
        close(r.per_class[0].recall, 0.6667);
        close(r.per_class[1].precision, 0.6667);
        close(r.per_class[1].f1, 0.8);
        close(r.per_class[2].recall, 0.4);
        close(r.per_class[2].f1, 0.5714);
        close(r.macro_avg.precision, 0.7778);
        close(r.macro_avg.f1, 0.6794);
        close(r.weighted_avg.precision, 0.8333);
        close(r.weighted_avg.f1, 0.6457);
        assert_eq!(r.total, 10);
    }

    #[test]
    fn absent_class_scores_zero_not_nan() {
        let r = ConfusionMatrix::from_labels(3, &[0, 1], &[0, 0]).report();
        assert_eq!(r.per_class[2].support, 0);
        assert_eq!(r.per_class[2].f1, 0.0);
        assert_eq!(r.per_class[1].precision, 0.0);
        assert!(r.macro_avg.f1.is_finite());
    }

    #[test]
    fn bootstrap_is_reproducible_and_brackets_the_point_estimate() {
        let t: Vec<usize> = (0..300).map(|i| i % 3).collect();
        let p: Vec<usize> = t
            .iter()
            .enumerate()
            .map(|(i, &c)| if i % 10 == 0 { (c + 1) % 3 } else { c })
            .collect();
        let a = bootstrap(3, &t, &p, 200, 7);
        let b = bootstrap(3, &t, &p, 200, 7);
        assert_eq!(a, b);
        let point = ConfusionMatrix::from_labels(3, &t, &p).report();
        for (boot, exact) in a.iter().zip(&point.per_class) {
            assert!((boot.f1.mean - exact.f1).abs() < 0.02);
            assert!(boot.f1.sd > 0.0 && boot.f1.sd < 0.05);
            assert_eq!(boot.support, 100);
        }
        // A perfect classifier has zero spread.
        let perfect = bootstrap(3, &t, &t, 50, 1);
        assert!(perfect.iter().all(|c| c.f1.mean == 1.0 && c.f1.sd == 0.0));
    }

    #[test]
    fn cosine_of_parallel_orthogonal_and_zero_vectors() {
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-6);
        assert_eq!(cosine(&[1.0, 0.0], &[0.0, 3.0]), 0.0);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
    }

    #[test]
    fn tables_contain_every_class_and_the_averages() {
        let t = [0, 1, 1];
        let p = [0, 1, 0];
        let cm = ConfusionMatrix::from_labels(2, &t, &p);
        let txt = render_tables(
            &["Basophil", "Eosinophil"],
            &cm.report(),
            &bootstrap(2, &t, &p, 10, 0),
            &cm,
        );
        for needle in ["Basophil", "Eosinophil", "macro avg", "weighted avg", "accuracy", "±"] {
            assert!(txt.contains(needle), "missing {needle}");
        }
    }
}
