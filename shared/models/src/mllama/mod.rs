//! Llama 3.2 Vision (`mllama`), the reference study's model family, in burn: configuration,
//! Hugging Face checkpoints, the forward pass, and the parity check against transformers'
//! reference outputs (`trainer check-hf`, the parity tests).

pub mod cell;
pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod frozen;
pub mod generate;
pub mod model;
pub mod processor;
pub mod q4;
pub mod rowvec;
pub mod synthetic;

// The parts of `model` (split as candle and mistral.rs split mllama); their public items are
// re-exported from `model` under the paths they had when `model.rs` held them all.
mod layers;
mod loading;
mod lora;
mod text;
mod vision;

pub use checkpoint::{Checkpoint, CheckpointError};
pub use config::{ConfigError, MllamaConfig};
pub use generate::{Prompted, Sampling, generate, probabilities, score};
pub use model::{Cache, Inputs, LoraConfig, LoraTargets, Mllama};
pub use processor::{ImageProcessor, Processed};
pub use synthetic::write_synthetic_checkpoint;

use burn::tensor::{Device, Int, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};
use std::path::Path;

/// Why a model, its tokenizer or its inputs could not be used.
#[derive(Debug, thiserror::Error)]
pub enum MllamaError {
    /// The configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The weights.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The tokenizer.
    #[error(transparent)]
    Chat(#[from] chat::ChatError),
    /// A reference file (transformers' inputs and outputs) that cannot be used.
    #[error("reference file: {0}")]
    Reference(String),
    /// Anything else, in words.
    #[error("{0}")]
    Other(String),
}

/// Tensors of a reference file (safetensors), by name.
pub struct Reference {
    bytes: Vec<u8>,
}

/// A reference tensor: its shape and values.
pub struct RefTensor<T> {
    /// Shape.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub values: Vec<T>,
}

impl Reference {
    /// Reads a safetensors file.
    pub fn open(path: &Path) -> Result<Self, MllamaError> {
        let bytes = std::fs::read(path).map_err(|e| MllamaError::Reference(format!("{}: {e}", path.display())))?;
        SafeTensors::deserialize(&bytes).map_err(|e| MllamaError::Reference(format!("{}: {e}", path.display())))?;
        Ok(Reference { bytes })
    }

    fn view(&self, name: &str) -> Result<(Dtype, Vec<usize>, Vec<u8>), MllamaError> {
        let st = SafeTensors::deserialize(&self.bytes).map_err(|e| MllamaError::Reference(e.to_string()))?;
        let v = st
            .tensor(name)
            .map_err(|_| MllamaError::Reference(format!("no tensor {name:?}")))?;
        Ok((v.dtype(), v.shape().to_vec(), v.data().to_vec()))
    }

    /// Whether the file has `name`.
    pub fn has(&self, name: &str) -> bool {
        SafeTensors::deserialize(&self.bytes).is_ok_and(|st| st.tensor(name).is_ok())
    }

    /// A float tensor (F32).
    pub fn floats(&self, name: &str) -> Result<RefTensor<f32>, MllamaError> {
        match self.view(name)? {
            (Dtype::F32, shape, data) => Ok(RefTensor {
                shape,
                values: data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            }),
            (d, ..) => Err(MllamaError::Reference(format!("{name} is {d:?}, expected F32"))),
        }
    }

    /// An integer tensor (I64 or I32).
    pub fn ints(&self, name: &str) -> Result<RefTensor<i64>, MllamaError> {
        match self.view(name)? {
            (Dtype::I64, shape, data) => Ok(RefTensor {
                shape,
                values: data
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                    .collect(),
            }),
            (Dtype::I32, shape, data) => Ok(RefTensor {
                shape,
                values: data
                    .chunks_exact(4)
                    .map(|b| i64::from(i32::from_le_bytes(b.try_into().expect("4 bytes"))))
                    .collect(),
            }),
            (d, ..) => Err(MllamaError::Reference(format!("{name} is {d:?}, expected I64"))),
        }
    }
}

fn dims<const D: usize>(name: &str, shape: &[usize]) -> Result<[usize; D], MllamaError> {
    shape
        .try_into()
        .map_err(|_| MllamaError::Reference(format!("{name} has shape {shape:?}, expected {D} dimensions")))
}

/// How far our output is from the reference: the largest absolute difference, and that over
/// the reference's largest magnitude.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Difference {
    /// Largest absolute difference.
    pub max_abs: f32,
    /// `max_abs / max |reference|`.
    pub relative: f32,
}

