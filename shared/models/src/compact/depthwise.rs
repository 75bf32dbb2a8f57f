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

/// One output row's accumulation. `FMA`: fused multiply-adds, where the processor has them
/// (the AVX2/FMA build of the kernel on x86-64, always on aarch64); on a baseline x86-64 build
/// `mul_add` would be a library call per value.
#[inline(always)]
fn madd<const FMA: bool>(w: f32, x: f32, acc: f32) -> f32 {
    if FMA { w.mul_add(x, acc) } else { w * x + acc }
}

/// `out[o] += w0·r[o−1] + w1·r[o] + w2·r[o+1]` (stride 1; `r` as long as `out`, zero beyond).
#[inline(always)]
fn taps_stride1<const FMA: bool>(out: &mut [f32], r: &[f32], w: [f32; 3]) {
    let n = out.len();
    if n == 1 {
        out[0] = madd::<FMA>(w[1], r[0], out[0]);
        return;
    }
    out[0] = madd::<FMA>(w[2], r[1], madd::<FMA>(w[1], r[0], out[0]));
    for (((o, &a), &b), &c) in out[1..n - 1].iter_mut().zip(&r[..n - 2]).zip(&r[1..n - 1]).zip(&r[2..]) {
        *o = madd::<FMA>(w[2], c, madd::<FMA>(w[1], b, madd::<FMA>(w[0], a, *o)));
    }
    out[n - 1] = madd::<FMA>(w[1], r[n - 1], madd::<FMA>(w[0], r[n - 2], out[n - 1]));
}

