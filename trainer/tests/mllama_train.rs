//! `trainer::mllama::train` on the real cell fixtures (one per class, from ../shared/data) with
//! a small random-weight mllama whose tokenizer carries Llama 3's real special tokens: the
//! answer loss falls, the best adapters, the curves and the run record are written, and the
//! tuned model classifies a cell into six probabilities.

use std::path::PathBuf;
use trainer::mllama::{MllamaSettings, adapters_path, load_tuned, train};
use wbc_models::mllama::cell::classify;
use wbc_models::mllama::{LoraConfig, LoraTargets};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}

/// The fixture cells listed in `cells.csv`, in its order.
fn cell_images() -> Vec<image::RgbImage> {
    let csv = std::fs::read_to_string(fixtures().join("cells/cells.csv")).unwrap();
    csv.lines()
        .skip(1)
        .map(|l| {
            let name = l.split(',').next().unwrap();
            image::open(fixtures().join("cells").join(name)).unwrap().to_rgb8()
        })
        .collect()
}

/// Training settings for the tiny base: steps of two samples, a quick warm-up.
fn tiny_settings(base: &std::path::Path, lora: LoraConfig, epochs: usize) -> MllamaSettings {
    MllamaSettings {
        base: base.to_path_buf(),
        epochs,
        lr: 1e-2,
        warmup_steps: Some(1),
        accumulate: 2,
        lora,
        max_per_class: None,
        seed: 5,
        // Every weight of this configuration divides into blocks of 8: the whole base in 4 bits.
        base_block: 8,
        device: trainer::device::DeviceChoice::Cpu,
    }
}

