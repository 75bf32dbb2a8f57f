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

#[test]
fn mllama_runs_on_the_gpu_backend_with_the_cpu_backends_logits_and_tokens() {
    use wbc_shared::mllama::{Checkpoint, Mllama, MllamaConfig, Reference, Sampling, generate, reference_inputs};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tests/fixtures/mllama/gqa-llama3");
    let cfg = MllamaConfig::load(&dir).unwrap();
    let r = Reference::open(&dir.join("io.safetensors")).unwrap();
    let gpu = select(BackendChoice::Gpu).expect("a wgpu adapter (install mesa-vulkan-drivers without a GPU)");
    let cpu = select(BackendChoice::Cpu).unwrap();
    let run = |d: &burn::tensor::Device| {
        let model = Mllama::load(&cfg, &Checkpoint::open(&dir).unwrap(), d).unwrap();
        let logits = model
            .forward(reference_inputs(&r, d).unwrap())
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let tokens = generate(
            &model,
            reference_inputs(&r, d).unwrap().rows(0..1),
            8,
            &[],
            Sampling::Greedy,
        );
        (logits, tokens)
    };
    let (g, c) = (run(&gpu.device), run(&cpu.device));
    let d = wbc_shared::mllama::Difference::of(&g.0, &c.0);
    assert!(d.relative < 1e-3, "GPU vs CPU logits {d:?}");
    assert_eq!(g.1, c.1, "greedy tokens");
}
