//! The classifier's side of adapting the backbone itself to a site (the method:
//! [`crate::compact::site_norm`]): the training cells' unit moments from the bundle, the fit on
//! a site's cell images, and the adapted copy of the model that classifies while it is in use.

use super::{Classifier, Engine};
use crate::adapt::{AdaptError, MIN_CELLS, start_mix};
use crate::compact::site_norm::{Moments, SiteNorm, UNIT_MOMENTS_PART, UnitReference};
use crate::compact::{CPU_CELLS_PER_RUN, ModelError};
use burn::tensor::{Device, Tensor, TensorData};
use image::RgbImage;
use rayon::prelude::*;
use std::sync::Arc;
use wbc_cells::Prepare;
use wbc_cells::image::Preprocess;
use wbc_protocol::bundle::Bundle;

/// Site cells the backbone's adaptation is fitted on, at most (evenly spaced among those
/// given): the fit holds every one's activations of a block at a time (1.6 MB a cell after
/// the first block at 224 px: about 0.5 GB for 320 cells).
pub const MAX_NORM_CELLS: usize = 320;

/// Blocks of the backbone a site adaptation changes (from the first): all of them.
pub const NORM_BLOCKS: usize = 19;

/// The bundle's unit moments, where it has them (compact models only).
pub(super) fn unit_reference(bundle: &Bundle, model: &Engine) -> Result<Option<Arc<UnitReference>>, ModelError> {
    let Engine::Compact(m) = model else {
        return Ok(None);
    };
    if !bundle.manifest.parts.contains_key(UNIT_MOMENTS_PART) {
        return Ok(None);
    }
    let r = UnitReference::from_safetensors(bundle.part(UNIT_MOMENTS_PART)?, m.backbone())
        .map_err(|e| ModelError::Config(e.to_string()))?;
    Ok(Some(Arc::new(r)))
}

impl Classifier {
    /// The model inputs of `images` (read as `pre` says) on the model's device, in runs it
    /// takes at once.
    fn input_runs(
        &self,
        pre: &Preprocess,
        device: &Device,
        images: &[impl std::borrow::Borrow<RgbImage> + Sync],
        scales: &[Option<f32>],
    ) -> Vec<Tensor<4>> {
        let s = pre.input_size as usize;
        let per_run = if *device == Device::flex() {
            CPU_CELLS_PER_RUN
        } else {
            32
        };
        images
            .chunks(per_run)
            .zip(scales.chunks(per_run))
            .map(|(imgs, um)| {
                let data: Vec<f32> = imgs
                    .par_iter()
                    .zip(um)
                    .flat_map_iter(|(img, um)| {
                        let (view, _) = pre.prepare(img.borrow(), None, *um);
                        let mut values = Vec::new();
                        pre.normalise_into(&view, &mut values);
                        values
                    })
                    .collect();
                Tensor::from_data(TensorData::new(data, [imgs.len(), 3, s, s]), device)
            })
            .collect()
    }

    /// Each backbone unit's output moments over cell images, through the signed model: what
    /// a bundle's unit moments are made of (`trainer export`, one class at a time).
    pub fn unit_moments(&self, images: &[RgbImage], scales: &[Option<f32>]) -> Result<Vec<Moments>, ModelError> {
        let Engine::Compact(m) = &self.model else {
            return Err(ModelError::Config("only a compact model has backbone units".into()));
        };
        let m = self.signed.as_deref().unwrap_or(m);
        let runs = images
            .chunks(crate::classify::BATCH)
            .zip(scales.chunks(crate::classify::BATCH))
            .flat_map(|(imgs, um)| self.input_runs(self.signed_pre(), m.device(), imgs, um));
        Ok(m.backbone().unit_moments(runs))
    }

    /// Whether the backbone itself can adapt to a site (the bundle has its training cells'
    /// unit moments), beyond the pooled features.
    pub fn can_adapt_backbone(&self) -> bool {
        self.can_adapt() && self.unit_reference.is_some()
    }

