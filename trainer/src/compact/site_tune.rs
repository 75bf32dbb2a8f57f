//! `trainer adapt --replay`: the last blocks of the backbone learn the clinic too.
//!
//! A class head reads features the signed backbone makes; where those features do not tell a
//! site's cells apart (measured at the development site: a head fitted on 300 reviewed cells
//! does no better than one fitted on 100), only the backbone can learn more. New LoRA adapters
//! on the pointwise convolutions of blocks `tune_from..` (zero-initialised: training starts at
//! the signed model) and the heads are trained on the reviewed cells, in augmented views,
//! together with a replay of training images with their attributes, so that the training
//! sources keep their answers and the descriptions their attribute heads. The adapters are
//! then merged and the model quantized as `export` does.

use crate::augment::Augment;
use crate::compact::train::{attribute_loss, prefix_activations, prepare_all, targets};
use crate::dataset::Sample;
use anyhow::{Result, bail};
use burn::module::{Module, Param};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use image::RgbImage;
use indicatif::ProgressBar;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use wbc_cells::image::Preprocess;
use wbc_models::compact::mobilenet::Backbone;
use wbc_models::compact::weights::Weights;
use wbc_models::compact::{CompactConfig, Trainable};
use wbc_protocol::attributes::NUM_ATTRIBUTES;
use wbc_protocol::classes::NUM_CLASSES;

/// How the backbone's last blocks are tuned.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TuneSettings {
    /// First block with adapters.
    pub tune_from: usize,
    /// LoRA rank.
    pub rank: usize,
    /// Epochs over the reviewed cells' views and the replay.
    pub epochs: usize,
    /// Batch size.
    pub batch: usize,
    /// Peak learning rate (AdamW, cosine decay).
    pub lr: f64,
    /// Share of the class loss carried by the clinic's cells.
    pub site_share: f64,
    /// Augmented views of each reviewed cell.
    pub site_views: usize,
    /// Augmented views of each replayed training cell.
    pub replay_views: usize,
    /// Weight of the attribute loss (replayed cells with attributes).
    pub attr_weight: f64,
    /// How many times another class a replayed blast weighs.
    pub blast_replay_weight: f64,
    /// Random seed.
    pub seed: u64,
}

impl Default for TuneSettings {
    fn default() -> Self {
        TuneSettings {
            tune_from: 14,
            rank: 8,
            epochs: 6,
            batch: 32,
            lr: 1e-3,
            site_share: 0.5,
            site_views: 8,
            replay_views: 1,
            attr_weight: 0.3,
            blast_replay_weight: 3.0,
            seed: 7,
        }
    }
}

/// One cached training row: the activation entering `tune_from`, the class, attribute targets
/// and the row's weight in the class loss.
struct Rows {
    x: Vec<f32>,
    shape: [usize; 3],
    labels: Vec<i64>,
    attrs: Vec<([i64; NUM_ATTRIBUTES], [f32; NUM_ATTRIBUTES])>,
    weight: Vec<f32>,
}

