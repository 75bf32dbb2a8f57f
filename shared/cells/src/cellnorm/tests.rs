//! Tests of cell normalisation on synthetic smears: finding and measuring the cell, both
//! scales, the hint, the edge flag, and the colour conversions; and [`smear`], the synthetic
//! smear that the finder's tests draw on too.

use super::colour::PIXELS_PER_TASK;
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

/// [`smear`] with the red cells stained blue-violet, as at a site whose stain colours them
/// with the nucleus (LISC).
fn violet_smear() -> RgbImage {
    let mut img = smear(240, 200, 130.0, 90.0, 48.0, 24.0);
    for p in img.pixels_mut() {
        if *p == Rgb([215, 150, 140]) {
            *p = Rgb([170, 160, 215]);
        }
    }
    img
}

#[test]
fn a_stain_that_colours_the_red_cells_too_still_gives_the_nucleus_its_size() {
    let off = CellNorm::default().apply(&violet_smear(), None, None);
    // Without the dark split the red cells count as nucleus: the failure seen at LISC.
    assert!(off.nucleus_px > 2.0 * 0.6 * 48.0, "nucleus {}", off.nucleus_px);
    let norm = CellNorm {
        dark_nucleus: true,
        ..CellNorm::default()
    };
    let on = norm.apply(&violet_smear(), None, None);
    assert!(on.found);
    assert!(on.dark_split && !off.dark_split);
    assert!((on.nucleus_px - 0.6 * 48.0).abs() < 4.0, "nucleus {}", on.nucleus_px);
    assert!(
        (on.centre[0] - 130.0).abs() < 3.0 && (on.centre[1] - 90.0).abs() < 3.0,
        "{:?}",
        on.centre
    );
    // Where the stain leaves the red cells pink, nothing changes.
    let pink = smear(240, 200, 130.0, 90.0, 48.0, 24.0);
    let (a, b) = (
        CellNorm::default().apply(&pink, None, None),
        norm.apply(&pink, None, None),
    );
    assert_eq!(
        (a.nucleus_px, a.diameter_px, a.centre),
        (b.nucleus_px, b.diameter_px, b.centre)
    );
    assert_eq!(a.image, b.image);
    assert!(!b.dark_split, "the rule did not fire");
}

/// [`violet_smear`] with red cells of two tones, the darker more common (their darker centres
/// crowding a small nucleus, as in LISC's lymphocyte pictures): the first split of what the
/// stain threshold kept leaves the darker red cells with the nucleus.
fn crowded_violet_smear() -> RgbImage {
    let (rbc, step) = (24.0, 24.0 * 1.15);
    let mut img = smear(240, 200, 130.0, 90.0, 40.0, rbc);
    for (x, y, p) in img.enumerate_pixels_mut() {
        if *p == Rgb([215, 150, 140]) {
            // The red cell this pixel belongs to (they lie on a grid), five in eight darker.
            let (i, j) = (
                ((x as f32 - rbc / 2.0) / step).round() as u32,
                ((y as f32 - rbc / 2.0) / step).round() as u32,
            );
            *p = if (i + 2 * j) % 8 < 5 {
                Rgb([165, 145, 210])
            } else {
                Rgb([180, 175, 215])
            };
        }
    }
    img
}

#[test]
fn red_cells_crowding_a_small_nucleus_are_split_off_until_the_nucleus_is_dark() {
    let norm = CellNorm {
        dark_nucleus: true,
        ..CellNorm::default()
    };
    let img = crowded_violet_smear();
    let on = norm.apply(&img, None, None);
    assert!(on.found && on.dark_split);
    assert!((on.nucleus_px - 0.6 * 40.0).abs() < 4.0, "nucleus {}", on.nucleus_px);
    assert!(
        (on.centre[0] - 130.0).abs() < 3.0 && (on.centre[1] - 90.0).abs() < 3.0,
        "{:?}",
        on.centre
    );
    // One split alone (the nucleus' green threshold is never reached) keeps the darker red
    // cells: the nucleus would span the picture.
    let off = CellNorm::default().apply(&img, None, None);
    assert!(off.nucleus_px > 100.0, "nucleus {}", off.nucleus_px);
}

#[test]
fn a_leaky_stain_of_one_green_level_is_left_as_it_is() {
    // Everything the stain threshold keeps has the same green: nothing to split, and the
    // nucleus is not emptied.
    // Small enough to be segmented as it is (no resampling to blend the levels).
    let mut img = smear(180, 160, 90.0, 80.0, 40.0, 24.0);
    for p in img.pixels_mut() {
        if *p == Rgb([90, 50, 150]) || *p == Rgb([215, 150, 140]) {
            *p = Rgb([170, 160, 215]);
        }
    }
    let norm = CellNorm {
        dark_nucleus: true,
        ..CellNorm::default()
    };
    let (on, off) = (
        norm.apply(&img, None, None),
        CellNorm::default().apply(&img, None, None),
    );
    assert!(!on.dark_split);
    assert_eq!((on.found, on.nucleus_px), (off.found, off.nucleus_px));
}

