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
use burn::tensor::{Device, Int, Tensor, TensorData};
use image::RgbImage;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use wbc_shared::classes::CellClass;
use wbc_shared::describe::describe;
use wbc_shared::image::DecodeLimits;
use wbc_shared::mllama::chat::{ChatTokenizer, Message, cross_attention_mask};
use wbc_shared::mllama::{Checkpoint, ImageProcessor, Inputs, LoraConfig, Mllama, MllamaConfig, probabilities, score};

/// The question of every conversation.
pub const QUESTION: &str = "What type of white blood cell is this? Describe it.";

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
}

/// The model's view of one cell: token ids, where the answer starts, and the processed image.
pub struct Encoded {
    ids: Vec<u32>,
    answer_from: usize,
    pixels: Vec<f32>,
    ratio_id: usize,
    ratio_mask: Vec<f32>,
    tiles: usize,
}

/// Tokenizer, image processor and configuration together.
pub struct Prompting {
    /// The model's configuration.
    pub cfg: MllamaConfig,
    /// Tokenizer with the chat format.
    pub tok: ChatTokenizer,
    /// Image processor.
    pub proc: ImageProcessor,
}

impl Prompting {
    /// From a checkpoint directory: `config.json`, `tokenizer.json`, and
    /// `preprocessor_config.json` (image mean and deviation) when present.
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg = MllamaConfig::load(dir)?;
        let tok = ChatTokenizer::from_file(&dir.join("tokenizer.json"))?;
        if tok.image_token != cfg.image_token_index {
            bail!(
                "tokenizer.json's <|image|> is {}, config.json's image_token_index {}",
                tok.image_token,
                cfg.image_token_index
            );
        }
        let mut proc = ImageProcessor {
            tile: cfg.vision.image_size,
            max_tiles: cfg.vision.max_num_tiles,
            ..ImageProcessor::llama_3_2_vision()
        };
        if let Ok(text) = std::fs::read_to_string(dir.join("preprocessor_config.json")) {
            let v: serde_json::Value = serde_json::from_str(&text).context("preprocessor_config.json")?;
            let three = |k: &str| -> Option<[f32; 3]> {
                let a = v.get(k)?.as_array()?;
                Some([
                    a.first()?.as_f64()? as f32,
                    a.get(1)?.as_f64()? as f32,
                    a.get(2)?.as_f64()? as f32,
                ])
            };
            if let (Some(m), Some(s)) = (three("image_mean"), three("image_std")) {
                proc.mean = m;
                proc.std = s;
            }
        }
        Ok(Prompting { cfg, tok, proc })
    }

    /// A cell's conversation; with `answer`, the answer follows the prompt.
    pub fn encode(&self, img: &RgbImage, answer: Option<&str>) -> Result<Encoded> {
        let user = Message::user_with_image(QUESTION);
        let prompt = self.tok.encode_chat(std::slice::from_ref(&user), true)?;
        let ids = match answer {
            Some(a) => self.tok.encode_chat(&[user, Message::assistant(a)], false)?,
            None => prompt.clone(),
        };
        if ids[..prompt.len()] != prompt[..] {
            bail!("the answer changed how the prompt tokenizes");
        }
        let x = self.proc.process(img);
        Ok(Encoded {
            answer_from: prompt.len(),
            tiles: x.layout.0 * x.layout.1,
            ids,
            pixels: x.pixel_values,
            ratio_id: x.aspect_ratio_id,
            ratio_mask: x.aspect_ratio_mask,
        })
    }

    /// The model inputs of an encoded cell, the first `len` tokens (all when `None`).
    pub fn inputs(&self, e: &Encoded, len: Option<usize>, device: &Device) -> Inputs {
        let ids = &e.ids[..len.unwrap_or(e.ids.len())];
        let s = ids.len();
        let (t, n) = (self.proc.tile, self.proc.max_tiles);
        let mask = cross_attention_mask(ids, self.tok.image_token, &[e.tiles], n);
        Inputs {
            input_ids: Tensor::<2, Int>::from_data(
                TensorData::new(ids.iter().map(|&i| i64::from(i)).collect::<Vec<_>>(), [1, s]),
                device,
            ),
            pixel_values: Some(Tensor::from_data(
                TensorData::new(e.pixels.clone(), [1, 1, n, 3, t, t]),
                device,
            )),
            aspect_ratio_ids: Some(Tensor::from_data(
                TensorData::new(vec![e.ratio_id as i64], [1, 1]),
                device,
            )),
            aspect_ratio_mask: Some(Tensor::from_data(
                TensorData::new(e.ratio_mask.clone(), [1, 1, n]),
                device,
            )),
            cross_attention_mask: Some(Tensor::from_data(TensorData::new(mask, [1, s, 1, n]), device)),
        }
    }

    /// The class names as the answer's first tokens.
    pub fn class_candidates(&self) -> Result<Vec<Vec<u32>>> {
        CellClass::ALL.iter().map(|c| Ok(self.tok.encode(c.name())?)).collect()
    }
}

/// Class probabilities of a cell: the likelihood of each class name as the answer's start.
pub fn classify(model: &Mllama, p: &Prompting, img: &RgbImage, device: &Device) -> Result<Vec<f32>> {
    let e = p.encode(img, None)?;
    let scores = score(model, p.inputs(&e, None, device), &p.class_candidates()?);
    Ok(probabilities(&scores))
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
