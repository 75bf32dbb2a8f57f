//! MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
//! CVPR 2018) as a frozen backbone, following torchvision's `models/mobilenetv2.py`
//! (torchvision 0.2x): module paths `features.{i}...` are torchvision's, so the ImageNet
//! checkpoint loads without a renaming table.
//!
//! BatchNorm is folded into the preceding convolution at load time (`w·γ/√(σ²+ε)`,
//! `β − μ·γ/√(σ²+ε)`), which is exact for a frozen backbone in inference mode; every unit is then
//! `conv(+bias)` followed by ReLU6 or nothing.

use super::lora::LoraPw;
use super::weights::{NamedTensor, WeightError, Weights};
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Tensor, TensorData};

/// BatchNorm epsilon used by torchvision's MobileNetV2.
const BN_EPS: f32 = 1e-5;

/// One convolution of the backbone (BatchNorm folded in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitSpec {
    /// torchvision path of the convolution, e.g. `features.2.conv.0.0`.
    pub conv: String,
    /// torchvision path of its BatchNorm.
    pub bn: String,
    /// Input channels.
    pub c_in: usize,
    /// Output channels.
    pub c_out: usize,
    /// Kernel size (1 or 3).
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Groups (`c_in` for depthwise).
    pub groups: usize,
    /// Followed by ReLU6.
    pub relu6: bool,
}

impl UnitSpec {
    /// A pointwise (1×1, ungrouped) convolution: these get LoRA adapters.
    pub fn is_pointwise(&self) -> bool {
        self.kernel == 1 && self.groups == 1
    }

    /// A depthwise 3×3 convolution (one filter per channel).
    pub fn is_depthwise(&self) -> bool {
        self.kernel == 3 && self.groups == self.c_in && self.c_in == self.c_out
    }
}

/// One block of `features`: the stem, an inverted residual, or the last 1×1 convolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockSpec {
    /// Units in order.
    pub units: Vec<UnitSpec>,
    /// Adds the block's input to its output.
    pub residual: bool,
}

/// The torchvision MobileNetV2 (width 1.0) topology: 19 blocks, `features.0` to `features.18`.
pub fn mobilenet_v2_spec() -> Vec<BlockSpec> {
    let unit = |conv: String, bn: String, c_in, c_out, kernel, stride, groups, relu6| UnitSpec {
        conv,
        bn,
        c_in,
        c_out,
        kernel,
        stride,
        groups,
        relu6,
    };
    let mut blocks = vec![BlockSpec {
        units: vec![unit("features.0.0".into(), "features.0.1".into(), 3, 32, 3, 2, 1, true)],
        residual: false,
    }];
    // (expansion t, output channels c, repeats n, first stride s), as in the paper's Table 2.
    let settings = [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ];
    let mut c_in = 32;
    for (t, c, n, s) in settings {
        for r in 0..n {
            let i = blocks.len();
            let stride = if r == 0 { s } else { 1 };
            let hidden = c_in * t;
            let p = |s: &str| format!("features.{i}.conv.{s}");
            let mut units = Vec::new();
            if t == 1 {
                units.push(unit(p("0.0"), p("0.1"), c_in, c_in, 3, stride, c_in, true));
                units.push(unit(p("1"), p("2"), c_in, c, 1, 1, 1, false));
            } else {
                units.push(unit(p("0.0"), p("0.1"), c_in, hidden, 1, 1, 1, true));
                units.push(unit(p("1.0"), p("1.1"), hidden, hidden, 3, stride, hidden, true));
                units.push(unit(p("2"), p("3"), hidden, c, 1, 1, 1, false));
            }
            blocks.push(BlockSpec {
                units,
                residual: stride == 1 && c_in == c,
            });
            c_in = c;
        }
    }
    blocks.push(BlockSpec {
        units: vec![unit(
            "features.18.0".into(),
            "features.18.1".into(),
            320,
            1280,
            1,
            1,
            1,
            true,
        )],
        residual: false,
    });
    blocks
}

/// Number of output features of the backbone.
pub const FEATURES: usize = 1280;

