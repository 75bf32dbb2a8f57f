//! A slide's differential: cells counted per class until a target, and the flags a technician
//! must see — any blast (urgent), cells held back as possible blasts, a class outside its
//! reference range, too few cells.
//!
//! The same computation serves the appliance (live, as cells arrive) and the central lab
//! (recomputed from the uplinked fields), so both always agree.

use crate::classes::CellClass;
use crate::messages::{FieldRecord, ReviewReason, SCHEMA_VERSION};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How a slide is counted and flagged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SlideSettings {
    /// Classified cells to count (100 or 200 in manual practice).
    pub target: u32,
    /// A finished slide with fewer classified cells than this is flagged.
    pub min_cells: u32,
    /// Reference range per class in percent of classified cells, `[low, high]`; checked once
    /// the target is reached or the slide is finished.
    pub reference_ranges: BTreeMap<CellClass, [f32; 2]>,
}

impl Default for SlideSettings {
    /// Adult peripheral-blood ranges, in percent (textbook values; a lab sets its own).
    fn default() -> Self {
        SlideSettings {
            target: 100,
            min_cells: 100,
            reference_ranges: BTreeMap::from([
                (CellClass::Neutrophil, [40.0, 75.0]),
                (CellClass::Lymphocyte, [20.0, 45.0]),
                (CellClass::Monocyte, [2.0, 10.0]),
                (CellClass::Eosinophil, [0.0, 6.0]),
                (CellClass::Basophil, [0.0, 2.0]),
                (CellClass::Blast, [0.0, 0.0]),
            ]),
        }
    }
}

/// Slide settings that cannot be counted against.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// A target of no cells.
    #[error("slide target must be at least 1 cell")]
    NoTarget,
    /// A reference range outside 0–100 % or upside down.
    #[error("reference range of {} must satisfy 0 ≤ low ≤ high ≤ 100", .0.name())]
    BadRange(CellClass),
}

impl SlideSettings {
    /// Refuses settings that cannot be counted against.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if self.target == 0 {
            return Err(SettingsError::NoTarget);
        }
        for (c, [lo, hi]) in &self.reference_ranges {
            if !(lo.is_finite() && hi.is_finite() && 0.0 <= *lo && lo <= hi && *hi <= 100.0) {
                return Err(SettingsError::BadRange(*c));
            }
        }
        Ok(())
    }
}

/// Count and share of one class.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClassCount {
    /// Cells of the class.
    pub count: u32,
    /// Percent of classified cells.
    pub percent: f32,
}

/// Something on a slide that a technician must look at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "flag", rename_all = "snake_case")]
pub enum Flag {
    /// At least one blast: urgent review by the central lab.
    Blast {
        /// Blasts counted.
        count: u32,
    },
    /// Cells set aside whose most probable class is Blast, not yet reviewed
    /// ([`CellResult::possible_blast`](crate::messages::CellResult::possible_blast)): a
    /// technician looks at them first. Not urgent by itself — a model that is unsure about
    /// another site's lymphocytes must not sound the blast alarm — but a cell the technician
    /// confirms as a blast raises [`Flag::Blast`].
    PossibleBlast {
        /// Cells held back.
        count: u32,
    },
    /// A class outside its reference range.
    OutOfRange {
        /// The class.
        class: CellClass,
        /// Its share, percent.
        percent: f32,
        /// Range low, percent.
        low: f32,
        /// Range high, percent.
        high: f32,
    },
    /// The slide was finished with fewer classified cells than required.
    TooFewCells {
        /// Classified cells.
        counted: u32,
        /// Required.
        minimum: u32,
    },
    /// A flag a newer version raised that this one does not know: the message that carries it
    /// is read (as this, without the flag's details) instead of refused.
    #[serde(other)]
    Unknown,
}

impl Flag {
    /// Whether the flag calls for urgent review.
    pub fn urgent(&self) -> bool {
        matches!(self, Flag::Blast { .. })
    }

    /// What identifies the flag regardless of its counts: `blast`, `range:<class>`,
    /// `too_few`. A new key is news for central; a changed count is not.
    pub fn key(&self) -> String {
        match self {
            Flag::Blast { .. } => "blast".into(),
            Flag::PossibleBlast { .. } => "possible_blast".into(),
            Flag::OutOfRange { class, .. } => format!("range:{}", class.name()),
            Flag::TooFewCells { .. } => "too_few".into(),
            Flag::Unknown => "unknown".into(),
        }
    }

