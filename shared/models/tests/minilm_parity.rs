//! all-MiniLM-L6-v2 in burn against sentence-transformers on five sentences.
//! Reference values: `scripts/reference/gen_references.py` (versions in the fixture).
//! Tolerance: token ids exact; embeddings 1e-4 absolute per component.

mod common;

use burn::tensor::Device;
use common::*;
use wbc_models::embed::MiniLm;

#[test]
fn embeddings_and_similarities_match_sentence_transformers() {
    let reference = json("reference/minilm.json");
    let model = MiniLm::load(&weights_dir().join("all-MiniLM-L6-v2"), &Device::flex()).unwrap();
    let sentences: Vec<&str> = reference["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    let mut embs = Vec::new();
    for (i, s) in sentences.iter().enumerate() {
        let ids: Vec<u32> = reference["token_ids"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(model.tokenize(s).unwrap(), ids, "token ids of {s:?}");
        let e = model.embed(s).unwrap();
        let want = floats(&reference["embeddings"][i]);
        let max = e.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(max < 1e-4, "sentence {i}: max abs diff {max}");
        let pooled = model.mean_pooled(s).unwrap();
        let want_pooled = floats(&reference["unnormalised_mean_pooled"][i]);
        let maxp = pooled
            .iter()
            .zip(&want_pooled)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(maxp < 5e-4, "sentence {i}: pooled max abs diff {maxp}");
        embs.push(e);
    }
    for i in 0..sentences.len() {
        for j in 0..sentences.len() {
            let want = reference["cosine"][i][j].as_f64().unwrap() as f32;
            let got = wbc_models::metrics::cosine(&embs[i], &embs[j]);
            assert!((got - want).abs() < 1e-4, "cosine[{i}][{j}] {got} vs {want}");
        }
    }
    // The off-topic sentence is far from every cell description.
    assert!(model.similarity(sentences[0], sentences[3]).unwrap() < 0.1);
}
