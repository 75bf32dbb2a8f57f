//! `MllamaForConditionalGeneration` in burn, following transformers'
//! `models/mllama/modeling_mllama.py` operation for operation (module names as in the published
//! checkpoints): [`Mllama`] (the vision encoder, the multi-modal projector, the text decoder and
//! the LM head), its [`Inputs`], the forward pass with and without a cache, LoRA and the 4-bit
//! base. The parts live beside it: the vision encoder in `vision.rs`, the text decoder and its
//! cache in `text.rs`, LoRA in `lora.rs`, loading by name in `loading.rs`, the shared attention
//! helpers in `layers.rs`; everything is re-exported here under its former path.

use super::checkpoint::{Checkpoint, CheckpointError};
use super::config::MllamaConfig;
use super::frozen;
use super::layers::MASKED;
use super::text::{LayerCache, causal_mask, rope_tables};
use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::{Device, Int, Tensor};

pub use super::loading::{RandomInit, Source};
pub use super::lora::{LoraAdapter, LoraConfig, LoraTargets, Proj};
pub use super::text::{
    Cache, CrossAttention, CrossAttentionLayer, CrossContext, DecoderLayer, SelfAttention, SelfAttentionLayer, TextMlp,
    TextModel, inv_freq,
};
pub use super::vision::{
    AspectRatioEmbedding, GatedPositionEmbedding, VisionAttention, VisionLayer, VisionMlp, VisionModel,
};

/// Llama 3.2 Vision.
#[derive(Module, Debug)]
pub struct Mllama {
    /// The vision encoder.
    pub vision_model: VisionModel,
    pub(super) multi_modal_projector: Linear,
    pub(super) language_model: TextModel,
    pub(super) lm_head: Linear,
    #[module(skip)]
    pub(super) inv_freq: Vec<f32>,
    pub(super) patches_per_tile: usize,
}

/// The model's inputs for one forward pass.
pub struct Inputs {
    /// `[B, S]`.
    pub input_ids: Tensor<2, Int>,
    /// `[B, I, T, C, H, W]`, or none (text only).
    pub pixel_values: Option<Tensor<6>>,
    /// `[B, I]`.
    pub aspect_ratio_ids: Option<Tensor<2, Int>>,
    /// `[B, I, T]`, 1 for real tiles.
    pub aspect_ratio_mask: Option<Tensor<3>>,
    /// `[B, S, I, T]`, 1 where a token may see a tile.
    pub cross_attention_mask: Option<Tensor<4>>,
}

impl Inputs {
    /// The inputs of batch rows `rows` only.
    pub fn rows(&self, rows: std::ops::Range<usize>) -> Inputs {
        let [_, s] = self.input_ids.dims();
        Inputs {
            input_ids: self.input_ids.clone().slice([rows.clone(), 0..s]),
            pixel_values: self.pixel_values.as_ref().map(|p| {
                let [_, i, t, c, h, w] = p.dims();
                p.clone().slice([rows.clone(), 0..i, 0..t, 0..c, 0..h, 0..w])
            }),
            aspect_ratio_ids: self.aspect_ratio_ids.as_ref().map(|a| {
                let [_, i] = a.dims();
                a.clone().slice([rows.clone(), 0..i])
            }),
            aspect_ratio_mask: self.aspect_ratio_mask.as_ref().map(|a| {
                let [_, i, t] = a.dims();
                a.clone().slice([rows.clone(), 0..i, 0..t])
            }),
            cross_attention_mask: self.cross_attention_mask.as_ref().map(|m| {
                let [_, s, i, t] = m.dims();
                m.clone().slice([rows.clone(), 0..s, 0..i, 0..t])
            }),
        }
    }

    /// The first `n` tokens (and their rows of the cross-attention mask).
    pub fn prefix(&self, n: usize) -> Inputs {
        let [b, _] = self.input_ids.dims();
        Inputs {
            input_ids: self.input_ids.clone().slice([0..b, 0..n]),
            cross_attention_mask: self.cross_attention_mask.as_ref().map(|m| {
                let [_, _, i, t] = m.dims();
                m.clone().slice([0..b, 0..n, 0..i, 0..t])
            }),
            ..self.rows(0..b)
        }
    }
}

