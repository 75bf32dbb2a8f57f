//! The trainer: dataset ingest, QLoRA fine-tuning of the compact model, evaluation with the
//! reference study's tables, and export of signed bundles.

pub mod augment;
pub mod dataset;
pub mod eval;
pub mod export;
pub mod plot;
pub mod train;
