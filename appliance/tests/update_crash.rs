//! A power cut (SIGKILL) at each step of a model update, and a new model that keeps crashing
//! the appliance: every time the appliance comes back on a verified model and says what
//! happened. Runs the real `appliance` binary.

use ed25519_dalek::SigningKey;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use wbc_protocol::bundle::{Bundle, keys};

fn appliance() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_appliance"));
    c.env("RUST_LOG", "info");
    c
}

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    bundle: PathBuf,
    factory_version: u64,
}

/// A device trusting the default key and a lab key, and a newer bundle signed by the lab key.
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let lab = SigningKey::from_bytes(&[7; 32]);
    keys::write_public(&dir.path().join("lab.pub"), &lab.verifying_key()).unwrap();
    std::fs::write(dir.path().join("default.pub"), appliance::DEFAULT_KEY).unwrap();
    let factory = Bundle::from_bytes(appliance::DEFAULT_BUNDLE, &appliance::trusted_keys(&[]).unwrap()).unwrap();
    let bundle = dir.path().join("v-next.bundle");
    std::fs::write(
        &bundle,
        appliance::default_bundle_as(factory.manifest.model_version + 1, &lab),
    )
    .unwrap();
    let config = dir.path().join("appliance.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\ntrust = [{:?}, {:?}]\nbackend = \"cpu\"\n[web]\nlisten = \"127.0.0.1:0\"\n\
             [update]\nmax_failures = 2\n",
            dir.path().join("data"),
            dir.path().join("default.pub"),
            dir.path().join("lab.pub"),
        ),
    )
    .unwrap();
    Setup {
        dir,
        config,
        bundle,
        factory_version: factory.manifest.model_version,
    }
}

/// Runs `cmd` until it prints `marker` on standard error, then kills it with SIGKILL.
fn kill_at(mut cmd: Command, marker: &str) {
    let mut child = cmd.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let m = marker.to_string();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(&m) {
                let _ = tx.send(Ok(()));
                return;
            }
            seen.push(line);
        }
        let _ = tx.send(Err(seen.join("\n")));
    });
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(Ok(())) => {}
        Ok(Err(out)) => panic!("the appliance ended before {marker:?}:\n{out}"),
        Err(_) => panic!("{marker:?} not reached in time"),
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

fn status(s: &Setup) -> Value {
    let out = appliance()
        .args(["models", "--json", "--config"])
        .arg(&s.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn update(s: &Setup) -> std::process::Output {
    appliance()
        .args(["update", "--config"])
        .arg(&s.config)
        .arg(&s.bundle)
        .output()
        .unwrap()
}

fn leftovers(models: &Path, status: &Value) -> Vec<String> {
    let named: Vec<&str> = [
        &status["status"]["active"]["file"],
        &status["status"]["previous"]["file"],
    ]
    .into_iter()
    .filter_map(|v| v.as_str())
    .collect();
    std::fs::read_dir(models)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp") || (n.starts_with("slot-") && !named.contains(&n.as_str())))
        .collect()
}

#[test]
fn a_kill_at_any_step_of_an_update_leaves_a_verified_model_and_the_update_can_be_repeated() {
    // Steps in order; the pointer names the new model from `switched` on.
    for (step, switched) in [
        ("verified", false),
        ("staging", false),
        ("staged", false),
        ("self_tested", false),
        ("switching", false),
        ("switched", true),
    ] {
        let s = setup();
        let mut cmd = appliance();
        cmd.env("WBC_PAUSE_AT", step)
            .args(["update", "--config"])
            .arg(&s.config)
            .arg(&s.bundle);
        kill_at(cmd, &format!("paused at {step}"));
        // The next start verifies and self-tests whatever the pointer names.
        let st = status(&s);
        let expect = s.factory_version + u64::from(switched);
        assert_eq!(
            st["status"]["active"]["model_version"], expect,
            "killed at {step}: {st}"
        );
        assert!(
            leftovers(&s.dir.path().join("data/models"), &st).is_empty(),
            "killed at {step}: an interrupted update's files are removed"
        );
        // Offered again, the update completes (or is already done).
        let out = update(&s);
        assert!(out.status.success(), "{step}: {}", String::from_utf8_lossy(&out.stdout));
        let st = status(&s);
        assert_eq!(st["status"]["active"]["model_version"], s.factory_version + 1, "{step}");
        let events: Vec<&str> = st["log"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["message"]["event"].as_str().unwrap())
            .collect();
        assert!(events.contains(&"active"), "{step}: {events:?}");
    }
}

#[test]
fn a_new_model_that_keeps_crashing_the_appliance_is_replaced_by_the_fallback() {
    let s = setup();
    let out = update(&s);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    // The daemon dies (SIGKILL) on the new model, twice (max_failures = 2).
    for _ in 0..2 {
        let mut cmd = appliance();
        cmd.args(["run", "--config"]).arg(&s.config);
        kill_at(cmd, "web UI on ");
    }
    let mut cmd = appliance();
    cmd.args(["run", "--config"]).arg(&s.config);
    let started = Instant::now();
    kill_at(cmd, "web UI on ");
    assert!(started.elapsed() < Duration::from_secs(120));
    let st = status(&s);
    assert_eq!(st["status"]["active"]["model_version"], s.factory_version, "{st}");
    let rolled = st["log"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["message"]["event"] == "rolled_back")
        .unwrap_or_else(|| panic!("a rolled_back event: {st}"));
    assert!(
        rolled["message"]["detail"]
            .as_str()
            .unwrap()
            .contains("without a clean shutdown 2 times"),
        "{rolled}"
    );
    // The crashing bundle is not taken again.
    let out = update(&s);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("rolled back"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(status(&s)["status"]["active"]["model_version"], s.factory_version);
}
