//! A decoder-only language model built from MetaFormer blocks (nanoGPT's `GPT`, with the
//! attention replaced by whatever mixer each layer names); for classification tasks, the
//! same trunk with a pooled classification head instead of the LM head.

use std::sync::Mutex;

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Embedding, Linear};
use burn::prelude::*;
use burn::tensor::Distribution;

pub use super::objective::{Targets, cross_entropy};
use super::objective::{classification, masked_sums};
use super::{MetaFormerBlock, MetaFormerBlockConfig, ModelConfig, Norm, Pooling, PositionKind};
use crate::fused_dropout;
use crate::mixed_precision::linear;
use crate::mixers::{MixerKind, MixerState, normal_linear};
use crate::padding::Padding;
use crate::parallel::SequenceParallel;

/// Everything needed to build the model: the `[model]` section with the vocabulary filled
/// in, the sequence length the position table covers, and each layer's mixer.
#[derive(Debug, Clone)]
pub struct LanguageModelConfig {
    pub model: ModelConfig,
    pub vocab_size: usize,
    pub max_seq_len: usize,
    pub mixers: Vec<MixerKind>,
    /// Classes of a classification task (a pooled head replaces the LM head); `None`: a
    /// language model.
    pub classes: Option<usize>,
}

#[derive(Module, Debug)]
pub struct LanguageModel {
    pub token_embedding: Embedding,
    pub position_embedding: Option<Embedding>,
    pub layers: Vec<MetaFormerBlock>,
    pub final_norm: Norm,
    /// Absent when the head is tied to the token embedding, and in a classifier.
    pub lm_head: Option<Linear>,
    /// A classifier's head: the pooled final hidden state → class logits.
    pub classifier: Option<Linear>,
    /// `pooling = "cls"`: the learned vector put before every sequence, at position 0.
    pub cls_token: Option<Param<Tensor<1>>>,
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
        // A CLS vector takes one position before the sequence.
        let cls = self.classes.is_some() && m.pooling == Pooling::Cls;
        let positions_len = self.max_seq_len + usize::from(cls);
        let layers: Vec<MetaFormerBlock> = self
            .mixers
            .iter()
            .map(|&mixer| {
                MetaFormerBlockConfig {
                    model: m.clone(),
                    mixer,
                    max_seq_len: positions_len,
                }
                .init(device)
            })
            .collect();
        let positions = (m.position == PositionKind::Learned).then_some(positions_len);
        let context = positions
            .into_iter()
            .chain(layers.iter().filter_map(|l| l.mixer.max_seq_len()))
            .min()
            .map_or(0, |n| n - usize::from(cls));
        LanguageModel {
            token_embedding: embedding(self.vocab_size),
            position_embedding: match m.position {
                PositionKind::Learned => Some(embedding(positions_len)),
                PositionKind::None => None,
            },
            layers,
            final_norm: Norm::new(m.norm, m.d_model, m.norm_eps, m.bias, device),
            lm_head: (!m.tie_embeddings && self.classes.is_none())
                .then(|| normal_linear(m.d_model, self.vocab_size, false, m.init_std, device)),
            classifier: self
                .classes
                .map(|c| normal_linear(m.d_model, c, true, m.init_std, device)),
            cls_token: cls.then(|| {
                Param::from_tensor(Tensor::random(
                    [m.d_model],
                    Distribution::Normal(0.0, m.init_std),
                    device,
                ))
            }),
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
        fused_dropout::forward(&self.embed_dropout, x)
    }

