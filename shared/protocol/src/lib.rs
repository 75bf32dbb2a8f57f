//! What the trainer, the appliance, central and firmware-config agree on: the cell classes and
//! their order, morphology attributes, the versioned result types, the uplink protocol, slides
//! and their flags, signed documents, and the bundle format and its verification.
//!
//! No deep-learning, tokenizer or image-codec dependency: the lab side and the configuration
//! tools build this alone.
#![deny(missing_docs)]

pub mod attributes;
pub mod broker;
pub mod bundle;
pub mod classes;
pub mod clock;
pub mod messages;
#[cfg(feature = "mqtt")]
pub mod mqtt;
pub mod preprocess;
#[cfg(feature = "runtime")]
pub mod shutdown;
pub mod signed;
pub mod slide;
pub mod uplink;

pub use attributes::{ATTRIBUTES, AttributeSet};
pub use classes::{CellClass, NUM_CLASSES};
pub use messages::CellResult;
