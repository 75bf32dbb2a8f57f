//! Cell normalisation: one step, shared by training, evaluation and the appliance, that turns
//! any picture of a white cell (a tight crop, a cell small in a field of red cells, a box cut
//! from a smear field) into the same view for the model.
//!
//! 1. Find the white cell: its nucleus and cytoplasm stain blue-violet, so `B − G` separates
//!    them from red cells (pink, `B < G`) and plasma on every stain seen so far. An Otsu
//!    threshold finds the nucleus; a lower threshold grown from it finds the cytoplasm.
//! 2. Measure the cell: its centre, its diameter and its nucleus' extent.
//! 3. Crop a square around the cell and resize it to the model input. Two scales:
//!    - physical ([`CellNorm::view_microns`] > 0): the square covers a fixed width of smear in
//!      micrometres, given the image's pixel size (the camera's calibration, a source's known
//!      scale, or the red cells of a field as a ruler). A blast then looks twice the size of a
//!      small lymphocyte, as it is, whatever the magnification;
//!    - relative (otherwise): the nucleus spans [`CellNorm::nucleus_fraction`] of the side.
//!      The nucleus is the scale because it segments reliably on every stain, whereas pale
//!      cytoplasm can be lost against plasma.
//! 4. Normalise the stain (Reinhard: match the crop's mean and spread in a Lab-like space to
//!    a fixed reference) and, optionally, replace everything outside the cell by a constant
//!    background so that the surroundings of a source cannot stand in for the cell.
//!
//! Size: the physical scale keeps it outright. With the relative scale and the background
//! kept, the red cells around the cell (about 7.5 µm across in every smear) stay in the view
//! at a scale set by the nucleus, so the model can still see how large the cell is relative
//! to them — but only where red cells are in view.
//!
//! When no cell is found (no stained region), the image is centre-cropped and stain-normalised
//! and the result says so: the caller decides whether to trust it.

use image::imageops::FilterType;
use image::{Rgb, RgbImage};
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
    /// Reinhard target: per-channel mean of the normalised crop in [`to_lab`] space.
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
            stain_mean: [64.0, 22.0, -16.0],
            stain_std: [22.0, 16.0, 22.0],
        }
    }
}

/// A normalised cell and what was measured on the way.
#[derive(Debug, Clone)]
pub struct NormalisedCell {
    /// The model's view of the cell: `output_size` square.
    pub image: RgbImage,
    /// Whether a stained cell was found (otherwise the image is a centre crop).
    pub found: bool,
    /// Cell centre in the input image's pixels.
    pub centre: [f32; 2],
    /// Cell diameter in the input image's pixels.
    pub diameter_px: f32,
    /// Extent of the nucleus (twice its 95th-percentile radius) in the input image's pixels.
    pub nucleus_px: f32,
    /// Whether the cell touches the input image's edge (it may be cut).
    pub touches_edge: bool,
    /// Pixel size of the input image (µm): the one given, else the reference scale; `None`
    /// where neither is known.
    pub microns_per_pixel: Option<f32>,
}

impl NormalisedCell {
    /// Cell box in the input image's pixels `[x0, y0, x1, y1]` (may extend past its edges).
    pub fn bbox(&self) -> [f32; 4] {
        let r = self.diameter_px / 2.0;
        [
            self.centre[0] - r,
            self.centre[1] - r,
            self.centre[0] + r,
            self.centre[1] + r,
        ]
    }
}

/// Longest side of the working copy used for segmentation.
const WORK_SIDE: u32 = 192;

/// What segmentation found, in working-copy pixels.
#[derive(Debug, Clone)]
struct Found {
    centre: [f32; 2],
    radius: f32,
    nucleus_radius: f32,
    touches_edge: bool,
}

impl CellNorm {
    /// Whether the view keeps the cell's physical size.
    pub fn physical(&self) -> bool {
        self.view_microns > 0.0
    }

