//! The burn mllama against transformers (5.24, torch 2.15, f32 on CPU) on the committed
//! random-weight checkpoints (`scripts/reference/gen_mllama.py`): the vision encoder's output and
//! the logits of a batch with a 1-tile and a 4-tile image, text rows that see no image, GQA and
//! Llama 3 rope scaling, a sharded bf16 checkpoint. Tolerance: the largest difference at most
//! 1e-4 of the reference's largest magnitude.

use burn::tensor::Device;
use burn::tensor::{Int, Tensor, TensorData};
use std::path::PathBuf;
use wbc_models::mllama::chat::{ChatTokenizer, Message, Part, cross_attention_mask};
use wbc_models::mllama::{
    Checkpoint, CheckpointError, ImageProcessor, Mllama, MllamaConfig, Reference, Sampling, check_parity, generate,
    probabilities, reference_inputs, score,
};

const TOLERANCE: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures/mllama")
        .join(name)
}

/// On the inference path (the vision attention as fused, unmasked parts) and on the training
/// path (an autodiff device: transformers' additive mask), both against transformers.
fn check(name: &str) {
    let dir = fixture(name);
    for device in [Device::flex(), Device::flex().autodiff()] {
        let p = check_parity(&dir, &dir.join("io.safetensors"), &device).unwrap();
        eprintln!("{name} (autodiff: {}): {p:?}", device.is_autodiff());
        let v = p.vision.expect("the fixture has the vision output");
        assert!(v.relative <= TOLERANCE, "{name}: vision encoder {v:?}");
        assert!(p.logits.relative <= TOLERANCE, "{name}: logits {:?}", p.logits);
    }
}

#[test]
fn gqa_with_llama3_rope_and_two_cross_attention_layers_matches_transformers() {
    check("gqa-llama3");
}

#[test]
fn a_sharded_bf16_checkpoint_without_gqa_matches_transformers() {
    check("mha-bf16-sharded");
}

#[test]
fn a_checkpoint_that_does_not_fit_its_configuration_is_refused_naming_the_tensor() {
    let dir = fixture("gqa-llama3");
    let mut cfg = MllamaConfig::load(&dir).unwrap();
    let device = Device::flex();
    // One MLP width more than the checkpoint has.
    cfg.text.intermediate_size += 1;
    let e = Mllama::load(&cfg, &Checkpoint::open(&dir).unwrap(), &device).unwrap_err();
    assert!(
        matches!(&e, CheckpointError::Shape { name, .. } if name.contains("mlp")),
        "{e}"
    );
    // One cross-attention layer fewer: its tensors are left over, or a self-attention tensor
    // is missing.
    let mut cfg = MllamaConfig::load(&dir).unwrap();
    cfg.text.cross_attention_layers = vec![1];
    let e = Mllama::load(&cfg, &Checkpoint::open(&dir).unwrap(), &device).unwrap_err();
    assert!(
        matches!(e, CheckpointError::Missing(ref n) if n.contains("layers.3.self_attn")),
        "{e}"
    );
}

#[test]
fn the_image_processor_matches_transformers_on_real_images() {
    // transformers' MllamaImageProcessor with 28-px tiles, 4 tiles, CLIP mean/std.
    let p = ImageProcessor {
        tile: 28,
        ..ImageProcessor::llama_3_2_vision()
    };
    let dir = fixture("processor");
    let r = Reference::open(&dir.join("io.safetensors")).unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures");
    for (name, path) in [
        ("cell", root.join("reference/EO_100884.png")),
        ("wide", dir.join("wide.png")),
        ("small", dir.join("small.png")),
    ] {
        let img = image::open(&path).unwrap().to_rgb8();
        let got = p.process(&img);
        let ids = r.ints(&format!("{name}.aspect_ratio_ids")).unwrap().values;
        assert_eq!(ids, vec![got.aspect_ratio_id as i64], "{name}: aspect ratio id");
        let mask = r.ints(&format!("{name}.aspect_ratio_mask")).unwrap().values;
        let mask: Vec<f32> = mask.into_iter().map(|v| v as f32).collect();
        assert_eq!(mask, got.aspect_ratio_mask, "{name}: aspect ratio mask");
        let want = r.floats(&format!("{name}.pixel_values")).unwrap();
        assert_eq!(want.shape, vec![1, 1, 4, 3, 28, 28]);
        let diffs: Vec<f32> = want
            .values
            .iter()
            .zip(&got.pixel_values)
            .map(|(a, b)| (a - b).abs())
            .collect();
        let max = diffs.iter().fold(0f32, |a, b| a.max(*b));
        let off = diffs.iter().filter(|d| **d > 1e-5).count();
        eprintln!(
            "{name}: layout {:?}, max difference {max:.2e}, {off} of {} values off",
            got.layout,
            diffs.len()
        );
        // The same fixed-point resize as torch's: equal up to the float normalisation.
        assert!(
            max <= 1e-5 && off == 0,
            "{name}: max difference {max}, {off} values differ"
        );
    }
}

