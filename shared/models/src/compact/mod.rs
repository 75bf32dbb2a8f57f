//! The `compact` model family: an ImageNet-pretrained MobileNetV2 frozen in 4 bits, LoRA
//! adapters on the pointwise convolutions of its last blocks, and trainable heads for the six
//! classes and the 11 WBCAtt attributes. Its description is rendered from the predicted
//! attributes ([`crate::describe::describe`]).

pub mod depthwise;
pub mod lora;
pub mod mobilenet;
pub mod pointwise;
pub mod relu6;
mod simd;
pub mod site_norm;
pub mod weights;

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig};
use burn::tensor::{Device, Tensor, TensorData};
use lora::LoraPw;
use mobilenet::{Backbone, FEATURES, pool};
use serde::{Deserialize, Serialize};
use wbc_protocol::attributes::{ATTRIBUTES, AttributeSet, NUM_ATTRIBUTES};
use wbc_protocol::bundle::{Bundle, BundleError, Family};
use wbc_protocol::classes::NUM_CLASSES;
use weights::{NamedTensor, WeightError, Weights};

/// Name of the weights part inside a bundle.
pub const WEIGHTS_PART: &str = "weights.safetensors";

/// Configuration of a compact model, stored in the bundle manifest's `model_config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompactConfig {
    /// Backbone architecture (only `mobilenet_v2`).
    pub backbone: String,
    /// First backbone block whose pointwise convolutions carry LoRA adapters (0..=18).
    pub tune_from: usize,
    /// LoRA rank.
    pub lora_rank: usize,
    /// LoRA alpha (the adapter is scaled by alpha / rank).
    pub lora_alpha: f64,
    /// Group size of the 4-bit weight format.
    pub q4_group: usize,
    /// Dropout before the heads during training.
    pub dropout: f64,
    /// Classes (label ids) that had attribute labels in training. The attribute heads never saw
    /// the others (in this project's data: blasts), so their descriptions fall back to the
    /// class phrasing instead of quoting untrained heads.
    #[serde(default = "all_classes")]
    pub attribute_classes: Vec<usize>,
}

fn all_classes() -> Vec<usize> {
    (0..NUM_CLASSES).collect()
}

impl Default for CompactConfig {
    fn default() -> Self {
        CompactConfig {
            backbone: "mobilenet_v2".into(),
            tune_from: 10,
            lora_rank: 16,
            lora_alpha: 32.0,
            q4_group: 32,
            dropout: 0.2,
            attribute_classes: all_classes(),
        }
    }
}

/// Width of the concatenated attribute logits.
pub fn attribute_logits_width() -> usize {
    ATTRIBUTES.iter().map(|a| a.arity()).sum()
}

/// Trainable heads.
#[derive(Module, Debug)]
pub struct Heads {
    /// Class head `1280 -> 6`.
    pub class: Linear,
    /// All attribute heads side by side `1280 -> 31`.
    pub attrs: Linear,
}

/// Everything that trains: LoRA adapters and heads.
#[derive(Module, Debug)]
pub struct Trainable {
    /// One adapter per pointwise convolution of blocks `tune_from..`, in order.
    pub adapters: Vec<LoraPw>,
    /// Heads.
    pub heads: Heads,
    /// Dropout before the heads.
    pub dropout: Dropout,
}

impl Trainable {
    /// Fresh adapters for `backbone` and fresh heads.
    pub fn new(cfg: &CompactConfig, backbone: &Backbone, device: &Device) -> Self {
        let adapters = backbone
            .pointwise_from(cfg.tune_from)
            .iter()
            .map(|u| LoraPw::new(u.c_in, u.c_out, cfg.lora_rank, cfg.lora_alpha, device))
            .collect();
        Trainable {
            adapters,
            heads: Heads {
                class: LinearConfig::new(FEATURES, NUM_CLASSES).init(device),
                attrs: LinearConfig::new(FEATURES, attribute_logits_width()).init(device),
            },
            dropout: DropoutConfig::new(cfg.dropout).init(),
        }
    }

    /// Class and attribute logits from the activation entering block `tune_from`.
    pub fn forward(&self, backbone: &Backbone, x: Tensor<4>, tune_from: usize) -> (Tensor<2>, Tensor<2>) {
        self.heads_of(self.features(backbone, x, tune_from))
    }

    /// The pooled features `[batch, 1280]` that the heads read, from the activation entering
    /// block `tune_from`.
    pub fn features(&self, backbone: &Backbone, x: Tensor<4>, tune_from: usize) -> Tensor<2> {
        pool(backbone.forward_blocks(x, tune_from, backbone.num_blocks(), Some((&self.adapters, tune_from))))
    }

