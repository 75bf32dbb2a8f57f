//! Tests of central's database, each run on every database the build supports (SQLite, and
//! PostgreSQL with the `postgres` feature), and [`jpeg`], a real JPEG for other tests to send.

use super::{Applied, Db, now};
use crate::sql::{Conn, databases};
use std::path::Path;
use wbc_protocol::classes::CellClass;
use wbc_protocol::messages::{CellRecord, CellResult, FieldRecord, Review, SCHEMA_VERSION};
use wbc_protocol::slide::{Flag, SlideSettings, report};
use wbc_protocol::uplink::{
    Body, CellMessage, DeviceState, Envelope, ModelEvent, ModelMessage, ReviewMessage, SlideMessage, Status,
    UPLINK_SCHEMA_VERSION,
};

/// A field of slide `slide` whose cells the model called `classes` (label ids).
pub(crate) fn field(id: &str, slide: &str, classes: &[usize]) -> FieldRecord {
    FieldRecord {
        schema_version: SCHEMA_VERSION,
        header: wbc_protocol::messages::FieldHeader {
            id: id.into(),
            slide_id: slide.into(),
            received_at: now(),
            source: "camera".into(),
            name: "f.jpg".into(),
            image_sha256: "00".into(),
            width: 10,
            height: 10,
            single_cell: false,
            microns_per_pixel: 0.1,
        },
        cells: classes
            .iter()
            .map(|&c| {
                let mut p = [0.0; 6];
                p[c] = 1.0;
                CellRecord {
                    result: CellResult::from_probabilities(&p, &Default::default(), "d".into(), 0.5, 1),
                    review: None,
                }
            })
            .collect(),
    }
}

fn envelopes(clinic: &str, first_seq: u64, bodies: Vec<Body>) -> Vec<Envelope> {
    bodies
        .into_iter()
        .enumerate()
        .map(|(i, b)| Envelope::new(clinic, "dev1", first_seq + i as u64, now(), b))
        .collect()
}

#[test]
fn each_message_counts_once_and_slides_are_rebuilt_from_cells() {
    for (_guard, path) in databases() {
        counts_once(&path);
    }
}

fn counts_once(path: &Path) {
    let db = Db::open(path).unwrap();
    let neut = CellClass::Neutrophil.index();
    let blast = CellClass::Blast.index();
    let msgs = envelopes("a", 1, Body::cells_of(&field("f1", "s1", &[neut, neut, blast])));
    for m in &msgs {
        assert_eq!(db.apply(m).unwrap(), Applied::New);
    }
    for m in &msgs {
        assert_eq!(db.apply(m).unwrap(), Applied::Duplicate, "a resend changes nothing");
    }
    // The technician says the blast is a lymphocyte.
    let review = Envelope::new(
        "a",
        "dev1",
        10,
        now(),
        Body::Review(ReviewMessage {
            field_id: "f1".into(),
            slide_id: "s1".into(),
            index: 2,
            review: Review {
                class: Some(CellClass::Lymphocyte),
                by: "t".into(),
                at: now(),
            },
            picture: None,
        }),
    );
    db.apply(&review).unwrap();
    for m in envelopes("b", 1, Body::cells_of(&field("f2", "s9", &[blast]))) {
        db.apply(&m).unwrap();
    }
    drop(db);
    let db = Db::open(path).unwrap();
    assert_eq!(db.message_count().unwrap(), 5);
    let slides = db.slides(None).unwrap();
    assert_eq!(slides.len(), 2);
    assert_eq!(
        (slides[0].clinic.as_str(), slides[0].blast),
        ("b", true),
        "blasts first"
    );
    let a = &slides[1];
    assert!(!a.blast, "the review overrides the model");
    assert_eq!(a.report.per_class["Neutrophil"].count, 2);
    assert_eq!(a.report.per_class["Lymphocyte"].count, 1);
    assert_eq!(db.slides(Some("a")).unwrap().len(), 1);
    let counts = db.cell_counts().unwrap();
    assert_eq!(counts[&("a".to_string(), "dev1".to_string(), "s1".to_string())], 3);
    let days = db.results_over_time(Some("a"), 7).unwrap();
    assert_eq!(days.iter().map(|d| d.count).sum::<u64>(), 3);
}

