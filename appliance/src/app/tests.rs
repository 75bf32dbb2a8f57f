//! Tests of the appliance's core: ingest, slides, reviews, pictures and the site adaptation.

use super::*;
use crate::store::{Identity, Retention};
use std::path::Path;
use wbc_protocol::uplink::Envelope;

/// The default bundle's classifier on the CPU.
fn classifier() -> Classifier {
    let bundle = crate::open_bundle(None, &crate::trusted_keys(&[]).unwrap()).unwrap();
    let device = crate::backend::select(crate::backend::BackendChoice::Cpu)
        .unwrap()
        .device;
    Classifier::from_bundle(&bundle, &device).unwrap()
}

fn app(dir: &Path) -> App {
    app_with(dir, Retention::default())
}

/// An appliance on the default bundle with its store under `dir`.
pub(crate) fn app_with(dir: &Path, retention: Retention) -> App {
    let classifier = Arc::new(classifier());
    let identity = Identity {
        clinic: "c".into(),
        device: "d".into(),
    };
    let store = Arc::new(Store::open(&dir.join("store"), identity, retention).unwrap());
    let settings = AppSettings {
        microns_per_pixel: 0.072,
        finder: FinderConfig::default(),
        slide: SlideSettings::default(),
        limits: DecodeLimits::default(),
        backend: "CPU".into(),
        adaptation: Default::default(),
    };
    App::new(classifier, store, settings).unwrap()
}

fn fixture(path: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)).unwrap()
}

#[test]
fn a_batch_gives_every_cell_the_answer_it_gets_alone() {
    // Thirteen cells: three full CPU runs and a last run of one, each fixture at a
    // different place in its run than when it comes round again.
    let classifier = classifier();
    let names = fixture_cells();
    assert_eq!(names.len(), 7);
    let images: Vec<_> = names
        .iter()
        .cycle()
        .take(13)
        .map(|p| image::open(p).unwrap().to_rgb8())
        .collect();
    assert_eq!(images.len() % wbc_models::compact::CPU_CELLS_PER_RUN, 1);
    assert!(images.len() > 2 * wbc_models::compact::CPU_CELLS_PER_RUN);
    let together = classifier.predict(&images);
    assert_eq!(together.len(), images.len());
    for (i, (img, t)) in images.iter().zip(&together).enumerate() {
        let alone = &classifier.predict(std::slice::from_ref(img))[0];
        for (a, b) in t.probs.iter().zip(&alone.probs) {
            assert!(
                (a - b).abs() < 1e-4,
                "cell {i}: {:?} in the batch, {:?} alone",
                t.probs,
                alone.probs
            );
        }
        let worst = t
            .features
            .iter()
            .zip(&alone.features)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-3, "cell {i}: features differ by {worst}");
        assert_eq!(t.cell_found, alone.cell_found, "cell {i}");
        assert_eq!(t.cell_size, alone.cell_size, "cell {i}");
        assert_eq!(t.neighbour_class, alone.neighbour_class, "cell {i}");
    }
}

#[test]
fn central_is_sent_every_flag_but_the_possible_blast_it_recomputes_itself() {
    let mut r = report("s", &[], &SlideSettings::default(), false);
    r.flags = vec![Flag::Blast { count: 1 }, Flag::PossibleBlast { count: 2 }];
    assert_eq!(for_central(r).flags, vec![Flag::Blast { count: 1 }]);
}

