//! A 640×480 microscope field (BCCD fixture): finding its white cells, and the whole field end
//! to end (find, cut out, classify, describe), and one cell, on the CPU backend (burn flex)
//! and, in a build with `--features wgpu`, on the wgpu backend.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use wbc_cells::finder::{FinderConfig, find_cells};
use wbc_models::classify::Classifier;

/// Pixel size of the BCCD fixture fields (their red cells, 7.5 µm, are about 104 px).
const MICRONS_PER_PIXEL: f32 = 0.072;

fn bench(c: &mut Criterion) {
    let keys = appliance::trusted_keys(&[]).unwrap();
    let bundle = appliance::open_bundle(None, &keys).unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let field = image::open(root.join("tests/fixtures/fields/images/BloodImage_00000.jpg"))
        .unwrap()
        .to_rgb8();
    assert_eq!(field.dimensions(), (640, 480));
    let cell = image::open(root.join("shared/fixtures/cells/NGS_0022.jpg"))
        .unwrap()
        .to_rgb8();
    let cfg = FinderConfig::default();
    let mut g = c.benchmark_group("field");
    g.sample_size(10);
    g.bench_function("find_cells_640x480", |b| {
        b.iter(|| black_box(find_cells(&field, MICRONS_PER_PIXEL, &cfg)))
    });
    let mut backends = vec![("cpu", appliance::backend::BackendChoice::Cpu)];
    if cfg!(feature = "wgpu") {
        backends.push(("wgpu", appliance::backend::BackendChoice::Gpu));
    }
    for (tag, choice) in backends {
        let backend = appliance::backend::select(choice).unwrap();
        eprintln!("{tag}: {}", backend.name);
        let classifier = Classifier::from_bundle(&bundle, &backend.device).unwrap();
        // The first run compiles and autotunes kernels on a GPU: not part of the figures.
        black_box(classifier.classify(std::slice::from_ref(&cell)));
        g.bench_function(format!("{tag}/one_cell"), |b| {
            b.iter(|| black_box(classifier.classify(std::slice::from_ref(&cell))))
        });
        g.bench_function(format!("{tag}/whole_field_640x480"), |b| {
            b.iter(|| black_box(appliance::classify_field(&classifier, &field, MICRONS_PER_PIXEL, &cfg)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
