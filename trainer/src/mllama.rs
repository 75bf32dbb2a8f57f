//! Fine-tuning Llama 3.2 Vision (mllama) with LoRA, as the reference study did: each labelled
//! cell becomes a conversation — the image and the question, then an answer that starts with
//! the class name and goes on with its description — and the loss is the answer's alone. The
//! base is frozen; adapters sit on the text model's attention and MLP projections (and, when
//! asked, the cross-attention and vision layers). Gradients are accumulated over several
//! samples; every epoch measures the validation answer loss and the class accuracy (classes
//! scored by the likelihood of their names as the answer's start), keeps the adapters of the
//! best epoch, and writes the loss curve.

use crate::dataset::{Sample, load_images, read_samples};
use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams};
use burn::store::{ModuleSnapshot, SafetensorsStore};
use burn::tensor::Device;
use image::RgbImage;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use wbc_shared::classes::CellClass;
use wbc_shared::describe::describe;
use wbc_shared::image::DecodeLimits;
use wbc_shared::mllama::cell::{Encoded, Prompting};
use wbc_shared::mllama::{Checkpoint, LoraConfig, Mllama, probabilities, score};

/// The answer the model learns for a cell: the class name, then its description.
pub fn answer_text(class: CellClass, sample: &Sample) -> String {
    format!("{}. {}", class.name(), describe(class, &sample.attrs))
}

/// Training settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MllamaSettings {
    /// Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json).
    pub base: PathBuf,
    /// Epochs.
    pub epochs: usize,
    /// Learning rate (AdamW).
    pub lr: f64,
    /// Samples per optimiser step (gradient accumulation).
    pub accumulate: usize,
    /// LoRA rank, alpha, dropout and targets.
    pub lora: LoraConfig,
    /// At most this many training samples per class.
    pub max_per_class: Option<usize>,
    /// Seed.
    pub seed: u64,
    /// The frozen base's linear weights are held in 4 bits with one scale per this many values
    /// (0: kept in f32); a weight whose output dimension does not divide stays in f32.
    pub base_block: u8,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct MllamaReport {
    /// Mean training answer loss per epoch.
    pub train_loss: Vec<f64>,
    /// Validation answer loss per epoch.
    pub val_loss: Vec<f64>,
    /// Validation class accuracy per epoch.
    pub val_accuracy: Vec<f64>,
    /// Epoch whose adapters were kept (lowest validation loss).
    pub best_epoch: usize,
}

/// The adapters of the best epoch, in `out`.
pub fn adapters_path(out: &Path) -> PathBuf {
    out.join("adapters.safetensors")
}

fn labelled(csv: &Path, max_per_class: Option<usize>, rng: &mut impl rand::Rng) -> Result<Vec<(Sample, RgbImage)>> {
    let mut samples: Vec<Sample> = read_samples(csv)?.into_iter().filter(|s| s.label.is_some()).collect();
    samples.shuffle(rng);
    if let Some(m) = max_per_class {
        let mut seen = [0usize; 6];
        samples.retain(|s| {
            let i = s.label.expect("labelled").index();
            seen[i] += 1;
            seen[i] <= m
        });
    }
    let (loaded, rejected) = load_images(samples, &DecodeLimits::default());
    for r in &rejected {
        tracing::warn!(path = %r.path.display(), reason = %r.reason, "image skipped");
    }
    if loaded.is_empty() {
        bail!("{} holds no readable labelled image", csv.display());
    }
    Ok(loaded)
}

