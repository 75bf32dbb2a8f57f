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
use burn::store::{ModuleSnapshot, SafetensorsStore};
use burn::tensor::Device;
use image::RgbImage;
use rand::seq::SliceRandom;
use std::path::{Path, PathBuf};
use wbc_cells::image::DecodeLimits;
use wbc_models::describe::describe;
use wbc_models::mllama::cell::Prompting;
use wbc_models::mllama::{Checkpoint, LoraConfig, Mllama};
use wbc_protocol::classes::CellClass;

pub mod export;
pub mod train;

pub use export::{EXPORT_TOLERANCE, ExportTo, MllamaExportReport, export};
pub use train::{MllamaReport, MllamaSettings, train};

/// The answer the model learns for a cell: the class name, then its description.
pub fn answer_text(class: CellClass, sample: &Sample) -> String {
    format!("{}. {}", class.name(), describe(class, &sample.attrs))
}

/// The adapters of the best epoch, in `out`.
pub fn adapters_path(out: &Path) -> PathBuf {
    out.join("adapters.safetensors")
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
    let cfg = wbc_models::mllama::MllamaConfig::load(dir)?;
    wbc_models::mllama::write_random_weights(&cfg, &dir.join("model.safetensors"), seed)?;
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

pub(crate) fn labelled(
    csv: &Path,
    max_per_class: Option<usize>,
    rng: &mut impl rand::Rng,
) -> Result<Vec<(Sample, RgbImage)>> {
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