    /// Side of the crop in input pixels, for a nucleus of `nucleus` input pixels in an image
    /// whose pixels are `microns_per_pixel` µm (the default when `None` or not a positive
    /// number).
    fn crop_side(&self, nucleus: f32, microns_per_pixel: Option<f32>) -> f32 {
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

    /// Normalises one cell image. `hint` is where the cell should be (input pixels); the image
    /// centre when `None`. `microns_per_pixel` is the image's pixel size, used by the physical
    /// scale.
    pub fn apply(&self, img: &RgbImage, hint: Option<[f32; 2]>, microns_per_pixel: Option<f32>) -> NormalisedCell {
        let (w, h) = img.dimensions();
        let scale = (WORK_SIDE as f32 / w.max(h).max(1) as f32).min(1.0);
        let work = working_copy(img, scale);
        let (ww, wh) = work.dimensions();
        let hint_w = hint
            .map(|[x, y]| [x * scale, y * scale])
            .unwrap_or([ww as f32 / 2.0, wh as f32 / 2.0]);
        let found = segment(&work, hint_w);
        let (centre, diameter, nucleus, touches, ok) = match &found {
            Some(f) => (
                [f.centre[0] / scale, f.centre[1] / scale],
                2.0 * f.radius / scale,
                2.0 * f.nucleus_radius / scale,
                f.touches_edge,
                true,
            ),
            None => {
                let side = w.min(h) as f32;
                let n = side * self.nucleus_fraction;
                ([w as f32 / 2.0, h as f32 / 2.0], n, n, false, false)
            }
        };
        let side = self.crop_side(nucleus, microns_per_pixel);
        let mut out = if self.detail_side > 0 && self.detail_side < self.output_size {
            let low = crop_square(img, centre, side, self.detail_side, None);
            let s = self.output_size;
            image::imageops::resize(&low, s, s, FilterType::Triangle)
        } else {
            crop_square(img, centre, side, self.output_size, None)
        };
        reinhard(&mut out, self.stain_mean, self.stain_std);
        if self.grey {
            let ys: Vec<u8> = out
                .pixels()
                .map(|p| (0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32).round() as u8)
                .collect();
            let map = if self.equalise {
                equalisation(&ys)
            } else {
                std::array::from_fn(|i| i as u8)
            };
            for (p, y) in out.pixels_mut().zip(ys) {
                let v = map[y as usize];
                *p = Rgb([v, v, v]);
            }
        }
        if self.mask_background && ok {
            let px = self.output_size as f32 / side;
            // Pale cytoplasm can leak into the plasma: never keep more than 1.6 × the nucleus.
            let r_cell = (diameter * self.mask_margin).clamp(nucleus * 1.2, nucleus * 1.6) / 2.0;
            let r_out = (r_cell * px).min(self.output_size as f32 / 2.0);
            let bg = from_lab([self.stain_mean[0] + 1.5 * self.stain_std[0], 0.0, 0.0]);
            mask_disc(&mut out, r_out, bg);
        }
        NormalisedCell {
            image: out,
            found: ok,
            centre,
            diameter_px: diameter,
            nucleus_px: nucleus,
            touches_edge: touches,
            microns_per_pixel: self.pixel_size(microns_per_pixel),
        }
    }
}

/// A copy of `img` reduced by `scale` (≤ 1; at least 1 × 1 pixel), for segmentation.
pub(crate) fn working_copy(img: &RgbImage, scale: f32) -> RgbImage {
    let (w, h) = img.dimensions();
    if scale >= 1.0 {
        return img.clone();
    }
    let (ww, wh) = (
        ((w as f32 * scale).round() as u32).max(1),
        ((h as f32 * scale).round() as u32).max(1),
    );
    image::imageops::resize(img, ww, wh, FilterType::Triangle)
}

/// Otsu threshold of values.
pub(crate) fn otsu(values: &[f32]) -> f32 {
    let (lo, hi) = values
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    // Also catches NaN and empty input (lo = +inf).
    if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
        return lo;
    }
    const BINS: usize = 128;
    let width = (hi - lo) / BINS as f32;
    let mut hist = [0f64; BINS];
    for &v in values {
        hist[(((v - lo) / width) as usize).min(BINS - 1)] += 1.0;
    }
    let centre = |i: usize| lo + (i as f32 + 0.5) * width;
    let total: f64 = hist.iter().sum();
    let sum_all: f64 = hist.iter().enumerate().map(|(i, &c)| c * centre(i) as f64).sum();
    let (mut w0, mut sum0, mut best, mut best_t) = (0f64, 0f64, -1f64, lo);
    for (i, &c) in hist.iter().enumerate() {
        w0 += c;
        sum0 += c * centre(i) as f64;
        let w1 = total - w0;
        if w0 == 0.0 || w1 == 0.0 {
            continue;
        }
        let between = w0 * w1 * (sum0 / w0 - (sum_all - sum0) / w1).powi(2);
        if between > best {
            best = between;
            best_t = lo + (i as f32 + 1.0) * width;
        }
    }
    best_t
}

/// The `q` quantile of values (nearest rank); `values` must not be empty.
pub(crate) fn percentile(values: &[f32], q: f32) -> f32 {
    let mut v = values.to_vec();
    v.sort_by(f32::total_cmp);
    v[((v.len() - 1) as f32 * q).round() as usize]
}

/// 8-connected components of a mask: label per pixel (0 = background) and their count.
pub(crate) fn components(mask: &[bool], w: usize, h: usize) -> (Vec<u32>, u32) {
    let mut label = vec![0u32; mask.len()];
    let mut next = 0;
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || label[start] != 0 {
            continue;
        }
        next += 1;
        label[start] = next;
        stack.push(start);
        while let Some(i) = stack.pop() {
            let (x, y) = ((i % w) as i64, (i / w) as i64);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (nx, ny) = (x + dx, y + dy);
                    if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                        continue;
                    }
                    let j = ny as usize * w + nx as usize;
                    if mask[j] && label[j] == 0 {
                        label[j] = next;
                        stack.push(j);
                    }
                }
            }
        }
    }
    (label, next)
}

