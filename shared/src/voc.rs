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
}