impl Difference {
    /// Compares two equally long slices.
    pub fn of(ours: &[f32], reference: &[f32]) -> Self {
        assert_eq!(ours.len(), reference.len(), "compared outputs differ in size");
        let max_abs = ours
            .iter()
            .zip(reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, |m, d| if d.is_nan() { f32::NAN } else { m.max(d) });
        let scale = reference
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()))
            .max(f32::MIN_POSITIVE);
        Difference {
            max_abs,
            relative: max_abs / scale,
        }
    }
}

/// The result of a parity check.
#[derive(Debug, Clone, PartialEq)]
pub struct Parity {
    /// Logits against the reference's `logits`.
    pub logits: Difference,
    /// The vision encoder's output against `vision_output`, when the file has it.
    pub vision: Option<Difference>,
    /// Parameters of the model loaded.
    pub parameters: u64,
}

/// The model inputs stored in a reference file: `input_ids`, and, when it has images,
/// `pixel_values`, `aspect_ratio_ids`, `aspect_ratio_mask` and `cross_attention_mask`, shaped as
/// transformers takes them (masks may be integers or floats).
pub fn reference_inputs(r: &Reference, device: &Device) -> Result<Inputs, MllamaError> {
    let ids = r.ints("input_ids")?;
    let [b, s] = dims::<2>("input_ids", &ids.shape)?;
    let input_ids = Tensor::<2, Int>::from_data(TensorData::new(ids.values, [b, s]), device);
    let float = |name: &str| -> Result<(Vec<usize>, Vec<f32>), MllamaError> {
        if let Ok(f) = r.floats(name) {
            return Ok((f.shape, f.values));
        }
        let i = r.ints(name)?;
        Ok((i.shape, i.values.into_iter().map(|v| v as f32).collect()))
    };
    if !r.has("pixel_values") {
        return Ok(Inputs {
            input_ids,
            pixel_values: None,
            aspect_ratio_ids: None,
            aspect_ratio_mask: None,
            cross_attention_mask: None,
        });
    }
    let (ps, pv) = float("pixel_values")?;
    let ids = r.ints("aspect_ratio_ids")?;
    let (ms, mv) = float("aspect_ratio_mask")?;
    let (cs, cv) = float("cross_attention_mask")?;
    Ok(Inputs {
        input_ids,
        pixel_values: Some(Tensor::from_data(
            TensorData::new(pv, dims::<6>("pixel_values", &ps)?),
            device,
        )),
        aspect_ratio_ids: Some(Tensor::from_data(
            TensorData::new(ids.values, dims::<2>("aspect_ratio_ids", &ids.shape)?),
            device,
        )),
        aspect_ratio_mask: Some(Tensor::from_data(
            TensorData::new(mv, dims::<3>("aspect_ratio_mask", &ms)?),
            device,
        )),
        cross_attention_mask: Some(Tensor::from_data(
            TensorData::new(cv, dims::<4>("cross_attention_mask", &cs)?),
            device,
        )),
    })
}

/// Loads the checkpoint in `model_dir`, runs the forward pass on the inputs in the reference
/// file `io` (`input_ids`, `pixel_values`, `aspect_ratio_ids`, `aspect_ratio_mask`,
/// `cross_attention_mask`, shaped as transformers takes them) and compares with its `logits`
/// (and `vision_output` when present).
pub fn check_parity(model_dir: &Path, io: &Path, device: &Device) -> Result<Parity, MllamaError> {
    let cfg = MllamaConfig::load(model_dir)?;
    let ck = Checkpoint::open(model_dir)?;
    let model = Mllama::load(&cfg, &ck, device)?;
    drop(ck);
    let r = Reference::open(io)?;
    let inputs = reference_inputs(&r, device)?;
    let compare = |name: &str, got: Vec<usize>, values: Vec<f32>| -> Result<Difference, MllamaError> {
        let want = r.floats(name)?;
        if got != want.shape {
            return Err(MllamaError::Reference(format!(
                "{name} has shape {:?}, the model gives {got:?}",
                want.shape
            )));
        }
        Ok(Difference::of(&values, &want.values))
    };
    let vision = match (
        &inputs.pixel_values,
        &inputs.aspect_ratio_ids,
        &inputs.aspect_ratio_mask,
    ) {
        (Some(px), Some(ids), Some(mask)) if r.has("vision_output") => {
            let got = model.vision_model.forward(px.clone(), ids.clone(), mask.clone());
            let dims = got.dims().to_vec();
            Some(compare(
                "vision_output",
                dims,
                got.into_data().try_to_vec::<f32>().expect("f32"),
            )?)
        }
        _ => None,
    };
    let logits = model.forward(inputs);
    let dims = logits.dims().to_vec();
    Ok(Parity {
        logits: compare("logits", dims, logits.into_data().try_to_vec::<f32>().expect("f32"))?,
        vision,
        parameters: cfg.parameter_count().total,
    })
}
