//! The trainer: dataset ingest, fine-tuning and export per model family (one folder each:
//! [`compact`], [`mllama`]), evaluation with the reference study's tables, and the signed
//! documents of the update path (key lists, rollbacks).

pub mod augment;
pub mod compact;
pub mod dataset;
pub mod device;
pub mod eval;
pub mod mllama;
pub mod plot;
pub mod sign;
