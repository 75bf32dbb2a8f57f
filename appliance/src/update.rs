//! Where updates come from: a USB stick (the configured folder, where the udev rule from
//! `firmware-config provision` mounts a stick labelled `WBC-UPDATE`) and the network (central's
//! retained announcements, heard by the uplink, and an HTTPS download that resumes where it
//! stopped). Everything found is handed to the model store ([`crate::models`]), which alone
//! decides whether a bundle becomes active.
//!
//! On the stick, at the top level: `*.bundle` files, `*.keys.json` signed key lists (applied
//! first) and `*.rollback.json` signed rollback instructions (for a bundle on the stick, or a
//! model still on the device). A file is looked at once its size and time have stayed the same
//! for one poll (it is not being copied any more).

use crate::app::{App, ModelStore};
use crate::models::Outcome;
use anyhow::{Context, Result, bail};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime};
use wbc_protocol::shutdown::Shutdown;
use wbc_protocol::signed::{Announcement, MAX_DOCUMENT_BYTES, SignedDoc};
use wbc_protocol::uplink::ModelEvent;

pub use wbc_config::UpdateConfig;

/// Why a download did not give a bundle file.
#[derive(Debug)]
pub enum DownloadError {
    /// Worth trying again later (network, server error); what was received is kept.
    Transient(anyhow::Error),
    /// The file offered is not the one announced.
    Refused(String),
}

impl std::fmt::Display for DownloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DownloadError::Transient(e) => write!(f, "{e:#}"),
            DownloadError::Refused(r) => f.write_str(r),
        }
    }
}

/// Downloads announced bundles over HTTPS into a folder, resuming partial downloads.
pub struct Downloader {
    agent: ureq::Agent,
    dir: PathBuf,
}

impl Downloader {
    /// Downloads into `dir`, trusting `ca` (PEM) or the public web roots.
    pub fn new(dir: &Path, ca: Option<&Path>, timeout: Duration) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tls = wbc_protocol::mqtt::client_tls(ca, None)?;
        let agent = ureq::AgentBuilder::new()
            .tls_config(tls)
            .https_only(true)
            .timeout_connect(timeout)
            .timeout_read(timeout)
            .build();
        Ok(Downloader {
            agent,
            dir: dir.to_path_buf(),
        })
    }

    /// The bundle file of `a`: fetched (continuing a partial download with an HTTP range
    /// request), at most `a.size` bytes, its sha256 checked. A transient failure keeps what
    /// was received for the next attempt.
    pub fn fetch(&self, a: &Announcement) -> Result<PathBuf, DownloadError> {
        let t = |e: anyhow::Error| DownloadError::Transient(e);
        let done = self.dir.join(format!("{}.bundle", a.sha256));
        if done.exists() {
            return Ok(done);
        }
        let part = self.dir.join(format!("{}.part", a.sha256));
        let mut have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        if have > a.size {
            have = 0;
        }
        let mut req = self.agent.get(&a.url);
        if have > 0 {
            req = req.set("Range", &format!("bytes={have}-"));
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(code, _)) if (400..500).contains(&code) && code != 408 && code != 429 => {
                return Err(DownloadError::Refused(format!(
                    "the server answered {code} for {}",
                    a.url
                )));
            }
            Err(e) => return Err(t(anyhow::Error::new(e).context(format!("requesting {}", a.url)))),
        };
        let start = match resp.status() {
            206 if resp
                .header("Content-Range")
                .is_some_and(|r| r.starts_with(&format!("bytes {have}-"))) =>
            {
                have
            }
            200 => 0,
            s => return Err(t(anyhow::anyhow!("unexpected answer {s} from {}", a.url))),
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(start > 0)
            .write(true)
            .truncate(start == 0)
            .open(&part)
            .map_err(|e| t(e.into()))?;
        // One byte more than announced tells a server that sends too much.
        let mut body = resp.into_reader().take(a.size - start + 1);
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = start;
        let copied: std::io::Result<()> = (|| {
            loop {
                let n = body.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                total += n as u64;
                if total > a.size {
                    return Ok(());
                }
                file.write_all(&buf[..n])?;
            }
        })();
        file.sync_all().map_err(|e| t(e.into()))?;
        drop(file);
        if total > a.size {
            let _ = std::fs::remove_file(&part);
            return Err(DownloadError::Refused(format!(
                "the server sent more than the announced {} bytes",
                a.size
            )));
        }
        if let Err(e) = copied {
            return Err(t(anyhow::Error::new(e).context(format!(
                "download interrupted at {total} of {} bytes (will resume)",
                a.size
            ))));
        }
        if total < a.size {
            return Err(t(anyhow::anyhow!(
                "download ended at {total} of {} bytes (will resume)",
                a.size
            )));
        }
        let (sha, _) = wbc_protocol::bundle::file_sha256(&part).map_err(|e| t(e.into()))?;
        if sha != a.sha256 {
            let _ = std::fs::remove_file(&part);
            return Err(DownloadError::Refused(format!(
                "the downloaded file's sha256 {sha} is not the announced {}",
                a.sha256
            )));
        }
        std::fs::rename(&part, &done).map_err(|e| t(e.into()))?;
        Ok(done)
    }
}