    /// Class and attribute logits of pooled features (dropout first, when training).
    pub fn heads_of(&self, features: Tensor<2>) -> (Tensor<2>, Tensor<2>) {
        let f = self.dropout.forward(features);
        (self.heads.class.forward(f.clone()), self.heads.attrs.forward(f))
    }

    /// Merges the adapters into the folded backbone weights and adds the heads:
    /// the full set of weights of an exported model.
    pub fn merged_weights(
        &self,
        base: &Weights,
        backbone: &Backbone,
        tune_from: usize,
    ) -> Result<Weights, WeightError> {
        let mut out = Weights::default();
        for (name, t) in &base.0 {
            if !name.starts_with("classifier.") {
                out.insert(name.clone(), t.clone());
            }
        }
        for (spec, adapter) in backbone.pointwise_from(tune_from).iter().zip(&self.adapters) {
            let name = format!("{}.weight", spec.conv);
            let w = out.0.get_mut(&name).ok_or_else(|| WeightError::Missing(name.clone()))?;
            let delta = to_vec(adapter.delta().into_data());
            w.values.iter_mut().zip(delta).for_each(|(v, d)| *v += d);
        }
        let lin = |l: &Linear, prefix: &str, out: &mut Weights| {
            let w = l.weight.val();
            out.insert(
                format!("{prefix}.weight"),
                NamedTensor {
                    shape: w.dims().to_vec(),
                    values: to_vec(w.into_data()),
                },
            );
            if let Some(b) = &l.bias {
                let b = b.val();
                out.insert(
                    format!("{prefix}.bias"),
                    NamedTensor {
                        shape: b.dims().to_vec(),
                        values: to_vec(b.into_data()),
                    },
                );
            }
        };
        lin(&self.heads.class, "head.class", &mut out);
        lin(&self.heads.attrs, "head.attrs", &mut out);
        Ok(out)
    }
}

fn to_vec(d: TensorData) -> Vec<f32> {
    d.try_into_vec_as::<f32>().expect("f32 tensor data")
}

pub use crate::prediction::{AttributeScores, CellSize, Prediction};

/// Errors loading a compact model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The bundle is not usable.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The weights are not usable.
    #[error(transparent)]
    Weights(#[from] WeightError),
    /// The bundle holds another family or an unknown config.
    #[error("bundle is not a usable compact model: {0}")]
    Config(String),
}

/// A compact model ready for inference.
#[derive(Debug, Clone)]
pub struct CompactModel {
    /// Configuration.
    pub config: CompactConfig,
    backbone: Backbone,
    class_w: Tensor<2>,
    class_b: Tensor<1>,
    attr_w: Tensor<2>,
    attr_b: Tensor<1>,
    device: Device,
    guard: Option<Box<GuardTail>>,
}

/// A site bundle's blast guard on the device: the signed model's blocks from the first one
/// the site changed, and its class head. The blocks before `fork` are the same in both, so
/// they run once.
#[derive(Debug, Clone)]
struct GuardTail {
    backbone: Backbone,
    fork: usize,
    class_w: Tensor<2>,
    class_b: Tensor<1>,
}

/// The first backbone block whose weights differ between `a` and `b` (the number of blocks
/// when none does).
fn first_changed_block(a: &Weights, b: &Weights) -> usize {
    mobilenet::mobilenet_v2_spec()
        .iter()
        .position(|block| {
            block.units.iter().any(|u| {
                ["weight", "bias"]
                    .iter()
                    .any(|k| a.0.get(&format!("{}.{k}", u.conv)) != b.0.get(&format!("{}.{k}", u.conv)))
            })
        })
        .unwrap_or(mobilenet::mobilenet_v2_spec().len())
}

impl CompactModel {
    /// Builds the model from full weights (backbone + heads).
    pub fn from_weights(config: CompactConfig, w: &Weights, device: &Device) -> Result<Self, ModelError> {
        let t2 = |name: &str, shape: [usize; 2]| -> Result<Tensor<2>, WeightError> {
            let t = w.get_shaped(name, &shape)?;
            Ok(Tensor::from_data(TensorData::new(t.values.clone(), shape), device))
        };
        let t1 = |name: &str, n: usize| -> Result<Tensor<1>, WeightError> {
            let t = w.get_shaped(name, &[n])?;
            Ok(Tensor::from_data(TensorData::new(t.values.clone(), [n]), device))
        };
        let aw = attribute_logits_width();
        Ok(CompactModel {
            backbone: Backbone::new(w, device)?,
            class_w: t2("head.class.weight", [FEATURES, NUM_CLASSES])?,
            class_b: t1("head.class.bias", NUM_CLASSES)?,
            attr_w: t2("head.attrs.weight", [FEATURES, aw])?,
            attr_b: t1("head.attrs.bias", aw)?,
            config,
            device: device.clone(),
            guard: None,
        })
    }

