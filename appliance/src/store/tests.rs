//! Tests of the store: what is written survives reopening, the outbox keeps order and its
//! limits, ids are checked, retention removes only what it may, and the store against an
//! in-memory model over generated sequences of operations.

use super::*;
use wbc_protocol::messages::{CellRecord, CellResult, SCHEMA_VERSION};
use wbc_protocol::uplink::{Envelope, MAX_PAYLOAD_BYTES};

pub(crate) fn identity() -> Identity {
    Identity {
        clinic: "clinic-a".into(),
        device: "dev1".into(),
    }
}

fn field(id: &str, slide: &str, at: u64, cells: usize) -> FieldRecord {
    let probs = [0.0, 0.0, 0.0, 0.0, 1.0, 0.0];
    FieldRecord {
        schema_version: SCHEMA_VERSION,
        header: wbc_protocol::messages::FieldHeader {
            id: id.into(),
            slide_id: slide.into(),
            received_at: at,
            source: "test".into(),
            name: "x.jpg".into(),
            image_sha256: String::new(),
            width: 1,
            height: 1,
            single_cell: false,
            microns_per_pixel: 0.1,
        },
        cells: (0..cells)
            .map(|_| CellRecord {
                result: CellResult::from_probabilities(&probs, &Default::default(), "d".into(), 0.5, 1),
                review: None,
            })
            .collect(),
    }
}

fn slide(id: &str, at: u64) -> SlideState {
    SlideState {
        id: id.into(),
        started_at: at,
        finished_at: None,
    }
}

/// Opens the store; after a drop in this process sled's background flusher may hold the
/// file lock a moment longer, so a refusal is retried for a while.
pub(super) fn open(dir: &Path, r: Retention) -> Store {
    let t = std::time::Instant::now();
    loop {
        match Store::open(dir, identity(), r.clone()) {
            Ok(s) => return s,
            Err(_) if t.elapsed() < std::time::Duration::from_secs(10) => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("opening the store: {e:#}"),
        }
    }
}

#[test]
fn fields_slides_reviews_and_images_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), Retention::default());
    s.put_slide(&slide("s1", 1), &[]).unwrap();
    s.put_slide(&slide("s2", 2), &[]).unwrap();
    assert!(s.add_field(&field("b", "s1", 2, 2), Some(b"img")).unwrap());
    assert!(s.add_field(&field("a", "s1", 1, 1), None).unwrap());
    assert!(s.add_field(&field("c", "s2", 3, 0), None).unwrap());
    assert!(
        !s.add_field(&field("a", "s1", 9, 5), None).unwrap(),
        "the same id is one field"
    );
    let review = Review {
        class: None,
        by: "tech".into(),
        at: 4,
    };
    s.put_review("b", 1, &review).unwrap();
    assert!(s.put_review("b", 2, &review).is_err());
    assert!(s.add_field(&field("d", "nope", 1, 1), None).is_err(), "unknown slide");
    drop(s);
    let s = open(dir.path(), Retention::default());
    let ids: Vec<_> = s
        .fields_of_slide("s1")
        .unwrap()
        .into_iter()
        .map(|f| f.header.id)
        .collect();
    assert_eq!(ids, ["b", "a"], "in the order they were stored");
    let b = s.field("b").unwrap().unwrap();
    assert_eq!(b.cells[1].review.as_ref(), Some(&review));
    assert_eq!(b.cells[0].review, None);
    assert_eq!(s.field("c").unwrap().unwrap().slide_id, "s2");
    assert_eq!(s.field("zz").unwrap(), None);
    assert_eq!(s.image("b").unwrap().as_deref(), Some(&b"img"[..]));
    assert_eq!(s.image("a").unwrap(), None);
    assert_eq!(
        s.slides().unwrap().iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        ["s1", "s2"]
    );
    // 2 + 1 cells and one review.
    let out = s.outbox_from(0, 100).unwrap();
    assert_eq!(out.len(), 4);
    assert!(out.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(out[3].topic, "wbc/clinic-a/dev1/review");
    let env = Envelope::decode(&out[0].topic, &out[0].payload).unwrap();
    assert_eq!(env.id, format!("clinic-a:dev1:{}", env.seq));
    assert!(
        env.seq >> 40 < s.epoch,
        "the epoch of the start that queued it, above its counter"
    );
    assert_eq!(env.seq & COUNTER_MASK, (s.counter_offset + out[0].seq) & COUNTER_MASK);
}

