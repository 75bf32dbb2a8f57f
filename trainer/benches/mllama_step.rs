//! One LoRA fine-tuning step of a random-weight mllama (forward, backward, AdamW) on the CPU
//! backend: time and the process's peak resident memory. The configuration is the fixtures'
//! architecture scaled up (`WBC_MLLAMA_SCALE=small|medium|large`, default medium: about
//! 0.2 B parameters; large about 1.4 B; 224-px tiles); run with `cargo bench -p trainer --bench mllama_step`.
//! The frozen base is held in 4 bits (blocks of `WBC_MLLAMA_BASE_BLOCK`, default 32; 0 keeps it
//! in f32), as `trainer train --model mllama` does. Memory: live heap bytes (counting allocator)
//! with the model at rest and at the step's peak, and the process's peak resident set over the
//! step (the kernel's high-water mark, reset once the model is built; it also counts what the C
//! allocator keeps after freeing the f32 weights the random model was built from).
//!
//! `WBC_MLLAMA_CHECKPOINT=DIR` loads a checkpoint instead (e.g. `trainer synth-mllama`'s reduced
//! full-width one), streamed into 4 bits (`Mllama::load_quantized`; with block 0, in f32), and
//! reports the load's time, heap peak and peak resident set first (`WBC_MLLAMA_LOAD_ONLY=1`:
//! only that).

use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use std::time::Instant;
use wbc_models::mllama::{Checkpoint, Inputs, LoraConfig, LoraTargets, Mllama, MllamaConfig};

#[global_allocator]
static HEAP: wbc_models::heap::Counting = wbc_models::heap::Counting;

const MIB: f64 = 1024.0 * 1024.0;

use wbc_models::heap::{peak_rss_mib, reset_peak_rss as reset_peak, rss_mib};

/// `WBC_BENCH_DEVICE`: `cpu` (burn flex, the default), `cuda` or `wgpu` (builds with that
/// feature).
fn device() -> Device {
    match std::env::var("WBC_BENCH_DEVICE").as_deref() {
        #[cfg(feature = "cuda")]
        Ok("cuda") => Device::cuda(0),
        #[cfg(feature = "wgpu")]
        Ok("wgpu") => Device::wgpu(burn::tensor::DeviceKind::DiscreteGpu(0)),
        Ok("cpu") | Err(_) => Device::flex(),
        Ok(other) => panic!("WBC_BENCH_DEVICE={other}: cpu, or cuda / wgpu in a build with that feature"),
    }
}

