//! `--device`: where a command runs its model. The GPU backends are compiled in only with the
//! trainer's `wgpu` or `cuda` feature; asking for one the build lacks is an error that says how
//! to build it, never a silent fall-back to the CPU.

use anyhow::{Result, bail};
use burn::tensor::Device;
use serde::{Deserialize, Serialize};

/// A device to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// burn's flex backend on the CPU (every build).
    #[default]
    Cpu,
    /// burn's wgpu backend: the first discrete GPU through Vulkan or Metal (`--features wgpu`).
    Wgpu,
    /// burn's CUDA backend: GPU 0 (`--features cuda`; its build downloads an LLVM bundle).
    Cuda,
}

impl DeviceChoice {
    /// The burn device.
    pub fn device(self) -> Result<Device> {
        match self {
            DeviceChoice::Cpu => Ok(Device::flex()),
            DeviceChoice::Wgpu => wgpu(),
            DeviceChoice::Cuda => cuda(),
        }
    }
}

#[cfg(feature = "wgpu")]
fn wgpu() -> Result<Device> {
    Ok(Device::wgpu(burn::tensor::DeviceKind::DiscreteGpu(0)))
}

#[cfg(not(feature = "wgpu"))]
fn wgpu() -> Result<Device> {
    bail!(
        "this trainer was built without the wgpu backend: build it with `cargo build --release -p trainer --features wgpu`"
    )
}

#[cfg(feature = "cuda")]
fn cuda() -> Result<Device> {
    Ok(Device::cuda(0))
}

#[cfg(not(feature = "cuda"))]
fn cuda() -> Result<Device> {
    bail!(
        "this trainer was built without the CUDA backend: build it with `cargo build --release -p trainer --features cuda`"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_is_always_there_and_a_backend_the_build_lacks_says_how_to_get_it() {
        assert_eq!(DeviceChoice::Cpu.device().unwrap(), Device::flex());
        #[cfg(not(feature = "wgpu"))]
        assert!(
            DeviceChoice::Wgpu
                .device()
                .unwrap_err()
                .to_string()
                .contains("--features wgpu")
        );
        #[cfg(not(feature = "cuda"))]
        assert!(
            DeviceChoice::Cuda
                .device()
                .unwrap_err()
                .to_string()
                .contains("--features cuda")
        );
    }
}
