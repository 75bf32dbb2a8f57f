//! The streamed paths of the full-size model: the checkpoint read in pieces, the base quantized
//! as it arrives (the same 4-bit tensors as quantizing an f32 model), synthetic sharded
//! checkpoints under the published names, and damaged shards refused with an error.

use burn::tensor::{Device, Distribution, Tensor, TensorData};
use std::path::{Path, PathBuf};
use wbc_models::mllama::frozen::{RowQuantizer, q4_scheme};
use wbc_models::mllama::{
    Checkpoint, CheckpointError, Mllama, MllamaConfig, Reference, reference_inputs, write_synthetic_checkpoint,
};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures/mllama")
        .join(name)
}

fn values(t: Tensor<2>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

#[test]
fn rows_quantized_as_they_arrive_equal_burns_quantization_of_the_transposed_weight() {
    let device = Device::flex();
    // (rows, columns, block, rows per piece): pieces that split blocks, rows of one value.
    for (rows, cols, block, piece) in [(64, 48, 32, 7), (96, 5, 8, 1), (32, 33, 32, 100), (16, 1, 16, 3)] {
        let w = Tensor::<2>::random([rows, cols], Distribution::Normal(0.0, 1.0), &device);
        // A block of zeros and a lone large value: scales at both ends.
        let mut v = values(w);
        v[..cols].iter_mut().for_each(|x| *x = 0.0);
        v[cols * (rows - 1)] = 50.0;
        let mut q = RowQuantizer::new(rows, cols, block);
        for chunk in v.chunks(piece * cols) {
            q.push(chunk);
        }
        let got = q.finish(&device);
        assert!(wbc_models::mllama::frozen::is_quantized(&got));
        let want = Tensor::<2>::from_data(TensorData::new(v, [rows, cols]), &device)
            .transpose()
            .quantize_dynamic(&q4_scheme(block));
        assert_eq!(got.dims(), [cols, rows]);
        assert_eq!(
            values(got.dequantize()),
            values(want.dequantize()),
            "{rows}x{cols} in blocks of {block}"
        );
    }
}

/// The logits of the fixture's reference inputs.
fn logits(model: &Mllama, dir: &Path, device: &Device) -> Vec<f32> {
    let r = Reference::open(&dir.join("io.safetensors")).unwrap();
    let l = model.forward(reference_inputs(&r, device).unwrap());
    l.into_data().try_to_vec::<f32>().unwrap()
}

#[test]
fn a_base_streamed_into_4_bits_answers_as_the_f32_base_quantized_after_loading() {
    for name in ["gqa-llama3", "mha-bf16-sharded"] {
        let dir = fixture(name);
        let cfg = MllamaConfig::load(&dir).unwrap();
        let device = Device::flex();
        let ck = Checkpoint::open(&dir).unwrap();
        let (after, done, total) = Mllama::load(&cfg, &ck, &device).unwrap().quantize_base(8);
        // Weights whose output does not divide into blocks stay in f32 on both paths.
        assert!(done * 10 >= total * 9, "{name}: {done} of {total} in 4 bits");
        let streamed = Mllama::load_quantized(&cfg, &Checkpoint::open(&dir).unwrap(), &device, 8).unwrap();
        let (a, b) = (logits(&after, &dir, &device), logits(&streamed, &dir, &device));
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        let worst = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        // The same 4-bit weights; only the token embedding differs (f16 against f32).
        eprintln!("{name}: largest logit difference {worst:.2e} of {scale:.2e}");
        assert!(worst <= 2e-3 * scale, "{name}: {worst} of {scale}");
    }
}

/// A small configuration of the published layout (every kind of tensor, a few MB).
fn small() -> MllamaConfig {
    let mut c = MllamaConfig::bench_scale("small").unwrap();
    c.text.vocab_size = 2_000;
    c.image_token_index = 2_000;
    c
}

#[test]
fn a_synthetic_checkpoint_is_sharded_under_the_published_names_and_loads_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small();
    let a = dir.path().join("a");
    let w = write_synthetic_checkpoint(&cfg, &a, 7, 3 << 20).unwrap();
    assert!(w.shards.len() >= 3, "{w:?}");
    assert_eq!(w.shards[0], format!("model-00001-of-{:05}.safetensors", w.shards.len()));
    assert_eq!(MllamaConfig::load(&a).unwrap(), cfg);
    let ck = Checkpoint::open(&a).unwrap();
    assert_eq!(ck.names().count(), w.tensors);
    assert!(ck.names().any(|n| n == "language_model.lm_head.weight"));
    assert!(
        ck.names()
            .any(|n| n.starts_with("vision_model.global_transformer.layers.1."))
    );
    // bf16 on disk, as published: half the bytes of the f32 values.
    let count = cfg.parameter_count().total;
    assert_eq!(w.bytes, 2 * count, "{w:?}");
    // Norms at one, weights drawn with spread 0.02.
    let norm = ck.tensor("language_model.model.norm.weight", &[256]).unwrap();
    assert!(norm.iter().all(|&x| x == 1.0));
    let q = ck
        .tensor("language_model.model.layers.0.self_attn.q_proj.weight", &[256, 256])
        .unwrap();
    let sd = (q.iter().map(|x| x * x).sum::<f32>() / q.len() as f32).sqrt();
    assert!((sd - 0.02).abs() < 0.002, "{sd}");
    let device = Device::flex();
    Mllama::load(&cfg, &ck, &device).unwrap();
    Mllama::load_quantized(&cfg, &Checkpoint::open(&a).unwrap(), &device, 32).unwrap();
    // Seeded: the same seed writes the same bytes.
    let b = dir.path().join("b");
    write_synthetic_checkpoint(&cfg, &b, 7, 3 << 20).unwrap();
    for s in &w.shards {
        assert!(
            std::fs::read(a.join(s)).unwrap() == std::fs::read(b.join(s)).unwrap(),
            "{s}"
        );
    }
    // Python's safetensors needs the header padded to 8 bytes.
    let first = std::fs::read(a.join(&w.shards[0])).unwrap();
    let n = u64::from_le_bytes(first[..8].try_into().unwrap());
    assert_eq!(n % 8, 0);
}

