//! Dataset ingest: the project's CSV (`path,label,...,` WBCAtt attribute columns), the reference
//! study's CSV (`path,description,label`), or a folder per class. Unreadable or corrupt images
//! are reported with the reason and skipped; the rest load.

use anyhow::{Context, Result, bail};
use image::RgbImage;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use wbc_cells::Normalise;
use wbc_cells::image::{DecodeLimits, load_rgb};
use wbc_cells::voc::red_cell_microns_per_pixel;
use wbc_protocol::attributes::{ATTRIBUTES, AttributeSet, NUM_ATTRIBUTES};
use wbc_protocol::classes::CellClass;

/// One labelled (or unlabelled) cell image.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Image file.
    pub path: PathBuf,
    /// Class, when the set is labelled.
    pub label: Option<CellClass>,
    /// Known attributes.
    pub attrs: AttributeSet,
    /// Source (site/scanner), `unknown` when not given.
    pub source: String,
    /// Reference description, when given.
    pub description: Option<String>,
    /// Pixel size in micrometres: the `microns_per_pixel` column, else the known scale of the
    /// source ([`source_microns_per_pixel`]), else unknown.
    pub microns_per_pixel: Option<f32>,
}

/// Pixel size (µm) of the 224 px images of the sources in `../shared/data/wbc`, estimated by
/// measurement: the median segmented neutrophil diameter (84 px in `pbc`, 103 px in `munich`)
/// taken as 12 µm, the size BCCD's red-cell ruler gives its white cells (median cell 167 px
/// against red cells of 104 px = 7.5 µm).
pub const SOURCE_MICRONS_PER_PIXEL: [(&str, f32); 2] = [("pbc", 0.143), ("munich", 0.117)];

/// Known pixel size of a source's images.
pub fn source_microns_per_pixel(source: &str) -> Option<f32> {
    SOURCE_MICRONS_PER_PIXEL
        .iter()
        .find(|(s, _)| *s == source)
        .map(|(_, v)| *v)
}

/// An image that could not be used, and why.
#[derive(Debug, Clone)]
pub struct Rejected {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub reason: String,
}

