//! A decoder-only language model built from MetaFormer blocks (nanoGPT's `GPT`, with the
//! attention replaced by whatever mixer each layer names).

use std::sync::Mutex;

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Embedding, Linear};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::log_softmax;

use super::{MetaFormerBlock, MetaFormerBlockConfig, ModelConfig, Norm, PositionKind};
use crate::mixed_precision::linear;
use crate::mixers::{MixerKind, MixerState, normal_linear};
use crate::parallel::SequenceParallel;

/// Everything needed to build the model: the `[model]` section with the vocabulary filled
/// in, the sequence length the position table covers, and each layer's mixer.
#[derive(Debug, Clone)]
pub struct LanguageModelConfig {
    pub model: ModelConfig,
    pub vocab_size: usize,
    pub max_seq_len: usize,
    pub mixers: Vec<MixerKind>,
}

#[derive(Module, Debug)]
pub struct LanguageModel {
    pub token_embedding: Embedding,
    pub position_embedding: Option<Embedding>,
    pub layers: Vec<MetaFormerBlock>,
    pub final_norm: Norm,
    /// Absent when the head is tied to the token embedding.
    pub lm_head: Option<Linear>,
    embed_dropout: Dropout,
    /// Longest sequence the model handles (a learned position table or a mixer's own
    /// table, such as RoPE's, bounds it); 0 = unbounded.
    context: usize,
}

/// Flex has one process-wide RNG; initialisation holds it so that concurrent inits (tests,
/// several models in one process) cannot interleave draws and break seeding.
static INIT_RNG: Mutex<()> = Mutex::new(());

impl LanguageModelConfig {
    /// Build the model with weights fixed by `seed`: drawn on the CPU, then moved to
    /// `device`, so every backend starts from the same weights.
    /// About how many bytes training takes in f32, before anything is allocated: weights,
    /// gradients and two AdamW moments per parameter, plus one micro-batch's activations
    /// (per layer a few dozen `[batch, seq, d]` tensors and the MLP's hidden ones,
    /// attention's `[batch, heads, seq, seq]` scores, the logits and their gradient). An
    /// estimate for refusing what cannot fit — not a measurement. Returns (parameters,
    /// bytes of parameter state, bytes of activations), in f64 so absurd sizes do not wrap.
    pub fn training_bytes_estimate(&self, micro_batch: usize, seq_len: usize) -> (f64, f64, f64) {
        let m = &self.model;
        let (d, v, l) = (m.d_model as f64, self.vocab_size as f64, m.n_layers as f64);
        let hidden = m.mlp_ratio * d;
        let embeddings =
            v * d * if m.tie_embeddings { 1.0 } else { 2.0 } + self.max_seq_len as f64 * d;
        // Attention has 4 d×d projections; the SSMs' expanded projections about 6.
        let mlp_mats = if m.mlp == super::MlpKind::Swiglu {
            3.0
        } else {
            2.0
        };
        let per_layer = 6.0 * d * d + mlp_mats * hidden * d;
        let params = embeddings + l * per_layer;
        let tokens = (micro_batch * seq_len) as f64;
        let scores = micro_batch as f64 * m.n_heads as f64 * (seq_len as f64).powi(2);
        let activations = tokens * (l * (24.0 * d + 3.0 * hidden) + 3.0 * v) + l * 2.0 * scores;
        (params, 16.0 * params, 4.0 * activations)
    }

    pub fn init_seeded(&self, seed: u64, device: &Device) -> LanguageModel {
        let cpu = Device::flex();
        let model = {
            let _guard = INIT_RNG.lock().unwrap_or_else(|e| e.into_inner());
            cpu.seed(seed);
            self.init(&cpu)
        };
        let model = model.to_device(device);
        // Parameters made on a plain device become trainable when moved onto autodiff.
        if device.is_autodiff() {
            model.train()
        } else {
            model
        }
    }

