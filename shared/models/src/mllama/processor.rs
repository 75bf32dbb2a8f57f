//! The image processor of Llama 3.2 Vision, as transformers' `MllamaImageProcessor` does it:
//! choose the tile canvas (up to `max_tiles` tiles of `tile × tile`) that needs the least
//! upscaling, or else the least downscaling; resize keeping the aspect ratio (bilinear, with
//! antialiasing when shrinking, in torch's fixed point, rounded to 8 bits per pass);
//! pad with black at the bottom and right; split into tiles (row by row); scale to [0, 1] and
//! normalise; pad to `max_tiles` tiles with zeros. The aspect-ratio id is the layout's index in
//! the supported layouts plus one; the mask marks the real tiles.

use image::RgbImage;

/// Preprocessing settings (`preprocessor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    /// Side of a tile, pixels.
    pub tile: usize,
    /// Tiles per image, at most.
    pub max_tiles: usize,
    /// Per-channel mean (after scaling to [0, 1]).
    pub mean: [f32; 3],
    /// Per-channel standard deviation.
    pub std: [f32; 3],
}

/// One processed image.
#[derive(Debug, Clone, PartialEq)]
pub struct Processed {
    /// `[max_tiles, 3, tile, tile]`, padding tiles zero.
    pub pixel_values: Vec<f32>,
    /// Index of the tile layout in [`supported_aspect_ratios`] plus one.
    pub aspect_ratio_id: usize,
    /// `[max_tiles]`: 1 for the image's tiles.
    pub aspect_ratio_mask: Vec<f32>,
    /// Tile rows and columns.
    pub layout: (usize, usize),
}

/// The tile layouts for `max_tiles`, in transformers' order: `(a, b)` for `a` then `b` from 1,
/// `a·b ≤ max_tiles`. The canvas of `(a, b)` is `a` tiles high and `b` wide.
pub fn supported_aspect_ratios(max_tiles: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for a in 1..=max_tiles {
        for b in 1..=max_tiles {
            if a * b <= max_tiles {
                out.push((a, b));
            }
        }
    }
    out
}

impl ImageProcessor {
    /// The published preprocessing of Llama 3.2 11B Vision (Instruct): 560-px tiles, 4 tiles,
    /// CLIP mean and standard deviation.
    pub fn llama_3_2_vision() -> Self {
        ImageProcessor {
            tile: 560,
            max_tiles: 4,
            mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
        }
    }

    /// `(height, width)` of the canvas for an image of `h × w` (`get_optimal_tiled_canvas`).
    pub fn optimal_canvas(&self, h: usize, w: usize) -> (usize, usize) {
        let canvases: Vec<(usize, usize)> = supported_aspect_ratios(self.max_tiles)
            .into_iter()
            .map(|(a, b)| (a * self.tile, b * self.tile))
            .collect();
        let scales: Vec<f64> = canvases
            .iter()
            .map(|&(ch, cw)| {
                let (sh, sw) = (ch as f64 / h as f64, cw as f64 / w as f64);
                if sw > sh { sh } else { sw }
            })
            .collect();
        let up = scales
            .iter()
            .copied()
            .filter(|&s| s >= 1.0)
            .fold(f64::INFINITY, f64::min);
        let selected = if up.is_finite() {
            up
        } else {
            scales
                .iter()
                .copied()
                .filter(|&s| s < 1.0)
                .fold(f64::NEG_INFINITY, f64::max)
        };
        canvases
            .iter()
            .zip(&scales)
            .filter(|(_, s)| **s == selected)
            .map(|(c, _)| *c)
            .min_by_key(|(ch, cw)| ch * cw)
            .expect("one canvas has the selected scale")
    }

    /// The processed image.
    pub fn process(&self, img: &RgbImage) -> Processed {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let (ch, cw) = self.optimal_canvas(h, w);
        let (nh, nw) = fit_to_canvas(h, w, ch, cw, self.tile);
        let resized = resize_bilinear_aa(img, nw, nh);
        let layout = (ch / self.tile, cw / self.tile);
        let t = self.tile;
        let mut pixel_values = vec![0f32; self.max_tiles * 3 * t * t];
        for ty in 0..layout.0 {
            for tx in 0..layout.1 {
                let k = ty * layout.1 + tx;
                for c in 0..3 {
                    for y in 0..t {
                        for x in 0..t {
                            let (px, py) = (tx * t + x, ty * t + y);
                            let v = if px < nw && py < nh {
                                f32::from(resized.get_pixel(px as u32, py as u32)[c])
                            } else {
                                0.0
                            };
                            pixel_values[((k * 3 + c) * t + y) * t + x] =
                                (v * (1.0 / 255.0) - self.mean[c]) / self.std[c];
                        }
                    }
                }
            }
        }
        let n = layout.0 * layout.1;
        let aspect_ratio_id = supported_aspect_ratios(self.max_tiles)
            .iter()
            .position(|&l| l == layout)
            .expect("the layout is a supported one")
            + 1;
        Processed {
            pixel_values,
            aspect_ratio_id,
            aspect_ratio_mask: (0..self.max_tiles)
                .map(|i| if i < n.max(1) { 1.0 } else { 0.0 })
                .collect(),
            layout,
        }
    }
}

/// `get_image_size_fit_to_canvas`: the size `(height, width)` that fits the canvas keeping the
/// aspect ratio, never below one tile.
fn fit_to_canvas(h: usize, w: usize, ch: usize, cw: usize, tile: usize) -> (usize, usize) {
    let tw = w.clamp(tile, cw);
    let th = h.clamp(tile, ch);
    let sh = th as f64 / h as f64;
    let sw = tw as f64 / w as f64;
    if sw < sh {
        (((h as f64 * sw).floor() as usize).max(1).min(th), tw)
    } else {
        (th, ((w as f64 * sh).floor() as usize).max(1).min(tw))
    }
}