#[test]
fn messages_stay_until_central_confirms_them_and_the_rest_keeps_its_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), Retention::default());
    s.put_slide(&slide("s", 1), &[]).unwrap();
    s.add_field(&field("a", "s", 1, 3), None).unwrap();
    let out = s.outbox_from(0, 10).unwrap();
    assert_eq!((s.backlog(), s.unsent(), s.unconfirmed()), (3, 3, 0));
    // The broker took the second: it is not sent again, and still waits for central.
    s.broker_has(out[1].seq, out[1].wire).unwrap();
    assert_eq!((s.backlog(), s.unsent(), s.unconfirmed()), (3, 2, 1));
    let (unsent, next) = s.unsent_from(0, 10).unwrap();
    assert_eq!(
        unsent.iter().map(|o| o.seq).collect::<Vec<_>>(),
        [out[0].seq, out[2].seq]
    );
    assert_eq!(next, out[2].seq + 1);
    assert_eq!(s.unsent_from(next, 10).unwrap().0, []);
    // A receipt for another store's number, or a number this store never used, changes nothing.
    assert_eq!(s.confirmed(&[out[1].wire ^ (1 << 40), out[2].wire + 1000]).unwrap(), 0);
    // Central's receipt: it leaves; a second receipt for it is harmless.
    assert_eq!(s.confirmed(&[out[1].wire]).unwrap(), 1);
    assert_eq!(s.confirmed(&[out[1].wire]).unwrap(), 0);
    assert_eq!((s.backlog(), s.unsent(), s.unconfirmed()), (2, 2, 0));
    // A receipt may come before the broker's acknowledgement is handled.
    assert_eq!(s.confirmed(&[out[2].wire]).unwrap(), 1);
    s.broker_has(out[2].seq, out[2].wire).unwrap();
    assert_eq!((s.backlog(), s.unconfirmed()), (1, 0));
    let rest: Vec<_> = s.outbox_from(0, 10).unwrap().into_iter().map(|o| o.seq).collect();
    assert_eq!(rest, [out[0].seq]);
}

#[test]
fn a_review_that_names_a_class_travels_with_the_cells_picture_and_others_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), Retention::default());
    s.put_slide(&slide("s", 1), &[]).unwrap();
    let jpeg = [&[0xFF, 0xD8, 0xFF][..], &[7; 100]].concat();
    let huge = [&[0xFF, 0xD8, 0xFF][..], &vec![7; MAX_PICTURE_BYTES]].concat();
    let f = field("a", "s", 1, 3);
    s.add_field_with(&f, None, &[jpeg.clone(), jpeg.clone(), huge], Body::cells_of(&f))
        .unwrap();
    let review = |class| Review {
        class,
        by: "t".into(),
        at: 5,
    };
    s.put_review("a", 0, &review(Some(wbc_protocol::classes::CellClass::Monocyte)))
        .unwrap();
    s.put_review("a", 1, &review(None)).unwrap();
    s.put_review("a", 2, &review(Some(wbc_protocol::classes::CellClass::Monocyte)))
        .unwrap();
    let pictures: Vec<Option<Vec<u8>>> = s
        .outbox_from(0, 10)
        .unwrap()
        .iter()
        .filter_map(|o| match Envelope::decode(&o.topic, &o.payload).unwrap().body {
            Body::Review(r) => Some(r.picture_jpeg()),
            _ => None,
        })
        .collect();
    // The class review carries the picture; "not a white cell" needs none; a picture too big
    // for a message stays home.
    assert_eq!(pictures, [Some(jpeg), None, None]);
}

