//! The channel MLP of a MetaFormer block: `fc2(activation(fc1(x)))`, or its gated form
//! SwiGLU, `fc2(silu(gate(x)) · fc1(x))` (Shazeer 2020; Llama's `down(silu(gate(x)) · up(x))`).

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::prelude::*;
use burn::tensor::activation::{gelu_approximate, relu};

use crate::activations::silu;
use crate::fused_dropout;
use crate::mixed_precision::{linear, linear_low};
use crate::mixers::normal_linear;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone)]
pub struct MlpConfig {
    pub kind: MlpKind,
    pub d_model: usize,
    pub d_hidden: usize,
    pub activation: Activation,
    pub bias: bool,
    pub dropout: f64,
    pub init_std: f64,
    /// Init std of fc2, which writes into the residual stream.
    pub out_init_std: f64,
}

#[derive(Module, Debug)]
pub struct Mlp {
    /// `d_model → d_hidden`: the activation's input, or SwiGLU's gated value (Llama's `up_proj`).
    pub fc1: Linear,
    /// SwiGLU's gate (Llama's `gate_proj`); absent in the standard MLP.
    pub gate: Option<Linear>,
    /// `d_hidden → d_model` (Llama's `down_proj`).
    pub fc2: Linear,
    dropout: Dropout,
    #[module(skip)]
    activation: Activation,
}

impl MlpConfig {
    pub fn init(&self, device: &Device) -> Mlp {
        let (d, h) = (self.d_model, self.d_hidden);
        Mlp {
            fc1: normal_linear(d, h, self.bias, self.init_std, device),
            gate: (self.kind == MlpKind::Swiglu)
                .then(|| normal_linear(d, h, self.bias, self.init_std, device)),
            fc2: normal_linear(h, d, self.bias, self.out_init_std, device),
            dropout: DropoutConfig::new(self.dropout).init(),
            activation: self.activation,
        }
    }
}

impl Mlp {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        // The hidden activation in the working dtype where autocast keeps it (libtorch).
        let h = match &self.gate {
            Some(gate) => silu(linear_low(gate, x.clone())) * linear_low(&self.fc1, x),
            None => self.activation.apply(linear_low(&self.fc1, x)),
        };
        fused_dropout::forward(&self.dropout, linear(&self.fc2, h))
    }
}

/// `model.mlp`: which channel MLP the blocks use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MlpKind {
    /// `fc2(activation(fc1(x)))` (GPT-2, MetaFormer).
    #[default]
    Standard,
    /// `fc2(silu(gate(x)) · fc1(x))`; `model.activation` does not apply.
    Swiglu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Gelu,
    /// The tanh approximation GPT-2 used.
    GeluTanh,
    Relu,
    Silu,
    /// relu(x)², as in Primer and MetaFormer's StarReLU without its affine part.
    SquaredRelu,
}

impl Activation {
    pub fn apply(self, h: Tensor<3>) -> Tensor<3> {
        match self {
            Activation::Gelu => crate::activations::gelu(h),
            Activation::GeluTanh => gelu_approximate(h),
            Activation::Relu => relu(h),
            Activation::Silu => silu(h),
            Activation::SquaredRelu => relu(h).powi_scalar(2),
        }
    }

    /// Its formula, for an export's conventions.
    pub fn formula(self) -> &'static str {
        match self {
            Activation::Gelu => "gelu(x) = x/2 · (1 + erf(x/√2)) (exact, torch's default)",
            Activation::GeluTanh => {
                "gelu_tanh(x) = x/2 · (1 + tanh(√(2/π) · (x + 0.044715 x³))) (torch approximate='tanh')"
            }
            Activation::Relu => "relu(x) = max(x, 0)",
            Activation::Silu => "silu(x) = x · sigmoid(x)",
            Activation::SquaredRelu => "squared_relu(x) = max(x, 0)²",
        }
    }
}