/// Stride 2: input column `2o + k − 1` for tap `k`, from the row split into its even and odd
/// columns (`even.len() == out.len()`, `odd.len()` that or one less).
#[inline(always)]
fn taps_stride2<const FMA: bool>(out: &mut [f32], even: &[f32], odd: &[f32], w: [f32; 3]) {
    let n = out.len();
    // o = 0: column −1 is padding.
    out[0] = madd::<FMA>(w[1], even[0], out[0]);
    if let Some(&o0) = odd.first() {
        out[0] = madd::<FMA>(w[2], o0, out[0]);
    }
    // 1 ≤ o < odd.len(): all three taps.
    let full = odd.len().min(n);
    if full > 1 {
        let rows = out[1..full]
            .iter_mut()
            .zip(&odd[..full - 1])
            .zip(&even[1..full])
            .zip(&odd[1..full]);
        for (((o, &a), &b), &c) in rows {
            *o = madd::<FMA>(w[2], c, madd::<FMA>(w[1], b, madd::<FMA>(w[0], a, *o)));
        }
    }
    // An odd input width: the last output's right tap is padding.
    if odd.len() < n && n > 1 {
        out[n - 1] = madd::<FMA>(w[1], even[n - 1], madd::<FMA>(w[0], odd[n - 2], out[n - 1]));
    }
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
/// columns, then its odd ones) and its nine weights.
#[inline(always)]
fn plane<const FMA: bool>(out: &mut [f32], input: &[f32], k: &[f32], bias: f32, g: Geometry) {
    let Geometry { h, w, stride, relu6 } = g;
    let ow = out_side(w, stride);
    for (oh, row) in out.chunks_exact_mut(ow).enumerate() {
        row.fill(bias);
        for kh in 0..3 {
            let Some(ih) = (oh * stride + kh).checked_sub(1).filter(|&ih| ih < h) else {
                continue;
            };
            let r = &input[ih * w..][..w];
            let taps = [k[kh * 3], k[kh * 3 + 1], k[kh * 3 + 2]];
            if stride == 1 {
                taps_stride1::<FMA>(row, r, taps);
            } else {
                let (even, odd) = r.split_at(w.div_ceil(2));
                taps_stride2::<FMA>(row, even, odd, taps);
            }
        }
        if relu6 {
            for v in row.iter_mut() {
                *v = v.clamp(0.0, 6.0);
            }
        }
    }
}

/// One output plane from its input plane: at stride 2 through `split`, the plane copied with
/// each row's even columns first, then its odd ones.
#[inline(always)]
fn plane_from<const FMA: bool>(
    out: &mut [f32],
    input: &[f32],
    k: &[f32],
    bias: f32,
    g: Geometry,
    split: &mut Vec<f32>,
) {
    if g.stride == 1 {
        return plane::<FMA>(out, input, k, bias, g);
    }
    split.resize(g.h * g.w, 0.0);
    split_columns(input, g.w, split);
    plane::<FMA>(out, split, k, bias, g)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn plane_avx2(out: &mut [f32], input: &[f32], k: &[f32], bias: f32, g: Geometry, split: &mut Vec<f32>) {
    plane_from::<true>(out, input, k, bias, g, split)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
fn plane_avx512(out: &mut [f32], input: &[f32], k: &[f32], bias: f32, g: Geometry, split: &mut Vec<f32>) {
    plane_from::<true>(out, input, k, bias, g, split)
}

/// Whether the portable build of the kernel has fused multiply-adds in hardware.
const NATIVE_FMA: bool = cfg!(target_arch = "aarch64");

thread_local! {
    /// A worker's copy of the input plane it is convolving at stride 2, split into even and odd
    /// columns; reused from plane to plane and call to call. Nothing run while it is borrowed
    /// calls into rayon, so a worker cannot pick up another plane and borrow it again.
    static SPLIT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Each row of `w` values in `x` written to `out` as its even columns, then its odd ones. One
/// loop over the pairs, which the compiler turns into vector shuffles (two loops, one per
/// parity, it did not: 8 % of a cell's time went to this copy).
#[inline(always)]
fn split_columns(x: &[f32], w: usize, out: &mut [f32]) {
    let half = w.div_ceil(2);
    for (o, r) in out.chunks_exact_mut(w).zip(x.chunks_exact(w)) {
        let (even, odd) = o.split_at_mut(half);
        for ((e, d), pair) in even.iter_mut().zip(odd.iter_mut()).zip(r.chunks_exact(2)) {
            *e = pair[0];
            *d = pair[1];
        }
        if w % 2 == 1 {
            even[half - 1] = r[w - 1];
        }
    }
}

/// The builds of the kernel: which vector instructions it is compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Build {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Build {
    /// Every build this processor runs, the fastest last.
    fn available() -> Vec<Build> {
        let mut all = vec![Build::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") {
                all.push(Build::Avx2);
                if has!("avx512f") && has!("avx512vl") {
                    all.push(Build::Avx512);
                }
            }
        }
        all
    }

    /// The fastest build this processor runs.
    fn best() -> Build {
        static BEST: std::sync::OnceLock<Build> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| *Build::available().last().expect("the portable build"))
    }
}

/// The whole convolution on contiguous f32 values: `n` images of `c` planes of `h` × `w`, with
/// `build` (one of [`Build::available`]).
fn depthwise(x: &[f32], weight: &[f32], bias: &[f32], n: usize, c: usize, g: Geometry, build: Build) -> Vec<f32> {
    use rayon::prelude::*;
    let Geometry { h, w, stride, .. } = g;
    let plane_len = out_side(h, stride) * out_side(w, stride);
    let mut y = vec![0f32; n * c * plane_len];
    assert!(
        Build::available().contains(&build),
        "{build:?} on a processor without it"
    );
    y.par_chunks_mut(plane_len)
        .enumerate()
        .with_min_len(4)
        .for_each(|(i, out)| {
            let input = &x[i * h * w..][..h * w];
            let (k, b) = (&weight[(i % c) * 9..][..9], bias[i % c]);
            SPLIT.with_borrow_mut(|split| match build {
                Build::Portable => plane_from::<NATIVE_FMA>(out, input, k, b, g, split),
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the processor has AVX2 and FMA (asserted above).
                Build::Avx2 => unsafe { plane_avx2(out, input, k, b, g, split) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the processor has AVX-512F/VL, AVX2 and FMA (asserted above).
                Build::Avx512 => unsafe { plane_avx512(out, input, k, b, g, split) },
            });
        });
    y
}

/// The values of a contiguous f32 tensor.
fn values(t: &FloatTensor<Flex>) -> &[f32] {
    let l = t.layout();
    &t.storage::<f32>()[l.start_offset()..][..l.num_elements()]
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
        let y = depthwise(values(&x), values(&weight), values(&bias), n, c, g, Build::best());
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
        // last stride-2 column is padding), a single row or column, a single value.
        let cases = [
            (2, 6, 9, 9, 1, true),
            (2, 6, 16, 16, 2, true),
            (1, 5, 7, 7, 2, true),
            (1, 4, 8, 5, 2, false),
            (1, 3, 1, 6, 1, true),
            (1, 3, 6, 1, 2, true),
            (1, 2, 1, 1, 1, false),
            (3, 8, 14, 14, 1, true),
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
            for build in Build::available() {
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
