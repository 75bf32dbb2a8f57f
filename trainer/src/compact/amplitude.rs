//! Amplitude mixing across sources (Xu et al., "A Fourier-based framework for domain
//! generalization", CVPR 2021; after Yang and Soatto's FDA, CVPR 2020) on the normalised views.
//!
//! A picture's Fourier phase carries most of its structure (where the nucleus, its lobes and the
//! red cells are); its amplitude spectrum carries the rest: contrast, how sharp the optics are,
//! how fine the texture looks. Scanners differ in the amplitude (one site's images are softer
//! than another's), and a model that reads "soft chromatin" as "blast" because every training
//! blast came from a softer scanner has learned the scanner. Here a training view keeps its own
//! phase and takes an amplitude interpolated between its own and that of a view from another
//! source, so sharpness and texture statistics stop telling the source (and the class with it).

use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rustfft::FftPlanner;
use rustfft::num_complex::Complex32;
use serde::{Deserialize, Serialize};

/// Amplitude mixing's settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AmplitudeMix {
    /// Probability that a training view is mixed.
    pub p: f64,
    /// Largest share of the partner's amplitude (drawn uniformly in `0..=max_lambda`).
    pub max_lambda: f32,
}

impl Default for AmplitudeMix {
    fn default() -> Self {
        AmplitudeMix {
            p: 0.5,
            max_lambda: 1.0,
        }
    }
}

/// 2-D discrete Fourier transform, in place, of a `w × h` row-major buffer (unnormalised both
/// ways: a forward and an inverse transform multiply by `w·h`).
fn fft2(buf: &mut [Complex32], w: usize, h: usize, inverse: bool, planner: &mut FftPlanner<f32>) {
    let (row, col) = if inverse {
        (planner.plan_fft_inverse(w), planner.plan_fft_inverse(h))
    } else {
        (planner.plan_fft_forward(w), planner.plan_fft_forward(h))
    };
    row.process(buf);
    let mut column = vec![Complex32::default(); h];
    for x in 0..w {
        for (y, c) in column.iter_mut().enumerate() {
            *c = buf[y * w + x];
        }
        col.process(&mut column);
        for (y, c) in column.iter().enumerate() {
            buf[y * w + x] = *c;
        }
    }
}