#[test]
fn the_cells_the_lab_must_see_are_queued_for_central_with_their_picture() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path());
    // A myeloblast (called Blast) and a smear field whose one cell the model sets aside as
    // unfamiliar (not a possible blast: no picture).
    let blast = app
        .ingest(
            &fixture("shared/fixtures/cells/MYO_0024.jpg"),
            "myo.jpg",
            "upload",
            true,
        )
        .unwrap();
    assert_eq!(blast.field().cells[0].result.class, Some(CellClass::Blast));
    let field = app
        .ingest(
            &fixture("tests/fixtures/fields/images/BloodImage_00000.jpg"),
            "f.jpg",
            "upload",
            false,
        )
        .unwrap();
    assert!(!field.field().cells[0].result.possible_blast());
    let cells: Vec<(String, Option<Vec<u8>>)> = app
        .store()
        .outbox_from(0, 100)
        .unwrap()
        .into_iter()
        .filter(|o| o.topic.ends_with("/cell"))
        .map(|o| match Envelope::decode(&o.topic, &o.payload).unwrap().body {
            Body::Cell(m) => (m.field.name.clone(), m.picture_jpeg()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(cells.len(), 2, "{cells:?}");
    assert_eq!(cells[0].0, "myo.jpg");
    let jpeg = cells[0].1.as_ref().expect("the blast travels with its picture");
    let picture = image::load_from_memory_with_format(jpeg, image::ImageFormat::Jpeg).unwrap();
    assert_eq!((picture.width(), picture.height()), (PICTURE_SIDE, PICTURE_SIDE));
    assert_eq!(cells[1], ("f.jpg".to_string(), None));
    // The review page's picture of the same cell is the larger one.
    let png = app.cell_picture(&blast.field().id, 0).unwrap().unwrap();
    let big = image::load_from_memory(&png).unwrap();
    assert_eq!(
        big.width(),
        224.min(CELL_PICTURE_SIDE),
        "a 224-px single cell is shown whole"
    );
    assert_eq!(app.cell_picture(&blast.field().id, 1).unwrap(), None);
}

#[test]
fn review_pictures_are_made_once_and_outlive_the_original_image() {
    let dir = tempfile::tempdir().unwrap();
    let retention = Retention {
        image_max_age_days: 1,
        result_max_age_days: 0,
        ..Default::default()
    };
    let app = app_with(dir.path(), retention);
    let field_bytes = fixture("tests/fixtures/fields/images/BloodImage_00000.jpg");
    let field = app
        .ingest(&field_bytes, "f.jpg", "upload", false)
        .unwrap()
        .field()
        .clone();
    assert!(!field.cells.is_empty());
    // Two days on, the original image is gone; the pictures made with the field stay.
    let later = now() + 2 * 86_400;
    assert_eq!(app.store().prune(later).unwrap().images, 1);
    assert_eq!(app.store().image(&field.id).unwrap(), None);
    for i in 0..field.cells.len() {
        let jpeg = app
            .cell_picture(&field.id, i)
            .unwrap()
            .expect("the picture outlives the image");
        let p = image::load_from_memory_with_format(&jpeg, image::ImageFormat::Jpeg).unwrap();
        assert_eq!(p.width(), p.height(), "a square around the cell");
    }

    // A field an older build stored without pictures: the first request makes every
    // cell's picture from one decoding of the original.
    let other = tempfile::tempdir().unwrap();
    let cell_bytes = fixture("shared/fixtures/cells/MYO_0024.jpg");
    let mut old = app_with(other.path(), Retention::default())
        .ingest(&cell_bytes, "myo.jpg", "upload", true)
        .unwrap()
        .field()
        .clone();
    old.slide_id = app.current_slide().id;
    let mut second = old.cells[0].clone();
    second.result.bbox = Some([10, 10, 100, 100]);
    old.cells.push(second);
    assert!(app.store().add_field(&old, Some(&cell_bytes)).unwrap());
    assert_eq!(app.store().picture(&old.id, 0).unwrap(), None);
    let first = app.cell_picture(&old.id, 0).unwrap().expect("made from the original");
    assert_eq!(app.store().picture(&old.id, 0).unwrap().as_ref(), Some(&first), "kept");
    assert_eq!(app.store().prune(later).unwrap().images, 1);
    assert!(
        app.cell_picture(&old.id, 1).unwrap().is_some(),
        "the other cell's picture was made with the first"
    );
    assert_eq!(app.cell_picture(&old.id, 2).unwrap(), None, "no such cell");
}

/// The fixture cell images, by name.
fn fixture_cells() -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/cells");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    names.sort();
    names
}

/// The fixture cells turned and mirrored: 56 different images of real cells.
fn site_cells() -> Vec<Vec<u8>> {
    use image::imageops::{flip_horizontal, rotate90};
    let names = fixture_cells();
    let mut out = Vec::new();
    for p in names {
        let mut img = image::open(p).unwrap().to_rgb8();
        for turn in 0..8 {
            if turn == 4 {
                img = flip_horizontal(&img);
            }
            img = rotate90(&img);
            let mut png = Vec::new();
            img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                .unwrap();
            out.push(png);
        }
    }
    out
}

#[test]
fn the_appliance_adapts_to_its_site_after_enough_cells_keeps_it_and_starts_over_with_a_new_model() {
    use crate::site::SiteStatus;
    let dir = tempfile::tempdir().unwrap();
    let cells = site_cells();
    let mut first = app(dir.path());
    first.settings.adaptation.after_cells = 30;
    let app = first;
    let ingest = |app: &App, i: usize| {
        app.ingest(&cells[i], &format!("c{i}.png"), "upload", true).unwrap();
    };
    for i in 0..29 {
        ingest(&app, i);
    }
    assert_eq!(
        app.site_status().unwrap(),
        SiteStatus::Collecting { seen: 29, needed: 30 }
    );
    assert!(app.classifier().adaptation().is_none());
    let probe = image::load_from_memory(&cells[40]).unwrap().to_rgb8();
    let before = app.classifier().predict(std::slice::from_ref(&probe))[0].clone();

    ingest(&app, 29);
    // The fit runs in the background; fields go on meanwhile.
    app.wait_for_site_fit();
    let SiteStatus::Adapted {
        cells: fitted,
        seen,
        next_fit_at,
        class_mix,
        backbone,
        ..
    } = app.site_status().unwrap()
    else {
        panic!("adapted after 30 cells: {:?}", app.site_status());
    };
    assert_eq!((fitted, seen, next_fit_at), (30, 30, 60));
    assert!(backbone, "the default bundle adapts its backbone too");
    assert!((class_mix.values().sum::<f32>() - 1.0).abs() < 1e-3, "{class_mix:?}");
    let adapted = app.classifier();
    assert_eq!(
        adapted.adaptation().map(|a| a.model_version),
        Some(adapted.model_version)
    );
    let after = adapted.predict(std::slice::from_ref(&probe))[0].clone();
    assert_ne!(after.features, before.features, "the heads see adapted features");
    // The default bundle has its training cells' unit moments: the backbone adapted too, on
    // the pictures the daemon kept (PNG in the store), as `--adapt-to` fits it on the same cells.
    let v = adapted.model_version;
    let kept = app.store().site_pictures(v).unwrap();
    assert_eq!(kept.len(), 30);
    let fitted = adapted
        .adaptation()
        .and_then(|a| a.units.clone())
        .expect("the backbone adapted");
    assert!(
        fitted.dark_nucleus,
        "the site's pictures are read with the dark-nucleus rule"
    );
    let pictures: Vec<_> = cells[..30]
        .iter()
        .map(|b| image::load_from_memory(b).unwrap().to_rgb8())
        .collect();
    let kept_cells = (pictures, vec![None; 30]);
    let again = crate::site::fit_to(&classifier(), Some(&kept_cells), |normed| {
        Ok(normed.site_features(&kept_cells.0, &kept_cells.1)?)
    })
    .unwrap()
    .units
    .expect("a bundle with unit moments");
    let gap = (fitted.scale.iter().flatten().zip(again.scale.iter().flatten()))
        .chain(fitted.shift.iter().flatten().zip(again.shift.iter().flatten()))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        gap < 1e-3,
        "the daemon's fit and a fit on the same pictures differ by {gap}"
    );
    // Central hears of it.
    let events: Vec<_> = app
        .store()
        .outbox_from(0, 1000)
        .unwrap()
        .into_iter()
        .filter_map(|o| match Envelope::decode(&o.topic, &o.payload).unwrap().body {
            Body::Model(m) => Some(m),
            _ => None,
        })
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].event, wbc_protocol::uplink::ModelEvent::Adapted);
    assert!(events[0].detail.contains("30 cells"), "{}", events[0].detail);
    // Learning goes on from the unadapted features of what the adapted model classifies.
    ingest(&app, 30);
    assert_eq!(app.store().site_cells(adapted.model_version).unwrap().seen, 31);
    drop(adapted);
    drop(app);

    // A restart finds it.
    let app = super::tests::app(dir.path());
    let unadapted = classifier();
    let v = unadapted.model_version;
    assert_eq!(app.classifier().adaptation().map(|a| a.cells), Some(30));
    // A new model starts over; a rollback finds its own adaptation again.
    let mut next = classifier();
    next.model_version = v + 1;
    app.set_classifier(Arc::new(next));
    assert!(app.classifier().adaptation().is_none());
    ingest(&app, 31);
    assert_eq!(
        app.site_status().unwrap(),
        SiteStatus::Collecting { seen: 1, needed: 300 }
    );
    app.set_classifier(Arc::new(unadapted));
    assert_eq!(app.classifier().adaptation().map(|a| a.model_version), Some(v));
    // A reset forgets it; the model answers as signed.
    app.reset_site("admin").unwrap();
    assert!(app.classifier().adaptation().is_none());
    assert_eq!(
        app.site_status().unwrap(),
        SiteStatus::Collecting { seen: 0, needed: 300 }
    );
}