/// Binary erosion by a square of radius `r` (outside the image counts as set).
pub(crate) fn erode(mask: &[bool], w: usize, h: usize, r: usize) -> Vec<bool> {
    let inverse: Vec<bool> = mask.iter().map(|m| !m).collect();
    dilate(&inverse, w, h, r).into_iter().map(|m| !m).collect()
}

/// Binary dilation by a square of radius `r`.
pub(crate) fn dilate(mask: &[bool], w: usize, h: usize, r: usize) -> Vec<bool> {
    let mut rows = vec![false; mask.len()];
    for y in 0..h {
        for x in 0..w {
            if mask[y * w + x] {
                for xx in x.saturating_sub(r)..=(x + r).min(w - 1) {
                    rows[y * w + xx] = true;
                }
            }
        }
    }
    let mut out = vec![false; mask.len()];
    for y in 0..h {
        for x in 0..w {
            if rows[y * w + x] {
                for yy in y.saturating_sub(r)..=(y + r).min(h - 1) {
                    out[yy * w + x] = true;
                }
            }
        }
    }
    out
}

/// Finds the white cell nearest `hint` in a working copy.
fn segment(work: &RgbImage, hint: [f32; 2]) -> Option<Found> {
    let (w, h) = (work.width() as usize, work.height() as usize);
    if w < 8 || h < 8 {
        return None;
    }
    let stain: Vec<f32> = work.pixels().map(|p| p[2] as f32 - p[1] as f32).collect();
    // The background level: red cells and plasma cover most of any cell picture, but a tight
    // crop may be half cell, so take a low percentile rather than the median.
    let bg = percentile(&stain, 0.3);
    let hi = otsu(&stain);
    // A stained cell stands well clear of the background; a blank or red-cell-only image
    // does not.
    if percentile(&stain, 0.99) - bg < 25.0 || hi - bg < 12.0 {
        return None;
    }
    let nucleus: Vec<bool> = stain.iter().map(|&s| s > hi).collect();
    // Close small gaps so that the lobes of one nucleus form one component.
    let joined = dilate(&nucleus, w, h, 2);
    let (label, n) = components(&joined, w, h);
    let mut stats = vec![(0f32, 0f32, 0f32); n as usize + 1]; // (area, sum x, sum y)
    for (i, &l) in label.iter().enumerate() {
        if l != 0 && nucleus[i] {
            let s = &mut stats[l as usize];
            s.0 += 1.0;
            s.1 += (i % w) as f32;
            s.2 += (i / w) as f32;
        }
    }
    let quarter = (w.min(h) as f32) / 4.0;
    let min_area = (w * h) as f32 * 0.002;
    let best = (1..=n as usize)
        .filter(|&l| stats[l].0 >= min_area)
        .map(|l| {
            let (a, sx, sy) = stats[l];
            let d = ((sx / a - hint[0]).powi(2) + (sy / a - hint[1]).powi(2)).sqrt();
            (l, a / (1.0 + d / quarter).powi(2))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))?
        .0;
    let (area, sx, sy) = stats[best];
    let nuc_c = [sx / area, sy / area];
    let nuc_r = (area / std::f32::consts::PI).sqrt();
    // Cytoplasm: a lower threshold, grown from the nucleus, bounded in radius.
    let lo = bg + 0.2 * (hi - bg);
    let max_r = 2.6 * nuc_r;
    let in_reach = |i: usize| {
        let (x, y) = ((i % w) as f32, (i / w) as f32);
        ((x - nuc_c[0]).powi(2) + (y - nuc_c[1]).powi(2)).sqrt() <= max_r
    };
    let cell_mask: Vec<bool> = (0..w * h)
        .map(|i| (stain[i] > lo && in_reach(i)) || (label[i] == best as u32 && nucleus[i]))
        .collect();
    // The cell is every region of the mask that holds part of the chosen nucleus (its lobes
    // may be separate regions, joined only through the closing above).
    let (cl, n_cl) = components(&cell_mask, w, h);
    let mut holds_nucleus = vec![false; n_cl as usize + 1];
    for i in 0..w * h {
        if label[i] == best as u32 && nucleus[i] {
            holds_nucleus[cl[i] as usize] = true;
        }
    }
    let cell: Vec<usize> = (0..w * h)
        .filter(|&i| cl[i] != 0 && holds_nucleus[cl[i] as usize])
        .collect();
    let n_cell = cell.len() as f32;
    // Centre on the nucleus: it segments reliably, whereas pale cytoplasm can leak into the
    // red cells next to it and drag a centroid away.
    let c = nuc_c;
    let dists: Vec<f32> = cell
        .iter()
        .map(|&i| (((i % w) as f32 - c[0]).powi(2) + ((i / w) as f32 - c[1]).powi(2)).sqrt())
        .collect();
    let nuc_dists: Vec<f32> = (0..w * h)
        .filter(|&i| label[i] == best as u32 && nucleus[i])
        .map(|i| (((i % w) as f32 - c[0]).powi(2) + ((i / w) as f32 - c[1]).powi(2)).sqrt())
        .collect();
    let nucleus_radius = percentile(&nuc_dists, 0.95) + 0.5;
    // The 95th percentile ignores a few stray pixels; the area bound keeps thin cells honest.
    let radius = percentile(&dists, 0.95)
        .max((n_cell / std::f32::consts::PI).sqrt())
        .max(nucleus_radius)
        + 0.5;
    let touches_edge = cell
        .iter()
        .any(|&i| i % w == 0 || i / w == 0 || i % w == w - 1 || i / w == h - 1);
    Some(Found {
        centre: c,
        radius,
        nucleus_radius,
        touches_edge,
    })
}

