//! `MllamaForConditionalGeneration` in burn, following transformers' `modeling_mllama.py`
//! operation for operation (module names as in the published checkpoints).
//!
//! Vision: patch embedding (a convolution with stride = kernel, computed as a matmul over
//! flattened patches), gated pre-tile aspect-ratio embedding, class token, gated positional
//! embedding with tile embedding, patches padded to a multiple of 8 with the aspect-ratio
//! attention mask, the local transformer (whose listed intermediate layers are kept), the
//! post-tile embedding and the gated global transformer; output `[B, images, tiles, patches,
//! hidden × (1 + intermediate layers)]`. Text: self-attention layers (GQA, RoPE with Llama 3
//! scaling, causal) and cross-attention layers (q/k RMS norms, tanh gates, rows that see no
//! image zeroed after the MLP), RMS norm, LM head.

use super::checkpoint::{Checkpoint, CheckpointError};
use super::config::{MllamaConfig, Rope};
use super::frozen;
use burn::module::{Module, Param};
use burn::nn::{Embedding, LayerNorm, LayerNormConfig, Linear, RmsNorm};
use burn::tensor::activation::{gelu, silu, softmax};
use burn::tensor::{Device, Int, Tensor, TensorData};

/// The additive mask value transformers uses (`torch.finfo(float32).min`).
const MASKED: f32 = f32::MIN;

/// Scaled dot-product attention with an additive mask (broadcast over heads).
fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, mask: Option<Tensor<4>>) -> Tensor<4> {
    let hd = q.dims()[3];
    let scores = q.matmul(k.swap_dims(2, 3)) * (hd as f64).powf(-0.5);
    let scores = match mask {
        Some(m) => {
            let s = scores.dims();
            scores + m.expand(s)
        }
        None => scores,
    };
    softmax(scores, 3).matmul(v)
}

/// Repeats key/value heads for grouped-query attention.
fn repeat_kv(x: Tensor<4>, n: usize) -> Tensor<4> {
    if n == 1 {
        return x;
    }
    let [b, kv, s, hd] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kv, n, s, hd])
        .reshape([b, kv * n, s, hd])
}

/// `[b, s, heads·hd]` → `[b, heads, s, hd]`.
fn split_heads(x: Tensor<3>, heads: usize) -> Tensor<4> {
    let [b, s, d] = x.dims();
    x.reshape([b, s, heads, d / heads]).swap_dims(1, 2)
}

/// `[b, heads, s, hd]` → `[b, s, heads·hd]`.
fn merge_heads(x: Tensor<4>) -> Tensor<3> {
    let [b, h, s, hd] = x.dims();
    x.swap_dims(1, 2).reshape([b, s, h * hd])
}

