//! AdamW (Loshchilov & Hutter) with PyTorch's update rule and weight decay only on the
//! weights of linear maps (see [`decays`]); clipping is [`super::grad_clip`]'s.
//!
//! Burn's own AdamW decays every parameter alike and keys its state by random parameter
//! ids; this one keys its state by parameter path (`layers.0.mixer.q_proj.weight`), so a
//! checkpoint's optimizer state is readable, survives re-initialisation of the model, and
//! a resumed run continues bit for bit.
//!
//! On flex (the CPU backend) the update is one parallel pass over all parameters' values
//! ([`fused_update`]) instead of a dozen tensor ops per parameter, each allocating and
//! sweeping memory; the tensor-op form is the reference, and other backends' path (tests
//! hold both to PyTorch's rule).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context, bail};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::*;

use serde::{Deserialize, Serialize};

use crate::options::{OptionError, fail, non_negative, positive};

/// First and second moments of one parameter, flattened.
#[derive(Clone, Debug)]
struct Moments {
    exp_avg: Tensor<1>,
    exp_avg_sq: Tensor<1>,
}

pub struct AdamW {
    config: OptimizerConfig,
    /// Where the moments live: the master weights' (plain) device.
    device: Device,
    /// Updates taken so far (PyTorch's `step`), for bias correction.
    step: u64,
    moments: BTreeMap<String, Moments>,
    /// Update in one pass over host values ([`fused_update`]): on flex.
    fused: bool,
}

/// Whether a parameter gets weight decay, by its kind: the weight matrices (and filters)
/// of linear maps do — a rank ≥ 2 parameter of a `Linear` or a convolution; nothing else
/// does: biases, norm weights, embedding tables, layer scales and a mixer's own raw
/// parameters (gates and decays such as the SSMs' A_log, D and dt_bias, as in mamba_ssm).
/// `owner` is the module type holding the parameter, as Burn's visitors name it
/// (`"Struct:Linear"`).
pub fn decays(owner: &str, rank: usize) -> bool {
    rank >= 2 && matches!(owner, "Struct:Linear" | "Struct:CausalConv1d")
}

/// Where a module visitor is: the path of names (`layers.0.mixer.q_proj`) and the type of
/// the module at each level, the last being the one that holds the next parameter.
#[derive(Default)]
struct ParamPath {
    names: Vec<String>,
    owners: Vec<String>,
}

impl ParamPath {
    fn enter(&mut self, name: &str, container: &str) {
        self.names.push(name.to_string());
        self.owners.push(container.to_string());
    }

    fn exit(&mut self) {
        self.names.pop();
        self.owners.pop();
    }

    fn path(&self) -> String {
        self.names.join(".")
    }

    /// Whether the parameter here, of rank `rank`, decays.
    fn decays(&self, rank: usize) -> bool {
        decays(self.owners.last().map_or("", String::as_str), rank)
    }

    /// The factor `1 − lr·weight_decay` the parameter here is multiplied by before its
    /// update (1 where it does not decay).
    fn decay_factor(&self, rank: usize, lr: f64, c: &OptimizerConfig) -> f64 {
        if self.decays(rank) && c.weight_decay > 0.0 {
            1.0 - lr * c.weight_decay
        } else {
            1.0
        }
    }
}

/// Every parameter of `model` by path, with whether [`decays`] decays it.
pub fn decay_plan<M: Module>(model: &M) -> Vec<(String, bool)> {
    #[derive(Default)]
    struct Plan {
        at: ParamPath,
        out: Vec<(String, bool)>,
    }
    impl ModuleVisitor for Plan {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.at.enter(name, container);
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.at.exit();
        }
        fn visit_float<const D: usize>(&mut self, _param: &Param<Tensor<D>>) {
            self.out.push((self.at.path(), self.at.decays(D)));
        }
    }
    let mut plan = Plan::default();
    model.visit(&mut plan);
    plan.out
}

