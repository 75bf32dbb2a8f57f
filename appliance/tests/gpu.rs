//! The wgpu backend (build with `--features wgpu`): the same answers as the CPU backend. On a
//! machine without a GPU it runs on Mesa's software Vulkan adapter (`mesa-vulkan-drivers`).
#![cfg(feature = "wgpu")]

use appliance::backend::{BackendChoice, select};
use wbc_shared::classify::Classifier;

#[test]
fn the_gpu_backend_gives_the_cpu_backends_answers() {
    let keys = appliance::trusted_keys(&[]).unwrap();
    let bundle = appliance::open_bundle(None, &keys).unwrap();
    let gpu = select(BackendChoice::Gpu).expect("a wgpu adapter (install mesa-vulkan-drivers without a GPU)");
    assert!(gpu.name.starts_with("GPU"), "{}", gpu.name);
    let cpu = select(BackendChoice::Cpu).unwrap();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tests/fixtures/cells");
    let images: Vec<_> = ["NGS_0022.jpg", "MYO_0024.jpg"]
        .iter()
        .map(|n| image::open(dir.join(n)).unwrap().to_rgb8())
        .collect();
    let on = |d: &burn::tensor::Device| Classifier::from_bundle(&bundle, d).unwrap().predict(&images);
    let (g, c) = (on(&gpu.device), on(&cpu.device));
    for (g, c) in g.iter().zip(&c) {
        for (a, b) in g.probs.iter().zip(&c.probs) {
            assert!((a - b).abs() < 1e-3, "GPU {:?} vs CPU {:?}", g.probs, c.probs);
        }
        assert_eq!(g.ood_score.is_some(), c.ood_score.is_some());
    }
}
