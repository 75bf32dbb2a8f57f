//! Building the model from named tensors: [`Source`] (a Hugging Face checkpoint, an exported
//! bundle's weights ([`WeightsView`](crate::compact::weights::WeightsView)), or a seeded
//! [`RandomInit`]), the loader that reads every tensor under its published name (the parameter
//! names of transformers' `models/mllama/modeling_mllama.py`, `MllamaForConditionalGeneration`'s
//! state dict as the published checkpoints store it) and turns PyTorch's `[out, in]` linear
//! weights into burn's `[in, out]`, in f32 or streamed into 4 bits. Random checkpoints for tests
//! come from [`super::synthetic`].

use super::checkpoint::{Checkpoint, CheckpointError};
use super::config::MllamaConfig;
use super::frozen::RowQuantizer;
use super::lora::Proj;
use super::model::Mllama;
use super::text::{
    CrossAttention, CrossAttentionLayer, DecoderLayer, SelfAttention, SelfAttentionLayer, TextMlp, TextModel, inv_freq,
};
use super::vision::{
    AspectRatioEmbedding, GatedPositionEmbedding, VisionAttention, VisionLayer, VisionMlp, VisionModel,
};
use burn::module::Param;
use burn::nn::{Embedding, LayerNorm, LayerNormConfig, Linear, RmsNorm};
use burn::tensor::{DType, Device, FloatDType, Tensor, TensorData};

