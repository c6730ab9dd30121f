//! The channel MLP of a MetaFormer block: fc1 → activation → fc2.

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::prelude::*;
use burn::tensor::activation::{gelu, gelu_approximate, relu, silu};

use crate::mixed_precision::linear;
use crate::mixers::normal_linear;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone)]
pub struct MlpConfig {
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
    pub fc1: Linear,
    pub fc2: Linear,
    dropout: Dropout,
    #[module(skip)]
    activation: Activation,
}

impl MlpConfig {
    pub fn init(&self, device: &Device) -> Mlp {
        Mlp {
            fc1: normal_linear(
                self.d_model,
                self.d_hidden,
                self.bias,
                self.init_std,
                device,
            ),
            fc2: normal_linear(
                self.d_hidden,
                self.d_model,
                self.bias,
                self.out_init_std,
                device,
            ),
            dropout: DropoutConfig::new(self.dropout).init(),
            activation: self.activation,
        }
    }
}

impl Mlp {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = linear(&self.fc1, x);
        let h = match self.activation {
            Activation::Gelu => gelu(h),
            Activation::GeluTanh => gelu_approximate(h),
            Activation::Relu => relu(h),
            Activation::Silu => silu(h),
            Activation::SquaredRelu => relu(h).powi_scalar(2),
        };
        self.dropout.forward(linear(&self.fc2, h))
    }
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
