//! MobileNetV2's dense convolutions (the 34 pointwise 1×1 ones and the 3×3 stem) with their
//! bias, the block's residual sum and ReLU6 in one pass over the output.
//!
//! On the CPU backend (flex 0.22) a pointwise convolution is a matrix product into a zeroed
//! output, then a pass adding the bias; the model added the residual in another pass and
//! clamped (ReLU6) in a third, each a fresh tensor. A profile of one cell (`perf record` on
//! `peers compact`, 2026-12-07) put 33 % of the samples in the product, 6 % in zeroing memory
//! and 12 % in the element-wise passes. [`DenseConv`] instead computes each tile of 8 output
//! channels × 48 pixels (AVX-512; 4 × 24 with AVX2/FMA, 4 × 16 portable) in registers from a
//! packed panel of the input, starting from the bias and adding the residual and the clamp
//! before the one store. The stem's panel is gathered from the image (3×3 taps at stride 2,
//! zero padding) so it needs no im2col buffer. Tasks are pixel blocks × chunks of output
//! channels, in parallel.
//!
//! Other backends (and autodiff, which needs the gradients) keep burn's `conv2d`, add and
//! `clamp`; so does any shape this kernel does not cover (output channels not a multiple of
//! the tile's rows, grouped convolutions, other dtypes).

use super::simd::{Isa, Level, Portable, values};
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Tensor, TensorData};
use std::cell::RefCell;

/// A dense convolution (1×1, or 3×3 with padding 1) with its bias, an optional residual sum,
/// and ReLU6 where asked.
#[backend_extension(Flex, Autodiff, Cube: cfg(feature = "cube"))]
pub trait DenseConv: Backend {
    /// `x` `[n, c_in, h, w]`, `weight` `[c_out, c_in, k, k]` (k 1 or 3), `bias` `[c_out]`.
    fn dense_conv(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: usize,
        relu6: bool,
    ) -> FloatTensor<Self> {
        burns::<Self>(x, weight, bias, None, stride, relu6)
    }

    /// As [`DenseConv::dense_conv`], with `residual` (the output's shape) added before ReLU6.
    fn dense_conv_add(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        stride: usize,
        relu6: bool,
    ) -> FloatTensor<Self> {
        burns::<Self>(x, weight, bias, Some(residual), stride, relu6)
    }
}

/// burn's own operations: the convolution, the sum, the clamp.
fn burns<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: FloatTensor<B>,
    residual: Option<FloatTensor<B>>,
    stride: usize,
    relu6: bool,
) -> FloatTensor<B> {
    let pad = weight.shape().get(2).copied().unwrap_or(1) / 2;
    let opts = ConvOptions::new([stride; 2], [pad; 2], [1, 1], 1);
    let mut y = B::conv2d(x, weight, Some(bias), opts);
    if let Some(r) = residual {
        y = B::float_add(y, r);
    }
    if relu6 {
        y = B::float_clamp(y, 0.0.into(), 6.0.into());
    }
    y
}

/// The shape of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    n: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    /// 1 or 3.
    kernel: usize,
    stride: usize,
}

impl Shape {
    fn out_h(&self) -> usize {
        out_side(self.h, self.kernel, self.stride)
    }
    fn out_w(&self) -> usize {
        out_side(self.w, self.kernel, self.stride)
    }
    /// Values a pixel's panel column holds: one per input channel and tap.
    fn depth(&self) -> usize {
        self.c_in * self.kernel * self.kernel
    }
}

/// Output side with padding `kernel / 2`.
fn out_side(input: usize, kernel: usize, stride: usize) -> usize {
    (input + 2 * (kernel / 2) - kernel) / stride + 1
}

/// Where one tile's output goes.
#[derive(Clone, Copy)]
struct Out {
    /// The tile's first value: output channel `o`, pixel `p`.
    y: *mut f32,
    /// The residual at the same place (null: none).
    residual: *const f32,
    /// Distance between two output channels' planes.
    plane: usize,
    /// Valid pixels in the tile.
    n: usize,
    relu6: bool,
}