#[test]
fn slides_with_possible_blasts_come_after_blasts_and_before_the_rest() {
    for (_guard, path) in databases() {
        let db = Db::open(&path).unwrap();
        let (neut, blast) = (CellClass::Neutrophil.index(), CellClass::Blast.index());
        // Clinic "p": a cell whose most probable class is Blast, too unsure to be called one.
        let mut unsure = field("f3", "s3", &[neut]);
        let mut p = [0.05; 6];
        p[blast] = 0.45;
        unsure.cells.push(CellRecord {
            result: CellResult::from_probabilities(&p, &Default::default(), "d".into(), 0.5, 1),
            review: None,
        });
        for (clinic, f) in [
            ("n", field("f1", "s1", &[neut])),
            ("p", unsure),
            ("b", field("f2", "s2", &[blast])),
        ] {
            for m in envelopes(clinic, 1, Body::cells_of(&f)) {
                db.apply(&m).unwrap();
            }
        }
        let slides = db.slides(None).unwrap();
        let order: Vec<(&str, bool, bool)> = slides
            .iter()
            .map(|s| (s.clinic.as_str(), s.blast, s.possible_blast))
            .collect();
        assert_eq!(order, vec![("b", true, false), ("p", false, true), ("n", false, false)]);
        assert_eq!(slides[1].report.flags, vec![Flag::PossibleBlast { count: 1 }]);
        assert_eq!(slides[1].report.unidentified, 1);
        // The slide itself: the cell waiting for review first, then the rest.
        let d = db.slide("p", "dev1", "s3").unwrap().unwrap();
        assert_eq!(d.slide, slides[1]);
        let waiting: Vec<_> = d.cells.iter().map(|c| (c.waiting, c.cell.result.class)).collect();
        assert_eq!(
            waiting,
            vec![(Some("possible_blast"), None), (None, Some(CellClass::Neutrophil))]
        );
        assert!(d.cells.iter().all(|c| c.field_id == "f3"));
        let b = db.slide("b", "dev1", "s2").unwrap().unwrap();
        assert_eq!(b.cells[0].waiting, Some("blast"));
        assert_eq!(db.slide("p", "dev1", "s2").unwrap(), None, "another clinic's slide id");
        assert_eq!(db.slide("p", "dev2", "s3").unwrap(), None, "another device");
        assert_eq!(db.slide("p", "dev1", "' OR 1=1 --").unwrap(), None);
    }
}

/// A real JPEG of `side` pixels.
pub fn jpeg(side: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(side, side, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 128]));
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new(&mut out)
        .encode_image(&img)
        .unwrap();
    out
}

#[test]
fn a_cells_picture_is_kept_when_it_is_a_picture_and_dropped_alone_when_not() {
    for (_guard, path) in databases() {
        let db = Db::open(&path).unwrap();
        let blast = CellClass::Blast.index();
        let f = field("f1", "s1", &[blast, blast, blast, blast]);
        let good = jpeg(64);
        let mut corrupt = good.clone();
        corrupt.truncate(good.len() / 2);
        let pictures = [Some(good.clone()), Some(corrupt), None, None];
        let mut bodies = Body::cells_with_pictures(&f, |i| pictures[i].clone());
        // A JPEG too large to decode here (1024 px; an appliance sends 128), and a picture
        // that is no base64 at all, sent by a broken or hostile device.
        let mut huge = Vec::new();
        image::codecs::jpeg::JpegEncoder::new(&mut huge)
            .encode_image(&image::RgbImage::from_pixel(1024, 1024, image::Rgb([200, 120, 160])))
            .unwrap();
        assert!(huge.len() <= wbc_protocol::uplink::MAX_PICTURE_BYTES, "{}", huge.len());
        if let Body::Cell(m) = &mut bodies[2] {
            m.picture = Some(CellMessage::encode_picture(&huge));
        }
        if let Body::Cell(m) = &mut bodies[3] {
            m.picture = Some("\u{0}<script>".into());
        }
        for m in envelopes("a", 1, bodies) {
            assert_eq!(db.apply(&m).unwrap(), Applied::New);
        }
        let d = db.slide("a", "dev1", "s1").unwrap().unwrap();
        assert_eq!(d.cells.len(), 4, "every cell is kept, whatever its picture");
        let kept: Vec<(u32, bool)> = d.cells.iter().map(|c| (c.index, c.picture)).collect();
        assert_eq!(kept, vec![(0, true), (1, false), (2, false), (3, false)]);
        assert_eq!(db.cell_picture("a", "dev1", "f1", 0).unwrap(), Some(good));
        assert_eq!(db.cell_picture("a", "dev1", "f1", 1).unwrap(), None);
        assert_eq!(
            db.cell_picture("b", "dev1", "f1", 0).unwrap(),
            None,
            "another clinic's cell"
        );
        // The cell sent again (a new message) without its picture keeps no stale one.
        let again = Body::cells_of(&f);
        db.apply(&Envelope::new("a", "dev1", 99, now(), again[0].clone()))
            .unwrap();
        assert_eq!(db.cell_picture("a", "dev1", "f1", 0).unwrap(), None);
    }
}

