//! MobileNetV2's depthwise 3×3 convolutions with their bias and ReLU6, in one pass over each
//! output row.
//!
//! On the CPU backend (flex 0.22) a depthwise convolution zeroes its output, adds the nine taps
//! in nine passes over every output plane (a stride-2 tap gathering one value at a time), adds
//! the bias in another pass, and the model's ReLU6 is a third. [`Depthwise`] computes each
//! output row once, in L1: the bias, the taps of the three input rows that reach it (at stride
//! 2 from a copy of the input plane split into even and odd columns, so that every tap is a
//! contiguous, vectorised loop), then the clamp; planes in parallel; AVX-512 or AVX2/FMA where
//! the processor has them. Other backends (and autodiff, which needs the gradients) keep burn's
//! `conv2d` and `clamp`.
//!
//! The split copy is per plane, in a buffer each worker thread keeps: a first version split
//! the whole input at once, a fresh 19 MB allocation per forward pass at four cells, and its
//! page faults (250 000 against flex's 30 000 over the benchmark) made the model slower than
//! with flex's convolution although each layer alone was faster.

use super::simd::{self, Isa, Level, values};
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Tensor, TensorData};
use std::cell::RefCell;

/// A depthwise 3×3 convolution with padding 1, its bias, and ReLU6 where asked.
#[backend_extension(Flex, Autodiff, Cube: cfg(feature = "cube"))]
pub trait Depthwise: Backend {
    /// `x` `[n, c, h, w]`, `weight` `[c, 1, 3, 3]`, `bias` `[c]`; stride 1 or 2.
    fn depthwise3x3(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: usize,
        relu6: bool,
    ) -> FloatTensor<Self> {
        burns::<Self>(x, weight, bias, stride, relu6)
    }
}

/// burn's own operations: the convolution (groups from the shapes) and the clamp.
fn burns<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: FloatTensor<B>,
    stride: usize,
    relu6: bool,
) -> FloatTensor<B> {
    let (xs, ws) = (x.shape(), weight.shape());
    let groups = if xs.num_dims() == 4 && ws.num_dims() == 4 && ws[1] > 0 {
        (xs[1] / ws[1]).max(1)
    } else {
        1
    };
    let opts = ConvOptions::new([stride; 2], [1, 1], [1, 1], groups);
    let y = B::conv2d(x, weight, Some(bias), opts);
    if relu6 {
        B::float_clamp(y, 0.0.into(), 6.0.into())
    } else {
        y
    }
}

/// Output side of a 3×3 convolution with padding 1.
fn out_side(input: usize, stride: usize) -> usize {
    (input + 2 - 3) / stride + 1
}

/// An input plane's size, the stride, and whether ReLU6 follows.
#[derive(Clone, Copy)]
struct Geometry {
    h: usize,
    w: usize,
    stride: usize,
    relu6: bool,
}

