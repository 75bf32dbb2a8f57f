//! The text decoder of Llama 3.2 Vision (`MllamaTextModel` of transformers'
//! `models/mllama/modeling_mllama.py`), module names as in the published checkpoints:
//! self-attention layers (`MllamaSelfAttentionDecoderLayer`: GQA, RoPE with Llama 3 scaling,
//! causal) and cross-attention layers (`MllamaCrossAttentionDecoderLayer`: q/k RMS norms, gates
//! applied as `residual + tanh(gate) · h`, rows that see no image zeroed after the MLP) as the
//! two variants of [`DecoderLayer`]; the rotary tables, the causal mask, the cross-attention
//! context and the generation cache ([`Cache`]).

use super::config::Rope;
use super::layers::{MASKED, attention, merge_heads, repeat_kv, split_heads, tanh_gate};
use super::lora::{LoraTargets, Proj};
use burn::module::{Content, Devices, Module, ModuleDisplay, ModuleDisplayDefault, ModuleMapper, ModuleVisitor, Param};
use burn::nn::{Embedding, RmsNorm};
use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor, TensorData};

/// Text self-attention with RoPE and GQA.
#[derive(Module, Debug)]
pub struct SelfAttention {
    pub(super) q_proj: Proj,
    pub(super) k_proj: Proj,
    pub(super) v_proj: Proj,
    pub(super) o_proj: Proj,
    pub(super) heads: usize,
    pub(super) kv_heads: usize,
}

/// Text cross-attention to the projected vision states.
#[derive(Module, Debug)]
pub struct CrossAttention {
    pub(super) q_proj: Proj,
    pub(super) k_proj: Proj,
    pub(super) v_proj: Proj,
    pub(super) o_proj: Proj,
    pub(super) q_norm: RmsNorm,
    pub(super) k_norm: RmsNorm,
    pub(super) heads: usize,
    pub(super) kv_heads: usize,
}

/// Text MLP (SiLU-gated).
#[derive(Module, Debug)]
pub struct TextMlp {
    pub(super) gate_proj: Proj,
    pub(super) up_proj: Proj,
    pub(super) down_proj: Proj,
}

impl TextMlp {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.down_proj
            .forward(silu(self.gate_proj.forward(x.clone())) * self.up_proj.forward(x))
    }
}

/// transformers' `MllamaSelfAttentionDecoderLayer`: `x + attn(norm(x))`, then `x + mlp(norm(x))`.
#[derive(Module, Debug)]
pub struct SelfAttentionLayer {
    pub(super) self_attn: SelfAttention,
    pub(super) mlp: TextMlp,
    pub(super) input_layernorm: RmsNorm,
    pub(super) post_attention_layernorm: RmsNorm,
}

/// transformers' `MllamaCrossAttentionDecoderLayer`: attention to the vision states and the MLP,
/// each added as `residual + tanh(gate) · h`; the MLP's output is zeroed on rows that see no
/// image.
#[derive(Module, Debug)]
pub struct CrossAttentionLayer {
    pub(super) cross_attn: CrossAttention,
    pub(super) mlp: TextMlp,
    pub(super) input_layernorm: RmsNorm,
    pub(super) post_attention_layernorm: RmsNorm,
    pub(super) cross_attn_attn_gate: Param<Tensor<1>>,
    pub(super) cross_attn_mlp_gate: Param<Tensor<1>>,
}

/// A decoder layer: self-attention, or gated cross-attention.
///
/// `Module` is implemented by hand below, not derived: burn's derive on an enum enters the variant
/// as a module (`visitor.enter_module("SelfAttention", "Enum:DecoderLayer")`), and
/// `SafetensorsStore`, whose `skip_enum_variants` is off by default, would then name an adapter
/// `language_model.layers.0.SelfAttention.self_attn.q_proj.lora.a` instead of
/// `language_model.layers.0.self_attn.q_proj.lora.a`: adapter files saved before would no longer
/// load (and `allow_partial` would let that pass in silence). The hand-written impl delegates to
/// the variant without entering it, so every parameter keeps the path it had when the layer was
/// one struct with optional parts (`layers.{i}.self_attn.…`, `layers.{i}.cross_attn.…`,
/// `layers.{i}.mlp.…`, `layers.{i}.input_layernorm.gamma`, `layers.{i}.cross_attn_attn_gate`,
/// …), which are also the checkpoint's names. Only the container types seen by visitors change
/// (`Struct:SelfAttentionLayer` / `Struct:CrossAttentionLayer` where it was
/// `Struct:DecoderLayer`); nothing here filters or adapts on them.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)] // a few dozen layers, held once in a `Vec`
pub enum DecoderLayer {
    /// A self-attention layer.
    SelfAttention(SelfAttentionLayer),
    /// A gated cross-attention layer.
    CrossAttention(CrossAttentionLayer),
}