fn load(name: &str) -> (Mllama, Reference, Device) {
    let dir = fixture(name);
    let device = Device::flex();
    let cfg = MllamaConfig::load(&dir).unwrap();
    let model = Mllama::load(&cfg, &Checkpoint::open(&dir).unwrap(), &device).unwrap();
    (model, Reference::open(&dir.join("io.safetensors")).unwrap(), device)
}

#[test]
fn greedy_generation_with_the_kv_cache_gives_transformers_tokens() {
    for name in ["gqa-llama3", "mha-bf16-sharded"] {
        let (model, r, device) = load(name);
        let inputs = reference_inputs(&r, &device).unwrap().rows(0..1);
        let want: Vec<u32> = r
            .ints("generated_ids")
            .unwrap()
            .values
            .iter()
            .map(|&v| v as u32)
            .collect();
        assert_eq!(want.len(), 8);
        let got = generate(&model, inputs, 8, &[], Sampling::Greedy);
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn cached_steps_give_the_logits_of_the_whole_sequence() {
    let (model, r, device) = load("gqa-llama3");
    let inputs = reference_inputs(&r, &device).unwrap();
    let [b, s] = inputs.input_ids.dims();
    let whole = model
        .forward(inputs.rows(0..b))
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    // The prompt's first 5 tokens at once, then one token at a time.
    let (first, mut cache) = model.prefill(inputs.prefix(5), s);
    let mut got = vec![first];
    let ids = r.ints("input_ids").unwrap().values;
    for k in 5..s {
        let col: Vec<i64> = (0..b).map(|row| ids[row * s + k]).collect();
        let step = Tensor::<2, Int>::from_data(TensorData::new(col, [b, 1]), &device);
        got.push(model.step(step, &mut cache));
    }
    assert_eq!(cache.len(), s);
    let got = Tensor::cat(got, 1).into_data().try_to_vec::<f32>().unwrap();
    let d = wbc_models::mllama::Difference::of(&got, &whole);
    assert!(d.relative <= 1e-5, "{d:?}");
}

#[test]
fn candidates_are_scored_by_their_log_likelihood_as_transformers_computes_it() {
    for name in ["gqa-llama3", "mha-bf16-sharded"] {
        let (model, r, device) = load(name);
        let inputs = reference_inputs(&r, &device).unwrap().rows(0..1);
        let c = r.ints("candidates").unwrap();
        let width = c.shape[1];
        let candidates: Vec<Vec<u32>> = c
            .values
            .chunks(width)
            .map(|row| row.iter().filter(|&&t| t >= 0).map(|&t| t as u32).collect())
            .collect();
        let want = r.floats("candidate_logprobs").unwrap().values;
        let got = score(&model, inputs, &candidates);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{name}: {got:?} vs {want:?}");
        }
        let p = probabilities(&got);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        // A longer continuation that begins with another is less likely than it.
        assert!(got[0] < got[3], "{got:?}");
    }
}

#[test]
fn the_chat_format_and_cross_attention_masks_match_transformers() {
    let dir = fixture("chat");
    let tok = ChatTokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    assert_eq!((tok.image_token, tok.eot_token), (128_256, 128_009));
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    for case in cases["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let messages: Vec<Message> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message {
                role: m["role"].as_str().unwrap().into(),
                content: match &m["content"] {
                    serde_json::Value::String(t) => vec![Part::Text(t.clone())],
                    parts => parts
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|p| match p["type"].as_str().unwrap() {
                            "image" => Part::Image,
                            _ => Part::Text(p["text"].as_str().unwrap().into()),
                        })
                        .collect(),
                },
            })
            .collect();
        let add = case["add_generation_prompt"].as_bool().unwrap();
        assert_eq!(
            ChatTokenizer::render(&messages, add),
            case["text"].as_str().unwrap(),
            "{name}"
        );
        let ids = tok.encode_chat(&messages, add).unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(ids, want, "{name}");
        let tiles: Vec<usize> = serde_json::from_value(case["num_tiles"].clone()).unwrap();
        let mask = cross_attention_mask(&ids, tok.image_token, &tiles, 4);
        let want: Vec<Vec<Vec<f32>>> = serde_json::from_value(case["cross_attention_mask"].clone()).unwrap();
        let want: Vec<f32> = want.into_iter().flatten().flatten().collect();
        assert_eq!(mask, want, "{name}");
    }
}
