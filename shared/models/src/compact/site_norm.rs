//! Adaptation of the whole backbone to a site: AdaBN (Li et al., "Revisiting Batch
//! Normalization for Practical Domain Adaptation", 2016) through every unit.
//!
//! BatchNorm is folded into each convolution (`mobilenet.rs`), so a unit's output before its
//! ReLU6 is where BatchNorm normalised. A site's stain, camera and optics move those outputs'
//! per-channel statistics from the first convolution on, and every later unit then reads inputs
//! it never saw in training. This measures, unit by unit in network order, each channel's mean
//! and spread over the site's cells (the units before it already adapted) and maps them onto the
//! training cells' (`y' = t + s·y`, folded into a copy of the unit's weights and bias). The
//! signed weights never change.
//!
//! The training side is a mixture of per-class statistics (the bundle's `unit-moments` part,
//! measured on the familiarity bank's training cells), weighted by the site's class mix: a
//! normal slide matched to a reference that is one-sixth blasts would be pulled towards blasts.

use super::mobilenet::Backbone;
use super::weights::{NamedTensor, Storage, WeightError, Weights};
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};
use wbc_protocol::classes::NUM_CLASSES;

/// Bundle part: the training cells' per-class, per-unit channel moments.
pub const UNIT_MOMENTS_PART: &str = "unit-moments.safetensors";

/// A unit's channel spread is scaled by at most this factor (and at least its inverse).
const MAX_SCALE: f64 = 4.0;
/// Added to variances before their ratio is taken.
const EPS: f64 = 1e-4;

/// Per-channel mean and mean square of one unit's output (before its ReLU6), averaged over
/// cells (each cell's spatial average).
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    /// Per-channel mean.
    pub mean: Vec<f64>,
    /// Per-channel mean of squares.
    pub square: Vec<f64>,
    /// Cells measured.
    pub cells: usize,
}

impl Moments {
    fn new(channels: usize) -> Moments {
        Moments {
            mean: vec![0.0; channels],
            square: vec![0.0; channels],
            cells: 0,
        }
    }

    /// Adds a batch of unit outputs `[b, c, h, w]`.
    fn add(&mut self, y: Tensor<4>) {
        let [b, c, _, _] = y.dims();
        let m = y.clone().mean_dim(3).mean_dim(2).sum_dim(0).reshape([c]);
        let q = (y.clone() * y).mean_dim(3).mean_dim(2).sum_dim(0).reshape([c]);
        let (m, q) = (super::to_vec(m.into_data()), super::to_vec(q.into_data()));
        let n = (self.cells + b) as f64;
        let old = self.cells as f64 / n;
        for j in 0..c {
            self.mean[j] = self.mean[j] * old + m[j] as f64 / n;
            self.square[j] = self.square[j] * old + q[j] as f64 / n;
        }
        self.cells += b;
    }

    fn var(&self, j: usize) -> f64 {
        (self.square[j] - self.mean[j] * self.mean[j]).max(0.0)
    }
}

/// The training cells' moments of every unit, per class (`None` for a class with no cells).
#[derive(Debug, Clone, PartialEq)]
pub struct UnitReference {
    classes: Vec<Option<Vec<Moments>>>,
}

/// Why unit moments could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    /// The part's tensors are not readable.
    #[error("{UNIT_MOMENTS_PART}: {0}")]
    Weights(#[from] WeightError),
    /// The part does not describe this backbone.
    #[error("{UNIT_MOMENTS_PART}: {0}")]
    Shape(String),
}

impl UnitReference {
    /// From per-class moments (class order; `None` where a class had no cells).
    pub fn new(classes: Vec<Option<Vec<Moments>>>) -> UnitReference {
        UnitReference { classes }
    }

    /// The moments of a mixture of the classes weighted by `mix`: per unit, each channel's
    /// mean and variance.
    pub fn mixture(&self, mix: &[f64; NUM_CLASSES]) -> Vec<(Vec<f64>, Vec<f64>)> {
        let present: Vec<(usize, &Vec<Moments>)> = self
            .classes
            .iter()
            .enumerate()
            .filter_map(|(c, m)| m.as_ref().map(|m| (c, m)))
            .collect();
        let total: f64 = present.iter().map(|(c, _)| mix[*c]).sum::<f64>().max(1e-12);
        let units = present.first().map_or(0, |(_, m)| m.len());
        (0..units)
            .map(|u| {
                let ch = present[0].1[u].mean.len();
                let mut mean = vec![0f64; ch];
                let mut square = vec![0f64; ch];
                for (c, m) in &present {
                    let w = mix[*c] / total;
                    for j in 0..ch {
                        mean[j] += w * m[u].mean[j];
                        square[j] += w * m[u].square[j];
                    }
                }
                let var = square.iter().zip(&mean).map(|(q, m)| (q - m * m).max(0.0)).collect();
                (mean, var)
            })
            .collect()
    }