impl Mllama {
    /// Builds the model from a checkpoint; every tensor must be there with the shape the
    /// configuration implies, and no other.
    pub fn load(cfg: &MllamaConfig, ck: &Checkpoint, device: &Device) -> Result<Self, CheckpointError> {
        let model = Self::build(cfg, ck, device, None)?;
        ck.check_all_used()?;
        Ok(model)
    }

    /// Builds the model from a checkpoint with the base already in 4 bits, as
    /// [`load`](Self::load) followed by [`quantize_base`](Self::quantize_base)`(block)` would
    /// leave it, but streamed: each weight is read in pieces and quantized as it arrives, so no
    /// f32 copy of the model (nor of a whole weight) is ever held; the token embedding is kept
    /// in f16.
    pub fn load_quantized(
        cfg: &MllamaConfig,
        ck: &Checkpoint,
        device: &Device,
        block: u8,
    ) -> Result<Self, CheckpointError> {
        let model = Self::build(cfg, ck, device, Some(block))?;
        ck.check_all_used()?;
        Ok(model)
    }

    /// A randomly initialised model (seeded), for tests and benchmarks.
    pub fn random(cfg: &MllamaConfig, seed: u64, device: &Device) -> Self {
        Self::build(cfg, &RandomInit::new(seed), device, None).expect("random tensors have the asked shapes")
    }

    /// Every adaptable projection with whether `targets` selects it.
    fn projections_mut(&mut self, targets: &LoraTargets) -> Vec<&mut Proj> {
        Self::projections_of(&mut self.vision_model, &mut self.language_model, targets)
    }

    /// The projections `targets` selects: the vision encoder's, then the text decoder's, layer by
    /// layer (a fixed order: adapters are initialised and listed in it).
    fn projections_of<'a>(vm: &'a mut VisionModel, lm: &'a mut TextModel, targets: &LoraTargets) -> Vec<&'a mut Proj> {
        let mut out: Vec<&mut Proj> = Vec::new();
        if targets.vision {
            out.extend(vm.projections_mut());
        }
        out.extend(lm.projections_mut(targets));
        out
    }

    /// Freezes the whole model and adds fresh LoRA adapters (the only trainable parameters) to
    /// the targeted projections.
    pub fn with_lora(self, c: &LoraConfig, device: &Device) -> Self {
        use rand::SeedableRng;
        let mut m = self.no_grad();
        let targets = c.targets;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(c.seed);
        for p in m.projections_mut(&targets) {
            p.adapt(c.rank, c.alpha, c.dropout, &mut rng, device);
        }
        m
    }

    /// Holds the frozen base's linear weights (every projection, the multi-modal projector and
    /// the LM head) in 4 bits, one scale per `block` values, for QLoRA training; a weight
    /// whose output dimension does not divide into blocks stays in f32. Returns the model and
    /// how many weights were quantized, of how many.
    pub fn quantize_base(mut self, block: u8) -> (Self, usize, usize) {
        let (mut done, mut total) = (0, 0);
        for l in self.base_linears_mut() {
            total += 1;
            done += usize::from(frozen::quantize(l, block));
        }
        (self, done, total)
    }

    /// The frozen base back in f32 (the values its 4-bit form holds).
    pub fn dequantize_base(mut self) -> Self {
        for l in self.base_linears_mut() {
            frozen::dequantize(l);
        }
        self
    }

    /// Every linear layer of the base: the projections, the multi-modal projector, the LM head.
    fn base_linears_mut(&mut self) -> Vec<&mut Linear> {
        let all = LoraTargets::ALL;
        let Mllama {
            vision_model,
            multi_modal_projector,
            language_model,
            lm_head,
            ..
        } = self;
        let mut layers: Vec<&mut Linear> = vec![multi_modal_projector, lm_head];
        let projections = Self::projections_of(vision_model, language_model, &all);
        layers.extend(projections.into_iter().map(|p| &mut p.base));
        layers
    }

