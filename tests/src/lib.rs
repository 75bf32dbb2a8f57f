//! Cross-crate integration tests live in `tests/tests/`; this library holds what they share:
//! a real Mosquitto broker with TLS, passwords and per-clinic ACLs, started on a free loopback
//! port, and synthetic results for the store and uplink tests.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use wbc_protocol::messages::{CellRecord, CellResult, FieldHeader, FieldRecord, SCHEMA_VERSION};
use wbc_protocol::mqtt::BrokerConfig;

/// The mosquitto binary: on `PATH` or where Debian puts it.
fn mosquitto() -> Result<PathBuf> {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/usr/local/sbin"])
    {
        let p = Path::new(dir).join("mosquitto");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("mosquitto is not installed (Debian: apt-get install mosquitto); the MQTT tests need a real broker")
}

/// A device account on the broker.
#[derive(Debug, Clone)]
pub struct Account {
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
    /// ACL lines that follow `user <name>`.
    pub acl: Vec<String>,
}

impl Account {
    /// A device that may write only under its own clinic and device topics.
    pub fn device(clinic: &str, device: &str) -> Self {
        Account {
            user: wbc_protocol::uplink::device_identity(clinic, device),
            password: format!("pw-{clinic}-{device}"),
            acl: vec![
                format!("topic write wbc/{clinic}/{device}/#"),
                format!("topic read wbc-update/{clinic}"),
                format!("topic read wbc-update/{clinic}/{device}"),
                format!("topic read wbc-receipt/{clinic}/{device}"),
            ],
        }
    }

    /// Central: reads every clinic.
    pub fn central() -> Self {
        Account {
            user: "central".into(),
            password: "pw-central".into(),
            acl: vec![
                "topic read wbc/#".into(),
                "topic write wbc-update/#".into(),
                "topic write wbc-receipt/#".into(),
            ],
        }
    }
}

/// A Mosquitto broker in a temporary folder, listening with TLS on two loopback ports: one
/// where devices log in with a password, one where they present a client certificate (its
/// common name is their user name). Killed when dropped.
pub struct Broker {
    dir: tempfile::TempDir,
    /// The port for password logins.
    pub port: u16,
    /// The port for client-certificate logins.
    pub cert_port: u16,
    child: Option<Child>,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Writes the CA, the broker's certificate, and a client certificate for each account (its
/// common name is the account's user name).
fn write_certs(dir: &Path, accounts: &[Account]) -> Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "wbc test CA");
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let mut server = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    server.distinguished_name.push(DnType::CommonName, "localhost");
    let cert = server.signed_by(&key, &issuer)?;
    std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
    std::fs::write(dir.join("server.pem"), cert.pem())?;
    std::fs::write(dir.join("server.key"), key.serialize_pem())?;
    for a in accounts {
        let key = KeyPair::generate()?;
        let mut client = CertificateParams::new(Vec::<String>::new())?;
        client.distinguished_name.push(DnType::CommonName, a.user.as_str());
        let cert = client.signed_by(&key, &issuer)?;
        std::fs::write(dir.join(format!("{}.pem", a.user)), cert.pem())?;
        std::fs::write(dir.join(format!("{}.key", a.user)), key.serialize_pem())?;
    }
    Ok(())
}

impl Broker {
    /// Starts a broker with these accounts.
    pub fn start(accounts: &[Account]) -> Result<Self> {
        Self::start_with(accounts, "", "")
    }

    /// Starts a broker with these accounts plus raw password-file and ACL lines (as
    /// `firmware-config provision` writes them).
    pub fn start_with(accounts: &[Account], passwd_lines: &str, acl_lines: &str) -> Result<Self> {
        Self::start_full(accounts, passwd_lines, acl_lines, 1)
    }

    /// Starts a broker with these accounts that saves its state only every `autosave_s`
    /// seconds (and when stopped): a crash loses what it took since.
    pub fn start_saving_every(accounts: &[Account], autosave_s: u32) -> Result<Self> {
        Self::start_full(accounts, "", "", autosave_s)
    }