/// Fine-tunes with LoRA; writes `adapters.safetensors`, `curves.csv`, `curves.png` and
/// `mllama-run.json` into `out`.
pub fn train(s: &MllamaSettings, train_csv: &Path, val_csv: &Path, out: &Path) -> Result<MllamaReport> {
    if s.accumulate == 0 || s.epochs == 0 || s.lora.rank == 0 {
        bail!("--accumulate, --epochs and --rank must be at least 1");
    }
    std::fs::create_dir_all(out)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(s.seed);
    let p = Prompting::load(&s.base)?;
    let device = Device::flex();
    let ad = device.clone().autodiff();
    let base = Mllama::load(&p.cfg, &Checkpoint::open(&s.base)?, &ad)
        .with_context(|| format!("loading {}", s.base.display()))?;
    let base = if s.base_block > 0 {
        let (q4, done, total) = base.quantize_base(s.base_block);
        tracing::info!(
            block = s.base_block,
            "frozen base: {done} of {total} linear weights in 4 bits"
        );
        q4
    } else {
        base
    };
    let mut model = base.with_lora(&s.lora, &ad);
    let encode = |set: Vec<(Sample, RgbImage)>| -> Result<Vec<(CellClass, Encoded)>> {
        set.into_iter()
            .map(|(sample, img)| {
                let class = sample.label.expect("labelled");
                Ok((class, p.encode(&img, Some(&answer_text(class, &sample)))?))
            })
            .collect()
    };
    let train_set = encode(labelled(train_csv, s.max_per_class, &mut rng)?)?;
    let val_set = encode(labelled(val_csv, None, &mut rng)?)?;
    tracing::info!(train = train_set.len(), val = val_set.len(), "samples encoded");
    let candidates = p.class_candidates()?;
    let mut optim = AdamWConfig::new().init();
    let mut report = MllamaReport {
        train_loss: Vec::new(),
        val_loss: Vec::new(),
        val_accuracy: Vec::new(),
        best_epoch: 0,
    };
    let mut curves = std::fs::File::create(out.join("curves.csv"))?;
    writeln!(curves, "epoch,train_loss,val_loss,val_accuracy")?;
    let mut order: Vec<usize> = (0..train_set.len()).collect();
    for epoch in 1..=s.epochs {
        order.shuffle(&mut rng);
        let mut acc = GradientsAccumulator::new();
        let (mut total, mut pending) = (0f64, 0usize);
        for (k, &i) in order.iter().enumerate() {
            let e = &train_set[i].1;
            let loss = model.answer_loss(p.inputs(e, None, &ad), e.answer_from) / s.accumulate as f64;
            let v = f64::from(loss.clone().into_scalar::<f32>()) * s.accumulate as f64;
            if !v.is_finite() {
                bail!("the loss became {v} at epoch {epoch}; lower --lr");
            }
            total += v;
            acc.accumulate(&model, GradientsParams::from_grads(loss.backward(), &model));
            pending += 1;
            if pending == s.accumulate || k + 1 == order.len() {
                model = optim.step(s.lr, model, acc.grads());
                pending = 0;
            }
        }
        let valid = model.valid();
        let (mut vloss, mut right) = (0f64, 0usize);
        for (class, e) in &val_set {
            vloss += f64::from(
                valid
                    .answer_loss(p.inputs(e, None, &device), e.answer_from)
                    .into_scalar::<f32>(),
            );
            let probs = probabilities(&score(&valid, p.inputs(e, Some(e.answer_from), &device), &candidates));
            right += usize::from(wbc_shared::mllama::generate::argmax(&probs) == class.index());
        }
        let (tl, vl) = (total / train_set.len() as f64, vloss / val_set.len() as f64);
        let va = right as f64 / val_set.len() as f64;
        writeln!(curves, "{epoch},{tl:.5},{vl:.5},{va:.4}")?;
        curves.flush()?;
        tracing::info!(epoch, train_loss = tl, val_loss = vl, val_accuracy = va, "epoch done");
        if report.val_loss.iter().all(|&b| vl < b) {
            report.best_epoch = epoch;
            let path = adapters_path(out);
            let _ = std::fs::remove_file(&path);
            let mut store = SafetensorsStore::from_file(path.clone()).with_regex(r"\.lora\.");
            valid
                .save_into(&mut store)
                .map_err(|e| anyhow::anyhow!("saving {}: {e:?}", path.display()))?;
        }
        report.train_loss.push(tl);
        report.val_loss.push(vl);
        report.val_accuracy.push(va);
    }
    crate::plot::curves(&out.join("curves.csv"), &out.join("curves.png"))?;
    std::fs::write(
        out.join("mllama-run.json"),
        serde_json::to_vec_pretty(&serde_json::json!({"settings": s, "report": report}))?,
    )?;
    Ok(report)
}

