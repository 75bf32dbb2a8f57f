//! The appliance's models on disk, and the only way one becomes active.
//!
//! `<data_dir>/models/` holds at most two installed bundles (the active one and its fallback,
//! `slot-v<version>-<sha>.bundle`), the pointer `current.json` that says which is which, the
//! trusted key list `trust.json` once the lab has rotated keys, and `seen.json`, what became of
//! each bundle offered (so that a refused bundle left on a USB stick is not tried every poll).
//! The factory model (the configured bundle, else the embedded default) needs no slot.
//!
//! An update is verified before anything changes (signature by a trusted key, every part's
//! sha256, bundle format, minimum appliance version, a strictly newer version unless a signed
//! rollback instruction allows an older one), copied into a new slot (written, flushed,
//! renamed), loaded and run on its own golden self-test images, and only then made active by
//! renaming a new pointer over the old one (flushed, with its folder). A power cut at any moment
//! leaves the old pointer or the new one, each naming a complete verified bundle; files of an
//! interrupted update are removed at the next start.
//!
//! A new model is on probation until it has processed `probation_fields` fields. If it fails
//! the pipeline `max_failures` times, or the appliance starts `max_failures` times without
//! having stopped cleanly (it crashed), the fallback becomes active again and the reason is
//! reported. At every start the active bundle is verified and self-tested again; if that fails
//! the fallback, and then the factory model, is used, and the reason is reported.

use anyhow::{Context, Result, anyhow, bail};
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use wbc_shared::bundle::{Bundle, ReadLimits, UnverifiedBundle, file_sha256, sha256_hex};
use wbc_shared::signed::{KeyList, Rollback, SignedDoc};
use wbc_shared::uplink::ModelMessage;

/// Limits of the update path (`[update]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ModelPolicy {
    /// Largest bundle accepted, bytes (by USB or download).
    pub max_bundle_bytes: u64,
    /// Fields a new model must process before it is confirmed (its probation).
    pub probation_fields: u32,
    /// Pipeline failures, or starts after a crash, during probation before the fallback model
    /// is restored.
    pub max_failures: u32,
}

impl Default for ModelPolicy {
    fn default() -> Self {
        ModelPolicy {
            max_bundle_bytes: 8 << 30,
            probation_fields: 20,
            max_failures: 3,
        }
    }
}

/// One installed model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Slot {
    /// File in the models folder; `None`: the factory model.
    pub file: Option<String>,
    /// Model version.
    pub model_version: u64,
    /// Hex sha256 of the bundle file.
    pub sha256: String,
}

/// A new model's trial period.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Probation {
    /// Fields processed without failure.
    pub fields_ok: u32,
    /// Pipeline failures.
    pub failures: u32,
    /// Starts that followed a crash (no clean stop).
    pub crashed_starts: u32,
}

/// `current.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pointer {
    /// The model in use.
    pub active: Slot,
    /// The model to return to.
    pub previous: Option<Slot>,
    /// Set while the active model is new.
    pub probation: Option<Probation>,
    /// True from start to clean stop: found true at a start, the appliance crashed.
    pub running: bool,
}

/// `trust.json`: the key list in force.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Trust {
    sequence: u64,
    keys: Vec<String>,
}

/// The factory model and the keys the device was provisioned with.
pub struct Factory {
    /// The factory bundle's bytes.
    pub bytes: Arc<[u8]>,
    /// Where they came from, in words.
    pub name: String,
    /// Keys that verify the factory bundle.
    pub trusted: Vec<VerifyingKey>,
    /// The provisioned update keys (configuration), trusted for updates until a signed key
    /// list replaces them.
    pub update_keys: Vec<VerifyingKey>,
}

/// Builds the runnable model from a verified bundle and runs its golden self-test.
pub type Loader<T> = Box<dyn Fn(&Bundle) -> Result<T> + Send + Sync>;
/// Receives every model event (logged, shown, sent to central).
pub type Reporter = Box<dyn Fn(&ModelMessage) + Send + Sync>;

/// What became of an offered bundle.
#[derive(Debug)]
pub enum Outcome<T> {
    /// Verified, self-tested and active: the model to use from now on.
    Active(T),
    /// Nothing to do (already active, or already refused), with why.
    Skipped(String),
    /// Refused, with the reason (reported).
    Rejected(String),
}

/// Test hook: with `WBC_PAUSE_AT=<step>` in the environment the process stops at that step of
/// an update (printing `paused at <step>` on standard error), so that a test can kill it there.
pub const PAUSE_ENV: &str = "WBC_PAUSE_AT";

