//! `bench`: steady-state training throughput of a recipe's model, without checkpoints or
//! eval: a few warm-up steps, then timed steps. Speed lives here, never in tests.

use std::time::{Duration, Instant};

use super::{Ranks, RunData, Trainer};
use crate::recipe::Recipe;

#[derive(Debug, Clone)]
pub struct BenchResult {
    pub parameters: usize,
    pub steps: usize,
    pub tokens_per_step: usize,
    pub seconds_per_step: f64,
    pub tokens_per_s: f64,
    /// Peak bytes each rank's device held (its memory pools' high-water mark), where the
    /// backend reports it (wgpu; not flex or libtorch). Logical ranks sharing a device
    /// report the same, shared pool.
    pub rank_peak_bytes: Vec<Option<u64>>,
    /// The process's CPU time over the timed steps per second of them (every thread, user
    /// and system: 2.0 = two cores busy throughout), where the platform reports it.
    pub cpu_cores: Option<f64>,
    /// Of that, the CPU backend's pool threads spinning with nothing to run
    /// ([`crate::device::time_waiting_for_work`]): busy to the OS, idle to the step.
    pub waiting_cores: f64,
}

/// Where the timed steps start: the process's CPU time and the pool threads' waits.
struct Span {
    cpu: Option<Duration>,
    waited: Duration,
}

impl Span {
    fn start() -> Self {
        Self {
            cpu: process_cpu_time(),
            waited: crate::device::time_waiting_for_work(),
        }
    }

    /// (CPU cores, waiting cores) from the start to now, over the steps' `seconds`.
    fn cores(&self, seconds: f64) -> (Option<f64>, f64) {
        let cpu = process_cpu_time()
            .zip(self.cpu)
            .map(|(now, then)| (now - then).as_secs_f64() / seconds);
        let waited = crate::device::time_waiting_for_work() - self.waited;
        (cpu, waited.as_secs_f64() / seconds)
    }
}

/// The CPU time of the whole process so far, every thread, user and system (what Python's
/// `time.process_time` reads, so `scripts/pytorch_bench.py` measures PyTorch alike).
fn process_cpu_time() -> Option<Duration> {
    #[cfg(unix)]
    {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime only writes the timespec it is handed.
        let ok = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) } == 0;
        ok.then(|| Duration::new(t.tv_sec as u64, t.tv_nsec as u32))
    }
    #[cfg(not(unix))]
    {
        None
    }
}

pub fn bench(recipe: &Recipe, warmup: usize, steps: usize) -> anyhow::Result<BenchResult> {
    use burn::module::Module;
    anyhow::ensure!(steps > 0, "bench --steps 0: time at least one step");
    let t = &recipe.training;
    // A text file is prepared in memory: a bench leaves no run folder behind.
    let data = RunData::open(recipe, None, true)?;
    let mut trainer = match &data {
        RunData::Text(d) => Trainer::new(recipe, d.tokenizer.vocab_size())?,
        RunData::Task(d) => Trainer::with_classes(recipe, d.vocab_size(), d.num_classes())?,
    };
    let parameters = trainer.model().num_params();
    let mut timed = 0.0;
    let mut span = None;
    for i in 0..warmup + steps {
        if i == warmup {
            span = Some(Span::start());
        }
        let start = Instant::now();
        let out = match &data {
            RunData::Text(d) => trainer.step(&d.train),
            RunData::Task(d) => trainer.step_task(d),
        };
        anyhow::ensure!(
            out.finite() || out.skipped,
            "bench step {i}: non-finite loss {}",
            out.loss
        );
        if i >= warmup {
            timed += start.elapsed().as_secs_f64();
        }
    }
    let (cpu_cores, waiting_cores) = span.expect("steps > 0").cores(timed);
    let tokens_per_step = t.batch_size * recipe.seq_len();
    let ranks = &trainer.ranks;
    let rank_peak_bytes = (0..ranks.len())
        .map(|r| {
            ranks
                .device(r)
                .memory_pool_report()
                .map(|pools| pools.iter().map(|p| p.page_size * p.pages_peak).sum())
        })
        .collect();
    Ok(BenchResult {
        parameters,
        steps,
        tokens_per_step,
        seconds_per_step: timed / steps as f64,
        tokens_per_s: (tokens_per_step * steps) as f64 / timed,
        rank_peak_bytes,
        cpu_cores,
        waiting_cores,
    })
}

/// Forward + backward time of one mixer alone on a `[batch, seq_len, d_model]` input, the
/// mixer built as `recipe` builds layer 0's.
#[derive(Debug, Clone)]
pub struct MixerBenchResult {
    pub seconds_per_iter: f64,
}

/// With `forward_only`, no autodiff: what inference costs.
pub fn bench_mixer(
    recipe: &Recipe,
    batch: usize,
    seq_len: usize,
    warmup: usize,
    iters: usize,
    forward_only: bool,
) -> anyhow::Result<MixerBenchResult> {
    use burn::prelude::*;
    use burn::tensor::Distribution;
    let plain = Ranks::from_recipe(recipe)?.device(0).clone();
    let _busy = crate::device::BusyPool::for_devices([&plain]);
    let device = if forward_only {
        plain
    } else {
        plain.autodiff()
    };
    let kind = recipe.layer_mixers()[0];
    let m = &recipe.model;
    let mixer = kind.init(&m.mixer_options, &m.mixer_context(seq_len), &device);
    let d = recipe.model.d_model;
    // Every input drawn before the first is timed, so that a profile of the loop is the
    // mixer's alone (drawing is serial, and a pool thread spins through it).
    let inputs: Vec<Tensor<3>> = (0..warmup + iters)
        .map(|_| Tensor::random([batch, seq_len, d], Distribution::Normal(0.0, 1.0), &device))
        .collect();
    let mut timed = 0.0;
    for (i, x) in inputs.into_iter().enumerate() {
        let start = Instant::now();
        // Read a number back so the work is done, not just queued.
        let check = if forward_only {
            mixer.forward(x).sum().into_scalar::<f32>()
        } else {
            let x = x.require_grad();
            let grads = mixer.forward(x.clone()).sum().backward();
            x.grad(&grads)
                .expect("input gradient")
                .sum()
                .into_scalar::<f32>()
        };
        anyhow::ensure!(check.is_finite(), "{}: non-finite result", kind.name());
        if i >= warmup {
            timed += start.elapsed().as_secs_f64();
        }
    }
    Ok(MixerBenchResult {
        seconds_per_iter: timed / iters as f64,
    })
}
