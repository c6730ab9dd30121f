//! Sequence parallelism computes exactly what one device computes: ring attention against
//! plain attention, and the whole language model — loss and every parameter gradient — for
//! every mixer, N = 1, 2, 4 ranks, zigzag and contiguous sharding.

mod common;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::Distribution;
use common::{assert_close, tiny_lm, values};
use metamix::attention::{Visibility, naive, repeat_kv};
use metamix::mixers::pool::{Pool, PoolOptions};
use metamix::mixers::{MixerKind, ShardedForm, TokenMixer};
use metamix::model::LanguageModel;
use metamix::model::language_model::Targets;
use metamix::parallel::ring_attention::ring_attention;
use metamix::parallel::{LocalDevices, SequenceLayout, SequenceParallel, Sharding, replicate};
use metamix::run::model_config;

fn device() -> Device {
    Device::flex().autodiff()
}

/// Per element: the sharded forms only reorder f32 sums.
const RTOL: f32 = 1e-4;
const ATOL: f32 = 1e-5;

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
    naive::attend(q, k, v, (0, 0), vis, None).0
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
        // tile 0: the naive block form; 3: FlashAttention blocks (flex), ragged tiles.
        for ((ranks, sharding), tile) in LAYOUTS.into_iter().flat_map(|l| [(l, 0), (l, 3)]) {
            let transport = LocalDevices::logical(ranks, &dev);
            let sp = SequenceParallel {
                layout: SequenceLayout::new(ranks, 16, sharding),
                transport: &transport,
            };
            let (out, g) = run(&|| {
                let shard = |x: &Tensor<4>| sp.layout.shard(x.clone(), 2, sp.transport);
                let outs = ring_attention(shard(&q), shard(&k), shard(&v), vis, tile, &sp);
                sp.layout.unshard(outs, 2, &dev)
            });
            let what = format!("{vis:?}, {ranks} ranks {sharding:?}, tile {tile}");
            assert_close(&out, &out_ref, RTOL, ATOL, &format!("{what}: output"));
            for (name, (a, b)) in ["q", "k", "v"].iter().zip(g.iter().zip(&g_ref)) {
                assert_close(a, b, RTOL, ATOL, &format!("{what}: d{name}"));
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

#[test]
fn sharded_language_model_matches_one_device_for_every_mixer() {
    let dev = device();
    // Every registered mixer that runs sharded, and a hybrid.
    let mut mixer_lists: Vec<Vec<MixerKind>> = MixerKind::ALL
        .iter()
        .filter(|k| k.sharded_form() != ShardedForm::Unsupported)
        .map(|&k| vec![k, k])
        .collect();
    mixer_lists.push(vec![MixerKind::Ssm, MixerKind::Softmax]);
    assert!(mixer_lists.len() > MixerKind::ALL.len() / 2);
    let ids = |salt: i64| {
        let v: Vec<i64> = (0..2 * 16).map(|i| (i * 7 + salt) % 11).collect();
        Tensor::<2, Int>::from_data(TensorData::new(v, [2, 16]), &dev)
    };
    for mixers in mixer_lists {
        for variant in [false, true] {
            let recipe = tiny_lm(&mixers, 16, variant);
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
                let loss = LanguageModel::objective_sharded(
                    &replicas,
                    ids(0),
                    &Targets::Next(ids(3)),
                    None,
                    &sp,
                );
                let value = loss.total.clone().into_scalar::<f32>();
                let g = param_grads(
                    &model,
                    &GradientsParams::from_grads(loss.total.backward(), &model),
                );
                let what = format!("{mixers:?} variant={variant}, {ranks} ranks {sharding:?}");
                assert_close(&[value], &[loss_ref], RTOL, 0.0, &format!("{what}: loss"));
                assert_eq!(g.len(), g_ref.len());
                for (i, (a, b)) in g.iter().zip(&g_ref).enumerate() {
                    assert_close(
                        a,
                        b,
                        RTOL,
                        ATOL,
                        &format!("{what}: gradient of parameter {i}"),
                    );
                }
            }
        }
    }
}

/// The centred pooling window (PoolFormer's, for bidirectional models) borrows positions
/// from both neighbouring chunks: the halo exchange equals the whole-sequence pooling.
#[test]
fn centred_pool_halo_exchange_equals_whole_sequence() {
    let dev = device();
    for pool_size in [1, 2, 3, 5] {
        let pool = Pool::new(
            &PoolOptions {
                pool_size,
                causal: None,
            },
            false,
        );
        let x = Tensor::<3>::random([2, 16, 3], Distribution::Normal(0.0, 1.0), &dev);
        let expected = values(pool.forward(x.clone()));
        for (ranks, sharding) in LAYOUTS {
            let transport = LocalDevices::logical(ranks, &dev);
            let sp = SequenceParallel {
                layout: SequenceLayout::new(ranks, 16, sharding),
                transport: &transport,
            };
            if pool_size > sp.layout.chunk_len() + 1 {
                continue;
            }
            let shards = sp.layout.shard(x.clone(), 1, sp.transport);
            let pools: Vec<&Pool> = vec![&pool; ranks];
            let (ys, _) = Pool::forward_sharded(&pools, shards, &sp);
            let y = values(sp.layout.unshard(ys, 1, &dev));
            let what = format!("pool {pool_size}, {ranks} ranks {sharding:?}");
            assert_close(&y, &expected, RTOL, ATOL, &what);
        }
    }
}
