//! The MetaFormer block, as the MetaFormer paper codes it:
//! `x = x + ls1·mixer(norm1(x)); x = x + ls2·mlp(norm2(x))`.
//! It knows the mixer only as a [`Mixer`], whichever one the layer has.

use burn::module::{Module, Param};
use burn::prelude::*;

use super::{Mlp, MlpConfig, ModelConfig, Norm};
use crate::mixers::{Mixer, MixerKind, MixerState};
use crate::padding::Padding;
use crate::parallel::SequenceParallel;

/// MetaFormer's `Scale`: a learned per-channel multiplier on a residual branch.
#[derive(Module, Debug)]
pub struct LayerScale {
    pub scale: Param<Tensor<1>>,
}

impl LayerScale {
    fn new(d_model: usize, init: f64, device: &Device) -> Self {
        Self {
            scale: Param::from_tensor(Tensor::full([d_model], init, device)),
        }
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        x * self.scale.val().unsqueeze::<3>()
    }
}

#[derive(Debug, Clone)]
pub struct MetaFormerBlockConfig {
    pub model: ModelConfig,
    pub mixer: MixerKind,
    pub max_seq_len: usize,
}

#[derive(Module, Debug)]
pub struct MetaFormerBlock {
    pub norm1: Norm,
    pub mixer: Mixer,
    pub layer_scale1: Option<LayerScale>,
    pub norm2: Norm,
    pub mlp: Mlp,
    pub layer_scale2: Option<LayerScale>,
}

impl MetaFormerBlockConfig {
    pub fn init(&self, device: &Device) -> MetaFormerBlock {
        let m = &self.model;
        let norm = || Norm::new(m.norm, m.d_model, m.norm_eps, m.bias, device);
        let scale = || {
            m.layer_scale_init
                .map(|init| LayerScale::new(m.d_model, init, device))
        };
        MetaFormerBlock {
            norm1: norm(),
            mixer: self
                .mixer
                .init(&m.mixer_options, &m.mixer_context(self.max_seq_len), device),
            layer_scale1: scale(),
            norm2: norm(),
            mlp: MlpConfig {
                kind: m.mlp,
                d_model: m.d_model,
                d_hidden: m.mlp_hidden(),
                activation: m.activation,
                bias: m.bias,
                dropout: m.dropout,
                init_std: m.init_std,
                out_init_std: m.residual_init_std(),
            }
            .init(device),
            layer_scale2: scale(),
        }
    }
}

impl MetaFormerBlock {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_padded(x, None).0
    }

    /// `forward` of a batch with `padding`, plus the mixer's auxiliary loss, if any. Only
    /// the mixer moves information between positions, so only it needs the mask.
    pub fn forward_padded(
        &self,
        x: Tensor<3>,
        padding: Option<&Padding>,
    ) -> (Tensor<3>, Option<Tensor<1>>) {
        let (h, aux) = self
            .mixer
            .forward_padded(self.norm1.forward(x.clone()), padding);
        let x = x + scaled(&self.layer_scale1, h);
        let h = self.mlp.forward(self.norm2.forward(x.clone()));
        (x + scaled(&self.layer_scale2, h), aux)
    }

    /// `forward_with_aux` on a sequence sharded across ranks (`ranks[r]`: this block on
    /// rank r). Norms, MLP and residuals are per token, so only the mixer communicates.
    pub fn forward_sharded(
        ranks: &[&Self],
        xs: Vec<Tensor<3>>,
        sp: &SequenceParallel,
    ) -> (Vec<Tensor<3>>, Option<Tensor<1>>) {
        let normed = ranks
            .iter()
            .zip(&xs)
            .map(|(b, x)| b.norm1.forward(x.clone()))
            .collect();
        let mixers: Vec<&Mixer> = ranks.iter().map(|b| &b.mixer).collect();
        let (hs, aux) = Mixer::forward_sharded(&mixers, normed, sp);
        let ys = ranks
            .iter()
            .zip(xs.into_iter().zip(hs))
            .map(|(b, (x, h))| {
                let x = x + scaled(&b.layer_scale1, h);
                let h = b.mlp.forward(b.norm2.forward(x.clone()));
                x + scaled(&b.layer_scale2, h)
            })
            .collect();
        (ys, aux)
    }

    /// `forward` for one new token `[b, 1, d]`, given the mixer's decoding state.
    pub fn step(&self, x: Tensor<3>, state: Option<MixerState>) -> (Tensor<3>, MixerState) {
        let (h, state) = self.mixer.step(self.norm1.forward(x.clone()), state);
        let x = x + scaled(&self.layer_scale1, h);
        let h = self.mlp.forward(self.norm2.forward(x.clone()));
        (x + scaled(&self.layer_scale2, h), state)
    }
}

fn scaled(scale: &Option<LayerScale>, h: Tensor<3>) -> Tensor<3> {
    match scale {
        Some(s) => s.forward(h),
        None => h,
    }
}
