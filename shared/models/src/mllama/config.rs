//! The model's configuration, read from a Hugging Face `config.json` (`MllamaConfig`): the keys
//! that decide the architecture are required, the others take transformers' defaults, unknown
//! keys are ignored. The rotary embedding is read from `rope_parameters` (transformers 5) or
//! `rope_theta` + `rope_scaling` (the published checkpoints).

use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Reading the file.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Not valid JSON, a required key missing, or a value of the wrong type.
    #[error("config.json: {0}")]
    Invalid(String),
}

fn default_channels() -> usize {
    3
}
fn default_eps() -> f64 {
    1e-5
}
fn default_tiles() -> usize {
    4
}
fn default_ratios() -> Vec<[usize; 2]> {
    vec![[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]
}
fn default_gelu() -> String {
    "gelu".into()
}
fn default_silu() -> String {
    "silu".into()
}

/// `vision_config`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
pub struct VisionConfig {
    /// Width of the vision transformer.
    pub hidden_size: usize,
    /// Attention heads.
    pub attention_heads: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Layers of the local transformer.
    pub num_hidden_layers: usize,
    /// Layers of the global (gated) transformer.
    pub num_global_layers: usize,
    /// Local layers whose outputs are concatenated to the final one.
    pub intermediate_layers_indices: Vec<usize>,
    /// `hidden_size × (1 + intermediate layers)`.
    pub vision_output_dim: usize,
    /// Side of a tile, pixels.
    pub image_size: usize,
    /// Side of a patch, pixels.
    pub patch_size: usize,
    /// Colour channels.
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    /// Epsilon of the encoder layers' layer norms.
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    /// Tiles per image, at most.
    #[serde(default = "default_tiles")]
    pub max_num_tiles: usize,
    /// Tile layouts `[rows, columns]`; an image's aspect-ratio id is its index here plus one.
    #[serde(default = "default_ratios")]
    pub supported_aspect_ratios: Vec<[usize; 2]>,
    /// Activation of the MLPs.
    #[serde(default = "default_gelu")]
    pub hidden_act: String,
}

/// Llama 3 rotary frequency scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    /// Scale of the low frequencies.
    pub factor: f64,
    /// Low-frequency factor.
    pub low_freq_factor: f64,
    /// High-frequency factor.
    pub high_freq_factor: f64,
    /// Context length of pre-training.
    pub original_max_position_embeddings: usize,
}

/// The rotary position embedding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    /// Base.
    pub theta: f64,
    /// Llama 3 scaling, if any.
    pub llama3: Option<Llama3Scaling>,
}

/// `text_config`.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    /// Vocabulary of the LM head (the embedding table has 8 more rows).
    pub vocab_size: usize,
    /// Width.
    pub hidden_size: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA when fewer than the query heads).
    pub num_key_value_heads: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers, cross-attention ones included.
    pub num_hidden_layers: usize,
    /// Indices of the cross-attention layers.
    pub cross_attention_layers: Vec<usize>,
    /// RMS norm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary embedding.
    pub rope: Rope,
    /// Longest context.
    pub max_position_embeddings: usize,
    /// Activation of the MLPs.
    pub hidden_act: String,
    /// LM head shares the embedding table.
    pub tie_word_embeddings: bool,
    /// Beginning of text.
    pub bos_token_id: Option<u32>,
    /// Tokens that end generation.
    pub eos_token_ids: Vec<u32>,
    /// Padding token.
    pub pad_token_id: Option<u32>,
}

impl TextConfig {
    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// The whole model's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct MllamaConfig {
    /// Vision encoder.
    pub vision: VisionConfig,
    /// Text decoder.
    pub text: TextConfig,
    /// The `<|image|>` token.
    pub image_token_index: u32,
}

/// Parameter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamCount {
    /// The whole model.
    pub total: u64,
    /// The vision encoder alone.
    pub vision: u64,
}