/// Fixed-point weights of the antialiased bilinear (triangle) filter for resizing `input`
/// samples to `output`, as torch's 8-bit `_upsample_bilinear2d_aa` computes them (like PIL): for
/// each output sample, the first input index and the weights in units of `2^-precision`.
struct AaWeights {
    taps: Vec<(usize, Vec<i32>)>,
    precision: u32,
}

fn aa_weights(input: usize, output: usize) -> AaWeights {
    let scale = input as f64 / output as f64;
    let support = if scale >= 1.0 { scale } else { 1.0 };
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let float: Vec<(usize, Vec<f64>)> = (0..output)
        .map(|i| {
            let center = scale * (i as f64 + 0.5);
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(input as i64) as usize;
            let mut w: Vec<f64> = (0..xmax.saturating_sub(xmin))
                .map(|j| {
                    let x = ((j as f64 + xmin as f64 - center + 0.5) * invscale).abs();
                    if x < 1.0 { 1.0 - x } else { 0.0 }
                })
                .collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                w.iter_mut().for_each(|v| *v /= total);
            }
            (xmin, w)
        })
        .collect();
    // The most bits that keep the largest weight within an i16.
    let w_max = float.iter().flat_map(|(_, w)| w.iter().copied()).fold(0f64, f64::max);
    let mut precision = 0u32;
    while precision < 22 {
        let next = (0.5 + w_max * f64::from(1u32 << (precision + 1))) as i64;
        if next >= 1 << 15 {
            break;
        }
        precision += 1;
    }
    let unit = f64::from(1u32 << precision);
    let taps = float
        .into_iter()
        .map(|(x0, w)| {
            let w = w
                .into_iter()
                .map(|v| {
                    if v < 0.0 {
                        (-0.5 + v * unit) as i32
                    } else {
                        (0.5 + v * unit) as i32
                    }
                })
                .collect();
            (x0, w)
        })
        .collect();
    AaWeights { taps, precision }
}

/// One pass of the separable resize along one axis, in fixed point.
fn aa_pass(
    read: impl Fn(usize, usize, usize) -> u8,
    outer: usize,
    weights: &AaWeights,
    mut write: impl FnMut(usize, usize, usize, u8),
) {
    let half = 1i64 << (weights.precision.max(1) - 1);
    for o in 0..outer {
        for (i, (x0, w)) in weights.taps.iter().enumerate() {
            for c in 0..3 {
                let mut acc = if weights.precision == 0 { 0 } else { half };
                for (k, wk) in w.iter().enumerate() {
                    acc += i64::from(read(o, x0 + k, c)) * i64::from(*wk);
                }
                write(o, i, c, (acc >> weights.precision).clamp(0, 255) as u8);
            }
        }
    }
}

/// Antialiased bilinear resize of an 8-bit image, horizontal pass then vertical, each in fixed
/// point and rounded to 8 bits (torch's `_upsample_bilinear2d_aa` on `uint8`, like PIL).
pub fn resize_bilinear_aa(img: &RgbImage, new_w: usize, new_h: usize) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let horizontal = if new_w != w {
        let mut out = RgbImage::new(new_w as u32, h as u32);
        aa_pass(
            |y, x, c| img.get_pixel(x as u32, y as u32)[c],
            h,
            &aa_weights(w, new_w),
            |y, x, c, v| out.get_pixel_mut(x as u32, y as u32)[c] = v,
        );
        out
    } else {
        img.clone()
    };
    if new_h == h {
        return horizontal;
    }
    let mut out = RgbImage::new(new_w as u32, new_h as u32);
    aa_pass(
        |x, y, c| horizontal.get_pixel(x as u32, y as u32)[c],
        new_w,
        &aa_weights(h, new_h),
        |x, y, c, v| out.get_pixel_mut(x as u32, y as u32)[c] = v,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_and_canvases_follow_transformers() {
        assert_eq!(
            supported_aspect_ratios(4),
            vec![(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]
        );
        let p = ImageProcessor::llama_3_2_vision();
        // A square photo bigger than a tile: 2×2 tiles (least downscaling, then least area).
        assert_eq!(p.optimal_canvas(1000, 1000), (1120, 1120));
        // Small: upscaled onto one tile.
        assert_eq!(p.optimal_canvas(100, 100), (560, 560));
        // Wide: one row of tiles.
        assert_eq!(p.optimal_canvas(300, 2000), (560, 2240));
        assert_eq!(fit_to_canvas(300, 2000, 560, 2240, 560), (300, 2000));
        assert_eq!(fit_to_canvas(100, 100, 560, 560, 560), (560, 560));
    }

    #[test]
    fn resizing_to_the_same_size_changes_nothing_and_a_flat_image_stays_flat() {
        let img = RgbImage::from_fn(37, 23, |x, y| image::Rgb([(x * 7) as u8, (y * 11) as u8, 200]));
        assert_eq!(resize_bilinear_aa(&img, 37, 23), img);
        let flat = RgbImage::from_pixel(50, 40, image::Rgb([10, 120, 250]));
        let small = resize_bilinear_aa(&flat, 13, 9);
        assert!(small.pixels().all(|p| p.0 == [10, 120, 250]));
        let big = resize_bilinear_aa(&flat, 130, 90);
        assert!(big.pixels().all(|p| p.0 == [10, 120, 250]));
    }
}
