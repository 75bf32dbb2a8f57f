//! Tests of the uplink module.

use super::*;
use crate::messages::{CellResult, SCHEMA_VERSION};

#[test]
fn model_events_keep_their_wire_names_and_an_unknown_one_is_read() {
    for e in [
        ModelEvent::Active,
        ModelEvent::Downloaded,
        ModelEvent::Verified,
        ModelEvent::Rejected,
        ModelEvent::Confirmed,
        ModelEvent::RolledBack,
        ModelEvent::KeysUpdated,
        ModelEvent::Adapted,
    ] {
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(json, format!("\"{}\"", e.as_str()));
        assert_eq!(serde_json::from_str::<ModelEvent>(&json).unwrap(), e);
    }
    let m: ModelMessage = serde_json::from_str(r#"{"event":"quarantined","model_version":3,"detail":""}"#).unwrap();
    assert_eq!(m.event, ModelEvent::Unknown);
    assert_eq!("rolled_back".parse(), Ok(ModelEvent::RolledBack));
    assert_eq!("quarantined".parse(), Ok(ModelEvent::Unknown));
}

#[test]
fn device_text_is_cleaned_and_capped_where_a_message_is_decoded() {
    let m = Envelope::new(
        "a",
        "d",
        1,
        2,
        Body::Model(ModelMessage {
            event: ModelEvent::Rejected,
            model_version: 3,
            detail: format!("key \u{0}id\u{7}\nline\t{}", "x".repeat(5000)),
        }),
    );
    let payload = serde_json::to_vec(&m).unwrap();
    let got = Envelope::decode(&m.topic(), &payload).unwrap();
    let Body::Model(got) = got.body else { panic!() };
    assert!(got.detail.starts_with("key id\nline\txxx"), "{:?}", &got.detail[..20]);
    assert_eq!(got.detail.chars().count(), MAX_TEXT_CHARS);
    // Map keys too; a picture keeps its length.
    let mut f = field();
    f.cells[0]
        .result
        .attributes
        .insert("colour\u{0}".into(), "blue\u{0}".into());
    let mut body = Body::cells_of(&f).remove(0);
    if let Body::Cell(c) = &mut body {
        c.picture = Some("A".repeat(MAX_TEXT_CHARS * 4));
    }
    let m = Envelope::new("c1", "dev", 1, 5, body);
    let got = Envelope::decode(&m.topic(), &serde_json::to_vec(&m).unwrap()).unwrap();
    let Body::Cell(c) = got.body else { panic!() };
    assert_eq!(c.cell.result.attributes.get("colour").map(String::as_str), Some("blue"));
    assert_eq!(c.picture.unwrap().len(), MAX_TEXT_CHARS * 4);
}

fn field() -> FieldRecord {
    let probs = [0.0, 0.0, 0.0, 0.0, 1.0, 0.0];
    FieldRecord {
        schema_version: SCHEMA_VERSION,
        header: FieldHeader {
            id: "f1".into(),
            slide_id: "s1".into(),
            received_at: 5,
            source: "camera".into(),
            name: "a.jpg".into(),
            image_sha256: "ab".into(),
            width: 640,
            height: 480,
            single_cell: false,
            microns_per_pixel: 0.07,
        },
        cells: (0..2)
            .map(|_| CellRecord {
                result: CellResult::from_probabilities(&probs, &Default::default(), "d".into(), 0.5, 2),
                review: None,
            })
            .collect(),
    }
}

#[test]
fn only_the_cells_the_lab_must_see_carry_a_picture_and_bad_pictures_are_not_read() {
    let mut f = field();
    // Cell 0: called Blast; cell 1: a neutrophil.
    f.cells[0].result =
        CellResult::from_probabilities(&[0.0, 0.0, 0.0, 0.0, 0.0, 1.0], &Default::default(), "d".into(), 0.5, 2);
    let jpeg = [&[0xFF, 0xD8, 0xFF, 0xE0][..], &[7; 100]].concat();
    let mut asked = Vec::new();
    let bodies = Body::cells_with_pictures(&f, |i| {
        asked.push(i);
        Some(jpeg.clone())
    });
    assert_eq!(
        asked,
        vec![0],
        "the picture of a cell that does not need one is not even made"
    );
    let cell = |b: &Body| match b {
        Body::Cell(m) => m.clone(),
        other => panic!("{other:?}"),
    };
    let (blast, neutrophil) = (cell(&bodies[0]), cell(&bodies[1]));
    assert_eq!(blast.picture_jpeg(), Some(jpeg.clone()));
    assert_eq!(neutrophil.picture, None);
    // On the wire and back; a message without the field (an older appliance) still reads.
    let e = Envelope::new("c", "d", 1, 1, bodies[0].clone());
    let back = Envelope::decode(&e.topic(), &serde_json::to_vec(&e).unwrap()).unwrap();
    assert_eq!(back, e);
    let text = serde_json::to_string(&bodies[1]).unwrap();
    assert!(!text.contains("picture"), "{text}");
    // A cell held back as a possible blast carries one too.
    f.cells[1].result =
        CellResult::from_probabilities(&[0.1, 0.1, 0.1, 0.1, 0.2, 0.4], &Default::default(), "d".into(), 0.5, 2);
    assert!(CellMessage::wants_picture(&f.cells[1]));
    // Too large a picture is left out rather than sent.
    let huge = [&jpeg[..], &vec![0u8; MAX_PICTURE_BYTES]].concat();
    assert!(
        cell(&Body::cells_with_pictures(&f, |_| Some(huge.clone()))[0])
            .picture
            .is_none()
    );
    // What a reader refuses: not base64, not a JPEG, too long.
    for bad in [
        "not base64!".to_string(),
        CellMessage::encode_picture(b"\x89PNG\r\n\x1a\n...."),
        CellMessage::encode_picture(&huge),
    ] {
        assert_eq!(decode_picture(&bad), None, "{}", &bad[..bad.len().min(40)]);
    }
}

#[test]
fn cell_messages_round_trip_and_rebuild_the_field() {
    let f = field();
    let bodies = Body::cells_of(&f);
    assert_eq!(bodies.len(), 2);
    let e = Envelope::new("clinic-a", "dev1", 7, 9, bodies[1].clone());
    assert_eq!(e.topic(), "wbc/clinic-a/dev1/cell");
    assert_eq!(e.id, "clinic-a:dev1:7");
    let back = Envelope::decode(&e.topic(), &serde_json::to_vec(&e).unwrap()).unwrap();
    assert_eq!(back, e);
    let Body::Cell(c) = back.body else { panic!() };
    assert_eq!(c.index, 1);
    assert_eq!(c.field.to_record(f.cells.clone()), f);
}

#[test]
fn messages_that_lie_about_their_origin_or_kind_are_refused() {
    let e = Envelope::new("clinic-a", "dev1", 7, 9, Body::cells_of(&field())[0].clone());
    let bytes = serde_json::to_vec(&e).unwrap();
    assert!(matches!(
        Envelope::decode("wbc/clinic-b/dev1/cell", &bytes),
        Err(UplinkError::Mismatch(_))
    ));
    assert!(matches!(
        Envelope::decode("wbc/clinic-a/dev1/slide", &bytes),
        Err(UplinkError::Mismatch(_))
    ));
    let mut forged = e.clone();
    forged.id = "clinic-a:dev1:1".into();
    let forged = serde_json::to_vec(&forged).unwrap();
    assert!(matches!(
        Envelope::decode("wbc/clinic-a/dev1/cell", &forged),
        Err(UplinkError::Mismatch(_))
    ));
    for t in [
        "wbc/clinic-a/dev1",
        "x/clinic-a/dev1/cell",
        "wbc/+/dev1/cell",
        "wbc/a/b/c/cell",
        "wbc/a/b/other",
        "",
    ] {
        assert!(matches!(Envelope::decode(t, &bytes), Err(UplinkError::Topic(_))), "{t}");
    }
}

#[test]
fn garbage_huge_and_future_payloads_are_refused() {
    let t = "wbc/c/d/cell";
    assert!(matches!(Envelope::decode(t, b"\xff\x00"), Err(UplinkError::Invalid(_))));
    assert!(matches!(
        Envelope::decode(t, b"{\"schema_version\":1}"),
        Err(UplinkError::Invalid(_))
    ));
    assert_eq!(
        Envelope::decode(t, b"{\"schema_version\":2}"),
        Err(UplinkError::UnsupportedVersion(2))
    );
    let e = Envelope::new("c", "d", 1, 1, Body::cells_of(&field())[0].clone());
    let json = serde_json::to_string(&e)
        .unwrap()
        .replace("\"confidence\":1.0", "\"confidence\":1e39");
    assert!(json.contains("1e39"));
    assert!(matches!(
        Envelope::decode(t, json.as_bytes()),
        Err(UplinkError::Invalid(_))
    ));
    let huge = vec![b' '; MAX_PAYLOAD_BYTES + 1];
    assert_eq!(
        Envelope::decode(t, &huge),
        Err(UplinkError::TooLarge(MAX_PAYLOAD_BYTES + 1))
    );
}

#[test]
fn status_round_trips_and_is_checked_against_its_topic() {
    let s = Status {
        schema_version: UPLINK_SCHEMA_VERSION,
        clinic: "c".into(),
        device: "d".into(),
        state: DeviceState::Offline,
        at: 1,
        backlog: Some(3),
        model_version: Some(2),
    };
    let b = serde_json::to_vec(&s).unwrap();
    assert_eq!(Status::decode("wbc/c/d/status", &b).unwrap(), s);
    assert!(Status::decode("wbc/c/x/status", &b).is_err());
    assert!(Status::decode("wbc/c/d/cell", &b).is_err());
}

#[test]
fn ids_that_could_escape_a_topic_level_are_invalid() {
    for bad in ["", "a/b", "+", "#", "a b", "é", &"x".repeat(65)] {
        assert!(!valid_id(bad), "{bad}");
    }
    assert!(valid_id("clinic_01-A"));
    // Ids may hold `-`: the identity must still tell ("north-lab", "1") from ("north", "lab-1").
    assert_ne!(device_identity("north-lab", "1"), device_identity("north", "lab-1"));
    assert_ne!(device_identity("a_b", "c"), device_identity("a", "b_c"));
    assert!(
        !valid_id(&device_identity("north", "lab-1")),
        "an identity is never an id"
    );
}

#[test]
fn receipts_round_trip_and_a_hostile_one_is_refused() {
    let r = Receipt::new(vec![1, 5, u64::MAX]);
    assert_eq!(Receipt::decode(&r.encode()).unwrap(), r);
    assert_eq!(receipt_topic("north", "scope-1"), "wbc-receipt/north/scope-1");
    let too_many = Receipt::new((0..MAX_RECEIPT_SEQS as u64 + 1).collect());
    assert!(Receipt::decode(&too_many.encode()).is_err());
    assert!(Receipt::decode(b"{\"schema_version\": 99, \"seqs\": []}").is_err());
    assert!(Receipt::decode(b"{\"schema_version\": 1, \"seqs\": [-1]}").is_err());
    assert!(Receipt::decode(&vec![b' '; MAX_PAYLOAD_BYTES + 1]).is_err());
    assert!(Receipt::decode(b"").is_err());
}
