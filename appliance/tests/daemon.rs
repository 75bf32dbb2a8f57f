//! `appliance run` as a clinic uses it: the web UI (with a login), uploads good and bad, the
//! inbox across restarts, and a real browser (headless Chromium through chromedriver).

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const USER: &str = "tech";
const PASSWORD: &str = "correct horse";

fn fixture_field(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/fields/images")
        .join(name)
}

/// A running daemon on a free port, killed on drop.
struct Daemon {
    child: Child,
    base: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a configuration for `data` (one user, inbox polled every 100 ms, any free port).
fn config(data: &Path) -> PathBuf {
    let hash = appliance::config::hash_password(PASSWORD).unwrap();
    let path = data.join("appliance.toml");
    std::fs::create_dir_all(data).unwrap();
    std::fs::write(
        &path,
        format!(
            "data_dir = {data:?}\nmicrons_per_pixel = 0.072\ninbox_poll_ms = 100\n\
             [web]\nlisten = \"127.0.0.1:0\"\nmax_upload_bytes = 1048576\n[[web.users]]\nname = \"{USER}\"\npassword_hash = \"{hash}\"\n",
            data = data.join("data")
        ),
    )
    .unwrap();
    path
}

impl Daemon {
    fn start(config: &Path) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_appliance"))
            .args(["run", "--config", config.to_str().unwrap()])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start the daemon");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let base = loop {
            let line = lines.next().expect("the daemon stopped before listening").unwrap();
            if let Some(addr) = line.strip_prefix("web UI on ") {
                break addr.trim().to_string();
            }
        };
        // Keep draining its log so that it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Daemon { child, base }
    }

    fn agent(&self) -> ureq::Agent {
        ureq::AgentBuilder::new().redirects(0).build()
    }

    /// Logs in; returns the session cookie.
    fn login(&self) -> String {
        let r = self
            .agent()
            .post(&format!("{}/login", self.base))
            .send_form(&[("user", USER), ("password", PASSWORD)])
            .unwrap();
        assert_eq!(r.status(), 303);
        r.header("set-cookie").unwrap().split(';').next().unwrap().to_string()
    }

    /// Uploads bytes as a multipart form; returns (status, body, location).
    fn upload(&self, cookie: &str, name: &str, bytes: &[u8]) -> (u16, String, Option<String>) {
        self.try_upload(cookie, name, bytes)
            .unwrap_or_else(|e| panic!("upload of {name}: {e}"))
    }

    /// An upload; a transport error (the server may close the connection on an oversized body
    /// before the client has finished sending it) is returned, not a panic.
    fn try_upload(&self, cookie: &str, name: &str, bytes: &[u8]) -> Result<(u16, String, Option<String>), String> {
        let boundary = "----wbc-test-boundary";
        let mut body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .into_bytes();
        body.extend_from_slice(bytes);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let r = self
            .post(cookie, "/upload")
            .set("Content-Type", &format!("multipart/form-data; boundary={boundary}"))
            .send_bytes(&body);
        let r = match r {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(e.to_string()),
        };
        let location = r.header("location").map(String::from);
        Ok((r.status(), r.into_string().unwrap(), location))
    }

    /// A page's HTML, logged in.
    fn page(&self, cookie: &str, path: &str) -> String {
        self.agent()
            .get(&format!("{}{path}", self.base))
            .set("Cookie", cookie)
            .call()
            .unwrap()
            .into_string()
            .unwrap()
    }

    /// The form token of a session, as the pages' forms carry it.
    fn form_token(&self, cookie: &str) -> String {
        let home = self.page(cookie, "/");
        home.split("csrf=")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .expect("the page's forms carry the session's form token")
            .to_string()
    }

    /// A POST of `path` in the session, with its form token, as the pages' forms send it.
    fn post(&self, cookie: &str, path: &str) -> ureq::Request {
        let sep = if path.contains('?') { '&' } else { '?' };
        self.agent()
            .post(&format!("{}{path}{sep}csrf={}", self.base, self.form_token(cookie)))
            .set("Cookie", cookie)
    }

    /// `/health`, which needs no login.
    fn health(&self) -> Value {
        ureq::get(&format!("{}/health", self.base))
            .call()
            .unwrap()
            .into_json()
            .unwrap()
    }

    fn slide(&self, cookie: &str) -> Value {
        self.agent()
            .get(&format!("{}/api/slide", self.base))
            .set("Cookie", cookie)
            .call()
            .unwrap()
            .into_json()
            .unwrap()
    }
}

/// The model version of the embedded default bundle (the factory model a fresh daemon runs).
fn factory_version() -> u64 {
    appliance::open_bundle(None, &appliance::trusted_keys(&[]).unwrap())
        .unwrap()
        .manifest
        .model_version
}

