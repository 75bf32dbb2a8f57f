//! Pascal VOC annotations (the format of the BCCD smear fields): labelled boxes per image.

use std::path::{Path, PathBuf};

/// One labelled box, in image pixels, `x0 < x1`, `y0 < y1`.
#[derive(Debug, Clone, PartialEq)]
pub struct VocBox {
    /// Object name (`WBC`, `RBC`, `Platelets`).
    pub name: String,
    /// `[x0, y0, x1, y1]`.
    pub bbox: [f32; 4],
}

/// An annotated image.
#[derive(Debug, Clone, PartialEq)]
pub struct VocImage {
    /// `filename` element.
    pub filename: String,
    /// Declared `(width, height)`, where given.
    pub size: Option<(u32, u32)>,
    /// Objects.
    pub objects: Vec<VocBox>,
    /// Degenerate (zero-area) boxes that were dropped; real annotation sets have a few.
    pub skipped: usize,
}

/// Why an annotation could not be read.
#[derive(Debug, thiserror::Error)]
pub enum VocError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Malformed XML or a missing or invalid element.
    #[error("{path}: {reason}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Diameter of a red cell, in micrometres: every smear's own ruler.
pub const RED_CELL_MICRONS: f32 = 7.5;

/// Pixel size (µm) that the annotated red cells of some images give: [`RED_CELL_MICRONS`]
/// over the median diameter (√(w·h)) of the `RBC` boxes that lie wholly inside their image.
/// `None` with fewer than 3 such boxes.
pub fn red_cell_microns_per_pixel(images: &[VocImage]) -> Option<f32> {
    let mut d: Vec<f32> = images
        .iter()
        .flat_map(|v| {
            v.objects.iter().filter(move |o| {
                let [x0, y0, x1, y1] = o.bbox;
                let inside = x0 > 1.0 && y0 > 1.0;
                o.name == "RBC"
                    && match v.size {
                        Some((w, h)) => inside && x1 < w as f32 - 1.0 && y1 < h as f32 - 1.0,
                        None => inside,
                    }
            })
        })
        .map(|o| ((o.bbox[2] - o.bbox[0]) * (o.bbox[3] - o.bbox[1])).sqrt())
        .filter(|d| d.is_finite() && *d > 0.0)
        .collect();
    if d.len() < 3 {
        return None;
    }
    d.sort_by(f32::total_cmp);
    Some(RED_CELL_MICRONS / d[d.len() / 2])
}

/// Parses one VOC XML document; `path` names it in errors.
pub fn parse(xml: &str, path: &Path) -> Result<VocImage, VocError> {
    let bad = |reason: String| VocError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let doc = roxmltree::Document::parse(xml).map_err(|e| bad(e.to_string()))?;
    let root = doc.root_element();
    let child_text = |n: roxmltree::Node, name: &str| {
        n.children()
            .find(|c| c.has_tag_name(name))
            .and_then(|c| c.text())
            .map(|t| t.trim().to_string())
    };
    let filename = child_text(root, "filename").ok_or_else(|| bad("no <filename>".into()))?;
    let size = root.children().find(|c| c.has_tag_name("size")).and_then(|s| {
        Some((
            child_text(s, "width")?.parse().ok()?,
            child_text(s, "height")?.parse().ok()?,
        ))
    });
    let mut objects = Vec::new();
    let mut skipped = 0;
    for o in root.children().filter(|c| c.has_tag_name("object")) {
        let name = child_text(o, "name").ok_or_else(|| bad("object without <name>".into()))?;
        let b = o
            .children()
            .find(|c| c.has_tag_name("bndbox"))
            .ok_or_else(|| bad(format!("{name}: no <bndbox>")))?;
        let mut v = [0f32; 4];
        for (i, k) in ["xmin", "ymin", "xmax", "ymax"].iter().enumerate() {
            v[i] = child_text(b, k)
                .and_then(|t| t.parse::<f32>().ok())
                .filter(|x| x.is_finite())
                .ok_or_else(|| bad(format!("{name}: missing or invalid <{k}>")))?;
        }
        if v[2] <= v[0] || v[3] <= v[1] {
            skipped += 1;
            continue;
        }
        objects.push(VocBox { name, bbox: v });
    }
    Ok(VocImage {
        filename,
        size,
        objects,
        skipped,
    })
}

/// Reads every `*.xml` of a folder, sorted by file name.
pub fn read_dir(dir: &Path) -> Result<Vec<(PathBuf, VocImage)>, VocError> {
    let io = |source| VocError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "xml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).map_err(|source| VocError::Io {
                path: p.clone(),
                source,
            })?;
            let v = parse(&text, &p)?;
            Ok((p, v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_boxes_and_rejects_broken_annotations() {
        let xml = "<annotation><filename>a.jpg</filename><size><width>640</width><height>480</height></size>\
            <object><name>WBC</name><bndbox><xmin>10</xmin><ymin>20</ymin><xmax>110</xmax><ymax>90.5</ymax></bndbox></object>\
            <object><name>RBC</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>3</xmax><ymax>4</ymax></bndbox></object></annotation>";
        let v = parse(xml, Path::new("a.xml")).unwrap();
        assert_eq!(v.filename, "a.jpg");
        assert_eq!(v.size, Some((640, 480)));
        assert_eq!(v.objects.len(), 2);
        assert_eq!(v.objects[0].bbox, [10.0, 20.0, 110.0, 90.5]);
        let p = Path::new("b.xml");
        assert!(parse("<annotation><filename>a", p).is_err());
        assert!(parse("<annotation></annotation>", p).is_err());
        let inverted = xml.replace("<xmax>110</xmax>", "<xmax>5</xmax>");
        let v = parse(&inverted, p).unwrap();
        assert_eq!(
            (v.objects.len(), v.skipped),
            (1, 1),
            "the empty box is dropped and counted"
        );
        let nan = xml.replace("<ymin>20</ymin>", "<ymin>NaN</ymin>");
        assert!(parse(&nan, p).is_err());
    }

    #[test]
    fn red_cells_give_the_pixel_size_and_cut_ones_are_ignored() {
        let rbc = |x0: f32, y0: f32, d: f32| VocBox {
            name: "RBC".into(),
            bbox: [x0, y0, x0 + d, y0 + d],
        };
        let field = VocImage {
            filename: "f.jpg".into(),
            size: Some((640, 480)),
            objects: vec![
                rbc(10.0, 10.0, 100.0),
                rbc(200.0, 10.0, 110.0),
                rbc(300.0, 300.0, 90.0),
                rbc(0.0, 200.0, 30.0),   // cut by the left edge
                rbc(600.0, 100.0, 40.0), // cut by the right edge
                VocBox {
                    name: "WBC".into(),
                    bbox: [400.0, 300.0, 420.0, 320.0],
                },
            ],
            skipped: 0,
        };
        let um = red_cell_microns_per_pixel(std::slice::from_ref(&field)).unwrap();
        assert!((um - 7.5 / 100.0).abs() < 1e-6, "{um}");
        let few = VocImage {
            objects: field.objects[..2].to_vec(),
            ..field.clone()
        };
        assert_eq!(red_cell_microns_per_pixel(&[few]), None);
        assert_eq!(red_cell_microns_per_pixel(&[]), None);
    }
}
