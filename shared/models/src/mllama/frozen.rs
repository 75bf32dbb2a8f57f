//! The frozen base of QLoRA: a linear layer whose weight is held quantized (4 bits, block-wise)
//! while adapters beside it train.
//!
//! burn's own path for `x · W` with a quantized `W` dequantizes `W` into an ordinary tensor and
//! multiplies; on an autodiff device the matmul then keeps that dense copy for the backward pass
//! (it needs `W` to send the gradient to `x`), so a training step holds every layer's weight in
//! f32 at once, as if the base had never been quantized. [`FrozenMatmul`] is a backend extension
//! whose backward keeps the *quantized* weight instead and dequantizes it again, one layer at a
//! time, when the gradient passes: `∂L/∂x = ∂L/∂y · deq(W)ᵀ`. The weight itself gets no gradient
//! (it is frozen), so nothing else is needed.
//!
//! Off autodiff (inference, export, the appliance) layers use [`QuantMatmul`]: burn's own
//! quantized product on the GPU backends, a faster one on the CPU ([`super::q4`]).

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::tensor::{FloatTensor, QuantizedTensor};
use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::nn::Linear;
use burn::tensor::quantization::{QuantScheme, QuantValue, ScaleDtype};
use burn::tensor::{DType, FloatDType, Tensor};

use super::q4::QuantMatmul;

/// `x · deq(w)` for a frozen quantized weight. On the GPU backends (feature `cube`, which the
/// appliance's `wgpu` and the trainer's `cuda` features turn on) the forward is burn's native
/// quantized matmul.
#[backend_extension(Flex, Autodiff, Cube: cfg(feature = "cube"))]
pub trait FrozenMatmul: Backend {
    /// `x` `[m, in]` times the quantized `w` `[in, out]`.
    fn frozen_matmul(x: FloatTensor<Self>, w: QuantizedTensor<Self>) -> FloatTensor<Self> {
        let dtype: FloatDType = x.dtype().into();
        Self::float_matmul(x, Self::dequantize(w, dtype))
    }
}

impl FrozenMatmul for Flex {}

#[cfg(feature = "cube")]
impl FrozenMatmul for burn::backend::Cube {}

impl<B: Backend + QuantMatmul, C: CheckpointStrategy> FrozenMatmul for Autodiff<B, C> {
    fn frozen_matmul(x: FloatTensor<Self>, w: QuantizedTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Frozen;

        impl<B: Backend + QuantMatmul> Backward<B, 1> for Frozen {
            /// The quantized weight (shared, not copied) and the float type to rebuild it in.
            type State = (QuantizedTensor<B>, FloatDType);

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
                let (w, dtype) = ops.state;
                unary::<B, _>(ops.parents, ops.node, grads, |grad| {
                    // Rebuilt for this one product and dropped with it.
                    let w = B::quant_dequantize(w, dtype);
                    B::float_matmul(grad, B::float_transpose(w))
                });
            }
        }

        let node = x.node();
        let x = x.into_primitive();
        let dtype: FloatDType = x.dtype().into();
        let y = B::float_matmul(x, B::quant_dequantize(w.clone(), dtype));
        match Frozen.prepare::<C>([node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((w, dtype), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }
}

/// Whether the tensor is held quantized.
pub fn is_quantized<const D: usize>(t: &Tensor<D>) -> bool {
    matches!(t.dtype(), DType::QFloat(_))
}

/// The scheme of the frozen base: signed 4-bit values, one f32 scale per `block` values along
/// the output dimension.
pub fn q4_scheme(block: u8) -> QuantScheme {
    QuantScheme::default()
        .with_value(QuantValue::Q4S)
        .per_block([block], ScaleDtype::F32)
}

/// `l.forward(x)`, through [`FrozenMatmul`] when the weight is quantized and gradients are being
/// recorded, through [`QuantMatmul`] for a quantized weight at inference, and through
/// [`super::rowvec::row_matmul`] for one row of a float weight at inference (a decoding step).
pub fn linear<const D: usize>(l: &Linear, x: Tensor<D>) -> Tensor<D> {
    let w = l.weight.val();
    let dims = x.dims();
    let d_in = dims[D - 1];
    let rows = x.shape().num_elements() / d_in.max(1);
    let (quantized, autodiff) = (is_quantized(&w), x.device().is_autodiff());
    let frozen = quantized && autodiff;
    let one_row = rows == 1 && !quantized && !autodiff;
    if !(quantized || one_row) {
        return l.forward(x);
    }
    let d_out = w.dims()[1];
    let x2: Tensor<2> = x.reshape([rows, d_in]);
    let y = if frozen {
        Tensor::<2>::from_dispatch(<Dispatch as FrozenMatmul>::frozen_matmul(
            x2.into_dispatch(),
            w.into_dispatch(),
        ))
    } else if quantized {
        Tensor::<2>::from_dispatch(<Dispatch as QuantMatmul>::quant_matmul(
            x2.into_dispatch(),
            w.into_dispatch(),
        ))
    } else {
        super::rowvec::row_matmul(x2, w)
    };
    let mut out = dims;
    out[D - 1] = d_out;
    let y = y.reshape(out);
    match &l.bias {
        Some(b) => y + b.val().unsqueeze(),
        None => y,
    }
}

/// Quantizes the layer's weight for the frozen base, if its output dimension divides into
/// blocks; returns whether it did.
pub fn quantize(l: &mut Linear, block: u8) -> bool {
    let w = l.weight.val();
    if is_quantized(&w) || block == 0 || !w.dims()[1].is_multiple_of(block as usize) {
        return false;
    }
    l.weight = burn::module::Param::from_tensor(w.quantize_dynamic(&q4_scheme(block))).set_require_grad(false);
    true
}

/// Replaces a quantized weight by the f32 values it holds.
pub fn dequantize(l: &mut Linear) {
    let w = l.weight.val();
    if is_quantized(&w) {
        l.weight = burn::module::Param::from_tensor(w.dequantize()).set_require_grad(false);
    }
}
