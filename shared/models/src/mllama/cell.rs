//! One cell as the model sees it: the question (and, when training, the answer) in the chat
//! format with the cell's image, and the class probabilities from the likelihood of each class
//! name as the answer's start.

use super::chat::{ChatTokenizer, Message, cross_attention_mask};
use super::{ImageProcessor, Inputs, Mllama, MllamaConfig, MllamaError, Prompted, Sampling, probabilities};
use burn::tensor::{Device, Int, Tensor, TensorData};
use image::RgbImage;
use std::path::Path;
use wbc_protocol::classes::CellClass;

/// The question of every conversation.
pub const QUESTION: &str = "What type of white blood cell is this? Describe it.";

/// The model's view of one cell: token ids, where the answer starts, and the processed image.
pub struct Encoded {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Where the answer starts.
    pub answer_from: usize,
    pixels: Vec<f32>,
    ratio_id: usize,
    ratio_mask: Vec<f32>,
    tiles: usize,
}

/// Tokenizer, image processor and configuration together.
pub struct Prompting {
    /// The model's configuration.
    pub cfg: MllamaConfig,
    /// Tokenizer with the chat format.
    pub tok: ChatTokenizer,
    /// Image processor.
    pub proc: ImageProcessor,
}

impl Prompting {
    /// From a checkpoint directory: `config.json`, `tokenizer.json`, and
    /// `preprocessor_config.json` (image mean and deviation) when present.
    pub fn load(dir: &Path) -> Result<Self, MllamaError> {
        let read = |f: &str| std::fs::read(dir.join(f));
        let cfg = std::fs::read_to_string(dir.join("config.json"))
            .map_err(|e| MllamaError::Other(format!("{}: {e}", dir.join("config.json").display())))?;
        let tok = read("tokenizer.json")
            .map_err(|e| MllamaError::Other(format!("{}: {e}", dir.join("tokenizer.json").display())))?;
        Self::from_parts(&cfg, &tok, read("preprocessor_config.json").ok().as_deref())
    }

    /// From the contents of `config.json`, `tokenizer.json` and (optional)
    /// `preprocessor_config.json`.
    pub fn from_parts(config: &str, tokenizer: &[u8], preprocessor: Option<&[u8]>) -> Result<Self, MllamaError> {
        let cfg = MllamaConfig::from_json(config)?;
        let tok = ChatTokenizer::from_bytes(tokenizer)?;
        if tok.image_token != cfg.image_token_index {
            return Err(MllamaError::Other(format!(
                "tokenizer.json's <|image|> is {}, config.json's image_token_index {}",
                tok.image_token, cfg.image_token_index
            )));
        }
        let mut proc = ImageProcessor {
            tile: cfg.vision.image_size,
            max_tiles: cfg.vision.max_num_tiles,
            ..ImageProcessor::llama_3_2_vision()
        };
        if let Some(bytes) = preprocessor {
            let v: serde_json::Value = serde_json::from_slice(bytes)
                .map_err(|e| MllamaError::Other(format!("preprocessor_config.json: {e}")))?;
            let three = |k: &str| -> Option<[f32; 3]> {
                let a = v.get(k)?.as_array()?;
                Some([
                    a.first()?.as_f64()? as f32,
                    a.get(1)?.as_f64()? as f32,
                    a.get(2)?.as_f64()? as f32,
                ])
            };
            if let (Some(m), Some(s)) = (three("image_mean"), three("image_std")) {
                proc.mean = m;
                proc.std = s;
            }
        }
        Ok(Prompting { cfg, tok, proc })
    }

    /// The `preprocessor_config.json` of this preprocessing (as transformers writes it).
    pub fn preprocessor_json(&self) -> serde_json::Value {
        serde_json::json!({
            "image_processor_type": "MllamaImageProcessor",
            "size": {"height": self.proc.tile, "width": self.proc.tile},
            "max_image_tiles": self.proc.max_tiles,
            "image_mean": self.proc.mean,
            "image_std": self.proc.std,
            "do_resize": true, "do_pad": true, "do_rescale": true, "do_normalize": true,
            "resample": 2, "rescale_factor": 1.0 / 255.0
        })
    }

    /// A cell's conversation; with `answer`, the answer follows the prompt.
    pub fn encode(&self, img: &RgbImage, answer: Option<&str>) -> Result<Encoded, MllamaError> {
        let user = Message::user_with_image(QUESTION);
        let prompt = self.tok.encode_chat(std::slice::from_ref(&user), true)?;
        let ids = match answer {
            Some(a) => self.tok.encode_chat(&[user, Message::assistant(a)], false)?,
            None => prompt.clone(),
        };
        if ids[..prompt.len()] != prompt[..] {
            return Err(MllamaError::Other("the answer changed how the prompt tokenizes".into()));
        }
        let x = self.proc.process(img);
        Ok(Encoded {
            answer_from: prompt.len(),
            tiles: x.layout.0 * x.layout.1,
            ids,
            pixels: x.pixel_values,
            ratio_id: x.aspect_ratio_id,
            ratio_mask: x.aspect_ratio_mask,
        })
    }

    /// The model inputs of an encoded cell, the first `len` tokens (all when `None`).
    pub fn inputs(&self, e: &Encoded, len: Option<usize>, device: &Device) -> Inputs {
        let ids = &e.ids[..len.unwrap_or(e.ids.len())];
        let s = ids.len();
        let (t, n) = (self.proc.tile, self.proc.max_tiles);
        let mask = cross_attention_mask(ids, self.tok.image_token, &[e.tiles], n);
        Inputs {
            input_ids: Tensor::<2, Int>::from_data(
                TensorData::new(ids.iter().map(|&i| i64::from(i)).collect::<Vec<_>>(), [1, s]),
                device,
            ),
            pixel_values: Some(Tensor::from_data(
                TensorData::new(e.pixels.clone(), [1, 1, n, 3, t, t]),
                device,
            )),
            aspect_ratio_ids: Some(Tensor::from_data(
                TensorData::new(vec![e.ratio_id as i64], [1, 1]),
                device,
            )),
            aspect_ratio_mask: Some(Tensor::from_data(
                TensorData::new(e.ratio_mask.clone(), [1, 1, n]),
                device,
            )),
            cross_attention_mask: Some(Tensor::from_data(TensorData::new(mask, [1, s, 1, n]), device)),
        }
    }