    /// Every adapter's `(A, B)`, in a fixed order (for reading their gradients).
    pub fn adapters(&self) -> Vec<(Tensor<2>, Tensor<2>)> {
        let mut m = self.clone();
        m.projections_mut(&LoraTargets::ALL)
            .into_iter()
            .filter_map(|p| p.lora.as_ref().map(|l| (l.a.val(), l.b.val())))
            .collect()
    }

    /// Every adapter's weight delta, by the projection's checkpoint name (`….q_proj`): a
    /// function of the name giving `(α/r)·(A·B)ᵀ` in the checkpoint's layout `[out, in]`, formed
    /// when asked for (one projection's delta at a time, never all of them).
    pub fn lora_deltas(&mut self) -> impl Fn(&str) -> Option<Vec<f32>> + use<> {
        let all = LoraTargets::ALL;
        let factors: std::collections::HashMap<String, (Tensor<2>, Tensor<2>, f64)> = self
            .projections_mut(&all)
            .into_iter()
            .filter_map(|p| {
                let l = p.lora.as_ref()?;
                Some((p.name.clone(), (l.a.val(), l.b.val(), l.scale)))
            })
            .collect();
        move |name| {
            let (a, b, scale) = factors.get(name)?;
            let delta = (a.clone().matmul(b.clone()) * *scale).transpose();
            Some(delta.into_data().try_to_vec::<f32>().expect("f32"))
        }
    }

    /// Builds the model from an exported bundle's weights (safetensors with 4-bit projections)
    /// with the base held in 4 bits on `device` (blocks of `block` output values) and the token
    /// embedding in f16: each tensor is unpacked alone and quantized for the device as it
    /// comes, so the model is never whole in f32.
    pub fn from_packed(
        cfg: &MllamaConfig,
        w: &crate::compact::weights::WeightsView<'_>,
        device: &Device,
        block: u8,
    ) -> Result<Self, CheckpointError> {
        Self::build(cfg, w, device, Some(block))
    }

    /// Folds every adapter into its base weight (f32).
    pub fn merge_lora(mut self) -> Self {
        let all = LoraTargets::ALL;
        for p in self.projections_mut(&all) {
            p.merge();
        }
        self
    }

    /// The projected vision states `[B, I·T·P, hidden]` of the images.
    pub fn cross_states(&self, pixels: Tensor<6>, ratio_ids: Tensor<2, Int>, ratio_mask: Tensor<3>) -> Tensor<3> {
        let [b, ..] = pixels.dims();
        let frozen_vision = !self.vision_model.projections().iter().any(|p| p.lora.is_some());
        let v = if pixels.device().is_autodiff() && frozen_vision {
            // Nothing in the encoder trains: it runs off the autodiff graph, on the inference
            // path (fused attention, no [S, S] mask: 2.6 GB a layer at 4 tiles of 560 px).
            let inner = self.vision_model.valid();
            Tensor::from_inner(inner.forward(pixels.inner(), ratio_ids.inner(), ratio_mask.inner()))
        } else {
            self.vision_model.forward(pixels, ratio_ids, ratio_mask)
        };
        let [_, i, t, p, od] = v.dims();
        frozen::linear(&self.multi_modal_projector, v.reshape([b, i * t * p, od]))
    }

    /// The cross-attention context from projected states and the `[B, S, I, T]` token/tile mask
    /// (transformers' `_prepare_cross_attention_mask`).
    pub fn cross_context(&self, states: Tensor<3>, token_tiles: Tensor<4>) -> CrossContext {
        let [b, s, i, t] = token_tiles.dims();
        let p = self.patches_per_tile;
        let m = token_tiles
            .reshape([b, s, i * t, 1])
            .expand([b, s, i * t, p])
            .reshape([b, s, i * t * p]);
        let rows = m.clone().max_dim(2);
        let mask = (m.neg() + 1.0) * MASKED * rows.clone().expand([b, s, i * t * p]);
        CrossContext {
            states,
            mask: mask.unsqueeze_dim(1),
            rows,
        }
    }

    /// Logits `[B, S, vocab]` for a whole sequence (no cache), positions from 0.
    pub fn forward(&self, inputs: Inputs) -> Tensor<3> {
        let (ids, cross, _) = self.prepare(inputs);
        self.decode(ids, 0, cross.as_ref(), None)
    }