#[test]
fn what_central_does_not_confirm_is_sent_again_later_and_later_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (o, t0) = {
        let s = open(dir.path(), Retention::default());
        s.put_slide(&slide("s", 1), &[]).unwrap();
        s.add_field(&field("a", "s", 1, 1), None).unwrap();
        let o = s.outbox_from(0, 1).unwrap().remove(0);
        let t0 = now();
        s.broker_has(o.seq, o.wire).unwrap();
        s.flush().unwrap();
        (o, t0)
    };
    let s = open(dir.path(), Retention::default());
    assert_eq!((s.backlog(), s.unconfirmed()), (1, 1), "kept across a restart");
    assert_eq!(s.unsent_from(0, 10).unwrap().0, [], "not sent again at once");
    assert_eq!(s.overdue(t0 + 5, 600, 10).unwrap(), []);
    let again = s.overdue(t0 + 601, 600, 10).unwrap();
    assert_eq!(again, std::slice::from_ref(&o), "overdue after confirm_after_s");
    // Sent a second time: the next wait is twice as long.
    s.broker_has(o.seq, o.wire).unwrap();
    let t1 = now();
    assert_eq!(s.overdue(t1 + 601, 600, 10).unwrap(), []);
    assert_eq!(s.overdue(t1 + 1201, 600, 10).unwrap(), std::slice::from_ref(&o));
    assert_eq!(s.confirmed(&[o.wire]).unwrap(), 1);
    assert_eq!(s.overdue(u64::MAX, 600, 10).unwrap(), []);
    assert_eq!((s.backlog(), s.unconfirmed()), (0, 0));
}

#[test]
fn the_active_model_is_announced_once_per_version() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), Retention::default());
    assert!(s.note_active_model(2, "cpu").unwrap());
    assert!(!s.note_active_model(2, "cpu").unwrap());
    drop(s);
    let s = open(dir.path(), Retention::default());
    assert!(!s.note_active_model(2, "cpu").unwrap(), "remembered across restarts");
    assert!(s.note_active_model(3, "cpu").unwrap());
    let topics: Vec<_> = s.outbox_from(0, 10).unwrap().into_iter().map(|o| o.topic).collect();
    assert_eq!(topics, ["wbc/clinic-a/dev1/model", "wbc/clinic-a/dev1/model"]);
}

#[test]
fn a_refusal_whose_reason_repeats_a_huge_or_hostile_claim_is_still_logged_and_sent() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), Retention::default());
    let claim = format!("bundle signed by unknown key {}\u{0}", "k".repeat(MAX_PAYLOAD_BYTES));
    s.model_event(&wbc_protocol::uplink::ModelMessage {
        event: wbc_protocol::uplink::ModelEvent::Rejected,
        model_version: 9,
        detail: claim,
    })
    .unwrap();
    let logged = &s.model_log(1).unwrap()[0].message.detail;
    assert!(logged.starts_with("bundle signed by unknown key kkk") && !logged.contains('\u{0}'));
    assert_eq!(logged.chars().count(), wbc_protocol::uplink::MAX_TEXT_CHARS);
    assert_eq!(s.backlog(), 1, "queued for central");
}

#[test]
fn an_unreadable_outbox_message_is_set_aside_not_lost_and_oversized_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), Retention::default());
    s.put_slide(&slide("s", 1), &[]).unwrap();
    s.add_field(&field("a", "s", 1, 2), None).unwrap();
    let first = s.outbox_from(0, 1).unwrap()[0].seq;
    s.outbox.insert(be(first), &b"\x09future format"[..]).unwrap();
    let out = s.outbox_from(0, 10).unwrap();
    assert_eq!(out.len(), 1, "the readable one is still sent");
    assert_eq!((s.backlog(), s.quarantined()), (1, 1));
    let mut huge = field("b", "s", 1, 1);
    huge.cells[0].result.description = "x".repeat(MAX_PAYLOAD_BYTES);
    let e = s.add_field(&huge, None).unwrap_err().to_string();
    assert!(e.contains("over the uplink limit"), "{e}");
    assert_eq!(s.field("b").unwrap(), None, "nothing of it stored");
}