/// CRC-32 (IEEE), as PNG chunks carry it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

/// Waits for a condition, failing after a generous deadline.
fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ok() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn bundles_on_a_usb_stick_are_refused_or_installed_and_the_models_page_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let usb = dir.path().join("usb");
    std::fs::create_dir(&usb).unwrap();
    let lab = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let lab_pub = dir.path().join("lab.pub");
    wbc_protocol::bundle::keys::write_public(&lab_pub, &lab.verifying_key()).unwrap();
    let release_pub = dir.path().join("release.pub");
    std::fs::write(&release_pub, appliance::DEFAULT_KEY).unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!("trust = [{release_pub:?}, {lab_pub:?}]\n{text}[update]\nusb_dir = {usb:?}\npoll_s = 1\n"),
    )
    .unwrap();
    let d = Daemon::start(&cfg);
    let cookie = d.login();
    let models = || -> Value {
        d.agent()
            .get(&format!("{}/api/models", d.base))
            .set("Cookie", &cookie)
            .call()
            .unwrap()
            .into_json()
            .unwrap()
    };
    let v0 = models()["status"]["active"]["model_version"].as_u64().unwrap();
    let forger = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    std::fs::write(
        usb.join("a-forged.bundle"),
        appliance::default_bundle_as(v0 + 2, &forger),
    )
    .unwrap();
    std::fs::write(usb.join("b-good.bundle"), appliance::default_bundle_as(v0 + 1, &lab)).unwrap();
    // The models page says it first; the classifier is swapped a moment later.
    wait_for("the USB bundle to become active", || {
        models()["status"]["active"]["model_version"] == v0 + 1 && d.health()["model_version"] == v0 + 1
    });
    let page = d.page(&cookie, "/models");
    assert!(
        page.contains("USB (a-forged.bundle): bundle is signed by key"),
        "{page}"
    );
    assert!(page.contains("which this device does not trust"), "{page}");
    assert!(page.contains("USB (b-good.bundle): version"), "{page}");
    assert!(page.contains("fallback: version"), "{page}");
    let index = d.page(&cookie, "/");
    assert!(index.contains("on probation, 0 of 20 fields"), "{index}");
    // A field is now classified by the new model.
    let (status, _, location) = d.upload(
        &cookie,
        "field.jpg",
        &std::fs::read(fixture_field("BloodImage_00000.jpg")).unwrap(),
    );
    assert_eq!(status, 303);
    let id = location.unwrap().trim_start_matches("/field/").to_string();
    let field: Value = d
        .agent()
        .get(&format!("{}/api/field/{id}", d.base))
        .set("Cookie", &cookie)
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    let cells = field["cells"].as_array().unwrap();
    assert!(!cells.is_empty());
    for c in cells {
        assert_eq!(c["result"]["model_version"], v0 + 1, "{c}");
    }
}

#[test]
fn nothing_but_health_is_served_without_a_login() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&config(dir.path()));
    let health = d.health();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["model_version"], factory_version());
    assert!(health["backend"].as_str().unwrap().contains("CPU"));
    // Both backlogs: not yet at the broker (without an uplink: all, the model's first event
    // among them), and at the broker but not confirmed by central.
    assert!(health["uplink"]["backlog"].as_u64().unwrap() >= 1, "{health}");
    assert_eq!(health["uplink"]["unsent"], health["uplink"]["backlog"], "{health}");
    assert_eq!(health["uplink"]["unconfirmed"], 0, "{health}");
    let r = d.agent().get(&format!("{}/", d.base)).call().unwrap();
    assert_eq!((r.status(), r.header("location")), (303, Some("/login")));
    for path in ["/review", "/field/abc/cell/0/image"] {
        let r = d.agent().get(&format!("{}{path}", d.base)).call().unwrap();
        assert_eq!((r.status(), r.header("location")), (303, Some("/login")), "{path}");
    }
    for path in ["/api/slide", "/api/field/abc", "/api/config-schema"] {
        match d.agent().get(&format!("{}{path}", d.base)).call() {
            Err(ureq::Error::Status(401, _)) => {}
            other => panic!("{path}: {other:?}"),
        }
    }
    match d
        .agent()
        .post(&format!("{}/login", d.base))
        .send_form(&[("user", USER), ("password", "wrong")])
    {
        Err(ureq::Error::Status(401, r)) => assert!(r.header("set-cookie").is_none()),
        other => panic!("wrong password: {other:?}"),
    }
    // A forged cookie is no session.
    match d
        .agent()
        .get(&format!("{}/api/slide", d.base))
        .set("Cookie", "wbc_session=forged")
        .call()
    {
        Err(ureq::Error::Status(401, _)) => {}
        other => panic!("forged cookie: {other:?}"),
    }
}

