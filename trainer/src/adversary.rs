//! Source-adversarial training (a class-conditional domain-adversarial critic).
//!
//! Every blast of the training data comes from one scanner, so a network can learn "looks like
//! that scanner" as a blast cue, one that fails at another hospital. A critic reads the pooled
//! features of the cells of classes that several sources share (here the neutrophils, found in
//! both `pbc` and `munich`) and guesses their source; the gradient it sends back into the
//! adapters is reversed, so training makes a neutrophil from one scanner indistinguishable from
//! one from another in the features the class head reads. Conditioning on shared classes
//! matters: asking the same of all cells would ask the network to forget that blasts differ
//! from neutrophils (every blast is from one source).

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::{log_softmax, relu};
use burn::tensor::{Device, Int, Tensor, TensorData};
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

    /// Source logits of `features`, with the gradient into `features` multiplied by `-lambda`.
    pub fn forward(&self, features: Tensor<2>, lambda: f64) -> Tensor<2> {
        self.out
            .forward(relu(self.hidden.forward(reverse_gradient(features, lambda))))
    }
}

/// The identity forward; backward multiplies the gradient by `-lambda`.
pub fn reverse_gradient<const D: usize>(x: Tensor<D>, lambda: f64) -> Tensor<D> {
    x.clone().mul_scalar(-lambda) + x.mul_scalar(1.0 + lambda).detach()
}

/// The strength of the reversal at training progress `p` (0..=1): it rises smoothly from 0 to
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
            .map(|&c| wbc_shared::classes::CellClass::ALL[c].name().to_string())
            .collect();
        Some(SourcePlan {
            sources,
            target,
            weights,
            classes,
        })
    }

    /// The critic's weighted cross-entropy over the rows of `features` (a batch of the samples
    /// `idx`) whose class is shared, and how many of them it guessed right; `None` when the
    /// batch has none.
    pub fn loss(
        &self,
        critic: &SourceCritic,
        features: Tensor<2>,
        idx: &[usize],
        lambda: f64,
    ) -> Option<(Tensor<1>, usize, usize)> {
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
        let logits = critic.forward(features.select(0, pick), lambda);
        let guessed: Vec<i64> = logits
            .clone()
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .try_into_vec::<i64>()
            .expect("argmax");
        let right = guessed.iter().zip(&truth).filter(|(a, b)| a == b).count();
        let logp = log_softmax(logits, 1).gather(1, t.reshape([k, 1])).reshape([k]);
        let loss = (logp * w.clone()).sum().neg() / w.sum();
        Some((loss, right, k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wbc_shared::classes::CellClass;

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
    fn the_reversal_is_the_identity_forward_and_flips_the_gradient() {
        let device = Device::flex().autodiff();
        let x = Tensor::<1>::from_data(TensorData::new(vec![1.0f32, -2.0, 3.0], [3]), &device).require_grad();
        let y = reverse_gradient(x.clone(), 0.5);
        assert_eq!(
            y.clone().into_data().try_into_vec::<f32>().unwrap(),
            vec![1.0, -2.0, 3.0]
        );
        let g = (y * Tensor::from_data(TensorData::new(vec![1.0f32, 2.0, 3.0], [3]), &device)).sum();
        let grads = g.backward();
        let gx = x.grad(&grads).unwrap().into_data().try_into_vec::<f32>().unwrap();
        assert_eq!(gx, vec![-0.5, -1.0, -1.5]);
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
    fn the_features_receive_the_critics_gradient_reversed() {
        // Features that carry the source in one coordinate: the gradient that reaches them is
        // the critic's own (a finite difference of its loss) negated, so training moves them to
        // make the critic's guess harder.
        let device = Device::flex().autodiff();
        let s = vec![sample(CellClass::Neutrophil, "a"), sample(CellClass::Neutrophil, "b")];
        let plan = SourcePlan::new(&s).unwrap();
        let critic = SourceCritic::new(4, 2, &device);
        let f = Tensor::<2>::from_data(
            TensorData::new(vec![1.0f32, 0., 0., 0., -1., 0., 0., 0.], [2, 4]),
            &device,
        )
        .require_grad();
        let (loss, _, n) = plan.loss(&critic, f.clone(), &[0, 1], 1.0).unwrap();
        assert_eq!(n, 2);
        let grads = loss.backward();
        let toward = f.grad(&grads).unwrap();
        let (plain, _, _) = plan.loss(&critic, f.clone(), &[0, 1], 0.0).unwrap();
        let grads = plain.backward();
        let critic_side = f.grad(&grads).unwrap();
        // lambda 0 stops the gradient; lambda 1 sends the negated one (checked against the
        // un-reversed critic by a finite difference on the first feature).
        assert!(
            critic_side
                .into_data()
                .try_into_vec::<f32>()
                .unwrap()
                .iter()
                .all(|g| *g == 0.0)
        );
        let g = toward.into_data().try_into_vec::<f32>().unwrap();
        let eps = 1e-3f32;
        let at = |d: f32| {
            let mut v = vec![1.0f32, 0., 0., 0., -1., 0., 0., 0.];
            v[0] += d;
            let x = Tensor::<2>::from_data(TensorData::new(v, [2, 4]), &device);
            plan.loss(&critic, x, &[0, 1], 0.0).unwrap().0.into_scalar::<f32>()
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
        assert!(
            (g[0] + numeric).abs() < 1e-2 * numeric.abs().max(1e-3),
            "{} vs {}",
            g[0],
            -numeric
        );
    }
}