impl Module for DecoderLayer {
    fn num_params(&self) -> usize {
        match self {
            Self::SelfAttention(l) => Module::num_params(l),
            Self::CrossAttention(l) => Module::num_params(l),
        }
    }

    fn visit<Visitor: ModuleVisitor>(&self, visitor: &mut Visitor) {
        match self {
            Self::SelfAttention(l) => Module::visit(l, visitor),
            Self::CrossAttention(l) => Module::visit(l, visitor),
        }
    }

    fn map<Mapper: ModuleMapper>(self, mapper: &mut Mapper) -> Self {
        match self {
            Self::SelfAttention(l) => Self::SelfAttention(Module::map(l, mapper)),
            Self::CrossAttention(l) => Self::CrossAttention(Module::map(l, mapper)),
        }
    }

    fn collect_devices(&self, devices: Devices) -> Devices {
        match self {
            Self::SelfAttention(l) => Module::collect_devices(l, devices),
            Self::CrossAttention(l) => Module::collect_devices(l, devices),
        }
    }

    fn to_device(self, device: &Device) -> Self {
        match self {
            Self::SelfAttention(l) => Self::SelfAttention(Module::to_device(l, device)),
            Self::CrossAttention(l) => Self::CrossAttention(Module::to_device(l, device)),
        }
    }

    fn fork(self, device: &Device) -> Self {
        match self {
            Self::SelfAttention(l) => Self::SelfAttention(Module::fork(l, device)),
            Self::CrossAttention(l) => Self::CrossAttention(Module::fork(l, device)),
        }
    }

    fn valid(&self) -> Self {
        match self {
            Self::SelfAttention(l) => Self::SelfAttention(Module::valid(l)),
            Self::CrossAttention(l) => Self::CrossAttention(Module::valid(l)),
        }
    }

    fn train(self) -> Self {
        match self {
            Self::SelfAttention(l) => Self::SelfAttention(Module::train(l)),
            Self::CrossAttention(l) => Self::CrossAttention(Module::train(l)),
        }
    }

    fn materialize(self) -> Self {
        match self {
            Self::SelfAttention(l) => Self::SelfAttention(Module::materialize(l)),
            Self::CrossAttention(l) => Self::CrossAttention(Module::materialize(l)),
        }
    }
}

impl ModuleDisplayDefault for DecoderLayer {
    fn content(&self, content: Content) -> Option<Content> {
        match self {
            Self::SelfAttention(l) => ModuleDisplayDefault::content(l, content),
            Self::CrossAttention(l) => ModuleDisplayDefault::content(l, content),
        }
    }

    fn num_params(&self) -> usize {
        Module::num_params(self)
    }
}

impl ModuleDisplay for DecoderLayer {}

/// Rotates pairs `(x1, x2)` → `(-x2, x1)` over the two halves of the last axis.
fn rotate_half(x: Tensor<4>) -> Tensor<4> {
    let [b, h, s, hd] = x.dims();
    let x1 = x.clone().slice([0..b, 0..h, 0..s, 0..hd / 2]);
    let x2 = x.slice([0..b, 0..h, 0..s, hd / 2..hd]);
    Tensor::cat(vec![x2.neg(), x1], 3)
}

fn apply_rope(x: Tensor<4>, cos: Tensor<4>, sin: Tensor<4>) -> Tensor<4> {
    let s = x.dims();
    x.clone() * cos.expand(s) + rotate_half(x) * sin.expand(s)
}

/// What the cross-attention layers see: the projected vision states and the masks.
#[derive(Clone, Debug)]
pub struct CrossContext {
    /// `[B, L, hidden]`.
    pub states: Tensor<3>,
    /// Additive mask `[B, 1, S, L]`.
    pub mask: Tensor<4>,
    /// `[B, S, 1]`: 0 for text rows that see no image.
    pub rows: Tensor<3>,
}

