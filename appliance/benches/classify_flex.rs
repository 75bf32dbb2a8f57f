//! Single-cell classification with the default bundle on the CPU (burn flex backend):
//! one cell, and a batch of 32.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use wbc_models::classify::Classifier;

fn bench(c: &mut Criterion) {
    let keys = appliance::trusted_keys(&[]).unwrap();
    let bundle = appliance::open_bundle(None, &keys).unwrap();
    let classifier = Classifier::from_bundle(&bundle, &burn::tensor::Device::flex()).unwrap();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/cells");
    let img = image::open(dir.join("NGS_0022.jpg")).unwrap().to_rgb8();
    let mut g = c.benchmark_group("classify_flex");
    g.sample_size(10);
    g.bench_function("one_cell", |b| {
        b.iter(|| black_box(classifier.classify(std::slice::from_ref(&img))))
    });
    let batch: Vec<_> = (0..32).map(|_| img.clone()).collect();
    g.bench_function("batch_32", |b| b.iter(|| black_box(classifier.classify(&batch))));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
