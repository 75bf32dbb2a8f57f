//! QLoRA fine-tuning of the compact model.
//!
//! The backbone is frozen in 4 bits, so everything before block `tune_from` is a fixed function
//! of the (augmented) image: it is computed once per augmented view and cached, and each epoch
//! trains the LoRA adapters of blocks `tune_from..` and the heads on a random view of every
//! image. On two CPU cores this turns hours of full forward/backward passes into minutes.

use crate::augment::Augment;
use crate::compact::adversary::{SourceCritic, SourcePlan, schedule};
use crate::dataset::{Rejected, Sample, class_counts, load_images, read_split, source_counts};
use crate::plot;
use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::store::{ModuleSnapshot, SafetensorsStore};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use image::RgbImage;
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use wbc_cells::Prepare;
use wbc_cells::cellnorm::CellNorm;
use wbc_cells::image::{DecodeLimits, Preprocess};
use wbc_models::compact::mobilenet::{Backbone, fold_torchvision};
use wbc_models::compact::weights::Weights;
use wbc_models::compact::{CompactConfig, Trainable, attribute_logits_width, decode_attributes};
use wbc_models::metrics::ConfusionMatrix;
use wbc_protocol::attributes::{ATTRIBUTES, NUM_ATTRIBUTES};
use wbc_protocol::classes::{CellClass, NUM_CLASSES};

/// Training settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSettings {
    /// Model configuration.
    pub model: CompactConfig,
    /// Epochs.
    pub epochs: usize,
    /// Batch size.
    pub batch: usize,
    /// Peak learning rate (AdamW).
    pub lr: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Augmented views cached per training image.
    pub views: usize,
    /// Weight of the attribute losses relative to the class loss.
    pub attr_weight: f64,
    /// Random seed.
    pub seed: u64,
    /// Use at most this many training images per class (0 = all); for quick runs.
    pub max_per_class: usize,
    /// Cell normalisation applied to every image (training, validation and, through the
    /// bundle, the appliance); `None` for the plain centre crop of model version 1.
    #[serde(default)]
    pub cell: Option<CellNorm>,
    /// Strong stain and optics augmentation ([`Augment::strong`]) instead of the mild default.
    #[serde(default)]
    pub strong_augment: bool,
    /// Weight of the source critic's confusion loss ([`crate::compact::adversary`]) once fully ramped
    /// up; 0 trains without a critic.
    #[serde(default)]
    pub source_adversary: f64,
    /// MixStyle on the activations entering the first trained block ([`crate::compact::mixstyle`]);
    /// `None` trains without.
    #[serde(default)]
    pub mixstyle: Option<crate::compact::mixstyle::MixStyle>,
    /// Amplitude mixing of the training views across sources ([`crate::compact::amplitude`]); `None`
    /// trains without.
    #[serde(default)]
    pub amplitude_mix: Option<crate::compact::amplitude::AmplitudeMix>,
    /// Share of the augmented training views given a random stain-density curve
    /// ([`crate::augment::density_curve`], exponent [`STAIN_DENSITY_MIN_GAMMA`]–1.2); 0 = none.
    #[serde(default)]
    pub stain_density: f64,
}

/// Smallest exponent of the stain-density augmentation: at 0.3, with a defocus blur, val's
/// lymphocytes and monocytes look to model version 4 as another site's do (Blast).
pub const STAIN_DENSITY_MIN_GAMMA: f32 = 0.3;

impl TrainSettings {
    /// The preprocessing these settings train with (and a bundle made from them records).
    pub fn preprocess(&self) -> Preprocess {
        match &self.cell {
            Some(c) => Preprocess::with_cell(c.clone()),
            None => Preprocess::imagenet(224),
        }
    }
}

/// Cell normalisation at the physical scale, `view_microns` of smear in view (the relative
/// scale when 0); images of unknown pixel size are taken to be like `pbc`'s. Not the default:
/// measured at 24 µm, it made another hospital's large, well-spread granulocytes look like
/// blasts (`BENCHMARKS.md`, E6).
pub fn physical_cell_norm(view_microns: f32) -> CellNorm {
    CellNorm {
        view_microns,
        default_microns_per_pixel: crate::dataset::source_microns_per_pixel("pbc").unwrap_or(0.0),
        ..CellNorm::default()
    }
}

