//! The normalisation a block uses before its mixer and its MLP: LayerNorm or RMSNorm over
//! the last dimension. On flex both run as one fused extension ([`crate::fused_norm`]);
//! elsewhere, and as the reference, Burn's `layer_norm` and RMSNorm's formula in tensor ops.

use burn::module::{Module, Param};
use burn::prelude::*;

use serde::{Deserialize, Serialize};

use crate::fused_norm::{fused_norm, norm_reference};

/// `(x − mean)/√(var + eps)·gamma + beta` (biased variance), as `torch.nn.LayerNorm`.
#[derive(Module, Debug)]
pub struct LayerNorm {
    pub gamma: Param<Tensor<1>>,
    /// Absent with `model.bias = false`.
    pub beta: Option<Param<Tensor<1>>>,
    pub epsilon: f64,
}

/// `x/√(mean(x²) + eps)·gamma`, as Llama's RMSNorm.
#[derive(Module, Debug)]
pub struct RmsNorm {
    pub gamma: Param<Tensor<1>>,
    pub epsilon: f64,
}

#[derive(Module, Debug)]
pub enum Norm {
    LayerNorm(LayerNorm),
    RmsNorm(RmsNorm),
}

impl Norm {
    pub fn new(kind: NormKind, d_model: usize, eps: f64, bias: bool, device: &Device) -> Self {
        let gamma = Param::from_tensor(Tensor::ones([d_model], device));
        match kind {
            NormKind::LayerNorm => Norm::LayerNorm(LayerNorm {
                gamma,
                beta: bias.then(|| Param::from_tensor(Tensor::zeros([d_model], device))),
                epsilon: eps,
            }),
            NormKind::RmsNorm => Norm::RmsNorm(RmsNorm {
                gamma,
                epsilon: eps,
            }),
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.with(x, fused_norm)
    }

    /// The tensor-op form: other backends' path, and the fused one's reference.
    pub fn forward_reference<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.with(x, norm_reference)
    }

    /// `form(x, gamma, beta, eps, center)` with this norm's parameters.
    fn with<const D: usize>(
        &self,
        x: Tensor<D>,
        form: fn(Tensor<D>, Tensor<1>, Option<Tensor<1>>, f64, bool) -> Tensor<D>,
    ) -> Tensor<D> {
        match self {
            Norm::LayerNorm(n) => form(
                x,
                n.gamma.val(),
                n.beta.as_ref().map(Param::val),
                n.epsilon,
                true,
            ),
            Norm::RmsNorm(n) => form(x, n.gamma.val(), None, n.epsilon, false),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    LayerNorm,
    RmsNorm,
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// The fused extension against the tensor-op reference: outputs and the gradients of
    /// the input, gamma and beta, for LayerNorm with and without bias and RMSNorm.
    #[test]
    fn fused_norm_equals_the_reference() {
        let device = Device::flex().autodiff();
        device.seed(9);
        let d = 48;
        for (kind, bias) in [
            (NormKind::LayerNorm, true),
            (NormKind::LayerNorm, false),
            (NormKind::RmsNorm, false),
        ] {
            let mut norm = Norm::new(kind, d, 1e-5, bias, &device);
            // Away from the init's ones and zeros, so their gradients are exercised.
            let random = |n| Tensor::<1>::random([n], Distribution::Normal(0.5, 1.0), &device);
            match &mut norm {
                Norm::LayerNorm(n) => {
                    n.gamma = Param::from_tensor(random(d));
                    n.beta = bias.then(|| Param::from_tensor(random(d)));
                }
                Norm::RmsNorm(n) => n.gamma = Param::from_tensor(random(d)),
            }
            let x = Tensor::<3>::random([3, 70, d], Distribution::Normal(1.0, 2.0), &device);
            let w = Tensor::<3>::random([3, 70, d], Distribution::Normal(0.0, 1.0), &device);
            let run = |fused: bool| {
                let x = x.clone().require_grad();
                let y = if fused {
                    norm.forward(x.clone())
                } else {
                    norm.forward_reference(x.clone())
                };
                let g = (y.clone() * w.clone()).sum().backward();
                let params: Vec<Tensor<1>> = match &norm {
                    Norm::LayerNorm(n) => std::iter::once(&n.gamma)
                        .chain(n.beta.as_ref())
                        .map(|p| p.grad(&g).unwrap())
                        .collect(),
                    Norm::RmsNorm(n) => vec![n.gamma.grad(&g).unwrap()],
                };
                let v = |t: Tensor<3>| {
                    t.into_data()
                        .convert::<f32>()
                        .try_into_vec::<f32>()
                        .unwrap()
                };
                let p: Vec<f32> = params
                    .into_iter()
                    .flat_map(|t| {
                        t.into_data()
                            .convert::<f32>()
                            .try_into_vec::<f32>()
                            .unwrap()
                    })
                    .collect();
                (v(y), v(x.grad(&g).unwrap()), p)
            };
            let calls = crate::fused_norm::FORWARD_CALLS.get();
            let (fused, reference) = (run(true), run(false));
            assert!(
                crate::fused_norm::FORWARD_CALLS.get() > calls,
                "the extension ran"
            );
            for (what, a, b) in [
                ("output", &fused.0, &reference.0),
                ("input gradient", &fused.1, &reference.1),
                ("parameter gradients", &fused.2, &reference.2),
            ] {
                assert_eq!(a.len(), b.len());
                let err = a
                    .iter()
                    .zip(b)
                    .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
                    .fold(0f32, f32::max);
                assert!(
                    err < 2e-5,
                    "{kind:?} bias={bias} {what}: max difference {err}"
                );
            }
        }
    }
}