#[test]
fn the_review_list_shows_each_waiting_cell_and_takes_its_review_in_one_click() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&config(dir.path()));
    let cookie = d.login();
    // Field 00000: one cell the default model sets aside (unfamiliar); field 00338: one cell
    // cut by the field's edge, which waits for nobody.
    let mut ids = Vec::new();
    for name in ["BloodImage_00000.jpg", "BloodImage_00338.jpg"] {
        let (status, _, location) = d.upload(&cookie, name, &std::fs::read(fixture_field(name)).unwrap());
        assert_eq!(status, 303, "{name}");
        ids.push(location.unwrap().trim_start_matches("/field/").to_string());
    }
    let list = d.page(&cookie, "/review");
    assert!(list.contains(&format!("id=\"wait-{}-1\"", ids[0])), "{list}");
    assert!(!list.contains(&ids[1]), "an edge-cut cell is not for review: {list}");
    let src = format!("/field/{}/cell/0/image", ids[0]);
    assert!(list.contains(&format!("src=\"{src}\"")), "{list}");
    assert_eq!(
        list.matches("name=\"next\" value=\"review\"").count(),
        3,
        "two one-click classes and the full list"
    );

    // The cell's picture: the square the classifier saw, small enough for a list.
    let r = d
        .agent()
        .get(&format!("{}{src}", d.base))
        .set("Cookie", &cookie)
        .call()
        .unwrap();
    assert_eq!(r.header("content-type"), Some("image/jpeg"));
    // The slide's report as a PDF, made without a browser.
    let pdf = d
        .agent()
        .get(&format!("{}/slide/report.pdf", d.base))
        .set("Cookie", &cookie)
        .call()
        .unwrap();
    assert_eq!(pdf.header("content-type"), Some("application/pdf"));
    assert!(
        pdf.header("content-disposition")
            .unwrap()
            .starts_with("attachment; filename=\"slide-")
    );
    let mut bytes = Vec::new();
    pdf.into_reader().read_to_end(&mut bytes).unwrap();
    assert!(bytes.starts_with(b"%PDF-") && bytes.windows(12).any(|w| w == b"(Neutrophil)"));
    let missing = d
        .agent()
        .get(&format!("{}/slide/report?slide=no-such-slide", d.base))
        .set("Cookie", &cookie)
        .call();
    assert!(matches!(missing, Err(ureq::Error::Status(404, _))), "{missing:?}");
    // In the clinic's language: French, and a language the appliance does not know.
    let fr = d
        .agent()
        .get(&format!("{}/slide/report?lang=fr", d.base))
        .set("Cookie", &cookie)
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        fr.contains("<html lang=\"fr\"") && fr.contains("Formule leucocytaire"),
        "{fr}"
    );
    assert!(fr.contains("pré-classification"), "{fr}");
    let unknown = d
        .agent()
        .get(&format!("{}/slide/report?lang=xx", d.base))
        .set("Cookie", &cookie)
        .call();
    assert!(matches!(unknown, Err(ureq::Error::Status(400, _))), "{unknown:?}");
    let mut jpeg = Vec::new();
    r.into_reader().read_to_end(&mut jpeg).unwrap();
    let picture = image::load_from_memory_with_format(&jpeg, image::ImageFormat::Jpeg).unwrap();
    assert_eq!(picture.width(), picture.height(), "a square around the cell");
    assert!((64..=256).contains(&picture.width()), "{}", picture.width());
    for missing in [
        format!("/field/{}/cell/1/image", ids[0]),
        format!("/field/{}/cell/99999999999/image", ids[0]),
        "/field/no-such-field/cell/0/image".to_string(),
        "/field/..%2F..%2Fetc/cell/0/image".to_string(),
    ] {
        match d
            .agent()
            .get(&format!("{}{missing}", d.base))
            .set("Cookie", &cookie)
            .call()
        {
            Err(ureq::Error::Status(404, _)) => {}
            other => panic!("{missing}: {other:?}"),
        }
    }

    // Nothing is chosen for a cell not yet reviewed, and saving without a choice changes nothing.
    let field_page = d.page(&cookie, &format!("/field/{}", ids[0]));
    assert!(
        field_page.contains("<option value=\"\" disabled selected>"),
        "{field_page}"
    );
    assert!(
        !field_page.contains("value=\"none\" selected"),
        "not a white cell is never the default"
    );
    assert!(!list.contains("\" selected>"), "nor a class on the review list: {list}");
    match d
        .post(&cookie, &format!("/field/{}/cell/0/review", ids[0]))
        .send_form(&[("class", ""), ("next", "review")])
    {
        Err(ureq::Error::Status(400, r)) => assert!(r.into_string().unwrap().contains("Nothing was changed")),
        other => panic!("saved without a choice: {other:?}"),
    }
    assert!(
        d.page(&cookie, "/review")
            .contains(&format!("id=\"wait-{}-1\"", ids[0])),
        "still waiting"
    );

    // One click: reviewed, back to the list, which is now empty.
    let r = d
        .post(&cookie, &format!("/field/{}/cell/0/review", ids[0]))
        .send_form(&[("class", "Lymphocyte"), ("next", "review")])
        .unwrap();
    assert_eq!((r.status(), r.header("location")), (303, Some("/review")));
    assert!(d.page(&cookie, "/review").contains("Nothing waits for review."));
    assert_eq!(d.slide(&cookie)["per_class"]["Lymphocyte"]["count"], 1);
    // Anywhere else than the list, the review goes back to the cell's field.
    let r = d
        .post(&cookie, &format!("/field/{}/cell/0/review", ids[0]))
        .send_form(&[("class", "Monocyte"), ("next", "https://elsewhere.example")])
        .unwrap();
    assert_eq!(r.header("location"), Some(format!("/field/{}#cell-1", ids[0]).as_str()));
    // Once reviewed, the reviewer's answer is what the field page shows chosen.
    let field_page = d.page(&cookie, &format!("/field/{}", ids[0]));
    assert!(
        field_page.contains("<option value=\"Monocyte\" selected>"),
        "{field_page}"
    );
}