#[derive(Deserialize)]
struct RawText {
    vocab_size: usize,
    hidden_size: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    intermediate_size: usize,
    num_hidden_layers: usize,
    cross_attention_layers: Vec<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_parameters: Option<Value>,
    rope_scaling: Option<Value>,
    rope_theta: Option<f64>,
    #[serde(default = "default_positions")]
    max_position_embeddings: usize,
    #[serde(default = "default_silu")]
    hidden_act: String,
    #[serde(default)]
    tie_word_embeddings: bool,
    bos_token_id: Option<u32>,
    eos_token_id: Option<Value>,
    pad_token_id: Option<u32>,
}

fn default_positions() -> usize {
    131_072
}

#[derive(Deserialize)]
struct RawConfig {
    vision_config: VisionConfig,
    text_config: RawText,
    #[serde(default = "default_image_token")]
    image_token_index: u32,
}

fn default_image_token() -> u32 {
    128_256
}

fn invalid(s: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(s.into())
}

fn rope(raw: &RawText) -> Result<Rope, ConfigError> {
    // transformers 5: everything under rope_parameters; before: rope_theta and rope_scaling.
    let params = raw.rope_parameters.clone().or_else(|| raw.rope_scaling.clone());
    let theta = params
        .as_ref()
        .and_then(|p| p.get("rope_theta"))
        .and_then(Value::as_f64)
        .or(raw.rope_theta)
        .unwrap_or(500_000.0);
    let kind = params
        .as_ref()
        .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let llama3 = match kind {
        "default" => None,
        "llama3" => {
            let p = params.as_ref().expect("a rope type comes from parameters");
            let f = |k: &str| {
                p.get(k)
                    .and_then(Value::as_f64)
                    .ok_or_else(|| invalid(format!("text_config rope scaling: {k} is missing")))
            };
            Some(Llama3Scaling {
                factor: f("factor")?,
                low_freq_factor: f("low_freq_factor")?,
                high_freq_factor: f("high_freq_factor")?,
                original_max_position_embeddings: f("original_max_position_embeddings")? as usize,
            })
        }
        other => return Err(invalid(format!("text_config: rope type {other:?} is not supported"))),
    };
    Ok(Rope { theta, llama3 })
}

