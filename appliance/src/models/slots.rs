//! The model slots: the installed bundles (`slot-v<version>-<sha>.bundle`), the pointer
//! `current.json` that names the active one and its fallback, the atomic writes that switch it,
//! and the start of the store (the lock, what an interrupted update left, the crash count of a
//! model on probation, and the active model loaded again — else the fallback, else the factory
//! model). Also where the models stand (`status`) and the clean stop.

use super::install::Trust;
use super::{Factory, FactorySource, Loader, ModelPolicy, Models, Probation, Reporter, State, Status, msg};
use anyhow::{Context, Result, anyhow, bail};
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use wbc_protocol::bundle::{Bundle, ReadLimits, UnverifiedBundle, file_sha256, sha256_hex};
use wbc_protocol::signed::KeyList;
use wbc_protocol::uplink::{ModelEvent, ModelMessage};

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
    /// The sequence of the last signed key list applied (0: the provisioned keys): a
    /// `trust.json` that is missing or older says it was lost or put back, not that no list
    /// was ever applied.
    #[serde(default)]
    pub key_sequence: u64,
    /// The keys of that list (PEM), as `trust.json` holds them: a second copy, written
    /// atomically with the pointer, from which a lost or damaged `trust.json` is restored.
    #[serde(default)]
    pub keys: Vec<String>,
}

/// Test hook: with `WBC_PAUSE_AT=<step>` in the environment the process stops at that step of
/// an update (printing `paused at <step>` on standard error), so that a test can kill it there.
pub const PAUSE_ENV: &str = "WBC_PAUSE_AT";

