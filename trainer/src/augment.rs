//! Training augmentation: the geometric symmetries of a cell on a slide (flips, 90° turns) and
//! colour jitter, because stains and lamps differ between sites.

use image::RgbImage;
use rand::Rng;

/// Augmentation strengths.
#[derive(Debug, Clone, Copy)]
pub struct Augment {
    /// Brightness factor range ±.
    pub brightness: f32,
    /// Contrast factor range ±.
    pub contrast: f32,
    /// Saturation factor range ±.
    pub saturation: f32,
    /// Hue rotation range ±, in turns (1.0 = 360°).
    pub hue: f32,
}

impl Default for Augment {
    fn default() -> Self {
        Augment {
            brightness: 0.2,
            contrast: 0.2,
            saturation: 0.25,
            hue: 0.04,
        }
    }
}

impl Augment {
    /// A randomly flipped, turned and colour-jittered copy of `img`.
    pub fn apply(&self, img: &RgbImage, rng: &mut impl Rng) -> RgbImage {
        let mut out = match rng.gen_range(0..4) {
            0 => img.clone(),
            1 => image::imageops::rotate90(img),
            2 => image::imageops::rotate180(img),
            _ => image::imageops::rotate270(img),
        };
        if rng.gen_bool(0.5) {
            image::imageops::flip_horizontal_in_place(&mut out);
        }
        let b = 1.0 + rng.gen_range(-self.brightness..=self.brightness);
        let c = 1.0 + rng.gen_range(-self.contrast..=self.contrast);
        let s = 1.0 + rng.gen_range(-self.saturation..=self.saturation);
        let h = rng.gen_range(-self.hue..=self.hue) * std::f32::consts::TAU;
        jitter(&mut out, b, c, s, h);
        out
    }
}

/// Applies brightness, contrast (around the image's mean grey), saturation and a hue rotation
/// (in YIQ space) in one pass.
pub fn jitter(img: &mut RgbImage, brightness: f32, contrast: f32, saturation: f32, hue_rad: f32) {
    let n = (img.width() * img.height()).max(1) as f32;
    let mean_grey: f32 = img
        .pixels()
        .map(|p| 0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32)
        .sum::<f32>()
        / n;
    let (cos, sin) = (hue_rad.cos(), hue_rad.sin());
    for p in img.pixels_mut() {
        let [r, g, b] = p.0.map(|v| v as f32 * brightness);
        // Contrast around the mean grey.
        let m = mean_grey * brightness;
        let (r, g, b) = (m + (r - m) * contrast, m + (g - m) * contrast, m + (b - m) * contrast);
        // To YIQ, scale chroma (saturation) and rotate it (hue), back to RGB.
        let y = 0.299 * r + 0.587 * g + 0.114 * b;
        let i = 0.596 * r - 0.274 * g - 0.322 * b;
        let q = 0.211 * r - 0.523 * g + 0.312 * b;
        let (i, q) = ((i * cos - q * sin) * saturation, (i * sin + q * cos) * saturation);
        let r = y + 0.956 * i + 0.621 * q;
        let g = y - 0.272 * i - 0.647 * q;
        let b = y - 1.106 * i + 1.703 * q;
        p.0 = [r, g, b].map(|v| v.round().clamp(0.0, 255.0) as u8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn identity_jitter_leaves_pixels_nearly_unchanged() {
        let mut img = RgbImage::from_fn(8, 8, |x, y| image::Rgb([(x * 30) as u8, (y * 30) as u8, 100]));
        let orig = img.clone();
        jitter(&mut img, 1.0, 1.0, 1.0, 0.0);
        for (a, b) in img.pixels().zip(orig.pixels()) {
            for c in 0..3 {
                assert!((a[c] as i32 - b[c] as i32).abs() <= 2, "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn zero_saturation_gives_grey_and_augment_keeps_size() {
        let mut img = RgbImage::from_pixel(4, 4, image::Rgb([200, 40, 90]));
        jitter(&mut img, 1.0, 1.0, 0.0, 0.0);
        let p = img.get_pixel(0, 0);
        assert!((p[0] as i32 - p[1] as i32).abs() <= 1 && (p[1] as i32 - p[2] as i32).abs() <= 1);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let src = RgbImage::from_pixel(10, 10, image::Rgb([1, 2, 3]));
        assert_eq!(Augment::default().apply(&src, &mut rng).dimensions(), (10, 10));
    }
}