#[test]
fn damaged_shards_are_refused_with_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small();
    let a = dir.path().join("a");
    let w = write_synthetic_checkpoint(&cfg, &a, 1, 3 << 20).unwrap();
    let device = Device::flex();
    let load = || Mllama::load_quantized(&cfg, &Checkpoint::open(&a)?, &device, 32).map(|_| ());
    let shard = a.join(&w.shards[1]);
    let good = std::fs::read(&shard).unwrap();
    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", good[..good.len() - 1000].to_vec()),
        ("empty", Vec::new()),
        ("a header claiming a terabyte", {
            let mut b = good.clone();
            b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
            b
        }),
        ("a header that is not JSON", {
            let mut b = good.clone();
            b[8..8 + n].fill(b'{');
            b
        }),
        ("a tensor whose bytes do not fit its shape", {
            let text = String::from_utf8(good[8..8 + n].to_vec()).unwrap();
            let i = text.find("\"shape\":[").unwrap() + "\"shape\":[".len();
            let mut t = text.into_bytes();
            // The first dimension's first digit, one higher (the header keeps its length).
            t[i] = if t[i] == b'9' { b'1' } else { t[i] + 1 };
            let mut b = good[..8].to_vec();
            b.extend_from_slice(&t);
            b.extend_from_slice(&good[8 + n..]);
            b
        }),
    ];
    for (what, bytes) in cases {
        std::fs::write(&shard, &bytes).unwrap();
        let e = load().unwrap_err();
        eprintln!("{what}: {e}");
        assert!(
            matches!(e, CheckpointError::Format(ref m) if m.contains(&w.shards[1])),
            "{what}: {e}"
        );
    }
    std::fs::write(&shard, &good).unwrap();
    load().unwrap();
    std::fs::remove_file(&shard).unwrap();
    assert!(matches!(load().unwrap_err(), CheckpointError::Io { .. }));
}
