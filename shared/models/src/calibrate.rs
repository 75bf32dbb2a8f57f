//! Calibrated probabilities and out-of-distribution awareness.
//!
//! - Temperature scaling: one scalar `T`, fitted on val by minimising the negative
//!   log-likelihood, divides the logits; it leaves the predicted class unchanged and makes a
//!   probability of 0.9 mean "right nine times in ten" on cells like the val set. Expected
//!   calibration error ([`ece`]) measures how far from that the probabilities are.
//! - Familiarity: a cell's pooled backbone features, L2-normalised, are compared with a bank of
//!   training cells' features; the score is `1 − cos` to the `k`-th nearest (deep k-NN,
//!   Sun et al. 2022). The threshold is a high quantile of the val scores, so a fixed, known
//!   share of in-domain cells is set aside; a cell beyond it "does not look like the training
//!   data" and is reported as Unidentified for review instead of being forced into a class.
//! - Agreement: the bank remembers each cell's class, and the `k` nearest training cells vote.
//!   When the model's class is not the vote's, the model is answering from something other
//!   than resemblance to the cells it learnt from (a site's look rather than the cell's
//!   morphology), and the cell goes to review too.

use crate::compact::mobilenet::FEATURES;
use crate::compact::softmax_t;
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use wbc_protocol::classes::NUM_CLASSES;

/// Bundle part holding [`Calibration`].
pub const CALIBRATION_PART: &str = "calibration.json";
/// Bundle part holding the k-NN feature bank (safetensors, one f16 tensor `bank`).
pub const OOD_BANK_PART: &str = "ood_bank.safetensors";

/// What a bundle stores about its probabilities and its familiarity score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// Logit temperature (1 = uncalibrated).
    pub temperature: f32,
    /// Familiarity model, where the bundle has one.
    #[serde(default)]
    pub ood: Option<OodConfig>,
    /// A Blast call needs at least this (calibrated) probability; below it the cell goes to
    /// review. An urgent flag that fires on another site's normal cells teaches technicians to
    /// ignore it, so blast calls must be as sure as the val blasts the model gets right.
    #[serde(default)]
    pub blast_min_confidence: f32,
    /// A Blast call also needs a nucleus at least this large (µm; 0 = no size check), where
    /// the cell's pixel size is known: a myeloblast's nucleus is large, and a cell whose
    /// nucleus is smaller than those of nearly all the val blasts is more likely a lymphocyte
    /// that looks unfamiliar than a blast. Such a cell is held back for review as a possible
    /// blast (the slide's `possible_blast` flag) instead. Left out of the file when 0, so that
    /// bundles without the check stay readable by older appliances.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub blast_min_nucleus_um: f32,
    /// A site bundle's blast guard: the signed model it was taught from, kept beside it to
    /// hold back the blasts that what the clinic taught would call something else. Older
    /// appliances refuse a calibration that has one (unknown field), so that a site bundle
    /// never runs without its guard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<BlastGuard>,
}

/// Name of the part that holds a blast guard's weights (the signed model's, byte for byte).
pub const GUARD_PART: &str = "guard.safetensors";

/// The signed model's blast call, consulted beside a site bundle's taught one.
///
/// A clinic teaches its model the cells it reviews, nearly never a blast, and that moves the
/// taught classes' boundaries into blast territory: a few blasts the signed model flagged
/// become monocytes. A cell is held back for review as a possible blast when the signed
/// model's most probable class is Blast and the taught model still gives Blast at least
/// `min_taught_blast`: the second condition keeps the signed model's false blasts at the site
/// (cells the clinic taught otherwise) out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlastGuard {
    /// The signed model's temperature.
    pub temperature: f32,
    /// The taught model's (calibrated) Blast probability the guard needs as well.
    pub min_taught_blast: f32,
    /// Model version of the signed model.
    pub from_model_version: u64,
    /// The signed model's own cell-normalisation setting of the dark-nucleus rule
    /// ([`wbc_protocol::preprocess::CellNorm::dark_nucleus`]): the guard sees each cell as the
    /// signed bundle would have shown it to its model, so that a site bundle holds back every
    /// cell the signed bundle calls Blast (that the taught model still doubts), whatever the
    /// site turned on.
    pub dark_nucleus: bool,
}