/// `R` (= `S::ROWS`) output channels × `NV` vectors of pixels: the bias, the products over the panel's
/// `depth` rows (each `NV · S::LANES` wide), the residual, the clamp, one store.
///
/// # Safety
/// `panel` holds `depth × NV · LANES` values, `w` `ROWS` rows of `depth`, `bias` `ROWS` values,
/// and `out` `ROWS` planes of at least `n` values from its pointers; the processor has `S`.
#[inline(always)]
unsafe fn tile<S: Isa, const R: usize, const NV: usize>(
    panel: *const f32,
    w: *const f32,
    depth: usize,
    bias: *const f32,
    out: Out,
) {
    // SAFETY: the bounds are the caller's (above).
    unsafe {
        let width = NV * S::LANES;
        let mut acc = [[S::splat(0.0); NV]; R];
        for (r, a) in acc.iter_mut().enumerate() {
            *a = [S::splat(*bias.add(r)); NV];
        }
        for k in 0..depth {
            let mut x = [S::splat(0.0); NV];
            for (v, x) in x.iter_mut().enumerate() {
                *x = S::load(panel.add(k * width + v * S::LANES));
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let wv = S::splat(*w.add(r * depth + k));
                for v in 0..NV {
                    a[v] = S::fma(wv, x[v], a[v]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (v, &a) in a.iter().enumerate() {
                let m = out.n.saturating_sub(v * S::LANES).min(S::LANES);
                if m == 0 {
                    continue;
                }
                let at = r * out.plane + v * S::LANES;
                let mut a = a;
                if !out.residual.is_null() {
                    a = S::add(a, S::load_range(out.residual.add(at), 0, m));
                }
                if out.relu6 {
                    a = S::relu6(a);
                }
                S::store_n(out.y.add(at), a, m);
            }
        }
    }
}

/// One convolution's inputs and output, shared by its tasks.
struct Job<'a> {
    x: &'a [f32],
    w: &'a [f32],
    bias: &'a [f32],
    residual: Option<&'a [f32]>,
    y: SendPtr,
    shape: Shape,
    relu6: bool,
    /// Output channels per task (a multiple of the tile's rows).
    chunk: usize,
}

/// The output's pointer, written by many tasks at disjoint places.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the tasks write disjoint tiles of the output, which outlives them.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

/// Copies pixels `p0..p0 + n` of every input channel of image `i` into `panel`, one row of
/// `width` per panel row (zeros past `n`): a pointwise convolution's panel.
fn pack_1x1(job: &Job, i: usize, p0: usize, n: usize, width: usize, panel: &mut [f32]) {
    let hw = job.shape.h * job.shape.w;
    let x = &job.x[i * job.shape.c_in * hw..][..job.shape.c_in * hw];
    for (row, plane) in panel.chunks_exact_mut(width).zip(x.chunks_exact(hw)) {
        row[..n].copy_from_slice(&plane[p0..p0 + n]);
        row[n..].fill(0.0);
    }
}

/// The 3×3 taps (padding 1) of output pixels `p0..p0 + n` of image `i`, one panel row per
/// input channel and tap in the weight's order: a dense 3×3 convolution's panel.
fn pack_3x3(job: &Job, i: usize, p0: usize, n: usize, width: usize, panel: &mut [f32]) {
    let Shape { c_in, h, w, stride, .. } = job.shape;
    let ow = job.shape.out_w();
    let x = &job.x[i * c_in * h * w..][..c_in * h * w];
    // Each pixel's top-left tap, in padded coordinates (row + 1, column + 1), computed once.
    let mut corner = [(0usize, 0usize); 64];
    for (j, c) in corner.iter_mut().enumerate().take(n) {
        *c = ((p0 + j) / ow * stride, (p0 + j) % ow * stride);
    }
    for (c, plane) in x.chunks_exact(h * w).enumerate() {
        for tap in 0..9 {
            let (kh, kw) = (tap / 3, tap % 3);
            let row = &mut panel[(c * 9 + tap) * width..][..width];
            for (v, &(y, x)) in row.iter_mut().zip(&corner[..n]) {
                let (iy, ix) = (y + kh, x + kw);
                *v = if iy >= 1 && ix >= 1 && iy <= h && ix <= w {
                    plane[(iy - 1) * w + ix - 1]
                } else {
                    0.0
                };
            }
            row[n..].fill(0.0);
        }
    }
}

/// Task `t`: a block of output pixels of one image, for one chunk of output channels.
///
/// # Safety
/// The processor has `S`; `R == S::ROWS` divides the job's output channels; `job.y` has room
/// for the whole output.
#[inline(always)]
unsafe fn task<S: Isa, const R: usize>(job: &Job, t: usize, panel: &mut Vec<f32>) {
    let shape = job.shape;
    let hw = shape.out_h() * shape.out_w();
    let block = S::VECTORS * S::LANES;
    let blocks = hw.div_ceil(block);
    let chunks = shape.c_out.div_ceil(job.chunk);
    let (i, rest) = (t / (blocks * chunks), t % (blocks * chunks));
    let (b, c) = (rest / chunks, rest % chunks);
    let p0 = b * block;
    debug_assert!(block <= 64, "pack_3x3 keeps 64 pixels' corners");
    let n = (hw - p0).min(block);
    let nv = n.div_ceil(S::LANES);
    let width = nv * S::LANES;
    let depth = shape.depth();
    panel.resize(depth * width, 0.0);
    let panel = &mut panel[..depth * width];
    if shape.kernel == 1 {
        pack_1x1(job, i, p0, n, width, panel);
    } else {
        pack_3x3(job, i, p0, n, width, panel);
    }
    let first = i * shape.c_out * hw + p0;
    for o in (c * job.chunk..((c + 1) * job.chunk).min(shape.c_out)).step_by(R) {
        let at = first + o * hw;
        let out = Out {
            // SAFETY: inside the output (the caller's room), as is the residual's place.
            y: unsafe { job.y.0.add(at) },
            residual: job.residual.map_or(std::ptr::null(), |r| r[at..].as_ptr()),
            plane: hw,
            n,
            relu6: job.relu6,
        };
        let (w, bias) = (job.w[o * depth..].as_ptr(), job.bias[o..].as_ptr());
        // SAFETY: the panel holds `depth × width`, the weight `R` rows from `o`, the bias `R`
        // values (R divides c_out), the output and residual `R` planes from `at`.
        unsafe {
            match nv {
                1 => tile::<S, R, 1>(panel.as_ptr(), w, depth, bias, out),
                2 => tile::<S, R, 2>(panel.as_ptr(), w, depth, bias, out),
                _ => tile::<S, R, 3>(panel.as_ptr(), w, depth, bias, out),
            }
        }
    }
}

/// Tile sizes at each level.
impl Level {
    /// Output channels per tile.
    fn rows(self) -> usize {
        match self {
            Level::Portable => Portable::ROWS,
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => super::simd::x86::Avx2::ROWS,
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => super::simd::x86::Avx512::ROWS,
        }
    }

    /// Pixels per task's block.
    fn block(self) -> usize {
        match self {
            Level::Portable => Portable::VECTORS * Portable::LANES,
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => super::simd::x86::Avx2::VECTORS * super::simd::x86::Avx2::LANES,
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => super::simd::x86::Avx512::VECTORS * super::simd::x86::Avx512::LANES,
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn task_avx512(job: &Job, t: usize, panel: &mut Vec<f32>) {
    // SAFETY: compiled for AVX-512F, run only where `Level::available` found it; the job's
    // channels are a multiple of the rows (checked by `compute`).
    unsafe { task::<super::simd::x86::Avx512, 8>(job, t, panel) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn task_avx2(job: &Job, t: usize, panel: &mut Vec<f32>) {
    // SAFETY: as above, for AVX2 and FMA.
    unsafe { task::<super::simd::x86::Avx2, 4>(job, t, panel) }
}

thread_local! {
    /// A worker's panel, reused from task to task and call to call. Nothing run while it is
    /// borrowed calls into rayon, so a worker cannot pick up another task and borrow it again.
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The convolution on contiguous values: `x` `[n, c_in, h, w]`, `w` `[c_out, depth]`, the
/// residual (if any) as the output. `None` where `kernel` cannot take the shape.
fn compute(
    kernel: Level,
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    residual: Option<&[f32]>,
    shape: Shape,
    relu6: bool,
) -> Option<Vec<f32>> {
    use rayon::prelude::*;
    let rows = kernel.rows();
    let hw = if shape.h > 0 && shape.w > 0 {
        shape.out_h() * shape.out_w()
    } else {
        0
    };
    let len = shape.n * shape.c_out * hw;
    let fits = shape.c_out.is_multiple_of(rows)
        && shape.c_out > 0
        && hw > 0
        && (shape.kernel == 3 || (shape.kernel == 1 && shape.stride == 1))
        && shape.h > 0
        && shape.w > 0
        && x.len() == shape.n * shape.c_in * shape.h * shape.w
        && w.len() == shape.c_out * shape.depth()
        && bias.len() == shape.c_out
        && residual.is_none_or(|r| r.len() == len);
    if !fits {
        return None;
    }
    // Enough tasks for every thread to have several.
    let blocks = shape.n * hw.div_ceil(kernel.block());
    let split = (4 * rayon::current_num_threads()).div_ceil(blocks).max(1);
    let chunk = shape.c_out.div_ceil(split).div_ceil(rows) * rows;
    let tasks = blocks * shape.c_out.div_ceil(chunk);
    let mut y: Vec<f32> = Vec::with_capacity(len);
    let job = Job {
        x,
        w,
        bias,
        residual,
        y: SendPtr(y.as_mut_ptr()),
        shape,
        relu6,
        chunk,
    };
    (0..tasks).into_par_iter().for_each(|t| {
        PANEL.with_borrow_mut(|panel| match kernel {
            // SAFETY: the portable kernel runs anywhere; rows divide c_out (checked above).
            Level::Portable => unsafe { task::<Portable, 4>(&job, t, panel) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: chosen only where the processor has it.
            Level::Avx2 => unsafe { task_avx2(&job, t, panel) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Level::Avx512 => unsafe { task_avx512(&job, t, panel) },
        })
    });
    // SAFETY: the tasks cover every (image, pixel block, channel chunk) once, and each tile
    // stores every valid pixel of each of its channels: all `len` values are written.
    unsafe { y.set_len(len) };
    Some(y)
}

/// The flex path: the kernel where it fits, burn's operations elsewhere.
fn flex_dense(
    x: FloatTensor<Flex>,
    weight: FloatTensor<Flex>,
    bias: FloatTensor<Flex>,
    residual: Option<FloatTensor<Flex>>,
    stride: usize,
    relu6: bool,
) -> FloatTensor<Flex> {
    use burn::backend::ops::FloatTensorOps;
    let (xs, ws) = (x.shape(), weight.shape());
    let f32s = [
        Some(x.dtype()),
        Some(weight.dtype()),
        Some(bias.dtype()),
        residual.as_ref().map(|r| r.dtype()),
    ]
    .into_iter()
    .flatten()
    .all(|d| d == DType::F32);
    let shape = (xs.num_dims() == 4 && ws.num_dims() == 4).then(|| Shape {
        n: xs[0],
        c_in: xs[1],
        h: xs[2],
        w: xs[3],
        c_out: ws[0],
        kernel: ws[2],
        stride,
    });
    let Some(shape) = shape.filter(|s| {
        f32s && ws[1] == s.c_in
            && ws[2] == ws[3]
            && (stride == 1 || stride == 2)
            && s.h > 0
            && s.w > 0
            && (s.kernel == 3 || stride == 1)
            && residual
                .as_ref()
                .is_none_or(|r| r.shape().dims::<4>() == [s.n, s.c_out, s.out_h(), s.out_w()])
    }) else {
        return burns::<Flex>(x, weight, bias, residual, stride, relu6);
    };
    let (x, weight, bias) = (x.to_contiguous(), weight.to_contiguous(), bias.to_contiguous());
    let residual = residual.map(|r| r.to_contiguous());
    let y = compute(
        Level::best(),
        values(&x),
        values(&weight),
        values(&bias),
        residual.as_ref().map(values),
        shape,
        relu6,
    );
    match y {
        Some(y) => Flex::float_from_data(
            TensorData::new(y, [shape.n, shape.c_out, shape.out_h(), shape.out_w()]),
            &Default::default(),
        ),
        None => burns::<Flex>(x, weight, bias, residual, stride, relu6),
    }
}

impl DenseConv for Flex {
    fn dense_conv(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: usize,
        relu6: bool,
    ) -> FloatTensor<Self> {
        flex_dense(x, weight, bias, None, stride, relu6)
    }

    fn dense_conv_add(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        stride: usize,
        relu6: bool,
    ) -> FloatTensor<Self> {
        flex_dense(x, weight, bias, Some(residual), stride, relu6)
    }
}

#[cfg(feature = "cube")]
impl DenseConv for burn::backend::Cube {}

impl<B: Backend, C: CheckpointStrategy> DenseConv for Autodiff<B, C> {}

/// A dense convolution (`weight` `[c_out, c_in, k, k]`, k 1 or 3, padding `k / 2`, groups 1),
/// its bias, `residual` added where given, then ReLU6 where asked, on any device.
pub fn dense_conv(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Tensor<1>,
    residual: Option<Tensor<4>>,
    stride: usize,
    relu6: bool,
) -> Tensor<4> {
    if x.device().is_autodiff() {
        let pad = weight.dims()[2] / 2;
        let y = conv2d(
            x,
            weight,
            Some(bias),
            ConvOptions::new([stride; 2], [pad; 2], [1, 1], 1),
        );
        let y = match residual {
            Some(r) => y + r,
            None => y,
        };
        return if relu6 { y.clamp(0.0, 6.0) } else { y };
    }
    let (x, weight, bias) = (x.into_dispatch(), weight.into_dispatch(), bias.into_dispatch());
    Tensor::from_dispatch(match residual {
        Some(r) => <Dispatch as DenseConv>::dense_conv_add(x, weight, bias, r.into_dispatch(), stride, relu6),
        None => <Dispatch as DenseConv>::dense_conv(x, weight, bias, stride, relu6),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    /// The convolution one value at a time.
    fn naive(x: &[f32], w: &[f32], bias: &[f32], residual: Option<&[f32]>, s: Shape, relu6: bool) -> Vec<f32> {
        let (oh, ow) = (s.out_h(), s.out_w());
        let mut y = vec![0f32; s.n * s.c_out * oh * ow];
        let pad = s.kernel / 2;
        for i in 0..s.n {
            for o in 0..s.c_out {
                for py in 0..oh {
                    for px in 0..ow {
                        let mut acc = f64::from(bias[o]);
                        for c in 0..s.c_in {
                            for kh in 0..s.kernel {
                                for kw in 0..s.kernel {
                                    let (iy, ix) = (py * s.stride + kh, px * s.stride + kw);
                                    if iy < pad || ix < pad || iy - pad >= s.h || ix - pad >= s.w {
                                        continue;
                                    }
                                    let xv = x[((i * s.c_in + c) * s.h + iy - pad) * s.w + ix - pad];
                                    let wv = w[((o * s.c_in + c) * s.kernel + kh) * s.kernel + kw];
                                    acc += f64::from(xv) * f64::from(wv);
                                }
                            }
                        }
                        let at = ((i * s.c_out + o) * oh + py) * ow + px;
                        let mut v = acc as f32 + residual.map_or(0.0, |r| r[at]);
                        if relu6 {
                            v = v.clamp(0.0, 6.0);
                        }
                        y[at] = v;
                    }
                }
            }
        }
        y
    }

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 / 250.0) - 2.0)
            .collect()
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        for (j, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                "{what}: value {j}: {x} against {y}"
            );
        }
    }

    #[test]
    fn every_kernel_matches_the_convolution_value_by_value() {
        // Pixel counts around the blocks' edges (16, 24, 48 pixels), one pixel, tall and wide
        // planes, several images; the stem's 3×3 at both strides.
        let shapes = [
            (1, 16, 7, 7, 24, 1, 1),
            (2, 5, 4, 4, 8, 1, 1),
            (1, 3, 1, 1, 16, 1, 1),
            (3, 8, 5, 10, 32, 1, 1),
            (1, 24, 7, 8, 8, 1, 1),
            (1, 7, 13, 1, 16, 1, 1),
            (1, 3, 17, 15, 32, 3, 2),
            (2, 3, 9, 9, 8, 3, 1),
            (1, 4, 1, 2, 8, 3, 2),
        ];
        for &kernel in Level::available() {
            for (n, c_in, h, w, c_out, k, stride) in shapes {
                let s = Shape {
                    n,
                    c_in,
                    h,
                    w,
                    c_out,
                    kernel: k,
                    stride,
                };
                let x = values(n * c_in * h * w, 1);
                let wt = values(c_out * s.depth(), 2);
                let b = values(c_out, 3);
                let r = values(n * c_out * s.out_h() * s.out_w(), 4);
                for (residual, relu6) in [(None, false), (None, true), (Some(&r[..]), false), (Some(&r[..]), true)] {
                    let got = compute(kernel, &x, &wt, &b, residual, s, relu6).expect("a shape the kernel takes");
                    close(
                        &got,
                        &naive(&x, &wt, &b, residual, s, relu6),
                        &format!("{kernel:?} {s:?} relu6 {relu6}"),
                    );
                }
            }
        }
    }

    #[test]
    fn shapes_a_kernel_cannot_take_are_refused() {
        let s = Shape {
            n: 1,
            c_in: 2,
            h: 3,
            w: 3,
            c_out: 6,
            kernel: 1,
            stride: 1,
        };
        let (x, w, b) = (values(18, 1), values(12, 2), values(6, 3));
        for &kernel in Level::available() {
            // 6 output channels is not a multiple of any kernel's rows.
            assert!(compute(kernel, &x, &w, &b, None, s, false).is_none());
            // A strided pointwise convolution, a residual of the wrong size.
            let s8 = Shape { c_out: 8, ..s };
            let (w8, b8) = (values(16, 2), values(8, 3));
            assert!(compute(kernel, &x, &w8, &b8, None, Shape { stride: 2, ..s8 }, false).is_none());
            assert!(compute(kernel, &x, &w8, &b8, Some(&[0.0; 5]), s8, false).is_none());
        }
    }

    #[test]
    fn the_tensor_path_matches_burns_convolution_sum_and_clamp() {
        let device = Device::flex();
        let t4 = |v: Vec<f32>, d: [usize; 4]| Tensor::<4>::from_data(TensorData::new(v, d), &device);
        let reference = |x: Tensor<4>, w: Tensor<4>, b: Tensor<1>, r: Option<Tensor<4>>, stride, relu6| {
            let pad = w.dims()[2] / 2;
            let y = conv2d(x, w, Some(b), ConvOptions::new([stride; 2], [pad; 2], [1, 1], 1));
            let y = r.map_or(y.clone(), |r| y + r);
            if relu6 { y.clamp(0.0, 6.0) } else { y }
        };
        // A pointwise unit with a residual, its input a transposed view; the stem; an odd
        // channel count (burn's path).
        let x = t4(values(2 * 16 * 9 * 11, 1), [2, 16, 11, 9]).swap_dims(2, 3);
        let w = t4(values(24 * 16, 2), [24, 16, 1, 1]);
        let b = Tensor::<1>::from_data(TensorData::new(values(24, 3), [24]), &device);
        let r = t4(values(2 * 24 * 9 * 11, 4), [2, 24, 9, 11]);
        let got = dense_conv(x.clone(), w.clone(), b.clone(), Some(r.clone()), 1, true);
        let want = reference(x, w, b, Some(r), 1, true);
        close(
            &got.into_data().try_to_vec::<f32>().unwrap(),
            &want.into_data().try_to_vec::<f32>().unwrap(),
            "pointwise",
        );

        let x = t4(values(3 * 20 * 18, 5), [1, 3, 20, 18]);
        let w = t4(values(32 * 27, 6), [32, 3, 3, 3]);
        let b = Tensor::<1>::from_data(TensorData::new(values(32, 7), [32]), &device);
        let got = dense_conv(x.clone(), w.clone(), b.clone(), None, 2, true);
        let want = reference(x, w, b, None, 2, true);
        close(
            &got.into_data().try_to_vec::<f32>().unwrap(),
            &want.into_data().try_to_vec::<f32>().unwrap(),
            "stem",
        );

        let x = t4(values(4 * 25, 8), [1, 4, 5, 5]);
        let w = t4(values(6 * 4, 9), [6, 4, 1, 1]);
        let b = Tensor::<1>::from_data(TensorData::new(values(6, 10), [6]), &device);
        let got = dense_conv(x.clone(), w.clone(), b.clone(), None, 1, false);
        let want = reference(x, w, b, None, 1, false);
        close(
            &got.into_data().try_to_vec::<f32>().unwrap(),
            &want.into_data().try_to_vec::<f32>().unwrap(),
            "fallback",
        );
    }
}
