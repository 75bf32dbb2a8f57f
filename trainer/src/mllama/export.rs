//! Export: the adapters merged into the base in f32, the projections in 4 bits, one self-test
//! image per class, signed and checked.

use anyhow::{Context, Result};
use burn::tensor::Device;
use rand::SeedableRng;
use serde::Serialize;
use std::path::Path;
use wbc_models::mllama::Checkpoint;
use wbc_protocol::classes::CellClass;

use super::*;

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

/// What an export writes: a bundle signed with `key` as `model_version`, its projections in
/// 4 bits in groups of `group`, at `out`.
#[derive(Clone, Copy)]
pub struct ExportTo<'a> {
    /// Signing key.
    pub key: &'a ed25519_dalek::SigningKey,
    /// Model version of the bundle.
    pub model_version: u64,
    /// Values per 4-bit scale of the projections not stored in the appliance's grid.
    pub group: usize,
    /// Bundle file to write.
    pub out: &'a Path,
}

/// How an exported tensor is stored: projections (and the LM head and projector) in 4 bits
/// (in the appliance's own grid where their outputs divide into its blocks), embeddings in
/// f16, norms, gates and biases in f32.
fn storage_of(name: &str, shape: &[usize]) -> wbc_models::compact::weights::Storage {
    use wbc_models::compact::weights::Storage;
    let projection = shape.len() == 2
        && name.ends_with(".weight")
        && (name.ends_with("_proj.weight")
            || name.ends_with("fc1.weight")
            || name.ends_with("fc2.weight")
            || name.ends_with("lm_head.weight")
            || name == "multi_modal_projector.weight");
    let resident = wbc_models::mllama::cell::RESIDENT_BLOCK as usize;
    if projection && shape[0].is_multiple_of(resident) {
        // In the grid the appliance holds: built from its values as they are, rounded once.
        Storage::Q4Out(resident)
    } else if projection {
        Storage::Q4
    } else if name.ends_with("embed_tokens.weight") || name.contains("embedding") {
        Storage::F16
    } else {
        Storage::F32
    }
}

/// Merges a run's adapters into the base in f32, quantizes the projections to 4 bits (groups of
/// `group`, f16 scales; embeddings in f16, norms, gates and biases in f32), adds one self-test
/// image per class from `val` with the exported model's probabilities, signs the bundle and
/// checks that it verifies and passes its self-test.
pub fn export(base: &Path, run: &Path, val: &Path, to: &ExportTo, device: &Device) -> Result<MllamaExportReport> {
    use wbc_models::classify::{SELFTEST_PART, SelfTest, SelfTestCase};
    use wbc_models::compact::weights::{NamedTensor, SafetensorsWriter};
    use wbc_models::mllama::cell::{classify, parts};
    use wbc_protocol::bundle::{Bundle, BundleBuilder, Family, Manifest};
    let ExportTo {
        key,
        model_version,
        group,
        out,
    } = *to;
    let device = device.clone();
    let (lora, base_block) = run_lora(run)?;
    let (p, mut tuned) = load_tuned(base, run, &lora, base_block, &device)?;
    // Val cells: up to 32 compared, the first readable one of each class a self-test case. The
    // tuned model answers first and is dropped before the exported one is built: the two
    // models are never held at once.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let cells = labelled(val, None, &mut rng)?;
    let cells = &cells[..cells.len().min(32)];
    let as_trained = cells
        .iter()
        .map(|(_, img)| classify(&tuned, &p, img, &device))
        .collect::<Result<Vec<_>, _>>()?;
    // Tensor by tensor: read from the checkpoint, the adapter's delta added (formed for this
    // projection alone), encoded; the f32 model is never whole.
    let deltas = tuned.lora_deltas();
    drop(tuned);
    let ck = Checkpoint::open(base)?;
    let mut writer = SafetensorsWriter::new(group);
    for name in ck.names() {
        let shape = ck.shape(name)?;
        let mut values = ck.tensor(name, &shape)?;
        if let Some(delta) = name.strip_suffix(".weight").and_then(&deltas) {
            values.iter_mut().zip(&delta).for_each(|(v, d)| *v += d);
        }
        let kind = storage_of(name, &shape);
        writer.push(name, &NamedTensor { shape, values }, kind);
    }
    drop(deltas);
    let weights = writer.finish()?;
    let exported = wbc_models::mllama::cell::model_from_weights(&p.cfg, &weights, &device)?;
    let mut cases = Vec::new();
    let mut parts_out: Vec<(String, Vec<u8>)> = Vec::new();
    let mut worst = 0f32;
    let mut seen = [false; 6];
    for ((sample, img), a) in cells.iter().zip(&as_trained) {
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
    drop(exported);
    let compared = cells.len();
    let cfg_json: serde_json::Value = serde_json::from_slice(&std::fs::read(base.join("config.json"))?)?;
    let manifest = Manifest {
        format_version: 0,
        family: Family::Mllama,
        model_config: cfg_json,
        classes: CellClass::ALL.iter().map(|c| c.name().to_string()).collect(),
        preprocess: wbc_cells::image::Preprocess {
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
        clinic: None,
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
    // Written as it is assembled; what we ship verifies and passes its own self-test, read back
    // as the appliance reads it, and takes its name only then.
    let checking = out.with_extension("bundle.part");
    let size = b
        .finish_to_file(key, &checking)
        .with_context(|| format!("writing {}", checking.display()))? as usize;
    let checked = (|| -> Result<usize> {
        let bundle = Bundle::open(&checking, &[key.verifying_key()])?;
        let (bp, bm) = wbc_models::mllama::cell::from_bundle(&bundle, &device)?;
        Ok(wbc_models::mllama::cell::self_test(&bm, &bp, &bundle, &device)?)
    })();
    let checked = match checked {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&checking);
            return Err(e);
        }
    };
    std::fs::rename(&checking, out).with_context(|| format!("writing {}", out.display()))?;
    tracing::info!(
        cases = checked,
        max_probability_difference = worst,
        "exported mllama bundle"
    );
    Ok(MllamaExportReport {
        max_probability_difference: worst,
        compared,
        selftest_cases: n_cases,
        bytes: size,
    })
}
