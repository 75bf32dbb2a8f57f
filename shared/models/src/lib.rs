//! The model families as burn modules and what runs them: the compact model (4-bit
//! MobileNetV2 + LoRA + heads), Llama 3.2 Vision (mllama), the all-MiniLM-L6-v2 sentence
//! embedder, 4-bit formats, calibration and familiarity, the reference study's metrics, the
//! descriptions rendered from attributes, and the [`classify::Classifier`] both families sit
//! behind.
#![deny(missing_docs)]

pub mod adapt;
pub mod calibrate;
pub mod classify;
pub mod compact;
pub mod describe;
pub mod embed;
pub mod heap;
pub mod metrics;
pub mod mllama;
pub mod prediction;
pub mod quant;