#[test]
fn bad_uploads_are_refused_with_a_reason_and_nothing_stored_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&config(dir.path()));
    let cookie = d.login();
    // The configuration schema is served to a logged-in user (for the settings page).
    let schema: Value = d
        .agent()
        .get(&format!("{}/api/config-schema", d.base))
        .set("Cookie", &cookie)
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(schema["additionalProperties"], false);
    let good = std::fs::read(fixture_field("BloodImage_00000.jpg")).unwrap();
    let (status, _, location) = d.upload(&cookie, "field.jpg", &good);
    assert_eq!(status, 303);
    let field_url = location.unwrap();
    assert!(field_url.starts_with("/field/"));
    let before = d.slide(&cookie);
    assert_eq!(before["fields"], 1);

    // A PNG header claiming 100000 × 100000 pixels: a decompression bomb.
    let mut bomb = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut bomb),
        &[0u8; 3],
        1,
        1,
        image::ExtendedColorType::Rgb8,
    )
    .unwrap();
    bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    // A valid header: the chunk's CRC over its type and data.
    let crc = crc32(&bomb[12..29]);
    bomb[29..33].copy_from_slice(&crc.to_be_bytes());
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("empty.jpg", Vec::new()),
        ("notes.txt", b"this is not an image".to_vec()),
        ("truncated.jpg", good[..good.len() / 3].to_vec()),
        ("corrupt.jpg", {
            let mut c = good.clone();
            for b in c.iter_mut().skip(600).step_by(7) {
                *b = 0xFF;
            }
            c
        }),
        ("bomb.png", bomb),
    ];
    for (name, bytes) in &bad {
        let (status, body, _) = d.upload(&cookie, name, bytes);
        assert_eq!(status, 400, "{name}: {body}");
        assert!(body.contains("id=\"error\""), "{name}: {body}");
        assert!(
            body.contains(name) || body.contains("empty"),
            "{name}: the message names the file or the problem: {body}"
        );
    }
    // Too large for the upload limit (1 MiB in this configuration) altogether.
    match d.try_upload(&cookie, "huge.jpg", &vec![0u8; 2 << 20]) {
        Ok((status, _, _)) => assert_eq!(status, 413),
        // Refused before the client finished sending: also a refusal.
        Err(e) => assert!(e.contains("Broken pipe") || e.contains("reset"), "{e}"),
    }
    // Still alive, and the first field is intact.
    assert_eq!(d.slide(&cookie), before);
    let page = d.page(&cookie, &field_url);
    assert!(page.contains("<rect"), "{page}");
    // The same image again is the same field.
    let (_, _, again) = d.upload(&cookie, "copy.jpg", &good);
    assert_eq!(again.as_deref(), Some(field_url.as_str()));
    assert_eq!(d.slide(&cookie)["fields"], 1);
}

