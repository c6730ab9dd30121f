//! From the recipe's `training.backend` / `training.device` to a Burn device.

use anyhow::bail;
use burn::prelude::Device;

use crate::recipe::{BackendKind, TrainingConfig};

/// The plain (non-autodiff) device a run computes on.
pub fn select(training: &TrainingConfig) -> anyhow::Result<Device> {
    match training.backend {
        BackendKind::Cpu => Ok(Device::flex()),
        BackendKind::Wgpu => wgpu(training.device),
        BackendKind::Libtorch => libtorch(training.device),
    }
}

#[cfg(feature = "wgpu")]
fn wgpu(index: usize) -> anyhow::Result<Device> {
    use burn::tensor::DeviceKind;
    Ok(if index == 0 {
        Device::wgpu(DeviceKind::DefaultDevice)
    } else {
        Device::wgpu(DeviceKind::DiscreteGpu(index))
    })
}

#[cfg(not(feature = "wgpu"))]
fn wgpu(_index: usize) -> anyhow::Result<Device> {
    bail!(
        "training.backend = \"wgpu\": this metamix was built without wgpu; rebuild with \
         `cargo build --release --features wgpu`, or use backend = \"cpu\""
    )
}

#[cfg(feature = "tch")]
#[allow(deprecated)] // burn-tch is deprecated upstream but still the libtorch route
fn libtorch(index: usize) -> anyhow::Result<Device> {
    // Device 0 is libtorch's CPU; CUDA device k is `device = k + 1`.
    Ok(match index {
        0 => Device::libtorch(),
        k => Device::libtorch_cuda(k - 1),
    })
}

#[cfg(not(feature = "tch"))]
fn libtorch(_index: usize) -> anyhow::Result<Device> {
    bail!(
        "training.backend = \"libtorch\": this metamix was built without libtorch; rebuild with \
         `cargo build --release --features tch` (see scripts/setup_libtorch.sh), or use backend = \"cpu\""
    )
}