fn tanh_gate(g: &Param<Tensor<1>>) -> Tensor<3> {
    g.val().tanh().reshape([1, 1, 1])
}

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
    fn new(base: Linear, name: &str) -> Self {
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

    fn adapt(&mut self, rank: usize, alpha: f64, dropout: f64, rng: &mut rand_chacha::ChaCha8Rng, device: &Device) {
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
    fn merge(&mut self) {
        if let Some(l) = self.lora.take() {
            let delta = l.a.val().matmul(l.b.val()) * l.scale;
            let w = self.base.weight.val() + delta;
            self.base.weight = Param::from_tensor(w);
        }
    }
}

/// Vision self-attention (no bias, all heads).
#[derive(Module, Debug)]
pub struct VisionAttention {
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
    heads: usize,
}

impl VisionAttention {
    fn forward(&self, x: Tensor<3>, mask: &VisionMask) -> Tensor<3> {
        let q = split_heads(self.q_proj.forward(x.clone()), self.heads);
        let k = split_heads(self.k_proj.forward(x.clone()), self.heads);
        let v = split_heads(self.v_proj.forward(x), self.heads);
        let context = match mask {
            // The same attention as transformers' mask, computed by the backend's fused kernel in
            // two unmasked parts per image: the positions that count attend to every position;
            // padding positions attend to the positions that count (the mask hides only padding
            // from padding).
            VisionMask::Split(split) => {
                let [_, h, s, hd] = q.dims();
                let parts = split
                    .iter()
                    .enumerate()
                    .map(|(i, (counted, padding, undo))| {
                        let one = |t: &Tensor<4>| t.clone().slice([i..i + 1, 0..h, 0..s, 0..hd]);
                        let (q, k, v) = (one(&q), one(&k), one(&v));
                        let (kc, vc) = (
                            k.clone().select(2, counted.clone()),
                            v.clone().select(2, counted.clone()),
                        );
                        let fused = |q: Tensor<4>, k: Tensor<4>, v: Tensor<4>| {
                            burn::tensor::module::attention(q, k, v, None, None, Default::default())
                        };
                        let a = fused(q.clone().select(2, counted.clone()), k, v);
                        let b = fused(q.select(2, padding.clone()), kc, vc);
                        Tensor::cat(vec![a, b], 2).select(2, undo.clone())
                    })
                    .collect();
                Tensor::cat(parts, 0)
            }
            VisionMask::Additive(additive) => attention(q, k, v, Some((**additive).clone())),
        };
        self.o_proj.forward(merge_heads(context))
    }
}

/// The vision encoder's attention mask: for inference, each image's positions that count, its
/// padding positions and the order that puts `[counted; padding]` back in place (fused attention,
/// no mask tensor); while training, or when transformers' mask is not of that form, its additive
/// `[bi, 1, S, S]` form.
enum VisionMask {
    Split(Vec<ImagePositions>),
    Additive(Box<Tensor<4>>),
}

/// One image's positions that count, its padding positions, and the order undoing
/// `[counted; padding]`.
type ImagePositions = (Tensor<1, Int>, Tensor<1, Int>, Tensor<1, Int>);

/// Vision MLP (GELU).
#[derive(Module, Debug)]
pub struct VisionMlp {
    fc1: Proj,
    fc2: Proj,
}

/// One vision encoder layer; the global ones are gated.
#[derive(Module, Debug)]
pub struct VisionLayer {
    self_attn: VisionAttention,
    mlp: VisionMlp,
    input_layernorm: LayerNorm,
    post_attention_layernorm: LayerNorm,
    gate_attn: Option<Param<Tensor<1>>>,
    gate_ffn: Option<Param<Tensor<1>>>,
}

impl VisionLayer {
    fn forward(&self, x: Tensor<3>, mask: &VisionMask) -> Tensor<3> {
        let mut a = self.self_attn.forward(self.input_layernorm.forward(x.clone()), mask);
        if let Some(g) = &self.gate_attn {
            a = a * tanh_gate(g);
        }
        let x = x + a;
        let mut m = self.mlp.fc2.forward(gelu(
            self.mlp.fc1.forward(self.post_attention_layernorm.forward(x.clone())),
        ));
        if let Some(g) = &self.gate_ffn {
            m = m * tanh_gate(g);
        }
        x + m
    }
}

/// Aspect-ratio (tile) embedding added to every patch of a tile, gated.
#[derive(Module, Debug)]
pub struct AspectRatioEmbedding {
    embedding: Embedding,
    gate: Param<Tensor<1>>,
}

/// Positional embedding, gated against the tile positional embedding.
#[derive(Module, Debug)]
pub struct GatedPositionEmbedding {
    embedding: Param<Tensor<2>>,
    gate: Param<Tensor<1>>,
    tile_embedding: Embedding,
}

/// The vision encoder.
#[derive(Module, Debug)]
pub struct VisionModel {
    /// `[channels·patch·patch, hidden]`.
    patch_embedding: Param<Tensor<2>>,
    class_embedding: Param<Tensor<1>>,
    gated_positional_embedding: GatedPositionEmbedding,
    pre_tile_positional_embedding: AspectRatioEmbedding,
    post_tile_positional_embedding: AspectRatioEmbedding,
    layernorm_pre: LayerNorm,
    layernorm_post: LayerNorm,
    transformer: Vec<VisionLayer>,
    global_transformer: Vec<VisionLayer>,
    patch_size: usize,
    intermediate_layers: Vec<usize>,
}

impl VisionModel {
    /// `pixel_values [B, I, T, C, H, W]`, `aspect_ratio_ids [B, I]`, `aspect_ratio_mask
    /// [B, I, T]` (1 for real tiles) → `[B, I, T, patches, vision_output_dim]`.
    pub fn forward(&self, pixels: Tensor<6>, ratio_ids: Tensor<2, Int>, ratio_mask: Tensor<3>) -> Tensor<5> {
        let [b, imgs, tiles, c, h, w] = pixels.dims();
        let ps = self.patch_size;
        let (gh, gw) = (h / ps, w / ps);
        let bi = b * imgs;
        let d = self.class_embedding.dims()[0];
        let ids = ratio_ids.reshape([bi, 1]);
        // Patches: a stride = kernel convolution is a matmul over flattened patches.
        let x = pixels
            .reshape([bi * tiles, c, gh, ps, gw, ps])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([bi * tiles, gh * gw, c * ps * ps])
            .matmul(self.patch_embedding.val().unsqueeze::<3>());
        let np = gh * gw;
        let x = x.reshape([bi, tiles, np, d]);
        let x = x + self.tile_embed(&self.pre_tile_positional_embedding, ids.clone(), tiles, d);
        let cls = self.class_embedding.val().reshape([1, 1, d]).expand([bi * tiles, 1, d]);
        let x = Tensor::cat(vec![cls, x.reshape([bi * tiles, np, d])], 1);
        let p = np + 1;
        let x = x.reshape([bi, tiles, p, d]);
        // Gated positional embedding.
        let gp = &self.gated_positional_embedding;
        let g = gp.gate.val().tanh().reshape([1, 1, 1, 1]);
        let x = x
            + (g.clone().neg() + 1.0) * gp.embedding.val().reshape([1, 1, p, d])
            + g * gp.tile_embedding.forward(ids.clone()).reshape([bi, tiles, p, d]);
        let x = self.layernorm_pre.forward(x);
        // Pad the patches to a multiple of 8.
        let pad = (8 - p % 8) % 8;
        let pp = p + pad;
        let x = if pad > 0 {
            let device = x.device();
            Tensor::cat(vec![x, Tensor::zeros([bi, tiles, pad, d], &device)], 2)
        } else {
            x
        };
        let mask = aspect_ratio_mask(ratio_mask.reshape([bi, tiles]), p, pp);
        let mut x = x.reshape([bi, tiles * pp, d]);
        let mut kept = Vec::with_capacity(self.intermediate_layers.len());
        for (i, layer) in self.transformer.iter().enumerate() {
            x = layer.forward(x, &mask);
            if self.intermediate_layers.contains(&i) {
                kept.push((i, x.clone()));
            }
        }
        let x = self.layernorm_post.forward(x).reshape([bi, tiles, pp, d]);
        let x = x + self.tile_embed(&self.post_tile_positional_embedding, ids, tiles, d);
        let mut x = x.reshape([bi, tiles * pp, d]);
        for layer in &self.global_transformer {
            x = layer.forward(x, &mask);
        }
        let x = x.reshape([bi, tiles, pp, d]).slice([0..bi, 0..tiles, 0..p, 0..d]);
        // Intermediate layers in the configured order, stacked on a last axis (as
        // `torch.stack(..., dim=-1)`), then flattened with it.
        let inter: Vec<Tensor<4>> = self
            .intermediate_layers
            .iter()
            .map(|i| {
                kept.iter()
                    .find(|(j, _)| j == i)
                    .expect("every intermediate layer kept")
                    .1
                    .clone()
                    .unsqueeze_dim::<4>(3)
            })
            .collect();
        let k = inter.len();
        let out = if k > 0 {
            let inter = Tensor::cat(inter, 3)
                .reshape([bi, tiles, pp, d * k])
                .slice([0..bi, 0..tiles, 0..p, 0..d * k]);
            Tensor::cat(vec![x, inter], 3)
        } else {
            x
        };
        let od = d * (1 + k);
        out.reshape([b, imgs, tiles, p, od])
    }

    fn tile_embed(&self, e: &AspectRatioEmbedding, ids: Tensor<2, Int>, tiles: usize, d: usize) -> Tensor<4> {
        let [bi, _] = ids.dims();
        e.embedding.forward(ids).reshape([bi, tiles, 1, d]) * e.gate.val().tanh().reshape([1, 1, 1, 1])
    }
}

/// transformers' `_prepare_aspect_ratio_attention_mask`: `[bi, T]` tile mask → additive
/// `[bi, 1, T·pp, T·pp]`, masking the pairs where both positions are padding or in a padded
/// tile. As in transformers, when no patch is padding (`pp == p`) every position counts as
/// padding (its `[:, :, -0:]` slice selects everything). Off autodiff, where the mask has the
/// usual form, the positions instead ([`VisionMask::Split`]): the same attention, no mask tensor.
fn aspect_ratio_mask(tile_mask: Tensor<2>, p: usize, pp: usize) -> VisionMask {
    let [bi, tiles] = tile_mask.dims();
    let device = tile_mask.device();
    let valid: Vec<f32> = (0..pp).map(|i| if i < p && pp != p { 1.0 } else { 0.0 }).collect();
    let valid = Tensor::<1>::from_data(TensorData::new(valid, [pp]), &device).reshape([1, 1, pp]);
    let m = tile_mask.reshape([bi, tiles, 1]).expand([bi, tiles, pp]) * valid;
    // Which positions count, per image (read once: a handful of values per tile).
    let counts: Vec<f32> = m
        .clone()
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap_or_default();
    let every_image_counts = counts.chunks(tiles * pp).all(|c| c.iter().any(|&v| v > 0.5));
    if pp != p && counts.len() == bi * tiles * pp && every_image_counts && !device.is_autodiff() {
        return VisionMask::Split(
            counts
                .chunks(tiles * pp)
                .map(|c| {
                    let counted: Vec<i64> = (0..c.len()).filter(|&i| c[i] > 0.5).map(|i| i as i64).collect();
                    let padding: Vec<i64> = (0..c.len()).filter(|&i| c[i] <= 0.5).map(|i| i as i64).collect();
                    let mut undo = vec![0i64; c.len()];
                    for (at, &i) in counted.iter().chain(&padding).enumerate() {
                        undo[i as usize] = at as i64;
                    }
                    let t = |v: Vec<i64>| {
                        let n = v.len();
                        Tensor::<1, Int>::from_data(TensorData::new(v, [n]), &device)
                    };
                    (t(counted), t(padding), t(undo))
                })
                .collect(),
        );
    }
    let m = (m.neg() + 1.0).reshape([bi, tiles * pp, 1]);
    VisionMask::Additive(Box::new(
        (m.clone().matmul(m.swap_dims(1, 2)) * MASKED).unsqueeze_dim(1),
    ))
}

/// Text self-attention with RoPE and GQA.
#[derive(Module, Debug)]
pub struct SelfAttention {
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
    heads: usize,
    kv_heads: usize,
}

/// Text cross-attention to the projected vision states.
#[derive(Module, Debug)]
pub struct CrossAttention {
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    heads: usize,
    kv_heads: usize,
}

/// Text MLP (SiLU-gated).
#[derive(Module, Debug)]
pub struct TextMlp {
    gate_proj: Proj,
    up_proj: Proj,
    down_proj: Proj,
}

impl TextMlp {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.down_proj
            .forward(silu(self.gate_proj.forward(x.clone())) * self.up_proj.forward(x))
    }
}