/// Uncertainty of a pixel size: augmented views scale it by up to this factor either way, so
/// that the model does not rely on a size more exact than a camera's calibration.
const SCALE_JITTER: f32 = 1.1;

/// Prepares images (with their pixel sizes, µm) for the model on all cores, augmenting each
/// first when `aug` is given. Deterministic for a given `seed`.
pub fn prepare_all(
    pre: &Preprocess,
    images: &[RgbImage],
    scales: &[Option<f32>],
    aug: Option<&Augment>,
    seed: u64,
) -> Vec<RgbImage> {
    use rayon::prelude::*;
    assert_eq!(images.len(), scales.len(), "one pixel size per image");
    images
        .par_iter()
        .zip(scales)
        .enumerate()
        .map(|(i, (img, um))| match aug {
            Some(a) => {
                // One generator per image: the same views whatever the number of threads.
                let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                let view = a.apply(img, &mut rng);
                // Only a physical scale uses the pixel size; the relative scale draws nothing
                // more, so its augmented views stay what they were.
                let um = match &pre.cell {
                    Some(c) if c.physical() => {
                        um.map(|u| u * rand::Rng::gen_range(&mut rng, 1.0 / SCALE_JITTER..=SCALE_JITTER))
                    }
                    _ => *um,
                };
                pre.prepare(&view, None, um).0
            }
            None => pre.prepare(img, None, *um).0,
        })
        .collect()
}

impl Default for TrainSettings {
    fn default() -> Self {
        TrainSettings {
            model: CompactConfig::default(),
            epochs: 6,
            batch: 64,
            lr: 2e-3,
            weight_decay: 0.01,
            views: 2,
            attr_weight: 0.3,
            seed: 42,
            max_per_class: 0,
            cell: Some(CellNorm::default()),
            strong_augment: true,
            source_adversary: 0.0,
            mixstyle: None,
            amplitude_mix: None,
            stain_density: 0.0,
        }
    }
}

/// What a run directory records in `run.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    /// Settings used.
    pub settings: TrainSettings,
    /// sha256 of the pretrained backbone checkpoint.
    pub backbone_sha256: String,
    /// Training samples used per class.
    pub train_counts: [usize; NUM_CLASSES],
    /// Validation samples per class.
    pub val_counts: [usize; NUM_CLASSES],
    /// Samples per source in training.
    pub train_sources: std::collections::BTreeMap<String, usize>,
    /// Images rejected while loading.
    pub rejected: usize,
    /// Epoch of the kept checkpoint (1-based).
    pub best_epoch: usize,
    /// Val macro F1 of the kept checkpoint.
    pub best_val_macro_f1: f64,
    /// Wall-clock seconds of the whole run.
    pub seconds: f64,
    /// Machine description.
    pub hardware: String,
}

/// Paths inside a run directory.
pub struct RunDir(pub PathBuf);

impl RunDir {
    /// `run.json`.
    pub fn record(&self) -> PathBuf {
        self.0.join("run.json")
    }
    /// Best checkpoint of adapters and heads.
    pub fn checkpoint(&self) -> PathBuf {
        self.0.join("best.safetensors")
    }
    /// Per-epoch curves.
    pub fn curves(&self) -> PathBuf {
        self.0.join("curves.csv")
    }
}

/// Short description of this machine for reports.
pub fn hardware() -> String {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    format!("{cpu}, {cores} cores, CPU (burn flex)")
}

fn bar(len: u64, msg: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {elapsed_precise} ETA {eta_precise}")
            .expect("template")
            .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}