    fn start_full(accounts: &[Account], passwd_lines: &str, acl_lines: &str, autosave_s: u32) -> Result<Self> {
        let bin = mosquitto()?;
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        write_certs(d, accounts)?;
        let mut acl = format!("{acl_lines}\n");
        let passwd = d.join("passwd");
        std::fs::write(&passwd, passwd_lines)?;
        for a in accounts {
            let st = Command::new(bin.with_file_name("mosquitto_passwd"))
                .arg("-b")
                .arg(&passwd)
                .arg(&a.user)
                .arg(&a.password)
                .status();
            let st = match st {
                Ok(s) => s,
                // Debian puts mosquitto_passwd in /usr/bin.
                Err(_) => Command::new("mosquitto_passwd")
                    .arg("-b")
                    .arg(&passwd)
                    .arg(&a.user)
                    .arg(&a.password)
                    .status()
                    .context("running mosquitto_passwd")?,
            };
            if !st.success() {
                bail!("mosquitto_passwd failed for {}", a.user);
            }
            acl.push_str(&format!("user {}\n{}\n\n", a.user, a.acl.join("\n")));
        }
        std::fs::write(d.join("acl"), acl)?;
        let (port, cert_port) = (free_port()?, free_port()?);
        std::fs::write(
            d.join("mosquitto.conf"),
            format!(
                "per_listener_settings false\nallow_anonymous false\npassword_file {p}/passwd\nacl_file {p}/acl\n\
                 persistence true\npersistence_location {p}/\nautosave_interval {autosave_s}\nmax_queued_messages 0\nmax_packet_size 263168\n\
                 user root\nlog_dest file {p}/mosquitto.log\n\
                 listener {port} 127.0.0.1\ncafile {p}/ca.pem\ncertfile {p}/server.pem\nkeyfile {p}/server.key\n\
                 listener {cert_port} 127.0.0.1\ncafile {p}/ca.pem\ncertfile {p}/server.pem\nkeyfile {p}/server.key\n\
                 require_certificate true\nuse_identity_as_username true\n",
                p = d.display()
            ),
        )?;
        let mut b = Broker {
            dir,
            port,
            cert_port,
            child: None,
        };
        b.resume()?;
        Ok(b)
    }

