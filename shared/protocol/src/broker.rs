//! A broker and how to log in to it: the settings the appliance's `[uplink.broker]` and
//! central's `[broker]` share, and their checks. Connecting is in `mqtt` (feature `mqtt`).

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Environment variable that may hold the MQTT password instead of `password_file`.
pub const PASSWORD_ENV: &str = "WBC_MQTT_PASSWORD";

/// A broker and how to log in to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Host name or address of the broker.
    pub host: String,
    /// Port; default 8883 with TLS, 1883 without.
    pub port: Option<u16>,
    /// CA certificate (PEM) that signed the broker's certificate. Set: TLS; unset: plain TCP
    /// (only for a broker on the same machine).
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), for brokers that authenticate devices by certificate.
    pub client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub client_key: Option<PathBuf>,
    /// User name.
    pub username: Option<String>,
    /// File holding the password (first line). Without it, the password is taken from the
    /// `WBC_MQTT_PASSWORD` environment variable.
    pub password_file: Option<PathBuf>,
    /// Keep-alive interval, seconds.
    pub keep_alive_s: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            host: "localhost".into(),
            port: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            username: None,
            password_file: None,
            keep_alive_s: 30,
        }
    }
}

/// A broker configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BrokerError(pub(crate) String);

impl BrokerConfig {
    /// The port in use.
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(if self.ca_file.is_some() { 8883 } else { 1883 })
    }

    /// Checks what can be checked without connecting.
    pub fn validate(&self) -> Result<(), BrokerError> {
        if self.host.is_empty() {
            return Err(BrokerError("the broker host is empty".into()));
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err(BrokerError("client_cert and client_key go together".into()));
        }
        if self.client_cert.is_some() && self.ca_file.is_none() {
            return Err(BrokerError("a client certificate needs TLS: set ca_file".into()));
        }
        if self.password_file.is_some() && self.username.is_none() {
            return Err(BrokerError("password_file needs a username".into()));
        }
        if !(5..=3600).contains(&self.keep_alive_s) {
            return Err(BrokerError("keep_alive_s must be between 5 and 3600".into()));
        }
        Ok(())
    }
}
