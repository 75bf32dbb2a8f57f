//! Training augmentation: the geometric symmetries of a cell on a slide (flips, 90° turns),
//! colour jitter (stains and lamps differ between sites) and the ways cameras lose detail
//! (defocus blur, resolution, JPEG, sensor noise). It is applied to the raw image, before the
//! cell normalisation, so that the model learns from what the normalisation makes of a
//! perturbed picture.

use image::RgbImage;
use image::imageops::FilterType;
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
    /// Probability and largest σ (pixels) of a Gaussian defocus blur.
    pub blur: (f64, f32),
    /// Probability and smallest factor of a down-and-up resampling (lost resolution).
    pub downscale: (f64, f32),
    /// Probability and largest σ (0..255 scale) of Gaussian sensor noise.
    pub noise: (f64, f32),
    /// Probability and lowest quality of a JPEG round trip.
    pub jpeg: (f64, u8),
    /// Probability and smallest exponent of a stain-density curve ([`density_curve`]): the
    /// exponent is drawn in `min..=DENSITY_GAMMA_MAX`. Below 1 it compresses the picture's
    /// optical densities towards a red cell's, as a paler stain or a lower-contrast camera does.
    pub density: (f64, f32),
}

/// Largest exponent of the stain-density curve: a little more contrast than the picture had.
pub const DENSITY_GAMMA_MAX: f32 = 1.2;

/// Optical density (natural log) that the stain-density curve keeps in place: about a red
/// cell's, so that the curve changes how dark a nucleus is against the red cells around it.
const DENSITY_PIVOT: f32 = 0.3;

impl Default for Augment {
    fn default() -> Self {
        Augment {
            brightness: 0.2,
            contrast: 0.2,
            saturation: 0.25,
            hue: 0.04,
            blur: (0.0, 0.0),
            downscale: (0.0, 1.0),
            noise: (0.0, 0.0),
            jpeg: (0.0, 100),
            density: (0.0, 1.0),
        }
    }
}

impl Augment {
    /// Strong stain and optics augmentation, for cross-site robustness.
    pub fn strong() -> Self {
        Augment {
            brightness: 0.25,
            contrast: 0.3,
            saturation: 0.4,
            hue: 0.08,
            blur: (0.5, 2.5),
            downscale: (0.3, 0.4),
            noise: (0.3, 8.0),
            jpeg: (0.4, 30),
            density: (0.0, 1.0),
        }
    }

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
        if rng.gen_bool(self.downscale.0) {
            let f = rng.gen_range(self.downscale.1..=1.0);
            let (w, hgt) = out.dimensions();
            let small = image::imageops::resize(
                &out,
                ((w as f32 * f) as u32).max(8),
                ((hgt as f32 * f) as u32).max(8),
                FilterType::Triangle,
            );
            out = image::imageops::resize(&small, w, hgt, FilterType::Triangle);
        }
        if rng.gen_bool(self.blur.0) {
            out = image::imageops::blur(&out, rng.gen_range(0.3..=self.blur.1.max(0.31)));
        }
        // Drawn only when on, so that recipes without it keep their random streams.
        if self.density.0 > 0.0 && rng.gen_bool(self.density.0) {
            let min = self.density.1.clamp(0.05, DENSITY_GAMMA_MAX);
            density_curve(&mut out, rng.gen_range(min..=DENSITY_GAMMA_MAX));
        }
        if rng.gen_bool(self.noise.0) {
            let sigma = rng.gen_range(0.0..=self.noise.1);
            for p in out.pixels_mut() {
                for c in 0..3 {
                    // Box-Muller: one standard normal from two uniforms.
                    let (u1, u2): (f32, f32) = (rng.gen_range(f32::EPSILON..1.0), rng.r#gen());
                    let z = (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos();
                    p[c] = (p[c] as f32 + sigma * z).round().clamp(0.0, 255.0) as u8;
                }
            }
        }
        if rng.gen_bool(self.jpeg.0) {
            let q = rng.gen_range(self.jpeg.1.min(100)..=100);
            out = jpeg_round_trip(&out, q);
        }
        out
    }
}

/// Encodes and decodes an image as JPEG at a quality (1..=100).
pub fn jpeg_round_trip(img: &RgbImage, quality: u8) -> RgbImage {
    let mut buf = Vec::new();
    let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, quality.clamp(1, 100));
    if enc.encode_image(img).is_err() {
        return img.clone();
    }
    image::load_from_memory_with_format(&buf, image::ImageFormat::Jpeg)
        .map(|d| d.to_rgb8())
        .unwrap_or_else(|_| img.clone())
}

/// Raises every channel's optical density `d = −ln((v + 1) / 256)` to the power `gamma`
/// around [`DENSITY_PIVOT`]: `d' = pivot · (d / pivot)^gamma`. With `gamma` below 1 a dark
/// nucleus comes nearer the red cells' density and the plasma darkens a little: the low-contrast
/// look of a paler stain, a thinner smear or a flatter camera, which no per-picture colour
/// normalisation undoes (measured in `BENCHMARKS.md`, issue 22 §1).
pub fn density_curve(img: &mut RgbImage, gamma: f32) {
    let lut: [u8; 256] = std::array::from_fn(|v| {
        let d = -((v as f32 + 1.0) / 256.0).ln();
        let d = DENSITY_PIVOT * (d.max(0.0) / DENSITY_PIVOT).powf(gamma);
        (256.0 * (-d).exp() - 1.0).round().clamp(0.0, 255.0) as u8
    });
    for p in img.pixels_mut() {
        p.0 = p.0.map(|v| lut[v as usize]);
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
        for _ in 0..20 {
            assert_eq!(Augment::strong().apply(&src, &mut rng).dimensions(), (10, 10));
        }
    }

    #[test]
    fn density_curve_brings_dark_and_pale_towards_the_pivot() {
        // A nucleus-dark, a red-cell and a plasma-pale value.
        let px = |v: u8| image::Rgb([v, v, v]);
        let mut img = RgbImage::from_fn(3, 1, |x, _| px([40, 189, 240][x as usize]));
        let orig = img.clone();
        density_curve(&mut img, 1.0);
        assert_eq!(img, orig, "gamma 1 is the identity");
        density_curve(&mut img, 0.4);
        let [dark, pivot, pale] = [0, 1, 2].map(|x| img.get_pixel(x, 0)[0]);
        assert!(dark > 90, "a dark nucleus is paler: {dark}");
        assert!((pivot as i32 - 189).abs() <= 2, "the pivot density stays: {pivot}");
        assert!(pale < 225, "the plasma darkens: {pale}");
        let mut more = orig.clone();
        density_curve(&mut more, 1.2);
        assert!(more.get_pixel(0, 0)[0] < 40, "above 1 the nucleus darkens");
    }

    #[test]
    fn jpeg_round_trip_keeps_size_and_roughly_the_pixels() {
        let img = RgbImage::from_fn(32, 32, |x, y| image::Rgb([(x * 8) as u8, (y * 8) as u8, 128]));
        let j = jpeg_round_trip(&img, 40);
        assert_eq!(j.dimensions(), (32, 32));
        let diff: f64 = img
            .pixels()
            .zip(j.pixels())
            .map(|(a, b)| (a[0] as f64 - b[0] as f64).abs())
            .sum::<f64>()
            / 1024.0;
        assert!(diff > 0.0 && diff < 20.0, "mean difference {diff}");
    }
}