/// One layer's cached keys and values: for self-attention preallocated `[B, kv, max, hd]` and
/// filled as tokens come; for cross-attention the projected image keys and values, computed
/// once.
#[derive(Clone, Debug, Default)]
pub(super) struct LayerCache {
    kv: Option<(Tensor<4>, Tensor<4>)>,
}

/// The state of a generation: the layers' caches, how many positions are filled, and what the
/// next tokens may see of the images.
#[derive(Clone, Debug)]
pub struct Cache {
    pub(super) layers: Vec<LayerCache>,
    pub(super) len: usize,
    pub(super) max: usize,
    /// Cross-attention context of the next tokens (the prompt's last row, repeated, as
    /// transformers extends its mask while generating).
    pub(super) cross: Option<CrossContext>,
}

impl Cache {
    /// Positions filled.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl DecoderLayer {
    /// Whether this is a cross-attention layer (skipped when there are no images).
    pub(super) fn is_cross(&self) -> bool {
        matches!(self, Self::CrossAttention(_))
    }

    /// The layer over `x` (tokens at positions `start..`), with the cache when generating.
    pub(super) fn forward(
        &self,
        x: Tensor<3>,
        start: usize,
        rope: (&Tensor<4>, &Tensor<4>),
        causal: &Tensor<4>,
        cross: Option<&CrossContext>,
        cache: Option<(&mut LayerCache, usize)>,
    ) -> Tensor<3> {
        match self {
            Self::SelfAttention(l) => l.forward(x, start, rope, causal, cache),
            Self::CrossAttention(l) => {
                let c = cross.expect("cross-attention layers run only with vision states");
                l.forward(x, c, cache)
            }
        }
    }
}

impl SelfAttentionLayer {
    fn forward(
        &self,
        x: Tensor<3>,
        start: usize,
        rope: (&Tensor<4>, &Tensor<4>),
        causal: &Tensor<4>,
        cache: Option<(&mut LayerCache, usize)>,
    ) -> Tensor<3> {
        let h = self.input_layernorm.forward(x.clone());
        let a = &self.self_attn;
        let q = apply_rope(
            split_heads(a.q_proj.forward(h.clone()), a.heads),
            rope.0.clone(),
            rope.1.clone(),
        );
        let k = apply_rope(
            split_heads(a.k_proj.forward(h.clone()), a.kv_heads),
            rope.0.clone(),
            rope.1.clone(),
        );
        let v = split_heads(a.v_proj.forward(h), a.kv_heads);
        let (k, v) = match cache {
            Some((c, max)) => {
                let [b, kv, s, hd] = k.dims();
                let (ck, cv) = c.kv.take().unwrap_or_else(|| {
                    let device = k.device();
                    (
                        Tensor::zeros([b, kv, max, hd], &device),
                        Tensor::zeros([b, kv, max, hd], &device),
                    )
                });
                let at = [0..b, 0..kv, start..start + s, 0..hd];
                let (ck, cv) = (ck.slice_assign(at.clone(), k), cv.slice_assign(at, v));
                c.kv = Some((ck.clone(), cv.clone()));
                let upto = [0..b, 0..kv, 0..start + s, 0..hd];
                (ck.slice(upto.clone()), cv.slice(upto))
            }
            None => (k, v),
        };
        let n = a.heads / a.kv_heads;
        let o = a.o_proj.forward(merge_heads(attention(
            q,
            repeat_kv(k, n),
            repeat_kv(v, n),
            Some(causal.clone()),
        )));
        let x = x + o;
        x.clone() + self.mlp.forward(self.post_attention_layernorm.forward(x))
    }
}

impl CrossAttentionLayer {
    fn forward(&self, x: Tensor<3>, c: &CrossContext, cache: Option<(&mut LayerCache, usize)>) -> Tensor<3> {
        let h = self.input_layernorm.forward(x.clone());
        let a = &self.cross_attn;
        let q = a.q_norm.forward(split_heads(a.q_proj.forward(h), a.heads));
        let project = || {
            (
                a.k_norm
                    .forward(split_heads(a.k_proj.forward(c.states.clone()), a.kv_heads)),
                split_heads(a.v_proj.forward(c.states.clone()), a.kv_heads),
            )
        };
        let (k, v) = match cache {
            Some((lc, _)) => lc.kv.get_or_insert_with(project).clone(),
            None => project(),
        };
        let n = a.heads / a.kv_heads;
        let o = a.o_proj.forward(merge_heads(attention(
            q,
            repeat_kv(k, n),
            repeat_kv(v, n),
            Some(c.mask.clone()),
        )));
        let attn_gate = tanh_gate(&self.cross_attn_attn_gate);
        let x = x + attn_gate * o;
        let m = self.mlp.forward(self.post_attention_layernorm.forward(x.clone()));
        let m = m * c.rows.clone().expand(x.dims());
        let mlp_gate = tanh_gate(&self.cross_attn_mlp_gate);
        x + mlp_gate * m
    }
}