#[test]
fn a_large_dark_nucleus_filling_its_picture_is_not_split() {
    // A tight crop of a large cell: its nucleus (two dark tones) is most of what the stain
    // threshold keeps and far darker than the plasma; the rule leaves it whole.
    let mut img = RgbImage::from_pixel(100, 100, Rgb([235, 215, 205]));
    for (x, y, p) in img.enumerate_pixels_mut() {
        let d = ((x as f32 - 50.0).powi(2) + (y as f32 - 50.0).powi(2)).sqrt();
        if d < 33.0 {
            *p = if (x + y) % 5 < 3 {
                Rgb([90, 50, 150])
            } else {
                Rgb([110, 80, 165])
            };
        } else if d < 45.0 {
            *p = Rgb([215, 200, 210]);
        }
    }
    let off = CellNorm::default().apply(&img, None, None);
    let on = CellNorm {
        dark_nucleus: true,
        ..CellNorm::default()
    }
    .apply(&img, None, None);
    assert!(!on.dark_split, "the rule did not fire");
    assert_eq!((on.nucleus_px, on.centre), (off.nucleus_px, off.centre));
    assert!(on.nucleus_px > 60.0, "nucleus {}", on.nucleus_px);
}

#[test]
fn black_bars_padding_a_picture_change_neither_the_cell_nor_its_view() {
    let img = smear(200, 200, 100.0, 100.0, 48.0, 24.0);
    // Cut near a field's edge and padded to a square: bars on the left and at the bottom.
    let mut padded = RgbImage::new(260, 230);
    image::imageops::replace(&mut padded, &img, 60, 0);
    let norm = CellNorm::default();
    let (a, b) = (norm.apply(&img, None, None), norm.apply(&padded, None, None));
    assert!(b.found && !a.cut_by_border && !b.cut_by_border);
    assert!(
        (b.centre[0] - 160.0).abs() < 3.0 && (b.centre[1] - 100.0).abs() < 3.0,
        "{:?}",
        b.centre
    );
    assert!(
        (a.nucleus_px - b.nucleus_px).abs() < 2.0,
        "{} {}",
        a.nucleus_px,
        b.nucleus_px
    );
    let diff = |p: &RgbImage, q: &RgbImage| {
        p.pixels()
            .zip(q.pixels())
            .map(|(x, y)| (x[0] as f64 - y[0] as f64).abs())
            .sum::<f64>()
            / (224.0 * 224.0)
    };
    assert!(
        diff(&a.image, &b.image) < 3.0,
        "views differ by {}",
        diff(&a.image, &b.image)
    );
    // The view reaches past the picture: what fills it is mirrored smear, never the bar.
    let far = CellNorm {
        nucleus_fraction: 0.1,
        ..Default::default()
    };
    let (c, d) = (far.apply(&img, None, None), far.apply(&padded, None, None));
    assert!(
        c.image == d.image,
        "the padded picture's view is its content's: they differ by {}",
        diff(&c.image, &d.image)
    );
    // Without the trimming, the bar would have filled part of the view and shifted its stain.
    let untrimmed = normalise(&far, &padded, None, None);
    assert!(
        diff(&untrimmed.image, &d.image) > 10.0,
        "{}",
        diff(&untrimmed.image, &d.image)
    );
}

#[test]
fn a_cell_that_reaches_a_bar_is_cut_by_its_fields_edge() {
    // The cell runs off the picture's left side, where the picture was padded.
    let img = smear(200, 200, 18.0, 100.0, 48.0, 24.0);
    let mut padded = RgbImage::new(240, 200);
    image::imageops::replace(&mut padded, &img, 40, 0);
    let n = CellNorm::default().apply(&padded, Some([58.0, 100.0]), None);
    assert!(n.found && n.cut_by_border, "{n:?}");
    // The same cell on a picture without bars: cut by the picture's edge, not by a bar (a tight
    // crop touches its edges all the time).
    let n = CellNorm::default().apply(&img, Some([18.0, 100.0]), None);
    assert!(n.touches_edge && !n.cut_by_border);
    // Padded on the other side, away from the cell: not cut.
    let mut right = RgbImage::new(240, 200);
    image::imageops::replace(&mut right, &smear(200, 200, 100.0, 100.0, 48.0, 24.0), 0, 0);
    assert!(!CellNorm::default().apply(&right, None, None).cut_by_border);
}