impl AdamW {
    /// An optimizer for weights on `device`.
    pub fn new(config: OptimizerConfig, device: &Device) -> Self {
        let device = if device.is_autodiff() {
            device.clone().without_autodiff()
        } else {
            device.clone()
        };
        Self {
            config,
            fused: crate::device::is_flex(&device),
            device,
            step: 0,
            moments: BTreeMap::new(),
        }
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One update of every parameter that has a gradient. `grad_scale` multiplies the
    /// gradients first (clipping, accumulation averaging).
    pub fn step<M: Module>(
        &mut self,
        lr: f64,
        model: M,
        grads: &mut GradientsParams,
        grad_scale: f64,
    ) -> M {
        self.step += 1;
        let mut take = TakeValues {
            lr,
            config: &self.config,
            grads,
            at: ParamPath::default(),
            taken: Vec::new(),
        };
        let model = model.map(&mut take);
        let h = Hyper {
            lr,
            step: self.step as i32,
            grad_scale,
        };
        let mut taken = take.taken;
        let updates: Vec<(Tensor<1>, Moments)> = if self.fused {
            // Every parameter's values at once, updated in one parallel pass: one at a
            // time, a small one (a bias, a norm's weight) was one task on one thread while
            // the other waited, and each parameter ended in a join.
            let mut flat: Vec<FlatValues> = taken
                .iter_mut()
                .map(|t| FlatValues::take(t, self.moments.remove(&t.path)))
                .collect();
            fused_update(&mut flat, (&self.config, &h));
            taken
                .iter()
                .zip(flat)
                .map(|(t, f)| {
                    let tensor = |x: Vec<f32>| {
                        let n = x.len();
                        Tensor::<1>::from_data(TensorData::new(x, [n]), &t.device)
                    };
                    let moments = Moments {
                        exp_avg: tensor(f.m),
                        exp_avg_sq: tensor(f.v),
                    };
                    (tensor(f.p), moments)
                })
                .collect()
        } else {
            taken
                .iter_mut()
                .map(|t| {
                    let previous = self.moments.remove(&t.path);
                    let (p, g) = (t.p.take().expect("taken"), t.g.take().expect("taken"));
                    update_ops(p, g, previous, (&self.config, &h, t.decay))
                })
                .collect()
        };
        let mut updated = HashMap::new();
        for (t, (p, moments)) in taken.into_iter().zip(updates) {
            self.moments.insert(t.path, moments);
            updated.insert(t.id, (p, t.dims, t.require_grad));
        }
        let mut put = PutValues { updated };
        let model = model.map(&mut put);
        debug_assert!(put.updated.is_empty(), "every taken parameter is put back");
        model
    }

    /// Save moments and step count to a safetensors file (PyTorch's names: `exp_avg`,
    /// `exp_avg_sq`), exact f32.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let mut named: Vec<(String, Vec<u8>, usize)> = Vec::new();
        for (name, m) in &self.moments {
            for (suffix, t) in [("exp_avg", &m.exp_avg), ("exp_avg_sq", &m.exp_avg_sq)] {
                let values = t
                    .to_data()
                    .convert::<f32>()
                    .try_to_vec::<f32>()
                    .expect("f32 data");
                let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                named.push((format!("{name}.{suffix}"), bytes, values.len()));
            }
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = named
            .iter()
            .map(|(n, bytes, len)| {
                let view = safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    vec![*len],
                    bytes,
                )
                .expect("shape matches bytes");
                (n.clone(), view)
            })
            .collect();
        let metadata =
            std::collections::HashMap::from([("step".to_string(), self.step.to_string())]);
        safetensors::serialize_to_file(views, Some(metadata), path)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Load what [`AdamW::save`] wrote.
    pub fn load(config: OptimizerConfig, path: &Path, device: &Device) -> anyhow::Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)?;
        let step: u64 = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("step"))
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("{}: no `step` in the metadata", path.display()))?;
        let read = |name: &str| -> anyhow::Result<Tensor<1>> {
            let view = st.tensor(name)?;
            if view.dtype() != safetensors::Dtype::F32 {
                bail!("{name}: expected f32, found {:?}", view.dtype());
            }
            let values: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let n = values.len();
            Ok(Tensor::from_data(TensorData::new(values, [n]), device))
        };
        let mut moments = BTreeMap::new();
        for name in st.names() {
            if let Some(param) = name.strip_suffix(".exp_avg") {
                moments.insert(
                    param.to_string(),
                    Moments {
                        exp_avg: read(name)?,
                        exp_avg_sq: read(&format!("{param}.exp_avg_sq"))
                            .with_context(|| format!("{}: {param}", path.display()))?,
                    },
                );
            }
        }
        Ok(Self {
            config,
            fused: crate::device::is_flex(device),
            device: device.clone(),
            step,
            moments,
        })
    }
}

