//! LoRA fine-tuning of mllama on the committed random-weight checkpoint and a real WBC image:
//! adapters start at the base model, training lowers the answer loss while the base stays
//! frozen, and merging the adapters into the base gives the same model.

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use std::path::PathBuf;
use wbc_models::mllama::chat::cross_attention_mask;
use wbc_models::mllama::{Checkpoint, ImageProcessor, Inputs, LoraConfig, LoraTargets, Mllama, MllamaConfig};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures")
}

/// The 28-px-tile checkpoint, and one real cell image as its 4-tile input with a prompt and an
/// answer (token ids within the tiny vocabulary; 120 is its image token).
fn sample(device: &Device) -> (MllamaConfig, Mllama, Inputs, usize) {
    let dir = fixtures().join("mllama/gqa-llama3");
    let cfg = MllamaConfig::load(&dir).unwrap();
    let model = Mllama::load(&cfg, &Checkpoint::open(&dir).unwrap(), device).unwrap();
    let img = image::open(fixtures().join("reference/EO_100884.png"))
        .unwrap()
        .to_rgb8();
    let p = ImageProcessor {
        tile: cfg.vision.image_size,
        ..ImageProcessor::llama_3_2_vision()
    };
    let x = p.process(&img);
    let image = cfg.image_token_index;
    let prompt = [1, 10, image, 20, 21, 22, 23];
    let answer = [40, 41, 42, 43, 2];
    let ids: Vec<u32> = prompt.iter().chain(answer.iter()).copied().collect();
    let mask = cross_attention_mask(&ids, image, &[x.layout.0 * x.layout.1], 4);
    let s = ids.len();
    let t = cfg.vision.image_size;
    let inputs = Inputs {
        input_ids: Tensor::<2, Int>::from_data(
            TensorData::new(ids.iter().map(|&i| i64::from(i)).collect::<Vec<_>>(), [1, s]),
            device,
        ),
        pixel_values: Some(Tensor::from_data(
            TensorData::new(x.pixel_values, [1, 1, 4, 3, t, t]),
            device,
        )),
        aspect_ratio_ids: Some(Tensor::from_data(
            TensorData::new(vec![x.aspect_ratio_id as i64], [1, 1]),
            device,
        )),
        aspect_ratio_mask: Some(Tensor::from_data(
            TensorData::new(x.aspect_ratio_mask, [1, 1, 4]),
            device,
        )),
        cross_attention_mask: Some(Tensor::from_data(TensorData::new(mask, [1, s, 1, 4]), device)),
    };
    (cfg, model, inputs, prompt.len())
}

fn lora() -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: LoraTargets {
            cross_attention: true,
            ..Default::default()
        },
        seed: 1,
    }
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

#[test]
fn adapters_start_at_the_base_training_lowers_the_answer_loss_and_merging_keeps_the_model() {
    let device = Device::flex();
    let ad = device.clone().autodiff();
    let (_, base, inputs, answer_from) = sample(&ad);
    let before = values(base.forward(inputs.rows(0..1)));
    let frozen = values(base.vision_model.clone().no_grad().forward(
        inputs.pixel_values.clone().unwrap(),
        inputs.aspect_ratio_ids.clone().unwrap(),
        inputs.aspect_ratio_mask.clone().unwrap(),
    ));
    let mut model = base.with_lora(&lora(), &ad);
    // B = 0: the adapted model is the base model.
    assert_eq!(values(model.forward(inputs.rows(0..1))), before);
    let mut optim = AdamWConfig::new().init();
    let mut losses = Vec::new();
    for _ in 0..12 {
        let loss = model.answer_loss(inputs.rows(0..1), answer_from);
        losses.push(loss.clone().into_scalar::<f32>());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    eprintln!("answer loss by step: {losses:?}");
    assert!(losses.iter().all(|l| l.is_finite()));
    // The random checkpoint's LM head is small (logits within about ±0.6), which bounds how far
    // adapters behind it can go: from ln(120) ≈ 4.79 to about 4.1.
    assert!(losses[11] < losses[0] - 0.3, "{losses:?}");
    // The base is frozen: the vision encoder (no adapters here) computes what it did.
    let after = values(model.vision_model.clone().no_grad().forward(
        inputs.pixel_values.clone().unwrap(),
        inputs.aspect_ratio_ids.clone().unwrap(),
        inputs.aspect_ratio_mask.clone().unwrap(),
    ));
    assert_eq!(after, frozen);
    // Merged into f32 weights, the model computes the same logits.
    let trained = model.valid();
    let (_, _, plain, _) = sample(&device);
    let unmerged = values(trained.forward(plain.rows(0..1)));
    let merged = values(trained.merge_lora().forward(plain.rows(0..1)));
    let d = wbc_models::mllama::Difference::of(&merged, &unmerged);
    assert!(d.relative < 1e-5, "{d:?}");
    assert!(
        wbc_models::mllama::Difference::of(&unmerged, &before).relative > 1e-3,
        "training changed the model"
    );
}

/// Every adapter's gradient, in a fixed order.
fn adapter_grads(model: &Mllama, grads: &burn::tensor::Gradients) -> Vec<f32> {
    let mut out = Vec::new();
    for (a, b) in model.adapters() {
        for p in [a, b] {
            out.extend(values(p.grad(grads).expect("adapter gradient")));
        }
    }
    out
}

#[test]
fn a_4_bit_frozen_base_gives_the_gradients_of_the_weights_it_holds_and_trains() {
    let device = Device::flex();
    let ad = device.clone().autodiff();
    let (_, base, inputs, answer_from) = sample(&ad);
    // Block 8 divides every output dimension of this configuration: all 4-bit.
    let (q4, done, total) = base.quantize_base(8);
    assert_eq!(done, total, "every base weight quantized");
    assert!(total > 20);
    // The same 4-bit values held in f32: burn's ordinary autodiff path.
    let dense = q4.clone().dequantize_base().with_lora(&lora(), &ad);
    let q4 = q4.with_lora(&lora(), &ad);
    let loss_q = q4.answer_loss(inputs.rows(0..1), answer_from);
    let loss_d = dense.answer_loss(inputs.rows(0..1), answer_from);
    let (lq, ld) = (loss_q.clone().into_scalar::<f32>(), loss_d.clone().into_scalar::<f32>());
    assert!((lq - ld).abs() < 1e-5 * ld.abs(), "{lq} vs {ld}");
    let gq = adapter_grads(&q4, &loss_q.backward());
    let gd = adapter_grads(&dense, &loss_d.backward());
    assert!(gd.iter().any(|g| g.abs() > 1e-6), "the gradient reaches the adapters");
    let d = wbc_models::mllama::Difference::of(&gq, &gd);
    assert!(d.relative < 1e-4, "{d:?}");
    // And training on the 4-bit base lowers the loss.
    let mut model = q4;
    let mut optim = AdamWConfig::new().init();
    let mut losses = Vec::new();
    for _ in 0..8 {
        let loss = model.answer_loss(inputs.rows(0..1), answer_from);
        losses.push(loss.clone().into_scalar::<f32>());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    assert!(losses[7] < losses[0] - 0.2, "{losses:?}");
}
