//! The normalisation a block uses before its mixer and its MLP.

use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig, RmsNorm, RmsNormConfig};
use burn::prelude::*;

use serde::{Deserialize, Serialize};

#[derive(Module, Debug)]
pub enum Norm {
    LayerNorm(LayerNorm),
    RmsNorm(RmsNorm),
}

impl Norm {
    pub fn new(kind: NormKind, d_model: usize, eps: f64, bias: bool, device: &Device) -> Self {
        match kind {
            NormKind::LayerNorm => Norm::LayerNorm(
                LayerNormConfig::new(d_model)
                    .with_epsilon(eps)
                    .with_bias(bias)
                    .init(device),
            ),
            NormKind::RmsNorm => {
                Norm::RmsNorm(RmsNormConfig::new(d_model).with_epsilon(eps).init(device))
            }
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Norm::LayerNorm(n) => n.forward(x),
            Norm::RmsNorm(n) => n.forward(x),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    LayerNorm,
    RmsNorm,
}