    /// One line for a technician.
    pub fn message(&self) -> String {
        match self {
            Flag::Blast { count } => format!(
                "URGENT: {count} blast{} found — send the slide for review",
                if *count == 1 { "" } else { "s" }
            ),
            Flag::PossibleBlast { count } => format!(
                "{} — review {} first; a confirmed blast raises the urgent flag",
                if *count == 1 {
                    "1 cell held back as a possible blast".to_string()
                } else {
                    format!("{count} cells held back as possible blasts")
                },
                if *count == 1 { "it" } else { "them" }
            ),
            Flag::OutOfRange {
                class,
                percent,
                low,
                high,
            } => format!(
                "{} {percent:.1} % is outside the reference range {low}–{high} %",
                class.name()
            ),
            Flag::TooFewCells { counted, minimum } => {
                format!("only {counted} cells classified; at least {minimum} are needed for a differential")
            }
            Flag::Unknown => "a flag this version does not know; see the device's own report".into(),
        }
    }
}

/// The differential of a slide so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlideReport {
    /// Schema version.
    pub schema_version: u32,
    /// Slide id.
    pub slide_id: String,
    /// Fields that contributed.
    pub fields: u32,
    /// Cells with a class (the technician's where reviewed, else the model's).
    pub classified: u32,
    /// Cells left for review without a class.
    pub unidentified: u32,
    /// Cells cut by a field's edge (not counted).
    pub edge_cut: u32,
    /// Per class, in class order (every class present).
    pub per_class: BTreeMap<String, ClassCount>,
    /// Target reached.
    pub complete: bool,
    /// The technician closed the slide.
    pub finished: bool,
    /// Flags, urgent first.
    pub flags: Vec<Flag>,
}

/// The class a cell counts as: the technician's review where there is one, else the model's.
/// `None` for Unidentified; cells cut by the edge are not cells of the differential at all.
pub fn counted_class(cell: &crate::messages::CellRecord) -> Option<Option<CellClass>> {
    if let Some(r) = &cell.review {
        return Some(r.class);
    }
    if cell.result.review_reason == Some(ReviewReason::EdgeCut) {
        return None;
    }
    Some(cell.result.class)
}

/// Computes the differential and flags of a slide from its fields.
pub fn report(slide_id: &str, fields: &[FieldRecord], settings: &SlideSettings, finished: bool) -> SlideReport {
    let mut counts = [0u32; crate::classes::NUM_CLASSES];
    let (mut unidentified, mut edge_cut, mut possible_blasts) = (0, 0, 0);
    for cell in fields.iter().flat_map(|f| &f.cells) {
        match counted_class(cell) {
            None => edge_cut += 1,
            Some(None) => unidentified += 1,
            Some(Some(c)) => counts[c.index()] += 1,
        }
        if cell.review.is_none() && cell.result.possible_blast() {
            possible_blasts += 1;
        }
    }
    let classified: u32 = counts.iter().sum();
    let pct = |n: u32| {
        if classified == 0 {
            0.0
        } else {
            100.0 * n as f32 / classified as f32
        }
    };
    let per_class = CellClass::ALL
        .iter()
        .map(|c| {
            let n = counts[c.index()];
            (
                c.name().to_string(),
                ClassCount {
                    count: n,
                    percent: pct(n),
                },
            )
        })
        .collect();
    let complete = classified >= settings.target;
    let mut flags = Vec::new();
    let blasts = counts[CellClass::Blast.index()];
    if blasts > 0 {
        flags.push(Flag::Blast { count: blasts });
    }
    if possible_blasts > 0 {
        flags.push(Flag::PossibleBlast { count: possible_blasts });
    }
    if complete || finished {
        for (c, [lo, hi]) in &settings.reference_ranges {
            let p = pct(counts[c.index()]);
            // A blast already has its own, urgent flag.
            if *c != CellClass::Blast && classified > 0 && (p < *lo || p > *hi) {
                flags.push(Flag::OutOfRange {
                    class: *c,
                    percent: p,
                    low: *lo,
                    high: *hi,
                });
            }
        }
    }
    if finished && classified < settings.min_cells {
        flags.push(Flag::TooFewCells {
            counted: classified,
            minimum: settings.min_cells,
        });
    }
    SlideReport {
        schema_version: SCHEMA_VERSION,
        slide_id: slide_id.to_string(),
        fields: fields.len() as u32,
        classified,
        unidentified,
        edge_cut,
        per_class,
        complete,
        finished,
        flags,
    }
}

