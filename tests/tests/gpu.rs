//! The wgpu backend (build with `--features wgpu`): the same answers as the CPU backend. On a
//! machine without a GPU it runs on Mesa's software Vulkan adapter (`mesa-vulkan-drivers`).
#![cfg(feature = "wgpu")]

use appliance::backend::{BackendChoice, select};
use wbc_models::classify::Classifier;

#[test]
fn the_gpu_backend_gives_the_cpu_backends_answers() {
    let keys = appliance::trusted_keys(&[]).unwrap();
    let bundle = appliance::open_bundle(None, &keys).unwrap();
    let gpu = select(BackendChoice::Gpu).expect("a wgpu adapter (install mesa-vulkan-drivers without a GPU)");
    assert!(gpu.name.starts_with("GPU"), "{}", gpu.name);
    let cpu = select(BackendChoice::Cpu).unwrap();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/cells");
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
    use wbc_models::mllama::{Checkpoint, Mllama, MllamaConfig, Reference, Sampling, generate, reference_inputs};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/mllama/gqa-llama3");
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
    let d = wbc_models::mllama::Difference::of(&g.0, &c.0);
    assert!(d.relative < 1e-3, "GPU vs CPU logits {d:?}");
    assert_eq!(g.1, c.1, "greedy tokens");
}

#[test]
fn an_exported_4_bit_mllama_bundle_runs_on_the_gpu_backend_with_the_cpu_backends_answers() {
    // Fine-tuned for one epoch on the fixture cells (4-bit base), exported (merged, 4-bit,
    // signed) by the trainer, then loaded as the appliance loads any bundle.
    let dir = tempfile::tempdir().unwrap();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    let base = dir.path().join("base");
    trainer::mllama::write_tiny_base(&fixtures, &base, 3).unwrap();
    let lora = wbc_models::mllama::LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: Default::default(),
        seed: 1,
    };
    let settings = trainer::mllama::MllamaSettings {
        base: base.clone(),
        epochs: 1,
        lr: 1e-2,
        warmup_steps: Some(1),
        accumulate: 2,
        lora,
        max_per_class: None,
        seed: 5,
        base_block: 8,
        device: trainer::device::DeviceChoice::Cpu,
    };
    let cells = fixtures.join("cells/cells.csv");
    let run = dir.path().join("run");
    trainer::mllama::train(&settings, &cells, &cells, &run).unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&[4; 32]);
    let path = dir.path().join("mllama.bundle");
    let to = trainer::mllama::ExportTo {
        key: &key,
        model_version: 7,
        group: 16,
        out: &path,
    };
    trainer::mllama::export(&base, &run, &cells, &to, &burn::tensor::Device::flex()).unwrap();
    let bundle = wbc_protocol::bundle::Bundle::open(&path, &[key.verifying_key()]).unwrap();

    let gpu = select(BackendChoice::Gpu).expect("a wgpu adapter (install mesa-vulkan-drivers without a GPU)");
    let cpu = select(BackendChoice::Cpu).unwrap();
    let on_gpu = Classifier::from_bundle(&bundle, &gpu.device).unwrap();
    assert_eq!(
        on_gpu.self_test(&bundle).unwrap(),
        6,
        "the bundle's self-test on the GPU"
    );
    let on_cpu = Classifier::from_bundle(&bundle, &cpu.device).unwrap();
    let images: Vec<_> = ["NGS_0022.jpg", "EO_100884.jpg"]
        .iter()
        .map(|n| image::open(fixtures.join("cells").join(n)).unwrap().to_rgb8())
        .collect();
    let (g, c) = (on_gpu.classify(&images), on_cpu.classify(&images));
    for (g, c) in g.iter().zip(&c) {
        assert_eq!(g.probabilities.len(), 6);
        for ((ka, a), (kb, b)) in g.probabilities.iter().zip(&c.probabilities) {
            assert_eq!(ka, kb);
            assert!(
                (a - b).abs() < 1e-3,
                "GPU {:?} vs CPU {:?}",
                g.probabilities,
                c.probabilities
            );
        }
        assert!(!g.description.is_empty(), "a generated description");
    }
}
