//! Sequence parallelism computes exactly what one device computes: ring attention against
//! plain attention, and the whole language model — loss and every parameter gradient — for
//! every mixer, N = 1, 2, 4 ranks, zigzag and contiguous sharding.

mod common;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::softmax;
use common::{max_rel, tiny_lm};
use metamix::mixers::MixerKind;
use metamix::mixers::softmax_attention::{SoftmaxAttention, repeat_kv};
use metamix::model::LanguageModel;
use metamix::parallel::ring_attention::{Visibility, ring_attention};
use metamix::parallel::{LocalDevices, SequenceLayout, SequenceParallel, Sharding, replicate};
use metamix::recipe::{Recipe, ScanForm};
use metamix::run::model_config;

fn device() -> Device {
    Device::flex().autodiff()
}

fn values<const D: usize>(x: Tensor<D>) -> Vec<f32> {
    x.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

const LAYOUTS: [(usize, Sharding); 5] = [
    (1, Sharding::Zigzag),
    (2, Sharding::Zigzag),
    (4, Sharding::Zigzag),
    (2, Sharding::Contiguous),
    (4, Sharding::Contiguous),
];

/// Plain attention over the whole sequence: the reference.
fn full_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, vis: Visibility) -> Tensor<4> {
    let groups = q.dims()[1] / k.dims()[1];
    let (k, v) = (repeat_kv(k, groups), repeat_kv(v, groups));
    if vis.causal {
        let no_dropout = burn::nn::DropoutConfig::new(0.0).init();
        SoftmaxAttention::attend_naive(q, k, v, vis.window, &no_dropout)
    } else {
        let scale = 1.0 / (q.dims()[3] as f64).sqrt();
        softmax(q.matmul(k.transpose()).mul_scalar(scale), 3).matmul(v)
    }
}

#[test]
fn ring_attention_equals_full_attention() {
    let dev = device();
    let leaf = |shape: [usize; 4]| {
        Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &dev).require_grad()
    };
    // Grouped-query: 4 query heads share 2 key/value heads.
    let (q, k, v) = (
        leaf([2, 4, 16, 8]),
        leaf([2, 2, 16, 8]),
        leaf([2, 2, 16, 8]),
    );
    let probe = Tensor::<4>::random([2, 4, 16, 8], Distribution::Normal(0.0, 1.0), &dev);
    let run = |f: &dyn Fn() -> Tensor<4>| {
        let out = f();
        let grads = (out.clone() * probe.clone()).sum().backward();
        let g: Vec<Vec<f32>> = [&q, &k, &v]
            .iter()
            .map(|x| values(x.grad(&grads).unwrap()))
            .collect();
        (values(out), g)
    };
    for vis in [
        Visibility {
            causal: true,
            window: 0,
        },
        Visibility {
            causal: true,
            window: 3,
        },
        Visibility {
            causal: false,
            window: 0,
        },
    ] {
        let (out_ref, g_ref) = run(&|| full_attention(q.clone(), k.clone(), v.clone(), vis));
        for (ranks, sharding) in LAYOUTS {
            let transport = LocalDevices::logical(ranks, &dev);
            let sp = SequenceParallel {
                layout: SequenceLayout::new(ranks, 16, sharding),
                transport: &transport,
            };
            let (out, g) = run(&|| {
                let shard = |x: &Tensor<4>| sp.layout.shard(x.clone(), 2, sp.transport);
                let outs = ring_attention(shard(&q), shard(&k), shard(&v), vis, &sp);
                sp.layout.unshard(outs, 2, &dev)
            });
            let what = format!("{vis:?}, {ranks} ranks {sharding:?}");
            let e = max_rel(&out, &out_ref);
            assert!(e < 1e-5, "{what}: output error {e:e}");
            for (name, (a, b)) in ["q", "k", "v"].iter().zip(g.iter().zip(&g_ref)) {
                let e = max_rel(a, b);
                assert!(e < 1e-5, "{what}: d{name} error {e:e}");
            }
        }
    }
}

/// Every parameter's gradient, in visiting order.
fn param_grads(model: &LanguageModel, grads: &GradientsParams) -> Vec<Vec<f32>> {
    struct Collect<'a> {
        grads: &'a GradientsParams,
        out: Vec<Vec<f32>>,
    }
    impl ModuleVisitor for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let g = self
                .grads
                .get::<D>(param.id)
                .expect("every parameter has a gradient");
            self.out.push(values(g));
        }
    }
    let mut c = Collect { grads, out: vec![] };
    model.visit(&mut c);
    c.out
}

fn lm_recipe(mixers: &[MixerKind], variant: bool) -> Recipe {
    let mut recipe = tiny_lm(mixers, 16, variant);
    recipe.model.linear.chunk_size = 4;
    if variant {
        // Beyond tiny_lm's structural options: the chunked scan and a centred (non-causal)
        // pooling window.
        recipe.model.ssm.scan = ScanForm::Chunked;
        recipe.model.ssm.chunk_size = 3;
        recipe.model.pool.causal = false;
    }
    recipe
}

#[test]
fn sharded_language_model_matches_one_device_for_every_mixer() {
    let dev = device();
    let mixer_lists = [
        vec![MixerKind::Softmax, MixerKind::Softmax],
        vec![MixerKind::Linear, MixerKind::Linear],
        vec![MixerKind::Ssm, MixerKind::Ssm],
        vec![MixerKind::Pool, MixerKind::Pool],
        vec![MixerKind::Moh, MixerKind::Moh],
        vec![MixerKind::Ssm, MixerKind::Softmax],
    ];
    let ids = |salt: i64| {
        let v: Vec<i64> = (0..2 * 16).map(|i| (i * 7 + salt) % 11).collect();
        Tensor::<2, Int>::from_data(TensorData::new(v, [2, 16]), &dev)
    };
    for mixers in mixer_lists {
        for variant in [false, true] {
            let recipe = lm_recipe(&mixers, variant);
            let model = model_config(&recipe, 11).init_seeded(5, &dev);
            let single = model.training_loss(ids(0), ids(3));
            let loss_ref = single.total.clone().into_scalar::<f32>();
            let g_ref = param_grads(
                &model,
                &GradientsParams::from_grads(single.total.backward(), &model),
            );
            for (ranks, sharding) in LAYOUTS {
                let transport = LocalDevices::logical(ranks, &dev);
                let sp = SequenceParallel {
                    layout: SequenceLayout::new(ranks, 16, sharding),
                    transport: &transport,
                };
                let replicas = replicate(&model, &transport);
                let loss = LanguageModel::training_loss_sharded(&replicas, ids(0), ids(3), &sp);
                let value = loss.total.clone().into_scalar::<f32>();
                let g = param_grads(
                    &model,
                    &GradientsParams::from_grads(loss.total.backward(), &model),
                );
                let what = format!("{mixers:?} variant={variant}, {ranks} ranks {sharding:?}");
                let e = (value - loss_ref).abs() / loss_ref.abs();
                assert!(e < 1e-5, "{what}: loss {value} vs {loss_ref}");
                assert_eq!(g.len(), g_ref.len());
                for (i, (a, b)) in g.iter().zip(&g_ref).enumerate() {
                    let e = max_rel(a, b);
                    assert!(e < 1e-5, "{what}: gradient of parameter {i}: error {e:e}");
                }
            }
        }
    }
}