/// A decoder layer: self-attention, or gated cross-attention.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    self_attn: Option<SelfAttention>,
    cross_attn: Option<CrossAttention>,
    mlp: TextMlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    cross_attn_attn_gate: Option<Param<Tensor<1>>>,
    cross_attn_mlp_gate: Option<Param<Tensor<1>>>,
}

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
struct LayerCache {
    kv: Option<(Tensor<4>, Tensor<4>)>,
}

/// The state of a generation: the layers' caches, how many positions are filled, and what the
/// next tokens may see of the images.
#[derive(Clone, Debug)]
pub struct Cache {
    layers: Vec<LayerCache>,
    len: usize,
    max: usize,
    /// Cross-attention context of the next tokens (the prompt's last row, repeated, as
    /// transformers extends its mask while generating).
    cross: Option<CrossContext>,
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
    /// The layer over `x` (tokens at positions `start..`), with the cache when generating.
    fn forward(
        &self,
        x: Tensor<3>,
        start: usize,
        rope: (&Tensor<4>, &Tensor<4>),
        causal: &Tensor<4>,
        cross: Option<&CrossContext>,
        cache: Option<(&mut LayerCache, usize)>,
    ) -> Tensor<3> {
        let h = self.input_layernorm.forward(x.clone());
        if let Some(a) = &self.self_attn {
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
            return x.clone() + self.mlp.forward(self.post_attention_layernorm.forward(x));
        }
        let a = self.cross_attn.as_ref().expect("a layer is self- or cross-attention");
        let c = cross.expect("cross-attention layers run only with vision states");
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
        let attn_gate = tanh_gate(self.cross_attn_attn_gate.as_ref().expect("cross layers are gated"));
        let x = x + attn_gate * o;
        let m = self.mlp.forward(self.post_attention_layernorm.forward(x.clone()));
        let m = m * c.rows.clone().expand(x.dims());
        let mlp_gate = tanh_gate(self.cross_attn_mlp_gate.as_ref().expect("cross layers are gated"));
        x + mlp_gate * m
    }
}