#[test]
fn a_camera_capture_becomes_a_field_of_the_slide() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    // A recorded camera: two frames, then the end of the recording.
    let frames = dir.path().join("frames");
    std::fs::create_dir_all(&frames).unwrap();
    std::fs::copy(fixture_field("BloodImage_00000.jpg"), frames.join("0001.jpg")).unwrap();
    std::fs::write(frames.join("0002.jpg"), b"a frame the camera garbled").unwrap();
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!("[camera.replay]\nfolder = {frames:?}\n"));
    std::fs::write(&cfg, text).unwrap();
    let d = Daemon::start(&cfg);
    let cookie = d.login();
    let home = d.page(&cookie, "/");
    assert!(
        home.contains("id=\"capture\"") && home.contains("recorded frames"),
        "{home}"
    );
    let capture = || match d.post(&cookie, "/capture").call() {
        Ok(r) => (r.status(), r.header("location").map(String::from)),
        Err(ureq::Error::Status(code, _)) => (code, None),
        Err(e) => panic!("{e}"),
    };
    let (status, location) = capture();
    assert_eq!(status, 303);
    let field: Value = d
        .agent()
        .get(&format!("{}/api{}", d.base, location.unwrap()))
        .set("Cookie", &cookie)
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(field["source"], "camera");
    assert_eq!(field["cells"].as_array().unwrap().len(), 1);
    // A garbled frame and the end of the recording are errors, not crashes.
    assert_eq!(capture().0, 400);
    assert_eq!(capture().0, 400);
    assert_eq!(d.slide(&cookie)["fields"], 1);
}

#[test]
fn an_inbox_image_that_meets_a_full_disk_waits_in_the_inbox_and_health_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    // No disk has this much free: every new field is refused for a reason of the moment.
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str("[store]\nmin_free_bytes = 18446744073709551615\n");
    std::fs::write(&cfg, text).unwrap();
    let inbox = dir.path().join("data/inbox");
    let d = Daemon::start(&cfg);
    std::fs::copy(fixture_field("BloodImage_00000.jpg"), inbox.join("a.jpg")).unwrap();
    wait_for("the inbox to report the waiting image", || {
        d.health()["inbox_waiting"].as_array().is_some_and(|w| !w.is_empty())
    });
    let w = &d.health()["inbox_waiting"][0];
    assert_eq!(w["file"], "a.jpg");
    assert!(w["reason"].as_str().unwrap().contains("nearly full"), "{w}");
    assert!(inbox.join("a.jpg").exists(), "the image stays in the inbox");
    assert!(!inbox.join("rejected/a.jpg").exists(), "and is not given up on");
}

#[test]
fn health_and_the_models_page_show_the_site_adaptation_and_a_technician_can_reset_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str("[adaptation]\nafter_cells = 40\n");
    std::fs::write(&cfg, text).unwrap();
    let d = Daemon::start(&cfg);
    let cookie = d.login();
    assert_eq!(
        d.health()["adaptation"],
        serde_json::json!({"state": "collecting", "seen": 0, "needed": 40})
    );
    let (status, _, _) = d.upload(
        &cookie,
        "f.jpg",
        &std::fs::read(fixture_field("BloodImage_00000.jpg")).unwrap(),
    );
    assert_eq!(status, 303);
    let seen = d.health()["adaptation"]["seen"].as_u64().unwrap();
    assert!(seen >= 1, "the field's cells count towards the adaptation");
    assert!(d.page(&cookie, "/").contains(&format!("{seen} of 40 cells seen")));
    assert!(d.page(&cookie, "/models").contains("id=\"site-reset\""));
    let r = d.post(&cookie, "/site/reset").call().unwrap();
    assert_eq!((r.status(), r.header("location")), (303, Some("/models")));
    assert_eq!(d.health()["adaptation"]["seen"], 0);
    let page = d.page(&cookie, "/models");
    assert!(
        page.contains("site adaptation reset by"),
        "the model log says who reset it"
    );
    // Not without a login.
    let r = d.agent().post(&format!("{}/site/reset", d.base)).call().unwrap();
    assert_eq!((r.status(), r.header("location")), (303, Some("/login")));
}