/// The reference update in tensor ops (every backend but flex) of one flat parameter `p`
/// given its gradient `g` and moments (`None` before the first update), decayed by
/// `decay`: the new parameter and moments.
fn update_ops(
    p: Tensor<1>,
    g: Tensor<1>,
    moments: Option<Moments>,
    (c, h, decay): (&OptimizerConfig, &Hyper, f64),
) -> (Tensor<1>, Moments) {
    let g = g.mul_scalar(h.grad_scale);
    let moments = match moments {
        Some(m) => Moments {
            exp_avg: m.exp_avg.mul_scalar(c.beta1) + g.clone().mul_scalar(1.0 - c.beta1),
            exp_avg_sq: m.exp_avg_sq.mul_scalar(c.beta2) + g.square().mul_scalar(1.0 - c.beta2),
        },
        None => Moments {
            exp_avg: g.clone().mul_scalar(1.0 - c.beta1),
            exp_avg_sq: g.square().mul_scalar(1.0 - c.beta2),
        },
    };
    let bias1 = 1.0 - c.beta1.powi(h.step);
    let bias2 = 1.0 - c.beta2.powi(h.step);
    let denom = moments
        .exp_avg_sq
        .clone()
        .sqrt()
        .div_scalar(bias2.sqrt())
        .add_scalar(c.eps);
    let update = moments.exp_avg.clone().div(denom).mul_scalar(h.lr / bias1);
    let decayed = if decay != 1.0 { p.mul_scalar(decay) } else { p };
    (decayed - update, moments)
}

/// The scalars of one AdamW update beside the config's.
struct Hyper {
    lr: f64,
    /// The update's number, from 1 (bias correction).
    step: i32,
    grad_scale: f64,
}

/// Elements per parallel task of [`fused_update`]: small enough that a 128 × 128 weight is
/// four tasks, not one on one thread.
const PIECE: usize = 4 * 1024;

/// One step's AdamW constants, in f32.
struct AdamWStep {
    b1: f32,
    b2: f32,
    one_b1: f32,
    one_b2: f32,
    sqrt_bias2: f32,
    step_size: f32,
    eps: f32,
    decay: f32,
    scale: f32,
}

/// [`fused_update`]'s loop over one piece of a parameter.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn adamw_piece(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], r: &AdamWStep) {
    for (((p, m), v), &g) in p.iter_mut().zip(m).zip(v).zip(g) {
        let g = g * r.scale;
        *m = *m * r.b1 + g * r.one_b1;
        *v = *v * r.b2 + g * g * r.one_b2;
        let denom = v.sqrt() / r.sqrt_bias2 + r.eps;
        *p = *p * r.decay - r.step_size * *m / denom;
    }
}

/// One parameter taken out of the model with its gradient, both flat, on the device under
/// autodiff (where the update builds the new values).
struct Taken {
    id: ParamId,
    path: String,
    dims: Vec<usize>,
    device: Device,
    require_grad: bool,
    /// The weight's decay factor `1 − lr·weight_decay` (1 without decay).
    decay: f64,
    /// The values and the gradient (taken by the update).
    p: Option<Tensor<1>>,
    g: Option<Tensor<1>>,
}

/// Takes each parameter that has a gradient out of the model, with its gradient, leaving
/// an empty tensor in its place until [`PutValues`]. (Flex's update runs over every
/// parameter at once; the tensor-op form goes one by one over the same list.)
struct TakeValues<'a> {
    lr: f64,
    config: &'a OptimizerConfig,
    grads: &'a mut GradientsParams,
    at: ParamPath,
    taken: Vec<Taken>,
}

impl ModuleMapper for TakeValues<'_> {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.at.enter(name, container);
    }

    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.at.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let n: usize = tensor.dims().iter().product();
        let (dims, require_grad, param_device) = (
            tensor.dims().to_vec(),
            tensor.is_require_grad(),
            tensor.device(),
        );
        let p = tensor.inner().reshape([n]);
        self.taken.push(Taken {
            id,
            path: self.at.path(),
            dims,
            device: p.device(),
            require_grad,
            decay: self.at.decay_factor(D, self.lr, self.config),
            p: Some(p),
            g: Some(grad.reshape([n])),
        });
        // Its values are taken (no copy where the model held the only reference); the
        // updated ones go in by id.
        let empty = Tensor::<D>::empty([0; D], &param_device);
        Param::from_mapped_value(id, empty, mapper)
    }
}

/// A parameter's values, gradient and moments as f32 for [`fused_update`].
struct FlatValues {
    p: Vec<f32>,
    g: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    decay: f64,
}

impl FlatValues {
    /// `t`'s values (taken from it) and `moments` (0s before the first update).
    fn take(t: &mut Taken, moments: Option<Moments>) -> Self {
        let p = values(t.p.take().expect("taken"));
        let n = p.len();
        let (m, v) = match moments {
            Some(mo) => (values(mo.exp_avg), values(mo.exp_avg_sq)),
            None => (vec![0.0; n], vec![0.0; n]),
        };
        Self {
            p,
            g: values(t.g.take().expect("taken")),
            m,
            v,
            decay: t.decay,
        }
    }
}

