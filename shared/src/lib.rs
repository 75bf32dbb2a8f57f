//! What the trainer, the appliance and central agree on: the cell classes and their order,
//! morphology attributes and descriptions, image preprocessing, the model families, the signed
//! bundle format, metrics, and the versioned result types that travel between them.
#![deny(missing_docs)]

pub mod attributes;
pub mod auth;
pub mod bundle;
pub mod calibrate;
pub mod cellnorm;
pub mod classes;
pub mod classify;
pub mod compact;
pub mod describe;
pub mod embed;
pub mod finder;
pub mod heap;
pub mod image;
pub mod messages;
pub mod metrics;
pub mod mllama;
#[cfg(feature = "mqtt")]
pub mod mqtt;
pub mod quant;
pub mod signed;
pub mod slide;
pub mod uplink;
pub mod voc;

pub use attributes::{ATTRIBUTES, AttributeSet};

/// Escapes text for HTML element content and quoted attribute values (the appliance's and
/// central's pages).
pub fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}
pub use classes::{CellClass, NUM_CLASSES};
pub use messages::CellResult;

#[cfg(test)]
mod tests {
    #[test]
    fn html_escape_neutralises_markup_and_quotes() {
        assert_eq!(
            super::html_escape(r#"<img src="x" onerror='a&b'>"#),
            "&lt;img src=&quot;x&quot; onerror=&#39;a&amp;b&#39;&gt;"
        );
    }
}