#[test]
fn the_inbox_takes_each_image_once_even_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let inbox = dir.path().join("data/inbox");
    let d = Daemon::start(&cfg);
    let cookie = d.login();
    std::fs::copy(fixture_field("BloodImage_00000.jpg"), inbox.join("a.jpg")).unwrap();
    std::fs::write(inbox.join("broken.jpg"), b"\xff\xd8\xff\xe0 not really").unwrap();
    std::fs::write(inbox.join("b.jpg.part"), b"still copying").unwrap();
    wait_for("the inbox image to be stored", || d.slide(&cookie)["fields"] == 1);
    wait_for("the inbox to empty", || !inbox.join("a.jpg").exists());
    wait_for("the broken file to be set aside", || {
        inbox.join("rejected/broken.jpg").exists()
    });
    let reason = std::fs::read_to_string(inbox.join("rejected/broken.jpg.reason.txt")).unwrap();
    assert!(reason.contains("broken.jpg"), "{reason}");
    assert!(inbox.join("b.jpg.part").exists(), "a partial copy is left alone");
    drop(d);

    // The stick is plugged in again with the same image: one field, not two.
    std::fs::copy(fixture_field("BloodImage_00000.jpg"), inbox.join("a again.jpg")).unwrap();
    std::fs::copy(fixture_field("BloodImage_00338.jpg"), inbox.join("c.jpg")).unwrap();
    let d = Daemon::start(&cfg);
    let cookie = d.login();
    wait_for("the new image to be stored", || d.slide(&cookie)["fields"] == 2);
    wait_for("the duplicate to be removed", || !inbox.join("a again.jpg").exists());
    assert_eq!(d.slide(&cookie)["fields"], 2);
}

/// A minimal WebDriver session (W3C protocol over HTTP).
struct Browser {
    driver: Child,
    url: String,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = ureq::delete(&self.url).call();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Browser {
    fn start() -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver not found: install Debian's `chromium` and `chromium-driver` (.ci/run does)");
        let base = format!("http://127.0.0.1:{port}");
        wait_for("chromedriver", || ureq::get(&format!("{base}/status")).call().is_ok());
        let s: Value = ureq::post(&format!("{base}/session"))
            .send_json(json!({"capabilities": {"alwaysMatch": {
                "goog:chromeOptions": {"args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1024,900"]}
            }}}))
            .expect("start headless Chromium")
            .into_json()
            .unwrap();
        let id = s["value"]["sessionId"].as_str().unwrap();
        Browser {
            driver,
            url: format!("{base}/session/{id}"),
        }
    }

    fn post(&self, path: &str, body: Value) -> Value {
        match ureq::post(&format!("{}{path}", self.url)).send_json(body) {
            Ok(r) => r.into_json::<Value>().unwrap()["value"].clone(),
            Err(ureq::Error::Status(code, r)) => panic!("{path}: {code}: {}", r.into_string().unwrap_or_default()),
            Err(e) => panic!("{path}: {e}"),
        }
    }

    fn go(&self, url: &str) {
        self.post("/url", json!({ "url": url }));
    }

    fn find(&self, css: &str) -> String {
        let v = self.post("/element", json!({"using": "css selector", "value": css}));
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("no element {css}"))
            .to_string()
    }

    fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css);
        self.post(&format!("/element/{e}/value"), json!({ "text": text }));
    }

    fn click(&self, css: &str) {
        let e = self.find(css);
        self.post(&format!("/element/{e}/click"), json!({}));
    }

    fn source(&self) -> String {
        let v: Value = ureq::get(&format!("{}/source", self.url))
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        v["value"].as_str().unwrap().to_string()
    }

    /// Saves the page as a PNG under `$WBC_SCREENSHOTS`, when set (for a person to look at).
    fn screenshot(&self, name: &str) {
        let Ok(dir) = std::env::var("WBC_SCREENSHOTS") else {
            return;
        };
        let v: Value = ureq::get(&format!("{}/screenshot", self.url))
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        use base64::Engine as _;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v["value"].as_str().unwrap())
            .unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(std::path::Path::new(&dir).join(format!("{name}.png")), png).unwrap();
    }

    fn wait_for_text(&self, text: &str) -> String {
        let mut src = String::new();
        wait_for(text, || {
            src = self.source();
            src.contains(text)
        });
        src
    }
}

