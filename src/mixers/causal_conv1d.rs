//! What Mamba's and Mamba-2's blocks share: the depthwise causal 1-D convolution before
//! their scan, the state they carry, and the slicing of a sequence into scan steps.

use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::Distribution;

use crate::parallel::Transport;
use crate::parallel::state_passing::Carry;

/// Depthwise causal 1-D convolution over time (PyTorch `Conv1d(groups=channels)` layout:
/// weight `[channels, 1, kernel]`), left-padded so position t sees t−kernel+1..t.
#[derive(Module, Debug)]
pub struct CausalConv1d {
    pub weight: Param<Tensor<3>>,
    pub bias: Param<Tensor<1>>,
}

impl CausalConv1d {
    /// The output at the last position of `window` `[b, kernel, channels]`.
    pub fn step(&self, window: Tensor<3>) -> Tensor<3> {
        let [_, kernel, ch] = window.dims();
        let w = self
            .weight
            .val()
            .reshape([ch, kernel])
            .transpose()
            .unsqueeze::<3>();
        (window * w).sum_dim(1) + self.bias.val().reshape([1, 1, ch])
    }

    /// `silu(self.forward(x, history))`: on flex one fused op ([`super::fused_conv1d`]),
    /// elsewhere the reference.
    pub fn forward_silu(&self, x: Tensor<3>, history: Option<Tensor<3>>) -> Tensor<3> {
        conv_silu(x, history, self.weight.val(), self.bias.val())
    }

    /// [`Self::forward_silu`] of channel groups given apart (`parts`, whose widths sum to
    /// the channels, in order; `history` over all channels): each part through its own
    /// filters. Mamba-2's x, B and C stay separate tensors this way: split after the conv,
    /// each slice's gradient was a zero-filled buffer of the whole width, and B and C
    /// strided views that every later reshape copied.
    pub fn forward_silu_parts<const N: usize>(
        &self,
        parts: [Tensor<3>; N],
        history: Option<Tensor<3>>,
    ) -> [Tensor<3>; N] {
        let mut first = 0;
        parts.map(|x| {
            let width = x.dims()[2];
            let weight = self.weight.val().narrow(0, first, width);
            let bias = self.bias.val().narrow(0, first, width);
            let history = history.clone().map(|h| h.narrow(2, first, width));
            first += width;
            conv_silu(x, history, weight, bias)
        })
    }

    /// Over `x` `[b, t, ch]`, the `kernel − 1` inputs before it in `history` (zeros at the
    /// start of a sequence). The reference form: a slice, product and sum per tap.
    pub fn forward(&self, x: Tensor<3>, history: Option<Tensor<3>>) -> Tensor<3> {
        conv(x, history, self.weight.val(), self.bias.val())
    }
}

/// The conv with filters `weight` `[ch, 1, kernel]` and `bias` `[ch]` ([`CausalConv1d::forward`]).
fn conv(x: Tensor<3>, history: Option<Tensor<3>>, weight: Tensor<3>, bias: Tensor<1>) -> Tensor<3> {
    let [b, t, ch] = x.dims();
    let [_, _, kernel] = weight.dims();
    let device = x.device();
    let history = history.unwrap_or_else(|| Tensor::zeros([b, kernel - 1, ch], &device));
    let padded = Tensor::cat(vec![history, x], 1);
    let w = weight.reshape([ch, kernel]).transpose(); // [kernel, ch]
    let mut y = bias.reshape([1, 1, ch]).expand([b, t, ch]);
    for i in 0..kernel {
        let tap = w.clone().slice([i..i + 1, 0..ch]).reshape([1, 1, ch]);
        y = y + padded.clone().slice([0..b, i..i + t, 0..ch]) * tap;
    }
    y
}

/// `silu(conv(..))` ([`CausalConv1d::forward_silu`]): fused on flex for kernels up to
/// [`MAX_KERNEL`](super::fused_conv1d::MAX_KERNEL) taps.
fn conv_silu(
    x: Tensor<3>,
    history: Option<Tensor<3>>,
    weight: Tensor<3>,
    bias: Tensor<1>,
) -> Tensor<3> {
    let kernel = weight.dims()[2];
    if !crate::device::is_flex(&x.device()) || kernel > super::fused_conv1d::MAX_KERNEL {
        return crate::activations::silu(conv(x, history, weight, bias));
    }
    // No history: the kernel's zeros, given as `[b, 0, ch]`.
    let [b, _, ch] = x.dims();
    let history = history.unwrap_or_else(|| Tensor::zeros([b, 0, ch], &x.device()));
    super::fused_conv1d::conv1d_silu(x, history, weight, bias)
}

impl CausalConv1d {
    /// `channels` filters of `kernel` taps, PyTorch's default init U(±1/√kernel), zero bias.
    pub fn new(channels: usize, kernel: usize, device: &Device) -> Self {
        let bound = (kernel as f64).powf(-0.5);
        Self {
            weight: Param::from_tensor(Tensor::random(
                [channels, 1, kernel],
                Distribution::Uniform(-bound, bound),
                device,
            )),
            bias: Param::from_tensor(Tensor::zeros([channels], device)),
        }
    }

    pub fn kernel(&self) -> usize {
        self.weight.dims()[2]
    }
}

/// What a conv-then-scan mixer (Mamba, Mamba-2) carries from one token, or one chunk, to the
/// next: the conv's last `kernel − 1` inputs `[b, kernel − 1, channels]` and the scan state
/// `h` (`[b, d_inner, d_state]` for Mamba, `[b, heads, headdim, d_state]` for Mamba-2).
#[derive(Clone, Debug)]
pub struct ConvScanState<const D: usize> {
    pub conv: Tensor<3>,
    pub h: Tensor<D>,
}

impl<const D: usize> Carry for ConvScanState<D> {
    fn send(self, transport: &dyn Transport, rank: usize) -> Self {
        Self {
            conv: transport.send(self.conv, rank),
            h: transport.send(self.h, rank),
        }
    }
}

/// Steps cut from a sequence at once by [`time_steps`].
const SLICE_BLOCK: usize = 64;

/// The steps of `x` along time (dim 1), each of length 1, for a sequential scan. Cut in two
/// levels, blocks and then steps: a slice's backward writes a zero tensor the size of what it
/// was cut from, so cutting every step from the whole sequence would cost O(t²).
pub fn time_steps<const D: usize>(x: Tensor<D>) -> Vec<Tensor<D>> {
    let t = x.dims()[1];
    let mut steps = Vec::with_capacity(t);
    for t0 in (0..t).step_by(SLICE_BLOCK) {
        let len = SLICE_BLOCK.min(t - t0);
        let block = x.clone().narrow(1, t0, len);
        steps.extend((0..len).map(|i| block.clone().narrow(1, i, 1)));
    }
    steps
}

/// The rule an export states for a causal depthwise conv named `name` over `what`.
pub fn convention(name: &str, what: &str, channels: usize, d_conv: usize) -> String {
    format!(
        "{what} = silu({name}(...)): a causal depthwise conv over {channels} channels, weight \
         [{channels}, 1, {d_conv}] and a bias (always): y_p = bias + Σ_j weight[:, 0, j]·u_(p−{last}+j) \
         for j = 0..{last}, zeros before the start (torch.nn.Conv1d(groups={channels}, \
         padding={last}) keeping the first t outputs)",
        last = d_conv - 1
    )
}
