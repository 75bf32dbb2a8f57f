//! The README's first quick-start command, and what the CLI does with bad input.

use std::path::PathBuf;
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/cells")
}

fn appliance(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_appliance"))
        .args(args)
        .output()
        .expect("run appliance")
}

#[test]
fn quick_start_classifies_every_fixture_cell_with_the_default_bundle() {
    let out = appliance(&["classify", "--single-cell", "--json", fixtures().to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 7, "one JSON object per image");
    // The fixtures' true classes, from cells.csv.
    let csv = std::fs::read_to_string(fixtures().join("cells.csv")).unwrap();
    let truth: std::collections::HashMap<String, String> = csv
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].to_string(), f[2].to_string())
        })
        .collect();
    let mut correct = 0;
    for v in &lines {
        let image = v["image"].as_str().unwrap();
        let cells = v["cells"].as_array().unwrap();
        assert_eq!(cells.len(), 1);
        let c = &cells[0];
        assert_eq!(c["box"], serde_json::json!([0, 0, 224, 224]));
        let probs = c["probabilities"].as_object().unwrap();
        assert_eq!(probs.len(), 6);
        let total: f64 = probs.values().map(|p| p.as_f64().unwrap()).sum();
        assert!((total - 1.0).abs() < 1e-3);
        let conf = c["confidence"].as_f64().unwrap();
        assert!(probs.values().all(|p| p.as_f64().unwrap() <= conf + 1e-6));
        let class = c["class"].as_str().unwrap();
        let name = PathBuf::from(image).file_name().unwrap().to_string_lossy().into_owned();
        if truth[&name] == class {
            correct += 1;
        }
        let description = c["description"].as_str().unwrap();
        assert!(description.len() > 20, "{description}");
    }
    // These are real val cells the default model never trained on; it gets them right.
    assert!(
        correct >= 6,
        "only {correct} of 7 fixture cells classified correctly:\n{stdout}"
    );
}

#[test]
fn text_output_names_class_probabilities_and_description() {
    let out = appliance(&[
        "classify",
        "--single-cell",
        fixtures().join("MYO_0024.jpg").to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("MYO_0024.jpg: "), "{text}");
    assert!(text.contains("probabilities: BASO"), "{text}");
    assert!(text.contains("description: "), "{text}");
}

#[test]
fn a_corrupt_image_is_reported_and_the_others_still_classified() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\n truncated").unwrap();
    let good = fixtures().join("LY_106354.jpg");
    let out = appliance(&[
        "classify",
        "--single-cell",
        "--json",
        bad.to_str().unwrap(),
        good.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.png") && stderr.contains("cannot classify"),
        "{stderr}"
    );
    assert!(stderr.contains("1 of 2 images"), "{stderr}");
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 1);
}

