//! The ranks of a run and how a batch is spread over them: `data` replicas, each splitting
//! its sequences over `sequence` ranks. Rank `g · sequence + s` holds shard s of replica g.

use burn::prelude::*;

use crate::model::LanguageModel;
use crate::model::language_model::{Targets, TrainingLoss};
use crate::padding::Padding;
use crate::parallel::{
    LocalDevices, SequenceLayout, SequenceParallel, Sharding, Transport, replicate,
};

pub struct Ranks {
    /// Plain (non-autodiff) device of each rank.
    devices: Vec<Device>,
    data: usize,
    /// How each sequence is cut, when sequence parallelism is on.
    layout: Option<SequenceLayout>,
}

impl Ranks {
    pub fn new(
        devices: Vec<Device>,
        data: usize,
        sequence: usize,
        sharding: Sharding,
        seq_len: usize,
    ) -> Self {
        assert_eq!(devices.len(), data * sequence, "one device per rank");
        Self {
            devices,
            data,
            layout: (sequence > 1).then(|| SequenceLayout::new(sequence, seq_len, sharding)),
        }
    }

    /// The ranks `recipe`'s `[parallelism]` asks for, on its backend.
    pub fn from_recipe(recipe: &crate::recipe::Recipe) -> anyhow::Result<Self> {
        let p = &recipe.parallelism;
        let t = &recipe.training;
        let specs = if p.devices.is_empty() {
            vec![t.device.clone(); p.ranks()]
        } else {
            p.devices.clone()
        };
        Ok(Self::new(
            crate::device::open_ranks(t.backend, &specs, t.precision)?,
            p.data_parallel_degree,
            p.sequence_parallel_degree,
            p.sequence_sharding,
            recipe.seq_len(),
        ))
    }

    /// Plain device of rank `r`.
    pub fn device(&self, r: usize) -> &Device {
        &self.devices[r]
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// A single rank on `device`.
    pub fn single(device: Device) -> Self {
        Self::new(vec![device], 1, 1, Sharding::Zigzag, 1)
    }

    /// [`Self::objective`] of next-token targets `[batch, seq]`.
    pub fn training_loss(
        &self,
        model: &LanguageModel,
        tokens: Tensor<2, Int>,
        targets: Tensor<2, Int>,
    ) -> TrainingLoss {
        self.objective(model, tokens, &Targets::Next(targets), None)
    }

    /// The loss of `tokens` `[batch, seq]` against `targets` over every rank: each replica
    /// takes `batch / data` sequences, the losses are averaged on the master's device. The
    /// same value as one device computing the whole batch, and autodiff gives the same
    /// gradients (replicas' gradients sum into the master weights; the average divides
    /// them).
    pub fn objective(
        &self,
        model: &LanguageModel,
        tokens: Tensor<2, Int>,
        targets: &Targets,
        padding: Option<&Padding>,
    ) -> TrainingLoss {
        let home = tokens.device();
        let transport = LocalDevices {
            devices: self
                .devices
                .iter()
                .map(|d| {
                    if home.is_autodiff() {
                        d.clone().autodiff()
                    } else {
                        d.clone()
                    }
                })
                .collect(),
        };
        if transport.ranks() == 1 && transport.devices[0] == home {
            return model.objective(tokens, targets, padding);
        }
        let replicas = replicate(model, &transport);
        let per_replica = transport.ranks() / self.data;
        let rows = tokens.dims()[0] / self.data;
        let mut parts = Vec::with_capacity(self.data);
        for g in 0..self.data {
            let ranks = g * per_replica..(g + 1) * per_replica;
            let group = LocalDevices {
                devices: transport.devices[ranks.clone()].to_vec(),
            };
            let tok = tokens.clone().narrow(0, g * rows, rows);
            let tgt = targets.narrow(g * rows, rows);
            let pad = padding.map(|p| Padding {
                valid: p.valid.clone().narrow(0, g * rows, rows),
            });
            let loss = match self.layout {
                Some(layout) => {
                    let sp = SequenceParallel {
                        layout,
                        transport: &group,
                    };
                    let replicas = &replicas[ranks];
                    LanguageModel::objective_sharded(replicas, tok, &tgt, pad.as_ref(), &sp)
                }
                None => {
                    let device = group.device(0);
                    let pad = pad.map(|p| p.to_device(&device));
                    replicas[ranks.start].objective(
                        tok.to_device(&device),
                        &tgt.to_device(&device),
                        pad.as_ref(),
                    )
                }
            };
            parts.push(loss);
        }
        mean(parts, &home)
    }
}

/// The mean of the replicas' losses, on `home`.
fn mean(parts: Vec<TrainingLoss>, home: &Device) -> TrainingLoss {
    let n = parts.len() as f64;
    let sum = |xs: Vec<Tensor<1>>| {
        xs.into_iter()
            .map(|x| x.to_device(home))
            .reduce(|a, b| a + b)
            .map(|s| s.div_scalar(n))
    };
    let (mut total, mut ce, mut aux, mut accuracy) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for p in parts {
        total.push(p.total);
        ce.push(p.cross_entropy);
        aux.extend(p.aux);
        accuracy.extend(p.accuracy);
    }
    TrainingLoss {
        total: sum(total).expect("at least one replica"),
        cross_entropy: sum(ce).expect("at least one replica"),
        aux: sum(aux),
        accuracy: sum(accuracy),
    }
}