fn step(name: &str) {
    if std::env::var(PAUSE_ENV).as_deref() == Ok(name) {
        eprintln!("paused at {name}");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one: a
/// temporary file, flushed, renamed over, and the folder flushed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_pausing(path, bytes, None)
}

/// [`write_atomic`], stopping at the test hook `pause` when half the temporary file is written.
fn write_atomic_pausing(path: &Path, bytes: &[u8], pause: Option<&str>) -> Result<()> {
    let dir = path.parent().context("a file in a folder")?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let half = bytes.len() / 2;
        f.write_all(&bytes[..half])?;
        if let Some(name) = pause {
            step(name);
        }
        f.write_all(&bytes[half..])?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

struct State {
    pointer: Pointer,
    trusted: Vec<VerifyingKey>,
    key_sequence: u64,
    seen: BTreeMap<String, String>,
}

/// The model store. One process at a time may hold it (a lock file).
pub struct Models<T> {
    dir: PathBuf,
    _lock: std::fs::File,
    factory: Factory,
    factory_slot: Slot,
    policy: ModelPolicy,
    clinic: String,
    device: String,
    loader: Loader<T>,
    report: Reporter,
    state: Mutex<State>,
}

/// Where the models stand, for the UI and `appliance models`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    /// The model in use.
    pub active: Slot,
    /// The model to return to.
    pub previous: Option<Slot>,
    /// Set while the active model is new.
    pub probation: Option<Probation>,
    /// Fields a new model must process before it is confirmed.
    pub probation_fields: u32,
    /// Sequence of the trusted key list (0: the provisioned keys).
    pub key_sequence: u64,
    /// The trusted keys' ids.
    pub key_ids: Vec<String>,
}

/// Why an offered bundle was refused.
struct Refusal {
    reason: String,
    version: u64,
    /// Remember the bundle (by this sha256) as refused: a verdict on the bundle, not a passing
    /// failure.
    remember: Option<String>,
}

/// A verdict on the bundle whose sha256 is `sha`.
fn refuse(sha: &str, version: u64, reason: impl Into<String>) -> Refusal {
    Refusal {
        reason: reason.into(),
        version,
        remember: Some(sha.to_string()),
    }
}

const SEEN_LIMIT: usize = 200;

impl<T> Models<T> {
    /// Opens the models folder: takes its lock, clears what an interrupted update left, counts a
    /// crash during probation (restoring the fallback after too many), and loads the active
    /// model — verified and self-tested again — falling back to the previous one and then to
    /// the factory model, each step reported. Returns the store and the model to run.
    pub fn open(
        dir: &Path,
        factory: Factory,
        policy: ModelPolicy,
        (clinic, device): (&str, &str),
        loader: Loader<T>,
        report: Reporter,
    ) -> Result<(Self, T)> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|_| {
            anyhow!(
                "{} is in use by another appliance process (is the daemon running? it installs \
                 bundles put in its USB update folder)",
                dir.display()
            )
        })?;
        let factory_version = UnverifiedBundle::read(&factory.bytes[..], &ReadLimits::default())
            .and_then(|b| b.claimed_manifest())
            .map(|m| m.model_version)
            .with_context(|| format!("the factory model ({})", factory.name))?;
        let factory_slot = Slot {
            file: None,
            model_version: factory_version,
            sha256: sha256_hex(&factory.bytes),
        };
        let mut notes: Vec<ModelMessage> = Vec::new();
        let pointer = match std::fs::read(dir.join("current.json")) {
            Ok(b) => serde_json::from_slice::<Pointer>(&b).unwrap_or_else(|e| {
                notes.push(msg(
                    "rejected",
                    factory_version,
                    format!("current.json is damaged ({e}); using the factory model"),
                ));
                fresh(factory_slot.clone())
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => fresh(factory_slot.clone()),
            Err(e) => return Err(e).context("reading current.json"),
        };
        let (trusted, key_sequence) = match std::fs::read(dir.join("trust.json")) {
            Ok(b) => {
                let parsed = serde_json::from_slice::<Trust>(&b)
                    .map_err(|e| e.to_string())
                    .and_then(|t| {
                        let list = KeyList {
                            sequence: t.sequence,
                            keys: t.keys,
                            created_at: String::new(),
                        };
                        list.public_keys().map(|k| (k, t.sequence)).map_err(|e| e.to_string())
                    });
                parsed.unwrap_or_else(|e| {
                    notes.push(msg(
                        "rejected",
                        pointer.active.model_version,
                        format!("trust.json is damaged ({e}); trusting the provisioned keys"),
                    ));
                    (factory.update_keys.clone(), 0)
                })
            }
            Err(_) => (factory.update_keys.clone(), 0),
        };
        let seen = std::fs::read(dir.join("seen.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let models = Models {
            dir: dir.to_path_buf(),
            _lock: lock,
            factory,
            factory_slot,
            policy,
            clinic: clinic.to_string(),
            device: device.to_string(),
            loader,
            report,
            state: Mutex::new(State {
                pointer,
                trusted,
                key_sequence,
                seen,
            }),
        };
        for n in &notes {
            (models.report)(n);
        }
        let current = models.start()?;
        Ok((models, current))
    }

    fn start(&self) -> Result<T> {
        let mut st = self.state.lock().expect("models lock");
        self.remove_unreferenced(&st.pointer);
        let was_running = st.pointer.running;
        if let (true, Some(p)) = (was_running, st.pointer.probation.as_mut()) {
            p.crashed_starts += 1;
            tracing::warn!(
                crashed_starts = p.crashed_starts,
                "the last run on the new model ended without a clean stop"
            );
        }
        let crashes = st.pointer.probation.as_ref().map_or(0, |p| p.crashed_starts);
        let current = if crashes >= self.policy.max_failures {
            let reason = format!(
                "the appliance stopped without a clean shutdown {crashes} times since version {} became active",
                st.pointer.active.model_version
            );
            self.fall_back(&mut st, &reason)?
        } else {
            match self.load(&st.pointer.active, &st.trusted) {
                Ok(t) => t,
                Err(e) => {
                    let reason = format!("it no longer verifies or passes its self-test: {e:#}");
                    self.fall_back(&mut st, &reason)?
                }
            }
        };
        st.pointer.running = true;
        self.save_pointer(&st.pointer)?;
        Ok(current)
    }

    /// Verifies an installed model again and loads it (self-test included).
    fn load(&self, slot: &Slot, trusted: &[VerifyingKey]) -> Result<T> {
        let (bytes, keys): (std::borrow::Cow<[u8]>, &[VerifyingKey]) = match &slot.file {
            None => ((&self.factory.bytes[..]).into(), &self.factory.trusted),
            Some(f) => (
                std::fs::read(self.dir.join(f))
                    .with_context(|| format!("reading {f}"))?
                    .into(),
                trusted,
            ),
        };
        if sha256_hex(&bytes) != slot.sha256 {
            bail!("the file is damaged (its sha256 differs from when it was installed)");
        }
        let bundle = UnverifiedBundle::read(&bytes[..], &self.limits())?.verify(keys)?;
        (self.loader)(&bundle)
    }

    /// Leaves the active model for the previous one, else the factory model. Reported.
    fn fall_back(&self, st: &mut State, reason: &str) -> Result<T> {
        let bad = st.pointer.active.clone();
        let candidates = [st.pointer.previous.clone(), Some(self.factory_slot.clone())];
        for slot in candidates.into_iter().flatten().filter(|s| s.sha256 != bad.sha256) {
            match self.load(&slot, &st.trusted) {
                Ok(t) => {
                    self.switch_back(
                        st,
                        &slot,
                        reason,
                        format!("left version {}: {reason}", bad.model_version),
                    )?;
                    return Ok(t);
                }
                Err(e) => (self.report)(&msg(
                    "rejected",
                    slot.model_version,
                    format!("fallback version {} cannot be used: {e:#}", slot.model_version),
                )),
            }
        }
        bail!(
            "no usable model: version {} {reason}, and neither the fallback nor the factory model ({}) loads",
            bad.model_version,
            self.factory.name
        )
    }

    /// Makes the installed, already loaded `target` active with no fallback, remembers the
    /// model left as rolled back (`why`), and reports it (`detail`).
    fn switch_back(&self, st: &mut State, target: &Slot, why: &str, detail: String) -> Result<()> {
        let left = st.pointer.active.clone();
        st.pointer = Pointer {
            active: target.clone(),
            previous: None,
            probation: None,
            running: st.pointer.running,
        };
        self.save_pointer(&st.pointer)?;
        if left.file.is_some() {
            self.remember(st, &left.sha256, format!("rolled back: {why}"));
        }
        self.remove_unreferenced(&st.pointer);
        (self.report)(&msg("rolled_back", target.model_version, detail));
        Ok(())
    }

    fn limits(&self) -> ReadLimits {
        ReadLimits {
            max_total: self.policy.max_bundle_bytes,
            max_entry: self.policy.max_bundle_bytes,
            ..ReadLimits::default()
        }
    }

    fn save_pointer(&self, p: &Pointer) -> Result<()> {
        self.save_pointer_pausing(p, None)
    }

    fn save_pointer_pausing(&self, p: &Pointer, pause: Option<&str>) -> Result<()> {
        write_atomic_pausing(&self.dir.join("current.json"), &serde_json::to_vec_pretty(p)?, pause)
    }

    fn remember(&self, st: &mut State, sha: &str, outcome: String) {
        st.seen.insert(sha.to_string(), outcome);
        while st.seen.len() > SEEN_LIMIT {
            let first = st.seen.keys().next().cloned().expect("not empty");
            st.seen.remove(&first);
        }
        if let Err(e) = serde_json::to_vec(&st.seen)
            .map_err(anyhow::Error::from)
            .and_then(|b| write_atomic(&self.dir.join("seen.json"), &b))
        {
            tracing::warn!(error = %format!("{e:#}"), "could not record the outcome of a bundle");
        }
    }

    /// Removes temporary files and slots the pointer does not name (an interrupted update).
    fn remove_unreferenced(&self, p: &Pointer) {
        let keep: Vec<&str> = [Some(&p.active), p.previous.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|s| s.file.as_deref())
            .collect();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") || (name.starts_with("slot-") && !keep.contains(&name.as_str())) {
                tracing::info!(file = %name, "removing a file no model needs");
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Where the models stand.
    pub fn status(&self) -> Status {
        let st = self.state.lock().expect("models lock");
        Status {
            active: st.pointer.active.clone(),
            previous: st.pointer.previous.clone(),
            probation: st.pointer.probation.clone(),
            probation_fields: self.policy.probation_fields,
            key_sequence: st.key_sequence,
            key_ids: st.trusted.iter().map(wbc_shared::bundle::key_id).collect(),
        }
    }

    /// The active model's version.
    pub fn active_version(&self) -> u64 {
        self.state.lock().expect("models lock").pointer.active.model_version
    }

    /// What became of a bundle before, by its sha256 (`None`: never offered, or forgotten
    /// since a new key list).
    pub fn seen(&self, sha256: &str) -> Option<String> {
        let st = self.state.lock().expect("models lock");
        if st.pointer.active.sha256 == sha256 {
            return Some("already active".into());
        }
        st.seen.get(sha256).cloned()
    }

    /// What was decided about a bundle that needs no second look: already active, installed,
    /// rolled back, or refused — except that a refused bundle is looked at again when a
    /// rollback instruction comes with it (it may have been refused as too old).
    pub fn settled(&self, sha256: &str, with_rollback: bool) -> Option<String> {
        self.seen(sha256)
            .filter(|o| !(with_rollback && o.starts_with("rejected")))
    }

    /// Refuses a bundle before it is even fetched (an announcement that cannot lead to an
    /// update): reported and remembered.
    pub fn reject_offer(&self, sha256: &str, version: u64, reason: String) {
        (self.report)(&msg("rejected", version, reason.clone()));
        let mut st = self.state.lock().expect("models lock");
        self.remember(&mut st, sha256, format!("rejected: {reason}"));
    }

    /// Reports an event of the update path that the store does not produce (a download).
    pub fn note(&self, event: &str, version: u64, detail: String) {
        (self.report)(&msg(event, version, detail));
    }

    /// Offers a bundle file: verified, staged, self-tested and made active, or refused with
    /// the reason. A signed rollback instruction among `rollbacks` that names this bundle may
    /// allow an older version. Every step is reported.
    pub fn install(&self, path: &Path, source: &str, rollbacks: &[SignedDoc]) -> Outcome<T> {
        match self.try_install(path, source, rollbacks) {
            Ok(o) => o,
            Err(r) => {
                let reason = format!("{source}: {}", r.reason);
                (self.report)(&msg("rejected", r.version, reason.clone()));
                if let Some(sha) = r.remember {
                    let mut st = self.state.lock().expect("models lock");
                    self.remember(&mut st, &sha, format!("rejected: {reason}"));
                }
                Outcome::Rejected(reason)
            }
        }
    }

    fn try_install(&self, path: &Path, source: &str, rollbacks: &[SignedDoc]) -> Result<Outcome<T>, Refusal> {
        let transient = |e: String| Refusal {
            reason: e,
            version: 0,
            remember: None,
        };
        let len = std::fs::metadata(path)
            .map_err(|e| transient(format!("cannot read {}: {e}", path.display())))?
            .len();
        if len > self.policy.max_bundle_bytes {
            let (sha, _) = file_sha256(path).map_err(|e| transient(format!("cannot read {}: {e}", path.display())))?;
            return Err(refuse(
                &sha,
                0,
                format!(
                    "the file is {len} bytes, over the limit of {}",
                    self.policy.max_bundle_bytes
                ),
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| transient(format!("cannot read {}: {e}", path.display())))?;
        let sha = sha256_hex(&bytes);
        if let Some(o) = self.settled(&sha, !rollbacks.is_empty()) {
            return Ok(Outcome::Skipped(o));
        }
        let (trusted, active) = {
            let st = self.state.lock().expect("models lock");
            (st.trusted.clone(), st.pointer.active.clone())
        };
        let unverified =
            UnverifiedBundle::read(&bytes[..], &self.limits()).map_err(|e| refuse(&sha, 0, e.to_string()))?;
        let claimed = unverified.claimed_manifest().map(|m| m.model_version).unwrap_or(0);
        let bundle = unverified
            .verify(&trusted)
            .map_err(|e| refuse(&sha, claimed, e.to_string()))?;
        let m = &bundle.manifest;
        let v = m.model_version;
        let needs = semver::Version::parse(&m.min_appliance_version).map_err(|e| {
            refuse(
                &sha,
                v,
                format!("min_appliance_version {:?}: {e}", m.min_appliance_version),
            )
        })?;
        let ours = semver::Version::parse(env!("CARGO_PKG_VERSION")).expect("the crate version is semver");
        if needs > ours {
            return Err(refuse(
                &sha,
                v,
                format!("it needs appliance {needs} or newer; this appliance is {ours}"),
            ));
        }
        let instructed = if v <= active.model_version {
            if rollbacks.is_empty() {
                return Err(refuse(
                    &sha,
                    v,
                    format!(
                        "version {v} is not newer than the active version {}; going back needs a signed rollback instruction",
                        active.model_version
                    ),
                ));
            }
            Some(self.check_rollback(rollbacks, &trusted, active.model_version, v, &sha)?)
        } else {
            None
        };
        (self.report)(&msg(
            "verified",
            v,
            format!(
                "{source}: signed by key {}, {} parts intact",
                bundle.signed_by,
                m.parts.len()
            ),
        ));
        step("verified");
        let name = format!("slot-v{v}-{}.bundle", &sha[..12]);
        let slot_path = self.dir.join(&name);
        self.stage(&bytes, &sha, &slot_path)
            .map_err(|e| transient(format!("copying into {name}: {e:#}")))?;
        drop(bytes);
        let current = match (self.loader)(&bundle) {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_file(&slot_path);
                return Err(refuse(&sha, v, format!("version {v} fails its self-test: {e:#}")));
            }
        };
        step("self_tested");
        let mut st = self.state.lock().expect("models lock");
        let new = Slot {
            file: Some(name),
            model_version: v,
            sha256: sha.clone(),
        };
        let left = st.pointer.active.clone();
        let next = match &instructed {
            // Going back on the lab's word: the version left is not kept.
            Some(_) => Pointer {
                active: new,
                previous: None,
                probation: None,
                running: st.pointer.running,
            },
            None => Pointer {
                active: new,
                previous: Some(left.clone()),
                probation: Some(Probation::default()),
                running: st.pointer.running,
            },
        };
        self.save_pointer_pausing(&next, Some("switching"))
            .map_err(|e| transient(format!("{e:#}")))?;
        step("switched");
        st.pointer = next;
        self.remove_unreferenced(&st.pointer);
        match instructed {
            Some(r) => {
                self.remember(&mut st, &left.sha256, format!("rolled back: {}", r.reason));
                (self.report)(&msg(
                    "rolled_back",
                    v,
                    format!(
                        "{source}: left version {} on the lab's instruction: {}",
                        left.model_version, r.reason
                    ),
                ));
            }
            None => {
                self.remember(&mut st, &sha, "installed".into());
                (self.report)(&msg(
                    "active",
                    v,
                    format!(
                        "{source}: version {} kept as the fallback; on probation for {} fields",
                        left.model_version, self.policy.probation_fields
                    ),
                ));
            }
        }
        Ok(Outcome::Active(current))
    }

    /// The first of `docs` that verifies and allows leaving `active` for version `v` (`sha`).
    fn check_rollback(
        &self,
        docs: &[SignedDoc],
        trusted: &[VerifyingKey],
        active: u64,
        v: u64,
        sha: &str,
    ) -> Result<Rollback, Refusal> {
        let mut why = Vec::new();
        for doc in docs {
            let r: Rollback = match doc.verify(trusted) {
                Ok(r) => r,
                Err(e) => {
                    why.push(format!("rollback instruction refused: {e}"));
                    continue;
                }
            };
            let problem = if !r.addressed_to(&self.clinic, &self.device) {
                "is addressed to another device"
            } else if r.from_version != active {
                "is for leaving another version"
            } else if r.to_version != v || r.to_sha256 != sha {
                "names another bundle"
            } else {
                return Ok(r);
            };
            why.push(format!(
                "the rollback instruction from {} to {} {problem}",
                r.from_version, r.to_version
            ));
        }
        Err(refuse(
            sha,
            v,
            format!(
                "version {v} is not newer than the active version {active}, and no rollback instruction allows it ({})",
                why.join("; ")
            ),
        ))
    }

    /// Writes the verified bundle into its slot ([`write_atomic`]), then reads it back and
    /// checks it against the sha256 that was verified.
    fn stage(&self, bytes: &[u8], sha: &str, slot: &Path) -> Result<()> {
        write_atomic_pausing(slot, bytes, Some("staging"))?;
        step("staged");
        if file_sha256(slot)?.0 != sha {
            let _ = std::fs::remove_file(slot);
            bail!("the copy on disk differs from the verified bundle (a disk error?)");
        }
        Ok(())
    }

    /// A signed instruction to return to a model still on this device (the fallback or the
    /// factory model). `Skipped` when it does not apply here.
    pub fn rollback_installed(&self, doc: &SignedDoc, source: &str) -> Outcome<T> {
        let mut st = self.state.lock().expect("models lock");
        let r: Rollback = match doc.verify(&st.trusted) {
            Ok(r) => r,
            Err(e) => {
                let reason = format!("{source}: rollback instruction refused: {e}");
                (self.report)(&msg("rejected", st.pointer.active.model_version, reason.clone()));
                return Outcome::Rejected(reason);
            }
        };
        if !r.addressed_to(&self.clinic, &self.device) || r.from_version != st.pointer.active.model_version {
            return Outcome::Skipped("the rollback instruction does not apply to the active model".into());
        }
        let target = [st.pointer.previous.clone(), Some(self.factory_slot.clone())]
            .into_iter()
            .flatten()
            .find(|s| s.sha256 == r.to_sha256 && s.model_version == r.to_version);
        let Some(target) = target else {
            return Outcome::Skipped(format!(
                "version {} is not on this device: send its bundle with the instruction",
                r.to_version
            ));
        };
        match self.load(&target, &st.trusted) {
            Ok(t) => {
                let detail = format!(
                    "{source}: left version {} on the lab's instruction: {}",
                    st.pointer.active.model_version, r.reason
                );
                match self.switch_back(&mut st, &target, &r.reason, detail) {
                    Ok(()) => Outcome::Active(t),
                    Err(e) => Outcome::Rejected(format!("{e:#}")),
                }
            }
            Err(e) => {
                let reason = format!("{source}: version {} cannot be used: {e:#}", target.model_version);
                (self.report)(&msg("rejected", target.model_version, reason.clone()));
                Outcome::Rejected(reason)
            }
        }
    }

    /// A new trusted key list, signed by a key trusted now, with a higher sequence: it replaces
    /// the trusted keys (and bundles refused before are looked at again).
    pub fn apply_keys(&self, doc: &SignedDoc, source: &str) -> Outcome<()> {
        let mut st = self.state.lock().expect("models lock");
        let v = st.pointer.active.model_version;
        // Skipping needs no trust: a list that claims no newer sequence changes nothing (the
        // one that brought the keys in force is often still on the stick, signed by a key no
        // longer trusted).
        let claimed = serde_json::from_str::<serde_json::Value>(&doc.payload)
            .ok()
            .and_then(|p| p.get("sequence").and_then(|s| s.as_u64()));
        if let Some(seq) = claimed.filter(|&s| s <= st.key_sequence) {
            return Outcome::Skipped(format!(
                "key list {seq} is not newer than the one in force ({})",
                st.key_sequence
            ));
        }
        let list = match doc
            .verify::<KeyList>(&st.trusted)
            .and_then(|l| l.public_keys().map(|k| (l, k)))
        {
            Ok(l) => l,
            Err(e) => {
                let reason = format!("{source}: key list refused: {e}");
                (self.report)(&msg("rejected", v, reason.clone()));
                return Outcome::Rejected(reason);
            }
        };
        let (list, keys) = list;
        if list.sequence <= st.key_sequence {
            return Outcome::Skipped(format!(
                "key list {} is not newer than the one in force ({})",
                list.sequence, st.key_sequence
            ));
        }
        let trust = Trust {
            sequence: list.sequence,
            keys: list.keys.clone(),
        };
        let saved = serde_json::to_vec_pretty(&trust)
            .map_err(anyhow::Error::from)
            .and_then(|b| write_atomic(&self.dir.join("trust.json"), &b));
        if let Err(e) = saved {
            return Outcome::Rejected(format!("{source}: saving the key list: {e:#}"));
        }
        let ids: Vec<String> = keys.iter().map(wbc_shared::bundle::key_id).collect();
        st.trusted = keys;
        st.key_sequence = list.sequence;
        st.seen.retain(|_, o| !o.starts_with("rejected"));
        (self.report)(&msg(
            "keys_updated",
            v,
            format!("{source}: key list {} now trusted: {}", list.sequence, ids.join(", ")),
        ));
        Outcome::Active(())
    }

    /// Counts a field processed by model `version` while the active model is on probation:
    /// confirms it after enough good ones; after too many failures returns to the fallback,
    /// whose model is returned. A field that was processed by another version (one that started
    /// before a switch) says nothing about the active model and is not counted.
    pub fn field_done(&self, version: u64, ok: bool, detail: &str) -> Option<T> {
        let mut st = self.state.lock().expect("models lock");
        let v = st.pointer.active.model_version;
        if version != v {
            return None;
        }
        let p = st.pointer.probation.as_mut()?;
        if ok {
            p.fields_ok += 1;
            if p.fields_ok >= self.policy.probation_fields {
                st.pointer.probation = None;
                (self.report)(&msg(
                    "confirmed",
                    v,
                    format!("processed {} fields after the switch", self.policy.probation_fields),
                ));
            }
        } else {
            p.failures += 1;
            if p.failures >= self.policy.max_failures {
                let reason = format!(
                    "it failed the pipeline {} times after the switch ({detail})",
                    p.failures
                );
                return match self.fall_back(&mut st, &reason) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "no fallback model; staying on the active one");
                        None
                    }
                };
            }
        }
        if let Err(e) = self.save_pointer(&st.pointer) {
            tracing::warn!(error = %format!("{e:#}"), "could not record the probation");
        }
        None
    }

    /// Records a clean stop (a later start is not counted as a crash).
    pub fn close(&self) -> Result<()> {
        let mut st = self.state.lock().expect("models lock");
        st.pointer.running = false;
        self.save_pointer(&st.pointer)
    }
}

/// The status in words.
pub fn describe(s: &Status) -> String {
    let slot = |s: &Slot| match &s.file {
        Some(f) => format!("version {} ({f})", s.model_version),
        None => format!("version {} (factory model)", s.model_version),
    };
    let mut out = format!("active model: {}", slot(&s.active));
    if let Some(p) = &s.probation {
        out += &format!(
            ", on probation ({} of {} fields, {} failures, {} crashed starts)",
            p.fields_ok, s.probation_fields, p.failures, p.crashed_starts
        );
    }
    out += &match &s.previous {
        Some(p) => format!("\nfallback: {}", slot(p)),
        None => "\nfallback: none".into(),
    };
    out += &format!(
        "\ntrusted keys: {} (key list {})",
        s.key_ids.join(", "),
        if s.key_sequence == 0 {
            "as provisioned".to_string()
        } else {
            s.key_sequence.to_string()
        }
    );
    out
}

fn fresh(active: Slot) -> Pointer {
    Pointer {
        active,
        previous: None,
        probation: None,
        running: false,
    }
}

fn msg(event: &str, model_version: u64, detail: String) -> ModelMessage {
    ModelMessage {
        event: event.into(),
        model_version,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use wbc_shared::bundle::BundleBuilder;
    use wbc_shared::classify::{Classifier, SELFTEST_PART, SelfTest};

    type Events = Arc<Mutex<Vec<ModelMessage>>>;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn default_bundle() -> Bundle {
        Bundle::from_bytes(crate::DEFAULT_BUNDLE, &crate::trusted_keys(&[]).unwrap()).unwrap()
    }

    /// The default bundle signed again by `k` as `version`, after `tweak`.
    fn bundle(version: u64, k: &SigningKey, tweak: impl FnOnce(BundleBuilder) -> BundleBuilder) -> Vec<u8> {
        let b = Bundle::from_bytes(&crate::default_bundle_as(version, k), &[k.verifying_key()]).unwrap();
        tweak(BundleBuilder::from_bundle(&b)).finish(k).unwrap()
    }

    fn factory_version() -> u64 {
        default_bundle().manifest.model_version
    }

    struct Fixture {
        dir: tempfile::TempDir,
        events: Events,
    }

    impl Fixture {
        fn new() -> Self {
            Fixture {
                dir: tempfile::tempdir().unwrap(),
                events: Arc::default(),
            }
        }

        fn open_with(
            &self,
            trusted: Vec<VerifyingKey>,
            policy: ModelPolicy,
        ) -> Result<(Models<Arc<Classifier>>, Arc<Classifier>)> {
            let device = crate::backend::select(crate::backend::BackendChoice::Cpu)
                .unwrap()
                .device;
            let loader: Loader<Arc<Classifier>> = Box::new(move |b| {
                let c = Classifier::from_bundle(b, &device)?;
                c.self_test(b)?;
                Ok(Arc::new(c))
            });
            let events = self.events.clone();
            let mut trusted_all = crate::trusted_keys(&[]).unwrap();
            trusted_all.extend(trusted);
            Models::open(
                &self.dir.path().join("models"),
                Factory {
                    bytes: crate::DEFAULT_BUNDLE.into(),
                    name: "embedded".into(),
                    trusted: trusted_all.clone(),
                    update_keys: trusted_all,
                },
                policy,
                ("clinic-1", "scope-1"),
                loader,
                Box::new(move |m| events.lock().unwrap().push(m.clone())),
            )
        }

        /// Trusts the factory key and key(1).
        fn open(&self) -> (Models<Arc<Classifier>>, Arc<Classifier>) {
            self.open_with(vec![key(1).verifying_key()], ModelPolicy::default())
                .unwrap()
        }

        fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
            let p = self.dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        }

        fn last_event(&self) -> ModelMessage {
            self.events.lock().unwrap().last().cloned().expect("an event")
        }

        fn slots(&self) -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(self.dir.path().join("models"))
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("slot-") || n.ends_with(".tmp"))
                .collect();
            v.sort();
            v
        }
    }

    fn active<T>(o: Outcome<T>) -> T {
        match o {
            Outcome::Active(t) => t,
            Outcome::Skipped(s) => panic!("skipped: {s}"),
            Outcome::Rejected(r) => panic!("rejected: {r}"),
        }
    }

    fn rejected<T>(o: Outcome<T>) -> String {
        match o {
            Outcome::Rejected(r) => r,
            Outcome::Active(_) => panic!("became active"),
            Outcome::Skipped(s) => panic!("skipped: {s}"),
        }
    }

    #[test]
    fn a_newer_signed_bundle_becomes_active_with_the_old_one_as_fallback() {
        let f = Fixture::new();
        let v0 = factory_version();
        let (m, c) = f.open();
        assert_eq!(c.model_version, v0);
        assert_eq!(m.status().active.file, None);
        let p = f.file("new.bundle", &bundle(v0 + 1, &key(1), |b| b));
        let c = active(m.install(&p, "test", &[]));
        assert_eq!(c.model_version, v0 + 1);
        let s = m.status();
        assert_eq!(s.active.model_version, v0 + 1);
        assert_eq!(s.previous.as_ref().unwrap().model_version, v0);
        assert_eq!(s.probation, Some(Probation::default()));
        let events: Vec<String> = f.events.lock().unwrap().iter().map(|e| e.event.clone()).collect();
        assert_eq!(events, ["verified", "active"]);
        assert_eq!(f.slots().len(), 1);
        // The same file again: nothing to do.
        assert!(matches!(m.install(&p, "test", &[]), Outcome::Skipped(_)));
        m.close().unwrap();
        drop(m);
        // A clean restart keeps it (verified and self-tested again), not counted as a crash.
        let (m, c) = f.open();
        assert_eq!(c.model_version, v0 + 1);
        assert_eq!(m.status().probation.unwrap().crashed_starts, 0);
    }

    #[test]
    fn wrong_damaged_old_or_failing_bundles_are_refused_and_change_nothing() {
        let f = Fixture::new();
        let v0 = factory_version();
        let (m, _) = f.open();
        let good = bundle(v0 + 1, &key(1), |b| b);
        let flip = |needle: &[u8], at: usize| {
            let mut b = good.clone();
            let pos = b.windows(needle.len()).position(|w| w == needle).unwrap();
            b[pos + at] ^= 1;
            b
        };
        let weights_at = good.len() / 2;
        let mut tampered_weights = good.clone();
        tampered_weights[weights_at] ^= 0x40;
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "tampered-manifest",
                flip(b"\"model_version\"", 3),
                "signature does not verify",
            ),
            ("tampered-weights", tampered_weights, "does not match its sha256"),
            ("wrong-key", bundle(v0 + 1, &key(9), |b| b), "does not trust"),
            ("truncated", good[..good.len() / 3].to_vec(), "corrupt or truncated"),
            ("empty", Vec::new(), ""),
            ("older", bundle(v0, &key(1), |b| b), "not newer than the active version"),
            (
                "needs-newer-appliance",
                bundle(v0 + 1, &key(1), |mut b| {
                    b.manifest_mut().min_appliance_version = "99.0.0".into();
                    b
                }),
                "needs appliance 99.0.0",
            ),
            (
                "fails-self-test",
                bundle(v0 + 2, &key(1), |b| {
                    let spec: SelfTest = serde_json::from_slice(default_bundle().part(SELFTEST_PART).unwrap()).unwrap();
                    let wrong = SelfTest {
                        tolerance: spec.tolerance,
                        cases: spec
                            .cases
                            .into_iter()
                            .map(|mut c| {
                                c.probabilities.reverse();
                                c
                            })
                            .collect(),
                    };
                    b.replace_part(SELFTEST_PART, serde_json::to_vec(&wrong).unwrap())
                        .unwrap()
                }),
                "fails its self-test",
            ),
        ];
        for (name, bytes, why) in cases {
            let p = f.file(&format!("{name}.bundle"), &bytes);
            let r = rejected(m.install(&p, name, &[]));
            assert!(r.contains(why), "{name}: {r}");
            assert_eq!(f.last_event().event, "rejected", "{name}");
            assert!(f.last_event().detail.contains(why), "{name}");
            let s = m.status();
            assert_eq!(s.active.model_version, v0, "{name}: the factory model stays");
            assert_eq!(s.active.file, None, "{name}");
            assert!(f.slots().is_empty(), "{name}: nothing staged is left: {:?}", f.slots());
            // Offered again, it is not looked at again.
            assert!(
                matches!(m.install(&p, name, &[]), Outcome::Skipped(_) | Outcome::Rejected(_)),
                "{name}"
            );
        }
        // The good one still goes in after all that.
        let p = f.file("good.bundle", &good);
        assert_eq!(active(m.install(&p, "good", &[])).model_version, v0 + 1);
    }

    #[test]
    fn probation_confirms_a_good_model_and_restores_the_fallback_after_failures() {
        let f = Fixture::new();
        let v0 = factory_version();
        let policy = ModelPolicy {
            probation_fields: 3,
            max_failures: 2,
            ..Default::default()
        };
        let (m, _) = f.open_with(vec![key(1).verifying_key()], policy.clone()).unwrap();
        active(m.install(&f.file("a.bundle", &bundle(v0 + 1, &key(1), |b| b)), "t", &[]));
        for _ in 0..3 {
            assert!(m.field_done(v0 + 1, true, "").is_none());
        }
        assert_eq!(m.status().probation, None);
        assert_eq!(f.last_event().event, "confirmed");
        // Outside probation, failures change nothing.
        assert!(m.field_done(v0 + 1, false, "x").is_none());
        active(m.install(&f.file("b.bundle", &bundle(v0 + 2, &key(1), |b| b)), "t", &[]));
        // A field that began on the version left behind says nothing about the new one.
        assert!(m.field_done(v0 + 1, false, "late").is_none());
        assert_eq!(m.status().probation.map(|p| p.failures), Some(0));
        assert!(m.field_done(v0 + 2, false, "boom").is_none());
        let back = m
            .field_done(v0 + 2, false, "boom")
            .expect("the fallback after two failures");
        assert_eq!(back.model_version, v0 + 1);
        let e = f.last_event();
        assert_eq!((e.event.as_str(), e.model_version), ("rolled_back", v0 + 1));
        assert!(e.detail.contains("failed the pipeline 2 times"), "{}", e.detail);
        let s = m.status();
        assert_eq!((s.active.model_version, s.previous.clone()), (v0 + 1, None));
        assert_eq!(f.slots().len(), 1, "the failed model's slot is removed");
        // The failed bundle is not taken again.
        assert!(matches!(
            m.install(&f.file("b.bundle", &bundle(v0 + 2, &key(1), |b| b)), "t", &[]),
            Outcome::Skipped(s) if s.starts_with("rolled back")
        ));
    }

    #[test]
    fn repeated_crashes_on_a_new_model_return_to_the_fallback() {
        let f = Fixture::new();
        let v0 = factory_version();
        let policy = ModelPolicy {
            max_failures: 2,
            ..Default::default()
        };
        let open = || f.open_with(vec![key(1).verifying_key()], policy.clone()).unwrap();
        let (m, _) = open();
        active(m.install(&f.file("a.bundle", &bundle(v0 + 1, &key(1), |b| b)), "t", &[]));
        drop(m); // no clean stop: a crash
        let (m, c) = open();
        assert_eq!(c.model_version, v0 + 1, "one crash is tolerated");
        drop(m);
        let (m, c) = open();
        assert_eq!(c.model_version, v0, "the second crash restores the factory model");
        assert_eq!(f.last_event().event, "rolled_back");
        assert!(f.last_event().detail.contains("without a clean shutdown 2 times"));
        m.close().unwrap();
    }

    #[test]
    fn a_damaged_pointer_or_slot_falls_back_to_a_verified_model() {
        let f = Fixture::new();
        let v0 = factory_version();
        let (m, _) = f.open();
        active(m.install(&f.file("a.bundle", &bundle(v0 + 1, &key(1), |b| b)), "t", &[]));
        for _ in 0..20 {
            m.field_done(v0 + 1, true, "");
        }
        active(m.install(&f.file("b.bundle", &bundle(v0 + 2, &key(1), |b| b)), "t", &[]));
        m.close().unwrap();
        let slot = m.status().active.file.unwrap();
        drop(m);
        // Bit rot in the active slot: the fallback (v0 + 1) is used, and said so.
        let p = f.dir.path().join("models").join(&slot);
        let mut b = std::fs::read(&p).unwrap();
        let n = b.len() / 2;
        b[n] ^= 1;
        std::fs::write(&p, b).unwrap();
        let (m, c) = f.open();
        assert_eq!(c.model_version, v0 + 1);
        assert!(f.last_event().detail.contains("damaged"), "{}", f.last_event().detail);
        m.close().unwrap();
        drop(m);
        // A damaged pointer: the factory model.
        std::fs::write(f.dir.path().join("models/current.json"), b"{garbage").unwrap();
        let (_m, c) = f.open();
        assert_eq!(c.model_version, v0);
        assert!(
            f.events
                .lock()
                .unwrap()
                .iter()
                .any(|e| e.detail.contains("current.json is damaged"))
        );
    }

    #[test]
    fn an_older_version_needs_a_signed_rollback_instruction_for_the_active_one() {
        let f = Fixture::new();
        let v0 = factory_version();
        let (m, _) = f.open();
        let older = bundle(v0 + 1, &key(1), |b| b);
        active(m.install(&f.file("new.bundle", &bundle(v0 + 2, &key(1), |b| b)), "t", &[]));
        let older_path = f.file("older.bundle", &older);
        let r = |from: u64, sha: &str, device: Option<&str>| Rollback {
            from_version: from,
            to_version: v0 + 1,
            to_sha256: sha.to_string(),
            clinic: Some("clinic-1".into()),
            device: device.map(str::to_string),
            reason: "v2 miscounts".into(),
            created_at: "2026-11-28T00:00:00Z".into(),
        };
        let sha = sha256_hex(&older);
        for (doc, why) in [
            (SignedDoc::sign(&r(v0 + 2, &sha, None), &key(9)), "does not trust"),
            (SignedDoc::sign(&r(v0 + 3, &sha, None), &key(1)), "another version"),
            (
                SignedDoc::sign(&r(v0 + 2, &"0".repeat(64), None), &key(1)),
                "another bundle",
            ),
            (
                SignedDoc::sign(&r(v0 + 2, &sha, Some("scope-2")), &key(1)),
                "another device",
            ),
        ] {
            let e = rejected(m.install(&older_path, "t", &[doc]));
            assert!(e.contains(why), "{e}");
            assert_eq!(m.status().active.model_version, v0 + 2);
        }
        let c = active(m.install(
            &older_path,
            "t",
            &[SignedDoc::sign(&r(v0 + 2, &sha, Some("scope-1")), &key(1))],
        ));
        assert_eq!(c.model_version, v0 + 1);
        assert_eq!(f.last_event().event, "rolled_back");
        let s = m.status();
        assert_eq!((s.active.model_version, s.previous, s.probation), (v0 + 1, None, None));
    }

    #[test]
    fn a_rollback_instruction_can_return_to_the_model_kept_on_the_device() {
        let f = Fixture::new();
        let v0 = factory_version();
        let (m, _) = f.open();
        active(m.install(&f.file("new.bundle", &bundle(v0 + 1, &key(1), |b| b)), "t", &[]));
        let factory_sha = sha256_hex(crate::DEFAULT_BUNDLE);
        let doc = SignedDoc::sign(
            &Rollback {
                from_version: v0 + 1,
                to_version: v0,
                to_sha256: factory_sha,
                clinic: None,
                device: None,
                reason: "recall".into(),
                created_at: String::new(),
            },
            &key(1),
        );
        let c = active(m.rollback_installed(&doc, "t"));
        assert_eq!(c.model_version, v0);
        assert_eq!(m.status().active.file, None);
        // Replayed later, it no longer applies.
        assert!(matches!(m.rollback_installed(&doc, "t"), Outcome::Skipped(_)));
    }

    #[test]
    fn a_signed_key_list_rotates_and_revokes_keys() {
        use ed25519_dalek::pkcs8::{EncodePublicKey, spki::der::pem::LineEnding};
        let f = Fixture::new();
        let v0 = factory_version();
        let (m, _) = f.open();
        let pem = |k: &SigningKey| k.verifying_key().to_public_key_pem(LineEnding::LF).unwrap();
        let list = |seq: u64, keys: Vec<String>| KeyList {
            sequence: seq,
            keys,
            created_at: String::new(),
        };
        // Signed by a key the device does not trust: refused.
        let forged = SignedDoc::sign(&list(1, vec![pem(&key(9))]), &key(9));
        assert!(matches!(m.apply_keys(&forged, "t"), Outcome::Rejected(_)));
        // key(1) hands over to key(2).
        let doc = SignedDoc::sign(&list(1, vec![pem(&key(2))]), &key(1));
        assert!(matches!(m.apply_keys(&doc, "t"), Outcome::Active(())));
        assert_eq!(f.last_event().event, "keys_updated");
        assert!(matches!(m.apply_keys(&doc, "t"), Outcome::Skipped(_)), "replay");
        let by_old = rejected(m.install(&f.file("old-key.bundle", &bundle(v0 + 1, &key(1), |b| b)), "t", &[]));
        assert!(by_old.contains("does not trust"), "{by_old}");
        assert_eq!(
            active(m.install(&f.file("new-key.bundle", &bundle(v0 + 1, &key(2), |b| b)), "t", &[])).model_version,
            v0 + 1
        );
        m.close().unwrap();
        drop(m);
        // The list survives a restart; an older list is not taken.
        let (m, _) = f.open();
        assert_eq!(m.status().key_sequence, 1);
        let stale = SignedDoc::sign(&list(1, vec![pem(&key(1))]), &key(2));
        assert!(matches!(m.apply_keys(&stale, "t"), Outcome::Skipped(_)));
    }

    #[test]
    fn one_process_at_a_time() {
        let f = Fixture::new();
        let (_m, _) = f.open();
        let e = f.open_with(vec![], ModelPolicy::default()).err().unwrap();
        assert!(
            format!("{e:#}").contains("in use by another appliance process"),
            "{e:#}"
        );
    }
}