pub(super) fn step(name: &str) {
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
pub(super) fn write_atomic_pausing(path: &Path, bytes: &[u8], pause: Option<&str>) -> Result<()> {
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

/// [`write_atomic_pausing`] for the contents of a file of at most `max` bytes, copied as it
/// streams (a multi-GB bundle is never held): a temporary file, synced, renamed into place. A
/// file that grew past `max` since it was checked is not copied on, and a failed copy leaves
/// no temporary file.
pub(super) fn copy_atomic_pausing(from: &Path, path: &Path, max: u64, pause: Option<&str>) -> Result<()> {
    let dir = path.parent().context("a file in a folder")?;
    let tmp = path.with_extension("tmp");
    let copy = || -> Result<()> {
        let mut src = std::fs::File::open(from).with_context(|| format!("opening {}", from.display()))?;
        let half = src.metadata()?.len().min(max) / 2;
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let first = std::io::copy(&mut std::io::Read::take(&mut src, half), &mut f)?;
        if let Some(name) = pause {
            step(name);
        }
        let rest = std::io::copy(&mut std::io::Read::take(&mut src, max - first + 1), &mut f)?;
        if first + rest > max {
            bail!("{} grew past {max} bytes while it was copied", from.display());
        }
        f.sync_all()?;
        Ok(())
    };
    if let Err(e) = copy() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

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
        let (factory_version, factory_sha) = match &factory.source {
            FactorySource::Embedded(bytes) => (
                UnverifiedBundle::read(&bytes[..], &ReadLimits::default())
                    .and_then(|b| b.claimed_manifest())
                    .map(|m| m.model_version)
                    .with_context(|| format!("the factory model ({})", factory.name))?,
                sha256_hex(bytes),
            ),
            FactorySource::File(path) => (
                UnverifiedBundle::claimed_version(path)
                    .with_context(|| format!("the factory model ({}): not a readable bundle", factory.name))?,
                file_sha256(path)
                    .with_context(|| format!("reading the factory model {}", factory.name))?
                    .0,
            ),
        };
        let factory_slot = Slot {
            file: None,
            model_version: factory_version,
            sha256: factory_sha,
        };
        let mut notes: Vec<ModelMessage> = Vec::new();
        let pointer = match std::fs::read(dir.join("current.json")) {
            Ok(b) => serde_json::from_slice::<Pointer>(&b).unwrap_or_else(|e| {
                notes.push(msg(
                    ModelEvent::Rejected,
                    factory_version,
                    format!("current.json is damaged ({e}); using the factory model"),
                ));
                fresh(factory_slot.clone())
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => fresh(factory_slot.clone()),
            Err(e) => return Err(e).context("reading current.json"),
        };
        let applied = pointer.key_sequence;
        let read = match std::fs::read(dir.join("trust.json")) {
            Ok(b) => serde_json::from_slice::<Trust>(&b)
                .map_err(|e| e.to_string())
                .and_then(|t| {
                    let list = KeyList {
                        sequence: t.sequence,
                        keys: t.keys,
                        created_at: String::new(),
                    };
                    list.public_keys().map(|k| (k, t.sequence)).map_err(|e| e.to_string())
                })
                .map_err(|e| format!("trust.json is damaged ({e})"))
                .and_then(|(k, seq)| {
                    if seq >= applied {
                        Ok(Some((k, seq)))
                    } else {
                        Err(format!(
                            "trust.json holds key list {seq}, older than list {applied} applied before (put back from an old copy?)"
                        ))
                    }
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && applied == 0 => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(format!("trust.json is missing although key list {applied} was applied"))
            }
            Err(e) => Err(format!("trust.json cannot be read ({e})")),
        };
        let (trusted, key_sequence, trust_problem) = match read {
            Ok(Some((keys, seq))) => (keys, seq, None),
            Ok(None) => (factory.update_keys.clone(), 0, None),
            Err(problem) => {
                let kept = KeyList {
                    sequence: applied,
                    keys: pointer.keys.clone(),
                    created_at: String::new(),
                };
                match kept.public_keys() {
                    Ok(keys) if !keys.is_empty() => {
                        let restored = serde_json::to_vec_pretty(&Trust {
                            sequence: applied,
                            keys: pointer.keys.clone(),
                        })
                        .map_err(anyhow::Error::from)
                        .and_then(|b| write_atomic(&dir.join("trust.json"), &b));
                        notes.push(msg(
                            ModelEvent::KeysUpdated,
                            pointer.active.model_version,
                            format!(
                                "{problem}; key list {applied} restored from its copy in current.json{}",
                                restored
                                    .err()
                                    .map(|e| format!(" (not written back: {e:#})"))
                                    .unwrap_or_default()
                            ),
                        ));
                        (keys, applied, None)
                    }
                    _ => (factory.update_keys.clone(), applied, Some(problem)),
                }
            }
        };
        // Falling back to the provisioned keys would trust again keys the lab revoked: no new
        // trust decision is made until the list is restored. Installed models still start.
        if let Some(p) = &trust_problem {
            notes.push(msg(
                ModelEvent::Rejected,
                pointer.active.model_version,
                format!("{p}: no update, key list or rollback instruction is accepted until it is restored"),
            ));
        }
        let seen = std::fs::read(dir.join("seen.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let withdrawn = super::withdrawn::load(dir);
        if let Err(why) = &withdrawn {
            notes.push(msg(
                ModelEvent::Rejected,
                pointer.active.model_version,
                format!("{why}: no update is installed until it is restored"),
            ));
        }
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
                trust_problem,
                seen,
                withdrawn,
                staging: None,
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
        self.remove_unreferenced(&st);
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
    pub(super) fn load(&self, slot: &Slot, trusted: &[VerifyingKey]) -> Result<T> {
        // A file of the device's own (an installed copy, a configured factory bundle) is
        // mapped, not read, so that a multi-GB model is not copied onto the heap to be built.
        let mapped = |path: &Path, keys: &[VerifyingKey]| -> Result<Bundle> {
            let b = Bundle::open_mapped(path, keys, &self.limits())?;
            if b.file_sha256() != Some(slot.sha256.as_str()) {
                bail!("the file is damaged (its sha256 differs from when it was installed)");
            }
            Ok(b)
        };
        let bundle = match (&slot.file, &self.factory.source) {
            (None, FactorySource::Embedded(bytes)) => {
                if sha256_hex(bytes) != slot.sha256 {
                    bail!("the factory model differs from the one recorded");
                }
                UnverifiedBundle::read(&bytes[..], &self.limits())?.verify(&self.factory.trusted)?
            }
            (None, FactorySource::File(path)) => mapped(path, &self.factory.trusted)?,
            (Some(f), _) => mapped(&self.dir.join(f), trusted)?,
        };
        (self.loader)(&bundle)
    }

    pub(super) fn limits(&self) -> ReadLimits {
        ReadLimits {
            max_total: self.policy.max_bundle_bytes,
            max_entry: self.policy.max_bundle_bytes,
            ..ReadLimits::default()
        }
    }

    pub(super) fn save_pointer(&self, p: &Pointer) -> Result<()> {
        self.save_pointer_pausing(p, None)
    }

    pub(super) fn save_pointer_pausing(&self, p: &Pointer, pause: Option<&str>) -> Result<()> {
        write_atomic_pausing(&self.dir.join("current.json"), &serde_json::to_vec_pretty(p)?, pause)
    }

    /// Removes temporary files and slots the pointer does not name (an interrupted update).
    /// Removes slot files no model needs, and interrupted writes; never the slot an install
    /// is staging now (a probation fallback may come while it is being written).
    pub(super) fn remove_unreferenced(&self, st: &State) {
        let p = &st.pointer;
        let staging = st.staging.as_deref().map(|n| (n, Path::new(n).with_extension("tmp")));
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
            if staging
                .as_ref()
                .is_some_and(|(slot, tmp)| name == *slot || Path::new(&name) == tmp.as_path())
            {
                continue;
            }
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
            key_ids: st.trusted.iter().map(wbc_protocol::bundle::key_id).collect(),
        }
    }

    /// The active model's version.
    pub fn active_version(&self) -> u64 {
        self.state.lock().expect("models lock").pointer.active.model_version
    }

    /// Records a clean stop (a later start is not counted as a crash).
    pub fn close(&self) -> Result<()> {
        let mut st = self.state.lock().expect("models lock");
        st.pointer.running = false;
        self.save_pointer(&st.pointer)
    }
}

fn fresh(active: Slot) -> Pointer {
    Pointer {
        active,
        previous: None,
        probation: None,
        running: false,
        key_sequence: 0,
        keys: Vec::new(),
    }
}