/// How soon a technician should look at a cell waiting for review.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ReviewPriority {
    /// Called Blast: confirm it before the urgent flag goes out as a finding.
    Blast,
    /// Held back as a possible blast.
    PossibleBlast,
    /// Any other cell set aside.
    Other,
}

/// The cells of `fields` that wait for a technician — set aside without a class, or called
/// Blast — and not yet reviewed, as `(priority, field index, cell index)`: blasts first, then
/// possible blasts, then the rest, each in field order. Cells cut by the edge wait for nobody.
pub fn review_queue(fields: &[FieldRecord]) -> Vec<(ReviewPriority, usize, usize)> {
    let mut queue: Vec<_> = fields
        .iter()
        .enumerate()
        .flat_map(|(fi, f)| f.cells.iter().enumerate().map(move |(ci, c)| (fi, ci, c)))
        .filter(|(_, _, c)| c.review.is_none() && c.result.review_reason != Some(ReviewReason::EdgeCut))
        .filter_map(|(fi, ci, c)| {
            let priority = match c.result.class {
                Some(CellClass::Blast) => ReviewPriority::Blast,
                Some(_) => return None,
                None if c.result.possible_blast() => ReviewPriority::PossibleBlast,
                None => ReviewPriority::Other,
            };
            Some((priority, fi, ci))
        })
        .collect();
    queue.sort_by_key(|q| q.0);
    queue
}

#[cfg(test)]
mod tests {

    #[test]
    fn flag_keys_ignore_counts_and_tell_classes_apart() {
        assert_eq!(Flag::Blast { count: 1 }.key(), Flag::Blast { count: 9 }.key());
        let range = |class, percent| Flag::OutOfRange {
            class,
            percent,
            low: 0.0,
            high: 1.0,
        };
        assert_eq!(
            range(CellClass::Monocyte, 5.0).key(),
            range(CellClass::Monocyte, 7.0).key()
        );
        assert_ne!(
            range(CellClass::Monocyte, 5.0).key(),
            range(CellClass::Basophil, 5.0).key()
        );
        assert_ne!(
            Flag::Blast { count: 1 }.key(),
            Flag::TooFewCells { counted: 1, minimum: 2 }.key()
        );
    }

    use super::*;
    use crate::attributes::AttributeSet;
    use crate::messages::{CellRecord, CellResult, Review};

    fn cell(class: CellClass) -> CellRecord {
        let mut p = [0.0; 6];
        p[class.index()] = 1.0;
        CellRecord {
            result: CellResult::from_probabilities(&p, &AttributeSet::default(), String::new(), 0.5, 1),
            review: None,
        }
    }

    fn field(cells: Vec<CellRecord>) -> FieldRecord {
        FieldRecord {
            schema_version: SCHEMA_VERSION,
            header: crate::messages::FieldHeader {
                id: "f".into(),
                slide_id: "s".into(),
                received_at: 0,
                source: "test".into(),
                name: "f.jpg".into(),
                image_sha256: String::new(),
                width: 640,
                height: 480,
                single_cell: false,
                microns_per_pixel: 0.1,
            },
            cells,
        }
    }

    fn many(class: CellClass, n: usize) -> Vec<CellRecord> {
        (0..n).map(|_| cell(class)).collect()
    }

    #[test]
    fn a_normal_slide_counts_to_the_target_without_flags() {
        let mut cells = many(CellClass::Neutrophil, 60);
        cells.extend(many(CellClass::Lymphocyte, 30));
        cells.extend(many(CellClass::Monocyte, 6));
        cells.extend(many(CellClass::Eosinophil, 3));
        cells.extend(many(CellClass::Basophil, 1));
        let r = report("s", &[field(cells)], &SlideSettings::default(), false);
        assert_eq!(r.classified, 100);
        assert!(r.complete);
        assert_eq!(r.per_class["Neutrophil"].count, 60);
        assert!((r.per_class["Neutrophil"].percent - 60.0).abs() < 1e-4);
        assert_eq!(r.per_class.len(), 6);
        assert!(r.flags.is_empty(), "{:?}", r.flags);
    }