    /// [`Self::objective`] of sequences split across ranks (sequence parallelism):
    /// `ranks[r]` is the model on rank r (see [`crate::parallel::replicate`]); `tokens` and
    /// the targets `[batch, seq]` are cut by `sp.layout` and sent to their ranks. The same
    /// loss, and through autodiff the same gradients, as on one device. A classifier pools
    /// by summing each rank's real positions on rank 0 (padding is at the end, so causal
    /// mixers never see it; the recipe refuses bidirectional ones here).
    pub fn objective_sharded(
        ranks: &[Self],
        tokens: Tensor<2, Int>,
        targets: &Targets,
        padding: Option<&Padding>,
        sp: &SequenceParallel,
    ) -> TrainingLoss {
        let [b, t] = tokens.dims();
        let home = tokens.device();
        let tokens = sp.layout.shard(tokens, 1, sp.transport);
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
            aux = add_aux(aux, a.map(|a| sp.transport.send(a, 0)));
        }
        // Each rank's part of a sum, gathered on rank 0.
        let gather = |parts: Vec<Tensor<1>>| {
            parts
                .into_iter()
                .map(|p| sp.transport.send(p, 0))
                .reduce(|a, b| a + b)
                .expect("at least one rank")
        };
        let shard = |x: Tensor<2>| sp.layout.shard(x, 1, sp.transport);
        let (cross_entropy, accuracy) = match targets {
            Targets::Next(next) => {
                let parts = ranks
                    .iter()
                    .zip(xs)
                    .zip(sp.layout.shard(next.clone(), 1, sp.transport))
                    .map(|((m, x), tgt)| {
                        let [_, tr] = tgt.dims();
                        cross_entropy(m.head(x), tgt).mul_scalar((b * tr) as f64)
                    })
                    .collect();
                (gather(parts).div_scalar((b * t) as f64), None)
            }
            Targets::Masked { tokens, weights } => {
                let total = weights.clone().sum().to_device(&sp.transport.device(0));
                let (mut nll, mut hit) = (Vec::new(), Vec::new());
                let shards = sp
                    .layout
                    .shard(tokens.clone(), 1, sp.transport)
                    .into_iter()
                    .zip(shard(weights.clone()));
                for ((m, x), (tok, w)) in ranks.iter().zip(xs).zip(shards) {
                    let (n, h) = masked_sums(m.head(x), tok, w);
                    nll.push(n);
                    hit.push(h);
                }
                (gather(nll) / total.clone(), Some(gather(hit) / total))
            }
            Targets::Labels(labels) => {
                let valid = match padding {
                    Some(p) => p.valid.clone(),
                    None => Tensor::ones([b, t], &home),
                };
                let (mut sums, mut counts) = (Vec::new(), Vec::new());
                let d = ranks[0].final_norm_width();
                for ((m, x), v) in ranks.iter().zip(xs).zip(shard(valid)) {
                    let h = m.final_norm.forward(x) * v.clone().unsqueeze_dim(2);
                    sums.push(h.sum_dim(1).reshape([b * d]));
                    counts.push(v.sum_dim(1).reshape([b]));
                }
                let pooled = gather(sums).reshape([b, d]) / gather(counts).reshape([b, 1]);
                let logits = ranks[0].classify_pooled(pooled);
                let (ce, acc) =
                    classification(logits, labels.clone().to_device(&sp.transport.device(0)));
                (ce, Some(acc))
            }
        };
        TrainingLoss::new(cross_entropy, aux, accuracy)
    }

    /// Token ids `[batch, seq]` → logits `[batch, seq, vocab]`.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        self.forward_with_aux(tokens).0
    }

    /// Logits and the sum of the layers' weighted auxiliary losses (MoH's load balance), if any.
    pub fn forward_with_aux(&self, tokens: Tensor<2, Int>) -> (Tensor<3>, Option<Tensor<1>>) {
        let (x, aux) = self.trunk(self.embed(tokens), None);
        (self.head(x), aux)
    }

    /// The blocks over the residual stream `x`, and their auxiliary losses.
    fn trunk(&self, mut x: Tensor<3>, padding: Option<&Padding>) -> (Tensor<3>, Option<Tensor<1>>) {
        let mut aux: Option<Tensor<1>> = None;
        for layer in &self.layers {
            let (y, a) = layer.forward_padded(x, padding);
            x = y;
            aux = add_aux(aux, a);
        }
        (x, aux)
    }

    /// A classifier's class logits `[batch, classes]` for tokens `[batch, seq]` whose
    /// `padding` marks the positions after each sequence's end, and the auxiliary losses.
    pub fn classify(
        &self,
        tokens: Tensor<2, Int>,
        padding: Option<&Padding>,
    ) -> (Tensor<2>, Option<Tensor<1>>) {
        let [b, t] = tokens.dims();
        let device = tokens.device();
        let Some(cls) = &self.cls_token else {
            let (x, aux) = self.trunk(self.embed(tokens), padding);
            let h = self.final_norm.forward(x);
            let pooled = match padding {
                Some(p) => (h * p.column()).sum_dim(1).squeeze_dim(1) / p.valid.clone().sum_dim(1),
                None => h.mean_dim(1).squeeze_dim(1),
            };
            return (self.classify_pooled(pooled), aux);
        };
        // CLS at position 0, the tokens at 1..=t; the CLS position is never padding.
        let d = self.final_norm_width();
        let mut cls = cls.val().reshape([1, 1, d]);
        if let Some(pos) = &self.position_embedding {
            cls = cls + pos.forward(Tensor::<2, Int>::zeros([1, 1], &device));
        }
        let positions = Tensor::<1, Int>::arange(1..t as i64 + 1, &device);
        let x = Tensor::cat(
            vec![cls.expand([b, 1, d]), self.embed_at(tokens, positions)],
            1,
        );
        let padding = padding.map(|p| Padding {
            valid: Tensor::cat(vec![Tensor::ones([b, 1], &device), p.valid.clone()], 1),
        });
        let (x, aux) = self.trunk(x, padding.as_ref());
        let h = self.final_norm.forward(x.narrow(1, 0, 1)).squeeze_dim(1);
        (self.classify_pooled(h), aux)
    }

    /// Pooled final hidden states `[batch, d_model]` → class logits.
    fn classify_pooled(&self, pooled: Tensor<2>) -> Tensor<2> {
        let head = self
            .classifier
            .as_ref()
            .expect("a classification target needs a model built with classes");
        linear(head, pooled.unsqueeze::<3>()).squeeze_dim(0)
    }

    fn final_norm_width(&self) -> usize {
        self.token_embedding.weight.dims()[1]
    }

    /// The training objective of `tokens` `[batch, seq]` against `targets`: cross-entropy
    /// plus the mixers' (weighted) auxiliary losses, and the accuracy where targets are
    /// scored one by one (masked tokens, labels).
    pub fn objective(
        &self,
        tokens: Tensor<2, Int>,
        targets: &Targets,
        padding: Option<&Padding>,
    ) -> TrainingLoss {
        match targets {
            Targets::Next(next) => {
                let (logits, aux) = self.forward_with_aux(tokens);
                TrainingLoss::new(cross_entropy(logits, next.clone()), aux, None)
            }
            Targets::Masked { tokens: t, weights } => {
                let (x, aux) = self.trunk(self.embed(tokens), padding);
                let (nll, hit) = masked_sums(self.head(x), t.clone(), weights.clone());
                let total = weights.clone().sum();
                TrainingLoss::new(nll / total.clone(), aux, Some(hit / total))
            }
            Targets::Labels(labels) => {
                let (logits, aux) = self.classify(tokens, padding);
                let (ce, accuracy) = classification(logits, labels.clone());
                TrainingLoss::new(ce, aux, Some(accuracy))
            }
        }
    }

    /// [`Self::objective`] of a language model's next-token targets.
    pub fn training_loss(&self, tokens: Tensor<2, Int>, targets: Tensor<2, Int>) -> TrainingLoss {
        self.objective(tokens, &Targets::Next(targets), None)
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
            None => crate::mixed_precision::matmul_rows(
                x,
                self.token_embedding.weight.val().transpose(),
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
    /// Fraction of scored targets predicted right (no gradient); `None` for next-token LM.
    pub accuracy: Option<Tensor<1>>,
}

impl TrainingLoss {
    pub fn new(
        cross_entropy: Tensor<1>,
        aux: Option<Tensor<1>>,
        accuracy: Option<Tensor<1>>,
    ) -> Self {
        let total = match &aux {
            Some(a) => cross_entropy.clone() + a.clone(),
            None => cross_entropy.clone(),
        };
        Self {
            total,
            cross_entropy,
            aux,
            accuracy,
        }
    }
}

/// The sum of two optional auxiliary losses.
fn add_aux(a: Option<Tensor<1>>, b: Option<Tensor<1>>) -> Option<Tensor<1>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    }
}

/// What decoding carries between tokens: the next position and each layer's mixer state.
#[derive(Clone, Debug, Default)]
pub struct DecodeState {
    pub position: usize,
    pub layers: Vec<Option<MixerState>>,
}