/// Reads torchvision's MobileNetV2 checkpoint and folds BatchNorm into each convolution.
///
/// Returns `{conv}.weight` and `{conv}.bias` for every unit, plus `classifier.1.weight` /
/// `classifier.1.bias` (the ImageNet head, used for parity checks) when present.
pub fn fold_torchvision(pth: &std::path::Path) -> Result<Weights, WeightError> {
    let reader = burn::store::pytorch_reader::PytorchReader::new(pth)
        .map_err(|e| WeightError::Format(format!("{}: {e}", pth.display())))?;
    let get = |name: &str| -> Result<NamedTensor, WeightError> {
        let t = reader.get(name).ok_or_else(|| WeightError::Missing(name.to_string()))?;
        let bytes = t.read().map_err(|e| WeightError::Format(format!("{name}: {e}")))?;
        let values: Vec<f32> = match t.dtype() {
            burn::store::pytorch_reader::DType::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            other => return Err(WeightError::Format(format!("{name}: expected f32, found {other:?}"))),
        };
        Ok(NamedTensor {
            shape: t.shape().to_vec(),
            values,
        })
    };
    let mut out = Weights::default();
    for block in mobilenet_v2_spec() {
        for u in block.units {
            let w = get(&format!("{}.weight", u.conv))?;
            let expect = [u.c_out, u.c_in / u.groups, u.kernel, u.kernel];
            if w.shape != expect {
                return Err(WeightError::Shape {
                    name: format!("{}.weight", u.conv),
                    expected: expect.to_vec(),
                    found: w.shape,
                });
            }
            let gamma = get(&format!("{}.weight", u.bn))?.values;
            let beta = get(&format!("{}.bias", u.bn))?.values;
            let mean = get(&format!("{}.running_mean", u.bn))?.values;
            let var = get(&format!("{}.running_var", u.bn))?.values;
            let per_out = w.values.len() / u.c_out;
            let mut wf = w.values;
            let mut bias = vec![0f32; u.c_out];
            for o in 0..u.c_out {
                let k = gamma[o] / (var[o] + BN_EPS).sqrt();
                wf[o * per_out..(o + 1) * per_out].iter_mut().for_each(|v| *v *= k);
                bias[o] = beta[o] - mean[o] * k;
            }
            out.insert(
                format!("{}.weight", u.conv),
                NamedTensor {
                    shape: expect.to_vec(),
                    values: wf,
                },
            );
            out.insert(
                format!("{}.bias", u.conv),
                NamedTensor {
                    shape: vec![u.c_out],
                    values: bias,
                },
            );
        }
    }
    for name in ["classifier.1.weight", "classifier.1.bias"] {
        if reader.get(name).is_some() {
            out.insert(name.to_string(), get(name)?);
        }
    }
    Ok(out)
}

/// A frozen convolution with its folded bias, on a device.
#[derive(Debug, Clone)]
pub struct FrozenConv {
    /// Static description.
    pub spec: UnitSpec,
    pub(super) weight: Tensor<4>,
    pub(super) bias: Tensor<1>,
}

impl FrozenConv {
    /// The convolution and its bias, before any ReLU6 (where a site adaptation measures).
    pub(super) fn pre_activation(&self, x: Tensor<4>) -> Tensor<4> {
        let s = &self.spec;
        if s.is_depthwise() {
            return super::depthwise::depthwise3x3(x, self.weight.clone(), self.bias.clone(), s.stride, false);
        }
        self.dense(x, None, false)
    }

    /// A dense unit (pointwise, or the stem) with `residual` added and ReLU6 where asked: one
    /// pass on the CPU ([`super::pointwise`]), burn's operations elsewhere.
    fn dense(&self, x: Tensor<4>, residual: Option<Tensor<4>>, relu6: bool) -> Tensor<4> {
        let s = &self.spec;
        if s.groups == 1 && (s.kernel == 1 || s.kernel == 3) {
            return super::pointwise::dense_conv(x, self.weight.clone(), self.bias.clone(), residual, s.stride, relu6);
        }
        let opts = ConvOptions::new([s.stride; 2], [s.kernel / 2; 2], [1, 1], s.groups);
        let y = conv2d(x, self.weight.clone(), Some(self.bias.clone()), opts);
        let y = plus(y, residual);
        if relu6 { super::relu6::relu6(y) } else { y }
    }

    pub(super) fn forward(&self, x: Tensor<4>, lora: Option<&LoraPw>) -> Tensor<4> {
        self.forward_add(x, lora, None)
    }