    /// As stored in a bundle (f32 tensors `class{c}.unit{u}.mean` / `.square`, `class{c}.cells`).
    pub fn to_safetensors(&self) -> Result<Vec<u8>, WeightError> {
        let mut w = Weights::default();
        let t = |values: Vec<f32>| NamedTensor {
            shape: vec![values.len()],
            values,
        };
        for (c, units) in self.classes.iter().enumerate() {
            let Some(units) = units else { continue };
            w.insert(
                format!("class{c}.cells"),
                t(vec![units.first().map_or(0, |m| m.cells) as f32]),
            );
            for (u, m) in units.iter().enumerate() {
                w.insert(
                    format!("class{c}.unit{u}.mean"),
                    t(m.mean.iter().map(|&v| v as f32).collect()),
                );
                w.insert(
                    format!("class{c}.unit{u}.square"),
                    t(m.square.iter().map(|&v| v as f32).collect()),
                );
            }
        }
        w.to_safetensors_by(0, |_, _| Storage::F32)
    }

    /// Reads the bundle part, checking it against the backbone's units.
    pub fn from_safetensors(bytes: &[u8], backbone: &Backbone) -> Result<UnitReference, ReferenceError> {
        let w = Weights::from_safetensors(bytes)?;
        let widths: Vec<usize> = backbone.units().map(|u| u.c_out).collect();
        let mut classes = vec![None; NUM_CLASSES];
        for (c, slot) in classes.iter_mut().enumerate() {
            let name = format!("class{c}.cells");
            if !w.0.contains_key(&name) {
                continue;
            }
            let cells = w.get_shaped(&name, &[1])?;
            let cells = cells.values[0];
            if !(cells.is_finite() && cells >= 1.0) {
                return Err(ReferenceError::Shape(format!("class {c} has {cells} cells")));
            }
            let mut units = Vec::with_capacity(widths.len());
            for (u, &ch) in widths.iter().enumerate() {
                let get = |k: &str| -> Result<Vec<f64>, ReferenceError> {
                    let t = w.get_shaped(&format!("class{c}.unit{u}.{k}"), &[ch])?;
                    if t.values.iter().any(|v| !v.is_finite()) {
                        return Err(ReferenceError::Shape(format!("class {c} unit {u}: {k} is not finite")));
                    }
                    Ok(t.values.iter().map(|&v| v as f64).collect())
                };
                units.push(Moments {
                    mean: get("mean")?,
                    square: get("square")?,
                    cells: cells as usize,
                });
            }
            *slot = Some(units);
        }
        if classes.iter().all(Option::is_none) {
            return Err(ReferenceError::Shape("no class has moments".into()));
        }
        Ok(UnitReference { classes })
    }
}

/// A site's adaptation of the backbone's first `blocks` blocks: per unit, in order, each
/// channel's scale and shift; and how the site's cell images are read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteNorm {
    /// The cell normalisation's dark-nucleus rule is on at the site (the norm was fitted on
    /// views made with it).
    #[serde(default)]
    pub dark_nucleus: bool,
    /// Blocks adapted (from the first).
    pub blocks: usize,
    /// Per unit, per channel scale.
    pub scale: Vec<Vec<f32>>,
    /// Per unit, per channel shift.
    pub shift: Vec<Vec<f32>>,
}

impl SiteNorm {
    /// Checks that the norm fits `backbone` (unit count and widths), that its shifts are finite
    /// and its scales within what a fit can give (¼–4).
    pub fn fits(&self, backbone: &Backbone) -> bool {
        let widths: Vec<usize> = backbone.units_of(self.blocks).map(|u| u.c_out).collect();
        let range = (1.0 / MAX_SCALE) as f32 * 0.999..=MAX_SCALE as f32 * 1.001;
        let unit_fits = |((s, t), &w): ((&Vec<f32>, &Vec<f32>), &usize)| {
            s.len() == w && t.len() == w && s.iter().all(|v| range.contains(v)) && t.iter().all(|v| v.is_finite())
        };
        self.blocks <= backbone.num_blocks()
            && self.scale.len() == widths.len()
            && self.shift.len() == widths.len()
            && self.scale.iter().zip(&self.shift).zip(&widths).all(unit_fits)
    }
}

