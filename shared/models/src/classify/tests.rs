//! Tests of the review rules and the blast guard's hold-back rule.

use super::*;
use crate::calibrate::OodConfig;

fn prediction(probs: [f32; NUM_CLASSES]) -> Prediction {
    Prediction {
        probs,
        logits: [0.0; NUM_CLASSES],
        features: vec![],
        unadapted_features: None,
        ood_score: Some(0.1),
        cell_found: Some(true),
        cell_size: None,
        cell_cut: None,
        neighbour_class: Some(5),
        attributes: None,
        description: None,
        guard_logits: None,
    }
}

#[test]
fn the_blast_guard_holds_back_what_the_signed_model_calls_blast_and_the_taught_one_still_doubts() {
    let cal = Calibration {
        guard: Some(crate::calibrate::BlastGuard {
            temperature: 2.0,
            min_taught_blast: 0.1,
            from_model_version: 4,
            dark_nucleus: false,
        }),
        ..Calibration::default()
    };
    let monocyte = |blast: f32, guard: [f32; NUM_CLASSES]| {
        let mut probs = [0.0; NUM_CLASSES];
        probs[3] = 1.0 - blast;
        probs[5] = blast;
        let mut p = prediction(probs);
        p.guard_logits = Some(guard);
        p
    };
    let signed_blast = [0.0, 0.0, 0.0, 1.0, 0.0, 3.0];
    let held = guard_holds_back(&monocyte(0.15, signed_blast), 3, None, &cal).expect("held back");
    // The signed model's probabilities at its own temperature.
    // logits / 2 = [0, 0, 0, 0.5, 0, 1.5]: four classes at e^0.
    let (mono, blast) = ((0.5f32).exp(), (1.5f32).exp());
    assert!((held[5] - blast / (4.0 + mono + blast)).abs() < 1e-5, "{held:?}");
    // The taught model gives Blast less than the guard needs.
    assert_eq!(guard_holds_back(&monocyte(0.05, signed_blast), 3, None, &cal), None);
    // The signed model does not call it a blast.
    assert_eq!(
        guard_holds_back(&monocyte(0.4, [0.0, 0.0, 0.0, 3.0, 0.0, 1.0]), 3, None, &cal),
        None
    );
    // The taught model's own answer is Blast: its rules decide.
    assert_eq!(guard_holds_back(&monocyte(0.6, signed_blast), 5, None, &cal), None);
    // No cell in the picture; no guard; no guard logits.
    assert_eq!(
        guard_holds_back(&monocyte(0.15, signed_blast), 3, Some(ReviewReason::NoCell), &cal),
        None
    );
    assert_eq!(
        guard_holds_back(&monocyte(0.15, signed_blast), 3, None, &Calibration::default()),
        None
    );
    let mut bare = monocyte(0.15, signed_blast);
    bare.guard_logits = None;
    assert_eq!(guard_holds_back(&bare, 3, None, &cal), None);
    // A set-aside cell (unfamiliar) is held back as a possible blast too.
    assert!(guard_holds_back(&monocyte(0.15, signed_blast), 3, Some(ReviewReason::Unfamiliar), &cal).is_some());
}

