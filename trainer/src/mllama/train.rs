//! Fine-tuning: conversations in, the best epoch's adapters out (see the family's notes in
//! [`super`]).

use crate::dataset::Sample;
use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams};
use burn::store::{BurnpackStore, ModuleSnapshot, SafetensorsStore};
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
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MllamaReport {
    /// Mean training answer loss per epoch.
    pub train_loss: Vec<f64>,
    /// Validation answer loss per epoch.
    pub val_loss: Vec<f64>,
    /// Validation class accuracy per epoch.
    pub val_accuracy: Vec<f64>,
    /// Epoch whose adapters were kept (lowest validation loss).
    pub best_epoch: usize,
    /// Whether this invocation stopped before the last epoch ([`Control::stop_after`]); the
    /// run goes on with [`Control::resume`].
    #[serde(default)]
    pub stopped: bool,
}

/// How one invocation of [`train_with`] runs: where it starts, how often it leaves a
/// checkpoint, when it stops. Not part of the run's settings: a run may be resumed with
/// other ones. A resumed run is the same run but for LoRA dropout, whose masks come from the
/// backend's generator and are drawn anew.
#[derive(Debug, Clone, Default)]
pub struct Control {
    /// Go on from the checkpoint in `out/resume` (the adapters, the optimiser's moments, the
    /// position in the epoch, the schedule's step, the curves so far) instead of starting.
    pub resume: bool,
    /// Also leave a checkpoint every this many optimiser steps (0: at each epoch's end only).
    pub checkpoint_every: usize,
    /// Stop, with a checkpoint, after this many optimiser steps of this invocation.
    pub stop_after: Option<usize>,
}

/// Where a run keeps its checkpoint.
pub fn resume_dir(out: &Path) -> PathBuf {
    out.join("resume")
}

/// What a checkpoint holds besides the tensors: enough to go on exactly where the run was.
#[derive(Debug, Serialize, Deserialize)]
struct ResumeState {
    /// The run's settings (a resumed run must have the same, but for the device).
    settings: serde_json::Value,
    /// Epoch in progress (from 1); one past the last after the last epoch's end.
    epoch: usize,
    /// Position in the epoch's order of the next sample.
    next: usize,
    /// Optimiser steps taken.
    step: usize,
    /// Sum of the epoch's sample losses so far.
    epoch_loss: f64,
    /// Epochs finished.
    report: MllamaReport,
    /// The data it trains on: the lists and how many labelled samples each gave.
    data: [(String, usize); 2],
    /// The adapters' and the optimiser's files, in the checkpoint's folder.
    lora: String,
    optim: String,
}

fn comparable(s: &MllamaSettings) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(s)?;
    if let Some(o) = v.as_object_mut() {
        o.remove("device");
    }
    Ok(v)
}

/// Writes a checkpoint: the adapters (with their parameter ids, which key the optimiser's
/// state) and the optimiser in burn's own format, then the state, renamed into place last, so
/// that a run killed while writing keeps its previous checkpoint.
fn save_checkpoint(
    out: &Path,
    model: &Mllama,
    optim: &burn::optim::ModuleOptimizer,
    mut state: ResumeState,
) -> Result<()> {
    let dir = resume_dir(out);
    std::fs::create_dir_all(&dir)?;
    state.lora = format!("lora-{}.bpk", state.step);
    state.optim = format!("optim-{}.bpk", state.step);
    let lora = dir.join(&state.lora);
    let mut store = BurnpackStore::from_file(&lora)
        .with_regex(r"\.lora\.")
        .overwrite(true)
        .auto_extension(false);
    model
        .save_into(&mut store)
        .map_err(|e| anyhow::anyhow!("saving {}: {e:?}", lora.display()))?;
    let optim_path = dir.join(&state.optim);
    optim
        .to_record()
        .save(&optim_path)
        .map_err(|e| anyhow::anyhow!("saving {}: {e:?}", optim_path.display()))?;
    // On disk before the state names them: a power cut leaves the previous checkpoint whole.
    for f in [&lora, &optim_path] {
        std::fs::File::open(f)?.sync_all()?;
    }
    let part = dir.join("state.json.part");
    {
        let mut f = std::fs::File::create(&part)?;
        f.write_all(&serde_json::to_vec_pretty(&state)?)?;
        f.sync_all()?;
    }
    std::fs::rename(&part, dir.join("state.json"))?;
    std::fs::File::open(&dir)?.sync_all()?;
    // The previous checkpoint's tensors.
    for e in std::fs::read_dir(&dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".bpk") && name != state.lora && name != state.optim {
            let _ = std::fs::remove_file(e.path());
        }
    }
    tracing::info!(epoch = state.epoch, step = state.step, "checkpoint written");
    Ok(())
}

