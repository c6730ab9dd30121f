//! A Mamba (S6) block (Gu & Dao 2023) as a token mixer: in_proj to (x, z), causal
//! depthwise conv1d + SiLU, x_proj to (Δ, B, C), dt_proj + softplus, `A = −exp(A_log)`
//! (S4D-real init), the selective scan `h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t x_t`,
//! `y_t = C_t h_t + D x_t`, gated by SiLU(z), out_proj. Parameter names follow mamba_ssm.
//!
//! The scan has a sequential reference (a loop over time) and a chunked form that trains:
//! inside a chunk every state is a decay-weighted sum of the chunk's inputs (computed in
//! parallel from differences of cumulative log-decays, which keeps it stable), and only
//! the state at chunk ends is carried from chunk to chunk.

#![allow(non_snake_case)] // A_log, D: mamba_ssm's names, kept for checkpoint compatibility

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::{silu, softplus};

use super::{TokenMixer, normal_linear};
use crate::recipe::{ScanForm, SsmOptions};

#[derive(Debug, Clone)]
pub struct SsmConfig {
    pub d_model: usize,
    pub init_std: f64,
    pub out_init_std: f64,
    pub options: SsmOptions,
}

/// Depthwise causal 1-D convolution over time (PyTorch `Conv1d(groups=channels)` layout:
/// weight `[channels, 1, kernel]`), left-padded so position t sees t−kernel+1..t.
#[derive(Module, Debug)]
pub struct CausalConv1d {
    pub weight: Param<Tensor<3>>,
    pub bias: Param<Tensor<1>>,
}

impl CausalConv1d {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, t, ch] = x.dims();
        let [_, _, kernel] = self.weight.dims();
        let device = x.device();
        let padded = Tensor::cat(vec![Tensor::zeros([b, kernel - 1, ch], &device), x], 1);
        let w = self.weight.val().reshape([ch, kernel]).transpose(); // [kernel, ch]
        let mut y = self.bias.val().reshape([1, 1, ch]).expand([b, t, ch]);
        for i in 0..kernel {
            let tap = w.clone().slice([i..i + 1, 0..ch]).reshape([1, 1, ch]);
            y = y + padded.clone().slice([0..b, i..i + t, 0..ch]) * tap;
        }
        y
    }
}

#[derive(Module, Debug)]
pub struct Ssm {
    pub in_proj: Linear,
    pub conv1d: CausalConv1d,
    pub x_proj: Linear,
    pub dt_proj: Linear,
    /// ln of −A, `[d_inner, d_state]`.
    pub A_log: Param<Tensor<2>>,
    /// The skip connection `D x`, `[d_inner]`.
    pub D: Param<Tensor<1>>,
    pub out_proj: Linear,
    d_inner: usize,
    d_state: usize,
    dt_rank: usize,
    #[module(skip)]
    scan: ScanForm,
    chunk_size: usize,
}

impl SsmConfig {
    pub fn dt_rank(&self) -> usize {
        match self.options.dt_rank {
            0 => self.d_model.div_ceil(16),
            r => r,
        }
    }

