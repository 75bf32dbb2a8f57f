//! Flat dark borders: the black bars a picture gets when a cell is cut near the edge of its
//! field and the crop is padded to a square (zeros, as image libraries pad by default).
//!
//! A transmitted-light smear has no black anywhere, so a bar is never part of the slide; left
//! in, it is read as the darkest stain in the picture and skews the stain statistics and the
//! view. At the development site (LISC) a fifth of the single-cell pictures have such bars (38 %
//! of its lymphocytes) and the shipped network called most of those cells Blast; no training
//! picture of PBC has one (8 of Munich's do). The cell normalisation therefore works on the
//! picture inside its bars, and where the view reaches past that content it mirrors the
//! content, as it does at any picture's edge.

use image::RgbImage;

/// A pixel is dark when none of its channels exceeds this (smears are lit from behind: their
/// darkest nuclei stay far above it).
const DARK: u8 = 40;
/// A row or column is part of a bar when this share of its pixels is dark (JPEG ringing and a
/// stray bright pixel do not stop it).
const BAR_SHARE: f32 = 0.95;
/// Borders are only trimmed from a picture of which at least this share is not dark: a
/// picture that is mostly dark (under-exposed, or not a smear) is left as it is.
const MIN_CONTENT: f32 = 0.2;
/// Trimming never leaves less than this many pixels on a side.
const MIN_SIDE: u32 = 16;
/// Behind a bar, at most this many lines darker than [`SEAM_SHARE`] of the content's mean
/// brightness are the bar's seam.
const MAX_SEAM: u32 = 4;
const SEAM_SHARE: f32 = 0.8;

