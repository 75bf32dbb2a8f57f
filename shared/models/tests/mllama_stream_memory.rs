//! Loading a checkpoint into a 4-bit base never holds the model in f32: the peak of live heap
//! bytes while streaming is the model it keeps plus about one weight in flight, well below the
//! f32 model's size, where loading in f32 and quantizing afterwards needs more than the f32 model.
//!
//! Measured with a counting allocator (the only test in this binary, so nothing else allocates
//! meanwhile).

use burn::tensor::Device;
use wbc_models::mllama::{Checkpoint, Mllama, MllamaConfig, write_synthetic_checkpoint};

#[global_allocator]
static HEAP: wbc_models::heap::Counting = wbc_models::heap::Counting;

#[test]
fn a_streamed_4_bit_load_peaks_below_the_f32_model() {
    let dir = tempfile::tempdir().unwrap();
    // Published layout at a width where each weight is a few MB: vision 256 wide, text 512.
    let mut cfg = MllamaConfig::bench_scale("small").unwrap();
    cfg.vision.hidden_size = 256;
    cfg.vision.attention_heads = 4;
    cfg.vision.intermediate_size = 1024;
    cfg.vision.vision_output_dim = 256 * 3;
    cfg.text.hidden_size = 512;
    cfg.text.num_attention_heads = 8;
    cfg.text.num_key_value_heads = 2;
    cfg.text.intermediate_size = 2048;
    cfg.text.vocab_size = 4_000;
    cfg.image_token_index = 4_000;
    write_synthetic_checkpoint(&cfg, dir.path(), 3, 8 << 20).unwrap();
    let f32_model = cfg.parameter_count().total as usize * 4;
    let device = Device::flex();
    // Warm up (thread pools, first-use allocations).
    drop(Mllama::load_quantized(&cfg, &Checkpoint::open(dir.path()).unwrap(), &device, 32).unwrap());

    let before = wbc_models::heap::live();
    let (m, streamed) = wbc_models::heap::peak_during(|| {
        Mllama::load_quantized(&cfg, &Checkpoint::open(dir.path()).unwrap(), &device, 32).unwrap()
    });
    let resident = wbc_models::heap::live().saturating_sub(before);
    drop(m);
    let before = wbc_models::heap::live();
    let (m, after) = wbc_models::heap::peak_during(|| {
        Mllama::load(&cfg, &Checkpoint::open(dir.path()).unwrap(), &device)
            .unwrap()
            .quantize_base(32)
            .0
    });
    let resident_after = wbc_models::heap::live().saturating_sub(before);
    drop(m);
    let mib = |b: usize| b as f64 / 1048576.0;
    eprintln!(
        "f32 model {:.1} MiB; peak streaming into 4 bits {:.1} MiB (model held {:.1} MiB); f32 load then quantize {:.1} MiB (held {:.1} MiB)",
        mib(f32_model),
        mib(streamed),
        mib(resident),
        mib(after),
        mib(resident_after)
    );
    // Above the model it keeps, streaming holds about one weight's pieces: here the LM head,
    // whole (smaller than a read piece), in f32 and its raw bf16, and its 4-bit values.
    let largest = 4_000 * 512 * 4;
    assert!(
        streamed <= resident + 2 * largest,
        "streamed peak {streamed}, model {resident}"
    );
    assert!(
        streamed * 5 < f32_model * 3,
        "streamed peak {streamed} against f32 {f32_model}"
    );
    assert!(after > f32_model, "the f32 path holds the f32 model: {after}");
    // The same 4-bit weights; the streamed model holds its token embedding in f16 (4 MiB less;
    // flex keeps each 4-bit buffer with room for its scales, 2.7 MiB more here).
    assert!(
        resident < resident_after,
        "streamed model {resident} against {resident_after}"
    );
}