#[test]
fn a_technician_logs_in_uploads_a_field_and_reviews_a_cell_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&config(dir.path()));
    let b = Browser::start();
    b.go(&d.base);
    b.wait_for_text("id=\"password\"");
    b.type_into("#user", USER);
    b.type_into("#password", "wrong");
    b.click("#login");
    b.wait_for_text("Wrong user or password");
    b.type_into("#user", USER);
    b.type_into("#password", PASSWORD);
    b.click("#login");
    let home = b.wait_for_text("id=\"differential\"");
    assert!(
        home.contains(&format!("Model version {}", factory_version())),
        "the model in use is shown"
    );
    assert!(home.contains("CPU (burn flex)"), "the backend is shown");
    let path = fixture_field("BloodImage_00000.jpg").canonicalize().unwrap();
    b.type_into("#image", path.to_str().unwrap());
    b.click("#upload");
    let field = b.wait_for_text("id=\"cells\"");
    assert_eq!(field.matches("<rect").count(), 1, "one white cell boxed: {field}");
    assert!(field.contains("id=\"cell-1\""));
    assert!(field.contains("class=\"description\""));
    assert!(field.contains("/cell/0/image\""), "each cell's picture is shown");
    assert!(field.contains("BASO "), "probabilities are listed");
    // The technician says it is an eosinophil.
    let select = b.find("#cell-1 select");
    let option = b.post(
        &format!("/element/{select}/element"),
        json!({"using": "css selector", "value": "option[value=Eosinophil]"}),
    );
    let option = option
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    b.post(&format!("/element/{option}/click"), json!({}));
    b.click("#cell-1 button");
    b.wait_for_text("Reviewed by tech");
    b.go(&d.base);
    let home = b.wait_for_text("id=\"differential\"");
    assert!(
        home.contains("<td>Eosinophil</td><td>1</td>"),
        "the review counts in the differential: {home}"
    );
    assert!(home.contains("1 of 100 cells classified"), "{home}");

    // The slide's gallery: the cell under the class it counts as, reviewed (green frame).
    b.go(&format!("{}/gallery", d.base));
    let gallery = b.wait_for_text("class=\"gallery\"");
    b.screenshot("gallery");
    assert!(gallery.contains("<h2>Eosinophil (1)</h2>"), "{gallery}");
    assert!(gallery.contains("class=\"cell reviewed\""), "{gallery}");
    // A key on the focused cell moves it: `l`, Lymphocyte; the differential follows.
    let cell = b.find(".gallery figure.cell");
    b.post(&format!("/element/{cell}/click"), json!({}));
    b.post(&format!("/element/{cell}/value"), json!({ "text": "l" }));
    let moved = b.wait_for_text("<h2>Lymphocyte (1)</h2>");
    assert!(moved.contains("reviewed: Lymphocyte"), "{moved}");
    assert!(!moved.contains("<h2>Eosinophil"), "{moved}");
    // And a click on a button: Blast, which comes first and raises the flag.
    b.click(".gallery figure.cell button[value=Blast]");
    let blast = b.wait_for_text("<h2>Blast (1)</h2>");
    assert!(blast.contains("class=\"urgent\""), "the blast flag is raised: {blast}");
    b.go(&d.base);
    let home = b.wait_for_text("id=\"differential\"");
    assert!(home.contains("<td>Blast</td><td>1</td>"), "{home}");
    assert!(home.contains("<td>Eosinophil</td><td>0</td>"), "{home}");

    // The slide report for the patient record, from the slide page.
    b.click("#report-links a[href='/slide/report']");
    let report = b.wait_for_text("id=\"disclaimer\"");
    b.screenshot("report");
    assert!(report.contains("<th>Clinic</th><td>unassigned</td>"), "{report}");
    assert!(
        report.contains("<tr><td>Blast</td><td>1</td><td>100.0</td><td>0–0</td><td>H</td></tr>"),
        "{report}"
    );
    assert!(report.contains("URGENT: 1 blast"), "{report}");
    assert!(
        report.contains("1 cell reviewed by tech (0 confirmed, 1 changed)"),
        "{report}"
    );
    assert!(report.contains("pre-classification"), "{report}");
    b.go(&d.base);

    // Two images at once: sent one after the other with how far it has got, then the slide
    // lists both.
    let cells = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/cells");
    let second = fixture_field("BloodImage_00338.jpg").canonicalize().unwrap();
    let third = cells.join("MYO_0024.jpg").canonicalize().unwrap();
    b.wait_for_text("id=\"upload-progress\"");
    b.type_into("#image", &format!("{}\n{}", second.display(), third.display()));
    b.click("#upload");
    b.wait_for_text("Done: 2 of 2 images classified");
    let home = b.wait_for_text("MYO_0024.jpg</a>");
    assert!(home.contains("BloodImage_00338.jpg</a>"), "{home}");
    // An image arriving by the inbox shows on the open page without a reload by hand.
    let inbox = dir.path().join("data").join("inbox");
    std::fs::copy(cells.join("EO_100884.jpg"), inbox.join("from-the-stick.jpg")).unwrap();
    b.wait_for_text("from-the-stick.jpg</a>");

    // A file that is no image: a clear message in the page.
    let junk = dir.path().join("notes.txt");
    std::fs::write(&junk, "not an image").unwrap();
    b.type_into("#image", junk.to_str().unwrap());
    b.click("#upload");
    let err = b.wait_for_text("id=\"error\"");
    assert!(err.contains("notes.txt was not classified"), "{err}");
}

