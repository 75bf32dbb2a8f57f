//! Where the model fails, as the lab sees it: per clinic and model version, how often the
//! technicians' reviews confirm the model's class, which classes they change into which, week by
//! week, and a flag where a clinic's agreement drops below the threshold (the signal that a site
//! needs adaptation or a new stain protocol). Read from the reviews of a time window (through
//! their index on `at`), so its cost grows with the window's reviews, not with the history.

use super::Db;
use super::queries::unix_day;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use wbc_protocol::messages::{CellRecord, Review};

/// When a clinic's agreement is flagged (`[agreement]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgreementSettings {
    /// Below this share of reviewed cells whose class the technician confirmed, the clinic and
    /// model version are flagged.
    pub threshold: f64,
    /// Fewer reviewed cells than this say nothing yet: no flag.
    pub min_reviews: u64,
}

impl Default for AgreementSettings {
    fn default() -> Self {
        AgreementSettings {
            threshold: 0.85,
            min_reviews: 20,
        }
    }
}

/// The model against the reviews at one clinic, for one model version.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Agreement {
    /// Clinic id.
    pub clinic: String,
    /// Model version that classified the cells.
    pub model_version: u64,
    /// Reviewed cells the model had given a class.
    pub reviewed: u64,
    /// Of those, cells whose class the technician confirmed.
    pub confirmed: u64,
    /// `confirmed / reviewed`; none without reviews.
    pub agreement: Option<f64>,
    /// Reviewed cells the model had set aside (Unidentified): what the technician made of them
    /// is in `changes`, they are not counted for or against the model.
    pub set_aside_reviewed: u64,
    /// Agreement below the threshold over at least `min_reviews` cells.
    pub low: bool,
    /// Model class → reviewed class, for every cell whose class the technician changed, most
    /// frequent first.
    pub changes: Vec<Change>,
    /// Week by week (weeks starting on the Unix epoch's weekday, a Thursday), oldest first.
    pub weeks: Vec<Week>,
}

/// How often the technicians changed one class into another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// The model's class (`Unidentified` for a cell set aside).
    pub model: String,
    /// The technician's class (`Not a white cell` for none).
    pub review: String,
    /// Cells.
    pub count: u64,
}

/// One week's reviews of cells the model classified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Week {
    /// First day, `YYYY-MM-DD`.
    pub from: String,
    /// Reviewed cells.
    pub reviewed: u64,
    /// Confirmed.
    pub confirmed: u64,
}

/// What the technician called a cell, in words.
pub const NOT_A_WHITE_CELL: &str = "Not a white cell";

impl Db {
    /// The model against the reviews made in the last `days` days (of one clinic, or of all),
    /// per clinic and model version: flagged ones first, then by clinic and version.
    pub fn agreement(
        &self,
        clinic: Option<&str>,
        days: u32,
        s: &AgreementSettings,
        now: u64,
    ) -> Result<Vec<Agreement>> {
        let since = now.saturating_sub(u64::from(days) * 86_400);
        let rows = self.conn.lock().query(
            "SELECT r.clinic, c.class, c.cell_json, r.review_json, r.at FROM reviews r
             JOIN cells c ON c.clinic = r.clinic AND c.device = r.device AND c.field_id = r.field_id AND c.idx = r.idx
             WHERE r.at >= $1 AND (CAST($2 AS TEXT) IS NULL OR r.clinic = $2)",
            &[since.into(), clinic.into()],
        )?;
        #[derive(Default)]
        struct Tally {
            reviewed: u64,
            confirmed: u64,
            set_aside: u64,
            changes: BTreeMap<(String, String), u64>,
            weeks: BTreeMap<i64, (u64, u64)>,
        }
        let mut by: BTreeMap<(String, u64), Tally> = BTreeMap::new();
        for r in rows {
            let (clinic, model_class) = (r[0].text()?, r[1].text()?);
            let (cell_json, review_json) = (r[2].text()?, r[3].text()?);
            let parsed = serde_json::from_str::<CellRecord>(&cell_json)
                .and_then(|c| Ok((c, serde_json::from_str::<Review>(&review_json)?)));
            let Ok((cell, review)) = parsed else {
                tracing::error!(%clinic, "skipping a damaged cell or review row");
                continue;
            };
            let reviewed_class = review.class.map_or(NOT_A_WHITE_CELL, |c| c.name());
            let t = by.entry((clinic, cell.result.model_version)).or_default();
            if cell.result.class.is_none() {
                t.set_aside += 1;
            } else {
                let agreed = reviewed_class == model_class;
                t.reviewed += 1;
                t.confirmed += u64::from(agreed);
                let w = t.weeks.entry(r[4].int()? / (7 * 86_400)).or_default();
                w.0 += 1;
                w.1 += u64::from(agreed);
            }
            if reviewed_class != model_class {
                *t.changes.entry((model_class, reviewed_class.to_string())).or_default() += 1;
            }
        }
        let mut out: Vec<Agreement> = by
            .into_iter()
            .map(|((clinic, model_version), t)| {
                let agreement = (t.reviewed > 0).then(|| t.confirmed as f64 / t.reviewed as f64);
                let mut changes: Vec<Change> = t
                    .changes
                    .into_iter()
                    .map(|((model, review), count)| Change { model, review, count })
                    .collect();
                changes.sort_by_key(|c| std::cmp::Reverse(c.count));
                Agreement {
                    clinic,
                    model_version,
                    reviewed: t.reviewed,
                    confirmed: t.confirmed,
                    low: t.reviewed >= s.min_reviews && agreement.is_some_and(|a| a < s.threshold),
                    agreement,
                    set_aside_reviewed: t.set_aside,
                    changes,
                    weeks: t
                        .weeks
                        .into_iter()
                        .map(|(w, (reviewed, confirmed))| Week {
                            from: unix_day(w * 7),
                            reviewed,
                            confirmed,
                        })
                        .collect(),
                }
            })
            .collect();
        out.sort_by_key(|a| !a.low);
        Ok(out)
    }
}