#[test]
fn slide_reports_model_events_and_status_update_the_device() {
    for (_guard, path) in databases() {
        slides_and_status(&path);
    }
}

fn slides_and_status(path: &Path) {
    let db = Db::open(path).unwrap();
    let s = |finished: Option<u64>| {
        Body::Slide(SlideMessage {
            started_at: 5,
            finished_at: finished,
            report: report("s1", &[], &SlideSettings::default(), finished.is_some()),
        })
    };
    db.apply(&Envelope::new("a", "d", 1, 1, s(Some(9)))).unwrap();
    db.apply(&Envelope::new("a", "d", 2, 2, s(None))).unwrap();
    let slides = db.slides(None).unwrap();
    assert_eq!(slides[0].finished_at, Some(9), "a finished slide stays finished");
    db.apply(&Envelope::new(
        "a",
        "d",
        3,
        3,
        Body::Model(ModelMessage {
            event: ModelEvent::Active,
            model_version: 4,
            detail: String::new(),
        }),
    ))
    .unwrap();
    // A site adaptation is news for the lab, not a change of the model in use.
    db.apply(&Envelope::new(
        "a",
        "d",
        4,
        4,
        Body::Model(ModelMessage {
            event: ModelEvent::Adapted,
            model_version: 9,
            detail: "fitted on the site's last 300 cells".into(),
        }),
    ))
    .unwrap();
    let events = db.model_events(Some("a"), 10).unwrap();
    assert_eq!((events[0].event, events[0].model_version), (ModelEvent::Adapted, 9));
    let status = |state, at| Status {
        schema_version: UPLINK_SCHEMA_VERSION,
        clinic: "a".into(),
        device: "d".into(),
        state,
        at,
        backlog: Some(7),
        model_version: None,
    };
    db.set_status(&status(DeviceState::Online, 100)).unwrap();
    let d = &db.devices().unwrap()[0];
    assert_eq!(
        (d.state.as_str(), d.backlog, d.model_version),
        ("online", Some(7), Some(4))
    );
    // The last will carries the connection's start time, older than the last online status.
    db.set_status(&status(DeviceState::Offline, 50)).unwrap();
    assert_eq!(db.devices().unwrap()[0].state, "offline", "the last to arrive wins");
    db.note_rejected("wbc/x", "bad").unwrap();
    assert_eq!(db.rejected_count().unwrap(), 1);
}

#[test]
fn a_database_from_a_newer_build_is_refused() {
    for (_guard, path) in databases() {
        drop(Db::open(&path).unwrap());
        let mut c = Conn::open(&path.to_string_lossy()).unwrap();
        c.exec("UPDATE meta SET value = 99 WHERE key = 'db_version'", &[])
            .unwrap();
        drop(c);
        let e = Db::open(&path).err().unwrap().to_string();
        assert!(e.contains("version 99") && !e.contains("secret"), "{e}");
    }
}