#[test]
fn a_clinic_that_speaks_french_gets_its_slide_page_gallery_and_report_in_french_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(dir.path());
    let text = std::fs::read_to_string(&path).unwrap();
    // The clinic speaks French; one technician reads Portuguese.
    let hash = appliance::config::hash_password("lâmina").unwrap();
    std::fs::write(
        &path,
        text.replace("[web]\n", "[web]\nlanguage = \"fr\"\n")
            + &format!("[[web.users]]\nname = \"ana\"\npassword_hash = \"{hash}\"\nlanguage = \"pt\"\n"),
    )
    .unwrap();
    let d = Daemon::start(&path);
    let b = Browser::start();
    b.go(&d.base);
    let login = b.wait_for_text("id=\"password\"");
    assert!(
        login.contains("<html lang=\"fr\"") && login.contains("Mot de passe"),
        "{login}"
    );
    b.type_into("#user", USER);
    b.type_into("#password", PASSWORD);
    b.click("#login");
    let home = b.wait_for_text("id=\"differential\"");
    b.screenshot("slide-fr");
    assert!(home.contains("<html lang=\"fr\""), "{home}");
    for want in [
        "Formule leucocytaire",
        "Ajouter une image",
        "Terminer cette lame et commencer la suivante",
        "<th>Classe</th><th>Nombre</th>",
        "<td>Éosinophile</td>",
        "Se déconnecter",
    ] {
        assert!(home.contains(want), "{want}: {home}");
    }
    let path = fixture_field("BloodImage_00000.jpg").canonicalize().unwrap();
    b.type_into("#image", path.to_str().unwrap());
    b.click("#upload");
    let field = b.wait_for_text("id=\"cells\"");
    assert!(
        field.contains("Retour à la lame") && field.contains("Choisissez la classe…"),
        "{field}"
    );
    assert!(
        field.contains("<th>Détails</th>") && field.contains(">Enregistrer</button>"),
        "{field}"
    );
    b.screenshot("field-fr");
    // The cells' descriptions too: rendered in French, not the model's English.
    assert!(field.contains("class=\"description\""), "{field}");
    for english in ["Consistent with", "left for review", "Unidentified"] {
        assert!(!field.contains(english), "{english}: {field}");
    }
    b.go(&format!("{}/review", d.base));
    let review = b.wait_for_text("id=\"to-review\"");
    assert!(review.contains("<h1>Relecture</h1>"), "{review}");
    b.go(&format!("{}/gallery", d.base));
    let gallery = b.wait_for_text("class=\"gallery\"");
    b.screenshot("gallery-fr");
    assert!(
        gallery.contains("Galerie") && gallery.contains("modèle : "),
        "{gallery}"
    );
    assert!(gallery.contains(">Pas une cellule</button>"), "{gallery}");
    b.go(&format!("{}/slide/report", d.base));
    let report = b.wait_for_text("id=\"disclaimer\"");
    assert!(
        report.contains("pré-classification") && report.contains("<th>Lame</th>"),
        "{report}"
    );
    b.go(&format!("{}/models", d.base));
    let models = b.wait_for_text("id=\"model-log\"");
    b.screenshot("models-fr");
    for want in [
        "<h1>Modèles</h1>",
        "Journal des modèles",
        "Oublier l'adaptation au site",
        "quand (UTC)",
    ] {
        assert!(models.contains(want), "{want}: {models}");
    }
    // The upload script's texts: several images at once, counted in French.
    b.go(&d.base);
    b.wait_for_text("id=\"differential\"");
    let two = [
        fixture_field("BloodImage_00000.jpg"),
        fixture_field("BloodImage_00000.jpg"),
    ]
    .map(|p| p.canonicalize().unwrap().to_str().unwrap().to_string())
    .join("\n");
    b.type_into("#image", &two);
    b.click("#upload");
    b.wait_for_text("Terminé : 2 images classées sur 2.");

    // A user with a language of their own reads every page in it.
    let agent = d.agent();
    let r = agent
        .post(&format!("{}/login", d.base))
        .send_form(&[("user", "ana"), ("password", "lâmina")])
        .unwrap();
    let cookie = r.header("set-cookie").unwrap().split(';').next().unwrap().to_string();
    let home = d.page(&cookie, "/");
    assert!(
        home.contains("<html lang=\"pt\"") && home.contains("Adicionar uma imagem"),
        "{home}"
    );
    let models = d.page(&cookie, "/models");
    assert!(models.contains("Registo dos modelos"), "{models}");
    let gallery = d.page(&cookie, "/gallery");
    assert!(
        gallery.contains("Galeria") && gallery.contains("(tecla n)"),
        "{gallery}"
    );
}