fn main() {
    let checkpoint = std::env::var_os("WBC_MLLAMA_CHECKPOINT").map(std::path::PathBuf::from);
    let scale = match &checkpoint {
        Some(d) => d.display().to_string(),
        None => std::env::var("WBC_MLLAMA_SCALE").unwrap_or_else(|_| "medium".into()),
    };
    let cfg = match &checkpoint {
        Some(d) => MllamaConfig::load(d).expect("the checkpoint's config.json"),
        None => MllamaConfig::bench_scale(&scale).expect("WBC_MLLAMA_SCALE: small, medium, large or 11b"),
    };
    cfg.validate().expect("a valid configuration");
    let params = cfg.parameter_count();
    let device = device();
    let ad = device.clone().autodiff();
    let block: u8 = std::env::var("WBC_MLLAMA_BASE_BLOCK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let before = rss_mib();
    let mut quantized = (0, 0);
    let base = if let Some(dir) = &checkpoint {
        reset_peak();
        let started = Instant::now();
        let (base, heap) = wbc_models::heap::peak_during(|| {
            let ck = Checkpoint::open(dir).expect("the checkpoint");
            if block > 0 {
                Mllama::load_quantized(&cfg, &ck, &ad, block)
            } else {
                Mllama::load(&cfg, &ck, &ad)
            }
            .expect("the checkpoint loads")
        });
        println!(
            "{}",
            serde_json::json!({"bench": "mllama/load", "checkpoint": scale, "block": block,
                "parameters": params.total, "s": started.elapsed().as_secs_f64(),
                "heap_peak_mib": heap as f64 / MIB, "heap_at_rest_mib": wbc_models::heap::live() as f64 / MIB,
                "peak_rss_mib": peak_rss_mib(), "rss_before_mib": before})
        );
        if std::env::var_os("WBC_MLLAMA_LOAD_ONLY").is_some() {
            return;
        }
        base
    } else {
        let mut base = Mllama::random(&cfg, 1, &ad);
        if block > 0 {
            let (q4, done, total) = base.quantize_base(block);
            (base, quantized) = (q4, (done, total));
        }
        base
    };
    let model = base.with_lora(
        &LoraConfig {
            rank: 16,
            alpha: 32.0,
            dropout: 0.0,
            targets: LoraTargets::default(),
            seed: 1,
        },
        &ad,
    );
    let loaded = rss_mib();
    let at_rest = wbc_models::heap::live() as f64 / MIB;
    reset_peak();
    // One 1-tile image, a 24-token prompt and a 64-token answer.
    let (s, answer_from, t) = (88, 24, cfg.vision.image_size);
    let mut ids: Vec<i64> = (0..s as i64).map(|i| 10 + i % 500).collect();
    ids[5] = i64::from(cfg.image_token_index);
    let mut mask = vec![0f32; s * 4];
    for k in 5..s {
        mask[k * 4] = 1.0;
    }
    let inputs = Inputs {
        input_ids: Tensor::<2, Int>::from_data(TensorData::new(ids, [1, s]), &ad),
        pixel_values: Some(Tensor::zeros([1, 1, 4, 3, t, t], &ad)),
        aspect_ratio_ids: Some(Tensor::from_data(TensorData::new(vec![1i64], [1, 1]), &ad)),
        aspect_ratio_mask: Some(Tensor::from_data(
            TensorData::new(vec![1f32, 0., 0., 0.], [1, 1, 4]),
            &ad,
        )),
        cross_attention_mask: Some(Tensor::from_data(TensorData::new(mask, [1, s, 1, 4]), &ad)),
    };
    // `WBC_MLLAMA_STEPS` steps (default 1); with more, the first (kernel compilation and
    // autotuning on a GPU) is left out of the reported time.
    let steps: usize = std::env::var("WBC_MLLAMA_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let mut optim = AdamWConfig::new().init();
    let mut model = Some(model);
    let mut times = Vec::new();
    let (value, step_peak) = wbc_models::heap::peak_during(|| {
        let mut value = f32::NAN;
        for _ in 0..steps {
            let started = Instant::now();
            let m = model.take().expect("the model");
            let loss = m.answer_loss(inputs.rows(0..1), answer_from);
            value = loss.clone().into_scalar::<f32>();
            let grads = GradientsParams::from_grads(loss.backward(), &m);
            let m = optim.step(1e-4, m, grads);
            // Wait for the device (a GPU runs asynchronously).
            let _ = device.sync();
            model = Some(m);
            times.push(started.elapsed().as_secs_f64());
        }
        value
    });
    let secs = if times.len() > 1 {
        times[1..].iter().sum::<f64>() / (times.len() - 1) as f64
    } else {
        times[0]
    };
    let base_form = if block > 0 && checkpoint.is_some() {
        format!("4-bit base streamed from the checkpoint, blocks of {block}")
    } else if block > 0 {
        format!(
            "4-bit base ({} of {} linear weights, blocks of {block})",
            quantized.0, quantized.1
        )
    } else {
        "f32 base".to_string()
    };
    println!(
        "mllama LoRA step ({scale}, {base_form}, {device:?}): {:.0} M parameters ({:.0} M vision), 1 tile of {t} px, {s} tokens ({} answer); \
         {secs:.2} s; heap: model at rest {at_rest:.0} MiB, step peak {:.0} MiB; \
         peak RSS during the step {:.0} MiB (before the model {:.0} MiB, model at rest {:.0} MiB); loss {value:.3}",
        params.total as f64 / 1e6,
        params.vision as f64 / 1e6,
        s - answer_from,
        at_rest + step_peak as f64 / MIB,
        peak_rss_mib(),
        before,
        loaded
    );
    println!(
        "{}",
        serde_json::json!({"bench": "mllama/qlora-step", "scale": scale, "ms": secs * 1e3, "samples_per_s": 1.0 / secs,
            "heap_peak_mib": at_rest + step_peak as f64 / MIB, "rest_mib": at_rest})
    );
}