#[test]
fn the_slide_list_comes_in_pages_and_only_changed_slides_are_computed_again() {
    for (_guard, path) in databases() {
        let db = Db::open(&path).unwrap();
        let (neut, blast) = (CellClass::Neutrophil.index(), CellClass::Blast.index());
        for k in 0..7u64 {
            let classes: &[usize] = if k == 4 { &[neut, blast] } else { &[neut] };
            let f = field(&format!("f{k}"), &format!("s{k}"), classes);
            for m in envelopes(&format!("c{k}"), 1, Body::cells_of(&f)) {
                db.apply(&m).unwrap();
            }
        }
        let all = db.slides(None).unwrap();
        assert_eq!(all.len(), 7);
        assert_eq!(all[0].clinic, "c4", "the blast first");
        assert_eq!(
            db.refresh_summaries().unwrap(),
            0,
            "nothing changed since the last reading"
        );
        let mut paged = Vec::new();
        for offset in [0, 3, 6] {
            paged.extend(db.slides_page(None, 3, offset).unwrap());
        }
        assert_eq!(paged, all);
        assert_eq!(db.slides_page(None, 3, 7).unwrap(), []);
        assert_eq!(db.slides_page(Some("c2"), 3, 0).unwrap().len(), 1);
        // A review changes one slide: only that one is computed again, and the list shows it.
        let review = Envelope::new(
            "c4",
            "dev1",
            9,
            now(),
            Body::Review(ReviewMessage {
                field_id: "f4".into(),
                slide_id: "s4".into(),
                index: 1,
                review: Review {
                    class: Some(CellClass::Lymphocyte),
                    by: "t".into(),
                    at: now(),
                },
                picture: None,
            }),
        );
        db.apply(&review).unwrap();
        assert_eq!(db.refresh_summaries().unwrap(), 1);
        let c4 = db.slides_page(Some("c4"), 10, 0).unwrap();
        assert!(!c4[0].blast, "the review overrides the model");
        assert_eq!(c4[0].report.per_class["Lymphocyte"].count, 1);
        assert_eq!(db.slide("c4", "dev1", "s4").unwrap().unwrap().slide, c4[0]);
    }
}

#[test]
fn a_version_1_database_gets_a_summary_for_every_slide() {
    for (_guard, path) in databases() {
        let db = Db::open(&path).unwrap();
        let f = field("f1", "s1", &[CellClass::Blast.index()]);
        for m in envelopes("a", 1, Body::cells_of(&f)) {
            db.apply(&m).unwrap();
        }
        drop(db);
        // As a build before summaries left it.
        let mut c = Conn::open(&path.to_string_lossy()).unwrap();
        c.exec("DELETE FROM slide_summaries", &[]).unwrap();
        c.exec("UPDATE meta SET value = 1 WHERE key = 'db_version'", &[])
            .unwrap();
        drop(c);
        let db = Db::open(&path).unwrap();
        let slides = db.slides(None).unwrap();
        assert_eq!(slides.len(), 1);
        assert!(slides[0].blast);
        drop(db);
        let mut c = Conn::open(&path.to_string_lossy()).unwrap();
        let v = c.query("SELECT value FROM meta WHERE key = 'db_version'", &[]).unwrap();
        assert_eq!(v[0][0].int().unwrap(), 2);
    }
}

#[test]
fn retention_removes_old_message_ids_and_rejections_and_a_late_resend_changes_nothing() {
    for (_guard, path) in databases() {
        let db = Db::open(&path).unwrap();
        let f = field(
            "f1",
            "s1",
            &[CellClass::Neutrophil.index(), CellClass::Monocyte.index()],
        );
        let msgs = envelopes("a", 1, Body::cells_of(&f));
        for m in &msgs {
            db.apply(m).unwrap();
        }
        db.note_rejected("wbc/x/y/cell", "garbage").unwrap();
        let r = super::Retention::default();
        assert_eq!(db.prune(now(), &r).unwrap(), super::Pruned::default(), "all young");
        let later = now() + 100 * 86_400;
        let p = db.prune(later, &r).unwrap();
        assert_eq!((p.message_ids, p.rejected), (2, 1));
        assert_eq!((db.message_count().unwrap(), db.rejected_count().unwrap()), (0, 0));
        // A device sends one again after its id is forgotten: the cell is not counted twice.
        db.apply(&msgs[0]).unwrap();
        assert_eq!(
            db.cell_counts().unwrap()[&("a".to_string(), "dev1".to_string(), "s1".to_string())],
            2
        );
        assert_eq!(db.slides(None).unwrap()[0].report.classified, 2);
    }
}

