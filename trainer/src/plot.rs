//! PNG charts: training curves and confusion matrices (plotters, bitmap backend, with an
//! embedded DejaVu Sans Mono so that the charts render the same on every machine).

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");
static REGISTER: Once = Once::new();

fn font() {
    REGISTER.call_once(|| {
        // The embedded font is valid, so registration cannot fail in practice; if it did, charts
        // would fail to render text and report that error.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing chart: {e:?}")
}

/// Draws `curves.csv` as a PNG: every `*loss` column on the left, every other `val_*` column
/// (fractions: accuracy, macro F1, ...) on the right, against `epoch`.
pub fn curves(csv_path: &Path, png: &Path) -> Result<()> {
    font();
    let mut rdr = csv::Reader::from_path(csv_path).with_context(|| format!("reading {}", csv_path.display()))?;
    let headers: Vec<String> = rdr.headers()?.iter().map(String::from).collect();
    let rows: Vec<Vec<f64>> = rdr
        .records()
        .map(|r| r.map(|r| r.iter().map(|v| v.parse().unwrap_or(f64::NAN)).collect()))
        .collect::<Result<_, _>>()?;
    let ep = headers
        .iter()
        .position(|h| h == "epoch")
        .ok_or_else(|| anyhow!("{} has no column epoch", csv_path.display()))?;
    let losses: Vec<usize> = (0..headers.len()).filter(|&i| headers[i].ends_with("loss")).collect();
    let fractions: Vec<usize> = (0..headers.len())
        .filter(|&i| headers[i].starts_with("val_") && !headers[i].ends_with("loss"))
        .collect();
    if losses.is_empty() {
        return Err(anyhow!("{} has no loss column", csv_path.display()));
    }
    let max_epoch = rows.iter().map(|r| r[ep]).fold(1.0, f64::max);
    let max_loss = rows
        .iter()
        .flat_map(|r| losses.iter().map(move |&i| r[i]))
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max);
    let colours = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];
    let root = BitMapBackend::new(png, (1000, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (left, right) = root.split_horizontally(500);
    for (area, title, cols, top) in [
        (&left, "loss", &losses, max_loss * 1.05),
        (&right, "validation", &fractions, 1.0),
    ] {
        let mut c = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(50)
            .build_cartesian_2d(1f64..max_epoch.max(2.0), 0f64..top)
            .map_err(err)?;
        c.configure_mesh().x_desc("epoch").draw().map_err(err)?;
        for (k, &i) in cols.iter().enumerate() {
            let colour = colours[k % colours.len()];
            c.draw_series(LineSeries::new(rows.iter().map(|r| (r[ep], r[i])), colour))
                .map_err(err)?
                .label(headers[i].replace('_', " "))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
        }
        if !cols.is_empty() {
            c.configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(err)?;
        }
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Draws a confusion matrix (rows true, columns predicted) with counts, shaded by row fraction.
pub fn confusion(names: &[&str], counts: &[Vec<u64>], png: &Path) -> Result<()> {
    font();
    let n = names.len();
    let cell = 70i32;
    let (ox, oy) = (130i32, 60i32);
    let size = (
        ox as u32 + cell as u32 * n as u32 + 20,
        oy as u32 + cell as u32 * n as u32 + 40,
    );
    let root = BitMapBackend::new(png, size).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let text = |s: &str, x: i32, y: i32, size: i32| Text::new(s.to_string(), (x, y), ("sans-serif", size).into_font());
    root.draw(&text("predicted →", ox, 8, 16)).map_err(err)?;
    for (j, name) in names.iter().enumerate() {
        root.draw(&text(&name[..name.len().min(6)], ox + j as i32 * cell + 6, oy - 22, 14))
            .map_err(err)?;
        root.draw(&text(name, 6, oy + j as i32 * cell + cell / 2 - 8, 14))
            .map_err(err)?;
    }
    for (i, row) in counts.iter().enumerate() {
        let total: u64 = row.iter().sum::<u64>().max(1);
        for (j, &v) in row.iter().enumerate() {
            let frac = v as f64 / total as f64;
            // White to a mid blue, with white text on the darker half so that counts stay legible.
            let mix = |full: f64| (255.0 - (255.0 - full) * frac) as u8;
            let fill = RGBColor(mix(60.0), mix(100.0), mix(200.0));
            let (x, y) = (ox + j as i32 * cell, oy + i as i32 * cell);
            root.draw(&Rectangle::new([(x, y), (x + cell, y + cell)], fill.filled()))
                .map_err(err)?;
            root.draw(&Rectangle::new([(x, y), (x + cell, y + cell)], BLACK.stroke_width(1)))
                .map_err(err)?;
            let colour = if frac > 0.5 { WHITE } else { BLACK };
            let label = Text::new(
                v.to_string(),
                (x + 8, y + cell / 2 - 8),
                ("sans-serif", 16).into_font().color(&colour),
            );
            root.draw(&label).map_err(err)?;
        }
    }
    root.draw(&text("rows: true class", 6, oy + n as i32 * cell + 10, 14))
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
