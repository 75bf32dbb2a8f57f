//! Source-adversarial training (a class-conditional domain critic).
//!
//! Every blast of the training data comes from one scanner, so a network can learn "looks like
//! that scanner" as a blast cue, one that fails at another hospital. A critic reads the pooled
//! features of the cells of classes that several sources share (here the neutrophils, found in
//! both `pbc` and `munich`) and learns to guess their source; the network, through a frozen copy
//! of the critic, is trained to leave it guessing (its output as close to uniform over the
//! sources as it can: Tzeng et al.'s domain confusion, which unlike a reversed gradient has a
//! bounded optimum — a reversed gradient, tried first, made the features grow without bound to
//! fool the critic and wrecked the class head within two epochs). Conditioning on shared
//! classes matters: asking the same of all cells would ask the network to forget that blasts
//! differ from neutrophils (every blast is from one source).

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::Device;
use burn::tensor::activation::{log_softmax, relu};
use burn::tensor::module::linear;
use burn::tensor::{Int, Tensor, TensorData};
use std::collections::{BTreeMap, BTreeSet};

use crate::dataset::Sample;

/// A small critic `features -> hidden -> sources`.
#[derive(Module, Debug)]
pub struct SourceCritic {
    hidden: Linear,
    out: Linear,
}

impl SourceCritic {
    /// A fresh critic for `features`-wide inputs and `sources` sources.
    pub fn new(features: usize, sources: usize, device: &Device) -> Self {
        SourceCritic {
            hidden: LinearConfig::new(features, 256).init(device),
            out: LinearConfig::new(256, sources.max(1)).init(device),
        }
    }

    /// Source logits; with `frozen`, the critic's own weights take no gradient (what the
    /// network is trained against), without it the features take none (what trains the
    /// critic).
    fn forward(&self, features: Tensor<2>, frozen: bool) -> Tensor<2> {
        let params = |l: &Linear| {
            let (w, b) = (l.weight.val(), l.bias.as_ref().map(|b| b.val()));
            if frozen {
                (w.detach(), b.map(|b| b.detach()))
            } else {
                (w, b)
            }
        };
        let x = if frozen { features } else { features.detach() };
        let (w1, b1) = params(&self.hidden);
        let (w2, b2) = params(&self.out);
        linear(relu(linear(x, w1, b1)), w2, b2)
    }
}

/// The critic's two losses over one batch.
pub struct CriticLoss {
    /// Weighted cross-entropy of the critic's guess (gradients reach the critic only).
    pub critic: Tensor<1>,
    /// Weighted cross-entropy of the frozen critic's output against the uniform distribution
    /// over sources (gradients reach the features only); least, `ln(sources)`, when the critic
    /// cannot tell the sources apart.
    pub confusion: Tensor<1>,
    /// Cells the critic guessed right.
    pub right: usize,
    /// Cells it saw.
    pub seen: usize,
}

/// The weight of the confusion loss at training progress `p` (0..=1): it rises smoothly from 0 to
/// `max` (Ganin & Lempitsky's schedule), so the critic's early, random gradients do not disturb
/// the class head while it forms.
pub fn schedule(max: f64, p: f64) -> f64 {
    max * (2.0 / (1.0 + (-10.0 * p.clamp(0.0, 1.0)).exp()) - 1.0)
}

/// Which training cells the critic sees and what it must guess.
#[derive(Debug, Clone)]
pub struct SourcePlan {
    /// Source names, in the critic's output order.
    pub sources: Vec<String>,
    /// Per training sample: its source's index when its class is shared by several sources.
    pub target: Vec<Option<usize>>,
    /// Loss weight per source (inverse frequency among the critic's cells, mean 1).
    pub weights: Vec<f32>,
    /// The shared classes, by name.
    pub classes: Vec<String>,
}

impl SourcePlan {
    /// The plan for `samples`; `None` when no class comes from more than one source.
    pub fn new(samples: &[Sample]) -> Option<Self> {
        let mut by_class: BTreeMap<usize, BTreeSet<&str>> = BTreeMap::new();
        for s in samples {
            if let Some(l) = s.label {
                by_class.entry(l.index()).or_default().insert(&s.source);
            }
        }
        let shared: BTreeSet<usize> = by_class
            .iter()
            .filter(|(_, srcs)| srcs.len() > 1)
            .map(|(&c, _)| c)
            .collect();
        if shared.is_empty() {
            return None;
        }
        let sources: Vec<String> = shared
            .iter()
            .flat_map(|c| by_class[c].iter().map(|s| s.to_string()))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let target: Vec<Option<usize>> = samples
            .iter()
            .map(|s| match s.label {
                Some(l) if shared.contains(&l.index()) => sources.iter().position(|x| *x == s.source),
                _ => None,
            })
            .collect();
        let mut counts = vec![0usize; sources.len()];
        for t in target.iter().flatten() {
            counts[*t] += 1;
        }
        let n: usize = counts.iter().sum();
        let weights = counts
            .iter()
            .map(|&c| n as f32 / (sources.len() * c.max(1)) as f32)
            .collect();
        let classes = shared
            .iter()
            .map(|&c| wbc_protocol::classes::CellClass::ALL[c].name().to_string())
            .collect();
        Some(SourcePlan {
            sources,
            target,
            weights,
            classes,
        })
    }