/// Activations entering block `tune_from` for a list of images, computed in batches.
pub fn prefix_activations(
    backbone: &Backbone,
    pre: &Preprocess,
    images: &[RgbImage],
    tune_from: usize,
    device: &Device,
    pb: &ProgressBar,
) -> (Vec<f32>, [usize; 3]) {
    let s = pre.input_size as usize;
    let mut out = Vec::new();
    let mut shape = [0; 3];
    for chunk in images.chunks(32) {
        let mut buf = Vec::with_capacity(chunk.len() * 3 * s * s);
        for img in chunk {
            pre.normalise_into(img, &mut buf);
        }
        let x = Tensor::<4>::from_data(TensorData::new(buf, [chunk.len(), 3, s, s]), device);
        let y = backbone.forward_blocks(x, 0, tune_from, None);
        let [_, c, h, w] = y.dims();
        shape = [c, h, w];
        out.extend(y.into_data().try_into_vec_as::<f32>().expect("f32"));
        pb.inc(chunk.len() as u64);
    }
    (out, shape)
}

/// Loads the backbone checkpoint, folds it and quantizes it to 4 bits: the frozen base.
pub fn frozen_base(pth: &Path, group: usize) -> Result<(Weights, Weights)> {
    let float = fold_torchvision(pth).with_context(|| format!("loading backbone {}", pth.display()))?;
    let q = Weights::from_safetensors(&float.to_safetensors(group)?)?;
    Ok((float, q))
}

/// Batch of cached activations plus targets.
struct Batch {
    x: Vec<f32>,
    labels: Vec<i64>,
    attr_targets: Vec<[i64; NUM_ATTRIBUTES]>,
    attr_mask: Vec<[f32; NUM_ATTRIBUTES]>,
}

pub(crate) fn targets(s: &Sample) -> ([i64; NUM_ATTRIBUTES], [f32; NUM_ATTRIBUTES]) {
    let mut t = [0i64; NUM_ATTRIBUTES];
    let mut m = [0f32; NUM_ATTRIBUTES];
    for i in 0..NUM_ATTRIBUTES {
        if let Some(v) = s.attrs.0[i] {
            t[i] = v as i64;
            m[i] = 1.0;
        }
    }
    (t, m)
}

/// Weighted cross-entropy `-Σ w[y]·log p[y] / Σ w[y]` (PyTorch's weighted mean).
pub(crate) fn class_loss(logits: Tensor<2>, labels: Tensor<1, Int>, class_weights: Tensor<1>) -> Tensor<1> {
    let [b, _] = logits.dims();
    let logp = log_softmax(logits, 1);
    let picked = logp.gather(1, labels.clone().reshape([b, 1])).reshape([b]);
    let w = class_weights.select(0, labels);
    (picked * w.clone()).sum().neg() / w.sum()
}

/// Mean over attributes of the masked cross-entropy of each attribute head.
pub(crate) fn attribute_loss(logits: Tensor<2>, t: Tensor<2, Int>, mask: Tensor<2>) -> Tensor<1> {
    let [b, _] = logits.dims();
    let mut total: Option<Tensor<1>> = None;
    let mut off = 0;
    for (i, a) in ATTRIBUTES.iter().enumerate() {
        let k = a.arity();
        let logp = log_softmax(logits.clone().slice([0..b, off..off + k]), 1);
        let ti = t.clone().slice([0..b, i..i + 1]);
        let mi = mask.clone().slice([0..b, i..i + 1]).reshape([b]);
        let picked = logp.gather(1, ti).reshape([b]);
        let l = (picked * mi.clone()).sum().neg() / mi.sum().clamp_min(1.0);
        total = Some(match total {
            Some(t) => t + l,
            None => l,
        });
        off += k;
    }
    total.expect("attributes").div_scalar(NUM_ATTRIBUTES as f64)
}

/// Evaluation of the current heads on cached val activations.
pub struct ValResult {
    /// Predicted class per sample.
    pub predicted: Vec<usize>,
    /// Class probabilities per sample.
    pub probs: Vec<[f32; NUM_CLASSES]>,
    /// Attribute accuracy over samples with known attributes.
    pub attribute_accuracy: f64,
}