#[test]
fn a_backbone_norm_is_used_only_where_it_fits_and_taking_it_away_restores_the_signed_model() {
    let c = classifier();
    assert!(
        c.can_adapt_backbone(),
        "the default bundle carries its training cells' unit moments"
    );
    let cells: Vec<_> = fixture_cells()
        .iter()
        .map(|p| image::open(p).unwrap().to_rgb8())
        .collect();
    let signed = c.predict(&cells);
    // 7 fixture cells, each five times: a site at home.
    let site: Vec<_> = cells.iter().cycle().take(35).cloned().collect();
    let norm = c.fit_site_norm(&site, &[None; 35]).unwrap().expect("a norm");
    assert!(norm.dark_nucleus && norm.blocks == wbc_models::classify::NORM_BLOCKS);
    let normed = c.clone().with_site_norm(Some(&norm)).unwrap();
    let moved = normed.predict(&cells);
    assert_ne!(moved[0].features, signed[0].features, "the norm changes the features");
    // Taken away again: the signed model and its own preprocessing, exactly.
    let back = normed.with_site_norm(None).unwrap().predict(&cells);
    for (a, b) in back.iter().zip(&signed) {
        assert_eq!(a.probs, b.probs);
    }
    // Too few cells; a norm of another shape (a damaged store, another model's).
    assert_eq!(
        c.fit_site_norm(&site[..20], &[None; 20]).unwrap_err(),
        wbc_models::adapt::AdaptError::TooFewCells { got: 20 }
    );
    let mut bad = norm.clone();
    bad.scale[3].pop();
    assert_eq!(
        c.clone().with_site_norm(Some(&bad)).unwrap_err(),
        wbc_models::adapt::AdaptError::NormDoesNotFit
    );
    let mut a = c.fit_adaptation(&c.site_features(&site, &[None; 35]).unwrap()).unwrap();
    a.units = Some(bad);
    assert_eq!(
        c.clone().with_adaptation(Some(a)).unwrap_err(),
        wbc_models::adapt::AdaptError::NormDoesNotFit
    );
}
