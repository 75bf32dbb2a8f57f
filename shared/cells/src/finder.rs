//! Finding the white cells in a microscope field: a whole camera frame with many red cells,
//! platelets, perhaps stain debris and a few white cells.
//!
//! White-cell nuclei are the strongest cue on every Romanowsky-type stain: they are the only
//! large objects that stain blue-violet (`B − G` well above the plasma's). The finder
//! thresholds that stain (Otsu, never below a fixed margin over the background), removes
//! specks, joins the lobes of one nucleus, and keeps the groups whose nucleus area is that of
//! a white cell in micrometres — platelets (2–3 µm) and stain specks are far smaller. The pixel
//! size makes this independent of the magnification. A cell whose nucleus touches the field's
//! edge is reported as cut, for the caller not to classify it.
//!
//! Each found cell is then cut out by [`cell_crop`] — the same cut that `trainer crop-fields`
//! makes from annotated boxes — and classified through the cell normalisation.

use crate::cellnorm::{components, crop_square, dilate, erode, otsu, percentile, working_copy};
use image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};

/// Settings of the finder, in micrometres.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinderConfig {
    /// Smallest nucleus area (µm²) that counts as a white cell.
    pub min_nucleus_um2: f32,
    /// Half-side of a cell's box relative to its nucleus' half-extent (the cytoplasm around).
    pub box_scale: f32,
    /// Gap (µm) closed between the lobes of one nucleus.
    pub join_um: f32,
    /// Specks thinner than this (µm) are removed before grouping.
    pub speck_um: f32,
    /// Pixel size (µm) of the working copy; finer fields are reduced to it.
    pub work_um: f32,
    /// Smallest mean stain of a nucleus above the stain threshold (`B − G` units): stain
    /// scattered faintly over red cells is not a nucleus.
    pub min_contrast: f32,
    /// Smallest visible nucleus area (µm²) of a cell cut by the field's edge: a sliver of a
    /// cell that lies almost wholly outside the field is not reported.
    pub min_edge_nucleus_um2: f32,
}

impl Default for FinderConfig {
    fn default() -> Self {
        FinderConfig {
            min_nucleus_um2: 15.0,
            box_scale: 1.2,
            join_um: 0.45,
            speck_um: 0.3,
            work_um: 0.15,
            // Both chosen on the even-numbered half of the development fields (see
            // BENCHMARKS.md, "Finding the white cells"): half the faintest nucleus there
            // (30.8), and between the largest edge sliver (15.2 µm²) and the smallest edge-cut
            // cell annotated (32.7 µm²).
            min_contrast: 15.0,
            min_edge_nucleus_um2: 25.0,
        }
    }
}

/// One white cell found in a field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FoundCell {
    /// Box `[x0, y0, x1, y1]` in the field's pixels, clipped to the field.
    pub bbox: [f32; 4],
    /// Centre of the nucleus in the field's pixels.
    pub centre: [f32; 2],
    /// Nucleus area in µm².
    pub nucleus_um2: f32,
    /// The nucleus touches the field's edge: part of the cell is missing.
    pub edge_cut: bool,
    /// Share of the nucleus' bounding box its stained pixels fill (a nucleus fills much of
    /// it; stain scattered over red cells little).
    pub fill: f32,
    /// Mean stain of the nucleus above the threshold that kept it (`B − G` units).
    pub contrast: f32,
}