/// Tunes the backbone's last blocks and the heads; returns the merged f32 weights (backbone
/// and heads) of the site model.
#[allow(clippy::too_many_arguments)]
pub fn tune(
    base: &Weights,
    cfg: &CompactConfig,
    pre: &Preprocess,
    site: (&[RgbImage], &[Option<f32>], &[usize]),
    replay: (&[Sample], &[RgbImage]),
    s: &TuneSettings,
) -> Result<Weights> {
    let (site_images, site_scales, site_labels) = site;
    let (replay_samples, replay_images) = replay;
    if s.tune_from >= 19 || s.epochs == 0 || s.batch == 0 || s.site_views == 0 {
        bail!("--tune-from must be below 19, and epochs, batch and views above 0");
    }
    let device = Device::flex();
    let ad = device.clone().autodiff();
    let backbone = Backbone::new(base, &device)?;
    let backbone_ad = Backbone::new(base, &ad)?;
    let mut rng = ChaCha8Rng::seed_from_u64(s.seed);
    let aug = Augment::default();
    let pb = ProgressBar::hidden();

    // Cache the frozen prefix of every view.
    let mut rows = Rows {
        x: Vec::new(),
        shape: [0; 3],
        labels: Vec::new(),
        attrs: Vec::new(),
        weight: Vec::new(),
    };
    let mut site_counts = [0usize; NUM_CLASSES];
    site_labels.iter().for_each(|&y| site_counts[y] += 1);
    let present = site_counts.iter().filter(|&&n| n > 0).count().max(1) as f64;
    let no_attrs = ([0i64; NUM_ATTRIBUTES], [0f32; NUM_ATTRIBUTES]);
    for v in 0..s.site_views {
        let views = prepare_all(
            pre,
            site_images,
            site_scales,
            (v > 0).then_some(&aug),
            rand::Rng::r#gen(&mut rng),
        );
        let (x, shape) = prefix_activations(&backbone, pre, &views, s.tune_from, &device, &pb);
        rows.x.extend(x);
        rows.shape = shape;
        for &y in site_labels {
            rows.labels.push(y as i64);
            rows.attrs.push(no_attrs);
            rows.weight
                .push((s.site_share / present / (site_counts[y] * s.site_views) as f64) as f32);
        }
    }
    let replay_scales: Vec<Option<f32>> = replay_samples.iter().map(|r| r.microns_per_pixel).collect();
    let replay_labels: Vec<usize> = replay_samples
        .iter()
        .map(|r| r.label.map_or(0, |l| l.index()))
        .collect();
    let replay_weight = crate::compact::site::replay_weights(
        &replay_labels,
        (1.0 - s.site_share) / s.replay_views as f64,
        s.blast_replay_weight,
    );
    for v in 0..s.replay_views {
        let views = prepare_all(
            pre,
            replay_images,
            &replay_scales,
            (v > 0).then_some(&aug),
            rand::Rng::r#gen(&mut rng),
        );
        let (x, _) = prefix_activations(&backbone, pre, &views, s.tune_from, &device, &pb);
        rows.x.extend(x);
        for (r, w) in replay_samples.iter().zip(&replay_weight) {
            rows.labels.push(r.label.map_or(0, |l| l.index() as i64));
            rows.attrs.push(targets(r));
            rows.weight.push(*w);
        }
    }
    let per: usize = rows.shape.iter().product();
    tracing::info!(rows = rows.labels.len(), per, "backbone prefix cached");

    // Adapters start at zero and the heads at the signed ones: training starts at the model.
    let cfg = CompactConfig {
        tune_from: s.tune_from,
        lora_rank: s.rank,
        lora_alpha: 2.0 * s.rank as f64,
        ..cfg.clone()
    };
    let mut model = Trainable::new(&cfg, &backbone_ad, &ad);
    let t2 = |name: &str| -> Result<Param<Tensor<2>>> {
        let t = base.get(name)?;
        Ok(Param::from_tensor(
            Tensor::<2>::from_data(TensorData::new(t.values.clone(), [t.shape[0], t.shape[1]]), &ad).require_grad(),
        ))
    };
    let t1 = |name: &str| -> Result<Param<Tensor<1>>> {
        let t = base.get(name)?;
        Ok(Param::from_tensor(
            Tensor::<1>::from_data(TensorData::new(t.values.clone(), [t.shape[0]]), &ad).require_grad(),
        ))
    };
    model.heads.class.weight = t2("head.class.weight")?;
    model.heads.class.bias = Some(t1("head.class.bias")?);
    model.heads.attrs.weight = t2("head.attrs.weight")?;
    model.heads.attrs.bias = Some(t1("head.attrs.bias")?);

    // The row weights carry the balance; the loss divides by their sum per batch, so every
    // class of weights is scaled to keep the site's share.
    let mut optim = AdamWConfig::new().with_weight_decay(1e-4).init();
    let n = rows.labels.len();
    let steps_per_epoch = n.div_ceil(s.batch);
    let total = steps_per_epoch * s.epochs;
    let mut order: Vec<usize> = (0..n).collect();
    let mut step = 0;
    for epoch in 1..=s.epochs {
        order.shuffle(&mut rng);
        let mut loss_sum = 0f64;
        for idx in order.chunks(s.batch) {
            let bs = idx.len();
            let mut x = Vec::with_capacity(bs * per);
            let (mut labels, mut at, mut am, mut w) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for &i in idx {
                x.extend_from_slice(&rows.x[i * per..(i + 1) * per]);
                labels.push(rows.labels[i]);
                at.extend(rows.attrs[i].0);
                am.extend(rows.attrs[i].1);
                w.push(rows.weight[i]);
            }
            let x = Tensor::<4>::from_data(
                TensorData::new(x, [bs, rows.shape[0], rows.shape[1], rows.shape[2]]),
                &ad,
            );
            let labels = Tensor::<1, Int>::from_data(TensorData::new(labels, [bs]), &ad);
            let at = Tensor::<2, Int>::from_data(TensorData::new(at, [bs, NUM_ATTRIBUTES]), &ad);
            let am = Tensor::<2>::from_data(TensorData::new(am, [bs, NUM_ATTRIBUTES]), &ad);
            let (cl, al) = model.forward(&backbone_ad, x, s.tune_from);
            // Per-row weights: the class loss of each row scaled by its weight, normalised by
            // the batch's expected weight so that the learning rate means the same whatever
            // the mix of the batch.
            let wt = Tensor::<1>::from_data(TensorData::new(w, [bs]), &ad);
            let logp = burn::tensor::activation::log_softmax(cl.clone(), 1);
            let picked = logp.gather(1, labels.clone().reshape([bs, 1])).reshape([bs]);
            let lc = (picked * wt).sum().neg().mul_scalar(n as f64 / bs as f64);
            let la = attribute_loss(al, at, am);
            let loss = lc + la.mul_scalar(s.attr_weight);
            let lv = loss.clone().into_scalar::<f32>() as f64;
            if !lv.is_finite() {
                bail!("the loss became {lv} at epoch {epoch}; lower --tune-lr");
            }
            loss_sum += lv;
            let lr = s.lr * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / total as f64).cos());
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(lr.max(s.lr * 0.02), model, grads);
            step += 1;
        }
        tracing::info!(
            epoch,
            loss = loss_sum / steps_per_epoch as f64,
            "tuning the last blocks"
        );
    }
    let model = model.valid();
    let backbone_valid = Backbone::new(base, &device)?;
    Ok(model.merged_weights(base, &backbone_valid, s.tune_from)?)
}
