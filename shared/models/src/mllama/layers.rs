//! Attention helpers shared by the vision encoder ([`super::vision`]) and the text decoder
//! ([`super::text`]): scaled dot-product attention with an additive mask, grouped-query head
//! repetition, head splitting and merging, and the `tanh` gates. They follow the functions of
//! transformers' `models/mllama/modeling_mllama.py` (`eager_attention_forward`, `repeat_kv`).

use burn::module::Param;
use burn::tensor::Tensor;
use burn::tensor::activation::softmax;

/// The additive mask value transformers uses (`torch.finfo(float32).min`).
pub(super) const MASKED: f32 = f32::MIN;

/// Scaled dot-product attention with an additive mask (broadcast over heads).
pub(super) fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, mask: Option<Tensor<4>>) -> Tensor<4> {
    let hd = q.dims()[3];
    let scores = q.matmul(k.swap_dims(2, 3)) * (hd as f64).powf(-0.5);
    let scores = match mask {
        Some(m) => {
            let s = scores.dims();
            scores + m.expand(s)
        }
        None => scores,
    };
    softmax(scores, 3).matmul(v)
}

/// Repeats key/value heads for grouped-query attention.
pub(super) fn repeat_kv(x: Tensor<4>, n: usize) -> Tensor<4> {
    if n == 1 {
        return x;
    }
    let [b, kv, s, hd] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kv, n, s, hd])
        .reshape([b, kv * n, s, hd])
}

/// `[b, s, heads·hd]` → `[b, heads, s, hd]`.
pub(super) fn split_heads(x: Tensor<3>, heads: usize) -> Tensor<4> {
    let [b, s, d] = x.dims();
    x.reshape([b, s, heads, d / heads]).swap_dims(1, 2)
}

/// `[b, heads, s, hd]` → `[b, s, heads·hd]`.
pub(super) fn merge_heads(x: Tensor<4>) -> Tensor<3> {
    let [b, h, s, hd] = x.dims();
    x.swap_dims(1, 2).reshape([b, s, h * hd])
}

/// `tanh(gate)` shaped `[1, 1, 1]`, to scale a branch as `residual + tanh(gate) · h`.
pub(super) fn tanh_gate(g: &Param<Tensor<1>>) -> Tensor<3> {
    g.val().tanh().reshape([1, 1, 1])
}

/// Looked-up rows in f32 (an embedding a streamed 4-bit model keeps in f16).
pub(super) fn f32_rows<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if x.dtype() == burn::tensor::DType::F32 {
        x
    } else {
        x.cast(burn::tensor::FloatDType::F32)
    }
}
