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
use burn::tensor::quantization::{QuantScheme, QuantStore, QuantValue, ScaleDtype};
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

/// Builds a frozen base weight in 4 bits straight from the rows of its checkpoint form
/// (`[out, in]`, PyTorch's layout), one band of `block` rows at a time: the same tensor as
/// transposing the f32 weight and quantizing it with [`q4_scheme`], without ever holding the
/// f32 weight (what it holds is one byte per value and the scales until [`finish`]).
///
/// [`finish`]: RowQuantizer::finish
pub struct RowQuantizer {
    d_out: usize,
    d_in: usize,
    block: usize,
    /// `[in, out]`, one value per byte.
    q: Vec<i8>,
    /// `[in, out / block]`.
    scales: Vec<f32>,
    /// The band being filled: up to `block` rows of `in` values.
    band: Vec<f32>,
    /// Rows pushed so far.
    rows: usize,
}

impl RowQuantizer {
    /// For a weight of `d_out` rows of `d_in` values; `block` must divide `d_out`.
    pub fn new(d_out: usize, d_in: usize, block: u8) -> Self {
        let block = block as usize;
        assert!(
            block > 0 && d_out.is_multiple_of(block),
            "{d_out} rows do not divide into blocks of {block}"
        );
        let n = d_in * d_out;
        let mut q = Vec::with_capacity(Self::room(d_out, d_in, block as u8));
        q.resize(n, 0);
        RowQuantizer {
            d_out,
            d_in,
            block,
            q,
            scales: vec![0.0; d_in * (d_out / block)],
            band: Vec::with_capacity(block * d_in),
            rows: 0,
        }
    }

    /// The bytes a weight's values are kept in: room for the scales too, which burn appends to
    /// the values' buffer (the tensor keeps that buffer; without the room it would grow it, to
    /// twice the values' size).
    pub fn room(d_out: usize, d_in: usize, block: u8) -> usize {
        let n = d_in * d_out;
        n + 4 * (n / (block as usize).max(1)) + 64
    }

    /// A weight already in this grid: `values` `[in, out]` (in [`RowQuantizer::room`]) and
    /// `scales` `[in, out / block]`, as [`crate::quant::Q4Blocks`] stores them.
    ///
    /// # Panics
    /// If the sizes do not fit `d_out`, `d_in` and `block`.
    pub fn from_grid(d_out: usize, d_in: usize, block: u8, values: Vec<i8>, scales: Vec<f32>) -> Self {
        let block = block as usize;
        assert!(
            block > 0 && d_out.is_multiple_of(block),
            "{d_out} outputs in blocks of {block}"
        );
        assert_eq!(
            (values.len(), scales.len()),
            (d_in * d_out, d_in * d_out / block),
            "a [{d_in}, {d_out}] grid"
        );
        RowQuantizer {
            d_out,
            d_in,
            block,
            q: values,
            scales,
            band: Vec::new(),
            rows: d_out,
        }
    }

    /// The next whole rows, in order.
    pub fn push(&mut self, mut values: &[f32]) {
        assert!(values.len().is_multiple_of(self.d_in.max(1)), "pushed a partial row");
        while !values.is_empty() {
            let take = (self.block * self.d_in - self.band.len()).min(values.len());
            self.band.extend_from_slice(&values[..take]);
            values = &values[take..];
            if self.band.len() == self.block * self.d_in {
                self.quantize_band();
                self.band.clear();
            }
        }
    }

    /// Quantizes the full band: for each input `i`, the block of `block` output values, as
    /// burn's symmetric block quantization does it (scale `2·max|x| / (b − a)`, values
    /// `round(x / scale)` clamped to `[a, b]`).
    fn quantize_band(&mut self) {
        use crate::quant::{q4s_scale, q4s_value};
        use rayon::prelude::*;
        let (d_in, d_out, block) = (self.d_in, self.d_out, self.block);
        let j0 = self.rows;
        let bi = j0 / block;
        let nb = d_out / block;
        let band = &self.band;
        self.q
            .par_chunks_mut(d_out)
            .zip(self.scales.par_chunks_mut(nb))
            .enumerate()
            .with_min_len(256)
            .for_each(|(i, (qrow, srow))| {
                let s = q4s_scale((0..block).fold(0f32, |m, k| m.max(band[k * d_in + i].abs())));
                let inv = 1.0 / s;
                for k in 0..block {
                    qrow[j0 + k] = q4s_value(band[k * d_in + i], inv);
                }
                srow[bi] = s;
            });
        self.rows += block;
    }

