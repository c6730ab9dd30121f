//! FlashAttention (Dao et al.) as a Burn backend extension: the tiled forward of
//! [`attend_tiled`](super::softmax_attention::attend_tiled), plus a backward pass that
//! recomputes each block's probabilities from the saved row log-sum-exp instead of keeping
//! them. Training memory then grows linearly in sequence length; Burn's autodiff, left to
//! itself, keeps every block of scores for the backward pass.
//!
//! Written with backend primitive ops so any backend can run it; it is registered for flex
//! (and its autodiff), the CPU backend. Other backends use the tensor-op tiled form.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, Slice, TensorMetadata, backend_extension};
use burn::tensor::TensorData;

#[backend_extension(Flex, Autodiff)]
pub trait FlashAttentionBackend: Backend {
    /// Causal attention of q, k `[b, h, t, dk]` and v `[b, h, t, dv]` in `block`-sized
    /// tiles; `window` > 0 limits each query to its last `window` keys.
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        block: usize,
        window: usize,
    ) -> FloatTensor<Self>;
}

impl FlashAttentionBackend for Flex {
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        block: usize,
        window: usize,
    ) -> FloatTensor<Self> {
        forward::<Flex>(q, k, v, block, window).0
    }
}

/// What the backward pass keeps: the inputs, the output and each row's log-sum-exp.
#[derive(Clone, Debug)]
struct Saved<B: Backend> {
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
    block: usize,
    window: usize,
}

#[derive(Debug)]
struct FlashBackward;

impl<B: Backend> Backward<B, 3> for FlashBackward {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let grad_out = grads.consume::<B>(&ops.node);
        let (dq, dk, dv) = backward::<B>(ops.state, grad_out);
        for (node, grad) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: Backend + FlashAttentionBackend, C: CheckpointStrategy> FlashAttentionBackend
    for Autodiff<B, C>
{
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        block: usize,
        window: usize,
    ) -> FloatTensor<Self> {
        match FlashBackward
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
                let (out, lse) = forward::<B>(q.clone(), k.clone(), v.clone(), block, window);
                let saved = Saved {
                    q,
                    k,
                    v,
                    out: out.clone(),
                    lse,
                    block,
                    window,
                };
                prep.finish(saved, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(
                forward::<B>(
                    q.into_primitive(),
                    k.into_primitive(),
                    v.into_primitive(),
                    block,
                    window,
                )
                .0,
            ),
        }
    }
}

fn range(a: usize, b: usize) -> Slice {
    Slice::new(a as isize, Some(b as isize), 1)
}

/// Rows `a..b` of dim 2 of a `[b, h, t, d]` tensor.
fn rows<B: Backend>(x: &FloatTensor<B>, a: usize, b: usize) -> FloatTensor<B> {
    let s = x.shape();
    B::float_slice(
        x.clone(),
        &[range(0, s[0]), range(0, s[1]), range(a, b), range(0, s[3])],
    )
}

/// The key blocks query block `[q0, q1)` sees, the diagonal block first: every query sees
/// itself, so the running max is finite after the first block and masked scores (−inf)
/// simply get weight 0.
fn visible_key_blocks(q0: usize, q1: usize, block: usize, window: usize) -> Vec<(usize, usize)> {
    let first = if window > 0 {
        (q0 + 1).saturating_sub(window)
    } else {
        0
    };
    let mut blocks: Vec<(usize, usize)> = (first / block * block..q1)
        .step_by(block)
        .map(|k0| (k0, (k0 + block).min(q1)))
        .collect();
    blocks.rotate_right(1); // the last block holds the diagonal
    blocks
}

