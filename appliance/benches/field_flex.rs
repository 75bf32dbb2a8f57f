//! A 640×480 microscope field (BCCD fixture) on the CPU (burn flex backend): finding its white
//! cells, and the whole field end to end (find, cut out, classify, describe).

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use wbc_shared::classify::Classifier;
use wbc_shared::finder::{FinderConfig, find_cells};

/// Pixel size of the BCCD fixture fields (their red cells, 7.5 µm, are about 104 px).
const MICRONS_PER_PIXEL: f32 = 0.072;

fn bench(c: &mut Criterion) {
    let keys = appliance::trusted_keys(&[]).unwrap();
    let bundle = appliance::open_bundle(None, &keys).unwrap();
    let classifier = Classifier::from_bundle(&bundle, &burn::tensor::Device::flex()).unwrap();
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/fields/images/BloodImage_00000.jpg");
    let field = image::open(path).unwrap().to_rgb8();
    assert_eq!(field.dimensions(), (640, 480));
    let cfg = FinderConfig::default();
    let mut g = c.benchmark_group("field_flex");
    g.sample_size(10);
    g.bench_function("find_cells_640x480", |b| {
        b.iter(|| black_box(find_cells(&field, MICRONS_PER_PIXEL, &cfg)))
    });
    g.bench_function("whole_field_640x480", |b| {
        b.iter(|| black_box(appliance::classify_field(&classifier, &field, MICRONS_PER_PIXEL, &cfg)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
