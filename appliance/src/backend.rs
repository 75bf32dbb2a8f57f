//! Which compute backend runs the model: burn's wgpu backend on a GPU adapter where there is one
//! (in a build with the `wgpu` feature), the CPU backend (burn flex) otherwise. The choice is
//! logged and shown in the web UI and `/health`.

use anyhow::{Result, bail};
use burn::tensor::Device;

pub use wbc_config::BackendChoice;

/// The backend in use.
#[derive(Debug, Clone)]
pub struct Backend {
    /// The device models run on.
    pub device: Device,
    /// In words, for logs and the UI.
    pub name: String,
}

fn cpu(why: &str) -> Backend {
    Backend {
        device: Device::flex(),
        name: format!("CPU (burn flex){why}"),
    }
}

/// Selects the backend.
pub fn select(choice: BackendChoice) -> Result<Backend> {
    let b = match choice {
        BackendChoice::Cpu => cpu(""),
        BackendChoice::Auto => auto()?,
        BackendChoice::Gpu => gpu_any()?,
    };
    tracing::info!(backend = %b.name, "compute backend");
    Ok(b)
}

#[cfg(not(feature = "wgpu"))]
fn auto() -> Result<Backend> {
    Ok(cpu("; this build has no GPU support"))
}

#[cfg(not(feature = "wgpu"))]
fn gpu_any() -> Result<Backend> {
    bail!("a GPU backend was asked for but this build has no GPU support (build with `--features wgpu`)")
}

#[cfg(feature = "wgpu")]
fn auto() -> Result<Backend> {
    use burn::tensor::DeviceKind;
    // Hardware adapters only: on a software adapter the CPU backend is faster.
    for (kind, name) in [
        (DeviceKind::DiscreteGpu(0), "discrete GPU 0"),
        (DeviceKind::IntegratedGpu(0), "integrated GPU 0"),
    ] {
        if let Some(device) = probe(kind) {
            return Ok(Backend {
                device,
                name: format!("GPU (burn wgpu, {name})"),
            });
        }
    }
    Ok(cpu("; no GPU adapter found"))
}

#[cfg(feature = "wgpu")]
fn gpu_any() -> Result<Backend> {
    use burn::tensor::DeviceKind;
    for (kind, name) in [
        (DeviceKind::DiscreteGpu(0), "discrete GPU 0"),
        (DeviceKind::IntegratedGpu(0), "integrated GPU 0"),
        (DeviceKind::VirtualGpu(0), "virtual GPU 0"),
        (DeviceKind::Cpu, "software adapter"),
    ] {
        if let Some(device) = probe(kind) {
            return Ok(Backend {
                device,
                name: format!("GPU (burn wgpu, {name})"),
            });
        }
    }
    bail!("no wgpu adapter could be opened")
}

/// Whether an adapter of `kind` works: a tiny computation read back. wgpu reports a missing
/// adapter by panicking, so the probe contains the panic (and keeps it out of the log).
#[cfg(feature = "wgpu")]
fn probe(kind: burn::tensor::DeviceKind) -> Option<Device> {
    use burn::tensor::Tensor;
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(|| {
        let d = Device::wgpu(kind);
        let t = Tensor::<1>::from_floats([1.0, 2.0, 3.0], &d) * 2.0;
        let v: Vec<f32> = t.into_data().try_to_vec::<f32>().ok()?;
        (v == [2.0, 4.0, 6.0]).then_some(d)
    });
    std::panic::set_hook(hook);
    r.ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_is_always_there_and_auto_never_fails() {
        assert!(select(BackendChoice::Cpu).unwrap().name.starts_with("CPU"));
        let auto = select(BackendChoice::Auto).unwrap();
        assert!(
            auto.name.starts_with("CPU") || auto.name.starts_with("GPU"),
            "{}",
            auto.name
        );
    }

    #[cfg(not(feature = "wgpu"))]
    #[test]
    fn asking_for_a_gpu_without_gpu_support_is_a_clear_error() {
        let e = select(BackendChoice::Gpu).unwrap_err();
        assert!(format!("{e}").contains("--features wgpu"));
    }
}