#[test]
fn a_new_store_does_not_reuse_the_message_ids_of_an_old_one() {
    let ids = |dir: &Path| {
        let s = open(dir, Retention::default());
        s.put_slide(&slide("s", 1), &[]).unwrap();
        s.add_field(&field("a", "s", 1, 1), None).unwrap();
        let o = &s.outbox_from(0, 1).unwrap()[0];
        Envelope::decode(&o.topic, &o.payload).unwrap().id
    };
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    assert_ne!(ids(d1.path()), ids(d2.path()));
}

#[test]
fn hostile_ids_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), Retention::default());
    for id in ["", "../x", "a/b", "a.json", &"x".repeat(65)] {
        assert!(s.field(id).is_err(), "{id}");
        assert!(s.put_slide(&slide(id, 1), &[]).is_err(), "{id}");
    }
}

#[test]
fn images_go_by_the_byte_limit_and_by_age_and_results_stay() {
    let dir = tempfile::tempdir().unwrap();
    let r = Retention {
        max_image_bytes: 25,
        image_max_age_days: 1,
        ..Default::default()
    };
    let s = open(dir.path(), r);
    s.put_slide(&slide("s", 1), &[]).unwrap();
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        s.add_field(&field(id, "s", 1, 1), Some(&[i as u8; 10])).unwrap();
        // Distinct storage times (seconds).
        if i == 0 {
            std::thread::sleep(std::time::Duration::from_millis(1100));
        }
    }
    assert_eq!(s.image("a").unwrap(), None, "oldest removed by the byte limit");
    assert!(s.image("b").unwrap().is_some() && s.image("c").unwrap().is_some());
    let p = s.prune(now() + 2 * 86_400).unwrap();
    assert_eq!(p.images, 2, "both older than a day by then");
    assert_eq!(s.fields_of_slide("s").unwrap().len(), 3, "results stay");
}

#[test]
fn old_results_go_only_once_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let r = Retention {
        result_max_age_days: 30,
        ..Default::default()
    };
    let s = open(dir.path(), r);
    s.put_slide(&slide("s", 1), &[]).unwrap();
    s.add_field(&field("old", "s", 1000, 2), Some(b"x")).unwrap();
    s.add_field(&field("old2", "s", 1000, 1), None).unwrap();
    s.add_field(&field("new", "s", now(), 1), None).unwrap();
    s.put_review(
        "old",
        0,
        &Review {
            class: None,
            by: "t".into(),
            at: 2,
        },
    )
    .unwrap();
    assert_eq!(s.prune(now()).unwrap().fields, 0, "nothing delivered yet");
    // Central has everything of `old` (its two cells and the review), but not `old2`.
    let mut of_old_wires = Vec::new();
    for o in s.outbox_from(0, 100).unwrap() {
        let e = Envelope::decode(&o.topic, &o.payload).unwrap();
        let of_old = match &e.body {
            Body::Cell(c) => c.field.id == "old",
            Body::Review(r) => r.field_id == "old",
            _ => false,
        };
        if of_old {
            s.broker_has(o.seq, o.wire).unwrap();
            of_old_wires.push(o.wire);
        }
    }
    assert_eq!(
        s.prune(now()).unwrap().fields,
        0,
        "the broker has them, central has not confirmed them"
    );
    assert_eq!(s.confirmed(&of_old_wires).unwrap(), 3);
    assert_eq!(s.prune(now()).unwrap().fields, 1);
    assert_eq!(s.field("old").unwrap(), None);
    assert_eq!(s.image("old").unwrap(), None);
    assert!(s.field("old2").unwrap().is_some(), "undelivered: kept");
    assert!(s.field("new").unwrap().is_some(), "young: kept");
    assert_eq!(s.fields_of_slide("s").unwrap().len(), 2);
}