impl Mllama {
    /// Builds the model from `src`, every tensor read under its published name, in a fixed
    /// order (a [`RandomInit`] draws its values in that order).
    pub(super) fn build(
        cfg: &MllamaConfig,
        src: &dyn Source,
        device: &Device,
        quant: Option<u8>,
    ) -> Result<Self, CheckpointError> {
        let l = Loader { src, device, quant };
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
                tile_embedding: l.half_embedding(
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
            let mlp = || -> Result<TextMlp, CheckpointError> {
                Ok(TextMlp {
                    gate_proj: l.proj(&format!("{pl}.mlp.gate_proj"), h, t.intermediate_size, false)?,
                    up_proj: l.proj(&format!("{pl}.mlp.up_proj"), h, t.intermediate_size, false)?,
                    down_proj: l.proj(&format!("{pl}.mlp.down_proj"), t.intermediate_size, h, false)?,
                })
            };
            // Fields are read in the order they are written: attention, MLP, norms, gates.
            layers.push(if cross {
                DecoderLayer::CrossAttention(CrossAttentionLayer {
                    cross_attn: CrossAttention {
                        q_proj: proj("cross_attn", "q_proj", h)?,
                        k_proj: proj("cross_attn", "k_proj", kv)?,
                        v_proj: proj("cross_attn", "v_proj", kv)?,
                        o_proj: out("cross_attn")?,
                        q_norm: rms(&format!("{pl}.cross_attn.q_norm.weight"), t.head_dim())?,
                        k_norm: rms(&format!("{pl}.cross_attn.k_norm.weight"), t.head_dim())?,
                        heads: t.num_attention_heads,
                        kv_heads: t.num_key_value_heads,
                    },
                    mlp: mlp()?,
                    input_layernorm: rms(&format!("{pl}.input_layernorm.weight"), h)?,
                    post_attention_layernorm: rms(&format!("{pl}.post_attention_layernorm.weight"), h)?,
                    cross_attn_attn_gate: l.param1(&format!("{pl}.cross_attn_attn_gate"), 1)?,
                    cross_attn_mlp_gate: l.param1(&format!("{pl}.cross_attn_mlp_gate"), 1)?,
                })
            } else {
                DecoderLayer::SelfAttention(SelfAttentionLayer {
                    self_attn: SelfAttention {
                        q_proj: proj("self_attn", "q_proj", h)?,
                        k_proj: proj("self_attn", "k_proj", kv)?,
                        v_proj: proj("self_attn", "v_proj", kv)?,
                        o_proj: out("self_attn")?,
                        heads: t.num_attention_heads,
                        kv_heads: t.num_key_value_heads,
                    },
                    mlp: mlp()?,
                    input_layernorm: rms(&format!("{pl}.input_layernorm.weight"), h)?,
                    post_attention_layernorm: rms(&format!("{pl}.post_attention_layernorm.weight"), h)?,
                })
            });
        }
        let embed_tokens = l.half_embedding(&format!("{pt}.embed_tokens.weight"), t.vocab_size + 8, h)?;
        let lm_head = if t.tie_word_embeddings {
            let w = embed_tokens
                .weight
                .val()
                .slice([0..t.vocab_size, 0..h])
                .cast(FloatDType::F32)
                .transpose();
            let mut lm_head = Linear {
                weight: Param::from_tensor(w),
                bias: None,
            };
            if let Some(block) = quant {
                super::frozen::quantize(&mut lm_head, block);
            }
            lm_head
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

    /// The same values in pieces of whole rows, in order (what a loader streams: 2-D weights and
    /// embeddings): a source that can read a piece at a time never holds the whole tensor in f32.
    fn rows(&self, name: &str, shape: &[usize], f: &mut dyn FnMut(&[f32])) -> Result<(), CheckpointError> {
        f(&self.tensor(name, shape)?);
        Ok(())
    }

    /// The `[out, in]` weight `name` (`shape`) as the 4-bit values (`[in, out]`, one a byte, in
    /// room for `capacity`) and scales of `block` outputs each that the model holds, where the
    /// source stores it in that grid: nothing is unpacked to f32 or rounded again. `None`
    /// elsewhere.
    fn grid(
        &self,
        _name: &str,
        _shape: [usize; 2],
        _block: usize,
        _capacity: usize,
    ) -> Result<Option<crate::quant::GridParts>, CheckpointError> {
        Ok(None)
    }
}

impl Source for Checkpoint {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, CheckpointError> {
        Checkpoint::tensor(self, name, shape)
    }

    fn rows(&self, name: &str, shape: &[usize], f: &mut dyn FnMut(&[f32])) -> Result<(), CheckpointError> {
        let per = self.rows_per_piece(name)?;
        self.read_rows(name, Some(shape), per, &mut |_, v| f(v))?;
        Ok(())
    }
}

fn weight_error(e: crate::compact::weights::WeightError) -> CheckpointError {
    use crate::compact::weights::WeightError;
    match e {
        WeightError::Missing(n) => CheckpointError::Missing(n),
        other => CheckpointError::Format(other.to_string()),
    }
}

impl Source for crate::compact::weights::WeightsView<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, CheckpointError> {
        let mut out = Vec::new();
        Source::rows(self, name, shape, &mut |v| out.extend_from_slice(v))?;
        Ok(out)
    }

    fn rows(&self, name: &str, shape: &[usize], f: &mut dyn FnMut(&[f32])) -> Result<(), CheckpointError> {
        let found = self.shape(name).map_err(weight_error)?;
        if found != shape {
            return Err(CheckpointError::Shape {
                name: name.to_string(),
                expected: shape.to_vec(),
                found,
            });
        }
        let row: usize = shape.iter().skip(1).product::<usize>().max(1);
        let per = (super::checkpoint::READ_CHUNK / (4 * row)).max(1);
        crate::compact::weights::WeightsView::rows(self, name, per, f).map_err(weight_error)
    }

    fn grid(
        &self,
        name: &str,
        shape: [usize; 2],
        block: usize,
        capacity: usize,
    ) -> Result<Option<crate::quant::GridParts>, CheckpointError> {
        crate::compact::weights::WeightsView::grid(self, name, shape, block, capacity).map_err(weight_error)
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

struct Loader<'a> {
    src: &'a dyn Source,
    device: &'a Device,
    /// Build the base's linear weights in 4 bits (blocks of this many output values) as they
    /// are read, and the large embeddings in f16.
    quant: Option<u8>,
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
        let name = format!("{prefix}.weight");
        let weight = match self.quant {
            Some(block) if block > 0 && d_out.is_multiple_of(block as usize) => {
                let capacity = RowQuantizer::room(d_out, d_in, block);
                let q = match self.src.grid(&name, [d_out, d_in], block as usize, capacity)? {
                    // Stored in this grid (an exported bundle): taken as it is.
                    Some((values, scales)) => RowQuantizer::from_grid(d_out, d_in, block, values, scales),
                    None => {
                        let mut q = RowQuantizer::new(d_out, d_in, block);
                        self.src.rows(&name, &[d_out, d_in], &mut |v| q.push(v))?;
                        q
                    }
                };
                Param::from_tensor(q.finish(self.device)).set_require_grad(false)
            }
            _ => {
                let w = self.values(&name, &[d_out, d_in])?;
                Param::from_tensor(self.tensor2(transpose(&w, d_out, d_in), [d_in, d_out]))
            }
        };
        Ok(Linear {
            weight,
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

    /// A large embedding (the tokens', the vision tiles' positions): in f16 when the base is
    /// quantized (half the bytes of f32; rows are looked up and widened to f32 a few at a time),
    /// else in f32.
    fn half_embedding(&self, name: &str, n: usize, d: usize) -> Result<Embedding, CheckpointError> {
        if self.quant.is_none() {
            return self.embedding(name, n, d);
        }
        let mut halves: Vec<half::f16> = Vec::with_capacity(n * d);
        self.src.rows(name, &[n, d], &mut |v| {
            halves.extend(v.iter().map(|&x| half::f16::from_f32(x)))
        })?;
        // Kept in f16 where the device holds f16 (burn would otherwise widen it to f32).
        let dtype = if self.device.supports_dtype(DType::F16) {
            DType::F16
        } else {
            DType::F32
        };
        let t: Tensor<2> = Tensor::from_data(TensorData::new(halves, [n, d]), (self.device, dtype));
        Ok(Embedding {
            weight: Param::from_tensor(t).set_require_grad(false),
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