/// The text decoder.
#[derive(Module, Debug)]
pub struct TextModel {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
}

/// Llama 3.2 Vision.
#[derive(Module, Debug)]
pub struct Mllama {
    /// The vision encoder.
    pub vision_model: VisionModel,
    multi_modal_projector: Linear,
    language_model: TextModel,
    lm_head: Linear,
    #[module(skip)]
    inv_freq: Vec<f32>,
    patches_per_tile: usize,
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
        let model = Self::build(cfg, ck, device)?;
        ck.check_all_used()?;
        Ok(model)
    }

    /// A randomly initialised model (seeded), for tests and benchmarks.
    pub fn random(cfg: &MllamaConfig, seed: u64, device: &Device) -> Self {
        Self::build(cfg, &RandomInit::new(seed), device).expect("random tensors have the asked shapes")
    }

    fn build(cfg: &MllamaConfig, src: &dyn Source, device: &Device) -> Result<Self, CheckpointError> {
        let l = Loader { src, device };
        let (v, t) = (&cfg.vision, &cfg.text);
        let vd = v.hidden_size;
        let vision_layer = |p: &str, gated: bool| -> Result<VisionLayer, CheckpointError> {
            let gate = |n: &str| -> Result<Option<Param<Tensor<1>>>, CheckpointError> {
                if gated {
                    Ok(Some(l.param1(&format!("{p}.{n}"), 1)?))
                } else {
                    Ok(None)
                }
            };
            Ok(VisionLayer {
                self_attn: VisionAttention {
                    q_proj: l.proj(&format!("{p}.self_attn.q_proj"), vd, vd, false)?,
                    k_proj: l.proj(&format!("{p}.self_attn.k_proj"), vd, vd, false)?,
                    v_proj: l.proj(&format!("{p}.self_attn.v_proj"), vd, vd, false)?,
                    o_proj: l.proj(&format!("{p}.self_attn.o_proj"), vd, vd, false)?,
                    heads: v.attention_heads,
                },
                mlp: VisionMlp {
                    fc1: l.proj(&format!("{p}.mlp.fc1"), vd, v.intermediate_size, true)?,
                    fc2: l.proj(&format!("{p}.mlp.fc2"), v.intermediate_size, vd, true)?,
                },
                input_layernorm: l.layer_norm(&format!("{p}.input_layernorm"), vd, v.norm_eps)?,
                post_attention_layernorm: l.layer_norm(&format!("{p}.post_attention_layernorm"), vd, v.norm_eps)?,
                gate_attn: gate("gate_attn")?,
                gate_ffn: gate("gate_ffn")?,
            })
        };
        let p = cfg.patches_per_tile();
        let tiles = v.max_num_tiles;
        let ratios = v.supported_aspect_ratios.len() + 1;
        let ps = v.patch_size;
        let pv = "vision_model";
        let patch = l.values(&format!("{pv}.patch_embedding.weight"), &[vd, v.num_channels, ps, ps])?;
        let patch = transpose(&patch, vd, v.num_channels * ps * ps);
        let aspect = |n: &str| -> Result<AspectRatioEmbedding, CheckpointError> {
            Ok(AspectRatioEmbedding {
                embedding: l.embedding(&format!("{pv}.{n}.embedding.weight"), ratios, tiles * vd)?,
                gate: l.param1(&format!("{pv}.{n}.gate"), 1)?,
            })
        };
        let vision_model = VisionModel {
            patch_embedding: Param::from_tensor(l.tensor2(patch, [v.num_channels * ps * ps, vd])),
            class_embedding: l.param1(&format!("{pv}.class_embedding"), vd)?,
            gated_positional_embedding: GatedPositionEmbedding {
                embedding: Param::from_tensor(l.load2(&format!("{pv}.gated_positional_embedding.embedding"), [p, vd])?),
                gate: l.param1(&format!("{pv}.gated_positional_embedding.gate"), 1)?,
                tile_embedding: l.embedding(
                    &format!("{pv}.gated_positional_embedding.tile_embedding.weight"),
                    ratios,
                    tiles * p * vd,
                )?,
            },
            pre_tile_positional_embedding: aspect("pre_tile_positional_embedding")?,
            post_tile_positional_embedding: aspect("post_tile_positional_embedding")?,
            // transformers builds these two with LayerNorm's default epsilon, not norm_eps.
            layernorm_pre: l.layer_norm(&format!("{pv}.layernorm_pre"), vd, 1e-5)?,
            layernorm_post: l.layer_norm(&format!("{pv}.layernorm_post"), vd, 1e-5)?,
            transformer: (0..v.num_hidden_layers)
                .map(|i| vision_layer(&format!("{pv}.transformer.layers.{i}"), false))
                .collect::<Result<_, _>>()?,
            global_transformer: (0..v.num_global_layers)
                .map(|i| vision_layer(&format!("{pv}.global_transformer.layers.{i}"), true))
                .collect::<Result<_, _>>()?,
            patch_size: ps,
            intermediate_layers: v.intermediate_layers_indices.clone(),
        };
        let h = t.hidden_size;
        let kv = t.num_key_value_heads * t.head_dim();
        let pt = "language_model.model";
        let rms = |n: &str, d: usize| -> Result<RmsNorm, CheckpointError> {
            Ok(RmsNorm {
                gamma: l.param1(n, d)?,
                epsilon: t.rms_norm_eps,
            })
        };
        let mut layers = Vec::with_capacity(t.num_hidden_layers);
        for i in 0..t.num_hidden_layers {
            let pl = format!("{pt}.layers.{i}");
            let cross = t.cross_attention_layers.contains(&i);
            let proj = |kind: &str, n: &str, o: usize| l.proj(&format!("{pl}.{kind}.{n}"), h, o, false);
            let out = |kind: &str| l.proj(&format!("{pl}.{kind}.o_proj"), h, h, false);
            layers.push(DecoderLayer {
                self_attn: if cross {
                    None
                } else {
                    Some(SelfAttention {
                        q_proj: proj("self_attn", "q_proj", h)?,
                        k_proj: proj("self_attn", "k_proj", kv)?,
                        v_proj: proj("self_attn", "v_proj", kv)?,
                        o_proj: out("self_attn")?,
                        heads: t.num_attention_heads,
                        kv_heads: t.num_key_value_heads,
                    })
                },
                cross_attn: if cross {
                    Some(CrossAttention {
                        q_proj: proj("cross_attn", "q_proj", h)?,
                        k_proj: proj("cross_attn", "k_proj", kv)?,
                        v_proj: proj("cross_attn", "v_proj", kv)?,
                        o_proj: out("cross_attn")?,
                        q_norm: rms(&format!("{pl}.cross_attn.q_norm.weight"), t.head_dim())?,
                        k_norm: rms(&format!("{pl}.cross_attn.k_norm.weight"), t.head_dim())?,
                        heads: t.num_attention_heads,
                        kv_heads: t.num_key_value_heads,
                    })
                } else {
                    None
                },
                mlp: TextMlp {
                    gate_proj: l.proj(&format!("{pl}.mlp.gate_proj"), h, t.intermediate_size, false)?,
                    up_proj: l.proj(&format!("{pl}.mlp.up_proj"), h, t.intermediate_size, false)?,
                    down_proj: l.proj(&format!("{pl}.mlp.down_proj"), t.intermediate_size, h, false)?,
                },
                input_layernorm: rms(&format!("{pl}.input_layernorm.weight"), h)?,
                post_attention_layernorm: rms(&format!("{pl}.post_attention_layernorm.weight"), h)?,
                cross_attn_attn_gate: if cross {
                    Some(l.param1(&format!("{pl}.cross_attn_attn_gate"), 1)?)
                } else {
                    None
                },
                cross_attn_mlp_gate: if cross {
                    Some(l.param1(&format!("{pl}.cross_attn_mlp_gate"), 1)?)
                } else {
                    None
                },
            });
        }
        let embed_tokens = l.embedding(&format!("{pt}.embed_tokens.weight"), t.vocab_size + 8, h)?;
        let lm_head = if t.tie_word_embeddings {
            let w = embed_tokens.weight.val().slice([0..t.vocab_size, 0..h]).transpose();
            Linear {
                weight: Param::from_tensor(w),
                bias: None,
            }
        } else {
            l.linear("language_model.lm_head", h, t.vocab_size, false)?
        };
        let model = Mllama {
            vision_model,
            multi_modal_projector: l.linear("multi_modal_projector", v.vision_output_dim, h, true)?,
            language_model: TextModel {
                embed_tokens,
                layers,
                norm: rms(&format!("{pt}.norm.weight"), h)?,
            },
            lm_head,
            inv_freq: inv_freq(&t.rope, t.head_dim()),
            patches_per_tile: p,
        };
        Ok(model)
    }

    /// Every adaptable projection with whether `targets` selects it.
    fn projections_mut(&mut self, targets: &LoraTargets) -> Vec<&mut Proj> {
        Self::projections_of(&mut self.vision_model, &mut self.language_model, targets)
    }

    fn projections_of<'a>(vm: &'a mut VisionModel, lm: &'a mut TextModel, targets: &LoraTargets) -> Vec<&'a mut Proj> {
        let mut out: Vec<&mut Proj> = Vec::new();
        if targets.vision {
            for l in vm.transformer.iter_mut().chain(vm.global_transformer.iter_mut()) {
                let a = &mut l.self_attn;
                out.extend([&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj]);
                out.extend([&mut l.mlp.fc1, &mut l.mlp.fc2]);
            }
        }
        for l in &mut lm.layers {
            if let (Some(a), true) = (&mut l.self_attn, targets.text_attention) {
                out.extend([&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj]);
            }
            if let (Some(a), true) = (&mut l.cross_attn, targets.cross_attention) {
                out.extend([&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj]);
            }
            if targets.text_mlp {
                let m = &mut l.mlp;
                out.extend([&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj]);
            }
        }
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

    /// Every adapter's weight delta `(α/r)·(A·B)ᵀ` in the checkpoint's layout `[out, in]`, by
    /// the projection's checkpoint name (`….q_proj`).
    pub fn lora_deltas(&mut self) -> Vec<(String, Vec<f32>)> {
        let all = LoraTargets::ALL;
        self.projections_mut(&all)
            .into_iter()
            .filter_map(|p| {
                let l = p.lora.as_ref()?;
                let delta = (l.a.val().matmul(l.b.val()) * l.scale).transpose();
                Some((p.name.clone(), delta.into_data().try_to_vec::<f32>().expect("f32")))
            })
            .collect()
    }

    /// Builds the model from named tensors in the checkpoint's naming and layout.
    pub fn from_weights(
        cfg: &MllamaConfig,
        w: &crate::compact::weights::Weights,
        device: &Device,
    ) -> Result<Self, CheckpointError> {
        Self::build(cfg, w, device)
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
        let v = self.vision_model.forward(pixels, ratio_ids, ratio_mask);
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
        let (cos, sin) = self.rope_tables(start, s, &device);
        let causal = causal_mask(start, s, &device);
        let mut x = self.language_model.embed_tokens.forward(ids);
        for (i, layer) in self.language_model.layers.iter().enumerate() {
            if layer.cross_attn.is_some() && cross.is_none() {
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

    fn rope_tables(&self, start: usize, len: usize, device: &Device) -> (Tensor<4>, Tensor<4>) {
        let half = self.inv_freq.len();
        let hd = half * 2;
        let mut cos = Vec::with_capacity(len * hd);
        let mut sin = Vec::with_capacity(len * hd);
        for pos in start..start + len {
            let freqs: Vec<f32> = self.inv_freq.iter().map(|f| pos as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(freqs.iter().map(|f| f.cos()));
                sin.extend(freqs.iter().map(|f| f.sin()));
            }
        }
        let t = |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v, [len, hd]), device).reshape([1, 1, len, hd]);
        (t(cos), t(sin))
    }
}

/// Additive mask `[1, 1, s, start + s]`: new token `i` (position `start + i`) sees positions up
/// to its own.
fn causal_mask(start: usize, s: usize, device: &Device) -> Tensor<4> {
    let total = start + s;
    let v: Vec<f32> = (0..s * total)
        .map(|k| if k % total > start + k / total { MASKED } else { 0.0 })
        .collect();
    Tensor::<2>::from_data(TensorData::new(v, [s, total]), device).reshape([1, 1, s, total])
}

/// `[rows, cols]` row-major → `[cols, rows]`: in tiles (both sides stay in cache) and in
/// parallel over bands of output rows; every weight of a checkpoint passes here at load.
fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    use rayon::prelude::*;
    const TILE: usize = 32;
    assert_eq!(v.len(), rows * cols, "transpose: {} values for {rows}x{cols}", v.len());
    let mut out = vec![0.0; v.len()];
    if rows == 0 {
        return out;
    }
    // A band is TILE output rows (input columns c0..c0 + TILE).
    out.par_chunks_mut(TILE * rows).enumerate().for_each(|(band, o)| {
        let c0 = band * TILE;
        let cn = o.len() / rows;
        for r0 in (0..rows).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                let src = &v[r * cols + c0..][..cn];
                for (dc, &x) in src.iter().enumerate() {
                    o[dc * rows + r] = x;
                }
            }
        }
    });
    out
}

