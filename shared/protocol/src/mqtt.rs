//! How the appliance and central connect to the MQTT broker: address, TLS with the lab's CA,
//! and per-device credentials (a password read from a file or the environment, or a client
//! certificate). Built with the `mqtt` feature; the settings themselves are in
//! [`crate::broker`], which needs no MQTT client.

pub use crate::broker::{BrokerConfig, BrokerError, PASSWORD_ENV};
use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

fn read(path: &Path, what: &str) -> Result<Vec<u8>, BrokerError> {
    std::fs::read(path).map_err(|e| BrokerError(format!("reading the {what} {}: {e}", path.display())))
}

impl BrokerConfig {
    fn password(&self) -> Result<Option<String>, BrokerError> {
        if let Some(p) = &self.password_file {
            let text = read(p, "password file")?;
            let text = String::from_utf8(text).map_err(|_| BrokerError(format!("{} is not text", p.display())))?;
            return Ok(Some(text.lines().next().unwrap_or("").to_string()));
        }
        Ok(std::env::var(PASSWORD_ENV).ok())
    }

    fn tls(&self, ca: &Path) -> Result<TlsConfiguration, BrokerError> {
        let client = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            _ => None,
        };
        Ok(TlsConfiguration::Rustls(client_tls(Some(ca), client)?))
    }

    /// Connection options for `client_id`: TLS when a CA is configured, credentials, keep
    /// alive, packet size limit of [`crate::uplink::MAX_PAYLOAD_BYTES`] plus headers.
    pub fn options(&self, client_id: &str) -> Result<MqttOptions, BrokerError> {
        self.validate()?;
        let mut o = MqttOptions::new(client_id, &self.host, self.port());
        o.set_keep_alive(Duration::from_secs(self.keep_alive_s));
        let limit = crate::uplink::MAX_PAYLOAD_BYTES + 1024;
        o.set_max_packet_size(limit, limit);
        if let Some(u) = &self.username {
            o.set_credentials(u, self.password()?.unwrap_or_default());
        }
        if let Some(ca) = &self.ca_file {
            o.set_transport(Transport::Tls(self.tls(ca)?));
        }
        Ok(o)
    }
}

/// A TLS client configuration (rustls, ring provider) that trusts the certificates in `ca`
/// (PEM), or the public web roots without one, and presents `client` (certificate chain and key,
/// PEM files) when given. Used for the broker and for HTTPS downloads of model updates.
pub fn client_tls(ca: Option<&Path>, client: Option<(&Path, &Path)>) -> Result<Arc<rustls::ClientConfig>, BrokerError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(ca) => {
            let pem = read(ca, "CA certificate")?;
            for c in CertificateDer::pem_slice_iter(&pem) {
                let c = c.map_err(|e| BrokerError(format!("{}: {e}", ca.display())))?;
                roots
                    .add(c)
                    .map_err(|e| BrokerError(format!("{}: {e}", ca.display())))?;
            }
            if roots.is_empty() {
                return Err(BrokerError(format!("{} holds no certificate", ca.display())));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| BrokerError(e.to_string()))?
        .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => {
            let pem = read(cert, "client certificate")?;
            let chain = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| BrokerError(format!("{}: {e}", cert.display())))?;
            let key_pem = read(key, "client key")?;
            let key_der =
                PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| BrokerError(format!("{}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| BrokerError(format!("client certificate: {e}")))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Polls an MQTT event loop on its own task and hands its events over a channel, so that the
/// loop is never cancelled half-way through writing a packet (`EventLoop::poll` is not safe to
/// drop in a `select!`). The channel ends after the first error, which it carries. Dropping
/// the receiver stops the task.
pub fn drive(
    mut events: rumqttc::EventLoop,
) -> tokio::sync::mpsc::Receiver<Result<rumqttc::Event, rumqttc::ConnectionError>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let ev = events.poll().await;
            let failed = ev.is_err();
            if tx.send(ev).await.is_err() || failed {
                return;
            }
        }
    });
    rx
}

/// Waits before the next connection attempt: doubling from one second up to `max`, with
/// jitter so that many devices coming back after an outage do not all knock at once.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at one second.
    pub fn new(max: Duration) -> Self {
        Backoff {
            next: Duration::from_secs(1).min(max),
            max,
        }
    }

    /// After a successful connection.
    pub fn reset(&mut self) {
        self.next = Duration::from_secs(1).min(self.max);
    }

    /// The wait before the next attempt (and doubles the one after).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = rand::random::<f64>() * 0.25;
        d.mul_f64(1.0 - jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_that_cannot_work_are_refused_with_the_reason() {
        let ok = BrokerConfig::default();
        ok.validate().unwrap();
        assert_eq!(ok.port(), 1883);
        let tls = BrokerConfig {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        assert_eq!(tls.port(), 8883);
        let e = tls.options("x").unwrap_err().to_string();
        assert!(e.contains("CA certificate") && e.contains("ca.pem"), "{e}");
        for bad in [
            BrokerConfig {
                host: String::new(),
                ..Default::default()
            },
            BrokerConfig {
                client_cert: Some("c".into()),
                ..Default::default()
            },
            BrokerConfig {
                password_file: Some("p".into()),
                ..Default::default()
            },
            BrokerConfig {
                keep_alive_s: 0,
                ..Default::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_file_that_is_not_a_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        std::fs::write(&p, "hello").unwrap();
        let c = BrokerConfig {
            ca_file: Some(p),
            ..Default::default()
        };
        assert!(c.options("x").unwrap_err().to_string().contains("no certificate"));
    }

    #[test]
    fn backoff_grows_to_its_ceiling_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(8));
        let d: Vec<_> = (0..6).map(|_| b.next_delay()).collect();
        assert!(d[0] <= Duration::from_secs(1) && d[0] >= Duration::from_millis(750));
        assert!(d[5] <= Duration::from_secs(8) && d[5] >= Duration::from_secs(6));
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
    }
}
