//! Segmentation: finding the stained white cell in a working copy of the picture and
//! measuring it (centre, diameter, nucleus extent), and the mask and threshold helpers it is
//! built from (Otsu, percentiles, connected components, dilation and erosion), which the
//! field finder uses too.

use image::RgbImage;
use image::imageops::FilterType;

/// What segmentation found, in working-copy pixels.
#[derive(Debug, Clone)]
pub(super) struct Found {
    pub(super) centre: [f32; 2],
    pub(super) radius: f32,
    pub(super) nucleus_radius: f32,
    pub(super) touches_edge: bool,
    /// Whether the dark-nucleus rule took only the dark part of what the threshold kept.
    pub(super) dark_split: bool,
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

/// Above this share of the picture, what the stain threshold kept is more than a nucleus: in
/// the training sources' pictures 99 % keep less than 0.31 and 99.2 % are not both above 0.25
/// and mostly pale (measured on every second training picture).
const LEAKY_SHARE: f32 = 0.25;

/// How strongly a nucleus absorbs green light at the least: the optical density
/// `ln(bright / green)` against the picture's bright plasma. Where the dark part the split
/// below finds is paler than this it is red cells, not a nucleus: at LISC the first split's
/// threshold lies at 0.32–0.46 in pictures whose dark part is mostly red cells; in the training
/// sources' pictures where the rule reaches it, at 0.94 or more (a large nucleus filling a
/// tight crop).
const NUCLEUS_MIN_DENSITY: f32 = 0.7;
/// At most this many splits in all (the first and two more).
const MAX_SPLITS: usize = 3;

/// Where a stain colours the red cells blue-violet as well (seen at another hospital, LISC),
/// the threshold on blue over green keeps them with the nucleus, and the nucleus measured from
/// that is the size of the picture: the nucleus-relative scale then zooms out until the view is
/// mostly mirrored padding. When what was kept covers more of the picture than a nucleus does
/// and most of it is pale, only its dark part (green below Otsu's threshold among the kept
/// pixels: a nucleus absorbs green, a red cell much less) is the nucleus. Where red cells
/// crowd a small nucleus, their darker parts outnumber their paler ones and that first dark
/// part is mostly red cells; while it is too pale to be a nucleus ([`NUCLEUS_MIN_DENSITY`]) it
/// is split again the same way. Pictures of the training sources almost never meet the
/// conditions. Behind `CellNorm::dark_nucleus`: the nucleus it finds at such a site is the
/// right size, and the model must have been trained to answer for what it then sees, or
/// adapted to the site (BENCHMARKS.md, issue 22).
/// Returns whether it did.
fn dark_part_of_a_leaky_stain(work: &RgbImage, nucleus: &mut [bool]) -> bool {
    let mut kept: Vec<f32> = work
        .pixels()
        .zip(nucleus.iter())
        .filter(|(_, n)| **n)
        .map(|(p, _)| p[1] as f32)
        .collect();
    if (kept.len() as f32) <= LEAKY_SHARE * nucleus.len() as f32 {
        return false;
    }
    let mut bright = None;
    for _ in 0..MAX_SPLITS {
        let t = otsu(&kept);
        let dark: Vec<f32> = kept.iter().copied().filter(|&g| g < t).collect();
        // One green level only (Otsu has nothing to split): no nucleus to take.
        if dark.is_empty() {
            return false;
        }
        if dark.len() * 2 < kept.len() {
            for (n, p) in nucleus.iter_mut().zip(work.pixels()) {
                *n = *n && (p[1] as f32) < t;
            }
            return true;
        }
        // Mostly dark: a nucleus that fills much of the picture, or red cells crowding a
        // small one. Only the latter is pale.
        let bright = *bright.get_or_insert_with(|| {
            let green: Vec<f32> = work.pixels().map(|p| p[1] as f32).collect();
            percentile(&green, 0.95)
        });
        if (bright / t.max(1.0)).ln() >= NUCLEUS_MIN_DENSITY {
            return false;
        }
        kept = dark;
    }
    false
}

/// Finds the white cell nearest `hint` in a working copy (with `dark_nucleus`, see
/// [`dark_part_of_a_leaky_stain`]).
pub(super) fn segment(work: &RgbImage, hint: [f32; 2], dark_nucleus: bool) -> Option<Found> {
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
    let mut nucleus: Vec<bool> = stain.iter().map(|&s| s > hi).collect();
    let dark_split = dark_nucleus && dark_part_of_a_leaky_stain(work, &mut nucleus);
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
        dark_split,
    })
}