    /// The model with a blast guard: `signed` are the weights of the model this one was taught
    /// from, and `own` this model's (to find the first block the site changed).
    pub fn with_guard(mut self, own: &Weights, signed: &Weights) -> Result<Self, ModelError> {
        let head = |name: &str, shape: &[usize]| -> Result<Vec<f32>, WeightError> {
            Ok(signed.get_shaped(name, shape)?.values.clone())
        };
        let class_w = head("head.class.weight", &[FEATURES, NUM_CLASSES])?;
        let class_b = head("head.class.bias", &[NUM_CLASSES])?;
        self.guard = Some(Box::new(GuardTail {
            backbone: Backbone::new(signed, &self.device)?,
            fork: first_changed_block(own, signed),
            class_w: Tensor::from_data(TensorData::new(class_w, [FEATURES, NUM_CLASSES]), &self.device),
            class_b: Tensor::from_data(TensorData::new(class_b, [NUM_CLASSES]), &self.device),
        }));
        Ok(self)
    }

    /// The backbone.
    pub fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    /// A copy whose backbone carries a site's norm (the signed weights stay as they are).
    pub fn with_site_norm(&self, norm: &site_norm::SiteNorm) -> CompactModel {
        let mut m = self.clone();
        m.backbone = self.backbone.with_site_norm(norm);
        m
    }

    /// Whether the model carries a blast guard.
    pub fn has_guard(&self) -> bool {
        self.guard.is_some()
    }

    /// Loads the model from a verified bundle.
    pub fn from_bundle(bundle: &Bundle, device: &Device) -> Result<Self, ModelError> {
        if bundle.manifest.family != Family::Compact {
            return Err(ModelError::Config(format!("family is {:?}", bundle.manifest.family)));
        }
        let config: CompactConfig = serde_json::from_value(bundle.manifest.model_config.clone())
            .map_err(|e| ModelError::Config(e.to_string()))?;
        let w = Weights::from_safetensors(bundle.part(WEIGHTS_PART)?)?;
        let model = Self::from_weights(config, &w, device)?;
        if !bundle.manifest.parts.contains_key(crate::calibrate::GUARD_PART) {
            return Ok(model);
        }
        let signed = Weights::from_safetensors(bundle.part(crate::calibrate::GUARD_PART)?)?;
        model.with_guard(&w, &signed)
    }

    /// Device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Predicts a batch given as preprocessed CHW floats, `n` images of `side`².
    ///
    /// On the CPU the batch runs [`CPU_CELLS_PER_RUN`] cells at a time; a GPU takes it whole.
    pub fn predict(&self, data: Vec<f32>, n: usize, side: usize) -> Vec<Prediction> {
        self.predict_guarded(data, None, n, side)
    }

    /// As [`CompactModel::predict`], with the blast guard (if the model has one) seeing
    /// `guard_views` instead of `data` where given (the same layout): the signed model's own
    /// preprocessing, where a site changed it. Without them the guard shares the first blocks.
    pub fn predict_guarded(
        &self,
        data: Vec<f32>,
        guard_views: Option<Vec<f32>>,
        n: usize,
        side: usize,
    ) -> Vec<Prediction> {
        let cell = 3 * side * side;
        assert_eq!(data.len(), n * cell, "{n} images of 3×{side}×{side} floats");
        if let Some(g) = &guard_views {
            assert_eq!(g.len(), data.len(), "the guard's views are laid out as the model's");
        }
        let per_run = if self.device == Device::flex() {
            CPU_CELLS_PER_RUN
        } else {
            n
        };
        if n <= per_run {
            return self.predict_run(data, guard_views, n, side);
        }
        let mut guard_runs = guard_views.as_ref().map(|g| g.chunks(per_run * cell));
        data.chunks(per_run * cell)
            .flat_map(|run| {
                let guard = guard_runs.as_mut().and_then(|g| g.next()).map(<[f32]>::to_vec);
                self.predict_run(run.to_vec(), guard, run.len() / cell, side)
            })
            .collect()
    }

