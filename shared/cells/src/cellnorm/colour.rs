//! Colour: sRGB to a Lab-like space and back, Reinhard stain normalisation (matching a crop's
//! Lab statistics to a fixed reference) and the histogram equalisation of grey views.

use image::{Rgb, RgbImage};

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
pub(super) const PIXELS_PER_TASK: usize = 4096;

/// Histogram-equalisation lookup table of grey values.
pub(super) fn equalisation(values: &[u8]) -> [u8; 256] {
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