/// Where a model's tensors come from: a checkpoint, or a seeded random initialisation.
pub trait Source {
    /// The tensor `name` (published naming), of `shape`, as f32.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, CheckpointError>;
}

impl Source for Checkpoint {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, CheckpointError> {
        Checkpoint::tensor(self, name, shape)
    }
}

impl Source for crate::compact::weights::Weights {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, CheckpointError> {
        let t = self
            .0
            .get(name)
            .ok_or_else(|| CheckpointError::Missing(name.to_string()))?;
        if t.shape != shape {
            return Err(CheckpointError::Shape {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: t.shape.clone(),
            });
        }
        Ok(t.values.clone())
    }
}

/// A random initialisation (seeded): normal weights of standard deviation 0.02, norms at one,
/// biases at zero, gates open at 0.5 (so that a random model looks at its images).
pub struct RandomInit {
    rng: std::cell::RefCell<rand_chacha::ChaCha8Rng>,
}

impl RandomInit {
    /// Seeded.
    pub fn new(seed: u64) -> Self {
        use rand::SeedableRng;
        RandomInit {
            rng: std::cell::RefCell::new(rand_chacha::ChaCha8Rng::seed_from_u64(seed)),
        }
    }
}

impl Source for RandomInit {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, CheckpointError> {
        use rand::Rng;
        let n: usize = shape.iter().product();
        let last = name.rsplit('.').next().unwrap_or("");
        let is_norm = name.contains("norm") || name.contains("layernorm");
        Ok(
            if name.ends_with("gate") || (last.starts_with("gate_") && !name.contains("proj")) {
                vec![0.5; n]
            } else if is_norm && last == "weight" {
                vec![1.0; n]
            } else if last == "bias" {
                vec![0.0; n]
            } else {
                let mut rng = self.rng.borrow_mut();
                (0..n)
                    .map(|_| {
                        // Box-Muller: a normal sample of standard deviation 0.02.
                        let (u1, u2): (f32, f32) = (rng.r#gen::<f32>().max(1e-12), rng.r#gen());
                        0.02 * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
                    })
                    .collect()
            },
        )
    }
}

/// A named tensor: name, shape, values.
type Named = (String, Vec<usize>, Vec<f32>);

/// Records the tensors a configuration needs, with random values.
struct Recording {
    inner: RandomInit,
    seen: std::cell::RefCell<Vec<Named>>,
}

impl Source for Recording {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, CheckpointError> {
        let v = self.inner.tensor(name, shape)?;
        self.seen
            .borrow_mut()
            .push((name.to_string(), shape.to_vec(), v.clone()));
        Ok(v)
    }
}

/// Writes a randomly initialised checkpoint of `cfg` (seeded, published tensor names, f32) to
/// `path` (a `model.safetensors`): for tests, benchmarks and drills without real weights.
pub fn write_random_weights(cfg: &MllamaConfig, path: &std::path::Path, seed: u64) -> Result<(), CheckpointError> {
    let rec = Recording {
        inner: RandomInit::new(seed),
        seen: Default::default(),
    };
    Mllama::build(cfg, &rec, &Device::flex())?;
    let seen = rec.seen.into_inner();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = seen
        .into_iter()
        .map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).expect("consistent sizes"),
            )
        })
        .collect();
    let out = safetensors::serialize(views, None).map_err(|e| CheckpointError::Format(e.to_string()))?;
    std::fs::write(path, out).map_err(|source| CheckpointError::Io {
        path: path.display().to_string(),
        source,
    })
}