#[test]
fn a_tampered_or_untrusted_bundle_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = appliance::DEFAULT_BUNDLE.to_vec();
    let at = bytes.len() * 2 / 3;
    bytes[at] ^= 0xff;
    let p = dir.path().join("tampered.bundle");
    std::fs::write(&p, &bytes).unwrap();
    let img = fixtures().join("LY_106354.jpg");
    let out = appliance(&[
        "classify",
        "--single-cell",
        "--bundle",
        p.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tampered") || stderr.contains("corrupt"), "{stderr}");

    let other = dir.path().join("other.pub");
    let k = wbc_protocol::bundle::keys::generate();
    wbc_protocol::bundle::keys::write_public(&other, &k.verifying_key()).unwrap();
    let out = appliance(&[
        "classify",
        "--single-cell",
        "--trust",
        other.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not trust"));
}

fn fields() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/fields")
}

/// The annotated white-cell boxes of a fixture field.
fn annotated_wbcs(field: &str) -> Vec<[f32; 4]> {
    let xml = std::fs::read_to_string(fields().join("annotations").join(format!("{field}.xml"))).unwrap();
    let v = wbc_cells::voc::parse(&xml, std::path::Path::new(field)).unwrap();
    v.objects.iter().filter(|o| o.name == "WBC").map(|o| o.bbox).collect()
}

#[test]
fn field_mode_finds_and_classifies_each_white_cell_with_its_box() {
    let out = appliance(&[
        "classify",
        "--json",
        "--microns-per-pixel=0.072",
        fields().join("images").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    for v in &lines {
        let image = PathBuf::from(v["image"].as_str().unwrap());
        let field = image.file_stem().unwrap().to_str().unwrap();
        let truth = annotated_wbcs(field);
        let cells = v["cells"].as_array().unwrap();
        assert_eq!(cells.len(), truth.len(), "{field}: {stdout}");
        for (c, t) in cells.iter().zip(&truth) {
            let b: Vec<f32> = c["box"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            let iou = wbc_cells::finder::iou([b[0], b[1], b[2], b[3]], *t);
            assert!(iou >= 0.5, "{field}: found {b:?}, annotated {t:?} (IoU {iou})");
            assert!(b[2] <= 640.0 && b[3] <= 480.0, "box within the field");
            let probs = c["probabilities"].as_object().unwrap();
            assert!(c["description"].as_str().unwrap().len() > 20);
            // The white cell of field 338 runs off its bottom edge (annotated as truncated):
            // reported, not classified.
            if field == "BloodImage_00338" {
                assert_eq!(c["review_reason"], "edge_cut", "{c}");
                assert_eq!(c["class"], "Unidentified");
                assert!(probs.is_empty());
            } else {
                assert_eq!(probs.len(), 6, "{c}");
                assert_ne!(c["review_reason"], "edge_cut");
            }
        }
    }
}

#[test]
fn the_finder_is_measured_on_annotated_fields() {
    let out = appliance(&["eval-finder", "--json", "--fields", fields().to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["fields"], 2);
    assert_eq!(r["annotated"], 2);
    assert_eq!(r["recall"], 1.0, "{r}");
    assert_eq!(r["precision"], 1.0, "{r}");
    assert_eq!(r["pixel_size_from"], "red_cells");
    let um = r["microns_per_pixel"].as_f64().unwrap();
    assert!((0.06..0.09).contains(&um), "{um}");
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    // A field whose annotation lacks its white cell: the report names it and what was found.
    let copy = tempfile::tempdir().unwrap();
    for sub in ["images", "annotations"] {
        std::fs::create_dir(copy.path().join(sub)).unwrap();
        for f in std::fs::read_dir(fields().join(sub)).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, copy.path().join(sub).join(f.file_name().unwrap())).unwrap();
        }
    }
    let xml = copy.path().join("annotations/BloodImage_00000.xml");
    let text = std::fs::read_to_string(&xml).unwrap();
    let start = text
        .find("<name>WBC</name>")
        .and_then(|i| text[..i].rfind("<object>"))
        .unwrap();
    let end = start + text[start..].find("</object>").unwrap() + "</object>".len();
    std::fs::write(&xml, format!("{}{}", &text[..start], &text[end..])).unwrap();
    let out = appliance(&["eval-finder", "--json", "--fields", copy.path().to_str().unwrap()]);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["precision"], 0.5, "{r}");
    assert_eq!(r["errors"][0]["field"], "BloodImage_00000.jpg", "{r}");
    assert_eq!(r["errors"][0]["false_cells"].as_array().unwrap().len(), 1, "{r}");
    let out = appliance(&["eval-finder", "--fields", copy.path().to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("BloodImage_00000.jpg: 1 found that match no annotated cell, 0 annotated missed"),
        "{text}"
    );
    // A folder without annotations is a clear error.
    let empty = tempfile::tempdir().unwrap();
    let out = appliance(&["eval-finder", "--fields", empty.path().to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("annotations"));
}

#[test]
fn blasts_are_described_by_class_not_by_attribute_heads_never_trained_on_blasts() {
    // No training blast has WBCAtt attributes, so the default bundle lists only classes 0-4 as
    // attribute-trained and must not quote its attribute heads for a blast.
    let out = appliance(&[
        "classify",
        "--single-cell",
        "--json",
        fixtures().join("MYO_0024.jpg").to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cell = &v["cells"][0];
    assert_eq!(cell["class"], "Blast");
    assert_eq!(cell["attributes"], serde_json::json!({}));
    assert!(
        cell["description"].as_str().unwrap().starts_with("This is a blast"),
        "{cell}"
    );
    // A neutrophil's description is grounded in its predicted attributes.
    let out = appliance(&[
        "classify",
        "--single-cell",
        "--json",
        fixtures().join("NGS_0022.jpg").to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["cells"][0]["attributes"].as_object().unwrap().len(), 11);
    assert!(
        v["cells"][0]["description"]
            .as_str()
            .unwrap()
            .contains("Consistent with a neutrophil")
    );
}

#[test]
fn a_blast_call_needs_a_nucleus_the_size_of_a_blasts() {
    // The fixture myeloblast's nucleus spans about 99 px: 11.6 µm at its scanner's 0.117 µm per
    // pixel, over the default bundle's size check (10.2 µm, fitted on val). Declared as
    // 0.08 µm per pixel the same picture shows a 7.9 µm nucleus — a small lymphocyte's — and the
    // blast call is held back for review as a possible blast instead of raising the blast flag.
    let cell = fixtures().join("MYO_0024.jpg");
    let classify = |um: &str| {
        let out = appliance(&[
            "classify",
            "--single-cell",
            "--json",
            &format!("--microns-per-pixel={um}"),
            cell.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["cells"][0].clone()
    };
    let true_size = classify("0.117");
    assert_eq!(true_size["class"], "Blast", "{true_size}");
    let small = classify("0.08");
    assert_eq!(small["class"], "Unidentified", "{small}");
    assert_eq!(small["review_reason"], "low_confidence", "{small}");
    let text = small["description"].as_str().unwrap();
    assert!(text.contains("possibly a blast, but its nucleus (7.9 µm)"), "{text}");
    assert!(text.contains("held back for review as a possible blast"), "{text}");
    // The probabilities are the model's either way: only the call differs.
    assert_eq!(small["probabilities"], true_size["probabilities"]);
}

#[test]
fn a_nonsensical_pixel_size_is_refused() {
    let cell = fixtures().join("MYO_0024.jpg");
    for bad in ["0", "-0.1", "NaN", "inf", "1000"] {
        let out = appliance(&[
            "classify",
            "--single-cell",
            &format!("--microns-per-pixel={bad}"),
            cell.to_str().unwrap(),
        ]);
        assert!(!out.status.success(), "{bad} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--microns-per-pixel"), "{bad}: {err}");
    }
    // A plausible one is used.
    let out = appliance(&[
        "classify",
        "--single-cell",
        "--microns-per-pixel=0.12",
        cell.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_folder_without_images_is_named_with_its_subfolders() {
    // The usual mistake: a folder of per-class folders. Subfolders are not searched; the error
    // says which folder was empty and which subfolders to give instead.
    let dir = tempfile::tempdir().unwrap();
    for class in ["Blast", "Basophil"] {
        std::fs::create_dir(dir.path().join(class)).unwrap();
        std::fs::copy(fixtures().join("MYO_0024.jpg"), dir.path().join(class).join("cell.jpg")).unwrap();
    }
    std::fs::write(dir.path().join("notes.txt"), "not an image").unwrap();
    let out = appliance(&["classify", "--single-cell", dir.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has no images"), "{err}");
    assert!(err.contains("Basophil, Blast"), "{err}");
    // A folder given beside one with images is not skipped silently either.
    let out = appliance(&[
        "classify",
        "--single-cell",
        fixtures().to_str().unwrap(),
        dir.path().join("Blast").to_str().unwrap(),
        dir.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    // Each subfolder given on its own works.
    let out = appliance(&[
        "classify",
        "--single-cell",
        "--json",
        dir.path().join("Blast").to_str().unwrap(),
        dir.path().join("Basophil").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
}

/// A site folder (in a subfolder, as a clinic's export may be) of the fixture cells, each
/// also turned and mirrored: 35 cells of the training sources' look.
fn site_of_fixture_cells(dir: &std::path::Path) {
    let site = dir.join("site/slide-1");
    std::fs::create_dir_all(&site).unwrap();
    for entry in std::fs::read_dir(fixtures()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "jpg") {
            continue;
        }
        let img = image::open(&path).unwrap().to_rgb8();
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        let turns = [
            img.clone(),
            image::imageops::rotate90(&img),
            image::imageops::rotate180(&img),
            image::imageops::rotate270(&img),
            image::imageops::flip_horizontal(&img),
        ];
        for (i, t) in turns.iter().enumerate() {
            t.save(site.join(format!("{stem}-{i}.png"))).unwrap();
        }
    }
}

#[test]
fn adapting_to_a_site_like_the_training_sources_keeps_the_answers() {
    let dir = tempfile::tempdir().unwrap();
    site_of_fixture_cells(dir.path());
    let site = dir.path().join("site");
    let plain = appliance(&["classify", "--single-cell", "--json", fixtures().to_str().unwrap()]);
    let adapted = appliance(&[
        "classify",
        "--single-cell",
        "--json",
        "--adapt-to",
        site.to_str().unwrap(),
        fixtures().to_str().unwrap(),
    ]);
    assert!(adapted.status.success(), "{}", String::from_utf8_lossy(&adapted.stderr));
    let stderr = String::from_utf8_lossy(&adapted.stderr);
    assert!(stderr.contains("adapted to 35 cells of the site"), "{stderr}");
    let classes = |out: &std::process::Output| -> Vec<(String, f64)> {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let c = &v["cells"][0];
                let p = c["probabilities"].as_object().unwrap();
                let best = p
                    .iter()
                    .max_by(|a, b| a.1.as_f64().unwrap().total_cmp(&b.1.as_f64().unwrap()))
                    .unwrap();
                (best.0.clone(), c["probabilities"]["Blast"].as_f64().unwrap())
            })
            .collect()
    };
    let (before, after) = (classes(&plain), classes(&adapted));
    assert_eq!(after.len(), 7);
    // The adaptation is applied (the probabilities move) but, at a site that looks like the
    // training sources, the network's answer stays what it was for every cell.
    assert_ne!(before, after, "the adaptation changed nothing");
    let same = before.iter().zip(&after).filter(|(b, a)| b.0 == a.0).count();
    assert_eq!(same, 7, "before {before:?}\nafter {after:?}");
}

#[test]
fn too_few_site_cells_or_none_are_refused_before_anything_is_classified() {
    let few = appliance(&[
        "classify",
        "--single-cell",
        "--adapt-to",
        fixtures().to_str().unwrap(),
        fixtures().to_str().unwrap(),
    ]);
    assert!(!few.status.success());
    assert!(few.stdout.is_empty(), "nothing is classified unadapted");
    let stderr = String::from_utf8_lossy(&few.stderr);
    assert!(
        stderr.contains("7 cells are too few to adapt to a site (at least 30)"),
        "{stderr}"
    );

    let empty = tempfile::tempdir().unwrap();
    let none = appliance(&[
        "classify",
        "--single-cell",
        "--adapt-to",
        empty.path().to_str().unwrap(),
        fixtures().to_str().unwrap(),
    ]);
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("holds no images to adapt to"));
}