fn is_zero(v: &f32) -> bool {
    *v == 0.0
}

impl Default for Calibration {
    fn default() -> Self {
        Calibration {
            temperature: 1.0,
            ood: None,
            blast_min_confidence: 0.0,
            blast_min_nucleus_um: 0.0,
            guard: None,
        }
    }
}

/// Settings of the k-NN familiarity score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OodConfig {
    /// Which nearest neighbour's similarity is the score.
    pub k: usize,
    /// Cells scoring above this are Unidentified.
    pub threshold: f32,
    /// Val quantile the threshold was set at.
    pub quantile: f64,
    /// Cells in the bank.
    pub bank_size: usize,
    /// Send cells whose class differs from their nearest training cells' vote to review.
    #[serde(default)]
    pub require_agreement: bool,
}

/// A cell measured against the bank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KnnOut {
    /// `1 − cos` to the k-th nearest bank cell (higher = less familiar).
    pub score: f32,
    /// Majority class of the k nearest bank cells (ties go to the nearer cells).
    pub vote: usize,
}

/// Negative log-likelihood (mean, nats) of labels under softmax(logits / t).
pub fn nll(logits: &[[f32; NUM_CLASSES]], labels: &[usize], t: f32) -> f64 {
    let n = logits.len().max(1) as f64;
    logits
        .iter()
        .zip(labels)
        .map(|(l, &y)| -(softmax_t(l, t)[y].max(1e-12) as f64).ln())
        .sum::<f64>()
        / n
}

/// The temperature in 0.05..20 that minimises the val NLL (golden-section search on log T;
/// the NLL is unimodal in T).
pub fn fit_temperature(logits: &[[f32; NUM_CLASSES]], labels: &[usize]) -> f32 {
    let f = |lt: f64| nll(logits, labels, lt.exp() as f32);
    let (mut a, mut b) = (0.05f64.ln(), 20f64.ln());
    let g = (5f64.sqrt() - 1.0) / 2.0;
    let (mut c, mut d) = (b - g * (b - a), a + g * (b - a));
    let (mut fc, mut fd) = (f(c), f(d));
    for _ in 0..60 {
        if fc < fd {
            b = d;
            d = c;
            fd = fc;
            c = b - g * (b - a);
            fc = f(c);
        } else {
            a = c;
            c = d;
            fc = fd;
            d = a + g * (b - a);
            fd = f(d);
        }
    }
    ((a + b) / 2.0).exp() as f32
}

/// Expected calibration error: the support-weighted mean gap between confidence (top
/// probability) and accuracy over `bins` equal-width confidence bins.
pub fn ece(probs: &[[f32; NUM_CLASSES]], labels: &[usize], bins: usize) -> f64 {
    let bins = bins.max(1);
    let mut conf = vec![0f64; bins];
    let mut acc = vec![0f64; bins];
    let mut count = vec![0usize; bins];
    for (p, &y) in probs.iter().zip(labels) {
        let (best, &c) = p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).expect("classes");
        let b = ((c as f64 * bins as f64) as usize).min(bins - 1);
        conf[b] += c as f64;
        acc[b] += f64::from(u8::from(best == y));
        count[b] += 1;
    }
    let n = probs.len().max(1) as f64;
    (0..bins)
        .filter(|&b| count[b] > 0)
        .map(|b| (conf[b] - acc[b]).abs() / n)
        .sum()
}

/// The `q` quantile (0..=1, nearest rank) of values.
pub fn quantile(values: &[f32], q: f64) -> f32 {
    let mut v = values.to_vec();
    v.sort_by(f32::total_cmp);
    if v.is_empty() {
        return f32::NAN;
    }
    v[((v.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize]
}

/// Why a feature bank could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BankError {
    /// Not a safetensors file with one `bank` tensor of shape `[n, FEATURES]`.
    #[error("feature bank is malformed: {0}")]
    Malformed(String),
}

/// L2-normalised training features to measure familiarity against.
#[derive(Debug, Clone)]
pub struct KnnBank {
    bank: Tensor<2>,
    labels: Vec<u8>,
    k: usize,
    len: usize,
}

fn l2_normalise(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= n);
}

