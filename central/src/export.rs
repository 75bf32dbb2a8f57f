//! `central export-reviews`: a clinic's reviewed cells as the trainer reads them — one JPEG
//! per cell (the picture the technician reviewed) and `reviews.csv` with `path,label` first
//! (paths relative to the CSV), then where each cell came from and what the model had said.
//! `trainer adapt --csv DIR/reviews.csv` makes the clinic's site bundle from it.

use crate::db::{Db, ReviewKey};
use anyhow::{Context, Result, bail};
use std::path::Path;

/// Reviewed cells read from the database at a time.
const PAGE: usize = 500;

/// What an export wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    /// Cells written, per class name.
    pub per_class: std::collections::BTreeMap<String, usize>,
    /// Reviews of the clinic central holds (including those without a class or a picture).
    pub reviews: u64,
}

impl Exported {
    /// Cells written.
    pub fn cells(&self) -> usize {
        self.per_class.values().sum()
    }
}

/// Writes `clinic`'s reviewed cells into `out`, a folder that must not exist yet or be empty
/// (an export never mixes with another). The CSV is written last, through a temporary name:
/// a folder without `reviews.csv` is an export that did not finish.
/// With `since` (seconds since the Unix epoch), only the cells reviewed then or later: the
/// reviews that came in since the last export.
pub fn export_reviews(db: &Db, clinic: &str, out: &Path, since: Option<u64>) -> Result<Exported> {
    export_paged(db, clinic, out, since, PAGE)
}