    pub fn init(&self, device: &Device) -> Ssm {
        let o = &self.options;
        let d_inner = o.expand * self.d_model;
        let dt_rank = self.dt_rank();
        let n = o.d_state;

        // Mamba's dt init: weights U(±dt_rank^-½); bias = softplus⁻¹(dt), dt log-uniform in
        // [dt_min, dt_max], so Δ starts in that range.
        let bound = (dt_rank as f64).powf(-0.5);
        let mut dt_proj = normal_linear(dt_rank, d_inner, true, self.init_std, device);
        dt_proj.weight = Param::from_tensor(Tensor::random(
            [dt_rank, d_inner],
            Distribution::Uniform(-bound, bound),
            device,
        ));
        let (lo, hi) = (o.dt_min.ln(), o.dt_max.ln());
        let dt = Tensor::<1>::random([d_inner], Distribution::Uniform(lo, hi), device)
            .exp()
            .clamp_min(1e-4);
        let inv_softplus = dt.clone() + dt.neg().exp().neg().add_scalar(1.0).log();
        dt_proj.bias = Some(Param::from_tensor(inv_softplus));

        // S4D-real: A = −(1, 2, …, d_state) for every channel.
        let a = Tensor::<1, Int>::arange(1..n as i64 + 1, device)
            .float()
            .log()
            .reshape([1, n])
            .expand([d_inner, n]);
        let conv_bound = (o.d_conv as f64).powf(-0.5);
        Ssm {
            in_proj: normal_linear(self.d_model, 2 * d_inner, false, self.init_std, device),
            conv1d: CausalConv1d {
                weight: Param::from_tensor(Tensor::random(
                    [d_inner, 1, o.d_conv],
                    Distribution::Uniform(-conv_bound, conv_bound),
                    device,
                )),
                bias: Param::from_tensor(Tensor::zeros([d_inner], device)),
            },
            x_proj: normal_linear(d_inner, dt_rank + 2 * n, false, self.init_std, device),
            dt_proj,
            A_log: Param::from_tensor(a),
            D: Param::from_tensor(Tensor::ones([d_inner], device)),
            out_proj: normal_linear(d_inner, self.d_model, false, self.out_init_std, device),
            d_inner,
            d_state: n,
            dt_rank,
            scan: o.scan,
            chunk_size: o.chunk_size,
        }
    }
}

/// The scan's inputs: u, Δ `[b, t, d_inner]`; B, C `[b, t, d_state]`; A `[d_inner, d_state]`.
pub struct ScanInputs {
    pub u: Tensor<3>,
    pub delta: Tensor<3>,
    pub a: Tensor<2>,
    pub b: Tensor<3>,
    pub c: Tensor<3>,
}

impl Ssm {
    /// Everything before the scan: projections, conv, Δ, A, B, C; and the gate z.
    pub fn scan_inputs(&self, x: Tensor<3>) -> (ScanInputs, Tensor<3>) {
        let [bsz, t, _] = x.dims();
        let (di, n, r) = (self.d_inner, self.d_state, self.dt_rank);
        let xz = self.in_proj.forward(x);
        let u = xz.clone().slice([0..bsz, 0..t, 0..di]);
        let z = xz.slice([0..bsz, 0..t, di..2 * di]);
        let u = silu(self.conv1d.forward(u));
        let dbc = self.x_proj.forward(u.clone());
        let dt = dbc.clone().slice([0..bsz, 0..t, 0..r]);
        let b = dbc.clone().slice([0..bsz, 0..t, r..r + n]);
        let c = dbc.slice([0..bsz, 0..t, r + n..r + 2 * n]);
        let delta = softplus(self.dt_proj.forward(dt), 1.0);
        let a = self.A_log.val().exp().neg();
        (ScanInputs { u, delta, a, b, c }, z)
    }

    pub fn scan(&self, inputs: ScanInputs) -> Tensor<3> {
        match self.scan {
            ScanForm::Chunked => scan_chunked(inputs, self.chunk_size),
            ScanForm::Sequential => scan_sequential(inputs),
        }
    }
}

impl TokenMixer for Ssm {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let (inputs, z) = self.scan_inputs(x);
        let skip = inputs.u.clone() * self.D.val().unsqueeze::<3>();
        let y = (self.scan(inputs) + skip) * silu(z);
        self.out_proj.forward(y)
    }
}

/// `Δ·A` (log-decays) and `Δ·B·u` (inputs), `[b, t, d_inner, d_state]` each.
fn discretize(s: &ScanInputs) -> (Tensor<4>, Tensor<4>) {
    let delta = s.delta.clone().unsqueeze_dim::<4>(3);
    let log_decay = delta.clone() * s.a.clone().unsqueeze::<4>();
    let input = (delta * s.u.clone().unsqueeze_dim::<4>(3)) * s.b.clone().unsqueeze_dim::<4>(2);
    (log_decay, input)
}