impl KnnBank {
    /// A bank from `n × FEATURES` row-major features (normalised here) and their classes.
    pub fn new(mut features: Vec<f32>, labels: Vec<u8>, k: usize, device: &Device) -> Result<Self, BankError> {
        if features.is_empty() || !features.len().is_multiple_of(FEATURES) {
            return Err(BankError::Malformed(format!(
                "{} values is not a whole number of {FEATURES}-feature rows",
                features.len()
            )));
        }
        let n = features.len() / FEATURES;
        if k == 0 || k > n {
            return Err(BankError::Malformed(format!("k = {k} with {n} cells in the bank")));
        }
        if labels.len() != n || labels.iter().any(|&l| l as usize >= NUM_CLASSES) {
            return Err(BankError::Malformed(format!(
                "{} labels (all below {NUM_CLASSES}) expected, got {:?}",
                n,
                &labels[..labels.len().min(8)]
            )));
        }
        features.chunks_mut(FEATURES).for_each(l2_normalise);
        let bank = Tensor::<2>::from_data(TensorData::new(features, [n, FEATURES]), device).transpose();
        Ok(KnnBank {
            bank,
            labels,
            k,
            len: n,
        })
    }

    /// Cells in the bank.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the bank is empty (never, once built).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Familiarity score and neighbour vote for each row of `features` (`m × FEATURES`).
    pub fn scores(&self, features: &[f32]) -> Vec<KnnOut> {
        let m = features.len() / FEATURES;
        if m == 0 {
            return Vec::new();
        }
        let mut q = features[..m * FEATURES].to_vec();
        q.chunks_mut(FEATURES).for_each(l2_normalise);
        let device = self.bank.device();
        let q = Tensor::<2>::from_data(TensorData::new(q, [m, FEATURES]), &device);
        let sims = q
            .matmul(self.bank.clone())
            .into_data()
            .try_into_vec_as::<f32>()
            .expect("f32");
        sims.chunks(self.len)
            .map(|row| {
                let mut idx: Vec<usize> = (0..row.len()).collect();
                // The k most similar, most similar first.
                idx.select_nth_unstable_by(self.k - 1, |&a, &b| row[b].total_cmp(&row[a]));
                idx.truncate(self.k);
                idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                let mut votes = [0usize; NUM_CLASSES];
                for &i in &idx {
                    votes[self.labels[i] as usize] += 1;
                }
                let most = *votes.iter().max().expect("classes");
                let vote = idx
                    .iter()
                    .map(|&i| self.labels[i] as usize)
                    .find(|&c| votes[c] == most)
                    .expect("k >= 1");
                KnnOut {
                    // Rounding can push a cosine a hair past 1.
                    score: 1.0 - row[idx[self.k - 1]].clamp(-1.0, 1.0),
                    vote,
                }
            })
            .collect()
    }