    pub fn init(&self, device: &Device) -> LanguageModel {
        let m = &self.model;
        let embedding = |n: usize| Embedding {
            weight: Param::from_tensor(Tensor::random(
                [n, m.d_model],
                Distribution::Normal(0.0, m.init_std),
                device,
            )),
        };
        let layers: Vec<MetaFormerBlock> = self
            .mixers
            .iter()
            .map(|&mixer| {
                MetaFormerBlockConfig {
                    model: m.clone(),
                    mixer,
                    max_seq_len: self.max_seq_len,
                }
                .init(device)
            })
            .collect();
        let positions = (m.position == PositionKind::Learned).then_some(self.max_seq_len);
        let context = positions
            .into_iter()
            .chain(layers.iter().filter_map(|l| l.mixer.max_seq_len()))
            .min()
            .unwrap_or(0);
        LanguageModel {
            token_embedding: embedding(self.vocab_size),
            position_embedding: match m.position {
                PositionKind::Learned => Some(embedding(self.max_seq_len)),
                PositionKind::None => None,
            },
            layers,
            final_norm: Norm::new(m.norm, m.d_model, m.norm_eps, m.bias, device),
            lm_head: (!m.tie_embeddings)
                .then(|| normal_linear(m.d_model, self.vocab_size, false, m.init_std, device)),
            embed_dropout: DropoutConfig::new(m.dropout).init(),
            context,
        }
    }
}

impl LanguageModel {
    /// Token ids `[batch, seq]` → the residual stream entering the first block.
    pub fn embed(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        let [_, t] = tokens.dims();
        let device = tokens.device();
        self.embed_at(tokens, Tensor::<1, Int>::arange(0..t as i64, &device))
    }

    /// [`Self::embed`] of tokens at the given global `positions` `[seq]`.
    fn embed_at(&self, tokens: Tensor<2, Int>, positions: Tensor<1, Int>) -> Tensor<3> {
        let mut x = self.token_embedding.forward(tokens);
        if let Some(pos) = &self.position_embedding {
            x = x + pos.forward(positions.unsqueeze::<2>());
        }
        self.embed_dropout.forward(x)
    }

    /// [`Self::training_loss`] of sequences split across ranks (sequence parallelism):
    /// `ranks[r]` is the model on rank r (see [`crate::parallel::replicate`]); `tokens` and
    /// `targets` `[batch, seq]` are cut by `sp.layout` and sent to their ranks. The same
    /// loss, and through autodiff the same gradients, as on one device.
    pub fn training_loss_sharded(
        ranks: &[Self],
        tokens: Tensor<2, Int>,
        targets: Tensor<2, Int>,
        sp: &SequenceParallel,
    ) -> TrainingLoss {
        let [b, t] = tokens.dims();
        let tokens = sp.layout.shard(tokens, 1, sp.transport);
        let targets = sp.layout.shard(targets, 1, sp.transport);
        let mut xs: Vec<Tensor<3>> = ranks
            .iter()
            .zip(tokens)
            .enumerate()
            .map(|(r, (m, tok))| {
                let positions: Vec<i64> =
                    sp.layout.positions(r).iter().map(|&p| p as i64).collect();
                let n = positions.len();
                let positions =
                    Tensor::<1, Int>::from_data(TensorData::new(positions, [n]), &tok.device());
                m.embed_at(tok, positions)
            })
            .collect();
        let mut aux: Option<Tensor<1>> = None;
        for i in 0..ranks[0].layers.len() {
            let layer: Vec<&MetaFormerBlock> = ranks.iter().map(|m| &m.layers[i]).collect();
            let (ys, a) = MetaFormerBlock::forward_sharded(&layer, xs, sp);
            xs = ys;
            aux = match (aux, a.map(|a| sp.transport.send(a, 0))) {
                (Some(s), Some(a)) => Some(s + a),
                (s, a) => s.or(a),
            };
        }
        // Σ over every rank's tokens of −log p, gathered on rank 0, over the token count.
        let mut nll_sum: Option<Tensor<1>> = None;
        for ((m, x), tgt) in ranks.iter().zip(xs).zip(targets) {
            let [_, tr] = tgt.dims();
            let part = cross_entropy(m.head(x), tgt).mul_scalar((b * tr) as f64);
            let part = sp.transport.send(part, 0);
            nll_sum = Some(match nll_sum {
                Some(s) => s + part,
                None => part,
            });
        }
        let cross_entropy = nll_sum
            .expect("at least one rank")
            .div_scalar((b * t) as f64);
        let total = match &aux {
            Some(a) => cross_entropy.clone() + a.clone(),
            None => cross_entropy.clone(),
        };
        TrainingLoss {
            total,
            cross_entropy,
            aux,
        }
    }