/// 0 where key `k0 + j` is visible to query `q0 + i`, −inf where it is not; `None` when the
/// whole block is visible. `[1, 1, q1 − q0, k1 − k0]`.
fn bias<B: Backend>(
    (q0, q1): (usize, usize),
    (k0, k1): (usize, usize),
    window: usize,
    device: &<FloatTensor<B> as TensorMetadata>::Device,
) -> Option<FloatTensor<B>> {
    let hidden = |i: usize, j: usize| j > i || (window > 0 && j + window <= i);
    // The newest key past the first query, or the oldest key out of the last query's window.
    let any_hidden = hidden(q0, k1 - 1) || hidden(q1 - 1, k0);
    any_hidden.then(|| {
        let values: Vec<f32> = (q0..q1)
            .flat_map(|i| (k0..k1).map(move |j| if hidden(i, j) { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        B::float_from_data(TensorData::new(values, [1, 1, q1 - q0, k1 - k0]), device)
    })
}

/// Scores of a block pair: `q_blk · k_blkᵀ / √dk` plus the visibility bias.
fn scores<B: Backend>(
    q_blk: FloatTensor<B>,
    k_blk: FloatTensor<B>,
    bias: &Option<FloatTensor<B>>,
    scale: f64,
) -> FloatTensor<B> {
    let s = B::float_mul_scalar(
        B::float_matmul(q_blk, B::float_swap_dims(k_blk, 2, 3)),
        scale.into(),
    );
    match bias {
        Some(b) => B::float_add(s, b.clone()),
        None => s,
    }
}

/// Output `[b, h, t, dv]` and row log-sum-exp `[b, h, t, 1]`.
fn forward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    block: usize,
    window: usize,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let t = q.shape()[2];
    let dk = q.shape()[3];
    let scale = 1.0 / (dk as f64).sqrt();
    let device = q.device();
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for q0 in (0..t).step_by(block) {
        let q1 = (q0 + block).min(t);
        let q_blk = rows::<B>(&q, q0, q1);
        let mut state: Option<(FloatTensor<B>, FloatTensor<B>, FloatTensor<B>)> = None; // m, l, acc
        for (k0, k1) in visible_key_blocks(q0, q1, block, window) {
            let b = bias::<B>((q0, q1), (k0, k1), window, &device);
            let s = scores::<B>(q_blk.clone(), rows::<B>(&k, k0, k1), &b, scale);
            let v_blk = rows::<B>(&v, k0, k1);
            let blk_max = B::float_max_dim(s.clone(), 3);
            state = Some(match state {
                None => {
                    let p = B::float_exp(B::float_sub(s, blk_max.clone()));
                    (
                        blk_max,
                        B::float_sum_dim(p.clone(), 3),
                        B::float_matmul(p, v_blk),
                    )
                }
                Some((m, l, acc)) => {
                    let m_new = B::float_max_dim(B::float_cat(vec![m.clone(), blk_max], 3), 3);
                    let p = B::float_exp(B::float_sub(s, m_new.clone()));
                    let c = B::float_exp(B::float_sub(m, m_new.clone()));
                    let l =
                        B::float_add(B::float_mul(l, c.clone()), B::float_sum_dim(p.clone(), 3));
                    let acc = B::float_add(B::float_mul(acc, c), B::float_matmul(p, v_blk));
                    (m_new, l, acc)
                }
            });
        }
        let (m, l, acc) = state.expect("every query block sees its diagonal block");
        outs.push(B::float_div(acc, l.clone()));
        lses.push(B::float_add(m, B::float_log(l)));
    }
    (B::float_cat(outs, 2), B::float_cat(lses, 2))
}

/// FlashAttention-2's backward: per block pair, recompute `P = exp(S − lse)`, then
/// `dV += Pᵀ dO`, `dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O))`, `dQ += dS K / √dk`, `dK += dSᵀ Q / √dk`.
fn backward<B: Backend>(
    saved: Saved<B>,
    grad_out: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let Saved {
        q,
        k,
        v,
        out,
        lse,
        block,
        window,
    } = saved;
    let t = q.shape()[2];
    let dk = q.shape()[3];
    let scale = 1.0 / (dk as f64).sqrt();
    let device = q.device();
    let delta = B::float_sum_dim(B::float_mul(grad_out.clone(), out), 3); // [b, h, t, 1]
    let n_blocks = t.div_ceil(block);
    let mut dq: Vec<Option<FloatTensor<B>>> = vec![None; n_blocks];
    let mut dkv: Vec<Option<(FloatTensor<B>, FloatTensor<B>)>> = vec![None; n_blocks];
    for (qi, q0) in (0..t).step_by(block).enumerate() {
        let q1 = (q0 + block).min(t);
        let q_blk = rows::<B>(&q, q0, q1);
        let do_blk = rows::<B>(&grad_out, q0, q1);
        let lse_blk = rows::<B>(&lse, q0, q1);
        let delta_blk = rows::<B>(&delta, q0, q1);
        for (k0, k1) in visible_key_blocks(q0, q1, block, window) {
            let b = bias::<B>((q0, q1), (k0, k1), window, &device);
            let k_blk = rows::<B>(&k, k0, k1);
            let v_blk = rows::<B>(&v, k0, k1);
            let s = scores::<B>(q_blk.clone(), k_blk.clone(), &b, scale);
            let p = B::float_exp(B::float_sub(s, lse_blk.clone()));
            let dv_part = B::float_matmul(B::float_swap_dims(p.clone(), 2, 3), do_blk.clone());
            let dp = B::float_matmul(do_blk.clone(), B::float_swap_dims(v_blk, 2, 3));
            let ds = B::float_mul_scalar(
                B::float_mul(p, B::float_sub(dp, delta_blk.clone())),
                scale.into(),
            );
            let dq_part = B::float_matmul(ds.clone(), k_blk);
            let dk_part = B::float_matmul(B::float_swap_dims(ds, 2, 3), q_blk.clone());
            dq[qi] = Some(match dq[qi].take() {
                Some(acc) => B::float_add(acc, dq_part),
                None => dq_part,
            });
            let kj = k0 / block;
            dkv[kj] = Some(match dkv[kj].take() {
                Some((dk_acc, dv_acc)) => {
                    (B::float_add(dk_acc, dk_part), B::float_add(dv_acc, dv_part))
                }
                None => (dk_part, dv_part),
            });
        }
    }
    let dq = B::float_cat(
        dq.into_iter()
            .map(|x| x.expect("every query block is visited"))
            .collect(),
        2,
    );
    let (dks, dvs): (Vec<_>, Vec<_>) = dkv
        .into_iter()
        .map(|x| x.expect("every key block is seen by its own query block"))
        .unzip();
    (dq, B::float_cat(dks, 2), B::float_cat(dvs, 2))
}
