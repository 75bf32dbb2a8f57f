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
//!
//! Layout: `segment.rs` finds and measures the cell (and holds the mask and threshold helpers
//! that the field finder shares), `colour.rs` converts to Lab and normalises the stain, and
//! this file turns their results into the model's view (crop, stain, grey, mask).

use image::imageops::FilterType;
use image::{Rgb, RgbImage};
pub use wbc_protocol::preprocess::CellNorm;

use colour::equalisation;
pub use colour::{from_lab, reinhard, to_lab};
pub(crate) use segment::{components, dilate, erode, otsu, percentile, working_copy};

mod border;
mod colour;
mod segment;

pub use border::content_rect;

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
    /// Whether the dark-nucleus rule changed what was taken as the nucleus (the view differs
    /// from the one without the rule only then).
    pub dark_split: bool,
    /// Whether the cell reaches a black bar that pads the picture: it lay at its field's edge
    /// and is cut there (what field mode reports as `edge_cut`).
    pub cut_by_border: bool,
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

/// How a [`CellNorm`] runs on pixels (the settings live in `wbc_protocol`, which carries no
/// image code; bring this trait into scope to call [`Normalise::apply`]).
pub trait Normalise {
    /// Normalises one cell image. `hint` is where the cell should be (input pixels); the image
    /// centre when `None`. `microns_per_pixel` is the image's pixel size, used by the physical
    /// scale.
    fn apply(&self, img: &RgbImage, hint: Option<[f32; 2]>, microns_per_pixel: Option<f32>) -> NormalisedCell;
}

impl Normalise for CellNorm {
    fn apply(&self, img: &RgbImage, hint: Option<[f32; 2]>, microns_per_pixel: Option<f32>) -> NormalisedCell {
        // Black bars padding the picture are not slide: work inside them (`border.rs`).
        let [x0, y0, cw, ch] = content_rect(img);
        if (cw, ch) == img.dimensions() {
            return normalise(self, img, hint, microns_per_pixel);
        }
        let inner = image::imageops::crop_imm(img, x0, y0, cw, ch).to_image();
        let (dx, dy) = (x0 as f32, y0 as f32);
        // The cell is where it was framed: the whole picture's centre, not the content's.
        let [hx, hy] = hint.unwrap_or([img.width() as f32 / 2.0, img.height() as f32 / 2.0]);
        let hint = [(hx - dx).clamp(0.0, cw as f32), (hy - dy).clamp(0.0, ch as f32)];
        let mut n = normalise(self, &inner, Some(hint), microns_per_pixel);
        // The cell's box against the sides that had a bar (within a pixel).
        let [bx0, by0, bx1, by1] = n.bbox();
        let (w, h) = img.dimensions();
        n.cut_by_border = n.found
            && ((x0 > 0 && bx0 <= 1.0)
                || (y0 > 0 && by0 <= 1.0)
                || (x0 + cw < w && bx1 >= cw as f32 - 1.0)
                || (y0 + ch < h && by1 >= ch as f32 - 1.0));
        n.centre = [n.centre[0] + dx, n.centre[1] + dy];
        n
    }
}