/// Writes a small random-weight base checkpoint into `dir` for tests and demonstrations: the
/// architecture of the committed 28-px-tile fixture (`fixtures/mllama/gqa-llama3`) with Llama 3's
/// real vocabulary and the fixture tokenizer that carries its real special tokens.
pub fn write_tiny_base(fixtures: &Path, dir: &Path, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures.join("mllama/gqa-llama3/config.json"))?)?;
    config["text_config"]["vocab_size"] = 128_256.into();
    config["image_token_index"] = 128_256.into();
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&config)?)?;
    std::fs::copy(fixtures.join("mllama/chat/tokenizer.json"), dir.join("tokenizer.json"))?;
    let cfg = wbc_shared::mllama::MllamaConfig::load(dir)?;
    wbc_shared::mllama::write_random_weights(&cfg, &dir.join("model.safetensors"), seed)?;
    Ok(())
}

/// The base with the adapters of a run, merged into its weights.
pub fn load_tuned(base: &Path, run: &Path, lora: &LoraConfig, device: &Device) -> Result<(Prompting, Mllama)> {
    let p = Prompting::load(base)?;
    let model = Mllama::load(&p.cfg, &Checkpoint::open(base)?, device)?.with_lora(lora, device);
    let mut store = SafetensorsStore::from_file(adapters_path(run))
        .with_regex(r"\.lora\.")
        .allow_partial(true);
    let mut model = model;
    model
        .load_from(&mut store)
        .map_err(|e| anyhow::anyhow!("loading {}: {e:?}", adapters_path(run).display()))?;
    Ok((p, model))
}

/// The LoRA settings a run trained with (from its `mllama-run.json`).
pub fn run_lora(run: &Path) -> Result<LoraConfig> {
    let p = run.join("mllama-run.json");
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?)?;
    serde_json::from_value(v["settings"]["lora"].clone()).with_context(|| format!("{}: settings.lora", p.display()))
}

/// What an export measured.
#[derive(Debug, Clone, Serialize)]
pub struct MllamaExportReport {
    /// Largest difference of a class probability between the tuned model as trained (base +
    /// adapters, f32) and the exported one (merged, quantized), over the val cells compared.
    pub max_probability_difference: f32,
    /// Val cells compared.
    pub compared: usize,
    /// Self-test cases in the bundle.
    pub selftest_cases: usize,
    /// Bundle size, bytes.
    pub bytes: usize,
}

/// Largest probability difference allowed between the trained and the exported model.
pub const EXPORT_TOLERANCE: f32 = 0.05;

