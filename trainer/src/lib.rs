//! The trainer: dataset ingest, QLoRA fine-tuning of the compact model, evaluation with the
//! reference study's tables, export of signed bundles, and the
//! signed documents of the update path (key lists, rollbacks).

pub mod adversary;
pub mod amplitude;
pub mod augment;
pub mod dataset;
pub mod eval;
pub mod export;
pub mod mixstyle;
pub mod mllama;
pub mod plot;
pub mod sign;
pub mod train;