    /// Fits the backbone's adaptation to a site's cell images (each with its pixel size), on
    /// at most [`MAX_NORM_CELLS`] of them; `None` where the bundle has no unit moments.
    pub fn fit_site_norm(&self, images: &[RgbImage], scales: &[Option<f32>]) -> Result<Option<SiteNorm>, AdaptError> {
        self.fit_site_norm_for(images, scales, &start_mix())
    }

    /// As [`Classifier::fit_site_norm`], towards the training cells mixed as `mix` says.
    pub fn fit_site_norm_for(
        &self,
        images: &[RgbImage],
        scales: &[Option<f32>],
        mix: &[f64; wbc_protocol::classes::NUM_CLASSES],
    ) -> Result<Option<SiteNorm>, AdaptError> {
        let (Some(reference), Engine::Compact(m)) = (&self.unit_reference, &self.model) else {
            return Ok(None);
        };
        if images.len() < MIN_CELLS {
            return Err(AdaptError::TooFewCells { got: images.len() });
        }
        let m = self.signed.as_deref().unwrap_or(m);
        let step = images.len().div_ceil(MAX_NORM_CELLS);
        let imgs: Vec<&RgbImage> = images.iter().step_by(step).collect();
        let um: Vec<Option<f32>> = scales.iter().step_by(step).copied().collect();
        // The site's pictures are read with the dark-nucleus rule on: a stain that colours the
        // red cells as it colours nuclei otherwise makes the view of a mostly red-cell picture.
        // The training side was measured with the bundle's own reading, on purpose: the rule
        // fires on under 1 % of the training sources' pictures, so both read them alike.
        let mut pre = self.signed_pre().clone();
        let dark_nucleus = pre.cell.is_some();
        if let Some(c) = pre.cell.as_mut() {
            c.dark_nucleus = true;
        }
        let runs = self.input_runs(&pre, m.device(), &imgs, &um);
        let mut norm = m.backbone().fit_site_norm(runs, &reference.mixture(mix), NORM_BLOCKS);
        norm.dark_nucleus = dark_nucleus;
        Ok(Some(norm))
    }

    /// The preprocessing of the signed model (without a site norm's changes).
    fn signed_pre(&self) -> &Preprocess {
        self.signed_pre.as_ref().unwrap_or(&self.pre)
    }

    /// The classifier with a site's backbone norm in use (`None`: the signed backbone again).
    /// The pooled adaptation, if any, is left as it is: [`Classifier::with_adaptation`] sets
    /// both together.
    pub fn with_site_norm(mut self, norm: Option<&SiteNorm>) -> Result<Self, AdaptError> {
        if let Some(signed) = self.signed.take() {
            self.model = Engine::Compact(signed);
        }
        if let Some(pre) = self.signed_pre.take() {
            self.pre = pre;
        }
        let Some(norm) = norm else {
            return Ok(self);
        };
        let Engine::Compact(m) = &self.model else {
            return Err(AdaptError::NoBank);
        };
        if self.unit_reference.is_none() {
            return Err(AdaptError::NoUnitMoments);
        }
        if !norm.fits(m.backbone()) {
            return Err(AdaptError::NormDoesNotFit);
        }
        let adapted = Engine::Compact(Box::new(m.with_site_norm(norm)));
        if let Engine::Compact(signed) = std::mem::replace(&mut self.model, adapted) {
            self.signed = Some(signed);
        }
        if let Some(c) = self.pre.cell.as_ref().filter(|c| c.dark_nucleus != norm.dark_nucleus) {
            let mut pre = self.pre.clone();
            pre.cell = Some(wbc_protocol::preprocess::CellNorm {
                dark_nucleus: norm.dark_nucleus,
                ..c.clone()
            });
            self.signed_pre = Some(std::mem::replace(&mut self.pre, pre));
        }
        Ok(self)
    }
}
