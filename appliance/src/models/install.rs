//! Installing offered bundles: a file is verified (trusted signature, every part's sha256,
//! format, minimum appliance version, a newer version unless a signed rollback instruction
//! allows an older one), staged into a new slot, self-tested and only then made active. Also the
//! signed instructions that need no file (a rollback to a model still on the device, a new
//! trusted key list, kept in `trust.json`) and the memory of what became of each bundle offered
//! (`seen.json`).

use super::slots::{copy_atomic_pausing, step};
use super::{Models, Outcome, Pointer, Probation, Slot, State, msg, write_atomic};
use anyhow::Result;
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use std::path::Path;
use wbc_protocol::bundle::{Bundle, UnverifiedBundle, file_sha256};
use wbc_protocol::signed::{KeyList, Rollback, SignedDoc};
use wbc_protocol::uplink::ModelEvent;

/// `trust.json`: the key list in force.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Trust {
    pub(super) sequence: u64,
    pub(super) keys: Vec<String>,
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

/// Marks a slot as being written for as long as it lives.
pub(super) struct Staging<'a, T>(&'a Models<T>);

impl<'a, T> Staging<'a, T> {
    pub(super) fn new(models: &'a Models<T>, name: &str) -> Self {
        models.state.lock().expect("models lock").staging = Some(name.to_string());
        Staging(models)
    }
}

impl<T> Drop for Staging<'_, T> {
    fn drop(&mut self) {
        self.0.state.lock().expect("models lock").staging = None;
    }
}

/// A failure of the moment, not a verdict on the bundle: not remembered.
fn transient(reason: String) -> Refusal {
    Refusal {
        reason,
        version: 0,
        remember: None,
    }
}

const SEEN_LIMIT: usize = 200;
/// What `seen.json` says of a bundle while it is checked (followed by the attempt).
pub(super) const CHECKING: &str = "checking, attempt";
/// The most a signed key list's sequence may move past the one in force: a list signed with a
/// leaked key cannot jump to `u64::MAX` and make every later list look old.
const MAX_KEY_STEP: u64 = 1000;
/// Attempts at checking a bundle during which the appliance stopped, before it is refused.
const MAX_CHECKS: u32 = 2;

impl<T> Models<T> {
    pub(super) fn remember(&self, st: &mut State, sha: &str, outcome: String) {
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
        {
            let st = self.state.lock().expect("models lock");
            if let Ok(Some(why)) = self.withdrawn_verdict(&st, sha256, with_rollback) {
                return Some(why);
            }
        }
        self.seen(sha256)
            .filter(|o| !o.starts_with(CHECKING))
            .filter(|o| !(with_rollback && o.starts_with("rejected")))
    }

    /// Refuses a bundle before it is even fetched (an announcement that cannot lead to an
    /// update): reported and remembered.
    pub fn reject_offer(&self, sha256: &str, version: u64, reason: String) {
        (self.report)(&msg(ModelEvent::Rejected, version, reason.clone()));
        let mut st = self.state.lock().expect("models lock");
        self.remember(&mut st, sha256, format!("rejected: {reason}"));
    }