impl Backbone {
    /// Each unit's output moments over `runs` (batches of model inputs), unadapted: the
    /// training side of a site adaptation.
    pub fn unit_moments(&self, runs: impl IntoIterator<Item = Tensor<4>>) -> Vec<Moments> {
        let mut out: Vec<Moments> = self.units().map(|u| Moments::new(u.c_out)).collect();
        for mut x in runs {
            let mut k = 0;
            for (units, residual) in &self.blocks {
                let input = x.clone();
                for u in units {
                    let y = u.pre_activation(x);
                    out[k].add(y.clone());
                    k += 1;
                    x = if u.spec.relu6 { super::relu6::relu6(y) } else { y };
                }
                if *residual {
                    x = x + input;
                }
            }
        }
        out
    }

    /// Fits the first `blocks` blocks to a site's cells (`runs`: batches of model inputs),
    /// mapping each unit's moments onto `reference` (per unit: channel means and variances, as
    /// [`UnitReference::mixture`] gives).
    pub fn fit_site_norm(&self, runs: Vec<Tensor<4>>, reference: &[(Vec<f64>, Vec<f64>)], blocks: usize) -> SiteNorm {
        let blocks = blocks.min(self.num_blocks());
        let mut adapted = self.clone();
        let mut xs = runs;
        let mut norm = SiteNorm {
            dark_nucleus: false,
            blocks,
            scale: Vec::new(),
            shift: Vec::new(),
        };
        let mut k = 0;
        for b in 0..blocks {
            for j in 0..adapted.blocks[b].0.len() {
                let units = &adapted.blocks[b].0;
                let mut m = Moments::new(units[j].spec.c_out);
                for x in &xs {
                    let y = units[..j].iter().fold(x.clone(), |y, u| u.forward(y, None));
                    m.add(units[j].pre_activation(y));
                }
                let (ref_mean, ref_var) = &reference[k];
                let (scale, shift): (Vec<f32>, Vec<f32>) = (0..m.mean.len())
                    .map(|c| {
                        let s = ((ref_var[c] + EPS) / (m.var(c) + EPS))
                            .sqrt()
                            .clamp(1.0 / MAX_SCALE, MAX_SCALE);
                        (s as f32, (ref_mean[c] - s * m.mean[c]) as f32)
                    })
                    .unzip();
                fold(&mut adapted.blocks[b].0[j], &scale, &shift);
                norm.scale.push(scale);
                norm.shift.push(shift);
                k += 1;
            }
            xs = xs
                .into_iter()
                .map(|x| adapted.forward_blocks(x, b, b + 1, None))
                .collect();
        }
        norm
    }

    /// A copy of the backbone with a site's norm folded into its first units.
    pub fn with_site_norm(&self, norm: &SiteNorm) -> Backbone {
        let mut adapted = self.clone();
        let units = adapted.blocks.iter_mut().flat_map(|(u, _)| u.iter_mut());
        for ((u, s), t) in units.zip(&norm.scale).zip(&norm.shift) {
            fold(u, s, t);
        }
        adapted
    }

    /// Every unit's description, in order.
    pub fn units(&self) -> impl Iterator<Item = &super::mobilenet::UnitSpec> {
        self.units_of(self.num_blocks())
    }

    /// The units of the first `blocks` blocks, in order.
    pub fn units_of(&self, blocks: usize) -> impl Iterator<Item = &super::mobilenet::UnitSpec> {
        self.blocks
            .iter()
            .take(blocks)
            .flat_map(|(u, _)| u.iter().map(|c| &c.spec))
    }
}

/// `y' = shift + scale·y` folded into a unit's weight and bias.
fn fold(unit: &mut super::mobilenet::FrozenConv, scale: &[f32], shift: &[f32]) {
    let device = unit.weight.device();
    let c = scale.len();
    let s = Tensor::<1>::from_data(TensorData::new(scale.to_vec(), [c]), &device);
    let t = Tensor::<1>::from_data(TensorData::new(shift.to_vec(), [c]), &device);
    unit.weight = unit.weight.clone() * s.clone().reshape([c, 1, 1, 1]);
    unit.bias = unit.bias.clone() * s + t;
}