fn load_checkpoint(out: &Path, settings: &MllamaSettings) -> Result<ResumeState> {
    let path = resume_dir(out).join("state.json");
    if !path.exists() {
        bail!("no checkpoint to resume from: {} does not exist", path.display());
    }
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let state: ResumeState =
        serde_json::from_slice(&bytes).with_context(|| format!("{}: not a checkpoint's state", path.display()))?;
    if state.settings != comparable(settings)? {
        bail!(
            "{}: the run was started with other settings ({}); resume it with those, or start a new run in another folder",
            path.display(),
            state.settings
        );
    }
    if state.epoch == 0 || state.report.train_loss.len() + 1 != state.epoch {
        bail!(
            "{}: a damaged checkpoint (epoch {} after {} finished)",
            path.display(),
            state.epoch,
            state.report.train_loss.len()
        );
    }
    Ok(state)
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
/// `mllama-run.json` into `out`, and a checkpoint at each epoch's end (`resume/`).
pub fn train(s: &MllamaSettings, train_csv: &Path, val_csv: &Path, out: &Path) -> Result<MllamaReport> {
    train_with(s, train_csv, val_csv, out, &Control::default())
}

/// [`train`], started, checkpointed and stopped as `control` says.
pub fn train_with(
    s: &MllamaSettings,
    train_csv: &Path,
    val_csv: &Path,
    out: &Path,
    control: &Control,
) -> Result<MllamaReport> {
    if s.accumulate == 0 || s.epochs == 0 || s.lora.rank == 0 {
        bail!("--accumulate, --epochs and --rank must be at least 1");
    }
    if control.stop_after == Some(0) {
        bail!("--stop-after must be at least 1");
    }
    std::fs::create_dir_all(out)?;
    let resumed = if control.resume {
        Some(load_checkpoint(out, s)?)
    } else {
        let state = resume_dir(out).join("state.json");
        if state.exists() {
            bail!(
                "{} holds the checkpoint of a run: --resume goes on from it; to start again, remove {} (or train into another folder)",
                out.display(),
                resume_dir(out).display()
            );
        }
        None
    };
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
    let named = |p: &Path| {
        std::fs::canonicalize(p)
            .unwrap_or_else(|_| p.to_path_buf())
            .display()
            .to_string()
    };
    let data = [(named(train_csv), train_set.len()), (named(val_csv), val_set.len())];
    if let Some(r) = &resumed {
        if r.data != data {
            bail!(
                "the run in {} trained on {:?}, not on {:?}: a run resumes on its own data",
                out.display(),
                r.data,
                data
            );
        }
        if r.next > train_set.len() {
            bail!(
                "{}: a damaged checkpoint (sample {} of {})",
                resume_dir(out).display(),
                r.next,
                train_set.len()
            );
        }
    }
    let encode =
        |(_, img, answer): &(CellClass, RgbImage, String)| -> Result<Encoded> { Ok(p.encode(img, Some(answer))?) };
    let candidates = p.class_candidates()?;
    let mut optim = AdamWConfig::new().init();
    let mut report = MllamaReport {
        train_loss: Vec::new(),
        val_loss: Vec::new(),
        val_accuracy: Vec::new(),
        best_epoch: 0,
        stopped: false,
    };
    let (mut first_epoch, mut next, mut step, mut epoch_loss) = (1, 0, 0usize, 0f64);
    if let Some(r) = resumed {
        let dir = resume_dir(out);
        // burn's own format keeps each adapter's parameter id, which keys its optimiser state.
        let mut store = BurnpackStore::from_file(dir.join(&r.lora))
            .with_regex(r"\.lora\.")
            .allow_partial(true)
            .auto_extension(false);
        let applied = model
            .load_from(&mut store)
            .map_err(|e| anyhow::anyhow!("loading {}: {e:?}", dir.join(&r.lora).display()))?;
        // Every adapter of the model, and nothing else, comes from the checkpoint.
        let lora_missing = applied
            .missing
            .iter()
            .filter(|(name, _)| name.contains(".lora."))
            .count();
        if applied.applied.is_empty() || lora_missing > 0 || !applied.unused.is_empty() {
            bail!(
                "{}: the checkpoint's adapters do not fit this model ({} loaded, {lora_missing} missing, {} left over)",
                dir.join(&r.lora).display(),
                applied.applied.len(),
                applied.unused.len()
            );
        }
        let record = burn::optim::OptimizerRecord::load(dir.join(&r.optim))
            .map_err(|e| anyhow::anyhow!("loading {}: {e:?}", dir.join(&r.optim).display()))?;
        optim = optim.load_record(record);
        (first_epoch, next, step, epoch_loss, report) = (r.epoch, r.next, r.step, r.epoch_loss, r.report);
        report.stopped = false;
        tracing::info!(epoch = first_epoch, sample = next, step, "resumed");
    }
    let mut curves = std::fs::File::create(out.join("curves.csv"))?;
    writeln!(curves, "epoch,train_loss,val_loss,val_accuracy")?;
    for (e, ((tl, vl), va)) in report
        .train_loss
        .iter()
        .zip(&report.val_loss)
        .zip(&report.val_accuracy)
        .enumerate()
    {
        writeln!(curves, "{},{tl:.5},{vl:.5},{va:.4}", e + 1)?;
    }
    let mut order: Vec<usize> = (0..train_set.len()).collect();
    // The orders of the epochs already done, drawn again from the seed.
    for _ in 1..first_epoch {
        order.shuffle(&mut rng);
    }
    let total_steps = s.epochs * train_set.len().div_ceil(s.accumulate);
    let warmup = s.warmup_steps.unwrap_or((total_steps / 20).max(1));
    let mut steps_now = 0usize;
    let state = |epoch, next, step, epoch_loss, report: &MllamaReport| -> Result<ResumeState> {
        Ok(ResumeState {
            settings: comparable(s)?,
            epoch,
            next,
            step,
            epoch_loss,
            report: report.clone(),
            data: data.clone(),
            lora: String::new(),
            optim: String::new(),
        })
    };
    for epoch in first_epoch..=s.epochs {
        order.shuffle(&mut rng);
        let mut acc = GradientsAccumulator::new();
        let (mut total, mut pending) = (std::mem::take(&mut epoch_loss), 0usize);
        for (k, &i) in order.iter().enumerate().skip(std::mem::take(&mut next)) {
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
                steps_now += 1;
                pending = 0;
                if k + 1 < order.len() {
                    let stop = control.stop_after == Some(steps_now);
                    if stop || (control.checkpoint_every > 0 && step.is_multiple_of(control.checkpoint_every)) {
                        save_checkpoint(out, &model, &optim, state(epoch, k + 1, step, total, &report)?)?;
                    }
                    if stop {
                        report.stopped = true;
                        return Ok(report);
                    }
                }
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
        save_checkpoint(out, &model, &optim, state(epoch + 1, 0, step, 0.0, &report)?)?;
        if control.stop_after == Some(steps_now) && epoch < s.epochs {
            report.stopped = true;
            return Ok(report);
        }
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
