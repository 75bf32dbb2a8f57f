//! Products with block-quantized weights on the CPU (burn flex) without flex's slow
//! dequantization.
//!
//! burn flex multiplies by a quantized weight by dequantizing it first, one value at a time
//! through a general block-index computation on one thread: tens of millions of values per
//! second, so a decoding step of a 4-bit model spends nearly all its time rebuilding f32
//! weights it uses once. Where the weight's blocks are runs along its last dimension (the
//! project's 4-bit scheme: one scale per 32 output values, stored contiguously),
//! [`QuantMatmul`] on flex instead
//! - multiplies one row by the weight directly from its 4-bit values and scales (a decoding
//!   step: the weight streams once, as i8, a quarter of the f32 bytes), and
//! - for several rows, dequantizes in parallel blocks (a loop the compiler vectorises) and then
//!   calls flex's matrix product.
//!
//! Other backends keep burn's own quantized product (native on the GPU backends); other
//! schemes and layouts keep flex's.

use burn::backend::tensor::{FloatTensor, QuantizedTensor};
use burn::backend::{Backend, Flex, TensorMetadata, TensorPrimitive, backend_extension};
use burn::tensor::quantization::global_scale_dtype;
use burn::tensor::{DType, FloatDType, TensorData};

/// Products and dequantization of block-quantized weights.
#[backend_extension(Flex, Autodiff, Cube: cfg(feature = "cube"))]
pub trait QuantMatmul: Backend {
    /// `x` `[m, in]` times the quantized `w` `[in, out]`: burn's own quantized product.
    fn quant_matmul(x: FloatTensor<Self>, w: QuantizedTensor<Self>) -> FloatTensor<Self> {
        let dtype: FloatDType = x.dtype().into();
        match Self::q_matmul(TensorPrimitive::Float(x), TensorPrimitive::QFloat(w)) {
            TensorPrimitive::Float(y) => y,
            TensorPrimitive::QFloat(y) => Self::dequantize(y, dtype),
        }
    }

    /// The f32 (or `dtype`) values of a quantized tensor: burn's own dequantization.
    fn quant_dequantize(w: QuantizedTensor<Self>, dtype: FloatDType) -> FloatTensor<Self> {
        Self::dequantize(w, dtype)
    }
}

/// The values, scales and run length of a flex block-quantized tensor whose blocks are runs of
/// its last dimension and which is stored contiguously; `None` for any other.
fn runs(w: &QuantizedTensor<Flex>) -> Option<(&[i8], &[f32], usize)> {
    let DType::QFloat(scheme) = w.dtype() else {
        return None;
    };
    if global_scale_dtype(&scheme).is_some() {
        return None; // two-level scales
    }
    let shape = w.shape();
    let rank = shape.num_dims();
    let dims = scheme.block_size()?.to_dim_vec(rank);
    let (&last, rest) = dims.split_last()?;
    let run = last as usize;
    if run == 0 || rest.iter().any(|&d| d != 1) || !shape[rank - 1].is_multiple_of(run) {
        return None;
    }
    let t = w.tensor();
    if !t.is_contiguous() {
        return None;
    }
    let n = shape.num_elements();
    let q = t.storage::<i8>().get(t.layout().start_offset()..)?.get(..n)?;
    let s = w.scales();
    (s.len() * run == n).then_some((q, s, run))
}

/// Runs of `run` values per parallel task.
const RUNS_PER_TASK: usize = 512;

/// `q · s` run by run, in parallel.
fn dequantize_runs(q: &[i8], s: &[f32], run: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0f32; q.len()];
    let chunk = run * RUNS_PER_TASK;
    out.par_chunks_mut(chunk)
        .zip(q.par_chunks(chunk))
        .enumerate()
        .for_each(|(c, (o, q))| {
            let scales = &s[c * RUNS_PER_TASK..];
            for ((o, q), &sc) in o.chunks_exact_mut(run).zip(q.chunks_exact(run)).zip(scales) {
                for (o, &v) in o.iter_mut().zip(q) {
                    *o = v as f32 * sc;
                }
            }
        });
    out
}

/// `x · deq(W)` for one row `x` `[in]` and `W` `[in, out]` given as values `q` and one scale per
/// `run` values along each row: each parallel task streams a band of rows into its own partial
/// sum (as [`super::rowvec`] does for f32 weights).
fn row_times_runs(x: &[f32], q: &[i8], s: &[f32], run: usize, d_out: usize) -> Vec<f32> {
    let per_row = d_out / run;
    super::rowvec::sum_over_row_bands(x.len(), d_out, |rows, acc| {
        for i in rows {
            let xi = x[i];
            if xi == 0.0 {
                continue;
            }
            let row = &q[i * d_out..][..d_out];
            let scales = &s[i * per_row..][..per_row];
            for ((a, r), &sc) in acc.chunks_exact_mut(run).zip(row.chunks_exact(run)).zip(scales) {
                let f = xi * sc;
                for (a, &v) in a.iter_mut().zip(r) {
                    *a += f * v as f32;
                }
            }
        }
    })
}