/// Merges a run's adapters into the base in f32, quantizes the projections to 4 bits (groups of
/// `group`, f16 scales; embeddings in f16, norms, gates and biases in f32), adds one self-test
/// image per class from `val` with the exported model's probabilities, signs the bundle and
/// checks that it verifies and passes its self-test.
pub fn export(
    base: &Path,
    run: &Path,
    val: &Path,
    key: &ed25519_dalek::SigningKey,
    model_version: u64,
    group: usize,
    out: &Path,
) -> Result<MllamaExportReport> {
    use wbc_shared::bundle::{Bundle, BundleBuilder, Family, Manifest};
    use wbc_shared::classify::{SELFTEST_PART, SelfTest, SelfTestCase};
    use wbc_shared::compact::weights::Storage;
    use wbc_shared::mllama::cell::{classify, parts};
    let device = Device::flex();
    let lora = run_lora(run)?;
    let (p, mut tuned) = load_tuned(base, run, &lora, &device)?;
    let mut w = Checkpoint::open(base)?.all()?;
    for (name, delta) in tuned.lora_deltas() {
        let t =
            w.0.get_mut(&format!("{name}.weight"))
                .with_context(|| format!("{name}.weight"))?;
        t.values.iter_mut().zip(&delta).for_each(|(v, d)| *v += d);
    }
    let weights = w.to_safetensors_by(group, |name, shape| {
        let projection = shape.len() == 2
            && name.ends_with(".weight")
            && (name.ends_with("_proj.weight")
                || name.ends_with("fc1.weight")
                || name.ends_with("fc2.weight")
                || name.ends_with("lm_head.weight")
                || name == "multi_modal_projector.weight");
        if projection {
            Storage::Q4
        } else if name.ends_with("embed_tokens.weight") || name.contains("embedding") {
            Storage::F16
        } else {
            Storage::F32
        }
    })?;
    let exported = Mllama::from_weights(
        &p.cfg,
        &wbc_shared::compact::weights::Weights::from_safetensors(&weights)?,
        &device,
    )?;
    // Val cells: the first readable one of each class is a self-test case; all are compared.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let cells = labelled(val, None, &mut rng)?;
    let mut cases = Vec::new();
    let mut parts_out: Vec<(String, Vec<u8>)> = Vec::new();
    let mut worst = 0f32;
    let mut seen = [false; 6];
    for (sample, img) in cells.iter().take(32) {
        let a = classify(&tuned, &p, img, &device)?;
        let b = classify(&exported, &p, img, &device)?;
        worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(worst, f32::max);
        let c = sample.label.expect("labelled").index();
        if !seen[c] {
            seen[c] = true;
            let name = format!("selftest/{}.png", CellClass::ALL[c].name().to_lowercase());
            let mut png = Vec::new();
            image::DynamicImage::ImageRgb8(img.clone())
                .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
            parts_out.push((name.clone(), png));
            cases.push(SelfTestCase {
                image: name,
                probabilities: b,
            });
        }
    }
    let compared = cells.len().min(32);
    let cfg_json: serde_json::Value = serde_json::from_slice(&std::fs::read(base.join("config.json"))?)?;
    let manifest = Manifest {
        format_version: 0,
        family: Family::Mllama,
        model_config: cfg_json,
        classes: CellClass::ALL.iter().map(|c| c.name().to_string()).collect(),
        preprocess: wbc_shared::image::Preprocess {
            input_size: p.proc.tile as u32,
            mean: p.proc.mean,
            std: p.proc.std,
            cell: None,
        },
        model_version,
        min_appliance_version: env!("CARGO_PKG_VERSION").into(),
        created_at: time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339)?,
        training: serde_json::json!({"family": "mllama", "lora": lora, "quantization": {"bits": 4, "group": group}}),
        metrics: serde_json::json!({"max_probability_difference_exported_vs_trained": worst, "compared_val_cells": compared}),
        parts: Default::default(),
    };
    let n_cases = cases.len();
    let mut b = BundleBuilder::new(manifest)
        .part(parts::CONFIG, std::fs::read(base.join("config.json"))?)?
        .part(parts::TOKENIZER, std::fs::read(base.join("tokenizer.json"))?)?
        .part(parts::PREPROCESSOR, serde_json::to_vec_pretty(&p.preprocessor_json())?)?
        .part(parts::WEIGHTS, weights)?
        .part(
            SELFTEST_PART,
            serde_json::to_vec_pretty(&SelfTest { tolerance: 2e-3, cases })?,
        )?;
    for (name, bytes) in parts_out {
        b = b.part(&name, bytes)?;
    }
    let bytes = b.finish(key)?;
    // What we ship verifies and passes its own self-test.
    let bundle = Bundle::from_bytes(&bytes, &[key.verifying_key()])?;
    let (bp, bm) = wbc_shared::mllama::cell::from_bundle(&bundle, &device)?;
    let checked = wbc_shared::mllama::cell::self_test(&bm, &bp, &bundle, &device)?;
    std::fs::write(out, &bytes).with_context(|| format!("writing {}", out.display()))?;
    tracing::info!(
        cases = checked,
        max_probability_difference = worst,
        "exported mllama bundle"
    );
    Ok(MllamaExportReport {
        max_probability_difference: worst,
        compared,
        selftest_cases: n_cases,
        bytes: bytes.len(),
    })
}
