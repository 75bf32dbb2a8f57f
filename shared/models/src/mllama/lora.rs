//! LoRA on the transformer's projections: [`Proj`] (a frozen linear layer with an optional
//! [`LoraAdapter`]), and the settings that choose where adapters go ([`LoraTargets`],
//! [`LoraConfig`]). The projections keep the names of the `nn.Linear` layers of transformers'
//! `models/mllama/modeling_mllama.py` (`q_proj`, `fc1`, `gate_proj`, ...); an adapter's
//! parameters sit under the projection as `….lora.a` and `….lora.b`, the names the saved adapter
//! files use. The adapter follows PEFT's `LoraLayer` (`(α/r)·B·A`, B zero at start).

use super::frozen;
use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{Device, Tensor, TensorData};

/// A LoRA adapter: `(α/r)·(x·A)·B`, A `[in, r]` random, B `[r, out]` zero at start, so an
/// adapted model starts exactly at its base. The dense weight is never formed while training.
#[derive(Module, Debug)]
pub struct LoraAdapter {
    /// `[in, r]`.
    pub a: Param<Tensor<2>>,
    /// `[r, out]`.
    pub b: Param<Tensor<2>>,
    /// `α / r`.
    pub scale: f64,
    /// Dropout on the adapter's input while training.
    pub dropout: f64,
}

/// A projection of the transformer: a frozen linear layer with an optional LoRA adapter.
#[derive(Module, Debug)]
pub struct Proj {
    /// The base layer (`[in, out]`).
    pub base: Linear,
    /// The adapter, if any.
    pub lora: Option<LoraAdapter>,
    /// Its name in the checkpoint (`….q_proj`).
    #[module(skip)]
    pub name: String,
}

impl Proj {
    pub(super) fn new(base: Linear, name: &str) -> Self {
        Proj {
            base,
            lora: None,
            name: name.to_string(),
        }
    }

    /// `x·W (+ bias) + (α/r)·(x·A)·B`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match &self.lora {
            None => frozen::linear(&self.base, x),
            Some(l) => {
                let mut xa = x.clone();
                if l.dropout > 0.0 && l.a.val().is_require_grad() {
                    let keep = 1.0 - l.dropout;
                    let mask =
                        Tensor::<D>::random(xa.dims(), burn::tensor::Distribution::Bernoulli(keep), &xa.device());
                    xa = xa * mask / keep;
                }
                let delta = xa.matmul(l.a.val().unsqueeze()).matmul(l.b.val().unsqueeze()) * l.scale;
                frozen::linear(&self.base, x) + delta
            }
        }
    }

    pub(super) fn adapt(
        &mut self,
        rank: usize,
        alpha: f64,
        dropout: f64,
        rng: &mut rand_chacha::ChaCha8Rng,
        device: &Device,
    ) {
        use rand::Rng;
        let [d_in, d_out] = self.base.weight.dims();
        let std = (1.0 / d_in as f64).sqrt() as f32;
        // A ~ N(0, 1/in), from the seeded generator: runs are reproducible.
        let a: Vec<f32> = (0..d_in * rank)
            .map(|_| {
                let (u1, u2): (f32, f32) = (rng.r#gen::<f32>().max(1e-12), rng.r#gen());
                std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
            })
            .collect();
        self.lora = Some(LoraAdapter {
            a: Param::from_tensor(Tensor::from_data(TensorData::new(a, [d_in, rank]), device)),
            b: Param::from_tensor(Tensor::zeros([rank, d_out], device)),
            scale: alpha / rank as f64,
            dropout,
        });
    }

    /// Folds the adapter into the base weight (in f32) and drops it.
    pub(super) fn merge(&mut self) {
        if let Some(l) = self.lora.take() {
            let delta = l.a.val().matmul(l.b.val()) * l.scale;
            let w = self.base.weight.val() + delta;
            self.base.weight = Param::from_tensor(w);
        }
    }
}

/// Which projections get LoRA adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoraTargets {
    /// q, k, v, o of the text self-attention layers.
    pub text_attention: bool,
    /// gate, up, down of every text MLP.
    pub text_mlp: bool,
    /// q, k, v, o of the cross-attention layers.
    pub cross_attention: bool,
    /// Attention and MLP of the vision encoder.
    pub vision: bool,
}

impl LoraTargets {
    /// Every projection.
    pub const ALL: Self = LoraTargets {
        text_attention: true,
        text_mlp: true,
        cross_attention: true,
        vision: true,
    };
}

impl Default for LoraTargets {
    /// The text model's attention and MLP, as in the reference study's QLoRA.
    fn default() -> Self {
        LoraTargets {
            text_attention: true,
            text_mlp: true,
            cross_attention: false,
            vision: false,
        }
    }
}

/// LoRA settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    /// Rank.
    pub rank: usize,
    /// Alpha (the adapter is scaled by alpha / rank).
    pub alpha: f64,
    /// Dropout on the adapters' input while training.
    pub dropout: f64,
    /// Where adapters go.
    pub targets: LoraTargets,
    /// Seed of the adapters' initialisation.
    #[serde(default)]
    pub seed: u64,
}