#[test]
fn lora_fine_tuning_on_real_cells_lowers_the_answer_loss_and_keeps_the_best_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    trainer::mllama::write_tiny_base(&fixtures(), &base, 3).unwrap();
    // Sharded as the published checkpoints are: training (4-bit base streamed in), export (tensor
    // by tensor) and the bundle's model (built a band at a time) all read it in pieces.
    let shards = std::fs::read_dir(&base)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".safetensors")
        })
        .count();
    assert!(shards >= 2, "{shards} shards");
    assert!(base.join("model.safetensors.index.json").is_file());

    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: LoraTargets {
            cross_attention: true,
            ..Default::default()
        },
        seed: 1,
    };
    let settings = tiny_settings(&base, lora, 3);
    let cells = fixtures().join("cells/cells.csv");
    let run = dir.path().join("run");
    let report = train(&settings, &cells, &cells, &run).unwrap();
    eprintln!("{report:?}");
    assert_eq!(report.train_loss.len(), 3);
    assert!(report.train_loss[2] < report.train_loss[0] - 0.03, "{report:?}");
    // The kept adapters are those of the epoch with the lowest validation loss.
    let best = (0..3)
        .min_by(|&a, &b| report.val_loss[a].total_cmp(&report.val_loss[b]))
        .unwrap()
        + 1;
    assert_eq!(report.best_epoch, best, "{report:?}");
    for f in ["curves.csv", "curves.png", "mllama-run.json"] {
        assert!(run.join(f).is_file(), "{f}");
    }
    assert!(adapters_path(&run).is_file());

    let device = burn::tensor::Device::flex();
    // The base in f32 here (block 0), to merge the adapters into it below.
    let (p, model) = load_tuned(&base, &run, &lora, 0, &device).unwrap();
    let img = image::open(fixtures().join("cells/EO_100884.jpg")).unwrap().to_rgb8();
    let probs = classify(&model, &p, &img, &device).unwrap();
    assert_eq!(probs.len(), 6);
    assert!((probs.iter().sum::<f32>() - 1.0).abs() < 1e-4, "{probs:?}");
    // Merged into the base weights, the tuned model gives the same probabilities.
    let merged = classify(&model.merge_lora(), &p, &img, &device).unwrap();
    for (a, b) in probs.iter().zip(&merged) {
        assert!((a - b).abs() < 1e-4, "{probs:?} vs {merged:?}");
    }

    // Exported: merged, 4-bit, signed; it verifies, passes its self-test, and stays within the
    // stated distance of the model as trained.
    let key = ed25519_dalek::SigningKey::from_bytes(&[4; 32]);
    let bundle_path = dir.path().join("mllama.bundle");
    // The run records its 4-bit base: the export compares against the model as it trained.
    assert_eq!(trainer::mllama::run_lora(&run).unwrap(), (lora, 8));
    let to = trainer::mllama::ExportTo {
        key: &key,
        model_version: 7,
        group: 16,
        out: &bundle_path,
    };
    let r = trainer::mllama::export(&base, &run, &cells, &to, &device).unwrap();
    eprintln!("{r:?}");
    assert_eq!(r.selftest_cases, 6, "one per class");
    assert!(
        r.max_probability_difference <= trainer::mllama::EXPORT_TOLERANCE,
        "{r:?}"
    );
    let bundle = wbc_protocol::bundle::Bundle::open(&bundle_path, &[key.verifying_key()]).unwrap();
    assert_eq!(bundle.manifest.family, wbc_protocol::bundle::Family::Mllama);
    assert_eq!(bundle.manifest.model_version, 7);
    let (bp, bm) = wbc_models::mllama::cell::from_bundle(&bundle, &device).unwrap();
    assert_eq!(
        wbc_models::mllama::cell::self_test(&bm, &bp, &bundle, &device).unwrap(),
        6
    );
    // The classifier every tool uses takes the bundle: self-test, six probabilities, a
    // generated description.
    let c = wbc_models::classify::Classifier::from_bundle(&bundle, &device).unwrap();
    assert_eq!(c.self_test(&bundle).unwrap(), 6);
    let cell = &c.classify(std::slice::from_ref(&img))[0];
    assert_eq!(cell.probabilities.len(), 6);
    assert_eq!(cell.model_version, 7);
    // `trainer eval` runs on the exported bundle and writes its report.
    wbc_protocol::bundle::keys::write_public(&dir.path().join("lab.pem.pub"), &key.verifying_key()).unwrap();
    let report = dir.path().join("eval.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["eval", "--resamples", "20", "--bundle"])
        .arg(&bundle_path)
        .arg("--csv")
        .arg(&cells)
        .arg("--trust")
        .arg(dir.path().join("lab.pem.pub"))
        .arg("--json")
        .arg(&report)
        .env("WBC_WEIGHTS_DIR", dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert!(v.to_string().contains("macro"), "{v}");
    assert_eq!(v["predict"], "score");
    assert_eq!(v["confusion_matrix"][0].as_array().unwrap().len(), 6);
    // As the reference study read its model: the first class named in the generated answer;
    // answers that name none are counted, in a column of their own, as misses.
    let eval = |predict: &str, bundle: &std::path::Path, json: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_trainer"))
            .args(["eval", "--resamples", "20", "--predict", predict, "--bundle"])
            .arg(bundle)
            .arg("--csv")
            .arg(&cells)
            .arg("--trust")
            .arg(dir.path().join("lab.pem.pub"))
            .arg("--trust")
            .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../appliance/keys/default.pub"))
            .arg("--json")
            .arg(json)
            .env("WBC_WEIGHTS_DIR", dir.path())
            .output()
            .unwrap()
    };
    let generated = dir.path().join("generate.json");
    let out = eval("generate", &bundle_path, &generated);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let g: serde_json::Value = serde_json::from_slice(&std::fs::read(&generated).unwrap()).unwrap();
    assert_eq!(g["predict"], "generate");
    let none = g["no_class_named"]
        .as_u64()
        .expect("a count of answers naming no class");
    let cm = g["confusion_matrix"].as_array().unwrap();
    assert_eq!(cm[0].as_array().unwrap().len(), 7);
    let last: u64 = cm.iter().map(|row| row[6].as_u64().unwrap()).sum();
    assert_eq!(last, none);
    let total: u64 = cm
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|x| x.as_u64().unwrap())
        .sum();
    let images = cell_images();
    assert_eq!(total, images.len() as u64);
    // Each cell's generated answer, read the same way, gives the same count.
    let named = c
        .predict(&images)
        .iter()
        .filter(|p| {
            p.description
                .as_deref()
                .and_then(trainer::eval::first_class_named)
                .is_none()
        })
        .count() as u64;
    assert_eq!(named, none);
    assert!(String::from_utf8_lossy(&out.stdout).contains("named no class"));
    // A bundle that only scores classes has no answers to read.
    let out = eval(
        "generate",
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../appliance/models/default.bundle"),
        &dir.path().join("compact.json"),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--predict generate needs"));
    // 4-bit projections and f16 embeddings: well under half the model in f32.
    let f32_bytes = wbc_models::mllama::MllamaConfig::load(&base)
        .unwrap()
        .parameter_count()
        .total as usize
        * 4;
    assert!(r.bytes * 2 < f32_bytes, "{} vs {f32_bytes}", r.bytes);
}