/// Each file with what became of it.
pub type Applied = Vec<(PathBuf, Outcome<Arc<wbc_models::classify::Classifier>>)>;

/// Applies update files (a USB stick's, or given to `appliance update`): signed key lists
/// (`*.keys.json`) first, then bundles (`*.bundle`, with the signed rollback instructions
/// `*.rollback.json` among the files), then — when no bundle became active — the rollback
/// instructions that name a model still on the device. Outcomes in that order; the last
/// `Active` one is the model to run.
pub fn apply_files(models: &ModelStore, files: &[PathBuf], source: impl Fn(&Path) -> String) -> Applied {
    let read_doc = |p: &Path| -> Result<SignedDoc> {
        let len = std::fs::metadata(p)?.len();
        if len > MAX_DOCUMENT_BYTES as u64 {
            bail!("{len} bytes is too large for a signed document");
        }
        Ok(SignedDoc::parse(&std::fs::read(p)?)?)
    };
    let ends = |p: &Path, s: &str| p.to_string_lossy().ends_with(s);
    let mut out = Vec::new();
    let refused = |p: &Path, e: anyhow::Error, out: &mut Applied| {
        let reason = format!("{}: {e:#}", source(p));
        models.note(ModelEvent::Rejected, models.active_version(), reason.clone());
        out.push((p.to_path_buf(), Outcome::Rejected(reason)));
    };
    for p in files.iter().filter(|p| ends(p, ".keys.json")) {
        match read_doc(p) {
            Ok(d) => {
                let o = match models.apply_keys(&d, &source(p)) {
                    Outcome::Active(()) => Outcome::Skipped("key list applied".into()),
                    Outcome::Skipped(s) => Outcome::Skipped(s),
                    Outcome::Rejected(r) => Outcome::Rejected(r),
                };
                out.push((p.clone(), o));
            }
            Err(e) => refused(p, e, &mut out),
        }
    }
    let mut rollbacks = Vec::new();
    for p in files.iter().filter(|p| ends(p, ".rollback.json")) {
        match read_doc(p) {
            Ok(d) => rollbacks.push((p, d)),
            Err(e) => refused(p, e, &mut out),
        }
    }
    let docs: Vec<SignedDoc> = rollbacks.iter().map(|(_, d)| d.clone()).collect();
    let mut installed = false;
    for p in files.iter().filter(|p| ends(p, ".bundle")) {
        let o = models.install(p, &source(p), &docs);
        installed |= matches!(o, Outcome::Active(_));
        out.push((p.clone(), o));
    }
    if !installed {
        for (p, d) in rollbacks {
            out.push((p.clone(), models.rollback_installed(&d, &source(p))));
        }
    }
    out
}

/// The update task: watches the USB folder and acts on announcements.
pub struct Updater {
    app: Arc<App>,
    models: Arc<ModelStore>,
    config: UpdateConfig,
    downloader: Downloader,
    announcements: Receiver<Announcement>,
    /// USB files by path: the size and time last seen, and whether they were handled.
    usb: HashMap<PathBuf, (u64, Option<SystemTime>, bool)>,
    pending: Option<(Announcement, Instant, Duration)>,
}

impl Updater {
    /// An updater for `app`; announcements arrive on `announcements` (from the uplink).
    pub fn new(
        app: Arc<App>,
        config: UpdateConfig,
        broker_ca: Option<&Path>,
        download_dir: &Path,
        announcements: Receiver<Announcement>,
    ) -> Result<Self> {
        let models = app.models().context("the updater needs the model store")?.clone();
        let ca = config.ca_file.as_deref().or(broker_ca);
        let downloader = Downloader::new(download_dir, ca, Duration::from_secs(config.timeout_s))?;
        Ok(Updater {
            app,
            models,
            config,
            downloader,
            announcements,
            usb: HashMap::new(),
            pending: None,
        })
    }