impl QuantMatmul for Flex {
    fn quant_matmul(x: FloatTensor<Self>, w: QuantizedTensor<Self>) -> FloatTensor<Self> {
        use burn::backend::ops::{FloatTensorOps, QTensorOps};
        let (xs, ws) = (x.shape(), w.shape());
        let fits = x.dtype() == DType::F32 && xs.num_dims() == 2 && ws.num_dims() == 2 && xs[1] == ws[0];
        let parts = runs(&w).filter(|_| fits);
        match parts {
            Some((q, s, run)) if xs[0] == 1 => {
                let x = x.to_contiguous();
                let xv = &x.storage::<f32>()[x.layout().start_offset()..][..xs[1]];
                let y = row_times_runs(xv, q, s, run, ws[1]);
                Flex::float_from_data(TensorData::new(y, [1, ws[1]]), &Default::default())
            }
            Some((q, s, run)) => {
                let deq = Flex::float_from_data(
                    TensorData::new(dequantize_runs(q, s, run), [ws[0], ws[1]]),
                    &Default::default(),
                );
                Flex::float_matmul(x, deq)
            }
            None => {
                let dtype: FloatDType = x.dtype().into();
                Flex::float_matmul(x, Flex::dequantize(w, dtype))
            }
        }
    }

    fn quant_dequantize(w: QuantizedTensor<Self>, dtype: FloatDType) -> FloatTensor<Self> {
        use burn::backend::ops::{FloatTensorOps, QTensorOps};
        match runs(&w).filter(|_| matches!(dtype, FloatDType::F32 | FloatDType::Flex32)) {
            Some((q, s, run)) => Flex::float_from_data(
                TensorData::new(dequantize_runs(q, s, run), w.shape()),
                &Default::default(),
            ),
            None => Flex::dequantize(w, dtype),
        }
    }
}

#[cfg(feature = "cube")]
impl QuantMatmul for burn::backend::Cube {}

impl<B: Backend, C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy> QuantMatmul
    for burn::backend::Autodiff<B, C>
{
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mllama::frozen::q4_scheme;
    use burn::backend::Dispatch;
    use burn::tensor::{Device, Tensor};

    use crate::mllama::rowvec::test_values as values;

    fn vec(t: Tensor<2>) -> Vec<f32> {
        t.into_data().try_into_vec::<f32>().unwrap()
    }

    fn close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        for (g, e) in got.iter().zip(want) {
            assert!((g - e).abs() <= 1e-5 * scale, "{what}: {g} vs {e}");
        }
    }

    #[test]
    fn products_and_values_are_burns_for_one_row_several_rows_and_other_schemes() {
        let device = Device::flex();
        for (m, d_in, d_out) in [(1, 37, 64), (1, 300, 512), (5, 300, 512), (3, 64, 32)] {
            let x = Tensor::<2>::from_data(TensorData::new(values(m * d_in, 1), [m, d_in]), &device);
            let w = Tensor::<2>::from_data(TensorData::new(values(d_in * d_out, 2), [d_in, d_out]), &device);
            let wq = w.quantize_dynamic(&q4_scheme(32));
            // burn's own: dequantize, then multiply.
            let want = vec(x.clone().matmul(wq.clone().dequantize()));
            let got = Tensor::<2>::from_dispatch(<Dispatch as QuantMatmul>::quant_matmul(
                x.clone().into_dispatch(),
                wq.clone().into_dispatch(),
            ));
            close(&vec(got), &want, &format!("{m}x{d_in}x{d_out}"));
            let deq = Tensor::<2>::from_dispatch(<Dispatch as QuantMatmul>::quant_dequantize(
                wq.clone().into_dispatch(),
                FloatDType::F32,
            ));
            assert_eq!(vec(deq), vec(wq.dequantize()), "dequantized {d_in}x{d_out}");
        }
        // A per-tensor scheme is not a run layout: burn's path, the same answer.
        let x = Tensor::<2>::from_data(TensorData::new(values(40, 3), [1, 40]), &device);
        let w = Tensor::<2>::from_data(TensorData::new(values(40 * 24, 4), [40, 24]), &device);
        let wq = w.quantize_dynamic(&burn::tensor::quantization::QuantScheme::default());
        let want = vec(x.clone().matmul(wq.clone().dequantize()));
        let got = Tensor::<2>::from_dispatch(<Dispatch as QuantMatmul>::quant_matmul(
            x.into_dispatch(),
            wq.into_dispatch(),
        ));
        close(&vec(got), &want, "per-tensor scheme");
    }
}
