//! `min(max(x, 0), 6)`, MobileNetV2's activation, as one backend operation.
//!
//! burn's `clamp` on the CPU backend (flex 0.22) walks the tensor on one thread, element by
//! element through a closure that checks its bounds for NaN at every value; in the compact
//! model's forward pass at one cell it took 18 % of the time (perf, `appliance/benches/peers.rs
//! compact`). [`Relu6`] does the same clamp in place, in parallel blocks whose loop the compiler
//! vectorises; other backends (and autodiff, which needs the clamp's gradient) keep burn's
//! `clamp`.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::{DType, Tensor};

/// The ReLU6 activation.
#[backend_extension(Flex, Autodiff, Cube: cfg(feature = "cube"))]
pub trait Relu6: Backend {
    /// `min(max(x, 0), 6)`, NaN kept.
    fn relu6(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_clamp(x, 0.0.into(), 6.0.into())
    }
}

/// Values per parallel block: large enough that a block's work outweighs handing it out.
const BLOCK: usize = 1 << 14;

impl Relu6 for Flex {
    fn relu6(mut x: FloatTensor<Self>) -> FloatTensor<Self> {
        use rayon::prelude::*;
        let n = x.layout().num_elements();
        let in_place = x.dtype() == DType::F32 && x.is_contiguous() && x.layout().start_offset() == 0;
        match in_place.then(|| x.try_storage_mut::<f32>()).flatten() {
            Some(values) => {
                values[..n].par_chunks_mut(BLOCK).for_each(|c| {
                    for v in c {
                        // Constant bounds: no NaN check per value, and NaN stays NaN.
                        *v = v.clamp(0.0, 6.0);
                    }
                });
                x
            }
            // Shared storage, a view, or another float type: burn's clamp.
            None => <Self as burn::backend::ops::FloatTensorOps<Self>>::float_clamp(x, 0.0.into(), 6.0.into()),
        }
    }
}

#[cfg(feature = "cube")]
impl Relu6 for burn::backend::Cube {}

impl<B: Backend, C: CheckpointStrategy> Relu6 for Autodiff<B, C> {}

/// `min(max(x, 0), 6)` of a tensor on any device.
pub fn relu6<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if x.device().is_autodiff() {
        return x.clamp(0.0, 6.0);
    }
    Tensor::from_dispatch(<Dispatch as Relu6>::relu6(x.into_dispatch()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn values(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919) % 2001) as f32 / 100.0 - 10.0).collect()
    }

    #[test]
    fn it_is_burns_clamp_on_every_device_and_layout() {
        let n = 17 * 3000; // over three parallel blocks
        assert!(n > 3 * BLOCK);
        for device in [Device::flex(), Device::flex().autodiff()] {
            let x = Tensor::<2>::from_data(TensorData::new(values(n), [n / 17, 17]), &device);
            let want = x.clone().clamp(0.0, 6.0).into_data();
            // Shared storage (x is used again below) and in place (a fresh copy).
            let shared = relu6(x.clone());
            assert_eq!(shared.into_data(), want);
            assert_eq!(relu6(x.clone() * 1.0).into_data(), want);
            // A transposed view.
            let t = relu6(x.clone().transpose()).transpose();
            assert_eq!(t.into_data(), want);
            // The input is untouched when its storage was shared.
            assert_eq!(x.into_data(), TensorData::new(values(n), [n / 17, 17]));
        }
        let nan = Tensor::<1>::from_data(TensorData::new(vec![f32::NAN, -1.0, 7.0, 3.0], [4]), &Device::flex());
        let v = relu6(nan * 1.0).into_data().try_into_vec::<f32>().unwrap();
        assert!(v[0].is_nan());
        assert_eq!(&v[1..], &[0.0, 6.0, 3.0]);
    }
}