fn evaluate(
    model: &Trainable,
    backbone: &Backbone,
    cache: &[f32],
    shape: [usize; 3],
    samples: &[Sample],
    tune_from: usize,
    device: &Device,
) -> ValResult {
    let per = shape.iter().product::<usize>();
    let mut predicted = Vec::new();
    let mut probs = Vec::new();
    let (mut attr_ok, mut attr_n) = (0usize, 0usize);
    let aw = attribute_logits_width();
    for (bi, chunk) in samples.chunks(128).enumerate() {
        let start = bi * 128;
        let x = Tensor::<4>::from_data(
            TensorData::new(
                cache[start * per..(start + chunk.len()) * per].to_vec(),
                [chunk.len(), shape[0], shape[1], shape[2]],
            ),
            device,
        );
        let (cl, al) = model.forward(backbone, x, tune_from);
        let p = burn::tensor::activation::softmax(cl, 1)
            .into_data()
            .try_into_vec_as::<f32>()
            .expect("f32");
        let a = al.into_data().try_into_vec_as::<f32>().expect("f32");
        for (j, s) in chunk.iter().enumerate() {
            let mut row = [0f32; NUM_CLASSES];
            row.copy_from_slice(&p[j * NUM_CLASSES..(j + 1) * NUM_CLASSES]);
            let best = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).expect("6").0;
            predicted.push(best);
            probs.push(row);
            let (attrs, _) = decode_attributes(&a[j * aw..(j + 1) * aw]);
            for i in 0..NUM_ATTRIBUTES {
                if let Some(t) = s.attrs.0[i] {
                    attr_n += 1;
                    attr_ok += usize::from(attrs.0[i] == Some(t));
                }
            }
        }
    }
    ValResult {
        predicted,
        probs,
        attribute_accuracy: if attr_n == 0 {
            0.0
        } else {
            attr_ok as f64 / attr_n as f64
        },
    }
}