    /// One forward pass over `n` images.
    fn predict_run(&self, data: Vec<f32>, guard_views: Option<Vec<f32>>, n: usize, side: usize) -> Vec<Prediction> {
        let x = Tensor::<4>::from_data(TensorData::new(data, [n, 3, side, side]), &self.device);
        let Some(g) = &self.guard else {
            return self.predict_features(to_vec(self.backbone.features(x).into_data()), n);
        };
        let blocks = self.backbone.num_blocks();
        let (own, signed) = match guard_views {
            None => {
                let trunk = self.backbone.forward_blocks(x, 0, g.fork, None);
                let own = self.backbone.forward_blocks(trunk.clone(), g.fork, blocks, None);
                (own, g.backbone.forward_blocks(trunk, g.fork, blocks, None))
            }
            Some(v) => {
                let y = Tensor::<4>::from_data(TensorData::new(v, [n, 3, side, side]), &self.device);
                (
                    self.backbone.forward_blocks(x, 0, blocks, None),
                    g.backbone.forward_blocks(y, 0, blocks, None),
                )
            }
        };
        let (own, signed) = (pool(own), pool(signed));
        let guard = to_vec((signed.matmul(g.class_w.clone()) + g.class_b.clone().unsqueeze()).into_data());
        let mut preds = self.predict_features(to_vec(own.into_data()), n);
        for (p, l) in preds.iter_mut().zip(guard.chunks_exact(NUM_CLASSES)) {
            let mut logits = [0f32; NUM_CLASSES];
            logits.copy_from_slice(l);
            p.guard_logits = Some(logits);
        }
        preds
    }

    /// Predictions from pooled features (`n × FEATURES`, row-major): the heads alone, for
    /// features that were changed after the backbone (a site adaptation).
    pub fn predict_features(&self, features: Vec<f32>, n: usize) -> Vec<Prediction> {
        assert_eq!(features.len(), n * FEATURES, "{n} rows of {FEATURES} features");
        let f = Tensor::<2>::from_data(TensorData::new(features.clone(), [n, FEATURES]), &self.device);
        let logits = f.clone().matmul(self.class_w.clone()) + self.class_b.clone().unsqueeze();
        let attrs = f.matmul(self.attr_w.clone()) + self.attr_b.clone().unsqueeze();
        let logits = to_vec(logits.into_data());
        let attr_logits = to_vec(attrs.into_data());
        let aw = attribute_logits_width();
        (0..n)
            .map(|i| {
                let mut l = [0f32; NUM_CLASSES];
                l.copy_from_slice(&logits[i * NUM_CLASSES..(i + 1) * NUM_CLASSES]);
                let (attributes, attribute_confidence) = decode_attributes(&attr_logits[i * aw..(i + 1) * aw]);
                Prediction {
                    probs: softmax_t(&l, 1.0),
                    logits: l,
                    features: features[i * FEATURES..(i + 1) * FEATURES].to_vec(),
                    unadapted_features: None,
                    ood_score: None,
                    cell_found: None,
                    cell_size: None,
                    cell_cut: None,
                    neighbour_class: None,
                    attributes: Some(AttributeScores {
                        values: attributes,
                        confidence: attribute_confidence,
                    }),
                    description: None,
                    guard_logits: None,
                }
            })
            .collect()
    }
}

/// Cells per forward pass on the CPU. A larger batch is slower per cell there, not faster:
/// MobileNetV2's widest activation is 4.8 MB per 224-px cell (96 × 112 × 112 floats), and past
/// about 32 MiB glibc's allocator returns every such buffer to the kernel when it is freed and
/// takes it back, page-faulted and zeroed, for the next layer. Measured with the default bundle
/// before the batch was split (`WBC_BENCH_BATCHES=1,2,4,8,16,32 cargo bench -p appliance
/// --bench peers -- compact`, whole batches in one forward pass, two cores): 14.5, 10.1, 10.7,
/// 11.9, 21.2 and 22.8 ms per cell.
pub const CPU_CELLS_PER_RUN: usize = 4;

/// Softmax of logits divided by a temperature.
pub fn softmax_t(logits: &[f32; NUM_CLASSES], temperature: f32) -> [f32; NUM_CLASSES] {
    let t = temperature.max(1e-3);
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = logits.iter().map(|&v| ((v - max) / t).exp()).collect();
    let sum: f32 = e.iter().sum();
    std::array::from_fn(|i| e[i] / sum)
}

/// Splits concatenated attribute logits into per-attribute argmax values and their softmax
/// probability.
pub fn decode_attributes(logits: &[f32]) -> (AttributeSet, [f32; NUM_ATTRIBUTES]) {
    let mut set = [None; NUM_ATTRIBUTES];
    let mut conf = [0f32; NUM_ATTRIBUTES];
    let mut off = 0;
    for (i, a) in ATTRIBUTES.iter().enumerate() {
        let l = &logits[off..off + a.arity()];
        let max = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = l.iter().map(|v| (v - max).exp()).sum();
        let (best, _) = l
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .expect("arity > 0");
        set[i] = Some(best as u8);
        conf[i] = 1.0 / sum; // exp(max - max) / sum
        off += a.arity();
    }
    (AttributeSet(set), conf)
}