/// Crops a `side`-pixel square centred at `centre` and resizes it to `out` pixels. Beyond the
/// image's edges it pads with `pad`, or mirrors the image when `pad` is `None` (a mirrored smear
/// looks like a smear; a flat border would tell the model how the source framed its cells).
pub fn crop_square(img: &RgbImage, centre: [f32; 2], side: f32, out: u32, pad: Option<Rgb<u8>>) -> RgbImage {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let s = side.round().max(1.0) as i64;
    let x0 = (centre[0] - side / 2.0).round() as i64;
    let y0 = (centre[1] - side / 2.0).round() as i64;
    let mirror = |i: i64, n: i64| {
        let m = i.rem_euclid(2 * n);
        if m < n { m } else { 2 * n - 1 - m }
    };
    // Never build more than (8 · out)² pixels, however large the requested square: a huge
    // image of one stained blob must not exhaust memory. Larger squares are sampled.
    let r = s.min(8 * out.max(1) as i64);
    let step = s as f64 / r as f64;
    let sq = if w == 0 || h == 0 {
        RgbImage::from_pixel(r as u32, r as u32, pad.unwrap_or(Rgb([255, 255, 255])))
    } else {
        RgbImage::from_fn(r as u32, r as u32, |x, y| {
            let (sx, sy) = (x0 + (x as f64 * step) as i64, y0 + (y as f64 * step) as i64);
            let inside = (0..w).contains(&sx) && (0..h).contains(&sy);
            match pad {
                Some(p) if !inside => p,
                _ => *img.get_pixel(mirror(sx, w) as u32, mirror(sy, h) as u32),
            }
        })
    };
    if r as u32 == out {
        sq
    } else {
        let filter = if r as u32 > out {
            FilterType::Triangle
        } else {
            FilterType::CatmullRom
        };
        image::imageops::resize(&sq, out, out, filter)
    }
}

/// An sRGB value (0..255) in linear light.
fn linear(v: u8) -> f32 {
    let c = v as f32 / 255.0;
    if c <= 0.04045 {
        c / 12.92
    } else {
        ((c + 0.055) / 1.055).powf(2.4)
    }
}

/// [`linear`] of every 8-bit value, computed once: the same numbers without a `powf` per
/// channel of every pixel.
static LINEAR: std::sync::LazyLock<[f32; 256]> = std::sync::LazyLock::new(|| std::array::from_fn(|v| linear(v as u8)));

/// sRGB (0..255) to a Lab-like space: L in 0..100, a and b roughly −100..100.
pub fn to_lab(p: [u8; 3]) -> [f32; 3] {
    let lin = &*LINEAR;
    let [r, g, b] = p.map(|v| lin[v as usize]);
    let x = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047;
    let y = 0.2126 * r + 0.7152 * g + 0.0722 * b;
    let z = (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883;
    let f = |t: f32| {
        if t > 0.008856 {
            t.cbrt()
        } else {
            7.787 * t + 16.0 / 116.0
        }
    };
    let (fx, fy, fz) = (f(x), f(y), f(z));
    [116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)]
}

/// Inverse of [`to_lab`], clamped to sRGB.
pub fn from_lab(lab: [f32; 3]) -> Rgb<u8> {
    let fy = (lab[0] + 16.0) / 116.0;
    let fx = fy + lab[1] / 500.0;
    let fz = fy - lab[2] / 200.0;
    let inv = |t: f32| {
        if t.powi(3) > 0.008856 {
            t.powi(3)
        } else {
            (t - 16.0 / 116.0) / 7.787
        }
    };
    let (x, y, z) = (inv(fx) * 0.95047, inv(fy), inv(fz) * 1.08883);
    let r = 3.2406 * x - 1.5372 * y - 0.4986 * z;
    let g = -0.9689 * x + 1.8758 * y + 0.0415 * z;
    let b = 0.0557 * x - 0.2040 * y + 1.0570 * z;
    let enc = |c: f32| {
        let c = c.clamp(0.0, 1.0);
        let v = if c <= 0.0031308 {
            12.92 * c
        } else {
            1.055 * c.powf(1.0 / 2.4) - 0.055
        };
        (v * 255.0).round() as u8
    };
    Rgb([enc(r), enc(g), enc(b)])
}