/// One output plane from its input plane (`h` rows of `w`; at stride 2 each row holds its even
/// columns, then its odd ones) and its nine weights: each run of `S::LANES` outputs of a row
/// from the nine shifted runs of its three input rows (padding as lanes never read), the bias,
/// the clamp, one store.
///
/// # Safety
/// The processor has `S`; `input` holds `h × w` values and `out` the output plane.
#[inline(always)]
unsafe fn plane<S: Isa>(out: &mut [f32], input: &[f32], k: &[f32], bias: f32, g: Geometry) {
    let Geometry { h, w, stride, relu6 } = g;
    let ow = out_side(w, stride);
    let (even, odd) = (w.div_ceil(2), w / 2);
    let lanes = S::LANES;
    for (oh, row) in out.chunks_exact_mut(ow).enumerate() {
        let rows: [Option<&[f32]>; 3] = std::array::from_fn(|kh| {
            (oh * stride + kh)
                .checked_sub(1)
                .filter(|&ih| ih < h)
                .map(|ih| &input[ih * w..][..w])
        });
        for o in (0..ow).step_by(lanes) {
            let first = usize::from(o == 0);
            // Every tap of every lane inside the row (stride 2: inside the odd columns).
            let inside = o > 0 && if stride == 1 { o + lanes < w } else { o + lanes <= odd };
            // SAFETY: every lane read is inside its row (the ranges below), the store inside
            // the output row; the processor has `S` (the caller's).
            unsafe {
                let mut acc = S::splat(bias);
                for (kh, r) in rows.iter().enumerate() {
                    let Some(r) = r else { continue };
                    let p = r.as_ptr();
                    // Away from the row's ends every lane is inside it: plain loads.
                    let (left, centre, right) = match (stride, inside) {
                        (1, true) => (S::load(p.add(o - 1)), S::load(p.add(o)), S::load(p.add(o + 1))),
                        (1, false) => (
                            S::load_range(p.wrapping_add(o).wrapping_sub(1), first, (w + 1 - o).min(lanes)),
                            S::load_range(p.add(o), 0, (w - o).min(lanes)),
                            S::load_range(p.add(o + 1), 0, (w - o - 1).min(lanes)),
                        ),
                        (_, true) => {
                            let q = p.add(even);
                            (S::load(q.add(o - 1)), S::load(p.add(o)), S::load(q.add(o)))
                        }
                        (_, false) => {
                            let q = p.add(even);
                            (
                                S::load_range(
                                    q.wrapping_add(o).wrapping_sub(1),
                                    first,
                                    (odd + 1).saturating_sub(o).min(lanes),
                                ),
                                S::load_range(p.add(o), 0, (even - o).min(lanes)),
                                S::load_range(q.wrapping_add(o), 0, odd.saturating_sub(o).min(lanes)),
                            )
                        }
                    };
                    acc = S::fma(S::splat(k[kh * 3]), left, acc);
                    acc = S::fma(S::splat(k[kh * 3 + 1]), centre, acc);
                    acc = S::fma(S::splat(k[kh * 3 + 2]), right, acc);
                }
                if relu6 {
                    acc = S::relu6(acc);
                }
                S::store_n(row.as_mut_ptr().add(o), acc, (ow - o).min(lanes));
            }
        }
    }
}