/// Finds the white cells of a field whose pixels are `microns_per_pixel` µm, in reading order
/// (top to bottom, then left to right).
pub fn find_cells(field: &RgbImage, microns_per_pixel: f32, cfg: &FinderConfig) -> Vec<FoundCell> {
    let (w0, h0) = field.dimensions();
    if w0 < 8 || h0 < 8 || !(microns_per_pixel.is_finite() && microns_per_pixel > 0.0) {
        return Vec::new();
    }
    let scale = (microns_per_pixel / cfg.work_um).min(1.0);
    let work = working_copy(field, scale);
    let um = microns_per_pixel / scale;
    let (w, h) = (work.width() as usize, work.height() as usize);
    let stain: Vec<f32> = work.pixels().map(|p| p[2] as f32 - p[1] as f32).collect();
    let bg = percentile(&stain, 0.3);
    // Nothing stained well clear of the plasma: a blank or red-cell-only field.
    if percentile(&stain, 0.999) - bg < 25.0 {
        return Vec::new();
    }
    let hi = otsu(&stain).max(bg + 25.0);
    let nucleus: Vec<bool> = stain.iter().map(|&s| s > hi).collect();
    let speck = ((cfg.speck_um / um / 2.0).round() as usize).max(1);
    let opened = dilate(&erode(&nucleus, w, h, speck), w, h, speck);
    let opened: Vec<bool> = opened.iter().zip(&nucleus).map(|(&o, &n)| o && n).collect();
    let join = ((cfg.join_um / um).round() as usize).max(1);
    let (label, n) = components(&dilate(&opened, w, h, join), w, h);
    // Per group: nucleus area, sums of x and y, extent, touches the edge.
    #[derive(Clone)]
    struct Group {
        area: f32,
        stain: f32,
        sx: f32,
        sy: f32,
        min: [usize; 2],
        max: [usize; 2],
        edge: bool,
    }
    let mut groups = vec![
        Group {
            area: 0.0,
            stain: 0.0,
            sx: 0.0,
            sy: 0.0,
            min: [usize::MAX; 2],
            max: [0; 2],
            edge: false,
        };
        n as usize + 1
    ];
    for (i, &l) in label.iter().enumerate() {
        if l == 0 || !opened[i] {
            continue;
        }
        let (x, y) = (i % w, i / w);
        let g = &mut groups[l as usize];
        g.area += 1.0;
        g.stain += stain[i];
        g.sx += x as f32;
        g.sy += y as f32;
        g.min = [g.min[0].min(x), g.min[1].min(y)];
        g.max = [g.max[0].max(x), g.max[1].max(y)];
        g.edge |= x == 0 || y == 0 || x == w - 1 || y == h - 1;
    }
    let (fw, fh) = (w0 as f32, h0 as f32);
    let mut found: Vec<FoundCell> = groups
        .iter()
        .skip(1)
        .filter(|g| g.area * um * um >= cfg.min_nucleus_um2 && g.stain / g.area - hi >= cfg.min_contrast)
        .filter(|g| !g.edge || g.area * um * um >= cfg.min_edge_nucleus_um2)
        .map(|g| {
            let c = [g.sx / g.area / scale, g.sy / g.area / scale];
            let extent = (g.max[0] - g.min[0]).max(g.max[1] - g.min[1]) as f32 + 1.0;
            let half = extent / 2.0 * cfg.box_scale / scale;
            FoundCell {
                bbox: [
                    (c[0] - half).max(0.0),
                    (c[1] - half).max(0.0),
                    (c[0] + half).min(fw),
                    (c[1] + half).min(fh),
                ],
                centre: c,
                nucleus_um2: g.area * um * um,
                edge_cut: g.edge,
                fill: g.area / ((g.max[0] - g.min[0] + 1) * (g.max[1] - g.min[1] + 1)) as f32,
                contrast: g.stain / g.area - hi,
            }
        })
        .collect();
    found.sort_by(|a, b| {
        (a.centre[1], a.centre[0])
            .partial_cmp(&(b.centre[1], b.centre[0]))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    found
}

/// How many boxes of a field the search found, at an IoU threshold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoxMatch {
    /// Found boxes matched to a true box.
    pub true_positives: usize,
    /// Found boxes that match no true box.
    pub false_positives: usize,
    /// True boxes that no found box matches.
    pub false_negatives: usize,
}

impl BoxMatch {
    /// Adds another field's counts.
    pub fn add(&mut self, o: BoxMatch) {
        self.true_positives += o.true_positives;
        self.false_positives += o.false_positives;
        self.false_negatives += o.false_negatives;
    }

    /// Share of true boxes found (1 when there are none).
    pub fn recall(&self) -> f64 {
        ratio(self.true_positives, self.true_positives + self.false_negatives)
    }

    /// Share of found boxes that are true (1 when none was found).
    pub fn precision(&self) -> f64 {
        ratio(self.true_positives, self.true_positives + self.false_positives)
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 1.0 } else { a as f64 / b as f64 }
}

/// Intersection over union of two `[x0, y0, x1, y1]` boxes (0 for empty ones).
pub fn iou(a: [f32; 4], b: [f32; 4]) -> f32 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let area = |r: [f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

/// Matches found boxes to true boxes: each true box takes the unmatched found box it overlaps
/// most, if that overlap reaches `min_iou`; each found box matches at most one true box.
pub fn match_boxes(found: &[[f32; 4]], truth: &[[f32; 4]], min_iou: f32) -> BoxMatch {
    match_detail(found, truth, min_iou).0
}

/// As [`match_boxes`], with which found boxes match no true box and which true boxes were
/// missed (their indices).
pub fn match_detail(found: &[[f32; 4]], truth: &[[f32; 4]], min_iou: f32) -> (BoxMatch, Vec<usize>, Vec<usize>) {
    let mut used = vec![false; found.len()];
    let mut missed = Vec::new();
    let mut m = BoxMatch::default();
    for (i, t) in truth.iter().enumerate() {
        let best = found
            .iter()
            .enumerate()
            .filter(|(j, _)| !used[*j])
            .map(|(j, f)| (j, iou(*t, *f)))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        match best {
            Some((j, v)) if v >= min_iou => {
                used[j] = true;
                m.true_positives += 1;
            }
            _ => {
                m.false_negatives += 1;
                missed.push(i);
            }
        }
    }
    let extra: Vec<usize> = (0..found.len()).filter(|&j| !used[j]).collect();
    m.false_positives = extra.len();
    (m, extra, missed)
}

/// Mean colour of an image (white for an empty one).
pub fn mean_colour(img: &RgbImage) -> Rgb<u8> {
    let n = img.width() as f64 * img.height() as f64;
    if n == 0.0 {
        return Rgb([255, 255, 255]);
    }
    let mut sum = [0f64; 3];
    for p in img.pixels() {
        for c in 0..3 {
            sum[c] += p[c] as f64;
        }
    }
    Rgb(sum.map(|v| (v / n).round() as u8))
}

/// The image of one cell cut from a field for the classifier: a square of 3 × the box's longer
/// side centred on the box, so that the cell normalisation sees the red cells around it as in
/// the field, padded with `pad` (the field's mean colour: a mirror would duplicate a cell cut
/// by the edge) beyond the field's edges. Used alike for annotated boxes and found ones.
pub fn cell_crop(field: &RgbImage, bbox: [f32; 4], pad: Rgb<u8>) -> RgbImage {
    let [x0, y0, x1, y1] = bbox;
    let side = (3.0 * (x1 - x0).max(y1 - y0)).max(1.0);
    // At most the field's own size twice over: a box can never need more context than that.
    let side = side.min(2.0 * field.width().max(field.height()) as f32);
    crop_square(
        field,
        [(x0 + x1) / 2.0, (y0 + y1) / 2.0],
        side,
        side.round().max(1.0) as u32,
        Some(pad),
    )
}

/// The picture of one cell for a person: the square [`cell_crop`] gives the classifier (the
/// whole image for a single-cell image, or when the box is unknown), at most `max_side` pixels
/// across.
pub fn cell_picture(img: &RgbImage, bbox: Option<[u32; 4]>, single_cell: bool, max_side: u32) -> RgbImage {
    let crop = match bbox {
        Some([x0, y0, x1, y1]) if !single_cell => {
            cell_crop(img, [x0 as f32, y0 as f32, x1 as f32, y1 as f32], mean_colour(img))
        }
        _ => img.clone(),
    };
    let (w, h, max_side) = (crop.width(), crop.height(), max_side.max(1));
    if w.max(h) <= max_side {
        return crop;
    }
    let scale = max_side as f32 / w.max(h) as f32;
    let side = |n: u32| ((n as f32 * scale).round() as u32).clamp(1, max_side);
    image::imageops::thumbnail(&crop, side(w), side(h))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cellnorm::tests::smear;

    /// Paints a violet nucleus disc of diameter `d` at `(cx, cy)`.
    fn nucleus(img: &mut RgbImage, cx: f32, cy: f32, d: f32) {
        for (x, y, p) in img.enumerate_pixels_mut() {
            if ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt() < d / 2.0 {
                *p = Rgb([90, 50, 150]);
            }
        }
    }

    #[test]
    fn finds_white_cells_and_ignores_platelets_red_cells_and_specks() {
        // 0.1 µm per pixel: red cells 75 px, a white cell of 12 µm (nucleus 7.2 µm).
        let mut field = smear(640, 480, 200.0, 150.0, 120.0, 75.0);
        nucleus(&mut field, 480.0, 330.0, 70.0); // a second white cell's nucleus, 7 µm
        nucleus(&mut field, 420.0, 100.0, 25.0); // a platelet, 2.5 µm
        nucleus(&mut field, 100.0, 400.0, 4.0); // a stain speck
        let cells = find_cells(&field, 0.1, &FinderConfig::default());
        assert_eq!(cells.len(), 2, "{cells:?}");
        let (a, b) = (&cells[0], &cells[1]);
        assert!((a.centre[0] - 200.0).abs() < 3.0 && (a.centre[1] - 150.0).abs() < 3.0);
        assert!((b.centre[0] - 480.0).abs() < 3.0 && (b.centre[1] - 330.0).abs() < 3.0);
        assert!(!a.edge_cut && !b.edge_cut);
        // The nucleus of the first is 0.6 × 12 µm across.
        let expected = std::f32::consts::PI * (0.3 * 12.0f32).powi(2);
        assert!((a.nucleus_um2 - expected).abs() < 0.15 * expected, "{}", a.nucleus_um2);
        // Its box holds the nucleus and stays within the cell.
        let [x0, y0, x1, y1] = a.bbox;
        assert!(x0 <= 164.0 && y0 <= 114.0 && x1 >= 236.0 && y1 >= 186.0, "{:?}", a.bbox);
        assert!(x0 >= 140.0 && y0 >= 90.0 && x1 <= 260.0 && y1 <= 210.0, "{:?}", a.bbox);
    }

    #[test]
    fn the_same_field_at_another_magnification_gives_the_same_cells() {
        let coarse = smear(320, 240, 100.0, 75.0, 60.0, 37.0);
        let fine = smear(640, 480, 200.0, 150.0, 120.0, 75.0);
        let (c, f) = (
            find_cells(&coarse, 0.2, &FinderConfig::default()),
            find_cells(&fine, 0.1, &FinderConfig::default()),
        );
        assert_eq!((c.len(), f.len()), (1, 1));
        assert!((c[0].nucleus_um2 - f[0].nucleus_um2).abs() < 0.15 * f[0].nucleus_um2);
        let doubled = c[0].bbox.map(|v| v * 2.0);
        assert!(iou(doubled, f[0].bbox) > 0.8);
    }

    #[test]
    fn a_cell_cut_by_the_edge_is_reported_as_cut() {
        let field = smear(400, 300, 20.0, 150.0, 120.0, 75.0);
        let cells = find_cells(&field, 0.1, &FinderConfig::default());
        assert_eq!(cells.len(), 1);
        assert!(cells[0].edge_cut);
        assert_eq!(cells[0].bbox[0], 0.0, "box clipped to the field");
    }

    #[test]
    fn faint_stain_and_a_sliver_at_the_edge_are_not_cells() {
        let cfg = FinderConfig::default();
        // A 7 µm patch stained just over the plasma (B − G 32 above it), nothing stronger.
        let mut faint = smear(640, 480, -500.0, -500.0, 120.0, 75.0);
        for (x, y, p) in faint.enumerate_pixels_mut() {
            if ((x as f32 - 320.0).powi(2) + (y as f32 - 240.0).powi(2)).sqrt() < 35.0 {
                *p = Rgb([200, 180, 202]);
            }
        }
        assert!(find_cells(&faint, 0.1, &cfg).is_empty());
        let loose = FinderConfig {
            min_contrast: 0.0,
            ..cfg.clone()
        };
        assert_eq!(find_cells(&faint, 0.1, &loose).len(), 1, "found without the floor");
        // A nucleus almost wholly outside the field: about 18 µm² of it inside.
        let mut sliver = smear(640, 480, -500.0, -500.0, 120.0, 75.0);
        nucleus(&mut sliver, 3.0, 240.0, 72.0);
        assert!(find_cells(&sliver, 0.1, &cfg).is_empty());
        let any_edge = FinderConfig {
            min_edge_nucleus_um2: 0.0,
            ..cfg
        };
        let cut = find_cells(&sliver, 0.1, &any_edge);
        assert!(cut.len() == 1 && cut[0].edge_cut, "{cut:?}");
    }

    #[test]
    fn blank_red_only_tiny_and_nonsense_inputs_give_nothing() {
        let cfg = FinderConfig::default();
        assert!(find_cells(&RgbImage::from_pixel(640, 480, Rgb([230, 220, 215])), 0.1, &cfg).is_empty());
        assert!(find_cells(&smear(640, 480, -500.0, -500.0, 10.0, 75.0), 0.1, &cfg).is_empty());
        assert!(find_cells(&RgbImage::new(3, 3), 0.1, &cfg).is_empty());
        let field = smear(400, 300, 200.0, 150.0, 120.0, 75.0);
        for um in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            assert!(find_cells(&field, um, &cfg).is_empty(), "{um}");
        }
    }

    #[test]
    fn boxes_are_matched_one_to_one_at_the_iou_threshold() {
        let t = [
            [0.0, 0.0, 10.0, 10.0],
            [20.0, 20.0, 30.0, 30.0],
            [50.0, 50.0, 60.0, 60.0],
        ];
        let f = [
            [1.0, 1.0, 11.0, 11.0],       // matches the first
            [0.0, 0.0, 10.0, 9.0],        // a duplicate of the first: a false positive
            [25.0, 25.0, 35.0, 35.0],     // overlaps the second by IoU 25/175: too little
            [100.0, 100.0, 110.0, 110.0], // nothing there
        ];
        let m = match_boxes(&f, &t, 0.5);
        assert_eq!(
            m,
            BoxMatch {
                true_positives: 1,
                false_positives: 3,
                false_negatives: 2
            }
        );
        assert!((m.recall() - 1.0 / 3.0).abs() < 1e-9 && (m.precision() - 0.25).abs() < 1e-9);
        assert_eq!(BoxMatch::default().recall(), 1.0);
        assert!((iou(t[0], t[0]) - 1.0).abs() < 1e-6);
        assert_eq!(iou(t[0], [5.0, 5.0, 5.0, 9.0]), 0.0);
    }

    #[test]
    fn a_crop_keeps_the_cell_centred_with_context_and_pads_beyond_the_edge() {
        let field = smear(400, 300, 30.0, 150.0, 60.0, 37.0);
        let pad = Rgb([1, 2, 3]);
        let c = cell_crop(&field, [0.0, 120.0, 60.0, 180.0], pad);
        assert_eq!(c.dimensions(), (180, 180));
        assert_eq!(*c.get_pixel(0, 90), pad, "left of the field is padding");
        assert_eq!(*c.get_pixel(90, 90), Rgb([90, 50, 150]), "the nucleus is at the centre");
        // A degenerate or absurd box stays bounded.
        assert_eq!(cell_crop(&field, [5.0, 5.0, 5.0, 5.0], pad).dimensions(), (1, 1));
        assert_eq!(cell_crop(&field, [0.0, 0.0, 1e9, 1e9], pad).width(), 800);
    }
}
