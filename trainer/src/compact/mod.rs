//! The compact family (4-bit frozen MobileNetV2 + LoRA + class and attribute heads): its
//! training ([`train`], with the site-robustness methods [`adversary`], [`amplitude`] and
//! [`mixstyle`]) and its export to a signed, calibrated bundle ([`export`]).

pub mod adversary;
pub mod amplitude;
pub mod export;
pub mod mixstyle;
pub mod site;
pub mod site_guard;
pub mod site_tune;
pub mod train;
