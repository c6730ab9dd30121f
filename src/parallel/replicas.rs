//! The model on each rank.

use burn::module::Module;

use super::Transport;

/// One copy of `master` per rank. A rank on the master's own device uses the master itself;
/// elsewhere the copy is made by `to_device`, which autodiff tracks, so every replica's
/// gradients flow back into the master weights: one backward pass sums them, and a loss
/// averaged over replicas averages them. No separate all-reduce is needed.
pub fn replicate<M: Module + Clone>(master: &M, transport: &dyn Transport) -> Vec<M> {
    let home = master.devices().into_iter().next();
    (0..transport.ranks())
        .map(|r| {
            let device = transport.device(r);
            if home.as_ref() == Some(&device) {
                master.clone()
            } else {
                master.clone().to_device(&device)
            }
        })
        .collect()
}