/// The text decoder.
#[derive(Module, Debug)]
pub struct TextModel {
    pub(super) embed_tokens: Embedding,
    pub(super) layers: Vec<DecoderLayer>,
    pub(super) norm: RmsNorm,
}

impl TextModel {
    /// The projections `targets` selects, layer by layer: the layer's attention (q, k, v, o),
    /// then its MLP (gate, up, down).
    pub(super) fn projections_mut(&mut self, targets: &LoraTargets) -> Vec<&mut Proj> {
        let mut out: Vec<&mut Proj> = Vec::new();
        for layer in &mut self.layers {
            let (attn, mlp) = match layer {
                DecoderLayer::SelfAttention(l) => {
                    let a = &mut l.self_attn;
                    let attn = [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj];
                    (targets.text_attention.then_some(attn), &mut l.mlp)
                }
                DecoderLayer::CrossAttention(l) => {
                    let a = &mut l.cross_attn;
                    let attn = [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj];
                    (targets.cross_attention.then_some(attn), &mut l.mlp)
                }
            };
            if let Some(attn) = attn {
                out.extend(attn);
            }
            if targets.text_mlp {
                out.extend([&mut mlp.gate_proj, &mut mlp.up_proj, &mut mlp.down_proj]);
            }
        }
        out
    }
}

/// The rotary inverse frequencies, as transformers computes them (f32), with Llama 3 scaling.
pub fn inv_freq(rope: &Rope, head_dim: usize) -> Vec<f32> {
    let base: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| 1.0 / (rope.theta as f32).powf(i as f32 / head_dim as f32))
        .collect();
    let Some(s) = rope.llama3 else {
        return base;
    };
    let old = s.original_max_position_embeddings as f32;
    let (factor, low, high) = (s.factor as f32, s.low_freq_factor as f32, s.high_freq_factor as f32);
    let low_wavelen = old / low;
    let high_wavelen = old / high;
    base.into_iter()
        .map(|f| {
            let wavelen = 2.0 * std::f32::consts::PI / f;
            let scaled = if wavelen > low_wavelen { f / factor } else { f };
            // transformers: `~(wavelen < high) & ~(wavelen > low)`.
            let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
            if medium {
                let smooth = (old / wavelen - low) / (high - low);
                (1.0 - smooth) * scaled / factor + smooth * scaled
            } else {
                scaled
            }
        })
        .collect()
}

/// The rotary tables `(cos, sin)`, each `[1, 1, len, head_dim]`, of positions `start..start + len`.
pub(super) fn rope_tables(inv_freq: &[f32], start: usize, len: usize, device: &Device) -> (Tensor<4>, Tensor<4>) {
    let half = inv_freq.len();
    let hd = half * 2;
    let mut cos = Vec::with_capacity(len * hd);
    let mut sin = Vec::with_capacity(len * hd);
    for pos in start..start + len {
        let freqs: Vec<f32> = inv_freq.iter().map(|f| pos as f32 * f).collect();
        for _ in 0..2 {
            cos.extend(freqs.iter().map(|f| f.cos()));
            sin.extend(freqs.iter().map(|f| f.sin()));
        }
    }
    let t = |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v, [len, hd]), device).reshape([1, 1, len, hd]);
    (t(cos), t(sin))
}

/// Additive mask `[1, 1, s, start + s]`: new token `i` (position `start + i`) sees positions up
/// to its own.
pub(super) fn causal_mask(start: usize, s: usize, device: &Device) -> Tensor<4> {
    let total = start + s;
    let v: Vec<f32> = (0..s * total)
        .map(|k| if k % total > start + k / total { MASKED } else { 0.0 })
        .collect();
    Tensor::<2>::from_data(TensorData::new(v, [s, total]), device).reshape([1, 1, s, total])
}
