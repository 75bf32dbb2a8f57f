//! Our side of the side-by-side benchmarks against the peers a maintainer would otherwise use
//! (`bench/run.sh` runs this and `bench/peers.py` in one go and prints the ratios). The peer
//! script mirrors every measurement here: same shapes, same weights, same protocol.
//!
//! `cargo bench -p appliance --bench peers -- compact`,
//! `cargo bench -p appliance --bench peers -- mllama <checkpoint dir> [new tokens]` and
//! `cargo bench -p appliance --bench peers -- mllama-shape <small|medium|large|11b> [new tokens]`
//! (random weights, the base in 4 bits as training and a quantized bundle hold it; no
//! checkpoint needed). `WBC_BENCH_DEVICE`: `cpu` (flex, default), `wgpu` or `cuda` (builds with
//! `--features wgpu` / `--features cuda`). Prints one JSON object per measurement.
//!
//! Protocol: warm up twice, then time `reps` runs and report the median; memory is the
//! process's peak resident set during the timed runs above its resident set before them (the
//! kernel's high-water mark is reset first), i.e. the working memory of the operation, and the
//! resident set with the model loaded.

use burn::tensor::{Device, Int, Tensor, TensorData};
use std::time::Instant;
use wbc_models::compact::CompactModel;
use wbc_models::mllama::{Checkpoint, Inputs, Mllama, MllamaConfig, Prompted, Sampling};

/// Median milliseconds of `reps` runs after two warm-up runs, and the working memory (MiB).
fn measure(reps: usize, mut f: impl FnMut()) -> (f64, f64, f64) {
    f();
    f();
    let rest = wbc_models::heap::rss_mib();
    wbc_models::heap::reset_peak_rss();
    let mut ms: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    (ms[reps / 2], wbc_models::heap::peak_rss_mib() - rest, rest)
}

fn device() -> Device {
    match std::env::var("WBC_BENCH_DEVICE").as_deref() {
        #[cfg(feature = "cuda")]
        Ok("cuda") => Device::cuda(0),
        #[cfg(feature = "wgpu")]
        Ok("wgpu") => {
            appliance::backend::select(appliance::backend::BackendChoice::Gpu)
                .expect("a wgpu adapter")
                .device
        }
        Ok("cpu") | Err(_) => Device::flex(),
        Ok(other) => panic!("WBC_BENCH_DEVICE={other}: cpu, or wgpu / cuda in a build with that feature"),
    }
}

/// Waits for the device's queued work (a GPU runs asynchronously).
fn sync(device: &Device) {
    let _ = device.sync();
}

fn compact() {
    let keys = appliance::trusted_keys(&[]).unwrap();
    let bundle = appliance::open_bundle(None, &keys).unwrap();
    let device = device();
    let model = CompactModel::from_bundle(&bundle, &device).unwrap();
    let side = bundle.manifest.preprocess.input_size as usize;
    // `WBC_BENCH_BATCHES=1` (a profile of one shape) or `=1,4,16`: the batch sizes to run.
    let batches: Vec<usize> = std::env::var("WBC_BENCH_BATCHES").map_or_else(
        |_| vec![1, 64],
        |v| {
            v.split(',')
                .map(|b| match b.trim().parse() {
                    Ok(n) if n > 0 => n,
                    _ => panic!("WBC_BENCH_BATCHES={v}: batch sizes above zero, separated by commas"),
                })
                .collect()
        },
    );
    for batch in batches {
        let reps = if batch < 16 { 21 } else { 5 };
        // The timing does not depend on the values; the same shape as the peer's input.
        let data: Vec<f32> = (0..batch * 3 * side * side)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let (ms, working, rest) = measure(reps, || {
            std::hint::black_box(model.predict(data.clone(), batch, side));
        });
        println!(
            "{}",
            serde_json::json!({
                "bench": format!("compact/batch{batch}"), "side": side,
                "attribute_width": wbc_models::compact::attribute_logits_width(),
                "ms": ms, "ms_per_cell": ms / batch as f64, "cells_per_s": batch as f64 * 1e3 / ms,
                "working_mib": working, "rest_mib": rest,
            })
        );
    }
}