/// Label ids of the classes with at least one attribute-labelled training sample.
fn attribute_classes(samples: &[Sample]) -> Vec<usize> {
    let mut v: Vec<usize> = samples
        .iter()
        .filter(|s| !s.attrs.is_empty())
        .filter_map(|s| s.label.map(|l| l.index()))
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn limit_per_class(samples: Vec<Sample>, max: usize, rng: &mut ChaCha8Rng) -> Vec<Sample> {
    if max == 0 {
        return samples;
    }
    let mut by: Vec<Vec<Sample>> = vec![Vec::new(); NUM_CLASSES];
    for s in samples {
        if let Some(l) = s.label {
            by[l.index()].push(s);
        }
    }
    by.into_iter()
        .flat_map(|mut v| {
            v.shuffle(rng);
            v.truncate(max);
            v
        })
        .collect()
}

fn report_rejected(run: &RunDir, rejected: &[Rejected]) -> Result<()> {
    if rejected.is_empty() {
        return Ok(());
    }
    let mut f = std::fs::File::create(run.0.join("rejected.csv"))?;
    writeln!(f, "path,reason")?;
    for r in rejected {
        tracing::warn!(path = %r.path.display(), reason = %r.reason, "skipping image");
        writeln!(f, "\"{}\",\"{}\"", r.path.display(), r.reason.replace('"', "'"))?;
    }
    Ok(())
}

/// Trains a compact model and writes the run directory.
pub fn train(data: &Path, out: &Path, backbone_pth: &Path, settings: TrainSettings) -> Result<RunRecord> {
    let started = Instant::now();
    let run = RunDir(out.to_path_buf());
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut settings = settings;
    if settings.model.tune_from > 18 {
        bail!("tune_from must be 0..=18, got {}", settings.model.tune_from);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(settings.seed);
    let pre = settings.preprocess();
    let limits = DecodeLimits::default();

    let (train_s, val_s) = read_split(data)?;
    let train_s = limit_per_class(
        train_s.into_iter().filter(|s| s.label.is_some()).collect(),
        settings.max_per_class,
        &mut rng,
    );
    let val_s: Vec<Sample> = val_s.into_iter().filter(|s| s.label.is_some()).collect();
    tracing::info!(train = train_s.len(), val = val_s.len(), "decoding images");
    let (train_set, mut rejected) = load_images(train_s, &limits);
    let (val_set, rej_val) = load_images(val_s, &limits);
    rejected.extend(rej_val);
    report_rejected(&run, &rejected)?;
    if train_set.is_empty() || val_set.is_empty() {
        bail!("no usable training or validation images");
    }
    let (train_samples, train_images): (Vec<Sample>, Vec<RgbImage>) = train_set.into_iter().unzip();
    let (val_samples, val_images): (Vec<Sample>, Vec<RgbImage>) = val_set.into_iter().unzip();
    let train_counts = class_counts(&train_samples);
    settings.model.attribute_classes = attribute_classes(&train_samples);
    let cfg = settings.model.clone();
    let val_counts = class_counts(&val_samples);
    tracing::info!(?train_counts, ?val_counts, rejected = rejected.len(), "data loaded");

    let device = Device::flex();
    let ad = device.clone().autodiff();
    let backbone_sha256 = wbc_protocol::bundle::sha256_hex(
        &std::fs::read(backbone_pth).with_context(|| format!("reading {}", backbone_pth.display()))?,
    );
    let (_, q) = frozen_base(backbone_pth, cfg.q4_group)?;
    let backbone = Backbone::new(&q, &device)?;
    let backbone_ad = Backbone::new(&q, &ad)?;

    // Cache the frozen prefix: one unaugmented pass for val, `views` augmented passes for train.
    let total = (val_images.len() + settings.views * train_images.len()) as u64;
    let pb = bar(total, "backbone");
    let scales = |s: &[Sample]| s.iter().map(|s| s.microns_per_pixel).collect::<Vec<_>>();
    let (train_scales, val_scales) = (scales(&train_samples), scales(&val_samples));
    let val_views = prepare_all(&pre, &val_images, &val_scales, None, 0);
    drop(val_images);
    let (val_cache, shape) = prefix_activations(&backbone, &pre, &val_views, cfg.tune_from, &device, &pb);
    drop(val_views);
    let mut aug = if settings.strong_augment {
        Augment::strong()
    } else {
        Augment::default()
    };
    aug.density = (settings.stain_density, STAIN_DENSITY_MIN_GAMMA);
    let mut train_cache = Vec::with_capacity(settings.views);
    for _ in 0..settings.views {
        let mut augmented = prepare_all(
            &pre,
            &train_images,
            &train_scales,
            Some(&aug),
            rand::Rng::r#gen(&mut rng),
        );
        if let Some(mix) = &settings.amplitude_mix {
            let sources: Vec<String> = train_samples.iter().map(|s| s.source.clone()).collect();
            augmented =
                crate::compact::amplitude::mix_across_sources(&augmented, &sources, mix, rand::Rng::r#gen(&mut rng));
        }
        train_cache.push(prefix_activations(&backbone, &pre, &augmented, cfg.tune_from, &device, &pb).0);
    }
    pb.finish_and_clear();
    drop(train_images);
    let per: usize = shape.iter().product();

    // Class-balanced loss weights: N / (K · n_c).
    let n = train_samples.len() as f32;
    let cw: Vec<f32> = train_counts
        .iter()
        .map(|&c| {
            if c == 0 {
                0.0
            } else {
                n / (NUM_CLASSES as f32 * c as f32)
            }
        })
        .collect();
    let class_weights = Tensor::<1>::from_data(TensorData::new(cw, [NUM_CLASSES]), &ad);

    let plan = (settings.source_adversary > 0.0)
        .then(|| SourcePlan::new(&train_samples))
        .flatten();
    match &plan {
        Some(p) => {
            tracing::info!(sources = ?p.sources, classes = ?p.classes, weights = ?p.weights, "source-adversarial critic")
        }
        None if settings.source_adversary > 0.0 => {
            tracing::warn!("no class comes from more than one source: training without the source critic")
        }
        None => {}
    }
    let mut model = Learner {
        model: Trainable::new(&cfg, &backbone_ad, &ad),
        critic: SourceCritic::new(
            wbc_models::compact::mobilenet::FEATURES,
            plan.as_ref().map_or(1, |p| p.sources.len()),
            &ad,
        ),
    };
    let mut optim = AdamWConfig::new()
        .with_weight_decay(settings.weight_decay as f32)
        .init();
    let steps_per_epoch = train_samples.len().div_ceil(settings.batch);
    let total_steps = steps_per_epoch * settings.epochs;
    let warmup = steps_per_epoch / 2;
    let mut curves = std::fs::File::create(run.curves())?;
    // The critic's columns only when there is a critic.
    let critic_columns = if plan.is_some() {
        "train_critic_loss,critic_accuracy,"
    } else {
        ""
    };
    writeln!(
        curves,
        "epoch,train_loss,train_class_loss,{critic_columns}val_accuracy,val_macro_f1,val_attribute_accuracy,lr,seconds"
    )?;
    let mut best = (0usize, -1.0f64);
    let mut step = 0usize;
    let mut order: Vec<usize> = (0..train_samples.len()).collect();
    for epoch in 1..=settings.epochs {
        order.shuffle(&mut rng);
        let pb = bar(steps_per_epoch as u64, &format!("epoch {epoch}/{}", settings.epochs));
        let (mut loss_sum, mut class_sum, mut batches) = (0f64, 0f64, 0usize);
        let (mut critic_sum, mut critic_right, mut critic_seen) = (0f64, 0usize, 0usize);
        let mut lr = settings.lr;
        for idx in order.chunks(settings.batch) {
            let mut b = Batch {
                x: Vec::with_capacity(idx.len() * per),
                labels: Vec::new(),
                attr_targets: Vec::new(),
                attr_mask: Vec::new(),
            };
            for &i in idx {
                let v = rand::Rng::gen_range(&mut rng, 0..settings.views);
                b.x.extend_from_slice(&train_cache[v][i * per..(i + 1) * per]);
                b.labels.push(train_samples[i].label.expect("labelled").index() as i64);
                let (t, m) = targets(&train_samples[i]);
                b.attr_targets.push(t);
                b.attr_mask.push(m);
            }
            let bs = idx.len();
            if let Some(ms) = &settings.mixstyle {
                let sources: Vec<&str> = idx.iter().map(|&i| train_samples[i].source.as_str()).collect();
                ms.apply(&mut b.x, shape[0], shape[1] * shape[2], &sources, &mut rng);
            }
            let x = Tensor::<4>::from_data(TensorData::new(b.x, [bs, shape[0], shape[1], shape[2]]), &ad);
            let labels = Tensor::<1, Int>::from_data(TensorData::new(b.labels, [bs]), &ad);
            let at = Tensor::<2, Int>::from_data(TensorData::new(b.attr_targets.concat(), [bs, NUM_ATTRIBUTES]), &ad);
            let am = Tensor::<2>::from_data(TensorData::new(b.attr_mask.concat(), [bs, NUM_ATTRIBUTES]), &ad);
            let features = model.model.features(&backbone_ad, x, cfg.tune_from);
            let (cl, al) = model.model.heads_of(features.clone());
            let lc = class_loss(cl, labels, class_weights.clone());
            let la = attribute_loss(al, at, am);
            let mut loss = lc.clone() + la.mul_scalar(settings.attr_weight);
            if let Some(plan) = &plan
                && let Some(c) = plan.loss(&model.critic, features, idx)
            {
                let mu = schedule(settings.source_adversary, step as f64 / total_steps as f64);
                critic_sum += c.critic.clone().into_scalar::<f32>() as f64 * c.seen as f64;
                (critic_right, critic_seen) = (critic_right + c.right, critic_seen + c.seen);
                loss = loss + c.critic + c.confusion.mul_scalar(mu);
            }
            let lv = loss.clone().into_scalar::<f32>() as f64;
            loss_sum += lv;
            class_sum += lc.into_scalar::<f32>() as f64;
            batches += 1;
            if !lv.is_finite() {
                bail!("loss became {lv} at epoch {epoch}; lower --lr");
            }
            // Linear warm-up, then cosine decay to 5% of the peak.
            lr = if step < warmup {
                settings.lr * (step + 1) as f64 / warmup as f64
            } else {
                let t = (step - warmup) as f64 / (total_steps - warmup).max(1) as f64;
                settings.lr * (0.05 + 0.95 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
            };
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(lr, model, grads);
            step += 1;
            pb.inc(1);
        }
        pb.finish_and_clear();
        let valid = model.model.valid();
        let v = evaluate(
            &valid,
            &backbone,
            &val_cache,
            shape,
            &val_samples,
            cfg.tune_from,
            &device,
        );
        let truth: Vec<usize> = val_samples.iter().map(|s| s.label.expect("labelled").index()).collect();
        let report = ConfusionMatrix::from_labels(NUM_CLASSES, &truth, &v.predicted).report();
        let secs = started.elapsed().as_secs_f64();
        let critic = match &plan {
            Some(_) => format!(
                "{:.5},{:.5},",
                critic_sum / critic_seen.max(1) as f64,
                critic_right as f64 / critic_seen.max(1) as f64
            ),
            None => String::new(),
        };
        writeln!(
            curves,
            "{epoch},{:.5},{:.5},{critic}{:.5},{:.5},{:.5},{:.6},{:.1}",
            loss_sum / batches as f64,
            class_sum / batches as f64,
            report.accuracy,
            report.macro_avg.f1,
            v.attribute_accuracy,
            lr,
            secs
        )?;
        curves.flush()?;
        let per_class: Vec<String> = CellClass::ALL
            .iter()
            .map(|c| format!("{}={:.3}", c.abbreviation(), report.per_class[c.index()].f1))
            .collect();
        let critic_accuracy = (critic_seen > 0).then(|| critic_right as f64 / critic_seen as f64);
        tracing::info!(epoch, loss = loss_sum / batches as f64, ?critic_accuracy, val_acc = report.accuracy, val_macro_f1 = report.macro_avg.f1, attr_acc = v.attribute_accuracy, per_class = %per_class.join(" "), "epoch done");
        if report.macro_avg.f1 > best.1 {
            best = (epoch, report.macro_avg.f1);
            let path = run.checkpoint();
            let _ = std::fs::remove_file(&path);
            let mut store = SafetensorsStore::from_file(path.clone());
            valid
                .save_into(&mut store)
                .map_err(|e| anyhow::anyhow!("saving checkpoint {}: {e:?}", path.display()))?;
        }
    }
    plot::curves(&run.curves(), &run.0.join("curves.png"))?;
    let record = RunRecord {
        settings,
        backbone_sha256,
        train_counts,
        val_counts,
        train_sources: source_counts(&train_samples).into_iter().collect(),
        rejected: rejected.len(),
        best_epoch: best.0,
        best_val_macro_f1: best.1,
        seconds: started.elapsed().as_secs_f64(),
        hardware: hardware(),
    };
    std::fs::write(run.record(), serde_json::to_vec_pretty(&record)?)?;
    Ok(record)
}

/// What the optimiser updates: the model and, when training against the source critic, the
/// critic (which is not exported).
#[derive(Module, Debug)]
struct Learner {
    model: Trainable,
    critic: SourceCritic,
}

/// Rebuilds the trained adapters and heads of a run on a device.
pub fn load_trainable(run: &RunDir, backbone: &Backbone, cfg: &CompactConfig, device: &Device) -> Result<Trainable> {
    let mut model = Trainable::new(cfg, backbone, device);
    let path = run.checkpoint();
    if !path.is_file() {
        bail!("{}: no checkpoint (did training finish an epoch?)", path.display());
    }
    let mut store = SafetensorsStore::from_file(path.clone());
    model
        .load_from(&mut store)
        .map_err(|e| anyhow::anyhow!("loading {}: {e:?}", path.display()))?;
    Ok(model)
}