fn export_paged(db: &Db, clinic: &str, out: &Path, since: Option<u64>, page: usize) -> Result<Exported> {
    if !wbc_protocol::uplink::valid_id(clinic) {
        bail!("{clinic:?} is not a clinic id");
    }
    if out.exists() && std::fs::read_dir(out)?.next().is_some() {
        bail!("{} is not empty: export into a new folder", out.display());
    }
    let cells_dir = out.join("cells");
    std::fs::create_dir_all(&cells_dir).with_context(|| format!("creating {}", cells_dir.display()))?;
    let tmp = out.join("reviews.csv.partial");
    let mut csv = csv::Writer::from_path(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    csv.write_record([
        "path",
        "label",
        "clinic",
        "device",
        "field_id",
        "index",
        "model_class",
        "reviewed_by",
        "reviewed_at",
    ])?;
    let mut per_class = std::collections::BTreeMap::new();
    let mut n = 0usize;
    let mut after: Option<ReviewKey> = None;
    loop {
        let (cells, next) = db.reviewed_cells(clinic, after.as_ref(), page)?;
        for c in cells.into_iter().filter(|c| since.is_none_or(|s| c.at >= s)) {
            n += 1;
            // Numbered names: nothing a device sent becomes part of a path.
            let name = format!("cells/{n:06}.jpg");
            std::fs::write(out.join(&name), &c.jpeg).with_context(|| format!("writing {name}"))?;
            csv.write_record([
                name.as_str(),
                c.class.name(),
                clinic,
                &c.device,
                &c.field_id,
                &c.index.to_string(),
                c.model_class.as_deref().unwrap_or(""),
                &c.by,
                &c.at.to_string(),
            ])?;
            *per_class.entry(c.class.name().to_string()).or_insert(0) += 1;
        }
        match next {
            Some(k) => after = Some(k),
            None => break,
        }
    }
    csv.flush()?;
    drop(csv);
    std::fs::rename(&tmp, out.join("reviews.csv")).context("naming reviews.csv")?;
    Ok(Exported {
        per_class,
        reviews: db.review_count(clinic)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::tests::jpeg;
    use crate::sql::databases;
    use wbc_protocol::classes::CellClass;
    use wbc_protocol::messages::{FieldRecord, Review};
    use wbc_protocol::uplink::{Body, CellMessage, Envelope, ReviewMessage};

    fn field(id: &str, cells: usize) -> FieldRecord {
        crate::db::tests::field(id, "s", &vec![CellClass::Neutrophil.index(); cells])
    }

    struct Sender<'a> {
        db: &'a Db,
        seq: u64,
    }

    impl Sender<'_> {
        fn send(&mut self, clinic: &str, device: &str, body: Body) {
            self.seq += 1;
            self.db
                .apply(&Envelope::new(clinic, device, self.seq, 1, body))
                .unwrap();
        }

        fn review(
            &mut self,
            (clinic, device, field): (&str, &str, &str),
            index: u32,
            class: Option<CellClass>,
            at: u64,
            picture: Option<String>,
        ) {
            let body = Body::Review(ReviewMessage {
                field_id: field.into(),
                slide_id: "s".into(),
                index,
                review: Review {
                    class,
                    by: "tech".into(),
                    at,
                },
                picture,
            });
            self.send(clinic, device, body);
        }
    }

    #[test]
    fn a_clinics_reviewed_cells_are_written_with_their_pictures_and_nothing_else() {
        for (_guard, path) in databases() {
            let db = Db::open(&path).unwrap();
            let mut s = Sender { db: &db, seq: 0 };
            for (clinic, device, f) in [("a", "dev1", "f1"), ("a", "dev2", "f2"), ("b", "dev1", "f1")] {
                for b in Body::cells_of(&field(f, 5)) {
                    s.send(clinic, device, b);
                }
            }
            let pic = |side: u32| Some(CellMessage::encode_picture(&jpeg(side)));
            let mut corrupt = jpeg(40);
            corrupt.truncate(corrupt.len() / 2);
            let (a1, a2, b1) = (("a", "dev1", "f1"), ("a", "dev2", "f2"), ("b", "dev1", "f1"));
            // Reviewed on its picture, then changed by a later review: the later class counts.
            s.review(a1, 0, Some(CellClass::Lymphocyte), 10, pic(32));
            s.review(a1, 0, Some(CellClass::Monocyte), 20, None);
            // An older review arriving late changes nothing.
            s.review(a1, 0, Some(CellClass::Basophil), 15, None);
            s.review(a1, 1, None, 10, pic(33)); // not a white cell: nothing to teach
            s.review(a1, 2, Some(CellClass::Eosinophil), 10, None); // reviewed before pictures travelled
            s.review(
                a1,
                3,
                Some(CellClass::Eosinophil),
                10,
                Some(CellMessage::encode_picture(&corrupt)),
            );
            s.review(a1, 4, Some(CellClass::Eosinophil), 10, pic(34));
            for i in 0..3 {
                s.review(a2, i, Some(CellClass::Neutrophil), 10, pic(35 + i));
            }
            s.review(b1, 0, Some(CellClass::Blast), 10, pic(50)); // another clinic's
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("export");
            let e = export_paged(&db, "a", &out, None, 2).unwrap();
            assert_eq!(e.cells(), 5);
            assert_eq!(e.reviews, 8);
            let mut rdr = csv::Reader::from_path(out.join("reviews.csv")).unwrap();
            assert_eq!(
                &rdr.headers().unwrap().iter().take(2).collect::<Vec<_>>(),
                &["path", "label"]
            );
            let rows: Vec<Vec<String>> = rdr
                .records()
                .map(|r| r.unwrap().iter().map(String::from).collect())
                .collect();
            let got: Vec<(&str, &str, &str, &str, &str)> = rows
                .iter()
                .map(|r| {
                    (
                        r[1].as_str(),
                        r[3].as_str(),
                        r[4].as_str(),
                        r[5].as_str(),
                        r[6].as_str(),
                    )
                })
                .collect();
            assert_eq!(
                got,
                [
                    ("Monocyte", "dev1", "f1", "0", "Neutrophil"),
                    ("Eosinophil", "dev1", "f1", "4", "Neutrophil"),
                    ("Neutrophil", "dev2", "f2", "0", "Neutrophil"),
                    ("Neutrophil", "dev2", "f2", "1", "Neutrophil"),
                    ("Neutrophil", "dev2", "f2", "2", "Neutrophil"),
                ]
            );
            // Each file is the picture the technician saw.
            for (r, side) in rows.iter().zip([32, 34, 35, 36, 37]) {
                assert_eq!(std::fs::read(out.join(&r[0])).unwrap(), jpeg(side), "{}", r[0]);
                assert!(r[0].starts_with("cells/") && !r[0].contains(".."));
            }
            assert!(!out.join("reviews.csv.partial").exists());
            // An export never mixes with another, and a hostile clinic id goes nowhere.
            let again = export_reviews(&db, "a", &out, None).unwrap_err().to_string();
            assert!(again.contains("not empty"), "{again}");
            assert!(export_reviews(&db, "../a", &dir.path().join("x"), None).is_err());
            // Only what was reviewed since a time: the later review of a1's first cell.
            let recent = dir.path().join("recent");
            let e = export_paged(&db, "a", &recent, Some(15), 2).unwrap();
            assert_eq!(e.per_class, [("Monocyte".to_string(), 1)].into());
            let csv = std::fs::read_to_string(recent.join("reviews.csv")).unwrap();
            assert_eq!(csv.lines().count(), 2, "{csv}");
            assert!(csv.contains("cells/000001.jpg,Monocyte,a,dev1,f1,0,"), "{csv}");
            // A clinic without reviews gives an empty, readable CSV.
            let none = export_reviews(&db, "c", &dir.path().join("c"), None).unwrap();
            assert_eq!((none.cells(), none.reviews), (0, 0));
        }
    }
}