    /// The class names as the answer's first tokens.
    pub fn class_candidates(&self) -> Result<Vec<Vec<u32>>, MllamaError> {
        CellClass::ALL.iter().map(|c| Ok(self.tok.encode(c.name())?)).collect()
    }
}

/// Class probabilities of a cell: the likelihood of each class name as the answer's start.
pub fn classify(model: &Mllama, p: &Prompting, img: &RgbImage, device: &Device) -> Result<Vec<f32>, MllamaError> {
    Ok(classify_and_describe(model, p, img, 0, device)?.0)
}

/// Class probabilities and, with `description_tokens > 0`, a generated answer (greedy, up to
/// that many tokens, to the end of the message): the question runs once for both.
pub fn classify_and_describe(
    model: &Mllama,
    p: &Prompting,
    img: &RgbImage,
    description_tokens: usize,
    device: &Device,
) -> Result<(Vec<f32>, String), MllamaError> {
    let e = p.encode(img, None)?;
    let candidates = p.class_candidates()?;
    let longest = candidates.iter().map(Vec::len).max().unwrap_or(0);
    let prompted = Prompted::new(model, p.inputs(&e, None, device), longest.max(description_tokens));
    let probs = probabilities(&prompted.score(model, &candidates));
    if description_tokens == 0 {
        return Ok((probs, String::new()));
    }
    let mut stop = p.cfg.text.eos_token_ids.clone();
    stop.push(p.tok.eot_token);
    let tokens = prompted.generate(model, description_tokens, &stop, Sampling::Greedy);
    Ok((probs, p.tok.decode(&tokens)?.trim().to_string()))
}

/// The parts of an mllama bundle.
pub mod parts {
    /// The model's `config.json`.
    pub const CONFIG: &str = "config.json";
    /// `tokenizer.json`.
    pub const TOKENIZER: &str = "tokenizer.json";
    /// `preprocessor_config.json`.
    pub const PREPROCESSOR: &str = "preprocessor_config.json";
    /// The merged, quantized weights.
    pub const WEIGHTS: &str = "model.safetensors";
}

/// Values per scale of the 4-bit weights a bundle's model holds on its device.
pub const RESIDENT_BLOCK: u8 = 32;

/// The model from a bundle's weights part (safetensors, projections in 4 bits): its base stays
/// in 4 bits on `device` ([`RESIDENT_BLOCK`]), built one tensor at a time. The exporter checks
/// its bundle with this same function, so the self-test's probabilities are this model's.
pub fn model_from_weights(cfg: &MllamaConfig, weights: &[u8], device: &Device) -> Result<Mllama, MllamaError> {
    let view = crate::compact::weights::WeightsView::new(weights).map_err(|e| MllamaError::Other(e.to_string()))?;
    Ok(Mllama::from_packed(cfg, &view, device, RESIDENT_BLOCK)?)
}

/// The model and its prompting from a verified bundle of the mllama family.
pub fn from_bundle(bundle: &wbc_protocol::bundle::Bundle, device: &Device) -> Result<(Prompting, Mllama), MllamaError> {
    let part = |n: &str| bundle.part(n).map_err(|e| MllamaError::Other(e.to_string()));
    let config =
        std::str::from_utf8(part(parts::CONFIG)?).map_err(|_| MllamaError::Other("config.json is not text".into()))?;
    let p = Prompting::from_parts(config, part(parts::TOKENIZER)?, Some(part(parts::PREPROCESSOR)?))?;
    let model = model_from_weights(&p.cfg, part(parts::WEIGHTS)?, device)?;
    Ok((p, model))
}

/// Runs the bundle's golden self-test (`selftest.json`: images and their expected class
/// probabilities) on the model; the number of cases checked.
pub fn self_test(
    model: &Mllama,
    p: &Prompting,
    bundle: &wbc_protocol::bundle::Bundle,
    device: &Device,
) -> Result<usize, crate::classify::SelfTestError> {
    use crate::classify::{SELFTEST_PART, SelfTest, SelfTestError};
    let bad = |e: String| SelfTestError::Malformed(e);
    let spec: SelfTest = serde_json::from_slice(bundle.part(SELFTEST_PART).map_err(|e| bad(e.to_string()))?)
        .map_err(|e| bad(e.to_string()))?;
    if spec.cases.is_empty() {
        return Err(bad("no cases".into()));
    }
    for case in &spec.cases {
        let bytes = bundle.part(&case.image).map_err(|e| bad(e.to_string()))?;
        let img = wbc_cells::image::decode_rgb(bytes, &wbc_cells::image::DecodeLimits::default())
            .map_err(|e| bad(format!("{}: {e}", case.image)))?;
        let probs = classify(model, p, &img, device).map_err(|e| bad(e.to_string()))?;
        let diff = case
            .probabilities
            .iter()
            .zip(&probs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        if case.probabilities.len() != probs.len() || diff.is_nan() || diff > spec.tolerance {
            return Err(SelfTestError::Mismatch {
                image: case.image.clone(),
                diff,
                tolerance: spec.tolerance,
            });
        }
    }
    Ok(spec.cases.len())
}
