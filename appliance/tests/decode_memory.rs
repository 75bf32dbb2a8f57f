//! Many uploads at once must not decode at once: each decoded image may take up to the decode
//! limit's memory. Its own test binary, so that a counting allocator sees every allocation.

use appliance::app::{App, AppSettings, DECODES_AT_ONCE, Ingested};
use appliance::store::{Identity, Retention, Store};
use std::sync::Arc;
use wbc_cells::finder::FinderConfig;
use wbc_cells::image::DecodeLimits;
use wbc_models::classify::Classifier;
use wbc_protocol::slide::SlideSettings;

mod counting;

/// A 4000 × 4000 PNG (48 MB once decoded, a few hundred KiB as a file).
fn big_png() -> Vec<u8> {
    let img = image::RgbImage::from_fn(4000, 4000, |x, y| image::Rgb([(x % 251) as u8, (y % 241) as u8, 128]));
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    png
}

#[test]
fn eight_uploads_at_once_hold_at_most_two_decoded_images() {
    let dir = tempfile::tempdir().unwrap();
    let trusted = appliance::trusted_keys(&[]).unwrap();
    let bundle = appliance::open_bundle(None, &trusted).unwrap();
    let device = appliance::backend::select(appliance::backend::BackendChoice::Cpu)
        .unwrap()
        .device;
    let classifier = Arc::new(Classifier::from_bundle(&bundle, &device).unwrap());
    let identity = Identity {
        clinic: "c".into(),
        device: "d".into(),
    };
    let store = Arc::new(Store::open(&dir.path().join("store"), identity, Retention::default()).unwrap());
    let settings = AppSettings {
        microns_per_pixel: 0.072,
        finder: FinderConfig::default(),
        slide: SlideSettings::default(),
        limits: DecodeLimits::default(),
        backend: "CPU".into(),
        adaptation: Default::default(),
    };
    let app = Arc::new(App::new(classifier, store, settings).unwrap());
    let png = Arc::new(big_png());
    // Stored once; each upload after it is decoded in full before it is known for a copy.
    assert!(matches!(
        app.ingest(&png, "big.png", "upload", true).unwrap(),
        Ingested::New(_)
    ));
    let decoded = 4000 * 4000 * 3;
    let base = counting::reset();
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let (app, png) = (app.clone(), png.clone());
            std::thread::spawn(move || app.ingest(&png, &format!("copy-{i}.png"), "upload", true))
        })
        .collect();
    for t in threads {
        assert!(matches!(t.join().unwrap().unwrap(), Ingested::Duplicate(_)));
    }
    let peak = counting::peak_since(base);
    // Eight decodes at once would hold 384 MB; the gate lets two through (and the decoder's
    // working memory on top).
    assert!(
        peak < (DECODES_AT_ONCE + 1) * decoded,
        "{} MB held at the peak for {} MB images",
        peak >> 20,
        decoded >> 20
    );
    assert!(peak >= decoded, "the copies were decoded: {} MB", peak >> 20);
}