#[test]
fn the_model_against_the_reviews_per_clinic_and_version_flags_a_clinic_whose_agreement_drops() {
    for (_guard, path) in databases() {
        let db = Db::open(&path).unwrap();
        let (neut, mono, lymph) = (
            CellClass::Neutrophil.index(),
            CellClass::Monocyte.index(),
            CellClass::Lymphocyte.index(),
        );
        // Clinic "good": 20 neutrophils, 19 confirmed, one called a band (not a white cell).
        // Clinic "bad": 20 monocytes, 12 confirmed, 8 changed into lymphocytes.
        let mut seq = 1;
        let mut review = |clinic: &str, field: &str, slide: &str, index: u32, class: Option<CellClass>, at: u64| {
            seq += 1;
            let e = Envelope::new(
                clinic,
                "dev1",
                1000 + seq,
                at,
                Body::Review(ReviewMessage {
                    field_id: field.into(),
                    slide_id: slide.into(),
                    index,
                    review: Review {
                        class,
                        by: "t".into(),
                        at,
                    },
                    picture: None,
                }),
            );
            db.apply(&e).unwrap();
        };
        let t = now();
        for (clinic, class, changed, into) in [("good", neut, 1, None), ("bad", mono, 8, Some(CellClass::Lymphocyte))] {
            let f = field("f1", "s1", &[class; 20]);
            for m in envelopes(clinic, 1, Body::cells_of(&f)) {
                db.apply(&m).unwrap();
            }
            for i in 0..20u32 {
                let c = if i < changed {
                    into
                } else {
                    CellClass::from_index(class)
                };
                // Half of them a week earlier.
                review(clinic, "f1", "s1", i, c, if i % 2 == 0 { t } else { t - 7 * 86_400 });
            }
        }
        // An old review outside the window, and a set-aside cell the technician named.
        let mut unsure = field("f2", "s2", &[lymph]);
        unsure.cells[0].result.class = None;
        for m in envelopes("bad", 50, Body::cells_of(&unsure)) {
            db.apply(&m).unwrap();
        }
        review("bad", "f2", "s2", 0, Some(CellClass::Lymphocyte), t);
        let a = db.agreement(None, 30, &super::AgreementSettings::default(), t).unwrap();
        assert_eq!(a.len(), 2);
        let bad = &a[0];
        assert_eq!(
            (bad.clinic.as_str(), bad.low),
            ("bad", true),
            "the flagged clinic first"
        );
        assert_eq!((bad.reviewed, bad.confirmed, bad.set_aside_reviewed), (20, 12, 1));
        assert_eq!(bad.agreement, Some(0.6));
        assert_eq!(bad.model_version, 1);
        assert_eq!(
            bad.changes[0],
            super::Change {
                model: "Monocyte".into(),
                review: "Lymphocyte".into(),
                count: 8
            }
        );
        assert_eq!(bad.changes[1].model, "Unidentified");
        assert_eq!(bad.weeks.len(), 2, "{:?}", bad.weeks);
        assert_eq!(bad.weeks.iter().map(|w| w.reviewed).sum::<u64>(), 20);
        let good = &a[1];
        assert_eq!((good.reviewed, good.confirmed, good.low), (20, 19, false));
        assert_eq!(good.changes[0].review, super::NOT_A_WHITE_CELL);
        // Too few reviews say nothing; another window, another clinic.
        let strict = super::AgreementSettings {
            threshold: 0.99,
            min_reviews: 21,
        };
        assert!(db.agreement(None, 30, &strict, t).unwrap().iter().all(|a| !a.low));
        assert_eq!(db.agreement(Some("good"), 30, &strict, t).unwrap().len(), 1);
        let recent = db
            .agreement(Some("bad"), 3, &super::AgreementSettings::default(), t)
            .unwrap();
        assert_eq!(recent[0].reviewed, 10, "only the last 3 days' reviews");
    }
}