/// The part of `img` inside its flat dark borders, `[x0, y0, width, height]`; the whole
/// picture when it has none.
pub fn content_rect(img: &RgbImage) -> [u32; 4] {
    let (w, h) = img.dimensions();
    let whole = [0, 0, w, h];
    if w < MIN_SIDE || h < MIN_SIDE {
        return whole;
    }
    let dark = |x: u32, y: u32| img.get_pixel(x, y).0.iter().all(|&c| c <= DARK);
    // Cheap first look: a picture without a dark pixel in any corner has no bar.
    if ![(0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1)]
        .iter()
        .any(|&(x, y)| dark(x, y))
    {
        return whole;
    }
    let lit = img.pixels().filter(|p| p.0.iter().any(|&c| c > DARK)).count();
    if (lit as f32) < MIN_CONTENT * (w as f32 * h as f32) {
        return whole;
    }
    let bar = |xs: std::ops::Range<u32>, ys: std::ops::Range<u32>| {
        let n = (xs.len() * ys.len()) as f32;
        let d = ys
            .flat_map(|y| xs.clone().map(move |x| (x, y)))
            .filter(|&(x, y)| dark(x, y))
            .count();
        d as f32 >= BAR_SHARE * n
    };
    let (mut x0, mut x1, mut y0, mut y1) = (0, w, 0, h);
    // Sides in turn until none moves, so that a corner padded on two sides trims both.
    loop {
        let before = (x0, x1, y0, y1);
        while x1 - x0 > MIN_SIDE && bar(x0..x0 + 1, y0..y1) {
            x0 += 1;
        }
        while x1 - x0 > MIN_SIDE && bar(x1 - 1..x1, y0..y1) {
            x1 -= 1;
        }
        while y1 - y0 > MIN_SIDE && bar(x0..x1, y0..y0 + 1) {
            y0 += 1;
        }
        while y1 - y0 > MIN_SIDE && bar(x0..x1, y1 - 1..y1) {
            y1 -= 1;
        }
        if before == (x0, x1, y0, y1) {
            break;
        }
    }
    // The seam: where the picture was resampled or compressed the bar blurs into the content
    // over a few lines, darker than anything around them. Those go too.
    if (x0, x1, y0, y1) != (0, w, 0, h) {
        let brightness = |xs: std::ops::Range<u32>, ys: std::ops::Range<u32>| {
            let n = (xs.len() * ys.len()).max(1) as f32;
            let sum: u32 = ys
                .flat_map(|y| xs.clone().map(move |x| (x, y)))
                .map(|(x, y)| *img.get_pixel(x, y).0.iter().max().unwrap_or(&0) as u32)
                .sum();
            sum as f32 / n
        };
        let seam = SEAM_SHARE * brightness(x0..x1, y0..y1);
        for _ in 0..MAX_SEAM {
            if x0 > 0 && x1 - x0 > MIN_SIDE && brightness(x0..x0 + 1, y0..y1) < seam {
                x0 += 1;
            }
            if x1 < w && x1 - x0 > MIN_SIDE && brightness(x1 - 1..x1, y0..y1) < seam {
                x1 -= 1;
            }
            if y0 > 0 && y1 - y0 > MIN_SIDE && brightness(x0..x1, y0..y0 + 1) < seam {
                y0 += 1;
            }
            if y1 < h && y1 - y0 > MIN_SIDE && brightness(x0..x1, y1 - 1..y1) < seam {
                y1 -= 1;
            }
        }
    }
    [x0, y0, x1 - x0, y1 - y0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    fn smear_like(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| Rgb([200 + (x % 7) as u8, 180 + (y % 5) as u8, 190]))
    }

    fn pad(img: &RgbImage, left: u32, top: u32, right: u32, bottom: u32, colour: [u8; 3]) -> RgbImage {
        let (w, h) = img.dimensions();
        let mut out = RgbImage::from_pixel(w + left + right, h + top + bottom, Rgb(colour));
        image::imageops::replace(&mut out, img, left as i64, top as i64);
        out
    }

    #[test]
    fn bars_on_any_side_are_trimmed() {
        let s = smear_like(100, 80);
        assert_eq!(content_rect(&s), [0, 0, 100, 80], "no bars, nothing trimmed");
        assert_eq!(content_rect(&pad(&s, 30, 0, 0, 0, [0; 3])), [30, 0, 100, 80]);
        assert_eq!(content_rect(&pad(&s, 0, 0, 12, 0, [3, 1, 5])), [0, 0, 100, 80]);
        assert_eq!(content_rect(&pad(&s, 0, 20, 0, 25, [0; 3])), [0, 20, 100, 80]);
        // A corner cut on two sides.
        assert_eq!(content_rect(&pad(&s, 10, 0, 0, 15, [0; 3])), [10, 0, 100, 80]);
    }

    #[test]
    fn the_blurred_seam_behind_a_bar_goes_with_it_and_no_more() {
        // A picture resized before it was padded: two lines blend the bar into the smear.
        let mut p = pad(&smear_like(100, 80), 0, 0, 0, 30, [0; 3]);
        for x in 0..100 {
            p.put_pixel(x, 78, Rgb([60, 50, 55]));
            p.put_pixel(x, 79, Rgb([130, 120, 125]));
        }
        assert_eq!(content_rect(&p), [0, 0, 100, 78]);
    }

    #[test]
    fn a_bar_with_a_few_stray_pixels_is_still_a_bar() {
        let mut p = pad(&smear_like(100, 100), 20, 0, 0, 0, [0; 3]);
        for y in [3, 50, 97] {
            p.put_pixel(5, y, Rgb([250, 250, 250]));
        }
        assert_eq!(content_rect(&p)[0], 20);
    }

    #[test]
    fn dark_pictures_slides_without_bars_and_tiny_pictures_are_left_whole() {
        // Under-exposed: most of the picture is dark; it is not trimmed away.
        let mut dim = RgbImage::from_pixel(100, 100, Rgb([20, 15, 25]));
        for x in 40..50 {
            for y in 40..50 {
                dim.put_pixel(x, y, Rgb([120, 100, 140]));
            }
        }
        assert_eq!(content_rect(&dim), [0, 0, 100, 100]);
        // Dark cells touching the edge are not bars: the column is not mostly dark.
        let mut s = smear_like(100, 100);
        for y in 0..60 {
            s.put_pixel(0, y, Rgb([30, 10, 60]));
        }
        assert_eq!(content_rect(&s), [0, 0, 100, 100]);
        assert_eq!(content_rect(&RgbImage::new(8, 8)), [0, 0, 8, 8]);
        assert_eq!(content_rect(&RgbImage::new(0, 0)), [0, 0, 0, 0]);
        // All black: nothing to trim to.
        assert_eq!(content_rect(&RgbImage::new(64, 64)), [0, 0, 64, 64]);
    }

    #[test]
    fn trimming_keeps_at_least_a_small_picture() {
        // A thin strip of content (a fifth of the picture) inside wide bars: trimmed towards
        // it, never below the minimum side.
        let p = pad(&smear_like(64, 13), 0, 26, 0, 25, [0; 3]);
        assert_eq!(content_rect(&p), [0, 26, 64, MIN_SIDE]);
    }
}