#[test]
fn a_blast_call_needs_a_nucleus_as_large_as_the_val_blasts() {
    let cal = Calibration {
        blast_min_confidence: 0.9,
        blast_min_nucleus_um: 10.0,
        ..Calibration::default()
    };
    let sized = |class: usize, nucleus_px: f32, um: Option<f32>| {
        let mut probs = [0.01; NUM_CLASSES];
        probs[class] = 0.95;
        let mut p = prediction(probs);
        p.cell_size = Some(CellSize {
            diameter_px: nucleus_px * 1.5,
            nucleus_px,
            microns_per_pixel: um,
        });
        p
    };
    // A small lymphocyte's nucleus (7.5 µm) is not a blast's, however sure the model is.
    let small = sized(5, 75.0, Some(0.1));
    assert_eq!(small_for_a_blast(&small, &cal), Some(7.5));
    assert_eq!(review_reason(&small, 5, &cal, 0.0), Some(ReviewReason::LowConfidence));
    // 12 µm passes.
    let large = sized(5, 120.0, Some(0.1));
    assert_eq!(small_for_a_blast(&large, &cal), None);
    assert_eq!(review_reason(&large, 5, &cal, 0.0), None);
    // Unknown pixel size: the size cannot be judged and only the probability counts.
    assert_eq!(review_reason(&sized(5, 75.0, None), 5, &cal, 0.0), None);
    // Other classes are not held to a blast's size.
    assert_eq!(review_reason(&sized(2, 75.0, Some(0.1)), 2, &cal, 0.0), None);
    // No check in the calibration: no size rule.
    let plain = Calibration {
        blast_min_nucleus_um: 0.0,
        ..cal.clone()
    };
    assert_eq!(review_reason(&small, 5, &plain, 0.0), None);
    // Bundles without the check keep the calibration file older appliances read.
    let json = serde_json::to_value(&plain).unwrap();
    assert!(json.get("blast_min_nucleus_um").is_none(), "{json}");
    let back: Calibration = serde_json::from_value(serde_json::to_value(&cal).unwrap()).unwrap();
    assert_eq!(back, cal);
}

#[test]
fn review_rules_apply_in_order() {
    let cal = Calibration {
        temperature: 1.0,
        ood: Some(OodConfig {
            k: 5,
            threshold: 0.2,
            quantile: 0.99,
            bank_size: 10,
            require_agreement: true,
        }),
        blast_min_confidence: 0.9,
        blast_min_nucleus_um: 0.0,
        guard: None,
    };
    let blast = |p: f32| {
        let mut probs = [(1.0 - p) / 5.0; NUM_CLASSES];
        probs[5] = p;
        prediction(probs)
    };
    assert_eq!(
        review_reason(&blast(0.95), 5, &cal, 0.5),
        None,
        "a sure, familiar blast"
    );
    // Cut by a bar padding its picture: no Blast call (it goes to review as a possible blast),
    // but other classes are still reported.
    let mut cut = blast(0.95);
    cut.cell_cut = Some(true);
    assert_eq!(review_reason(&cut, 5, &cal, 0.5), Some(ReviewReason::LowConfidence));
    let mut cut_lym = prediction([0.0, 0.0, 0.95, 0.05, 0.0, 0.0]);
    cut_lym.neighbour_class = Some(2);
    cut_lym.cell_cut = Some(true);
    assert_eq!(review_reason(&cut_lym, 2, &cal, 0.5), None);
    assert_eq!(
        review_reason(&blast(0.85), 5, &cal, 0.5),
        Some(ReviewReason::LowConfidence),
        "blast calls need 0.9"
    );
    let mut p = blast(0.95);
    p.neighbour_class = Some(2);
    assert_eq!(review_reason(&p, 5, &cal, 0.5), Some(ReviewReason::NeighboursDisagree));
    p.ood_score = Some(0.3);
    assert_eq!(review_reason(&p, 5, &cal, 0.5), Some(ReviewReason::Unfamiliar));
    p.cell_found = Some(false);
    assert_eq!(review_reason(&p, 5, &cal, 0.5), Some(ReviewReason::NoCell));
    // The blast threshold does not apply to other classes; the general one does.
    let mut lym = prediction([0.0, 0.0, 0.85, 0.05, 0.05, 0.05]);
    lym.neighbour_class = Some(2);
    assert_eq!(review_reason(&lym, 2, &cal, 0.5), None);
    assert_eq!(review_reason(&lym, 2, &cal, 0.9), Some(ReviewReason::LowConfidence));
    // Without a familiarity model only the thresholds apply.
    let plain = Calibration::default();
    let mut q = blast(0.6);
    q.ood_score = None;
    q.neighbour_class = None;
    assert_eq!(review_reason(&q, 5, &plain, 0.5), None);
}