impl MllamaConfig {
    /// Parses `config.json` text.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let t = raw.text_config;
        let eos_token_ids = match &t.eos_token_id {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Number(n)) => vec![n.as_u64().ok_or_else(|| invalid("eos_token_id"))? as u32],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_u64().map(|n| n as u32).ok_or_else(|| invalid("eos_token_id")))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(invalid("eos_token_id must be a number or a list")),
        };
        let c = MllamaConfig {
            text: TextConfig {
                rope: rope(&t)?,
                vocab_size: t.vocab_size,
                hidden_size: t.hidden_size,
                num_attention_heads: t.num_attention_heads,
                num_key_value_heads: t.num_key_value_heads.unwrap_or(t.num_attention_heads),
                intermediate_size: t.intermediate_size,
                num_hidden_layers: t.num_hidden_layers,
                cross_attention_layers: t.cross_attention_layers,
                rms_norm_eps: t.rms_norm_eps,
                max_position_embeddings: t.max_position_embeddings,
                hidden_act: t.hidden_act,
                tie_word_embeddings: t.tie_word_embeddings,
                bos_token_id: t.bos_token_id,
                eos_token_ids,
                pad_token_id: t.pad_token_id,
            },
            vision: raw.vision_config,
            image_token_index: raw.image_token_index,
        };
        c.validate()?;
        Ok(c)
    }

    /// Reads `<dir>/config.json`.
    pub fn load(dir: &Path) -> Result<Self, ConfigError> {
        let p = dir.join("config.json");
        let text = std::fs::read_to_string(&p).map_err(|source| ConfigError::Io {
            path: p.display().to_string(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// Refuses what the model cannot be built with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let (v, t) = (&self.vision, &self.text);
        if v.hidden_size == 0 || v.attention_heads == 0 || v.hidden_size % v.attention_heads != 0 {
            return Err(invalid("vision_config: hidden_size must divide by attention_heads"));
        }
        if v.patch_size == 0 || v.image_size % v.patch_size != 0 {
            return Err(invalid("vision_config: image_size must divide by patch_size"));
        }
        if let Some(i) = v
            .intermediate_layers_indices
            .iter()
            .find(|&&i| i >= v.num_hidden_layers)
        {
            return Err(invalid(format!(
                "vision_config: intermediate layer {i} is beyond num_hidden_layers {}",
                v.num_hidden_layers
            )));
        }
        if v.vision_output_dim != v.hidden_size * (1 + v.intermediate_layers_indices.len()) {
            return Err(invalid(
                "vision_config: vision_output_dim must be hidden_size × (1 + intermediate layers)",
            ));
        }
        if v.max_num_tiles == 0
            || v.supported_aspect_ratios
                .iter()
                .any(|[r, c]| r * c > v.max_num_tiles || r * c == 0)
        {
            return Err(invalid(
                "vision_config: an aspect ratio has more tiles than max_num_tiles",
            ));
        }
        if v.hidden_act != "gelu" || t.hidden_act != "silu" {
            return Err(invalid("only gelu (vision) and silu (text) activations are supported"));
        }
        if t.num_attention_heads == 0
            || t.hidden_size % t.num_attention_heads != 0
            || t.num_key_value_heads == 0
            || t.num_attention_heads % t.num_key_value_heads != 0
            || t.head_dim() % 2 != 0
        {
            return Err(invalid(
                "text_config: hidden_size must divide by num_attention_heads into an even head size, \
                 which must divide by num_key_value_heads",
            ));
        }
        if let Some(i) = t.cross_attention_layers.iter().find(|&&i| i >= t.num_hidden_layers) {
            return Err(invalid(format!(
                "text_config: cross-attention layer {i} is beyond num_hidden_layers {}",
                t.num_hidden_layers
            )));
        }
        if self.image_token_index as usize >= t.vocab_size + 8 {
            return Err(invalid("image_token_index is outside the embedding table"));
        }
        Ok(())
    }

    /// Patches per tile, the class token included.
    pub fn patches_per_tile(&self) -> usize {
        (self.vision.image_size / self.vision.patch_size).pow(2) + 1
    }

    /// The number of parameters, from the configuration alone (nothing is allocated).
    pub fn parameter_count(&self) -> ParamCount {
        let (v, t) = (&self.vision, &self.text);
        let u = |x: usize| x as u64;
        let d = u(v.hidden_size);
        let p = u(self.patches_per_tile());
        let tiles = u(v.max_num_tiles);
        let ratio_ids = u(v.supported_aspect_ratios.len()) + 1;
        let vision_layer = 4 * d * d + 2 * d * u(v.intermediate_size) + u(v.intermediate_size) + d + 4 * d;
        let vision = u(v.num_channels) * u(v.patch_size).pow(2) * d // patch embedding
            + d // class embedding
            + p * d + 1 + ratio_ids * tiles * p * d // gated positional embedding
            + 2 * (ratio_ids * tiles * d + 1) // pre- and post-tile embeddings
            + 4 * d // layernorm_pre and layernorm_post
            + u(v.num_hidden_layers) * vision_layer
            + u(v.num_global_layers) * (vision_layer + 2);
        let h = u(t.hidden_size);
        let kv = u(t.num_key_value_heads * t.head_dim());
        let attn = 2 * h * h + 2 * h * kv;
        let mlp = 3 * h * u(t.intermediate_size);
        let cross = u(t.cross_attention_layers.len());
        let layers = u(t.num_hidden_layers) * (attn + mlp + 2 * h) + cross * (2 * u(t.head_dim()) + 2);
        let lm_head = if t.tie_word_embeddings { 0 } else { u(t.vocab_size) * h };
        let text = u(t.vocab_size + 8) * h + layers + h + lm_head;
        let projector = u(v.vision_output_dim) * h + h;
        ParamCount {
            total: vision + projector + text,
            vision,
        }
    }

    /// Shapes for benchmarks: `11b` is the published configuration; `small`, `medium` and
    /// `large` (about 10 M, 0.2 B and 1.5 B parameters) scale its widths and depths down, with
    /// 224-px tiles and two global vision layers; the same shapes as `bench/peers.py`.
    pub fn bench_scale(scale: &str) -> Option<Self> {
        let mut c = Self::llama_3_2_11b_vision();
        let (vd, vl, td, tl, vocab) = match scale {
            "11b" => return Some(c),
            "small" => (128, 4, 256, 4, 8_000),
            "medium" => (512, 8, 1024, 8, 32_000),
            "large" => (1024, 16, 2048, 16, 64_000),
            _ => return None,
        };
        c.vision.hidden_size = vd;
        c.vision.attention_heads = vd / 64;
        c.vision.intermediate_size = vd * 4;
        c.vision.num_hidden_layers = vl;
        c.vision.num_global_layers = 2;
        c.vision.intermediate_layers_indices = vec![1, vl - 1];
        c.vision.vision_output_dim = vd * 3;
        c.vision.image_size = 224;
        c.text.hidden_size = td;
        c.text.num_attention_heads = td / 64;
        c.text.num_key_value_heads = td / 256;
        c.text.intermediate_size = td * 4;
        c.text.num_hidden_layers = tl;
        c.text.cross_attention_layers = vec![1, tl - 1];
        c.text.vocab_size = vocab;
        c.image_token_index = vocab as u32;
        Some(c)
    }

    /// The configuration as `config.json` (transformers' keys, the published checkpoints'
    /// layout): what [`from_json`](Self::from_json) reads back to the same configuration.
    pub fn to_hf_json(&self) -> Value {
        let t = &self.text;
        let rope_scaling = t.rope.llama3.map(|l| {
            serde_json::json!({
                "rope_type": "llama3",
                "factor": l.factor,
                "low_freq_factor": l.low_freq_factor,
                "high_freq_factor": l.high_freq_factor,
                "original_max_position_embeddings": l.original_max_position_embeddings,
            })
        });
        serde_json::json!({
            "architectures": ["MllamaForConditionalGeneration"],
            "model_type": "mllama",
            "image_token_index": self.image_token_index,
            "torch_dtype": "bfloat16",
            "vision_config": self.vision,
            "text_config": {
                "model_type": "mllama_text_model",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_hidden_layers,
                "cross_attention_layers": t.cross_attention_layers,
                "rms_norm_eps": t.rms_norm_eps,
                "rope_theta": t.rope.theta,
                "rope_scaling": rope_scaling,
                "max_position_embeddings": t.max_position_embeddings,
                "hidden_act": t.hidden_act,
                "tie_word_embeddings": t.tie_word_embeddings,
                "bos_token_id": t.bos_token_id,
                "eos_token_id": t.eos_token_ids,
                "pad_token_id": t.pad_token_id,
            },
        })
    }

    /// The published configuration at reduced depth: every width as published (vocabulary,
    /// hidden sizes, heads, MLPs, vision output), with `text_layers` decoder layers (the last a
    /// cross-attention layer, as layer 3 is in the published model when `text_layers` is 4)
    /// and `vision_layers` local and 2 global vision layers. Each kind of layer is its
    /// full-size self, so time and memory per layer carry over to the 11B model.
    pub fn llama_3_2_11b_reduced(text_layers: usize, vision_layers: usize) -> Self {
        let mut c = Self::llama_3_2_11b_vision();
        let (tl, vl) = (text_layers.max(2), vision_layers.max(5));
        c.text.num_hidden_layers = tl;
        c.text.cross_attention_layers = vec![tl - 1];
        c.vision.num_hidden_layers = vl;
        c.vision.num_global_layers = 2;
        // Five intermediate layers as published (the vision output keeps its 7,680 width).
        c.vision.intermediate_layers_indices = (0..5).map(|i| i * (vl - 1) / 4).collect();
        c
    }

    /// The published configuration of Llama 3.2 11B Vision (and Instruct).
    pub fn llama_3_2_11b_vision() -> Self {
        MllamaConfig {
            vision: VisionConfig {
                hidden_size: 1280,
                attention_heads: 16,
                intermediate_size: 5120,
                num_hidden_layers: 32,
                num_global_layers: 8,
                intermediate_layers_indices: vec![3, 7, 15, 23, 30],
                vision_output_dim: 7680,
                image_size: 560,
                patch_size: 14,
                num_channels: 3,
                norm_eps: 1e-5,
                max_num_tiles: 4,
                supported_aspect_ratios: default_ratios(),
                hidden_act: "gelu".into(),
            },
            text: TextConfig {
                vocab_size: 128_256,
                hidden_size: 4096,
                num_attention_heads: 32,
                num_key_value_heads: 8,
                intermediate_size: 14_336,
                num_hidden_layers: 40,
                cross_attention_layers: vec![3, 8, 13, 18, 23, 28, 33, 38],
                rms_norm_eps: 1e-5,
                rope: Rope {
                    theta: 500_000.0,
                    llama3: Some(Llama3Scaling {
                        factor: 8.0,
                        low_freq_factor: 1.0,
                        high_freq_factor: 4.0,
                        original_max_position_embeddings: 8192,
                    }),
                },
                max_position_embeddings: 131_072,
                hidden_act: "silu".into(),
                tie_word_embeddings: false,
                bos_token_id: Some(128_000),
                eos_token_ids: vec![128_001, 128_008, 128_009],
                pad_token_id: Some(128_004),
            },
            image_token_index: 128_256,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configuration_written_as_json_reads_back_the_same() {
        for c in [
            MllamaConfig::llama_3_2_11b_vision(),
            MllamaConfig::llama_3_2_11b_reduced(4, 8),
            MllamaConfig::bench_scale("small").unwrap(),
        ] {
            let back = MllamaConfig::from_json(&c.to_hf_json().to_string()).unwrap();
            assert_eq!(back, c);
        }
        let r = MllamaConfig::llama_3_2_11b_reduced(4, 8);
        assert_eq!(r.vision.intermediate_layers_indices, vec![0, 1, 3, 5, 7]);
        assert_eq!(r.text.cross_attention_layers, vec![3]);
        assert_eq!(r.vision.vision_output_dim, 7680);
    }

    #[test]
    fn the_11b_configuration_has_the_published_parameter_count() {
        let c = MllamaConfig::llama_3_2_11b_vision();
        c.validate().unwrap();
        // Counted by transformers 5.24 on the meta device (../shared/docs/MLLAMA.md).
        assert_eq!(
            c.parameter_count(),
            ParamCount {
                total: 10_670_220_835,
                vision: 863_567_379
            }
        );
    }

    #[test]
    fn both_rope_spellings_are_read_and_missing_keys_are_named() {
        let base = |text_rope: &str| {
            format!(
                r#"{{"vision_config": {{"hidden_size": 16, "attention_heads": 2, "intermediate_size": 32,
                "num_hidden_layers": 3, "num_global_layers": 1, "intermediate_layers_indices": [0, 2],
                "vision_output_dim": 48, "image_size": 28, "patch_size": 14, "unknown_key": 1}},
                "text_config": {{"vocab_size": 120, "hidden_size": 32, "num_attention_heads": 4,
                "num_key_value_heads": 2, "intermediate_size": 48, "num_hidden_layers": 4,
                "cross_attention_layers": [1, 3] {text_rope}}}, "image_token_index": 120}}"#
            )
        };
        let new = MllamaConfig::from_json(&base(
            r#", "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}"#,
        ))
        .unwrap();
        let old = MllamaConfig::from_json(&base(
            r#", "rope_theta": 10000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}"#,
        ))
        .unwrap();
        assert_eq!(new, old);
        assert_eq!(new.text.rope.theta, 10000.0);
        assert_eq!(new.text.rope.llama3.unwrap().original_max_position_embeddings, 16);
        let plain = MllamaConfig::from_json(&base("")).unwrap();
        assert_eq!(plain.text.rope.llama3, None);
        let missing = base("").replace(r#""num_hidden_layers": 4,"#, "");
        let e = MllamaConfig::from_json(&missing).unwrap_err().to_string();
        assert!(e.contains("num_hidden_layers"), "{e}");
        let bad = base("").replace(
            r#""cross_attention_layers": [1, 3]"#,
            r#""cross_attention_layers": [9]"#,
        );
        assert!(
            MllamaConfig::from_json(&bad)
                .unwrap_err()
                .to_string()
                .contains("cross-attention layer 9")
        );
    }
}