/// Reads a sample list from a CSV file or a folder-per-class directory.
pub fn read_samples(path: &Path) -> Result<Vec<Sample>> {
    if path.is_dir() {
        return read_folder(path);
    }
    let base = path.parent().unwrap_or(Path::new("."));
    let mut rdr = csv::ReaderBuilder::new()
        .flexible(false)
        .from_path(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let headers: Vec<String> = rdr.headers()?.iter().map(|h| h.trim().to_string()).collect();
    let col = |name: &str| headers.iter().position(|h| h == name);
    let path_col = col("path")
        .with_context(|| format!("{}: no `path` column (columns: {})", path.display(), headers.join(",")))?;
    let label_col = col("label");
    let desc_col = col("description");
    let source_col = col("source");
    let scale_col = col("microns_per_pixel");
    let attr_cols: Vec<Option<usize>> = ATTRIBUTES.iter().map(|a| col(a.key)).collect();
    let mut out = Vec::new();
    for (i, rec) in rdr.records().enumerate() {
        let line = i + 2;
        let rec = rec.with_context(|| format!("{}: line {line}", path.display()))?;
        let label = match label_col.map(|c| rec[c].trim()) {
            None | Some("") => None,
            Some(l) => Some(
                l.parse::<CellClass>()
                    .with_context(|| format!("{}: line {line}", path.display()))?,
            ),
        };
        let mut vals = [""; NUM_ATTRIBUTES];
        for (k, c) in attr_cols.iter().enumerate() {
            if let Some(c) = c {
                vals[k] = rec.get(*c).unwrap_or("");
            }
        }
        let attrs = AttributeSet::from_strs(&vals).with_context(|| format!("{}: line {line}", path.display()))?;
        let source = source_col
            .map(|c| rec[c].trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown".into());
        let microns_per_pixel = match scale_col.map(|c| rec[c].trim()) {
            None | Some("") => source_microns_per_pixel(&source),
            Some(v) => Some(
                v.parse::<f32>()
                    .ok()
                    .filter(|v| v.is_finite() && *v > 0.0)
                    .with_context(|| {
                        format!(
                            "{}: line {line}: microns_per_pixel {v:?} is not a positive number",
                            path.display()
                        )
                    })?,
            ),
        };
        out.push(Sample {
            path: base.join(rec[path_col].trim()),
            label,
            attrs,
            source,
            description: desc_col.map(|c| rec[c].to_string()),
            microns_per_pixel,
        });
    }
    if out.is_empty() {
        bail!("{}: no rows", path.display());
    }
    Ok(out)
}

fn read_folder(dir: &Path) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        if !e.file_type()?.is_dir() {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        let class: CellClass = name
            .parse()
            .with_context(|| format!("folder {name:?} in {} does not name a class", dir.display()))?;
        let mut files: Vec<_> = std::fs::read_dir(e.path())?.collect::<Result<_, _>>()?;
        files.sort_by_key(|f| f.file_name());
        for f in files
            .into_iter()
            .filter(|f| f.file_type().map(|t| t.is_file()).unwrap_or(false))
        {
            out.push(Sample {
                path: f.path(),
                label: Some(class),
                attrs: AttributeSet::default(),
                source: "unknown".into(),
                description: None,
                microns_per_pixel: None,
            });
        }
    }
    if out.is_empty() {
        bail!(
            "{}: no class folders with images (expected e.g. Neutrophil/*.jpg)",
            dir.display()
        );
    }
    Ok(out)
}

/// Resolves `--data <dir>` into train and val sample lists.
pub fn read_split(data: &Path) -> Result<(Vec<Sample>, Vec<Sample>)> {
    let (t, v) = (data.join("train.csv"), data.join("val.csv"));
    if t.is_file() && v.is_file() {
        return Ok((read_samples(&t)?, read_samples(&v)?));
    }
    let (t, v) = (data.join("train"), data.join("val"));
    if t.is_dir() && v.is_dir() {
        return Ok((read_samples(&t)?, read_samples(&v)?));
    }
    bail!(
        "{}: expected train.csv and val.csv, or train/ and val/ folders with one folder per class",
        data.display()
    )
}

/// Decodes every sample's image as it is (the model's preprocessing comes later), on all
/// cores. Bad images are returned as [`Rejected`], not errors.
pub fn load_images(samples: Vec<Sample>, limits: &DecodeLimits) -> (Vec<(Sample, RgbImage)>, Vec<Rejected>) {
    use rayon::prelude::*;
    let results: Vec<Result<(Sample, RgbImage), Rejected>> = samples
        .into_par_iter()
        .map(|smp| match load_rgb(&smp.path, limits) {
            Ok(img) => Ok((smp, img)),
            Err(e) => Err(Rejected {
                reason: e.to_string(),
                path: smp.path,
            }),
        })
        .collect();
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for r in results {
        match r {
            Ok(x) => ok.push(x),
            Err(e) => bad.push(e),
        }
    }
    (ok, bad)
}

/// Cuts every `WBC` box of a VOC field folder (`images/`, `annotations/`) into a square cell
/// image (3 × the box's longer side, centred on the box, so that the cell normalisation sees
/// the red cells around it as it would in the whole field; padded with the field's mean colour
/// beyond its edges, since a mirror would duplicate a cell cut by the edge)
/// and writes them with an unlabelled `cells.csv` (`path,source,field,box,microns_per_pixel`;
/// the pixel size from the field's red-cell boxes, or all fields' where it has too few).
/// Returns the number of cells written. An unreadable field is reported and skipped.
pub fn crop_fields(fields: &Path, out: &Path, source: &str) -> Result<usize> {
    let ann = wbc_cells::voc::read_dir(&fields.join("annotations"))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    // The red cells make the ruler: a field's own where it has enough whole ones, else the
    // median over all fields.
    let images: Vec<_> = ann.iter().map(|(_, v)| v.clone()).collect();
    let overall = red_cell_microns_per_pixel(&images);
    let mut csv = String::from("path,source,field,x0,y0,x1,y1,microns_per_pixel\n");
    let mut n = 0;
    for (_, v) in ann {
        let um = red_cell_microns_per_pixel(std::slice::from_ref(&v)).or(overall);
        let um = um.map(|u| format!("{u:.4}")).unwrap_or_default();
        let img_path = fields.join("images").join(&v.filename);
        let img = match load_rgb(&img_path, &DecodeLimits::default()) {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(path = %img_path.display(), error = %e, "skipping field");
                continue;
            }
        };
        let pad = wbc_cells::finder::mean_colour(&img);
        let stem = Path::new(&v.filename)
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        for (k, o) in v.objects.iter().filter(|o| o.name == "WBC").enumerate() {
            let [x0, y0, x1, y1] = o.bbox;
            let crop = wbc_cells::finder::cell_crop(&img, o.bbox, pad);
            let name = format!("{stem}_wbc{k}.png");
            crop.save(out.join(&name)).with_context(|| format!("writing {name}"))?;
            csv.push_str(&format!("{name},{source},{},{x0},{y0},{x1},{y1},{um}\n", v.filename));
            n += 1;
        }
    }
    std::fs::write(out.join("cells.csv"), csv)?;
    Ok(n)
}

