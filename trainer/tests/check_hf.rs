//! `trainer check-hf` on the committed mllama fixtures: a matching checkpoint passes, a wrong
//! one fails with the error it found.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/mllama")
        .join(name)
}

fn check_hf(model: &Path, io: &Path) -> (bool, String) {
    check_hf_on(model, io, "cpu")
}

fn check_hf_on(model: &Path, io: &Path, device: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .arg("check-hf")
        .arg("--model")
        .arg(model)
        .arg("--io")
        .arg(io)
        .args(["--device", device])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn a_matching_checkpoint_passes_and_prints_its_errors() {
    for name in ["gqa-llama3", "mha-bf16-sharded"] {
        let dir = fixture(name);
        let (ok, text) = check_hf(&dir, &dir.join("io.safetensors"));
        assert!(ok, "{name}: {text}");
        assert!(
            text.contains("logits: max abs error") && text.contains("vision encoder:"),
            "{text}"
        );
        assert!(text.contains("parity: ok"), "{text}");
    }
}

#[test]
fn a_checkpoint_that_computes_something_else_fails() {
    // The same weights with another RMS norm epsilon: it loads, runs, and differs.
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("gqa-llama3");
    for f in ["model.safetensors", "io.safetensors"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let config = std::fs::read_to_string(src.join("config.json")).unwrap();
    assert!(config.contains("\"rms_norm_eps\": 1e-05"));
    std::fs::write(
        dir.path().join("config.json"),
        config.replace("\"rms_norm_eps\": 1e-05", "\"rms_norm_eps\": 0.5"),
    )
    .unwrap();
    let (ok, text) = check_hf(dir.path(), &dir.path().join("io.safetensors"));
    assert!(!ok, "{text}");
    assert!(text.contains("is over 1e-4"), "{text}");
    // Another configuration's reference: shapes differ, said so.
    let (ok, text) = check_hf(&src, &fixture("mha-bf16-sharded").join("io.safetensors"));
    assert!(!ok && text.contains("shape"), "{text}");
}

/// A GPU backend this build lacks is refused with how to build it, not run on the CPU instead.
#[cfg(not(feature = "wgpu"))]
#[test]
fn a_device_the_build_lacks_is_refused_with_how_to_build_it() {
    let dir = fixture("gqa-llama3");
    let (ok, text) = check_hf_on(&dir, &dir.join("io.safetensors"), "wgpu");
    assert!(!ok, "{text}");
    assert!(text.contains("--features wgpu") && !text.contains("parity"), "{text}");
    let (ok, text) = check_hf_on(&dir, &dir.join("io.safetensors"), "tpu");
    assert!(!ok && text.contains("invalid value"), "{text}");
}