    /// Token ids `[batch, seq]` → logits `[batch, seq, vocab]`.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        self.forward_with_aux(tokens).0
    }

    /// Logits and the sum of the layers' weighted auxiliary losses (MoH's load balance), if any.
    pub fn forward_with_aux(&self, tokens: Tensor<2, Int>) -> (Tensor<3>, Option<Tensor<1>>) {
        let mut x = self.embed(tokens);
        let mut aux: Option<Tensor<1>> = None;
        for layer in &self.layers {
            let (y, a) = layer.forward_with_aux(x);
            x = y;
            aux = match (aux, a) {
                (Some(s), Some(a)) => Some(s + a),
                (s, a) => s.or(a),
            };
        }
        (self.head(x), aux)
    }

    /// The training objective: cross-entropy plus the mixers' (weighted) auxiliary losses.
    pub fn training_loss(&self, tokens: Tensor<2, Int>, targets: Tensor<2, Int>) -> TrainingLoss {
        let (logits, aux) = self.forward_with_aux(tokens);
        let cross_entropy = cross_entropy(logits, targets);
        let total = match &aux {
            Some(a) => cross_entropy.clone() + a.clone(),
            None => cross_entropy.clone(),
        };
        TrainingLoss {
            total,
            cross_entropy,
            aux,
        }
    }

    /// Logits `[b, 1, vocab]` for one new token `[b, 1]` at `state.position`, using each
    /// mixer's recurrent form (KV cache, running state, window) instead of the whole prefix.
    pub fn step(&self, token: Tensor<2, Int>, state: &mut DecodeState) -> Tensor<3> {
        let device = token.device();
        let mut x = self.token_embedding.forward(token);
        if let Some(pos) = &self.position_embedding {
            let at = Tensor::<2, Int>::from_data(
                TensorData::new(vec![state.position as i64], [1, 1]),
                &device,
            );
            x = x + pos.forward(at);
        }
        state.layers.resize(self.layers.len(), None);
        for (layer, layer_state) in self.layers.iter().zip(state.layers.iter_mut()) {
            let (y, next) = layer.step(x, layer_state.take());
            x = y;
            *layer_state = Some(next);
        }
        state.position += 1;
        self.head(x)
    }

    /// Final norm and LM head: residual stream → logits.
    pub fn head(&self, x: Tensor<3>) -> Tensor<3> {
        let x = self.final_norm.forward(x);
        match &self.lm_head {
            Some(head) => linear(head, x),
            None => crate::mixed_precision::matmul(
                x,
                self.token_embedding
                    .weight
                    .val()
                    .transpose()
                    .unsqueeze::<3>(),
            ),
        }
    }

    /// Mean next-token cross-entropy of `targets` `[batch, seq]` under the logits.
    pub fn loss(&self, tokens: Tensor<2, Int>, targets: Tensor<2, Int>) -> Tensor<1> {
        cross_entropy(self.forward(tokens), targets)
    }

    /// Longest sequence the model accepts (its position tables), if bounded.
    pub fn max_seq_len(&self) -> Option<usize> {
        (self.context > 0).then_some(self.context)
    }
}

/// The parts of the training loss, for backward (`total`) and logging.
pub struct TrainingLoss {
    pub total: Tensor<1>,
    pub cross_entropy: Tensor<1>,
    pub aux: Option<Tensor<1>>,
}

/// What decoding carries between tokens: the next position and each layer's mixer state.
#[derive(Clone, Debug, Default)]
pub struct DecodeState {
    pub position: usize,
    pub layers: Vec<Option<MixerState>>,
}

/// Mean cross-entropy of integer targets under `[batch, seq, vocab]` logits.
pub fn cross_entropy(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
    let [b, t, v] = logits.dims();
    let log_probs = log_softmax(logits.reshape([b * t, v]), 1);
    let picked = log_probs.gather(1, targets.reshape([b * t, 1]));
    picked.mean().neg()
}