#[test]
fn a_nearly_full_disk_refuses_new_work_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(
        dir.path(),
        Retention {
            min_free_bytes: u64::MAX,
            ..Default::default()
        },
    );
    let e = s.check_space().unwrap_err().to_string();
    assert!(e.contains("nearly full") && e.contains("intact"), "{e}");
    let dir2 = tempfile::tempdir().unwrap();
    let ok = open(
        dir2.path(),
        Retention {
            min_free_bytes: 0,
            ..Default::default()
        },
    );
    ok.check_space().unwrap();
}

#[test]
fn a_second_process_cannot_open_the_same_store() {
    // sled locks the database file; within one process a second open of the same path
    // fails the same way.
    let dir = tempfile::tempdir().unwrap();
    let _s = open(dir.path(), Retention::default());
    assert!(Store::open(dir.path(), identity(), Retention::default()).is_err());
}

mod model {
    //! The store against an in-memory model, over generated sequences of operations.
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, VecDeque};
    use wbc_protocol::classes::CellClass;

    #[derive(Debug, Clone)]
    enum Op {
        Slide(u8),
        Field { id: u8, slide: u8, cells: u8 },
        Review { id: u8, cell: u8, class: Option<u8> },
        Ack(u8),
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..3).prop_map(Op::Slide),
            (0u8..10, 0u8..3, 0u8..4).prop_map(|(id, slide, cells)| Op::Field { id, slide, cells }),
            (0u8..10, 0u8..4, proptest::option::of(0u8..6)).prop_map(|(id, cell, class)| Op::Review {
                id,
                cell,
                class
            }),
            (0u8..6).prop_map(Op::Ack),
            Just(Op::Reopen),
        ]
    }

    #[derive(Default)]
    struct Model {
        slides: Vec<String>,
        fields: BTreeMap<String, FieldRecord>,
        order: Vec<String>,
        outbox: VecDeque<Body>,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn the_store_behaves_like_its_model(ops in proptest::collection::vec(op(), 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let mut s = open(dir.path(), Retention::default());
            let mut m = Model::default();
            for (step, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Slide(i) => {
                        let id = format!("s{i}");
                        s.put_slide(&slide(&id, u64::from(i)), &[]).unwrap();
                        if !m.slides.contains(&id) {
                            m.slides.push(id);
                        }
                    }
                    Op::Field { id, slide, cells } => {
                        let f = field(&format!("f{id}"), &format!("s{slide}"), u64::from(id), cells.into());
                        let r = s.add_field(&f, None);
                        if !m.slides.contains(&f.slide_id) {
                            prop_assert!(r.is_err(), "step {step}: field into a missing slide");
                        } else if m.fields.contains_key(&f.id) {
                            prop_assert!(!r.unwrap());
                        } else {
                            prop_assert!(r.unwrap());
                            m.outbox.extend(Body::cells_of(&f));
                            m.order.push(f.id.clone());
                            m.fields.insert(f.id.clone(), f);
                        }
                    }
                    Op::Review { id, cell, class } => {
                        let review = Review {
                            class: class.map(|c| CellClass::ALL[usize::from(c)]),
                            by: "t".into(),
                            at: u64::from(id),
                        };
                        let fid = format!("f{id}");
                        let r = s.put_review(&fid, cell.into(), &review);
                        match m.fields.get_mut(&fid).and_then(|f| f.cells.get_mut(usize::from(cell))) {
                            Some(c) => {
                                c.review = Some(review.clone());
                                prop_assert_eq!(&r.unwrap(), &m.fields[&fid]);
                                m.outbox.push_back(Body::Review(ReviewMessage {
                                    field_id: fid.clone(),
                                    slide_id: m.fields[&fid].slide_id.clone(),
                                    index: cell.into(),
                                    review,
                                    // The model's fields have no pictures.
                                    picture: None,
                                }));
                            }
                            None => prop_assert!(r.is_err()),
                        }
                    }
                    Op::Ack(n) => {
                        for o in s.outbox_from(0, n.into()).unwrap() {
                            s.broker_has(o.seq, o.wire).unwrap();
                            prop_assert_eq!(s.confirmed(&[o.wire]).unwrap(), 1);
                            m.outbox.pop_front();
                        }
                    }
                    Op::Reopen => {
                        drop(s);
                        s = open(dir.path(), Retention::default());
                    }
                }
                for (id, f) in &m.fields {
                    let got = s.field(id).unwrap();
                    prop_assert_eq!(got.as_ref(), Some(f), "step {}", step);
                }
                for sl in &m.slides {
                    let want: Vec<&String> = m.order.iter().filter(|id| &m.fields[*id].slide_id == sl).collect();
                    let got: Vec<String> = s.fields_of_slide(sl).unwrap().into_iter().map(|f| f.header.id).collect();
                    prop_assert_eq!(got.iter().collect::<Vec<_>>(), want);
                }
                let queued: Vec<Body> = s
                    .outbox_from(0, usize::MAX)
                    .unwrap()
                    .into_iter()
                    .map(|o| Envelope::decode(&o.topic, &o.payload).unwrap().body)
                    .collect();
                prop_assert_eq!(queued, m.outbox.iter().cloned().collect::<Vec<_>>());
                prop_assert_eq!(s.backlog(), m.outbox.len());
            }
        }
    }
}

