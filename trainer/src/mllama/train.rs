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
    /// Peak learning rate (AdamW), reached after the warm-up and brought down to zero along a
    /// cosine by the last optimiser step.
    pub lr: f64,
    /// Optimiser steps of linear warm-up (`None`: 5 % of all steps, at least one).
    #[serde(default)]
    pub warmup_steps: Option<usize>,
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

/// The learning rate of optimiser step `step` (from 0) of `total`: a linear warm-up over
/// `warmup` steps to `peak`, then half a cosine down to zero at the last step.
pub fn scheduled_lr(peak: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let rest = total.saturating_sub(warmup).max(1) as f64;
    let t = ((step - warmup) as f64 / rest).min(1.0);
    peak * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
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
    let ck = Checkpoint::open(&s.base)?;
    // With --base-block the base is quantized as it streams in: no f32 copy of it is ever held.
    let base = if s.base_block > 0 {
        Mllama::load_quantized(&p.cfg, &ck, &ad, s.base_block)
    } else {
        Mllama::load(&p.cfg, &ck, &ad)
    }
    .with_context(|| format!("loading {}", s.base.display()))?;
    drop(ck);
    if s.base_block > 0 {
        tracing::info!(block = s.base_block, "frozen base streamed into 4 bits");
    }
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
    let total_steps = s.epochs * train_set.len().div_ceil(s.accumulate);
    let warmup = s.warmup_steps.unwrap_or((total_steps / 20).max(1));
    let mut step = 0usize;
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
                model = optim.step(scheduled_lr(s.lr, step, warmup, total_steps), model, acc.grads());
                step += 1;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_learning_rate_warms_up_then_falls_along_a_cosine() {
        let lr = |step| scheduled_lr(1e-3, step, 4, 20);
        assert_eq!(lr(0), 0.25e-3);
        assert_eq!(lr(3), 1e-3);
        assert!(
            (lr(12) - 0.5e-3).abs() < 1e-12,
            "half way down at the middle of the decay"
        );
        assert!(lr(19) < 0.02e-3 && lr(19) > 0.0);
        assert!(
            (4..19).all(|s| lr(s + 1) < lr(s)),
            "falls at every step after the warm-up"
        );
        assert!(
            scheduled_lr(1e-3, 5, 10, 5) > 0.0,
            "more warm-up than steps still trains"
        );
    }
}