    #[test]
    fn one_blast_is_urgent_at_once_and_ranges_wait_for_the_target() {
        let mut cells = many(CellClass::Lymphocyte, 9);
        cells.push(cell(CellClass::Blast));
        let r = report("s", &[field(cells.clone())], &SlideSettings::default(), false);
        assert!(!r.complete);
        assert_eq!(r.flags, vec![Flag::Blast { count: 1 }]);
        assert!(r.flags[0].urgent() && r.flags[0].message().contains("URGENT"));
        // Finished early: ranges are checked and the slide is short.
        let r = report("s", &[field(cells)], &SlideSettings::default(), true);
        assert!(r.flags.contains(&Flag::TooFewCells {
            counted: 10,
            minimum: 100
        }));
        assert!(r.flags.iter().any(|f| matches!(
            f,
            Flag::OutOfRange {
                class: CellClass::Lymphocyte,
                ..
            }
        )));
        assert!(
            r.flags.iter().any(
                |f| matches!(f, Flag::OutOfRange { class: CellClass::Neutrophil, percent, .. } if *percent == 0.0)
            )
        );
        assert!(r.flags[0].urgent(), "urgent first");
    }

    #[test]
    fn reviews_override_the_model_and_unidentified_and_cut_cells_are_kept_apart() {
        let mut unsure = cell(CellClass::Monocyte);
        unsure.result.class = None;
        unsure.result.review_reason = Some(ReviewReason::LowConfidence);
        let mut cut = cell(CellClass::Neutrophil);
        cut.result.class = None;
        cut.result.review_reason = Some(ReviewReason::EdgeCut);
        let mut corrected = cell(CellClass::Blast);
        corrected.review = Some(Review {
            class: Some(CellClass::Lymphocyte),
            by: "tech".into(),
            at: 1,
        });
        let r = report(
            "s",
            &[field(vec![unsure.clone(), cut, corrected, cell(CellClass::Neutrophil)])],
            &SlideSettings::default(),
            false,
        );
        assert_eq!((r.classified, r.unidentified, r.edge_cut), (2, 1, 1));
        assert_eq!(r.per_class["Lymphocyte"].count, 1);
        assert_eq!(r.per_class["Blast"].count, 0);
        assert!(r.flags.is_empty(), "the corrected blast raises no flag");
        // A technician can also classify an Unidentified cell.
        unsure.review = Some(Review {
            class: Some(CellClass::Monocyte),
            by: "tech".into(),
            at: 2,
        });
        let r = report("s", &[field(vec![unsure])], &SlideSettings::default(), false);
        assert_eq!((r.classified, r.unidentified), (1, 0));
    }

    /// A cell set aside for `reason` whose most probable class is `class`.
    fn held(class: CellClass, reason: ReviewReason) -> CellRecord {
        let mut c = cell(class);
        c.result.class = None;
        c.result.review_reason = Some(reason);
        c
    }