struct Loader<'a> {
    src: &'a dyn Source,
    device: &'a Device,
}

impl Loader<'_> {
    fn values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, CheckpointError> {
        self.src.tensor(name, shape)
    }

    fn tensor2(&self, v: Vec<f32>, shape: [usize; 2]) -> Tensor<2> {
        Tensor::from_data(TensorData::new(v, shape), self.device)
    }

    fn load2(&self, name: &str, shape: [usize; 2]) -> Result<Tensor<2>, CheckpointError> {
        Ok(self.tensor2(self.values(name, &shape)?, shape))
    }

    fn param1(&self, name: &str, d: usize) -> Result<Param<Tensor<1>>, CheckpointError> {
        let v = self.values(name, &[d])?;
        Ok(Param::from_tensor(Tensor::from_data(
            TensorData::new(v, [d]),
            self.device,
        )))
    }

    /// A linear layer from `{prefix}.weight` (`[out, in]`, kept as `[in, out]`) and bias.
    fn proj(&self, prefix: &str, d_in: usize, d_out: usize, bias: bool) -> Result<Proj, CheckpointError> {
        Ok(Proj::new(self.linear(prefix, d_in, d_out, bias)?, prefix))
    }

    fn linear(&self, prefix: &str, d_in: usize, d_out: usize, bias: bool) -> Result<Linear, CheckpointError> {
        let w = self.values(&format!("{prefix}.weight"), &[d_out, d_in])?;
        Ok(Linear {
            weight: Param::from_tensor(self.tensor2(transpose(&w, d_out, d_in), [d_in, d_out])),
            bias: if bias {
                Some(self.param1(&format!("{prefix}.bias"), d_out)?)
            } else {
                None
            },
        })
    }

    fn layer_norm(&self, prefix: &str, d: usize, eps: f64) -> Result<LayerNorm, CheckpointError> {
        let mut n = LayerNormConfig::new(d).with_epsilon(eps).init(self.device);
        n.gamma = self.param1(&format!("{prefix}.weight"), d)?;
        n.beta = Some(self.param1(&format!("{prefix}.bias"), d)?);
        Ok(n)
    }

    fn embedding(&self, name: &str, n: usize, d: usize) -> Result<Embedding, CheckpointError> {
        Ok(Embedding {
            weight: Param::from_tensor(self.load2(name, [n, d])?),
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn transpose_moves_every_value_whatever_the_tiles() {
        for (rows, cols) in [(70, 45), (3, 100), (100, 3), (32, 64), (1, 1), (0, 5), (5, 0)] {
            let v: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let t = super::transpose(&v, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(t[c * rows + r], v[r * cols + c], "{rows}x{cols} at {r},{c}");
                }
            }
        }
    }
}