/// [`Normalise::apply`] on a picture without bars.
fn normalise(
    norm: &CellNorm,
    img: &RgbImage,
    hint: Option<[f32; 2]>,
    microns_per_pixel: Option<f32>,
) -> NormalisedCell {
    let (w, h) = img.dimensions();
    let scale = (WORK_SIDE as f32 / w.max(h).max(1) as f32).min(1.0);
    let work = working_copy(img, scale);
    let (ww, wh) = work.dimensions();
    let hint_w = hint
        .map(|[x, y]| [x * scale, y * scale])
        .unwrap_or([ww as f32 / 2.0, wh as f32 / 2.0]);
    let found = segment::segment(&work, hint_w, norm.dark_nucleus);
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
            let n = side * norm.nucleus_fraction;
            ([w as f32 / 2.0, h as f32 / 2.0], n, n, false, false)
        }
    };
    let side = norm.crop_side(nucleus, microns_per_pixel);
    let mut out = if norm.detail_side > 0 && norm.detail_side < norm.output_size {
        let low = crop_square(img, centre, side, norm.detail_side, None);
        let s = norm.output_size;
        image::imageops::resize(&low, s, s, FilterType::Triangle)
    } else {
        crop_square(img, centre, side, norm.output_size, None)
    };
    reinhard(&mut out, norm.stain_mean, norm.stain_std);
    if norm.grey {
        let ys: Vec<u8> = out
            .pixels()
            .map(|p| (0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32).round() as u8)
            .collect();
        let map = if norm.equalise {
            equalisation(&ys)
        } else {
            std::array::from_fn(|i| i as u8)
        };
        for (p, y) in out.pixels_mut().zip(ys) {
            let v = map[y as usize];
            *p = Rgb([v, v, v]);
        }
    }
    if norm.mask_background && ok {
        let px = norm.output_size as f32 / side;
        // Pale cytoplasm can leak into the plasma: never keep more than 1.6 × the nucleus.
        let r_cell = (diameter * norm.mask_margin).clamp(nucleus * 1.2, nucleus * 1.6) / 2.0;
        let r_out = (r_cell * px).min(norm.output_size as f32 / 2.0);
        let bg = from_lab([norm.stain_mean[0] + 1.5 * norm.stain_std[0], 0.0, 0.0]);
        mask_disc(&mut out, r_out, bg);
    }
    NormalisedCell {
        image: out,
        found: ok,
        centre,
        diameter_px: diameter,
        nucleus_px: nucleus,
        touches_edge: touches,
        microns_per_pixel: norm.pixel_size(microns_per_pixel),
        dark_split: found.as_ref().is_some_and(|f| f.dark_split),
        cut_by_border: false,
    }
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
    let pixel = |x: u32, y: u32| {
        let (sx, sy) = (x0 + (x as f64 * step) as i64, y0 + (y as f64 * step) as i64);
        let inside = (0..w).contains(&sx) && (0..h).contains(&sy);
        match pad {
            Some(p) if !inside => p,
            _ => *img.get_pixel(mirror(sx, w) as u32, mirror(sy, h) as u32),
        }
    };
    let sq = if w == 0 || h == 0 {
        RgbImage::from_pixel(r as u32, r as u32, pad.unwrap_or(Rgb([255, 255, 255])))
    } else if r == s {
        // One source pixel per pixel (the usual case): the part of each row inside the image
        // is copied as a slice, the rest mirrored or padded pixel by pixel, as below.
        let mut sq = RgbImage::new(r as u32, r as u32);
        let (lo, hi) = ((-x0).clamp(0, r), (w - x0).clamp(0, r));
        let row_bytes = 3 * r as usize;
        for (y, row) in sq.chunks_exact_mut(row_bytes).enumerate() {
            let sy = y0 + y as i64;
            for x in (0..lo).chain(hi.max(lo)..r) {
                row[3 * x as usize..][..3].copy_from_slice(&pixel(x as u32, y as u32).0);
            }
            if lo < hi {
                if (0..h).contains(&sy) {
                    let src =
                        &img.as_raw()[(sy as usize * w as usize + (x0 + lo) as usize) * 3..][..3 * (hi - lo) as usize];
                    row[3 * lo as usize..3 * hi as usize].copy_from_slice(src);
                } else {
                    for x in lo..hi {
                        row[3 * x as usize..][..3].copy_from_slice(&pixel(x as u32, y as u32).0);
                    }
                }
            }
        }
        sq
    } else {
        RgbImage::from_fn(r as u32, r as u32, pixel)
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
pub(crate) mod tests;

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
    }

    #[test]
    fn a_square_copied_row_by_row_is_the_square_built_pixel_by_pixel() {
        // Squares inside the image, across each edge and corner, larger than the image on
        // every side, wholly outside it; mirrored and padded. `out` = the side, so the square
        // comes back as built (no resize).
        let img = RgbImage::from_fn(23, 17, |x, y| Rgb([(x * 11) as u8, (y * 13) as u8, (x * y) as u8]));
        let (w, h) = (23i64, 17i64);
        let mirror = |i: i64, n: i64| {
            let m = i.rem_euclid(2 * n);
            if m < n { m } else { 2 * n - 1 - m }
        };
        for (cx, cy, side) in [
            (11.5f32, 8.5f32, 9.0f32),
            (0.0, 0.0, 12.0),
            (22.0, 16.0, 8.0),
            (11.0, 8.0, 60.0),
            (-40.0, 3.0, 10.0),
            (5.0, 90.0, 14.0),
            (23.0, 8.0, 7.0),
        ] {
            for pad in [None, Some(Rgb([7, 8, 9]))] {
                let s = side.round() as i64;
                let got = crop_square(&img, [cx, cy], side, s as u32, pad);
                let (x0, y0) = ((cx - side / 2.0).round() as i64, (cy - side / 2.0).round() as i64);
                for (x, y, p) in got.enumerate_pixels() {
                    let (sx, sy) = (x0 + x as i64, y0 + y as i64);
                    let inside = (0..w).contains(&sx) && (0..h).contains(&sy);
                    let want = match pad {
                        Some(p) if !inside => p,
                        _ => *img.get_pixel(mirror(sx, w) as u32, mirror(sy, h) as u32),
                    };
                    assert_eq!(
                        *p, want,
                        "centre ({cx}, {cy}), side {side}, pad {pad:?}: pixel ({x}, {y})"
                    );
                }
            }
        }
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