/// A run stopped part way (twice: inside the first epoch, then inside the second) and resumed
/// ends where the same run without a stop ends: the adapters, the optimiser's moments, the
/// position in the epoch and the schedule's step all come back. A checkpoint is refused for
/// other settings, and a missing or damaged one is an error that says so.
#[test]
fn a_run_stopped_part_way_and_resumed_ends_as_the_run_without_a_stop() {
    use trainer::mllama::{Control, resume_dir, train_with};
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    trainer::mllama::write_tiny_base(&fixtures(), &base, 3).unwrap();
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: LoraTargets::default(),
        seed: 1,
    };
    let settings = tiny_settings(&base, lora, 2);
    let cells = fixtures().join("cells/cells.csv");
    let whole = dir.path().join("whole");
    let uninterrupted = train(&settings, &cells, &cells, &whole).unwrap();

    let run = dir.path().join("run");
    let stop = |resume| Control {
        resume,
        checkpoint_every: 0,
        stop_after: Some(2),
    };
    // 7 cells in steps of 2: 4 optimiser steps an epoch. Stopped inside the first epoch (with a
    // checkpoint at every step on the way: only the newest is kept) ...
    let first = train_with(
        &settings,
        &cells,
        &cells,
        &run,
        &Control {
            checkpoint_every: 1,
            ..stop(false)
        },
    )
    .unwrap();
    assert!(first.stopped && first.train_loss.is_empty(), "{first:?}");
    let mut kept: Vec<String> = std::fs::read_dir(resume_dir(&run))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    kept.sort();
    assert_eq!(kept, ["lora-2.bpk", "optim-2.bpk", "state.json"]);
    // ... a run started again into its folder is refused, not overwritten ...
    let e = train(&settings, &cells, &cells, &run).unwrap_err();
    assert!(format!("{e:#}").contains("--resume"), "{e:#}");
    // ... then at the end of the first epoch, then to the end.
    let second = train_with(&settings, &cells, &cells, &run, &stop(true)).unwrap();
    assert!(second.stopped && second.train_loss.len() == 1, "{second:?}");
    let resume = Control {
        resume: true,
        ..Control::default()
    };
    let last = train_with(&settings, &cells, &cells, &run, &resume).unwrap();
    assert!(!last.stopped);
    eprintln!("{uninterrupted:?}\n{last:?}");
    for (a, b) in uninterrupted
        .train_loss
        .iter()
        .chain(&uninterrupted.val_loss)
        .zip(last.train_loss.iter().chain(&last.val_loss))
    {
        assert!((a - b).abs() < 1e-4 * a.abs().max(1.0), "{uninterrupted:?} vs {last:?}");
    }
    assert_eq!(uninterrupted.best_epoch, last.best_epoch);
    let device = burn::tensor::Device::flex();
    let img = image::open(fixtures().join("cells/EO_100884.jpg")).unwrap().to_rgb8();
    let probs = |run: &std::path::Path| {
        let (p, model) = load_tuned(&base, run, &lora, 8, &device).unwrap();
        classify(&model, &p, &img, &device).unwrap()
    };
    let (a, b) = (probs(&whole), probs(&run));
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-4, "{a:?} vs {b:?}");
    }
    // The curves hold both epochs once.
    let curves = std::fs::read_to_string(run.join("curves.csv")).unwrap();
    assert_eq!(curves.lines().count(), 3, "{curves}");
    // A finished run resumed has nothing left to do.
    let again = train_with(&settings, &cells, &cells, &run, &resume).unwrap();
    assert_eq!(
        (again.train_loss, again.best_epoch),
        (last.train_loss.clone(), last.best_epoch)
    );

    // Other settings: refused, and the checkpoint is left as it was.
    let other = MllamaSettings {
        lr: 2e-2,
        ..settings.clone()
    };
    let e = train_with(&other, &cells, &cells, &run, &resume).unwrap_err();
    assert!(format!("{e:#}").contains("other settings"), "{e:#}");
    // Other data: refused.
    let fewer = dir.path().join("fewer.csv");
    let listed = std::fs::read_to_string(&cells).unwrap();
    let rows: Vec<&str> = listed.lines().collect();
    std::fs::write(&fewer, rows[..rows.len() - 1].join("\n")).unwrap();
    for f in std::fs::read_dir(fixtures().join("cells")).unwrap() {
        let f = f.unwrap();
        let _ = std::fs::copy(f.path(), dir.path().join(f.file_name()));
    }
    let e = train_with(&settings, &fewer, &fewer, &run, &resume).unwrap_err();
    assert!(format!("{e:#}").contains("its own data"), "{e:#}");
    // Nothing to resume from, or a damaged state.
    let e = train_with(&settings, &cells, &cells, &dir.path().join("new"), &resume).unwrap_err();
    assert!(format!("{e:#}").contains("no checkpoint"), "{e:#}");
    std::fs::write(resume_dir(&run).join("state.json"), b"{\"epoch\": 1").unwrap();
    let e = train_with(&settings, &cells, &cells, &run, &resume).unwrap_err();
    assert!(format!("{e:#}").contains("not a checkpoint"), "{e:#}");
}