    fn prepare(&self, inputs: Inputs) -> (Tensor<2, Int>, Option<CrossContext>, Option<Tensor<4>>) {
        match (inputs.pixel_values, inputs.aspect_ratio_ids, inputs.aspect_ratio_mask) {
            (Some(px), Some(ids), Some(mask)) => {
                let states = self.cross_states(px, ids, mask);
                let tiles = inputs
                    .cross_attention_mask
                    .expect("a cross-attention mask comes with the images");
                let [b, s, i, t] = tiles.dims();
                let last = tiles.clone().slice([0..b, s - 1..s, 0..i, 0..t]);
                (inputs.input_ids, Some(self.cross_context(states, tiles)), Some(last))
            }
            _ => (inputs.input_ids, None, None),
        }
    }

    /// Runs the prompt and returns its logits `[B, S, vocab]` and the cache for up to
    /// `max_len` positions (prompt and generated tokens).
    pub fn prefill(&self, inputs: Inputs, max_len: usize) -> (Tensor<3>, Cache) {
        let (ids, cross, last_tiles) = self.prepare(inputs);
        let [_, s] = ids.dims();
        assert!(
            s <= max_len,
            "the prompt ({s} tokens) is longer than the cache ({max_len})"
        );
        let mut cache = Cache {
            layers: vec![LayerCache::default(); self.language_model.layers.len()],
            len: 0,
            max: max_len,
            cross: None,
        };
        let logits = self.decode(ids, 0, cross.as_ref(), Some(&mut cache));
        cache.cross = match (cross, last_tiles) {
            (Some(c), Some(t)) => Some(self.cross_context(c.states, t)),
            _ => None,
        };
        (logits, cache)
    }

    /// One or more new tokens `[B, n]` after what the cache holds; their logits `[B, n, vocab]`.
    pub fn step(&self, ids: Tensor<2, Int>, cache: &mut Cache) -> Tensor<3> {
        let [_, n] = ids.dims();
        assert!(
            cache.len + n <= cache.max,
            "the cache is full ({} positions)",
            cache.max
        );
        let cross = cache.cross.clone();
        let start = cache.len;
        self.decode(ids, start, cross.as_ref(), Some(cache))
    }

    /// Runs the decoder over `ids` at positions `start..`, attending causally to them and to
    /// the cached positions before.
    fn decode(
        &self,
        ids: Tensor<2, Int>,
        start: usize,
        cross: Option<&CrossContext>,
        mut cache: Option<&mut Cache>,
    ) -> Tensor<3> {
        let [_, s] = ids.dims();
        let device = ids.device();
        let (cos, sin) = rope_tables(&self.inv_freq, start, s, &device);
        let causal = causal_mask(start, s, &device);
        let mut x = super::layers::f32_rows(self.language_model.embed_tokens.forward(ids));
        for (i, layer) in self.language_model.layers.iter().enumerate() {
            if layer.is_cross() && cross.is_none() {
                continue;
            }
            let lc = cache.as_deref_mut().map(|c| (&mut c.layers[i], c.max));
            x = layer.forward(x, start, (&cos, &sin), &causal, cross, lc);
        }
        if let Some(c) = cache {
            c.len = start + s;
        }
        frozen::linear(&self.lm_head, self.language_model.norm.forward(x))
    }

    /// Mean cross-entropy of predicting the tokens from position `answer_from` on (the
    /// assistant's answer) from those before them: the fine-tuning loss.
    pub fn answer_loss(&self, inputs: Inputs, answer_from: usize) -> Tensor<1> {
        let ids = inputs.input_ids.clone();
        let [b, s] = ids.dims();
        assert!(
            b == 1 && answer_from >= 1 && answer_from < s,
            "one sequence with an answer after the prompt"
        );
        let logits = self.forward(inputs);
        let [_, _, v] = logits.dims();
        let n = s - answer_from;
        let predicting = logits.slice([0..1, answer_from - 1..s - 1, 0..v]).reshape([n, v]);
        let targets = ids.slice([0..1, answer_from..s]).reshape([n, 1]);
        let logp = burn::tensor::activation::log_softmax(predicting, 1);
        logp.gather(1, targets).mean().neg()
    }
}
