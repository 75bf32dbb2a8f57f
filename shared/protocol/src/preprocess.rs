//! What the model's input is made from, as data: the cell normalisation's settings and the
//! preprocessing recorded in every bundle's manifest. The pixels are worked in `wbc_cells`
//! (`Normalise`, `Prepare`); this crate only carries the settings, so that verifying a bundle
//! needs no image code.

use serde::{Deserialize, Serialize};

/// Settings of the normalisation; stored in every bundle's manifest so that the appliance
/// prepares cells exactly as training did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellNorm {
    /// Side of the square output, in pixels.
    pub output_size: u32,
    /// Fraction of the output side that the nucleus' extent spans (relative scale).
    pub nucleus_fraction: f32,
    /// Physical scale: the view covers this many micrometres of smear, so that the cell's size
    /// is kept. `0` selects the relative scale (`nucleus_fraction`).
    #[serde(default)]
    pub view_microns: f32,
    /// Pixel size (µm) assumed for images whose pixel size is not given, with the physical
    /// scale: that of the reference source's images.
    #[serde(default)]
    pub default_microns_per_pixel: f32,
    /// Resolution normalisation: the view is first made at this side and then enlarged to
    /// `output_size`, so that every source shows the cell with the same amount of detail (a
    /// sharp scanner's fine texture is not a cue that a blurry camera can never give).
    /// `0` keeps the full resolution.
    #[serde(default)]
    pub detail_side: u32,
    /// Show the model luminance only (grey view), so that no site's hue can stand in for the
    /// cell; shape, size, texture and darkness remain.
    #[serde(default)]
    pub grey: bool,
    /// Equalise the grey view's histogram, so that no site's contrast or brightness curve can
    /// stand in for the cell (with `grey` only).
    #[serde(default)]
    pub equalise: bool,
    /// Replace what lies outside the cell (beyond `mask_margin` × its radius) with a constant.
    pub mask_background: bool,
    /// Radius of the kept disc relative to the cell's measured radius (between 1.2 and 1.6 ×
    /// the nucleus' radius, at most the whole view).
    pub mask_margin: f32,
    /// Where a stain colours the red cells with the nucleus (the blue-over-green threshold
    /// keeps more than a nucleus, most of it pale), take only the dark part of what it kept as
    /// the nucleus. Off in bundles made before it existed (left out of their manifests), whose
    /// models were trained without it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dark_nucleus: bool,
    /// Reinhard target: per-channel mean of the normalised crop in `wbc_cells::cellnorm::to_lab` space.
    pub stain_mean: [f32; 3],
    /// Reinhard target: per-channel standard deviation.
    pub stain_std: [f32; 3],
}

impl Default for CellNorm {
    fn default() -> Self {
        CellNorm {
            output_size: 224,
            nucleus_fraction: 0.4,
            view_microns: 0.0,
            default_microns_per_pixel: 0.0,
            detail_side: 112,
            grey: true,
            equalise: false,
            mask_background: false,
            mask_margin: 1.12,
            dark_nucleus: false,
            stain_mean: [64.0, 22.0, -16.0],
            stain_std: [22.0, 16.0, 22.0],
        }
    }
}

impl CellNorm {
    /// Whether the view keeps the cell's physical size.
    pub fn physical(&self) -> bool {
        self.view_microns > 0.0
    }

    /// Side of the crop in input pixels, for a nucleus of `nucleus` input pixels in an image
    /// whose pixels are `microns_per_pixel` µm (the default when `None` or not a positive
    /// number).
    pub fn crop_side(&self, nucleus: f32, microns_per_pixel: Option<f32>) -> f32 {
        if !self.physical() {
            return (nucleus / self.nucleus_fraction).max(8.0);
        }
        match self.pixel_size(microns_per_pixel) {
            Some(um) => (self.view_microns / um).max(8.0),
            None => (nucleus / self.nucleus_fraction).max(8.0),
        }
    }

    /// The pixel size (µm) an image is taken to have: `given` where it is a positive number,
    /// else the reference scale where there is one.
    pub fn pixel_size(&self, given: Option<f32>) -> Option<f32> {
        let positive = |v: &f32| v.is_finite() && *v > 0.0;
        given
            .filter(positive)
            .or(Some(self.default_microns_per_pixel).filter(positive))
    }
}

/// How a cell image becomes the model's input tensor. Stored in every bundle's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// Side of the square model input, in pixels.
    pub input_size: u32,
    /// Per-channel mean (RGB, on the 0..1 scale).
    pub mean: [f32; 3],
    /// Per-channel standard deviation (RGB, on the 0..1 scale).
    pub std: [f32; 3],
    /// Cell normalisation (find, centre, scale, stain-normalise the cell). Bundles made before
    /// it existed have none and get a plain centre crop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell: Option<CellNorm>,
}

impl Preprocess {
    /// ImageNet statistics at 224 px, as torchvision's pretrained backbones expect.
    pub fn imagenet(input_size: u32) -> Self {
        Preprocess {
            input_size,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            cell: None,
        }
    }

    /// ImageNet statistics with cell normalisation at `cell.output_size`.
    pub fn with_cell(cell: CellNorm) -> Self {
        Preprocess {
            cell: Some(cell.clone()),
            ..Self::imagenet(cell.output_size)
        }
    }
}