    /// Serialises `n × FEATURES` features (f16: half the size, far more precision than a
    /// similarity threshold needs) and their classes as safetensors.
    pub fn to_safetensors(features: &[f32], labels: &[u8]) -> Result<Vec<u8>, BankError> {
        let n = features.len() / FEATURES;
        let bytes: Vec<u8> = features
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        let bad = |e: safetensors::SafeTensorError| BankError::Malformed(e.to_string());
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![n, FEATURES], &bytes).map_err(bad)?;
        let lab =
            safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![labels.len()], labels).map_err(bad)?;
        safetensors::serialize([("bank", view), ("labels", lab)], None).map_err(bad)
    }

    /// Reads features and classes written by [`KnnBank::to_safetensors`].
    pub fn from_safetensors(bytes: &[u8]) -> Result<(Vec<f32>, Vec<u8>), BankError> {
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| BankError::Malformed(e.to_string()))?;
        let t = st.tensor("bank").map_err(|e| BankError::Malformed(e.to_string()))?;
        if t.dtype() != safetensors::Dtype::F16 || t.shape().len() != 2 || t.shape()[1] != FEATURES {
            return Err(BankError::Malformed(format!(
                "bank is {:?} {:?}, expected F16 [n, {FEATURES}]",
                t.dtype(),
                t.shape()
            )));
        }
        let labels = st.tensor("labels").map_err(|e| BankError::Malformed(e.to_string()))?;
        if labels.dtype() != safetensors::Dtype::U8 || labels.shape() != [t.shape()[0]] {
            return Err(BankError::Malformed(format!(
                "labels are {:?} {:?}, expected U8 [{}]",
                labels.dtype(),
                labels.shape(),
                t.shape()[0]
            )));
        }
        let features = t
            .data()
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect();
        Ok((features, labels.data().to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temperature_recovers_overconfidence_and_ece_drops() {
        // Logits that are 4× too sharp for how often they are right (70%).
        let mut logits = Vec::new();
        let mut labels = Vec::new();
        for i in 0..1000 {
            let mut l = [0f32; NUM_CLASSES];
            l[0] = 4.0 * 1.5;
            logits.push(l);
            labels.push(if i % 10 < 7 { 0 } else { 1 + i % 5 });
        }
        let t = fit_temperature(&logits, &labels);
        assert!(t > 2.0, "temperature {t}");
        let p1: Vec<_> = logits.iter().map(|l| softmax_t(l, 1.0)).collect();
        let pt: Vec<_> = logits.iter().map(|l| softmax_t(l, t)).collect();
        let (e1, et) = (ece(&p1, &labels, 15), ece(&pt, &labels, 15));
        assert!(et < 0.02 && e1 > 0.2, "ECE {e1} -> {et}");
        assert!((pt[0][0] - 0.7).abs() < 0.02, "calibrated confidence {}", pt[0][0]);
        assert!(nll(&logits, &labels, t) < nll(&logits, &labels, 1.0));
    }

    #[test]
    fn knn_scores_familiar_cells_low_and_strangers_high_and_round_trips() {
        let device = Device::flex();
        let mut bank = vec![0f32; 20 * FEATURES];
        let labels: Vec<u8> = (0..20).map(|i| (i % 4) as u8).collect();
        for (i, row) in bank.chunks_mut(FEATURES).enumerate() {
            row[i % 4] = 1.0;
            row[100 + i] = 0.1;
        }
        let knn = KnnBank::new(bank.clone(), labels.clone(), 3, &device).unwrap();
        assert_eq!(knn.len(), 20);
        let mut q = vec![0f32; 2 * FEATURES];
        q[1] = 2.0; // like bank rows 1, 5, 9, ... (class 1)
        q[FEATURES + 900] = 1.0; // like nothing
        let s = knn.scores(&q);
        assert!(s[0].score < 0.05 && s[1].score > 0.9, "{s:?}");
        assert_eq!(s[0].vote, 1, "the neighbours are class 1");
        let (back, back_labels) = KnnBank::from_safetensors(&KnnBank::to_safetensors(&bank, &labels).unwrap()).unwrap();
        assert_eq!(back.len(), bank.len());
        assert_eq!(back_labels, labels);
        assert!(back.iter().zip(&bank).all(|(a, b)| (a - b).abs() < 1e-3));
        assert!(KnnBank::new(vec![0.0; 10], vec![0], 1, &device).is_err());
        assert!(KnnBank::new(bank.clone(), labels.clone(), 21, &device).is_err());
        assert!(
            KnnBank::new(bank.clone(), vec![0; 19], 1, &device).is_err(),
            "one label per cell"
        );
        assert!(
            KnnBank::new(bank, vec![9; 20], 1, &device).is_err(),
            "labels are classes"
        );
        assert!(KnnBank::from_safetensors(b"garbage").is_err());
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 1.0), 3.0);
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), 2.0);
    }
}