    /// The quantized `[in, out]` weight on `device`, frozen.
    pub fn finish(self, device: &burn::tensor::Device) -> Tensor<2> {
        assert!(
            self.rows == self.d_out && self.band.is_empty(),
            "{} of {} rows pushed",
            self.rows + self.band.len() / self.d_in.max(1),
            self.d_out
        );
        let scheme = q4_scheme(self.block as u8);
        let t = if device.clone().without_autodiff() == burn::tensor::Device::flex() {
            // flex holds quantized values one per byte ("native"): handed over as they are.
            let data = burn::tensor::TensorData::quantized(
                self.q,
                [self.d_in, self.d_out],
                scheme.with_store(QuantStore::Native),
                &self.scales,
                None,
            );
            Tensor::from_data(data, device)
        } else {
            // The GPU backends pack values their own way: this one weight goes over in f32 (its
            // values already on the 4-bit grid, so quantizing them there gives them back) and is
            // quantized on the device.
            let block = self.block;
            let values: Vec<f32> = self
                .q
                .iter()
                .enumerate()
                .map(|(i, &v)| f32::from(v) * self.scales[i / block])
                .collect();
            drop(self.q);
            let w: Tensor<2> =
                Tensor::from_data(burn::tensor::TensorData::new(values, [self.d_in, self.d_out]), device);
            w.quantize_dynamic(&scheme)
        };
        t.set_require_grad(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compact::weights::{NamedTensor, SafetensorsWriter, Storage, WeightsView};
    use burn::tensor::Device;

    #[test]
    fn a_weight_stored_in_the_devices_grid_is_built_from_its_values_as_they_are() {
        // A `[out, in]` weight written in the device's grid and read back: the model's tensor
        // holds exactly the stored values times their scales, where unpacking it and
        // quantizing it again (the path of a grid of its own) rounds a second time.
        let (d_out, d_in, block) = (64, 24, 32u8);
        let values: Vec<f32> = (0..d_out * d_in)
            .map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 300.0)
            .collect();
        let mut w = SafetensorsWriter::new(16);
        let t = NamedTensor {
            shape: vec![d_out, d_in],
            values: values.clone(),
        };
        w.push("p.weight", &t, Storage::Q4Out(block as usize));
        w.push("g.weight", &t, Storage::Q4);
        let bytes = w.finish().unwrap();
        let view = WeightsView::new(&bytes).unwrap();
        assert_eq!(view.shape("p.weight").unwrap(), vec![d_out, d_in]);
        let stored = view.get("p.weight").unwrap().values; // [out, in]
        let room = RowQuantizer::room(d_out, d_in, block);
        let shape = [d_out, d_in];
        let (q, s) = view
            .grid("p.weight", shape, block as usize, room)
            .unwrap()
            .expect("stored in the grid");
        assert!(q.capacity() >= room);
        // Another block size, or a tensor in the other 4-bit form, is not this grid; another
        // shape with as many values is an error, not a weight laid out wrongly.
        assert!(view.grid("p.weight", shape, 16, room).unwrap().is_none());
        assert!(view.grid("g.weight", shape, block as usize, room).unwrap().is_none());
        assert!(
            view.grid("p.weight", [d_in * 2, d_out / 2], block as usize, room)
                .is_err()
        );

        let device = Device::flex();
        let direct = RowQuantizer::from_grid(d_out, d_in, block, q, s).finish(&device);
        let direct: Vec<f32> = direct.dequantize().into_data().try_into_vec().unwrap(); // [in, out]
        for o in 0..d_out {
            for i in 0..d_in {
                assert_eq!(direct[i * d_out + o], stored[o * d_in + i], "value ({o}, {i})");
            }
        }
        // The export's rule is the device's: the original weight quantized on the device (f32
        // scales) is the stored grid (f16 scales) but for a value rounded the other way where
        // the two scales straddle a half step.
        let mut on_device = RowQuantizer::new(d_out, d_in, block);
        on_device.push(&values);
        let on_device: Vec<f32> = on_device
            .finish(&device)
            .dequantize()
            .into_data()
            .try_into_vec()
            .unwrap();
        let step = |i: usize, o: usize| {
            let m = (o / 32 * 32..o / 32 * 32 + 32).fold(0f32, |m, r| m.max(values[r * d_in + i].abs()));
            let (a, b) = QuantValue::Q4S.range();
            m * 2.0 / (b - a)
        };
        let mut moved = 0;
        for o in 0..d_out {
            for i in 0..d_in {
                let d = (direct[i * d_out + o] - on_device[i * d_out + o]).abs();
                assert!(
                    d <= step(i, o) * 1.01,
                    "({o}, {i}): {d} against a step of {}",
                    step(i, o)
                );
                moved += usize::from(d > step(i, o) * 0.01);
            }
        }
        assert!(
            moved * 100 <= d_out * d_in,
            "{moved} of {} values rounded the other way",
            d_out * d_in
        );
    }
}