#[test]
fn a_finished_slide_is_not_opened_again_by_a_report_made_before_it_was_finished() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), Retention::default());
    let open_slide = slide("s", 1);
    s.put_slide(&open_slide, &[]).unwrap();
    let finished = SlideState {
        finished_at: Some(9),
        ..open_slide.clone()
    };
    s.put_slide(&finished, &[]).unwrap();
    // A new flag's report, made from the slide as it was a moment earlier.
    s.put_slide(&open_slide, &[]).unwrap();
    assert_eq!(s.slides().unwrap(), vec![finished]);
}

/// The ids of the messages a store queues for one new field.
fn queue_one(dir: &Path, floor: u64, field_id: &str) -> Vec<String> {
    let t = std::time::Instant::now();
    let s = loop {
        match Store::open_at(dir, identity(), Retention::default(), floor) {
            Ok(s) => break s,
            Err(_) if t.elapsed() < std::time::Duration::from_secs(10) => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("{e:#}"),
        }
    };
    let before: Vec<u64> = s.outbox_from(0, 1000).unwrap().iter().map(|o| o.seq).collect();
    s.put_slide(&slide("s", 1), &[]).unwrap();
    s.add_field(&field(field_id, "s", 1, 2), None).unwrap();
    s.outbox_from(0, 1000)
        .unwrap()
        .into_iter()
        .filter(|o| !before.contains(&o.seq))
        .map(|o| Envelope::decode(&o.topic, &o.payload).unwrap().id)
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

#[test]
fn a_store_put_back_from_a_backup_gives_new_results_ids_central_has_not_seen() {
    let dir = tempfile::tempdir().unwrap();
    let (live, backup) = (dir.path().join("store"), dir.path().join("backup"));
    queue_one(&live, 100, "a");
    copy_dir(&live, &backup);
    // After the backup, in the same minute: more results, sent to central.
    let sent = queue_one(&live, 100, "b");
    // The disk fails; the backup is put back, and the appliance starts again later.
    std::fs::remove_dir_all(&live).unwrap();
    copy_dir(&backup, &live);
    let new = queue_one(&live, 105, "c");
    assert_eq!(new.len(), 2);
    assert!(new.iter().all(|id| !sent.contains(id)), "{new:?} against {sent:?}");
}