    /// Runs until `stop` is triggered.
    pub fn run(mut self, stop: Shutdown) {
        let poll = Duration::from_secs(self.config.poll_s);
        let mut next_usb = Instant::now();
        while !stop.is_triggered() {
            if Instant::now() >= next_usb {
                if let Some(dir) = self.config.usb_dir.clone() {
                    self.usb_pass(&dir);
                }
                next_usb = Instant::now() + poll;
            }
            match self.announcements.recv_timeout(Duration::from_millis(250)) {
                Ok(a) => self.pending = Some((a, Instant::now(), Duration::from_secs(1))),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    stop.sleep(Duration::from_millis(250));
                }
            }
            if self.pending.as_ref().is_some_and(|p| Instant::now() >= p.1) {
                let (a, _, wait) = self.pending.take().expect("pending");
                if let Err(e) = self.network(&a) {
                    tracing::warn!(error = %format!("{e:#}"), retry_in_s = wait.as_secs(), "model download failed; will retry");
                    let next = (wait * 2).min(Duration::from_secs(300));
                    self.pending = Some((a, Instant::now() + wait, next));
                }
            }
        }
    }

    fn adopt(&self, o: Outcome<Arc<wbc_models::classify::Classifier>>) {
        match o {
            Outcome::Active(c) => self.app.set_classifier(c),
            Outcome::Skipped(why) => tracing::debug!(%why, "update skipped"),
            Outcome::Rejected(why) => tracing::warn!(%why, "update refused"),
        }
    }

    /// Acts on an announcement. `Err`: a transient failure, to retry.
    fn network(&self, a: &Announcement) -> Result<()> {
        let source = format!("network ({})", a.url);
        if let Some(k) = &a.keys {
            let _ = self.models.apply_keys(k, &source);
        }
        if self.models.settled(&a.sha256, a.rollback.is_some()).is_some() {
            return Ok(());
        }
        if a.size > self.config.max_bundle_bytes {
            self.models.reject_offer(
                &a.sha256,
                a.model_version,
                format!(
                    "{source}: announced size {} bytes is over the limit of {}",
                    a.size, self.config.max_bundle_bytes
                ),
            );
            return Ok(());
        }
        let rollbacks: Vec<SignedDoc> = a.rollback.iter().cloned().collect();
        if a.model_version <= self.models.active_version() {
            let Some(r) = &a.rollback else {
                self.models.reject_offer(
                    &a.sha256,
                    a.model_version,
                    format!(
                        "{source}: version {} is not newer than the active version {}; going back needs a signed rollback instruction",
                        a.model_version,
                        self.models.active_version()
                    ),
                );
                return Ok(());
            };
            // The version to return to may still be on the device.
            if let o @ (Outcome::Active(_) | Outcome::Rejected(_)) = self.models.rollback_installed(r, &source) {
                self.adopt(o);
                return Ok(());
            }
        }
        let path = match self.downloader.fetch(a) {
            Ok(p) => p,
            Err(DownloadError::Refused(r)) => {
                self.models
                    .reject_offer(&a.sha256, a.model_version, format!("{source}: {r}"));
                return Ok(());
            }
            Err(DownloadError::Transient(e)) => return Err(e),
        };
        self.models.note(
            ModelEvent::Downloaded,
            a.model_version,
            format!("{source}: {} bytes, sha256 as announced", a.size),
        );
        let o = self.models.install(&path, &source, &rollbacks);
        let _ = std::fs::remove_file(&path);
        self.adopt(o);
        Ok(())
    }

    /// One look at the USB folder.
    fn usb_pass(&mut self, dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut ready: Vec<PathBuf> = Vec::new();
        for e in entries.flatten().take(1000) {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let wanted = !name.starts_with('.')
                && (name.ends_with(".bundle") || name.ends_with(".keys.json") || name.ends_with(".rollback.json"));
            let Ok(meta) = e.metadata() else { continue };
            if !wanted || !meta.is_file() {
                continue;
            }
            let now = (meta.len(), meta.modified().ok());
            match self.usb.get(&path) {
                Some(&(len, time, handled)) if (len, time) == now => {
                    if !handled {
                        ready.push(path);
                    }
                }
                _ => {
                    self.usb.insert(path, (now.0, now.1, false));
                }
            }
        }
        if ready.is_empty() {
            return;
        }
        ready.sort();
        let source = |p: &Path| format!("USB ({})", p.file_name().unwrap_or_default().to_string_lossy());
        for (_, o) in apply_files(&self.models, &ready, source) {
            self.adopt(o);
        }
        for p in ready {
            if let Some(e) = self.usb.get_mut(&p) {
                e.2 = true;
            }
        }
    }
}
