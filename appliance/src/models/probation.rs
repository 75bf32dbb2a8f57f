//! Probation: a new model's trial. Fields it processes are counted until it is confirmed;
//! too many pipeline failures (or crashed starts, counted at the start in `slots`)
//! return to the fallback, else the factory model, and the model left is remembered as rolled
//! back so that it is not installed again.

use super::{Models, Pointer, Slot, State, msg};
use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use wbc_protocol::uplink::ModelEvent;

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

impl<T> Models<T> {
    /// Leaves the active model for the previous one, else the factory model. Reported.
    pub(super) fn fall_back(&self, st: &mut State, reason: &str) -> Result<T> {
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
                    ModelEvent::Rejected,
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
    pub(super) fn switch_back(&self, st: &mut State, target: &Slot, why: &str, detail: String) -> Result<()> {
        let left = st.pointer.active.clone();
        st.pointer = Pointer {
            active: target.clone(),
            previous: None,
            probation: None,
            running: st.pointer.running,
            key_sequence: st.pointer.key_sequence,
            keys: st.pointer.keys.clone(),
        };
        self.save_pointer(&st.pointer)?;
        if left.file.is_some() {
            self.remember(st, &left.sha256, format!("rolled back: {why}"));
        }
        self.remove_unreferenced(st);
        (self.report)(&msg(ModelEvent::RolledBack, target.model_version, detail));
        Ok(())
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
                    ModelEvent::Confirmed,
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
}
