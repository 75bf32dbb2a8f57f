//! The exported (merged) model must compute what the trained base + adapters computed:
//! `W + (α/r)·B·A` in place of `W` and the adapter path. Checked on random weights with
//! non-zero adapters, through the whole backbone.

use burn::module::Param;
use burn::tensor::{Device, Distribution, Tensor};
use wbc_models::compact::mobilenet::{Backbone, pool};
use wbc_models::compact::{CompactConfig, Trainable};

mod common;
use common::random_backbone;

#[test]
fn merged_weights_match_base_plus_adapters() {
    let device = Device::flex();
    let base = random_backbone(3);
    let backbone = Backbone::new(&base, &device).unwrap();
    let cfg = CompactConfig {
        tune_from: 16,
        dropout: 0.0,
        ..CompactConfig::default()
    };
    let mut t = Trainable::new(&cfg, &backbone, &device);
    assert_eq!(t.adapters.len(), backbone.pointwise_from(16).len());
    assert_eq!(t.adapters.len(), 5); // blocks 16 and 17: expand + project each, and the last 1x1 conv
    for a in &mut t.adapters {
        let [o, r] = a.b.dims();
        a.b = Param::from_tensor(Tensor::random([o, r], Distribution::Normal(0.0, 0.05), &device));
    }
    let x = Tensor::<4>::random([2, 3, 64, 64], Distribution::Normal(0.0, 1.0), &device);
    let entering = backbone.forward_blocks(x.clone(), 0, 16, None);
    let adapted = pool(backbone.forward_blocks(entering, 16, backbone.num_blocks(), Some((&t.adapters, 16))));
    let plain = backbone.features(x.clone());

    let merged = t.merged_weights(&base, &backbone, 16).unwrap();
    let merged_backbone = Backbone::new(&merged, &device).unwrap();
    let via_merge = merged_backbone.features(x);

    let v = |t: Tensor<2>| t.into_data().try_into_vec_as::<f32>().unwrap();
    let (a, m, p) = (v(adapted), v(via_merge), v(plain));
    let diff = a.iter().zip(&m).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let moved = a.iter().zip(&p).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(diff < 1e-3, "merged differs from base + adapters by {diff}");
    // The adapters really changed the function, so the check above means something.
    assert!(moved > 1e-2, "adapters had no effect ({moved})");
    // Heads are exported too.
    assert_eq!(merged.get("head.class.weight").unwrap().shape, vec![1280, 6]);
    assert!(merged.get("classifier.1.weight").is_err());
}
