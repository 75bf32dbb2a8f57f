//! The vision encoder of Llama 3.2 Vision (`MllamaVisionModel` of transformers'
//! `models/mllama/modeling_mllama.py`), module names as in the published checkpoints: patch
//! embedding (a convolution with stride = kernel, computed as a matmul over flattened patches),
//! gated pre-tile aspect-ratio embedding, class token, gated positional embedding with tile
//! embedding, patches padded to a multiple of 8 with the aspect-ratio attention mask
//! (`_prepare_aspect_ratio_attention_mask`), the local transformer (whose listed intermediate
//! layers are kept), the post-tile embedding and the gated global transformer; output `[B,
//! images, tiles, patches, hidden × (1 + intermediate layers)]`.

use super::layers::{MASKED, attention, f32_rows, merge_heads, split_heads, tanh_gate};
use super::lora::Proj;
use burn::module::{Module, Param};
use burn::nn::{Embedding, LayerNorm};
use burn::tensor::activation::gelu;
use burn::tensor::{Int, Tensor, TensorData};

/// Vision self-attention (no bias, all heads).
#[derive(Module, Debug)]
pub struct VisionAttention {
    pub(super) q_proj: Proj,
    pub(super) k_proj: Proj,
    pub(super) v_proj: Proj,
    pub(super) o_proj: Proj,
    pub(super) heads: usize,
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
    pub(super) fc1: Proj,
    pub(super) fc2: Proj,
}

/// One vision encoder layer; the global ones are gated.
#[derive(Module, Debug)]
pub struct VisionLayer {
    pub(super) self_attn: VisionAttention,
    pub(super) mlp: VisionMlp,
    pub(super) input_layernorm: LayerNorm,
    pub(super) post_attention_layernorm: LayerNorm,
    pub(super) gate_attn: Option<Param<Tensor<1>>>,
    pub(super) gate_ffn: Option<Param<Tensor<1>>>,
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
    pub(super) embedding: Embedding,
    pub(super) gate: Param<Tensor<1>>,
}

/// Positional embedding, gated against the tile positional embedding.
#[derive(Module, Debug)]
pub struct GatedPositionEmbedding {
    pub(super) embedding: Param<Tensor<2>>,
    pub(super) gate: Param<Tensor<1>>,
    pub(super) tile_embedding: Embedding,
}

/// The vision encoder.
#[derive(Module, Debug)]
pub struct VisionModel {
    /// `[channels·patch·patch, hidden]`.
    pub(super) patch_embedding: Param<Tensor<2>>,
    pub(super) class_embedding: Param<Tensor<1>>,
    pub(super) gated_positional_embedding: GatedPositionEmbedding,
    pub(super) pre_tile_positional_embedding: AspectRatioEmbedding,
    pub(super) post_tile_positional_embedding: AspectRatioEmbedding,
    pub(super) layernorm_pre: LayerNorm,
    pub(super) layernorm_post: LayerNorm,
    pub(super) transformer: Vec<VisionLayer>,
    pub(super) global_transformer: Vec<VisionLayer>,
    pub(super) patch_size: usize,
    pub(super) intermediate_layers: Vec<usize>,
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
            + g * f32_rows(gp.tile_embedding.forward(ids.clone())).reshape([bi, tiles, p, d]);
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

    /// The projections of every layer, local then global: per layer q, k, v, o, fc1, fc2.
    pub(super) fn projections(&self) -> Vec<&Proj> {
        let mut out: Vec<&Proj> = Vec::new();
        for l in self.transformer.iter().chain(self.global_transformer.iter()) {
            let a = &l.self_attn;
            out.extend([&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj]);
            out.extend([&l.mlp.fc1, &l.mlp.fc2]);
        }
        out
    }

    /// The projections of every layer, local then global: per layer q, k, v, o, fc1, fc2.
    pub(super) fn projections_mut(&mut self) -> Vec<&mut Proj> {
        let mut out: Vec<&mut Proj> = Vec::new();
        for l in self.transformer.iter_mut().chain(self.global_transformer.iter_mut()) {
            let a = &mut l.self_attn;
            out.extend([&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj]);
            out.extend([&mut l.mlp.fc1, &mut l.mlp.fc2]);
        }
        out
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