/// Puts each updated parameter back in place of the empty tensor [`TakeValues`] left.
struct PutValues {
    updated: HashMap<ParamId, (Tensor<1>, Vec<usize>, bool)>,
}

impl ModuleMapper for PutValues {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let Some((flat, dims, require_grad)) = self.updated.remove(&id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let dims: [usize; D] = dims.try_into().expect("the rank it was taken with");
        let mut updated = Tensor::from_inner(flat.reshape(dims));
        if require_grad {
            updated = updated.require_grad();
        }
        Param::from_mapped_value(id, updated, mapper)
    }
}

/// A flat tensor's values as f32 (without a copy where nothing else holds them).
fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 values")
}

/// PyTorch's AdamW rule over every taken parameter in one parallel pass: `p`, `g` and the
/// moments read once, the new ones written in their place. Each parameter has its own
/// decay.
fn fused_update(taken: &mut [FlatValues], (c, h): (&OptimizerConfig, &Hyper)) {
    use rayon::prelude::*;
    let rule = |decay: f64| AdamWStep {
        b1: c.beta1 as f32,
        b2: c.beta2 as f32,
        one_b1: (1.0 - c.beta1) as f32,
        one_b2: (1.0 - c.beta2) as f32,
        sqrt_bias2: (1.0 - c.beta2.powi(h.step)).sqrt() as f32,
        step_size: (h.lr / (1.0 - c.beta1.powi(h.step))) as f32,
        eps: c.eps as f32,
        decay: decay as f32,
        scale: h.grad_scale as f32,
    };
    taken.par_iter_mut().for_each(|t| {
        let n = t.p.len();
        debug_assert!([t.g.len(), t.m.len(), t.v.len()] == [n; 3], "equal lengths");
        let rule = rule(t.decay);
        t.p.par_chunks_mut(PIECE)
            .zip(t.m.par_chunks_mut(PIECE))
            .zip(t.v.par_chunks_mut(PIECE))
            .zip(t.g.par_chunks(PIECE))
            .for_each(|(((p, m), v), g)| adamw_piece(p, m, v, g, &rule));
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::Linear;

    fn linear(w: [[f32; 2]; 3], b: [f32; 2], device: &Device) -> Linear {
        Linear {
            weight: Param::from_tensor(Tensor::from_data(TensorData::from(w), device)),
            bias: Some(Param::from_tensor(Tensor::from_data(
                TensorData::from(b),
                device,
            ))),
        }
    }

    /// PyTorch's AdamW on one scalar, in f64.
    fn reference(mut p: f64, grads: &[f64], c: &OptimizerConfig, lr: f64, decay: bool) -> f64 {
        let (mut m, mut v) = (0.0, 0.0);
        for (i, g) in grads.iter().enumerate() {
            let t = (i + 1) as i32;
            if decay {
                p *= 1.0 - lr * c.weight_decay;
            }
            m = c.beta1 * m + (1.0 - c.beta1) * g;
            v = c.beta2 * v + (1.0 - c.beta2) * g * g;
            let denom = (v.sqrt() / (1.0 - c.beta2.powi(t)).sqrt()) + c.eps;
            p -= lr / (1.0 - c.beta1.powi(t)) * m / denom;
        }
        p
    }

    /// Both forms — the fused pass (flex's) and the tensor ops (every other backend's) —
    /// follow PyTorch's rule, with a gradient scale.
    #[test]
    fn matches_pytorch_adamw_and_skips_decay_on_vectors() {
        for fused in [true, false] {
            matches_pytorch_adamw(fused);
        }
    }

    fn matches_pytorch_adamw(fused: bool) {
        let device = Device::flex();
        let config = OptimizerConfig {
            weight_decay: 0.5,
            ..Default::default()
        };
        let w0 = [[0.5f32, -0.25], [0.125, 1.0], [-2.0, 0.75]];
        let b0 = [0.3f32, -0.6];
        let mut model = linear(w0, b0, &device);
        let mut opt = AdamW::new(config.clone(), &device);
        opt.fused = fused;
        let gw = |k: f32| [[0.1 * k, -0.2], [0.3, 0.05 * k], [-0.4, 0.2]];
        let gb = |k: f32| [0.7 * k, -0.1];
        let lr = 0.01;
        for k in 1..=3 {
            let mut grads = GradientsParams::new();
            // Gradients given twice their size and scaled back by half.
            grads.register(
                model.weight.id,
                Tensor::<2>::from_data(TensorData::from(gw(k as f32)), &device).mul_scalar(2.0),
            );
            grads.register(
                model.bias.as_ref().unwrap().id,
                Tensor::<1>::from_data(TensorData::from(gb(k as f32)), &device).mul_scalar(2.0),
            );
            model = opt.step(lr, model, &mut grads, 0.5);
        }
        let w: Vec<f32> = model.weight.val().into_data().try_to_vec().unwrap();
        let b: Vec<f32> = model.bias.unwrap().val().into_data().try_to_vec().unwrap();
        for i in 0..3 {
            for j in 0..2 {
                let g: Vec<f64> = (1..=3).map(|k| gw(k as f32)[i][j] as f64).collect();
                let want = reference(w0[i][j] as f64, &g, &config, lr, true);
                assert!(
                    (w[i * 2 + j] as f64 - want).abs() < 1e-6,
                    "fused={fused}: weight[{i}][{j}]"
                );
            }
        }
        for j in 0..2 {
            let g: Vec<f64> = (1..=3).map(|k| gb(k as f32)[j] as f64).collect();
            let want = reference(b0[j] as f64, &g, &config, lr, false);
            assert!(
                (b[j] as f64 - want).abs() < 1e-6,
                "fused={fused}: bias[{j}]"
            );
        }
        assert_eq!(opt.step_count(), 3);
    }

    /// On the device the trainer uses (autodiff), a parameter without a gradient keeps its
    /// values, and the updated one keeps its shape and still requires a gradient: both
    /// forms (the fused one takes every updated parameter out of the model and puts it
    /// back).
    #[test]
    fn updates_only_parameters_with_gradients_and_keeps_their_shape() {
        let values = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().unwrap();
        for fused in [true, false] {
            let device = Device::flex().autodiff();
            let w0 = [[0.5f32, -0.25], [0.125, 1.0], [-2.0, 0.75]];
            let b0 = [0.3f32, -0.6];
            let mut model = linear(w0, b0, &device);
            let mut opt = AdamW::new(OptimizerConfig::default(), &device);
            opt.fused = fused;
            let mut grads = GradientsParams::new();
            grads.register(model.weight.id, Tensor::<2>::ones([3, 2], &device));
            model = opt.step(0.01, model, &mut grads, 1.0);
            let w = model.weight.val();
            assert_eq!(w.dims(), [3, 2], "fused={fused}");
            assert!(w.is_require_grad(), "fused={fused}: still trains");
            let before = values(Tensor::from_data(TensorData::from(w0), &device));
            let after = values(w);
            assert!(
                before.iter().zip(&after).all(|(a, b)| a != b),
                "fused={fused}"
            );
            let b: Vec<f32> = model.bias.unwrap().val().into_data().try_to_vec().unwrap();
            assert_eq!(b, b0.to_vec(), "fused={fused}: no gradient, no update");
        }
    }

    #[test]
    fn decay_rule() {
        assert!(decays("Struct:Linear", 2));
        assert!(!decays("Struct:Linear", 1));
        assert!(!decays("Struct:Embedding", 2));
        assert!(!decays("Struct:Ssm", 2));
    }
}

/// `[optimizer]`: AdamW with decoupled weight decay, not applied to norms, biases,
/// embeddings or layer scales.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerConfig {
    pub name: OptimizerKind,
    /// Peak learning rate.
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            name: OptimizerKind::Adamw,
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    Adamw,
}

impl OptimizerConfig {
    /// Checks of `[optimizer]` (keys relative to it).
    pub fn validate(&self) -> Result<(), OptionError> {
        if !positive(self.lr) {
            return fail("lr", format!("must be finite and > 0 (got {})", self.lr));
        }
        for (k, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return fail(k, format!("must be in [0, 1) (got {b})"));
            }
        }
        if !positive(self.eps) {
            return fail("eps", format!("must be finite and > 0 (got {})", self.eps));
        }
        if !non_negative(self.weight_decay) {
            return fail(
                "weight_decay",
                format!("must be finite and >= 0 (got {})", self.weight_decay),
            );
        }
        Ok(())
    }
}

impl super::checkpoint::Stateful for AdamW {
    fn save_state(&self, into: &mut super::checkpoint::CheckpointWriter) -> anyhow::Result<()> {
        self.save(&into.tensor_file(super::checkpoint::OPTIMIZER_FILE))
    }

    fn load_state(&mut self, from: &super::checkpoint::CheckpointReader) -> anyhow::Result<()> {
        *self = AdamW::load(
            self.config.clone(),
            &from.tensor_file(super::checkpoint::OPTIMIZER_FILE),
            &self.device,
        )?;
        Ok(())
    }
}
