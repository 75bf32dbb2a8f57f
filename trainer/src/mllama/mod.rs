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
pub use train::{Control, MllamaReport, MllamaSettings, resume_dir, train, train_with};

/// The answer the model learns for a cell: the class name, then a description. The reference
/// study trained on five phrasings per class; here each cell gets one of them or, for a cell
/// with WBCAtt attributes, as often the description of its own attributes, chosen by a stable
/// hash of its file name (the same cell always gets the same answer, and a class does not
/// teach one fixed sentence, as it did for every cell without attributes).
pub fn answer_text(class: CellClass, sample: &Sample) -> String {
    use wbc_models::describe::class_phrasings;
    let name = sample.path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    // FNV-1a: stable across runs and platforms, unlike the standard library's hasher.
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let description = if !sample.attrs.is_empty() && (h / 5).is_multiple_of(2) {
        describe(class, &sample.attrs)
    } else {
        class_phrasings(class)[(h % 5) as usize].to_string()
    };
    format!("{}. {description}", class.name())
}

/// The adapters of the best epoch, in `out`.
pub fn adapters_path(out: &Path) -> PathBuf {
    out.join("adapters.safetensors")
}

/// Writes a small random-weight base checkpoint into `dir` for tests and demonstrations: the
/// architecture of the committed 28-px-tile fixture (`fixtures/mllama/gqa-llama3`) with Llama 3's
/// real vocabulary and the fixture tokenizer that carries its real special tokens, laid out as
/// the published checkpoints are (bf16 shards of about 4 MB with an index), so that what reads
/// it goes through the streamed paths.
pub fn write_tiny_base(fixtures: &Path, dir: &Path, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures.join("mllama/gqa-llama3/config.json"))?)?;
    config["text_config"]["vocab_size"] = 128_256.into();
    config["image_token_index"] = 128_256.into();
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&config)?)?;
    std::fs::copy(fixtures.join("mllama/chat/tokenizer.json"), dir.join("tokenizer.json"))?;
    let cfg = wbc_models::mllama::MllamaConfig::load(dir)?;
    wbc_models::mllama::write_synthetic_checkpoint(&cfg, dir, seed, 4 << 20)?;
    Ok(())
}

/// The base with the adapters of a run beside it, as the run trained it: with a base streamed
/// into 4 bits (`base_block`, the run's `--base-block`) when it was trained that way.
pub fn load_tuned(
    base: &Path,
    run: &Path,
    lora: &LoraConfig,
    base_block: u8,
    device: &Device,
) -> Result<(Prompting, Mllama)> {
    let p = Prompting::load(base)?;
    let ck = Checkpoint::open(base)?;
    let model = if base_block > 0 {
        Mllama::load_quantized(&p.cfg, &ck, device, base_block)?
    } else {
        Mllama::load(&p.cfg, &ck, device)?
    };
    drop(ck);
    let model = model.with_lora(lora, device);
    let mut store = SafetensorsStore::from_file(adapters_path(run))
        .with_regex(r"\.lora\.")
        .allow_partial(true);
    let mut model = model;
    model
        .load_from(&mut store)
        .map_err(|e| anyhow::anyhow!("loading {}: {e:?}", adapters_path(run).display()))?;
    Ok((p, model))
}

/// The LoRA settings a run trained with and its base's 4-bit block (0: f32), from its
/// `mllama-run.json`.
pub fn run_lora(run: &Path) -> Result<(LoraConfig, u8)> {
    let p = run.join("mllama-run.json");
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?)?;
    let lora = serde_json::from_value(v["settings"]["lora"].clone())
        .with_context(|| format!("{}: settings.lora", p.display()))?;
    let block = v["settings"]["base_block"].as_u64().unwrap_or(0);
    let block = u8::try_from(block).with_context(|| format!("{}: settings.base_block {block}", p.display()))?;
    Ok((lora, block))
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

#[cfg(test)]
mod tests {
    use super::*;
    use wbc_protocol::attributes::AttributeSet;

    fn sample(path: &str, attrs: AttributeSet) -> Sample {
        Sample {
            path: PathBuf::from(path),
            label: Some(CellClass::Monocyte),
            attrs,
            source: "unknown".into(),
            description: None,
            microns_per_pixel: None,
        }
    }

    #[test]
    fn answers_start_with_the_class_vary_between_cells_and_stay_fixed_for_one() {
        let answers: Vec<String> = (0..40)
            .map(|i| {
                answer_text(
                    CellClass::Monocyte,
                    &sample(&format!("MO_{i}.jpg"), AttributeSet::default()),
                )
            })
            .collect();
        assert!(answers.iter().all(|a| a.starts_with("Monocyte. ")));
        let distinct: std::collections::BTreeSet<&String> = answers.iter().collect();
        assert_eq!(distinct.len(), 5, "all five phrasings are used: {distinct:?}");
        // The same file name in another folder: the same answer.
        assert_eq!(
            answer_text(CellClass::Monocyte, &sample("other/MO_3.jpg", AttributeSet::default())),
            answers[3]
        );
        // With attributes, the cell's own description is among the answers too.
        use wbc_protocol::attributes::{ATTRIBUTES, NUM_ATTRIBUTES};
        let mut values = [""; NUM_ATTRIBUTES];
        let at = ATTRIBUTES.iter().position(|a| a.key == "nucleus_shape").unwrap();
        values[at] = "unsegmented-indented";
        let attrs = AttributeSet::from_strs(&values).unwrap();
        let with: Vec<String> = (0..40)
            .map(|i| answer_text(CellClass::Monocyte, &sample(&format!("MO_{i}.jpg"), attrs)))
            .collect();
        let own = format!("Monocyte. {}", describe(CellClass::Monocyte, &attrs));
        let n = with.iter().filter(|a| **a == own).count();
        assert!((10..=30).contains(&n), "{n} of 40 use the attributes");
    }
}