/// Reinhard stain normalisation: shifts and scales each Lab channel of the image to the target
/// mean and standard deviation.
///
/// The per-pixel conversions run on all cores (they were more than half of a cell's
/// preprocessing on one); the statistics are summed in pixel order as before.
pub fn reinhard(img: &mut RgbImage, mean: [f32; 3], std: [f32; 3]) {
    use rayon::prelude::*;
    // The image's pixels only (its buffer may be longer).
    let len = 3 * img.width() as usize * img.height() as usize;
    let labs: Vec<[f32; 3]> = (**img)[..len]
        .par_chunks(3 * PIXELS_PER_TASK)
        .flat_map_iter(|c| c.chunks_exact(3).map(|p| to_lab([p[0], p[1], p[2]])))
        .collect();
    if labs.is_empty() {
        return;
    }
    let n = labs.len() as f32;
    let mut m = [0f32; 3];
    for l in &labs {
        for c in 0..3 {
            m[c] += l[c] / n;
        }
    }
    let mut s = [0f32; 3];
    for l in &labs {
        for c in 0..3 {
            s[c] += (l[c] - m[c]).powi(2) / n;
        }
    }
    let gain = std::array::from_fn::<f32, 3, _>(|c| std[c] / s[c].sqrt().max(1.0));
    (**img)[..len]
        .par_chunks_mut(3 * PIXELS_PER_TASK)
        .zip(labs.par_chunks(PIXELS_PER_TASK))
        .for_each(|(px, ls)| {
            for (p, l) in px.chunks_exact_mut(3).zip(ls) {
                p.copy_from_slice(&from_lab(std::array::from_fn(|c| (l[c] - m[c]) * gain[c] + mean[c])).0);
            }
        });
}

/// Pixels per parallel task of [`reinhard`]: a 224-px view is a dozen tasks.
const PIXELS_PER_TASK: usize = 4096;

/// Histogram-equalisation lookup table of grey values.
fn equalisation(values: &[u8]) -> [u8; 256] {
    let mut hist = [0usize; 256];
    for &v in values {
        hist[v as usize] += 1;
    }
    let n = values.len().max(1) as f32;
    let mut cum = 0usize;
    std::array::from_fn(|i| {
        cum += hist[i];
        // Centre of the value's rank range, so a flat image stays mid-grey.
        (((cum as f32 - hist[i] as f32 / 2.0) / n) * 255.0).round() as u8
    })
}