/// `img` with its own phase and the amplitude `(1 − λ)·|F(img)| + λ·|F(partner)|`, per channel
/// (equal channels, a grey view's, stay equal).
pub fn mix_amplitude(img: &RgbImage, partner: &RgbImage, lambda: f32) -> RgbImage {
    assert_eq!(img.dimensions(), partner.dimensions(), "views of one size");
    let (w, h) = (img.width() as usize, img.height() as usize);
    let lambda = lambda.clamp(0.0, 1.0);
    let channel = |im: &RgbImage, c: usize| -> Vec<Complex32> {
        im.pixels().map(|p| Complex32::new(p.0[c] as f32, 0.0)).collect()
    };
    let mut planner = FftPlanner::new();
    let mut out = img.clone();
    for c in 0..3 {
        let (mut a, mut b) = (channel(img, c), channel(partner, c));
        fft2(&mut a, w, h, false, &mut planner);
        fft2(&mut b, w, h, false, &mut planner);
        for (x, y) in a.iter_mut().zip(&b) {
            *x = Complex32::from_polar((1.0 - lambda) * x.norm() + lambda * y.norm(), x.arg());
        }
        fft2(&mut a, w, h, true, &mut planner);
        let scale = 1.0 / (w * h) as f32;
        for (p, v) in out.pixels_mut().zip(&a) {
            p.0[c] = (v.re * scale).round().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// Mixes each view's amplitude, with probability `mix.p`, with that of a view of another
/// source (partners drawn as MixStyle draws them); views of a lone source stay as they are.
/// Deterministic for a given `seed`.
pub fn mix_across_sources(views: &[RgbImage], sources: &[String], mix: &AmplitudeMix, seed: u64) -> Vec<RgbImage> {
    use rayon::prelude::*;
    assert_eq!(views.len(), sources.len(), "one source per view");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let names: Vec<&str> = sources.iter().map(String::as_str).collect();
    let partners = crate::compact::mixstyle::partners(&names, &mut rng);
    let lambdas: Vec<Option<f32>> = (0..views.len())
        .map(|_| {
            rng.gen_bool(mix.p.clamp(0.0, 1.0))
                .then(|| rng.gen_range(0.0..=mix.max_lambda.clamp(0.0, 1.0)))
        })
        .collect();
    views
        .par_iter()
        .enumerate()
        .map(|(i, view)| match lambdas[i] {
            Some(l) if sources[partners[i]] != sources[i] => mix_amplitude(view, &views[partners[i]], l),
            _ => view.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    fn checkerboard(v: [u8; 2]) -> RgbImage {
        RgbImage::from_fn(16, 12, |x, y| {
            let g = v[((x / 2 + y / 2) % 2) as usize];
            Rgb([g, g, g])
        })
    }

    fn max_diff(a: &RgbImage, b: &RgbImage) -> u8 {
        a.pixels()
            .zip(b.pixels())
            .flat_map(|(p, q)| (0..3).map(move |c| p.0[c].abs_diff(q.0[c])))
            .max()
            .unwrap()
    }

    #[test]
    fn no_share_of_the_partner_leaves_the_view_as_it_was() {
        let a = checkerboard([40, 200]);
        let b = RgbImage::from_fn(16, 12, |x, y| Rgb([(x * 13) as u8, (y * 20) as u8, 90]));
        assert!(max_diff(&mix_amplitude(&a, &b, 0.0), &a) <= 1);
        assert!(
            max_diff(&mix_amplitude(&b, &b, 1.0), &b) <= 1,
            "its own amplitude changes nothing"
        );
    }

    #[test]
    fn a_flat_partner_takes_the_contrast_away_in_proportion() {
        let a = checkerboard([40, 200]);
        let flat = RgbImage::from_pixel(16, 12, Rgb([120, 120, 120]));
        // All of a flat image's amplitude is in its mean: the view becomes that flat grey.
        let all = mix_amplitude(&a, &flat, 1.0);
        assert!(
            all.pixels().all(|p| p.0 == [120, 120, 120]),
            "{:?}",
            all.get_pixel(0, 0)
        );
        // Half of it: the mean moves half-way (120 → 120) and the contrast halves (160 → 80).
        let half = mix_amplitude(&a, &flat, 0.5);
        let (lo, hi) = (half.get_pixel(0, 0).0[0], half.get_pixel(2, 0).0[0]);
        assert_eq!((lo, hi), (80, 160), "contrast halves around the mean");
        // The structure (where the dark squares are) is the view's own.
        assert!(half.get_pixel(1, 1).0[0] < half.get_pixel(3, 1).0[0]);
    }

    #[test]
    fn grey_views_stay_grey() {
        let a = checkerboard([30, 220]);
        let b = RgbImage::from_fn(16, 12, |x, y| {
            let g = ((x * 7 + y * 11) % 256) as u8;
            Rgb([g, g, g])
        });
        let m = mix_amplitude(&a, &b, 0.7);
        assert!(m.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]));
    }

    #[test]
    fn partners_come_from_another_source_and_a_lone_source_is_left_alone() {
        let views = vec![
            checkerboard([40, 200]),
            checkerboard([40, 200]),
            RgbImage::from_pixel(16, 12, Rgb([120; 3])),
        ];
        let mix = AmplitudeMix {
            p: 1.0,
            max_lambda: 1.0,
        };
        // The two checkerboards of source "a" can only be mixed with the flat view of "b": their
        // contrast falls (never rises); the flat view takes some of a checkerboard's pattern.
        let sources: Vec<String> = ["a", "a", "b"].iter().map(|s| s.to_string()).collect();
        let out = mix_across_sources(&views, &sources, &mix, 7);
        for v in &out[..2] {
            let (lo, hi) = (v.get_pixel(0, 0).0[0], v.get_pixel(2, 0).0[0]);
            assert!(lo >= 40 && hi <= 200 && lo < hi, "{lo} {hi}");
        }
        assert_eq!(out, mix_across_sources(&views, &sources, &mix, 7), "deterministic");
        let one: Vec<String> = vec!["a".into(); 3];
        assert_eq!(mix_across_sources(&views, &one, &mix, 7), views);
        // p = 0 mixes nothing.
        let none = AmplitudeMix {
            p: 0.0,
            max_lambda: 1.0,
        };
        assert_eq!(mix_across_sources(&views, &sources, &none, 7), views);
    }
}
