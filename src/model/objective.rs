//! What a batch is scored on, and the loss and accuracy of model outputs against it.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;

/// The targets of a batch.
// One per micro-batch: the size gap between variants costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Targets {
    /// The next token at every position `[b, t]` (language modelling).
    Next(Tensor<2, Int>),
    /// Tokens at some positions only (MQAR's answers, the copied tokens): ids `[b, t]` and
    /// weights `[b, t]`, 1 where a position is scored and 0 elsewhere.
    Masked {
        tokens: Tensor<2, Int>,
        weights: Tensor<2>,
    },
    /// One class per sequence `[b]`.
    Labels(Tensor<1, Int>),
}

impl Targets {
    /// Rows `start..start + len` of the batch (a data-parallel replica's share).
    pub fn narrow(&self, start: usize, len: usize) -> Self {
        match self {
            Targets::Next(t) => Targets::Next(t.clone().narrow(0, start, len)),
            Targets::Masked { tokens, weights } => Targets::Masked {
                tokens: tokens.clone().narrow(0, start, len),
                weights: weights.clone().narrow(0, start, len),
            },
            Targets::Labels(l) => Targets::Labels(l.clone().narrow(0, start, len)),
        }
    }

    pub fn to_device(&self, device: &Device) -> Self {
        match self {
            Targets::Next(t) => Targets::Next(t.clone().to_device(device)),
            Targets::Masked { tokens, weights } => Targets::Masked {
                tokens: tokens.clone().to_device(device),
                weights: weights.clone().to_device(device),
            },
            Targets::Labels(l) => Targets::Labels(l.clone().to_device(device)),
        }
    }
}

/// Per-token negative log-likelihood `[b, t]` of `targets` under `[b, t, vocab]` logits.
pub fn token_nll(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
    let [b, t, v] = logits.dims();
    if crate::device::is_flex(&logits.device()) && logits.dtype() == burn::tensor::DType::F32 {
        let (logits, targets) = (logits.reshape([b * t, v]), targets.reshape([b * t]));
        return super::fused_cross_entropy::token_nll(logits, targets).reshape([b, t]);
    }
    let log_probs = log_softmax(logits.reshape([b * t, v]), 1);
    log_probs
        .gather(1, targets.reshape([b * t, 1]))
        .reshape([b, t])
        .neg()
}

/// Mean cross-entropy of integer targets under `[batch, seq, vocab]` logits.
pub fn cross_entropy(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
    token_nll(logits, targets).mean()
}

/// 1.0 where the arg-max of `logits` `[.., classes]` is `targets` `[..]`, else 0.0; no
/// gradient.
pub fn hits<const D: usize, const D1: usize>(
    logits: Tensor<D1>,
    targets: Tensor<D, Int>,
) -> Tensor<D> {
    let predicted: Tensor<D, Int> = logits.detach().argmax(D1 - 1).squeeze_dim(D1 - 1);
    predicted.equal(targets).float()
}

/// Weighted sums over `[b, t]` token logits of a masked target: (Σ w·nll, Σ w·hit).
pub fn masked_sums(
    logits: Tensor<3>,
    tokens: Tensor<2, Int>,
    weights: Tensor<2>,
) -> (Tensor<1>, Tensor<1>) {
    let hit = hits(logits.clone(), tokens.clone());
    let nll = token_nll(logits, tokens);
    ((nll * weights.clone()).sum(), (hit * weights).sum())
}

/// Mean cross-entropy and accuracy of class logits `[b, classes]` against labels `[b]`.
pub fn classification(logits: Tensor<2>, labels: Tensor<1, Int>) -> (Tensor<1>, Tensor<1>) {
    let [b, _] = logits.dims();
    let accuracy = hits(logits.clone(), labels.clone()).mean();
    let nll = log_softmax(logits, 1)
        .gather(1, labels.reshape([b, 1]))
        .mean()
        .neg();
    (nll, accuracy)
}
