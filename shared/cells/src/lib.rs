//! From pictures to cells: bounded image decoding, cell normalisation (find, centre, scale,
//! stain-normalise one white cell), the white-cell finder for whole microscope fields and Pascal
//! VOC boxes. One implementation for the trainer and the appliance; no deep-learning
//! dependency.
#![deny(missing_docs)]

pub mod cellnorm;
pub mod finder;
pub mod image;
pub mod voc;

pub use cellnorm::Normalise;
pub use image::Prepare;