    /// The unit, with `residual` (the block's input) added before any ReLU6.
    fn forward_add(&self, x: Tensor<4>, lora: Option<&LoraPw>, residual: Option<Tensor<4>>) -> Tensor<4> {
        let s = &self.spec;
        if s.is_depthwise() {
            debug_assert!(lora.is_none(), "adapters go on pointwise units only");
            // One pass over the output on the CPU.
            let y = super::depthwise::depthwise3x3(x, self.weight.clone(), self.bias.clone(), s.stride, s.relu6);
            debug_assert!(
                residual.is_none(),
                "MobileNetV2 ends its residual blocks with a pointwise unit"
            );
            return plus(y, residual);
        }
        match lora {
            Some(l) => {
                let y = self.pre_activation(x.clone()) + l.forward(x);
                let y = plus(y, residual);
                if s.relu6 { super::relu6::relu6(y) } else { y }
            }
            None => self.dense(x, residual, s.relu6),
        }
    }
}

/// `y + r` where there is an `r`.
fn plus(y: Tensor<4>, r: Option<Tensor<4>>) -> Tensor<4> {
    match r {
        Some(r) => y + r,
        None => y,
    }
}

/// The frozen backbone on a device: plain tensors, no parameters, no gradients.
#[derive(Debug, Clone)]
pub struct Backbone {
    pub(super) blocks: Vec<(Vec<FrozenConv>, bool)>,
}

impl Backbone {
    /// Builds the backbone from folded f32 weights.
    pub fn new(weights: &Weights, device: &Device) -> Result<Self, WeightError> {
        let mut blocks = Vec::new();
        for b in mobilenet_v2_spec() {
            let mut units = Vec::new();
            for u in b.units {
                let w = weights.get_shaped(
                    &format!("{}.weight", u.conv),
                    &[u.c_out, u.c_in / u.groups, u.kernel, u.kernel],
                )?;
                let bias = weights.get_shaped(&format!("{}.bias", u.conv), &[u.c_out])?;
                units.push(FrozenConv {
                    weight: Tensor::from_data(TensorData::new(w.values.clone(), w.shape.clone()), device),
                    bias: Tensor::from_data(TensorData::new(bias.values.clone(), bias.shape.clone()), device),
                    spec: u,
                });
            }
            blocks.push((units, b.residual));
        }
        Ok(Backbone { blocks })
    }

    /// Number of blocks (19).
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The pointwise units of blocks `from..`, in order: the places that take LoRA adapters.
    pub fn pointwise_from(&self, from: usize) -> Vec<&UnitSpec> {
        self.blocks[from.min(self.blocks.len())..]
            .iter()
            .flat_map(|(u, _)| u.iter().map(|c| &c.spec))
            .filter(|s| s.is_pointwise())
            .collect()
    }

    /// Runs blocks `from..to` on `x`; adapters (if given) apply, in order, to the pointwise
    /// units of blocks `adapters_from..`.
    pub fn forward_blocks(
        &self,
        mut x: Tensor<4>,
        from: usize,
        to: usize,
        adapters: Option<(&[LoraPw], usize)>,
    ) -> Tensor<4> {
        // Index of the next adapter: count pointwise units between adapters_from and `from`.
        let mut next = adapters.map(|(_, start)| {
            self.blocks[start.min(from)..from]
                .iter()
                .flat_map(|(u, _)| u)
                .filter(|c| c.spec.is_pointwise())
                .count()
        });
        for (i, (units, residual)) in self.blocks.iter().enumerate().take(to).skip(from) {
            // The block's input, added by its last unit (in the same pass on the CPU).
            let mut input = residual.then(|| x.clone());
            let last = units.len().saturating_sub(1);
            for (j, u) in units.iter().enumerate() {
                let lora = match (adapters, next.as_mut()) {
                    (Some((ads, start)), Some(n)) if i >= start && u.spec.is_pointwise() => {
                        let a = ads.get(*n);
                        *n += 1;
                        a
                    }
                    _ => None,
                };
                x = u.forward_add(x, lora, if j == last { input.take() } else { None });
            }
        }
        x
    }

    /// Full forward to globally average-pooled features `[batch, 1280]`.
    pub fn features(&self, x: Tensor<4>) -> Tensor<2> {
        pool(self.forward_blocks(x, 0, self.blocks.len(), None))
    }
}

/// Global average pooling `[b, c, h, w] -> [b, c]`.
pub fn pool(x: Tensor<4>) -> Tensor<2> {
    let [b, c, _, _] = x.dims();
    x.mean_dim(3).mean_dim(2).reshape([b, c])
}
