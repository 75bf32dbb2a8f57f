//! `withdrawn.json`: the bundles the lab withdrew with a signed rollback instruction. Kept
//! apart from `seen.json` (a bounded memory of offers, which ages out oldest first): a withdrawn
//! bundle stays out however many other files are offered after it, until a signed rollback
//! instruction names it again. Damaged, the list is not guessed at: no update is installed until
//! it is restored (the lab is told).

use super::{Models, Slot, State, write_atomic};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use wbc_protocol::clock::now;

/// A bundle the lab withdrew.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Withdrawn {
    /// Its model version.
    pub model_version: u64,
    /// The lab's reason, from the signed instruction.
    pub reason: String,
    /// When, seconds since the Unix epoch.
    pub at: u64,
}

/// The withdrawn bundles by sha256, or why the list cannot be read.
pub(super) type WithdrawnList = Result<BTreeMap<String, Withdrawn>, String>;

const FILE: &str = "withdrawn.json";

/// Reads `withdrawn.json` from `dir` (none yet: an empty list).
pub(super) fn load(dir: &Path) -> WithdrawnList {
    match std::fs::read(dir.join(FILE)) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("{FILE} is damaged ({e})")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(format!("{FILE} cannot be read ({e})")),
    }
}

impl<T> Models<T> {
    /// Records `slot`'s bundle as withdrawn by the lab for `reason`.
    pub(super) fn withdraw(&self, st: &mut State, slot: &Slot, reason: &str) {
        let Ok(list) = &mut st.withdrawn else {
            tracing::error!(
                "the withdrawn list is damaged; version {} is not added to it",
                slot.model_version
            );
            return;
        };
        list.insert(
            slot.sha256.clone(),
            Withdrawn {
                model_version: slot.model_version,
                reason: reason.chars().take(500).collect(),
                at: now(),
            },
        );
        self.save_withdrawn(list);
    }

    /// A signed instruction named a withdrawn bundle again: it may be installed.
    pub(super) fn reinstate(&self, st: &mut State, sha: &str) {
        if let Ok(list) = &mut st.withdrawn
            && list.remove(sha).is_some()
        {
            self.save_withdrawn(list);
        }
    }

    fn save_withdrawn(&self, list: &BTreeMap<String, Withdrawn>) {
        if let Err(e) = serde_json::to_vec_pretty(list)
            .map_err(anyhow::Error::from)
            .and_then(|b| write_atomic(&self.dir.join(FILE), &b))
        {
            tracing::error!(error = %format!("{e:#}"), "could not record a withdrawn model");
        }
    }

    /// Whether the bundle `sha` may not be installed: withdrawn (unless a rollback instruction
    /// comes with it), or the list is damaged. `Ok(Some(why))`: skipped; `Err(why)`: refused.
    pub(super) fn withdrawn_verdict(
        &self,
        st: &State,
        sha: &str,
        with_rollback: bool,
    ) -> Result<Option<String>, String> {
        match &st.withdrawn {
            Err(why) => Err(format!("{why}: no update is installed until it is restored")),
            Ok(list) => Ok(list
                .get(sha)
                .filter(|_| !with_rollback)
                .map(|w| format!("withdrawn by the lab (version {}): {}", w.model_version, w.reason))),
        }
    }

    /// The bundles the lab withdrew, by sha256 (empty when the list is damaged).
    pub fn withdrawn(&self) -> BTreeMap<String, Withdrawn> {
        let st = self.state.lock().expect("models lock");
        st.withdrawn.clone().unwrap_or_default()
    }
}
