//! How a tensor reaches a rank.
//!
//! A rank is a Burn device: a logical rank on the CPU, a GPU, or a device hosted by a
//! `burn-remote` server in another process or on another machine. Moving a tensor is Burn's
//! `to_device`, which is differentiable: its backward moves the gradient back, so one
//! autodiff graph spans every rank and gradients need no separate communication step.

use burn::prelude::*;
use burn::tensor::kind::Basic;

/// The ranks of a parallel run, by index.
pub trait Transport: Sync {
    fn ranks(&self) -> usize;
    fn device(&self, rank: usize) -> Device;
}

impl dyn Transport + '_ {
    /// `x` on rank `to` (no copy when it is already there).
    pub fn send<const D: usize, K: Basic>(&self, x: Tensor<D, K>, to: usize) -> Tensor<D, K> {
        let device = self.device(to);
        if x.device() == device {
            x
        } else {
            x.to_device(&device)
        }
    }
}

/// Ranks as the Burn devices this process drives — its own, or `burn-remote` handles to
/// other processes'. Several logical ranks may share one device (the CPU), which runs the
/// same ring logic without parallel hardware.
#[derive(Debug, Clone)]
pub struct LocalDevices {
    pub devices: Vec<Device>,
}

impl LocalDevices {
    /// `ranks` logical ranks, all on `device`.
    pub fn logical(ranks: usize, device: &Device) -> Self {
        Self {
            devices: vec![device.clone(); ranks],
        }
    }
}

impl Transport for LocalDevices {
    fn ranks(&self) -> usize {
        self.devices.len()
    }

    fn device(&self, rank: usize) -> Device {
        self.devices[rank].clone()
    }
}