/// Keeps a centred disc of radius `r` (with a 3-pixel feather) and paints the rest `bg`.
fn mask_disc(img: &mut RgbImage, r: f32, bg: Rgb<u8>) {
    let c = img.width() as f32 / 2.0;
    for (x, y, p) in img.enumerate_pixels_mut() {
        let d = ((x as f32 + 0.5 - c).powi(2) + (y as f32 + 0.5 - c).powi(2)).sqrt();
        let keep = ((r - d) / 3.0 + 0.5).clamp(0.0, 1.0);
        if keep < 1.0 {
            for ch in 0..3 {
                p[ch] = (p[ch] as f32 * keep + bg[ch] as f32 * (1.0 - keep)).round() as u8;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A synthetic smear: pink plasma, red cells of diameter `rbc` on a grid, one violet
    /// cell of diameter `wbc` with a darker nucleus at `(cx, cy)`.
    pub(crate) fn smear(w: u32, h: u32, cx: f32, cy: f32, wbc: f32, rbc: f32) -> RgbImage {
        let mut img = RgbImage::from_pixel(w, h, Rgb([235, 215, 205]));
        let step = rbc * 1.15;
        let mut y = rbc / 2.0;
        while y < h as f32 {
            let mut x = rbc / 2.0;
            while x < w as f32 {
                if ((x - cx).powi(2) + (y - cy).powi(2)).sqrt() > wbc / 2.0 + rbc / 2.0 {
                    for (px, py, p) in img.enumerate_pixels_mut() {
                        if ((px as f32 - x).powi(2) + (py as f32 - y).powi(2)).sqrt() < rbc / 2.0 {
                            *p = Rgb([215, 150, 140]);
                        }
                    }
                }
                x += step;
            }
            y += step;
        }
        for (px, py, p) in img.enumerate_pixels_mut() {
            let d = ((px as f32 - cx).powi(2) + (py as f32 - cy).powi(2)).sqrt();
            if d < wbc * 0.3 {
                *p = Rgb([90, 50, 150]);
            } else if d < wbc / 2.0 {
                *p = Rgb([215, 200, 210]);
            }
        }
        img
    }

    #[test]
    fn finds_the_cell_and_measures_it() {
        let img = smear(240, 200, 130.0, 90.0, 48.0, 24.0);
        let n = CellNorm::default().apply(&img, None, None);
        assert!(n.found);
        assert!(
            (n.centre[0] - 130.0).abs() < 3.0 && (n.centre[1] - 90.0).abs() < 3.0,
            "{:?}",
            n.centre
        );
        assert!((n.diameter_px - 48.0).abs() < 5.0, "diameter {}", n.diameter_px);
        // The synthetic nucleus is 0.6 of the cell.
        assert!((n.nucleus_px - 0.6 * 48.0).abs() < 4.0, "nucleus {}", n.nucleus_px);
        assert!(!n.touches_edge);
        assert_eq!(n.image.dimensions(), (224, 224));
    }

    #[test]
    fn the_same_cell_at_two_magnifications_gives_the_same_view() {
        let norm = CellNorm::default();
        let small = norm.apply(&smear(200, 200, 100.0, 100.0, 40.0, 20.0), None, None);
        let large = norm.apply(&smear(400, 400, 200.0, 200.0, 80.0, 40.0), None, None);
        assert!((2.0 * small.diameter_px - large.diameter_px).abs() < 6.0);
        // Compare the two views pixel by pixel: mean absolute difference small.
        let diff: f64 = small
            .image
            .pixels()
            .zip(large.image.pixels())
            .map(|(p, q)| (0..3).map(|c| (p[c] as f64 - q[c] as f64).abs()).sum::<f64>())
            .sum::<f64>()
            / (224.0 * 224.0 * 3.0);
        assert!(diff < 12.0, "views differ by {diff} per channel");
    }

    #[test]
    fn the_pixel_size_is_the_given_one_else_the_reference_else_unknown() {
        let with_reference = physical();
        assert_eq!(with_reference.pixel_size(Some(0.1)), Some(0.1));
        for bad in [None, Some(0.0), Some(-1.0), Some(f32::NAN), Some(f32::INFINITY)] {
            assert_eq!(with_reference.pixel_size(bad), Some(0.25), "{bad:?}");
        }
        let relative = CellNorm::default();
        assert_eq!(relative.pixel_size(None), None);
        assert_eq!(relative.pixel_size(Some(0.117)), Some(0.117));
        // The normalised cell carries the size it was measured at.
        let img = RgbImage::from_pixel(64, 64, Rgb([230, 220, 220]));
        assert_eq!(relative.apply(&img, None, Some(0.117)).microns_per_pixel, Some(0.117));
        assert_eq!(relative.apply(&img, None, None).microns_per_pixel, None);
    }

    /// A colour view at the physical scale: 30 µm of smear.
    fn physical() -> CellNorm {
        CellNorm {
            view_microns: 30.0,
            default_microns_per_pixel: 0.25,
            grey: false,
            ..Default::default()
        }
    }

    /// Nucleus extent measured in a view, in view pixels.
    fn nucleus_in_view(view: &RgbImage) -> f32 {
        let colour = CellNorm {
            grey: false,
            ..Default::default()
        };
        let n = colour.apply(view, None, None);
        assert!(n.found);
        n.nucleus_px
    }

    #[test]
    fn the_physical_scale_keeps_the_cells_size() {
        let norm = physical();
        // A 16 µm and an 8 µm cell at 0.2 µm per pixel.
        let big = norm.apply(&smear(300, 300, 150.0, 150.0, 80.0, 37.0), None, Some(0.2));
        let small = norm.apply(&smear(300, 300, 150.0, 150.0, 40.0, 37.0), None, Some(0.2));
        let (b, s) = (nucleus_in_view(&big.image), nucleus_in_view(&small.image));
        assert!((b / s - 2.0).abs() < 0.25, "nuclei of {b} and {s} view pixels");
        // 0.6 × 16 µm nucleus in a 30 µm view of 224 px.
        let expected = 0.6 * 16.0 / 30.0 * 224.0;
        assert!((b - expected).abs() < 0.1 * expected, "{b} vs {expected}");
    }

    #[test]
    fn the_physical_scale_gives_one_view_at_any_magnification_given_the_pixel_size() {
        let norm = physical();
        let coarse = norm.apply(&smear(200, 200, 100.0, 100.0, 60.0, 28.0), None, Some(0.2));
        let fine = norm.apply(&smear(400, 400, 200.0, 200.0, 120.0, 56.0), None, Some(0.1));
        let (c, f) = (nucleus_in_view(&coarse.image), nucleus_in_view(&fine.image));
        assert!((c - f).abs() < 0.08 * f, "nuclei of {c} and {f} view pixels");
        // Without the pixel size, the default applies; a nonsensical one is ignored too.
        let default = norm.apply(&smear(200, 200, 100.0, 100.0, 48.0, 30.0), None, None);
        let nan = norm.apply(&smear(200, 200, 100.0, 100.0, 48.0, 30.0), None, Some(f32::NAN));
        assert_eq!(default.image, nan.image);
        let expected = 0.6 * 48.0 * 0.25 / 30.0 * 224.0;
        let d = nucleus_in_view(&default.image);
        assert!((d - expected).abs() < 0.1 * expected, "{d} vs {expected}");
    }

    #[test]
    fn the_hint_picks_the_cell_and_an_off_centre_cell_is_centred() {
        let img = smear(300, 200, 220.0, 100.0, 50.0, 22.0);
        let colour = CellNorm {
            grey: false,
            ..Default::default()
        };
        let n = colour.apply(&img, Some([210.0, 110.0]), None);
        assert!((n.centre[0] - 220.0).abs() < 4.0, "{:?}", n.centre);
        // The output's centre is the violet nucleus.
        let p = n.image.get_pixel(112, 112);
        assert!(p[2] > p[1], "centre pixel {p:?} is not stained");
    }

    #[test]
    fn blank_or_red_only_images_are_reported_as_not_found() {
        let blank = RgbImage::from_pixel(100, 80, Rgb([240, 240, 240]));
        let n = CellNorm::default().apply(&blank, None, None);
        assert!(!n.found);
        assert_eq!(n.image.dimensions(), (224, 224));
        let mut red = smear(120, 120, -100.0, -100.0, 10.0, 20.0);
        let n = CellNorm::default().apply(&red, None, None);
        assert!(!n.found, "red cells alone are no white cell");
        // Tiny and degenerate inputs do not panic.
        red = RgbImage::new(1, 1);
        assert!(!CellNorm::default().apply(&red, None, None).found);
    }

    #[test]
    fn a_cell_cut_by_the_edge_is_flagged() {
        let img = smear(200, 200, 10.0, 100.0, 60.0, 20.0);
        let n = CellNorm::default().apply(&img, Some([10.0, 100.0]), None);
        assert!(n.found && n.touches_edge);
    }

    #[test]
    fn reinhard_maps_every_pixel_by_its_own_colour_whichever_task_holds_it() {
        // Over three parallel tasks' worth of pixels, each a different colour.
        let img = RgbImage::from_fn(150, 100, |x, y| {
            Rgb([(x * 7 % 256) as u8, (y * 11 % 256) as u8, ((x + y) % 256) as u8])
        });
        assert!((img.width() * img.height()) as usize > 3 * PIXELS_PER_TASK);
        let (mean, std) = ([60.0, 10.0, -5.0], [15.0, 8.0, 8.0]);
        let mut out = img.clone();
        reinhard(&mut out, mean, std);
        // The same statistics, summed one pixel at a time, and each pixel mapped alone.
        let labs: Vec<[f32; 3]> = img.pixels().map(|p| to_lab(p.0)).collect();
        let n = labs.len() as f32;
        let mut m = [0f32; 3];
        labs.iter().for_each(|l| (0..3).for_each(|c| m[c] += l[c] / n));
        let mut v = [0f32; 3];
        labs.iter()
            .for_each(|l| (0..3).for_each(|c| v[c] += (l[c] - m[c]).powi(2) / n));
        for (i, (p, l)) in out.pixels().zip(&labs).enumerate() {
            let want = from_lab(std::array::from_fn(|c| {
                (l[c] - m[c]) * (std[c] / v[c].sqrt().max(1.0)) + mean[c]
            }));
            assert_eq!(*p, want, "pixel {i}");
        }
    }

    #[test]
    fn reinhard_hits_the_target_statistics_and_lab_round_trips() {
        for p in [[10u8, 200, 30], [255, 255, 255], [90, 50, 150], [0, 0, 0]] {
            let q = from_lab(to_lab(p));
            for c in 0..3 {
                assert!((p[c] as i32 - q[c] as i32).abs() <= 1, "{p:?} -> {q:?}");
            }
        }
        let mut img = smear(120, 120, 60.0, 60.0, 40.0, 20.0);
        let (mean, std) = ([60.0, 10.0, -5.0], [15.0, 8.0, 8.0]);
        reinhard(&mut img, mean, std);
        let labs: Vec<[f32; 3]> = img.pixels().map(|p| to_lab(p.0)).collect();
        let n = labs.len() as f32;
        for c in 0..3 {
            let m = labs.iter().map(|l| l[c]).sum::<f32>() / n;
            let s = (labs.iter().map(|l| (l[c] - m).powi(2)).sum::<f32>() / n).sqrt();
            assert!((m - mean[c]).abs() < 1.5, "channel {c} mean {m}");
            assert!((s - std[c]).abs() < 1.5, "channel {c} std {s}");
        }
    }
}

#[cfg(test)]
mod crop_tests {
    use super::*;

    #[test]
    fn crops_pad_or_mirror_beyond_the_edges() {
        let img = RgbImage::from_fn(10, 10, |x, _| Rgb([x as u8 * 20, 0, 0]));
        let padded = crop_square(&img, [0.0, 5.0], 10.0, 10, Some(Rgb([1, 2, 3])));
        assert_eq!(padded.get_pixel(0, 5), &Rgb([1, 2, 3]));
        assert_eq!(padded.get_pixel(5, 5), &Rgb([0, 0, 0]), "image column 0");
        let mirrored = crop_square(&img, [0.0, 5.0], 10.0, 10, None);
        assert_eq!(mirrored.get_pixel(4, 5), &Rgb([0, 0, 0]), "column -1 mirrors column 0");
        assert_eq!(mirrored.get_pixel(0, 5), &Rgb([80, 0, 0]), "column -5 mirrors column 4");
        // Far outside, and a huge side, still work (and stay small in memory).
        assert_eq!(crop_square(&img, [500.0, -300.0], 40.0, 8, None).dimensions(), (8, 8));
        assert_eq!(crop_square(&img, [5.0, 5.0], 1.0e6, 8, None).dimensions(), (8, 8));
        // A huge image that is one stained blob normalises without building a huge square.
        let blob = RgbImage::from_pixel(3000, 3000, Rgb([90, 50, 150]));
        let n = CellNorm::default().apply(&blob, None, None);
        assert_eq!(n.image.dimensions(), (224, 224));
    }
}

#[cfg(test)]
mod option_tests {
    use super::tests::smear;
    use super::*;

    #[test]
    fn masking_paints_the_surroundings_and_keeping_shows_them() {
        let img = smear(240, 240, 120.0, 120.0, 50.0, 24.0);
        let masked = CellNorm {
            mask_background: true,
            ..Default::default()
        }
        .apply(&img, None, None);
        let kept = CellNorm::default().apply(&img, None, None);
        let bg = masked.image.get_pixel(0, 0);
        assert!(masked.image.get_pixel(223, 223) == bg && masked.image.get_pixel(0, 223) == bg);
        // With the surroundings kept the corners differ (red cells and plasma).
        let k: Vec<_> = [(0, 0), (223, 0), (0, 223), (223, 223), (112, 0)]
            .iter()
            .map(|&(x, y)| *kept.image.get_pixel(x, y))
            .collect();
        assert!(k.iter().any(|p| p != &k[0]), "{k:?}");
    }

    #[test]
    fn equalised_grey_views_have_a_flat_histogram_whatever_the_exposure() {
        let img = smear(240, 240, 120.0, 120.0, 50.0, 24.0);
        let mut dim = img.clone();
        for p in dim.pixels_mut() {
            p.0 = p.0.map(|v| (v as f32 * 0.6) as u8);
        }
        let norm = CellNorm {
            grey: true,
            equalise: true,
            ..Default::default()
        };
        let (a, b) = (norm.apply(&img, None, None), norm.apply(&dim, None, None));
        let p = a.image.get_pixel(100, 60);
        assert!(p[0] == p[1] && p[1] == p[2], "grey view");
        let mean = |n: &NormalisedCell| n.image.pixels().map(|p| p[0] as f64).sum::<f64>() / (224.0 * 224.0);
        assert!((mean(&a) - 127.5).abs() < 12.0 && (mean(&a) - mean(&b)).abs() < 6.0);
        assert_eq!(equalisation(&[7; 10])[7], 128, "a flat image stays mid-grey");
    }

    #[test]
    fn resolution_normalisation_removes_fine_detail_only() {
        let img = smear(240, 240, 120.0, 120.0, 50.0, 24.0);
        let full = CellNorm {
            detail_side: 0,
            grey: false,
            ..Default::default()
        }
        .apply(&img, None, None);
        let low = CellNorm {
            detail_side: 56,
            grey: false,
            ..Default::default()
        }
        .apply(&img, None, None);
        assert_eq!(low.image.dimensions(), full.image.dimensions());
        // Edges get softer: the summed absolute horizontal gradient drops.
        let grad = |i: &RgbImage| -> f64 {
            i.enumerate_pixels()
                .filter(|(x, _, _)| *x + 1 < i.width())
                .map(|(x, y, p)| (p[1] as f64 - i.get_pixel(x + 1, y)[1] as f64).abs())
                .sum()
        };
        assert!(grad(&low.image) < 0.9 * grad(&full.image));
        // The centre is still the stained nucleus.
        let c = low.image.get_pixel(112, 112);
        assert!(c[2] > c[1], "{c:?}");
    }
}