/// One output plane from its input plane: at stride 2 through `split`, the plane copied with
/// each row's even columns first, then its odd ones.
///
/// # Safety
/// As [`plane`].
#[inline(always)]
unsafe fn plane_from<S: Isa>(out: &mut [f32], input: &[f32], k: &[f32], bias: f32, g: Geometry, split: &mut Vec<f32>) {
    // SAFETY: the caller's.
    unsafe {
        if g.stride == 1 {
            return plane::<S>(out, input, k, bias, g);
        }
        split.resize(g.h * g.w, 0.0);
        split_columns::<S>(input, g.w, split);
        plane::<S>(out, split, k, bias, g)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn plane_avx2(out: &mut [f32], input: &[f32], k: &[f32], bias: f32, g: Geometry, split: &mut Vec<f32>) {
    // SAFETY: compiled for AVX2 and FMA, called only where the processor has them.
    unsafe { plane_from::<simd::x86::Avx2>(out, input, k, bias, g, split) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn plane_avx512(out: &mut [f32], input: &[f32], k: &[f32], bias: f32, g: Geometry, split: &mut Vec<f32>) {
    // SAFETY: compiled for AVX-512F, called only where the processor has it.
    unsafe { plane_from::<simd::x86::Avx512>(out, input, k, bias, g, split) }
}

thread_local! {
    /// A worker's copy of the input plane it is convolving at stride 2, split into even and odd
    /// columns; reused from plane to plane and call to call. Nothing run while it is borrowed
    /// calls into rayon, so a worker cannot pick up another plane and borrow it again.
    static SPLIT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Each row of `w` values in `x` written to `out` as its even columns, then its odd ones, a
/// vector of each at a time (a scalar copy was 8 % of a cell's time).
///
/// # Safety
/// The processor has `S`.
#[inline(always)]
unsafe fn split_columns<S: Isa>(x: &[f32], w: usize, out: &mut [f32]) {
    let half = w.div_ceil(2);
    let lanes = S::LANES;
    for (o, r) in out.chunks_exact_mut(w).zip(x.chunks_exact(w)) {
        let (even, odd) = o.split_at_mut(half);
        let mut i = 0;
        while 2 * (i + lanes) <= w {
            // SAFETY: `2 · lanes` values from `2i` are inside the row, `lanes` from `i` inside
            // each half (`i + lanes ≤ w / 2`).
            unsafe {
                let (e, d) = S::deinterleave(r.as_ptr().add(2 * i));
                S::store_n(even.as_mut_ptr().add(i), e, lanes);
                S::store_n(odd.as_mut_ptr().add(i), d, lanes);
            }
            i += lanes;
        }
        for (j, &v) in r.iter().enumerate().skip(2 * i) {
            if j % 2 == 0 {
                even[j / 2] = v;
            } else {
                odd[j / 2] = v;
            }
        }
    }
}

/// The whole convolution on contiguous f32 values: `n` images of `c` planes of `h` × `w`, with
/// `build` (one of [`Level::available`]).
fn depthwise(x: &[f32], weight: &[f32], bias: &[f32], n: usize, c: usize, g: Geometry, build: Level) -> Vec<f32> {
    use rayon::prelude::*;
    let Geometry { h, w, stride, .. } = g;
    let plane_len = out_side(h, stride) * out_side(w, stride);
    let mut y = vec![0f32; n * c * plane_len];
    assert!(
        Level::available().contains(&build),
        "{build:?} on a processor without it"
    );
    y.par_chunks_mut(plane_len)
        .enumerate()
        .with_min_len(4)
        .for_each(|(i, out)| {
            let input = &x[i * h * w..][..h * w];
            let (k, b) = (&weight[(i % c) * 9..][..9], bias[i % c]);
            SPLIT.with_borrow_mut(|split| match build {
                // SAFETY: plain Rust runs anywhere.
                Level::Portable => unsafe { plane_from::<simd::Portable>(out, input, k, b, g, split) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the processor has AVX2 and FMA (asserted above).
                Level::Avx2 => unsafe { plane_avx2(out, input, k, b, g, split) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the processor has AVX-512F (asserted above).
                Level::Avx512 => unsafe { plane_avx512(out, input, k, b, g, split) },
            });
        });
    y
}

impl Depthwise for Flex {
    fn depthwise3x3(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: usize,
        relu6: bool,
    ) -> FloatTensor<Self> {
        use burn::backend::ops::FloatTensorOps;
        let (xs, ws) = (x.shape(), weight.shape());
        let f32s = [x.dtype(), weight.dtype(), bias.dtype()]
            .iter()
            .all(|d| *d == DType::F32);
        let fits = xs.num_dims() == 4
            && ws.num_dims() == 4
            && [ws[0], ws[1], ws[2], ws[3]] == [xs[1], 1, 3, 3]
            && (stride == 1 || stride == 2)
            && bias.shape().num_elements() == ws[0]
            && xs[2] > 0
            && xs[3] > 0;
        if !f32s || !fits {
            return burns::<Self>(x, weight, bias, stride, relu6);
        }
        let (n, c, h, w) = (xs[0], xs[1], xs[2], xs[3]);
        let (x, weight, bias) = (x.to_contiguous(), weight.to_contiguous(), bias.to_contiguous());
        let g = Geometry { h, w, stride, relu6 };
        let y = depthwise(values(&x), values(&weight), values(&bias), n, c, g, Level::best());
        Flex::float_from_data(
            TensorData::new(y, [n, c, out_side(h, stride), out_side(w, stride)]),
            &Default::default(),
        )
    }
}

#[cfg(feature = "cube")]
impl Depthwise for burn::backend::Cube {}

impl<B: Backend, C: CheckpointStrategy> Depthwise for Autodiff<B, C> {}

/// A depthwise 3×3 convolution (padding 1, stride 1 or 2, `weight` `[c, 1, 3, 3]`), its bias,
/// and ReLU6 where asked, on any device.
pub fn depthwise3x3(x: Tensor<4>, weight: Tensor<4>, bias: Tensor<1>, stride: usize, relu6: bool) -> Tensor<4> {
    if x.device().is_autodiff() {
        let opts = ConvOptions::new([stride; 2], [1, 1], [1, 1], weight.dims()[0]);
        let y = conv2d(x, weight, Some(bias), opts);
        return if relu6 { y.clamp(0.0, 6.0) } else { y };
    }
    Tensor::from_dispatch(<Dispatch as Depthwise>::depthwise3x3(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        stride,
        relu6,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed) * 7919) % 2001) as f32 / 250.0 - 4.0)
            .collect()
    }

    #[test]
    fn it_is_burns_convolution_at_both_strides_and_odd_sides() {
        let device = Device::flex();
        // (batch, channels, h, w, stride, relu6): the shapes MobileNetV2 uses, odd sides (the
        // last stride-2 column is padding), a single row or column, a single value, long rows.
        let cases = [
            (2, 6, 9, 9, 1, true),
            (2, 6, 16, 16, 2, true),
            (1, 5, 7, 7, 2, true),
            (1, 4, 8, 5, 2, false),
            (1, 3, 1, 6, 1, true),
            (1, 3, 6, 1, 2, true),
            (1, 2, 1, 1, 1, false),
            (3, 8, 14, 14, 1, true),
            // Rows longer than two vectors of every build (16 lanes at most), odd and even.
            (1, 3, 5, 37, 1, true),
            (1, 3, 6, 35, 2, false),
            (1, 2, 3, 34, 2, true),
            // Whole vectors inside the odd columns at stride 2 (16 lanes: 32 odd columns).
            (1, 2, 3, 67, 2, true),
        ];
        for (n, c, h, w, stride, relu6) in cases {
            let x = Tensor::<4>::from_data(TensorData::new(values(n * c * h * w, 1), [n, c, h, w]), &device);
            let k = Tensor::<4>::from_data(TensorData::new(values(c * 9, 2), [c, 1, 3, 3]), &device) / 8.0;
            let b = Tensor::<1>::from_data(TensorData::new(values(c, 3), [c]), &device);
            let opts = ConvOptions::new([stride; 2], [1, 1], [1, 1], c);
            let want = conv2d(x.clone(), k.clone(), Some(b.clone()), opts);
            let want = if relu6 { want.clamp(0.0, 6.0) } else { want };
            let want: Vec<f32> = want.into_data().try_into_vec().unwrap();
            let got = depthwise3x3(x.clone(), k.clone(), b.clone(), stride, relu6);
            let case = format!("{n}×{c} {h}×{w} stride {stride}");
            assert_eq!(got.dims(), [n, c, out_side(h, stride), out_side(w, stride)], "{case}");
            let got: Vec<f32> = got.into_data().try_into_vec().unwrap();
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{case}: value {i}: {a} against {b}"
                );
            }
            // A strided view with an offset (the image rows of a taller tensor, transposed
            // back from a copy stored column by column) gives the same.
            let stored = Tensor::cat(vec![x.clone().swap_dims(2, 3), x.clone().swap_dims(2, 3)], 2);
            let view = stored.narrow(2, w, w).swap_dims(2, 3);
            let t = depthwise3x3(view, k.clone(), b.clone(), stride, relu6);
            assert_eq!(
                t.into_data().try_into_vec::<f32>().unwrap(),
                got,
                "{case}: a view of the input"
            );
            // Every build of the kernel this processor runs.
            let (xv, kv, bv): (Vec<f32>, Vec<f32>, Vec<f32>) = (
                x.into_data().try_into_vec().unwrap(),
                k.into_data().try_into_vec().unwrap(),
                b.into_data().try_into_vec().unwrap(),
            );
            let g = Geometry { h, w, stride, relu6 };
            for &build in Level::available() {
                let y = depthwise(&xv, &kv, &bv, n, c, g, build);
                for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{case}, {build:?}: value {i}: {a} against {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn other_shapes_and_autodiff_take_burns_path() {
        // Not depthwise (two input channels per group): burn's convolution.
        let device = Device::flex();
        let x = Tensor::<4>::from_data(TensorData::new(values(4 * 25, 4), [1, 4, 5, 5]), &device);
        let k = Tensor::<4>::from_data(TensorData::new(values(2 * 2 * 9, 5), [2, 2, 3, 3]), &device);
        let b = Tensor::<1>::from_data(TensorData::new(values(2, 6), [2]), &device);
        let want = conv2d(
            x.clone(),
            k.clone(),
            Some(b.clone()),
            ConvOptions::new([1, 1], [1, 1], [1, 1], 2),
        );
        let got = depthwise3x3(x, k, b, 1, false);
        assert_eq!(got.into_data(), want.into_data());
        // Autodiff: burn's operations, with their gradients.
        let device = Device::flex().autodiff();
        let x = Tensor::<4>::from_data(TensorData::new(values(2 * 3 * 25, 7), [2, 3, 5, 5]), &device).require_grad();
        let k = Tensor::<4>::from_data(TensorData::new(values(3 * 9, 8), [3, 1, 3, 3]), &device) / 8.0;
        let b = Tensor::<1>::from_data(TensorData::new(values(3, 9), [3]), &device);
        let y = depthwise3x3(x.clone(), k, b, 1, true);
        assert!(x.grad(&y.sum().backward()).is_some());
    }
}
