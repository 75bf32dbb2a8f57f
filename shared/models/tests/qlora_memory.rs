//! A QLoRA step keeps the frozen base in 4 bits: the backward pass holds the quantized weights,
//! not a dense f32 copy of each one (which burn's ordinary quantized matmul keeps, so that a
//! training step would need the whole base in f32 at once).
//!
//! Measured with a counting allocator (the only test in this binary, so nothing else allocates
//! meanwhile): the peak of live heap bytes above the starting point during forward + backward.

use burn::module::Param;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Distribution, Tensor};
use wbc_models::mllama::frozen;

#[global_allocator]
static HEAP: wbc_models::heap::Counting = wbc_models::heap::Counting;

/// Peak live bytes above the start while `f` runs.
fn peak_of(f: impl FnOnce()) -> usize {
    wbc_models::heap::peak_during(f).1
}

const LAYERS: usize = 8;
const WIDTH: usize = 512;

/// One forward and backward pass through the frozen stack; the input is what trains.
fn step(layers: &[Linear], x: &Tensor<2>, forward: fn(&Linear, Tensor<2>) -> Tensor<2>) {
    let x = x.clone().require_grad();
    let mut h = x.clone();
    for l in layers {
        h = forward(l, h).tanh();
    }
    let grads = h.sum().backward();
    let g = x.grad(&grads).expect("the gradient reaches the input");
    assert_eq!(g.dims(), [16, WIDTH]);
}

#[test]
fn the_backward_pass_keeps_the_4_bit_weights_not_dense_copies() {
    let device = Device::flex().autodiff();
    let layers: Vec<Linear> = (0..LAYERS)
        .map(|_| {
            let mut l = LinearConfig::new(WIDTH, WIDTH).with_bias(false).init(&device);
            l.weight = Param::from_tensor(l.weight.val()).set_require_grad(false);
            assert!(frozen::quantize(&mut l, 32));
            l
        })
        .collect();
    let x = Tensor::<2>::random([16, WIDTH], Distribution::Normal(0.0, 1.0), &device);
    // Warm up both paths (thread pools, caches) before measuring.
    step(&layers, &x, frozen::linear);
    step(&layers, &x, |l, x| l.forward(x));

    let dense_bytes = LAYERS * WIDTH * WIDTH * 4;
    let ordinary = peak_of(|| step(&layers, &x, |l, x| l.forward(x)));
    let frozen_path = peak_of(|| step(&layers, &x, frozen::linear));
    eprintln!(
        "peak above start: burn's quantized matmul {:.2} MiB, frozen path {:.2} MiB (dense base {:.2} MiB)",
        ordinary as f64 / 1048576.0,
        frozen_path as f64 / 1048576.0,
        dense_bytes as f64 / 1048576.0
    );
    // The ordinary path holds every layer's dense copy until the backward pass reaches it ...
    assert!(ordinary >= dense_bytes, "{ordinary} < {dense_bytes}");
    // ... the frozen path at most a couple of them at a time.
    assert!(frozen_path < dense_bytes / 3, "{frozen_path} vs {dense_bytes}");
}