/// One tile of the configuration's size, a 24-token prompt whose second token is the image.
fn mllama_inputs(cfg: &MllamaConfig, device: &Device) -> Inputs {
    let (s, t) = (24usize, cfg.vision.image_size);
    let mut ids: Vec<i64> = (0..s as i64).map(|i| 10 + i).collect();
    ids[0] = 1;
    ids[1] = i64::from(cfg.image_token_index);
    let mut mask = vec![0f32; s * 4];
    for k in 1..s {
        mask[k * 4] = 1.0;
    }
    let pixels: Vec<f32> = (0..4 * 3 * t * t)
        .map(|i| {
            if i < 3 * t * t {
                ((i * 7919) % 1000) as f32 / 500.0 - 1.0
            } else {
                0.0
            }
        })
        .collect();
    Inputs {
        input_ids: Tensor::<2, Int>::from_data(TensorData::new(ids, [1, s]), device),
        pixel_values: Some(Tensor::from_data(TensorData::new(pixels, [1, 1, 4, 3, t, t]), device)),
        aspect_ratio_ids: Some(Tensor::from_data(TensorData::new(vec![1i64], [1, 1]), device)),
        aspect_ratio_mask: Some(Tensor::from_data(
            TensorData::new(vec![1f32, 0., 0., 0.], [1, 1, 4]),
            device,
        )),
        cross_attention_mask: Some(Tensor::from_data(TensorData::new(mask, [1, s, 1, 4]), device)),
    }
}

fn mllama(dir: &std::path::Path, new_tokens: usize) {
    let device = device();
    let cfg = MllamaConfig::load(dir).unwrap();
    let model = Mllama::load(&cfg, &Checkpoint::open(dir).unwrap(), &device).unwrap();
    decode_and_prefill(&cfg, &model, &device, new_tokens, false);
}

fn mllama_shape(scale: &str, new_tokens: usize) {
    let device = device();
    let cfg = MllamaConfig::bench_scale(scale).expect("small, medium, large or 11b");
    let (model, done, total) = Mllama::random(&cfg, 1, &device).quantize_base(32);
    println!(
        "{}",
        serde_json::json!({"bench": "mllama-shape/model", "scale": scale, "quantized": done, "of": total,
            "parameters": cfg.parameter_count().total, "device": format!("{device:?}"),
            "decode_bytes_per_token": decode_bytes_per_token(&cfg)})
    );
    decode_and_prefill(&cfg, &model, &device, new_tokens, true);
}

/// The weights one decoded token reads in 4 bits (half a byte per value and an f32 scale per 32):
/// the text decoder and the LM head, not the vision encoder or the token embedding (one row).
fn decode_bytes_per_token(cfg: &MllamaConfig) -> f64 {
    let p = cfg.parameter_count();
    let embedding = (cfg.text.vocab_size + 8) * cfg.text.hidden_size;
    (p.total - p.vision - embedding as u64) as f64 * (0.5 + 4.0 / 32.0)
}

/// Prefill, decode and (optionally) class scoring, as the peer measures them.
fn decode_and_prefill(cfg: &MllamaConfig, model: &Mllama, device: &Device, new_tokens: usize, scoring: bool) {
    let inputs = mllama_inputs(cfg, device);
    // As the peer measures it: generate 1 token (the prefill and its first token), then 1 + n.
    let run = |n: usize| {
        let p = Prompted::new(model, inputs.rows(0..1), n);
        std::hint::black_box(p.generate(model, n, &[], Sampling::Greedy));
        sync(device);
    };
    let (prefill, working, rest) = measure(3, || run(1));
    let (total, working_total, _) = measure(3, || run(1 + new_tokens));
    println!(
        "{}",
        serde_json::json!({
            "bench": "mllama/prefill", "parameters": cfg.parameter_count().total,
            "ms": prefill, "working_mib": working, "rest_mib": rest,
        })
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "mllama/decode", "new_tokens": new_tokens,
            "ms_per_token": (total - prefill) / new_tokens as f64,
            "tokens_per_s": new_tokens as f64 * 1e3 / (total - prefill),
            "working_mib": working_total, "rest_mib": rest,
        })
    );
    if scoring {
        // A cell's six class scores: the prompt once, then each candidate's tokens.
        let candidates: Vec<Vec<u32>> = vec![
            vec![100, 101],
            vec![102],
            vec![103, 104],
            vec![105],
            vec![106, 107],
            vec![108],
        ];
        let (ms, working, _) = measure(3, || {
            let p = Prompted::new(model, inputs.rows(0..1), 3);
            std::hint::black_box(p.score(model, &candidates));
            sync(device);
        });
        println!(
            "{}",
            serde_json::json!({"bench": "mllama/class-scores", "ms": ms, "working_mib": working})
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; our own arguments follow `--`.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    match args.first().map(String::as_str) {
        Some("compact") | None => compact(),
        Some("mllama") => {
            let dir = args.get(1).expect("mllama <checkpoint dir> [new tokens]");
            let n = args.get(2).map_or(16, |v| v.parse().expect("a number of tokens"));
            mllama(std::path::Path::new(dir), n)
        }
        Some("mllama-shape") => {
            let scale = args.get(1).map_or("small", String::as_str);
            let n = args.get(2).map_or(16, |v| v.parse().expect("a number of tokens"));
            mllama_shape(scale, n)
        }
        Some(other) => {
            panic!("unknown benchmark {other}: compact | mllama <dir> [tokens] | mllama-shape <scale> [tokens]")
        }
    }
}