    /// Reports an event of the update path that the store does not produce (a download).
    pub fn note(&self, event: ModelEvent, version: u64, detail: String) {
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
                (self.report)(&msg(ModelEvent::Rejected, r.version, reason.clone()));
                if let Some(sha) = r.remember {
                    let mut st = self.state.lock().expect("models lock");
                    self.remember(&mut st, &sha, format!("rejected: {reason}"));
                }
                Outcome::Rejected(reason)
            }
        }
    }

    fn try_install(&self, path: &Path, source: &str, rollbacks: &[SignedDoc]) -> Result<Outcome<T>, Refusal> {
        let cannot_read = |e: std::io::Error| transient(format!("cannot read {}: {e}", path.display()));
        let len = std::fs::metadata(path).map_err(cannot_read)?.len();
        // Hashed as it streams past: nothing of the file is held.
        let (sha, _) = file_sha256(path).map_err(cannot_read)?;
        if len > self.policy.max_bundle_bytes {
            return Err(refuse(
                &sha,
                0,
                format!(
                    "the file is {len} bytes, over the limit of {}",
                    self.policy.max_bundle_bytes
                ),
            ));
        }
        if let Some(o) = self.settled(&sha, !rollbacks.is_empty()) {
            return Ok(Outcome::Skipped(o));
        }
        {
            let st = self.state.lock().expect("models lock");
            if let Some(p) = &st.trust_problem {
                return Err(transient(format!("{p}: no update is installed until it is restored")));
            }
            self.withdrawn_verdict(&st, &sha, !rollbacks.is_empty())
                .map_err(transient)?;
        }
        // Remembered before anything that could stop the appliance: a file that did, twice,
        // is not tried a third time.
        self.mark_checking(&sha)?;
        let r = self.check_and_install(path, source, rollbacks, &sha);
        if let Err(Refusal { remember: None, .. }) = &r {
            // A failure of the moment (a read error, a full disk): the next offer is a new try.
            let mut st = self.state.lock().expect("models lock");
            if st.seen.get(&sha).is_some_and(|o| o.starts_with(CHECKING)) {
                st.seen.remove(&sha);
            }
        }
        r
    }

    /// Notes that the bundle `sha` is being checked; refuses it when the appliance stopped
    /// twice while it was.
    fn mark_checking(&self, sha: &str) -> Result<(), Refusal> {
        let mut st = self.state.lock().expect("models lock");
        let tries: u32 = st
            .seen
            .get(sha)
            .and_then(|o| o.strip_prefix(CHECKING))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        if tries >= MAX_CHECKS {
            return Err(refuse(
                sha,
                0,
                format!("the appliance stopped {tries} times while checking this file; it is not tried again"),
            ));
        }
        self.remember(&mut st, sha, format!("{CHECKING} {}", tries + 1));
        Ok(())
    }

    fn check_and_install(
        &self,
        path: &Path,
        source: &str,
        rollbacks: &[SignedDoc],
        sha: &str,
    ) -> Result<Outcome<T>, Refusal> {
        let (trusted, active) = {
            let st = self.state.lock().expect("models lock");
            (st.trusted.clone(), st.pointer.active.clone())
        };
        // Verified while streaming, in bounded memory: the signature before any part is read,
        // then every part's hash. Nothing a refused file claims is trusted, or read whole.
        let (manifest, signed_by) = UnverifiedBundle::verify_file(path, &trusted, &self.limits()).map_err(|e| {
            // What it claimed to be, for the lab, read only now that it is refused.
            let claimed = UnverifiedBundle::claimed_version(path).unwrap_or(0);
            refuse(sha, claimed, e.to_string())
        })?;
        let sha = sha.to_string();
        let m = &manifest;
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
        if let Some(clinic) = m.clinic.as_deref().filter(|c| *c != self.clinic) {
            return Err(refuse(
                &sha,
                v,
                format!(
                    "it was made for clinic {clinic:?} from that clinic's reviewed cells; this appliance belongs to clinic {:?}",
                    self.clinic
                ),
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
            ModelEvent::Verified,
            v,
            format!("{source}: signed by key {signed_by}, {} parts intact", m.parts.len()),
        ));
        step("verified");
        let name = format!("slot-v{v}-{}.bundle", &sha[..12]);
        let slot_path = self.dir.join(&name);
        // Until the pointer names it (or the install fails), the clean-up leaves it alone.
        let _staging = Staging::new(self, &name);
        copy_atomic_pausing(path, &slot_path, self.policy.max_bundle_bytes, Some("staging"))
            .map_err(|e| transient(format!("copying into {name}: {e:#}")))?;
        step("staged");
        // The staged copy, verified once more as it is mapped (the offered file may have
        // changed since it was checked; the copy cannot), is what the model is built from.
        let bundle = match Bundle::open_mapped(&slot_path, &trusted, &self.limits()) {
            Ok(b) if b.manifest == manifest && b.file_sha256() == Some(sha.as_str()) => b,
            Ok(_) => {
                let _ = std::fs::remove_file(&slot_path);
                return Err(transient(format!("{} changed while it was installed", path.display())));
            }
            Err(e) => {
                let _ = std::fs::remove_file(&slot_path);
                return Err(transient(format!(
                    "the copy on the appliance's disk does not verify ({e}): a disk fault? The file is offered again at the next check"
                )));
            }
        };
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
                key_sequence: st.pointer.key_sequence,
                keys: st.pointer.keys.clone(),
            },
            None => Pointer {
                active: new,
                previous: Some(left.clone()),
                probation: Some(Probation::default()),
                running: st.pointer.running,
                key_sequence: st.pointer.key_sequence,
                keys: st.pointer.keys.clone(),
            },
        };
        self.save_pointer_pausing(&next, Some("switching"))
            .map_err(|e| transient(format!("{e:#}")))?;
        step("switched");
        st.pointer = next;
        self.remove_unreferenced(&st);
        match instructed {
            Some(r) => {
                self.remember(&mut st, &left.sha256, format!("rolled back: {}", r.reason));
                self.withdraw(&mut st, &left, &r.reason);
                self.reinstate(&mut st, &sha);
                (self.report)(&msg(
                    ModelEvent::RolledBack,
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
                    ModelEvent::Active,
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

    /// A signed instruction to return to a model still on this device (the fallback or the
    /// factory model). `Skipped` when it does not apply here.
    pub fn rollback_installed(&self, doc: &SignedDoc, source: &str) -> Outcome<T> {
        let mut st = self.state.lock().expect("models lock");
        if let Some(p) = &st.trust_problem {
            return Outcome::Rejected(format!(
                "{source}: {p}: no rollback instruction is accepted until it is restored"
            ));
        }
        let r: Rollback = match doc.verify(&st.trusted) {
            Ok(r) => r,
            Err(e) => {
                let reason = format!("{source}: rollback instruction refused: {e}");
                (self.report)(&msg(
                    ModelEvent::Rejected,
                    st.pointer.active.model_version,
                    reason.clone(),
                ));
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
                let left = st.pointer.active.clone();
                match self.switch_back(&mut st, &target, &r.reason, detail) {
                    Ok(()) => {
                        self.withdraw(&mut st, &left, &r.reason);
                        self.reinstate(&mut st, &target.sha256);
                        Outcome::Active(t)
                    }
                    Err(e) => Outcome::Rejected(format!("{e:#}")),
                }
            }
            Err(e) => {
                let reason = format!("{source}: version {} cannot be used: {e:#}", target.model_version);
                (self.report)(&msg(ModelEvent::Rejected, target.model_version, reason.clone()));
                Outcome::Rejected(reason)
            }
        }
    }

    /// A new trusted key list, signed by a key trusted now, with a higher sequence: it replaces
    /// the trusted keys (and bundles refused before are looked at again).
    pub fn apply_keys(&self, doc: &SignedDoc, source: &str) -> Outcome<()> {
        let mut st = self.state.lock().expect("models lock");
        let v = st.pointer.active.model_version;
        if let Some(p) = &st.trust_problem {
            let reason = format!("{source}: {p}: no key list is accepted until it is restored");
            (self.report)(&msg(ModelEvent::Rejected, v, reason.clone()));
            return Outcome::Rejected(reason);
        }
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
                (self.report)(&msg(ModelEvent::Rejected, v, reason.clone()));
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
        if list.sequence - st.key_sequence > MAX_KEY_STEP {
            let reason = format!(
                "{source}: key list {} jumps more than {MAX_KEY_STEP} past the one in force ({}); refused",
                list.sequence, st.key_sequence
            );
            (self.report)(&msg(ModelEvent::Rejected, v, reason.clone()));
            return Outcome::Rejected(reason);
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
        // The pointer remembers the sequence, so that a lost or older trust.json is noticed.
        let mut pointer = st.pointer.clone();
        pointer.key_sequence = list.sequence;
        pointer.keys = list.keys.clone();
        if let Err(e) = self.save_pointer(&pointer) {
            return Outcome::Rejected(format!("{source}: saving the key list's sequence: {e:#}"));
        }
        st.pointer = pointer;
        let ids: Vec<String> = keys.iter().map(wbc_protocol::bundle::key_id).collect();
        st.trusted = keys;
        st.key_sequence = list.sequence;
        st.seen.retain(|_, o| !o.starts_with("rejected"));
        (self.report)(&msg(
            ModelEvent::KeysUpdated,
            v,
            format!("{source}: key list {} now trusted: {}", list.sequence, ids.join(", ")),
        ));
        Outcome::Active(())
    }
}
