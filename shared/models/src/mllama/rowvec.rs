//! One row times a matrix, `x · W` with `x` of one row: every linear layer of a decoding step.
//!
//! A decoding step reads each weight once to produce one token, so its speed is the rate at
//! which the weights stream from memory. burn flex sends a one-row product through its general
//! matrix product, which reached 7.7–9 GB/s on the development machine where transformers
//! decodes at about 22 GB/s of weights. [`RowMatmul`] streams the weight once, in parallel
//! blocks, in whichever of the two layouts it is stored (`[in, out]` rows, or the transposed
//! view of a `[out, in]` checkpoint tensor), with loops the compiler vectorises. Other backends
//! (and other shapes, types or layouts) keep burn's matmul.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::tensor::{DType, Tensor, TensorData};

/// `x · w` for `x` `[1, in]` and `w` `[in, out]`.
#[backend_extension(Flex, Autodiff, Cube: cfg(feature = "cube"))]
pub trait RowMatmul: Backend {
    /// `x` `[1, in]` times `w` `[in, out]`.
    fn row_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(x, w)
    }
}

/// Output columns (or rows of a transposed weight) per parallel block.
const COLS: usize = 256;
/// Lanes of the dot products' accumulators: independent sums the compiler keeps in vector
/// registers (a single running sum would be a serial chain).
const LANES: usize = 16;

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
}

/// Splits rows `0..d_in` into one contiguous band per thread, lets `band` add its rows'
/// contributions into a partial sum of `d_out` values, and adds the partial sums: the shape of
/// a one-row product that streams its weight row by row.
pub(crate) fn sum_over_row_bands(
    d_in: usize,
    d_out: usize,
    band: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
) -> Vec<f32> {
    use rayon::prelude::*;
    let bands = rayon::current_num_threads().max(1);
    let per = d_in.div_ceil(bands);
    let partial: Vec<Vec<f32>> = (0..bands)
        .into_par_iter()
        .map(|b| {
            let mut acc = vec![0f32; d_out];
            band((b * per).min(d_in)..((b + 1) * per).min(d_in), &mut acc);
            acc
        })
        .collect();
    let mut y = vec![0f32; d_out];
    for p in &partial {
        for (a, v) in y.iter_mut().zip(p) {
            *a += v;
        }
    }
    y
}

/// Deterministic test values in [-1, 1].
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i + seed) * 7919) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

impl RowMatmul for Flex {
    fn row_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        use burn::backend::ops::FloatTensorOps;
        use rayon::prelude::*;
        let (xs, ws) = (x.shape(), w.shape());
        let f32s = x.dtype() == DType::F32 && w.dtype() == DType::F32;
        if !f32s || xs.num_dims() != 2 || ws.num_dims() != 2 || xs[0] != 1 || xs[1] != ws[0] {
            return Self::float_matmul(x, w);
        }
        let (d_in, d_out) = (ws[0], ws[1]);
        let wl = w.layout();
        let (strides, off) = (wl.strides().to_vec(), wl.start_offset());
        let row_major = strides == [d_out as isize, 1];
        let transposed = strides == [1, d_in as isize];
        if !(row_major || transposed) {
            return Self::float_matmul(x, w);
        }
        let x = x.to_contiguous();
        let xv = &x.storage::<f32>()[x.layout().start_offset()..][..d_in];
        let wv = &w.storage::<f32>()[off..];
        let y = if row_major {
            // y = Σ_i x[i]·W[i, :]: each parallel task streams a contiguous band of rows into
            // its own partial sum (a column-blocked walk jumps a whole row per step and ran at
            // half the speed).
            sum_over_row_bands(d_in, d_out, |rows, acc| {
                // Four rows per pass over the partial sum: a quarter of its loads and stores.
                let (mut i, hi) = (rows.start, rows.end);
                while i + 4 <= hi {
                    let x4 = [xv[i], xv[i + 1], xv[i + 2], xv[i + 3]];
                    let r = |k: usize| &wv[(i + k) * d_out..][..d_out];
                    let (r0, r1, r2, r3) = (r(0), r(1), r(2), r(3));
                    let rows = r0.iter().zip(r1).zip(r2.iter().zip(r3));
                    for (a, ((w0, w1), (w2, w3))) in acc.iter_mut().zip(rows) {
                        *a += x4[0] * w0 + x4[1] * w1 + x4[2] * w2 + x4[3] * w3;
                    }
                    i += 4;
                }
                for i in i..hi {
                    let xi = xv[i];
                    for (a, &wv) in acc.iter_mut().zip(&wv[i * d_out..][..d_out]) {
                        *a += xi * wv;
                    }
                }
            })
        } else {
            // The storage is `[out, in]`: y[c] = W'[c, :] · x.
            let mut y = vec![0f32; d_out];
            y.par_chunks_mut(COLS).enumerate().for_each(|(b, out)| {
                for (j, o) in out.iter_mut().enumerate() {
                    let c = b * COLS + j;
                    *o = dot(&wv[c * d_in..][..d_in], xv);
                }
            });
            y
        };
        Flex::float_from_data(TensorData::new(y, [1, d_out]), &Default::default())
    }
}

#[cfg(feature = "cube")]
impl RowMatmul for burn::backend::Cube {}

impl<B: Backend, C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy> RowMatmul for Autodiff<B, C> {}

/// `x · w` for `x` of one row `[1, in]` and `w` `[in, out]`, on any device (autodiff keeps
/// burn's matmul and its gradient).
pub fn row_matmul(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    if x.device().is_autodiff() {
        return x.matmul(w);
    }
    Tensor::from_dispatch(<Dispatch as RowMatmul>::row_matmul(
        x.into_dispatch(),
        w.into_dispatch(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    use super::test_values as values;

    #[test]
    fn it_is_burns_matmul_in_both_layouts() {
        let device = Device::flex();
        // Sizes that leave partial blocks and partial lanes.
        for (d_in, d_out) in [(37, 5), (300, 517), (1000, 256)] {
            let x = Tensor::<2>::from_data(TensorData::new(values(d_in, 1), [1, d_in]), &device);
            let w = Tensor::<2>::from_data(TensorData::new(values(d_in * d_out, 2), [d_in, d_out]), &device);
            let wt =
                Tensor::<2>::from_data(TensorData::new(values(d_in * d_out, 3), [d_out, d_in]), &device).transpose();
            for w in [w, wt] {
                let want = x.clone().matmul(w.clone()).into_data().try_into_vec::<f32>().unwrap();
                let got = row_matmul(x.clone(), w).into_data().try_into_vec::<f32>().unwrap();
                assert_eq!(got.len(), d_out);
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (g, e) in got.iter().zip(&want) {
                    assert!((g - e).abs() <= 1e-5 * scale, "{d_in}x{d_out}: {g} vs {e}");
                }
            }
        }
        // Other shapes and layouts fall back to burn's matmul.
        let x = Tensor::<2>::from_data(TensorData::new(values(6, 0), [2, 3]), &device);
        let w = Tensor::<2>::from_data(TensorData::new(values(12, 0), [3, 4]), &device);
        assert_eq!(row_matmul(x.clone(), w.clone()).into_data(), x.matmul(w).into_data());
    }
}