    /// The critic's losses over the rows of `features` (a batch of the samples `idx`) whose
    /// class is shared; `None` when the batch has none.
    pub fn loss(&self, critic: &SourceCritic, features: Tensor<2>, idx: &[usize]) -> Option<CriticLoss> {
        let rows: Vec<(i64, i64)> = idx
            .iter()
            .enumerate()
            .filter_map(|(row, &i)| self.target[i].map(|t| (row as i64, t as i64)))
            .collect();
        if rows.is_empty() {
            return None;
        }
        let device = features.device();
        let k = rows.len();
        let pick = Tensor::<1, Int>::from_data(TensorData::new(rows.iter().map(|r| r.0).collect(), [k]), &device);
        let truth: Vec<i64> = rows.iter().map(|r| r.1).collect();
        let t = Tensor::<1, Int>::from_data(TensorData::new(truth.clone(), [k]), &device);
        let w = Tensor::<1>::from_data(TensorData::new(self.weights.clone(), [self.weights.len()]), &device)
            .select(0, t.clone());
        let rows = features.select(0, pick);
        let logits = critic.forward(rows.clone(), false);
        let guessed: Vec<i64> = logits
            .clone()
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .try_into_vec::<i64>()
            .expect("argmax");
        let right = guessed.iter().zip(&truth).filter(|(a, b)| a == b).count();
        let logp = log_softmax(logits, 1).gather(1, t.reshape([k, 1])).reshape([k]);
        let critic_loss = (logp * w.clone()).sum().neg() / w.clone().sum();
        let s = self.sources.len() as f64;
        let uniform = log_softmax(critic.forward(rows, true), 1)
            .sum_dim(1)
            .reshape([k])
            .div_scalar(s);
        let confusion = (uniform * w.clone()).sum().neg() / w.sum();
        Some(CriticLoss {
            critic: critic_loss,
            confusion,
            right,
            seen: k,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wbc_protocol::classes::CellClass;

    fn sample(label: CellClass, source: &str) -> Sample {
        Sample {
            path: "x.jpg".into(),
            label: Some(label),
            attrs: Default::default(),
            source: source.into(),
            description: None,
            microns_per_pixel: None,
        }
    }

    #[test]
    fn the_schedule_rises_from_zero_to_the_maximum() {
        assert_eq!(schedule(0.3, 0.0), 0.0);
        assert!((schedule(0.3, 1.0) - 0.3).abs() < 1e-4);
        assert!(schedule(0.3, 0.2) > schedule(0.3, 0.1));
    }

    #[test]
    fn only_classes_from_several_sources_are_shown_to_the_critic() {
        let s = vec![
            sample(CellClass::Neutrophil, "pbc"),
            sample(CellClass::Neutrophil, "pbc"),
            sample(CellClass::Neutrophil, "pbc"),
            sample(CellClass::Neutrophil, "munich"),
            sample(CellClass::Blast, "munich"),
            sample(CellClass::Basophil, "pbc"),
        ];
        let plan = SourcePlan::new(&s).expect("neutrophils are shared");
        assert_eq!(plan.sources, vec!["munich", "pbc"]);
        assert_eq!(plan.classes, vec!["Neutrophil"]);
        assert_eq!(plan.target, vec![Some(1), Some(1), Some(1), Some(0), None, None]);
        // Inverse frequency: the one munich neutrophil weighs as much as the three pbc ones.
        assert_eq!(plan.weights, vec![2.0, 2.0 / 3.0]);
        assert!(SourcePlan::new(&s[4..]).is_none(), "no shared class, no critic");
    }

    #[test]
    fn the_critic_trains_on_its_guess_and_the_features_on_its_confusion() {
        // Two neutrophils whose features carry their source in the first coordinate.
        let device = Device::flex().autodiff();
        let s = vec![sample(CellClass::Neutrophil, "a"), sample(CellClass::Neutrophil, "b")];
        let plan = SourcePlan::new(&s).unwrap();
        let critic = SourceCritic::new(4, 2, &device);
        let values = vec![1.0f32, 0., 0., 0., -1., 0., 0., 0.];
        let f = || Tensor::<2>::from_data(TensorData::new(values.clone(), [2, 4]), &device).require_grad();
        let nonzero = |t: Option<Tensor<2>>| t.is_some_and(|t| t.abs().sum().into_scalar::<f32>() > 0.0);
        // The critic's loss trains the critic and leaves the features alone.
        let x = f();
        let l = plan.loss(&critic, x.clone(), &[0, 1]).unwrap();
        assert_eq!(l.seen, 2);
        let grads = l.critic.backward();
        assert!(!nonzero(x.grad(&grads)), "the critic's loss must not move the features");
        assert!(nonzero(critic.hidden.weight.grad(&grads)));
        // The confusion loss trains the features and leaves the critic alone.
        let x = f();
        let l = plan.loss(&critic, x.clone(), &[0, 1]).unwrap();
        let grads = l.confusion.backward();
        assert!(nonzero(x.grad(&grads)));
        assert!(
            !nonzero(critic.hidden.weight.grad(&grads)),
            "the confusion loss must not move the critic"
        );
        // Its least value is ln 2, reached when the critic cannot tell: identical features.
        let same = Tensor::<2>::from_data(TensorData::new(vec![0.5f32; 8], [2, 4]), &device);
        let l = plan.loss(&critic, same, &[0, 1]).unwrap();
        assert!(l.confusion.into_scalar::<f32>() >= 2f32.ln() - 1e-6);
        // Cells of classes the critic does not see are skipped.
        let plan2 = SourcePlan::new(&[s[0].clone(), s[1].clone(), sample(CellClass::Blast, "a")]).unwrap();
        assert!(plan2.loss(&critic, f(), &[2, 2]).is_none());
    }
}