    #[test]
    fn cells_held_back_as_possible_blasts_are_flagged_until_reviewed() {
        let mut cells = many(CellClass::Neutrophil, 5);
        cells.push(held(CellClass::Blast, ReviewReason::LowConfidence));
        cells.push(held(CellClass::Blast, ReviewReason::NeighboursDisagree));
        cells.push(held(CellClass::Blast, ReviewReason::Unfamiliar));
        // Not possible blasts: another class set aside, and cells without a usable answer.
        cells.push(held(CellClass::Lymphocyte, ReviewReason::LowConfidence));
        cells.push(held(CellClass::Blast, ReviewReason::NoCell));
        let mut cut = cell(CellClass::Blast);
        cut.result = crate::messages::CellResult::edge_cut([0, 0, 1, 1], 1);
        cells.push(cut);
        let r = report("s", &[field(cells.clone())], &SlideSettings::default(), false);
        assert_eq!(r.flags, vec![Flag::PossibleBlast { count: 3 }]);
        assert!(!r.flags[0].urgent(), "a possible blast is not the blast alarm");
        assert!(
            r.flags[0].message().starts_with("3 cells held back as possible blasts"),
            "{}",
            r.flags[0].message()
        );
        assert_eq!(r.unidentified, 5);

        // Reviewed: one is a lymphocyte, one a blast (the urgent flag, first), one still waits.
        let review = |class| {
            Some(Review {
                class: Some(class),
                by: "tech".into(),
                at: 1,
            })
        };
        cells[5].review = review(CellClass::Lymphocyte);
        cells[6].review = review(CellClass::Blast);
        let r = report("s", &[field(cells.clone())], &SlideSettings::default(), false);
        assert_eq!(
            r.flags,
            vec![Flag::Blast { count: 1 }, Flag::PossibleBlast { count: 1 }]
        );
        assert!(
            r.flags[1]
                .message()
                .starts_with("1 cell held back as a possible blast — review it"),
            "{}",
            r.flags[1].message()
        );
        cells[7].review = review(CellClass::Neutrophil);
        let r = report("s", &[field(cells)], &SlideSettings::default(), false);
        assert_eq!(r.flags, vec![Flag::Blast { count: 1 }]);
    }

    #[test]
    fn the_review_queue_puts_blasts_then_possible_blasts_first_and_skips_reviewed_cells() {
        let mut reviewed = held(CellClass::Blast, ReviewReason::LowConfidence);
        reviewed.review = Some(Review {
            class: Some(CellClass::Lymphocyte),
            by: "tech".into(),
            at: 1,
        });
        let mut cut = cell(CellClass::Blast);
        cut.result = crate::messages::CellResult::edge_cut([0, 0, 1, 1], 1);
        let first = field(vec![
            held(CellClass::Monocyte, ReviewReason::Unfamiliar),
            cell(CellClass::Neutrophil),
            held(CellClass::Blast, ReviewReason::LowConfidence),
            reviewed,
            cut,
        ]);
        let second = field(vec![
            cell(CellClass::Blast),
            held(CellClass::Blast, ReviewReason::NeighboursDisagree),
        ]);
        assert_eq!(
            review_queue(&[first, second]),
            vec![
                (ReviewPriority::Blast, 1, 0),
                (ReviewPriority::PossibleBlast, 0, 2),
                (ReviewPriority::PossibleBlast, 1, 1),
                (ReviewPriority::Other, 0, 0),
            ]
        );
        assert!(review_queue(&[]).is_empty());
    }

    #[test]
    fn flags_survive_the_wire_and_a_newer_versions_flag_is_kept_as_unknown() {
        for f in [
            Flag::Blast { count: 2 },
            Flag::PossibleBlast { count: 3 },
            Flag::TooFewCells { counted: 1, minimum: 2 },
        ] {
            let text = serde_json::to_string(&f).unwrap();
            assert_eq!(serde_json::from_str::<Flag>(&text).unwrap(), f, "{text}");
        }
        assert_eq!(
            serde_json::to_string(&Flag::PossibleBlast { count: 3 }).unwrap(),
            r#"{"flag":"possible_blast","count":3}"#
        );
        let f: Flag = serde_json::from_str(r#"{"flag":"clumped_platelets","count":4}"#).unwrap();
        assert_eq!(f, Flag::Unknown);
        assert!(!f.urgent());
        assert_eq!(f.key(), "unknown");
        assert!(
            serde_json::from_str::<Flag>(r#"{"count":4}"#).is_err(),
            "a flag without its kind"
        );
    }

    #[test]
    fn settings_are_validated_and_an_empty_slide_is_flagged_when_finished() {
        assert!(SlideSettings::default().validate().is_ok());
        let mut s = SlideSettings {
            target: 0,
            ..Default::default()
        };
        assert!(s.validate().is_err());
        s.target = 200;
        s.reference_ranges.insert(CellClass::Monocyte, [12.0, 2.0]);
        assert!(s.validate().unwrap_err().to_string().contains("Monocyte"));
        let r = report("s", &[], &SlideSettings::default(), true);
        assert_eq!(r.classified, 0);
        assert_eq!(
            r.flags,
            vec![Flag::TooFewCells {
                counted: 0,
                minimum: 100
            }]
        );
    }
}
