//! `trainer::mllama::train` on the real cell fixtures (one per class, from ../shared/data) with
//! a small random-weight mllama whose tokenizer carries Llama 3's real special tokens: the
//! answer loss falls, the best adapters, the curves and the run record are written, and the
//! tuned model classifies a cell into six probabilities.

use std::path::PathBuf;
use trainer::mllama::{MllamaSettings, adapters_path, classify, load_tuned, train};
use wbc_shared::mllama::{LoraConfig, LoraTargets, MllamaConfig, write_random_weights};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/tests/fixtures")
}

#[test]
fn lora_fine_tuning_on_real_cells_lowers_the_answer_loss_and_keeps_the_best_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    std::fs::create_dir(&base).unwrap();
    // The fixture's 28-px-tile architecture with the real vocabulary (Llama 3's ids).
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("mllama/gqa-llama3/config.json")).unwrap())
            .unwrap();
    config["text_config"]["vocab_size"] = 128_256.into();
    config["image_token_index"] = 128_256.into();
    std::fs::write(base.join("config.json"), serde_json::to_vec(&config).unwrap()).unwrap();
    std::fs::copy(
        fixtures().join("mllama/chat/tokenizer.json"),
        base.join("tokenizer.json"),
    )
    .unwrap();
    let cfg = MllamaConfig::load(&base).unwrap();
    write_random_weights(&cfg, &base.join("model.safetensors"), 3).unwrap();

    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: LoraTargets {
            cross_attention: true,
            ..Default::default()
        },
    };
    let settings = MllamaSettings {
        base: base.clone(),
        epochs: 3,
        lr: 1e-2,
        accumulate: 2,
        lora,
        max_per_class: None,
        seed: 5,
    };
    let cells = fixtures().join("cells/cells.csv");
    let run = dir.path().join("run");
    let report = train(&settings, &cells, &cells, &run).unwrap();
    eprintln!("{report:?}");
    assert_eq!(report.train_loss.len(), 3);
    assert!(report.train_loss[2] < report.train_loss[0] - 0.03, "{report:?}");
    assert!(report.val_loss[2] < report.val_loss[0], "{report:?}");
    assert!((1..=3).contains(&report.best_epoch));
    for f in ["curves.csv", "curves.png", "mllama-run.json"] {
        assert!(run.join(f).is_file(), "{f}");
    }
    assert!(adapters_path(&run).is_file());

    let device = burn::tensor::Device::flex();
    let (p, model) = load_tuned(&base, &run, &lora, &device).unwrap();
    let img = image::open(fixtures().join("cells/EO_100884.jpg")).unwrap().to_rgb8();
    let probs = classify(&model, &p, &img, &device).unwrap();
    assert_eq!(probs.len(), 6);
    assert!((probs.iter().sum::<f32>() - 1.0).abs() < 1e-4, "{probs:?}");
    // Merged into the base weights, the tuned model gives the same probabilities.
    let merged = classify(&model.merge_lora(), &p, &img, &device).unwrap();
    for (a, b) in probs.iter().zip(&merged) {
        assert!((a - b).abs() < 1e-4, "{probs:?} vs {merged:?}");
    }
}