/// Writes the normalised view of every image of a sample list, and `normalised.csv` with what
/// was measured (found, cell diameter and nucleus extent in input pixels, cut by the edge, cell
/// diameter in µm where the pixel size is known).
/// Returns (cells found, images read).
pub fn write_normalised(list: &Path, out: &Path, norm: &wbc_cells::cellnorm::CellNorm) -> Result<(usize, usize)> {
    let samples = read_samples(list)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let (loaded, rejected) = load_images(samples, &DecodeLimits::default());
    for r in &rejected {
        tracing::warn!(path = %r.path.display(), reason = %r.reason, "skipping image");
    }
    let mut csv = String::from("path,label,source,found,diameter_px,nucleus_px,touches_edge,diameter_um\n");
    let mut found = 0;
    for (i, (s, img)) in loaded.iter().enumerate() {
        let n = norm.apply(img, None, s.microns_per_pixel);
        found += usize::from(n.found);
        let name = format!("{i:05}.png");
        n.image.save(out.join(&name))?;
        let um = s
            .microns_per_pixel
            .map(|u| format!("{:.1}", n.diameter_px * u))
            .unwrap_or_default();
        csv.push_str(&format!(
            "{name},{},{},{},{:.1},{:.1},{},{um}\n",
            s.label.map(|l| l.name()).unwrap_or(""),
            s.source,
            n.found,
            n.diameter_px,
            n.nucleus_px,
            n.touches_edge
        ));
    }
    std::fs::write(out.join("normalised.csv"), csv)?;
    Ok((found, loaded.len()))
}

/// Count of samples per class label.
pub fn class_counts(samples: &[Sample]) -> [usize; 6] {
    let mut c = [0; 6];
    for s in samples {
        if let Some(l) = s.label {
            c[l.index()] += 1;
        }
    }
    c
}

/// Count per source.
pub fn source_counts(samples: &[Sample]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for s in samples {
        *m.entry(s.source.clone()).or_insert(0) += 1;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_project_csv_reference_csv_and_class_folders() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("a.csv"),
            "path,label,class_name,source,cell_size\nx/1.jpg,4,Neutrophil,pbc,big\nx/2.jpg,5,Blast,munich,\n",
        )
        .unwrap();
        let s = read_samples(&d.join("a.csv")).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].label, Some(CellClass::Neutrophil));
        assert_eq!(s[0].attrs.get("cell_size"), Some("big"));
        assert_eq!(s[1].source, "munich");
        assert_eq!(s[0].path, d.join("x/1.jpg"));
        // Known sources carry their pixel size.
        assert_eq!(s[0].microns_per_pixel, source_microns_per_pixel("pbc"));
        assert_eq!(s[1].microns_per_pixel, source_microns_per_pixel("munich"));

        // A pixel size column wins over the source's; empty falls back; nonsense is refused.
        std::fs::write(
            d.join("um.csv"),
            "path,source,microns_per_pixel\na.png,pbc,0.08\nb.png,elsewhere,\nc.png,pbc,\n",
        )
        .unwrap();
        let u = read_samples(&d.join("um.csv")).unwrap();
        assert_eq!(u[0].microns_per_pixel, Some(0.08));
        assert_eq!(u[1].microns_per_pixel, None);
        assert_eq!(u[2].microns_per_pixel, source_microns_per_pixel("pbc"));
        for bad in ["-1", "0", "inf", "NaN", "wide"] {
            std::fs::write(d.join("bad-um.csv"), format!("path,microns_per_pixel\na.png,{bad}\n")).unwrap();
            let err = format!("{:#}", read_samples(&d.join("bad-um.csv")).unwrap_err());
            assert!(err.contains("line 2") && err.contains("microns_per_pixel"), "{err}");
        }

        std::fs::write(
            d.join("ref.csv"),
            "path,description,label\np.png,\"A neutrophil, segmented.\",Neutrophil\n",
        )
        .unwrap();
        let r = read_samples(&d.join("ref.csv")).unwrap();
        assert_eq!(r[0].label, Some(CellClass::Neutrophil));
        assert_eq!(r[0].description.as_deref(), Some("A neutrophil, segmented."));

        std::fs::create_dir_all(d.join("f/Monocyte")).unwrap();
        std::fs::write(d.join("f/Monocyte/m.jpg"), b"x").unwrap();
        let f = read_samples(&d.join("f")).unwrap();
        assert_eq!(f[0].label, Some(CellClass::Monocyte));

        std::fs::write(d.join("bad.csv"), "path,label\nx.jpg,Platelet\n").unwrap();
        let err = format!("{:#}", read_samples(&d.join("bad.csv")).unwrap_err());
        assert!(err.contains("line 2") && err.contains("Platelet"), "{err}");
    }

    #[test]
    fn corrupt_and_missing_images_are_reported_and_the_rest_load() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        RgbImage::from_pixel(30, 20, image::Rgb([200, 10, 10]))
            .save(d.join("ok.png"))
            .unwrap();
        std::fs::write(d.join("corrupt.jpg"), b"\xff\xd8\xff\xe0 truncated").unwrap();
        let mk = |p: &str| Sample {
            path: d.join(p),
            label: Some(CellClass::Basophil),
            attrs: AttributeSet::default(),
            source: "t".into(),
            description: None,
            microns_per_pixel: None,
        };
        let (ok, bad) = load_images(
            vec![mk("ok.png"), mk("corrupt.jpg"), mk("missing.png")],
            &DecodeLimits::default(),
        );
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].1.dimensions(), (30, 20));
        assert_eq!(bad.len(), 2);
        assert!(
            bad.iter()
                .any(|r| r.path.ends_with("missing.png") && r.reason.contains("reading"))
        );
    }
}
