//! Fine-tuning: conversations in, the best epoch's adapters out (see the family's notes in
//! [`super`]).

use crate::dataset::Sample;
use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams};
use burn::store::{ModuleSnapshot, SafetensorsStore};
use image::RgbImage;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use wbc_models::mllama::cell::{Encoded, Prompting};
use wbc_models::mllama::{Checkpoint, LoraConfig, Mllama, probabilities, score};
use wbc_protocol::classes::CellClass;

use super::*;

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
    /// Where the model trains.
    #[serde(default)]
    pub device: crate::device::DeviceChoice,
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

/// Fine-tunes with LoRA; writes `adapters.safetensors`, `curves.csv`, `curves.png` and
/// `mllama-run.json` into `out`.
pub fn train(s: &MllamaSettings, train_csv: &Path, val_csv: &Path, out: &Path) -> Result<MllamaReport> {
    if s.accumulate == 0 || s.epochs == 0 || s.lora.rank == 0 {
        bail!("--accumulate, --epochs and --rank must be at least 1");
    }
    std::fs::create_dir_all(out)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(s.seed);
    let p = Prompting::load(&s.base)?;
    let device = s.device.device()?;
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
    // Each sample keeps its decoded cell image and answer; the conversation and the image's
    // tiles are made when the sample is used. Kept encoded, the tiles alone (up to 4 × 3 × 560²
    // floats, 15 MB a cell) would hold about 130 GB for the training and val sets.
    let answers = |set: Vec<(Sample, RgbImage)>| -> Vec<(CellClass, RgbImage, String)> {
        set.into_iter()
            .map(|(sample, img)| {
                let class = sample.label.expect("labelled");
                let answer = answer_text(class, &sample);
                (class, img, answer)
            })
            .collect()
    };
    let train_set = answers(labelled(train_csv, s.max_per_class, &mut rng)?);
    let val_set = answers(labelled(val_csv, None, &mut rng)?);
    tracing::info!(train = train_set.len(), val = val_set.len(), "samples read");
    let encode =
        |(_, img, answer): &(CellClass, RgbImage, String)| -> Result<Encoded> { Ok(p.encode(img, Some(answer))?) };
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
            let e = &encode(&train_set[i])?;
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
        for sample in &val_set {
            let (class, e) = (sample.0, &encode(sample)?);
            vloss += f64::from(
                valid
                    .answer_loss(p.inputs(e, None, &device), e.answer_from)
                    .into_scalar::<f32>(),
            );
            let probs = probabilities(&score(&valid, p.inputs(e, Some(e.answer_from), &device), &candidates));
            right += usize::from(wbc_models::mllama::generate::argmax(&probs) == class.index());
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