    /// (Re)starts the broker process on the same port, with its saved state.
    pub fn resume(&mut self) -> Result<()> {
        let child = Command::new(mosquitto()?)
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting mosquitto")?;
        self.child = Some(child);
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err()
            || std::net::TcpStream::connect(("127.0.0.1", self.cert_port)).is_err()
        {
            if t.elapsed() > Duration::from_secs(15) {
                bail!("mosquitto did not start listening: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Stops the broker as an administrator would (SIGTERM: it saves its state and exits).
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            Command::new("kill").arg("-TERM").arg(c.id().to_string()).status()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Kills the broker as a crash or a power cut would (SIGKILL: it saves nothing).
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// The CA that signed the broker's certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Connection settings for an account (its password written to a file).
    pub fn config_for(&self, a: &Account) -> Result<BrokerConfig> {
        let pw = self.dir.path().join(format!("{}.password", a.user));
        std::fs::write(&pw, format!("{}\n", a.password))?;
        Ok(BrokerConfig {
            host: "localhost".into(),
            port: Some(self.port),
            ca_file: Some(self.ca()),
            username: Some(a.user.clone()),
            password_file: Some(pw),
            ..Default::default()
        })
    }
}

impl Broker {
    /// The broker's certificate and key (for `localhost`, signed by [`Broker::ca`]): the lab's
    /// download server uses them too.
    pub fn server_identity(&self) -> (PathBuf, PathBuf) {
        (self.dir.path().join("server.pem"), self.dir.path().join("server.key"))
    }

    /// Connection settings for an account that logs in with its client certificate.
    pub fn cert_config_for(&self, a: &Account) -> BrokerConfig {
        BrokerConfig {
            host: "localhost".into(),
            port: Some(self.cert_port),
            ca_file: Some(self.ca()),
            client_cert: Some(self.dir.path().join(format!("{}.pem", a.user))),
            client_key: Some(self.dir.path().join(format!("{}.key", a.user))),
            ..Default::default()
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A synthetic field number `k`: id `f<k>`, in slide `slide-<k / per_slide>`, with `1 + k % 3`
/// cells of classes that depend on `k` — so that a test can check any field's content from its
/// number alone.
pub fn synthetic_field(k: u64, per_slide: u64) -> FieldRecord {
    let cells = (0..1 + k % 3)
        .map(|i| {
            let mut p = [0.01f32; 6];
            p[((k + i) % 5) as usize] = 0.95;
            CellRecord {
                result: CellResult::from_probabilities(
                    &p,
                    &Default::default(),
                    format!("cell {i} of field {k}"),
                    0.5,
                    1,
                ),
                review: None,
            }
        })
        .collect();
    FieldRecord {
        schema_version: SCHEMA_VERSION,
        header: FieldHeader {
            id: format!("f{k}"),
            slide_id: synthetic_slide(k, per_slide),
            received_at: 1_700_000_000 + k,
            source: "test".into(),
            name: format!("field-{k}.jpg"),
            image_sha256: format!("{k:064x}"),
            width: 640,
            height: 480,
            single_cell: false,
            microns_per_pixel: 0.07,
        },
        cells,
    }
}

/// Opens (creating) an appliance store for a test or benchmark: no free-space floor.
pub fn open_store(dir: &Path, clinic: &str, device: &str) -> Result<std::sync::Arc<appliance::store::Store>> {
    Ok(std::sync::Arc::new(appliance::store::Store::open(
        dir,
        appliance::store::Identity {
            clinic: clinic.into(),
            device: device.into(),
        },
        appliance::store::Retention {
            min_free_bytes: 0,
            ..Default::default()
        },
    )?))
}

/// The slide of synthetic field `k`.
pub fn synthetic_slide(k: u64, per_slide: u64) -> String {
    format!("slide-{}", k / per_slide)
}

/// The lab's download server: HTTPS on a loopback port, serving files from memory with HTTP
/// range requests, and able to cut its first transfer short (a lost connection). It records
/// the `Range` header of every request.
pub struct FileServer {
    /// The port.
    pub port: u16,
    ranges: std::sync::Arc<std::sync::Mutex<Vec<Option<String>>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FileServer {
    /// Serves `files` (name to bytes) with the certificate and key (PEM files); the first
    /// response stops after `cut_first_after` bytes of body when set.
    pub fn start(
        identity: (&Path, &Path),
        files: std::collections::HashMap<String, Vec<u8>>,
        cut_first_after: Option<usize>,
    ) -> Result<Self> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let chain = CertificateDer::pem_file_iter(identity.0)?.collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(identity.1)?;
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(chain, key)?,
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let ranges: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (r, st) = (ranges.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut cut = cut_first_after;
            for sock in listener.incoming() {
                if st.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(sock) = sock else { continue };
                let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
                    continue;
                };
                let mut tls = rustls::StreamOwned::new(conn, sock);
                let _ = serve_one(&mut tls, &files, &r, cut.take());
            }
        });
        Ok(FileServer { port, ranges, stop })
    }

    /// The address of a file.
    pub fn url(&self, name: &str) -> String {
        format!("https://localhost:{}/{name}", self.port)
    }

    /// The `Range` header of each request so far.
    pub fn ranges(&self) -> Vec<Option<String>> {
        self.ranges.lock().expect("ranges").clone()
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve_one(
    tls: &mut rustls::StreamOwned<rustls::ServerConnection, std::net::TcpStream>,
    files: &std::collections::HashMap<String, Vec<u8>>,
    ranges: &std::sync::Mutex<Vec<Option<String>>>,
    cut: Option<usize>,
) -> Result<()> {
    use std::io::{BufRead, Write};
    let mut reader = std::io::BufReader::new(&mut *tls);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("range")
        {
            range = Some(v.trim().to_string());
        }
    }
    drop(reader);
    ranges.lock().expect("ranges").push(range.clone());
    let path = request.split_whitespace().nth(1).unwrap_or("/").trim_start_matches('/');
    let Some(body) = files.get(path) else {
        write!(
            tls,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        tls.flush()?;
        return Ok(());
    };
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|&n| n < body.len());
    let (status, from) = match start {
        Some(n) => ("206 Partial Content", n),
        None => ("200 OK", 0),
    };
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len() - from
    );
    if start.is_some() {
        head += &format!("Content-Range: bytes {from}-{}/{}\r\n", body.len() - 1, body.len());
    }
    tls.write_all(format!("{head}\r\n").as_bytes())?;
    let end = cut.map_or(body.len(), |c| (from + c).min(body.len()));
    tls.write_all(&body[from..end])?;
    tls.flush()?;
    if cut.is_some() {
        // The connection drops: no TLS close, no more bytes.
        tls.sock.shutdown(std::net::Shutdown::Both)?;
    } else {
        tls.conn.send_close_notify();
        tls.flush()?;
    }
    Ok(())
}
