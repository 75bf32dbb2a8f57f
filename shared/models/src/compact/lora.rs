//! LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021) for 1×1
//! convolutions: `y = W·x + (α/r)·B·(A·x)`, A `[r, in]` random, B `[out, r]` zero at start, so
//! training begins exactly at the pretrained function. A 1×1 convolution is a per-pixel linear
//! map, so the adapter is two 1×1 convolutions and merges exactly into the base weight as
//! `W + (α/r)·B·A`.

use burn::module::{Module, Param};
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Distribution, Tensor};

/// A LoRA adapter for one pointwise convolution.
#[derive(Module, Debug)]
pub struct LoraPw {
    /// Down projection `[r, in]`.
    pub a: Param<Tensor<2>>,
    /// Up projection `[out, r]`, zero-initialised.
    pub b: Param<Tensor<2>>,
    /// `alpha / r`.
    pub scale: f64,
}

impl LoraPw {
    /// A fresh adapter (`A ~ N(0, 1/in)`, `B = 0`).
    pub fn new(c_in: usize, c_out: usize, rank: usize, alpha: f64, device: &Device) -> Self {
        let std = (1.0 / c_in as f64).sqrt();
        LoraPw {
            a: Param::from_tensor(Tensor::random([rank, c_in], Distribution::Normal(0.0, std), device)),
            b: Param::from_tensor(Tensor::zeros([c_out, rank], device)),
            scale: alpha / rank as f64,
        }
    }

    /// The adapter's contribution for input `x` `[batch, in, h, w]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [r, c_in] = self.a.dims();
        let [c_out, _] = self.b.dims();
        let opts = || ConvOptions::new([1, 1], [0, 0], [1, 1], 1);
        let h = conv2d(x, self.a.val().reshape([r, c_in, 1, 1]), None, opts());
        conv2d(h, self.b.val().reshape([c_out, r, 1, 1]), None, opts()).mul_scalar(self.scale)
    }

    /// The merged weight delta `(α/r)·B·A`, `[out, in]`, computed in f32.
    pub fn delta(&self) -> Tensor<2> {
        self.b.val().matmul(self.a.val()).mul_scalar(self.scale)
    }
}