/// Reference: `h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t u_t`, `y_t = C_t · h_t`, step by step.
pub fn scan_sequential(s: ScanInputs) -> Tensor<3> {
    let [bsz, t, di] = s.u.dims();
    let n = s.a.dims()[1];
    let (log_decay, input) = discretize(&s);
    let mut h = Tensor::<3>::zeros([bsz, di, n], &s.u.device());
    let mut ys = Vec::with_capacity(t);
    for i in 0..t {
        let step = |x: &Tensor<4>| {
            x.clone()
                .slice([0..bsz, i..i + 1, 0..di, 0..n])
                .reshape([bsz, di, n])
        };
        h = step(&log_decay).exp() * h + step(&input);
        let c = s.c.clone().slice([0..bsz, i..i + 1, 0..n]); // [b, 1, n]
        ys.push((h.clone() * c).sum_dim(2).reshape([bsz, 1, di]));
    }
    Tensor::cat(ys, 1)
}

/// Fast form: chunks of `chunk` steps in parallel, states carried between chunks.
pub fn scan_chunked(s: ScanInputs, chunk: usize) -> Tensor<3> {
    let [bsz, t, di] = s.u.dims();
    let n = s.a.dims()[1];
    let device = s.u.device();
    let c = chunk.min(t);
    let nc = t.div_ceil(c);
    let pad = nc * c - t;
    let (log_decay, input) = discretize(&s);
    // Zero padding at the end: no decay, no input, no readout.
    let pad_time = |x: Tensor<4>, last: usize| {
        if pad == 0 {
            x
        } else {
            Tensor::cat(vec![x, Tensor::zeros([bsz, pad, di, last], &device)], 1)
        }
    };
    let cum = pad_time(log_decay, n)
        .reshape([bsz, nc, c, di, n])
        .cumsum(2);
    let input = pad_time(input, n).reshape([bsz, nc, c, di, n]);
    let readout = if pad == 0 {
        s.c
    } else {
        Tensor::cat(vec![s.c, Tensor::zeros([bsz, pad, n], &device)], 1)
    }
    .reshape([bsz, nc, c, 1, n]);

    // decay[.., i, j, ..] = exp(cum_i − cum_j) for j ≤ i, else 0: [b, nc, c, c, di, n].
    let diff: Tensor<6> = cum.clone().unsqueeze_dim(3) - cum.clone().unsqueeze_dim(2);
    let future = Tensor::<2, Bool>::tril_mask([c, c], 0, &device).reshape([1, 1, c, c, 1, 1]);
    let decay = diff.mask_fill(future, f32::NEG_INFINITY).exp();
    // States from this chunk's own inputs: [b, nc, c, di, n].
    let local = (decay * input.unsqueeze_dim::<6>(2))
        .sum_dim(3)
        .reshape([bsz, nc, c, di, n]);

    // Carry chunk-end states: h_in(k+1) = exp(cum_last(k)) h_in(k) + local_last(k).
    let last = |x: &Tensor<5>| x.clone().slice([0..bsz, 0..nc, c - 1..c, 0..di, 0..n]);
    let (end_decay, end_local) = (last(&cum).exp(), last(&local));
    let mut h = Tensor::<5>::zeros([bsz, 1, 1, di, n], &device);
    let mut h_in = Vec::with_capacity(nc);
    for k in 0..nc {
        h_in.push(h.clone());
        let pick = |x: &Tensor<5>| x.clone().slice([0..bsz, k..k + 1, 0..1, 0..di, 0..n]);
        h = pick(&end_decay) * h + pick(&end_local);
    }
    let h_in = Tensor::cat(h_in, 1); // [b, nc, 1, di, n]
    let states = local + cum.exp() * h_in;
    (states * readout)
        .sum_dim(4)
        .reshape([bsz, nc * c, di])
        .slice([0..bsz, 0..t, 0..di])
}
