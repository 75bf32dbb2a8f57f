//! One LoRA fine-tuning step of a random-weight mllama (forward, backward, AdamW) on the CPU
//! backend: time and the process's peak resident memory. The configuration is the fixtures'
//! architecture scaled up (`WBC_MLLAMA_SCALE=small|medium|large`, default medium: about
//! 0.2 B parameters; large about 1.4 B; 224-px tiles); run with `cargo bench -p trainer --bench mllama_step`.
//! The frozen base is held in 4 bits (blocks of `WBC_MLLAMA_BASE_BLOCK`, default 32; 0 keeps it
//! in f32), as `trainer train --model mllama` does. Memory: live heap bytes (counting allocator)
//! with the model at rest and at the step's peak, and the process's peak resident set over the
//! step (the kernel's high-water mark, reset once the model is built; it also counts what the C
//! allocator keeps after freeing the f32 weights the random model was built from).

use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use std::time::Instant;
use wbc_shared::mllama::{Inputs, LoraConfig, LoraTargets, Mllama, MllamaConfig};

#[global_allocator]
static HEAP: wbc_shared::heap::Counting = wbc_shared::heap::Counting;

const MIB: f64 = 1024.0 * 1024.0;

/// Resets the kernel's peak resident set (VmHWM) to the current one.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn rss_mib() -> f64 {
    status_mib("VmRSS:")
}

fn peak_rss_mib() -> f64 {
    status_mib("VmHWM:")
}

fn status_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn config(scale: &str) -> MllamaConfig {
    let mut c = MllamaConfig::llama_3_2_11b_vision();
    let (vd, vl, td, tl, vocab) = match scale {
        "small" => (128, 4, 256, 4, 8_000),
        "large" => (1024, 16, 2048, 16, 64_000),
        _ => (512, 8, 1024, 8, 32_000),
    };
    c.vision.hidden_size = vd;
    c.vision.attention_heads = vd / 64;
    c.vision.intermediate_size = vd * 4;
    c.vision.num_hidden_layers = vl;
    c.vision.num_global_layers = 2;
    c.vision.intermediate_layers_indices = vec![1, vl - 1];
    c.vision.vision_output_dim = vd * 3;
    c.vision.image_size = 224;
    c.text.hidden_size = td;
    c.text.num_attention_heads = td / 64;
    c.text.num_key_value_heads = td / 256;
    c.text.intermediate_size = td * 4;
    c.text.num_hidden_layers = tl;
    c.text.cross_attention_layers = vec![1, tl - 1];
    c.text.vocab_size = vocab;
    c.image_token_index = vocab as u32;
    c.validate().expect("a valid configuration");
    c
}

fn main() {
    let scale = std::env::var("WBC_MLLAMA_SCALE").unwrap_or_else(|_| "medium".into());
    let cfg = config(&scale);
    let params = cfg.parameter_count();
    let ad = Device::flex().autodiff();
    let block: u8 = std::env::var("WBC_MLLAMA_BASE_BLOCK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let before = rss_mib();
    let mut base = Mllama::random(&cfg, 1, &ad);
    let mut quantized = (0, 0);
    if block > 0 {
        let (q4, done, total) = base.quantize_base(block);
        (base, quantized) = (q4, (done, total));
    }
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
    let at_rest = wbc_shared::heap::live() as f64 / MIB;
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
    let mut optim = AdamWConfig::new().init();
    let started = Instant::now();
    let (value, step_peak) = wbc_shared::heap::peak_during(|| {
        let loss = model.answer_loss(inputs, answer_from);
        let value = loss.clone().into_scalar::<f32>();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let _model = optim.step(1e-4, model, grads);
        value
    });
    let secs = started.elapsed().as_secs_f64();
    let base_form = if block > 0 {
        format!(
            "4-bit base ({} of {} linear weights, blocks of {block})",
            quantized.0, quantized.1
        )
    } else {
        "f32 base".to_string()
    };
    println!(
        "mllama LoRA step ({scale}, {base_form}): {:.0} M parameters ({:.0} M vision), 1 tile of {t} px, {s} tokens ({} answer); \
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
}
