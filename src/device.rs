//! Backends, devices and precisions as a recipe names them (`training.backend`,
//! `training.device`, `parallelism.devices`, `training.precision`), the Burn devices they
//! open, and whether a device can compute in a precision.

use anyhow::bail;
use burn::prelude::Device;
use burn::tensor::FloatDType;

use serde::{Deserialize, Serialize};
use std::mem::MaybeUninit;

/// One plain device per rank from `specs` on `backend`, each checked to support
/// `precision`.
pub fn open_ranks(
    backend: BackendKind,
    specs: &[DeviceSpec],
    precision: Precision,
) -> anyhow::Result<Vec<Device>> {
    // Each distinct device is opened (and checked) once: ranks sharing a remote server
    // share its one connection.
    let mut opened: Vec<(DeviceSpec, Device)> = Vec::new();
    let mut devices = Vec::with_capacity(specs.len());
    for spec in specs {
        if let Some((_, device)) = opened.iter().find(|(s, _)| s == spec) {
            devices.push(device.clone());
            continue;
        }
        let device = on(backend, spec)?;
        check_precision(&device, backend, spec, precision)?;
        opened.push((spec.clone(), device.clone()));
        devices.push(device);
    }
    Ok(devices)
}

/// The device `spec` names on `backend`.
pub fn on(backend: BackendKind, spec: &DeviceSpec) -> anyhow::Result<Device> {
    if let DeviceSpec::Remote(url) = spec {
        return remote(url);
    }
    match backend {
        BackendKind::Cpu => match spec {
            DeviceSpec::Default | DeviceSpec::Cpu => Ok(Device::flex()),
            DeviceSpec::Gpu(k) => {
                bail!("training.device = {k}: the cpu backend has one device; use \"default\"")
            }
            DeviceSpec::Remote(_) => unreachable!("handled above"),
        },
        BackendKind::Wgpu => wgpu(spec),
        BackendKind::Libtorch => libtorch(spec),
    }
}

/// A flex tensor's values as f32: borrowed when it is contiguous f32 (no copy, even when
/// autodiff also holds it), converted otherwise. For backend extensions on flex.
pub fn flex_f32(t: &burn::backend::flex::FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(values) => std::borrow::Cow::Borrowed(values),
        None => std::borrow::Cow::Owned(
            t.clone()
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("converted to f32"),
        ),
    }
}

/// Runs `f` on one of the CPU backend's own threads (rayon's global pool).
///
/// Every flex op and gemm call splits its work with rayon, and a training step is hundreds
/// of ops of tens of microseconds each. Called from a thread outside the pool, each op
/// hands its pieces to the pool and sleeps until they are done, and one core idles while
/// the caller waits; on a pool thread the caller does its share of each op itself
/// (1.1–1.3× tokens/s). [`BusyPool`] then keeps the other threads from sleeping between ops.
///
/// The pool gets at least two threads, so that work another thread hands to the pool while
/// this one waits still runs.
pub fn on_compute_threads<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Fails only if the pool already exists, which is as good.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(cores.max(2))
            .build_global();
    }
    rayon::scope(|_| f())
}

/// While it lives, rayon's other threads spin for work instead of sleeping, as OpenMP's do
/// under PyTorch (`KMP_BLOCKTIME`, `GOMP_SPINCOUNT`).
///
/// Between ops, rayon's idle threads go to sleep within microseconds, and each op wakes them
/// again through the kernel: about 10% of a default-model step in the scheduler, and a
/// thread that joins late (+25% tokens/s without it). A spinning thread uses its core fully,
/// so this is for the cpu backend's work only ([`Self::for_devices`]): on other backends their
/// own threads, or the GPU, do the work. A thread naps in 1 ms steps after [`SPIN_FOR`] without work.
pub struct BusyPool(Option<std::sync::Arc<std::sync::atomic::AtomicBool>>);

impl BusyPool {
    /// Starts the spinning, when called on a pool thread (see [`on_compute_threads`]) of a
    /// pool with other threads; otherwise does nothing.
    pub fn start() -> Self {
        let Some(caller) = rayon::current_thread_index() else {
            return Self(None);
        };
        if rayon::current_num_threads() < 2 {
            return Self(None);
        }
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spinning = done.clone();
        rayon::spawn_broadcast(move |ctx| {
            // The caller's own copy would spin where its work should run.
            if ctx.index() != caller {
                take_work_until(&spinning);
            }
        });
        Self(Some(done))
    }

    /// [`Self::start`] when every one of `devices` is flex; otherwise nothing spins.
    pub fn for_devices<'a>(devices: impl IntoIterator<Item = &'a Device>) -> Self {
        if devices.into_iter().all(is_flex) {
            Self::start()
        } else {
            Self(None)
        }
    }

    /// Whether threads are spinning for this guard.
    pub fn is_spinning(&self) -> bool {
        self.0.is_some()
    }
}

impl Drop for BusyPool {
    fn drop(&mut self) {
        if let Some(done) = &self.0 {
            done.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// How long a pool thread spins without finding work before it naps.
const SPIN_FOR: std::time::Duration = std::time::Duration::from_millis(200);

/// Time the pool's threads have spent in [`take_work_until`] finding nothing to run, summed
/// over threads, in nanoseconds: the waits between and inside a step's ops, which the
/// process's CPU time counts as busy since the threads spin through them. `bench` reports
/// it beside CPU utilisation.
static WAITED_NANOS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Pool threads' time spent waiting for work so far, summed over threads (see
/// [`BusyPool`]). Each wait is timed from its first empty poll to its last, so a few
/// hundred nanoseconds per wait go uncounted: a lower bound.
pub fn time_waiting_for_work() -> std::time::Duration {
    std::time::Duration::from_nanos(WAITED_NANOS.load(std::sync::atomic::Ordering::Relaxed))
}

/// Runs the pool's pending work on this pool thread as it appears, until `done`.
fn take_work_until(done: &std::sync::atomic::AtomicBool) {
    use std::time::Instant;
    let record = |from: Instant, to: Instant| {
        let nanos = (to - from).as_nanos() as u64;
        WAITED_NANOS.fetch_add(nanos, std::sync::atomic::Ordering::Relaxed);
    };
    let (mut idle_since, mut last_idle_poll) = (Instant::now(), Instant::now());
    let mut idle_polls = 0u32;
    while !done.load(std::sync::atomic::Ordering::Relaxed) {
        if let Some(rayon::Yield::Executed) = rayon::yield_now() {
            if idle_polls > 0 {
                record(idle_since, last_idle_poll);
            }
            idle_polls = 0;
            continue;
        }
        // Read the clock only after an empty poll: a thread with nothing to do pays for it.
        last_idle_poll = Instant::now();
        if idle_polls == 0 {
            idle_since = last_idle_poll;
        }
        idle_polls += 1;
        // A few pause hints between polls: each poll reads the other threads' queues, and
        // a sibling hyperthread may be the one doing the work.
        for _ in 0..8 {
            std::hint::spin_loop();
        }
        if idle_polls.is_multiple_of(1024) && last_idle_poll - idle_since > SPIN_FOR {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    if idle_polls > 0 {
        record(idle_since, last_idle_poll);
    }
}

/// Elements per parallel task of [`flex_map`].
const MAP_PIECE: usize = 16 * 1024;

/// `x`'s values in row-major order, to overwrite, when x is f32 and the only owner of a
/// buffer it fills from the start (a fresh product's output, a gradient): an element-wise
/// op can then write its result over its input instead of into a new buffer.
pub fn unshared_f32(x: &mut burn::backend::flex::FlexTensor) -> Option<&mut [f32]> {
    use burn::backend::TensorMetadata;
    let len = x.shape().num_elements();
    let whole = x.layout().contiguous_offsets() == Some((0, len));
    if !whole || x.dtype() != burn::tensor::DType::F32 {
        return None;
    }
    x.try_storage_mut::<f32>()
        .filter(|values| values.len() == len)
}

/// A raw pointer (or a value holding one) that a kernel's parallel tasks share: each task
/// writes its own part of the buffer behind it, or only reads it, and the buffer outlives
/// the tasks. Rust will not send raw pointers across threads without this promise.
#[derive(Clone, Copy)]
pub struct SendPtr<P: Copy>(pub P);

// SAFETY: the users' promise above: disjoint writes, reads of a live buffer.
unsafe impl<P: Copy> Send for SendPtr<P> {}
unsafe impl<P: Copy> Sync for SendPtr<P> {}

impl<P: Copy> SendPtr<P> {
    /// Through a method, so a closure captures the whole (Sync) wrapper, not its pointer.
    pub fn get(self) -> P {
        self.0
    }
}

/// Registers each input's gradient where autodiff tracks that input: the last step of every
/// backend extension's backward. `parents` are the op's parent nodes' ids, in the order of
/// `values` (`ops.parents.map(|p| p.map(|n| n.id))`: Burn does not export the node type).
pub fn register_gradients<B: burn::backend::Backend, const N: usize>(
    grads: &mut burn::backend::autodiff::grads::Gradients,
    parents: [Option<burn::backend::autodiff::NodeId>; N],
    values: [burn::backend::tensor::FloatTensor<B>; N],
) {
    for (id, value) in parents.into_iter().zip(values) {
        if let Some(id) = id {
            grads.register::<B>(id, value);
        }
    }
}

/// How many times a flex extension has run in this process: tests read it to see that a
/// form really took the extension's path, rather than only matching its output.
pub struct RunCount(std::sync::atomic::AtomicUsize);

impl RunCount {
    pub const fn new() -> Self {
        Self(std::sync::atomic::AtomicUsize::new(0))
    }

    pub fn record(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn get(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Default for RunCount {
    fn default() -> Self {
        Self::new()
    }
}

/// `x` with `f` applied to its f32 values (row-major): over x's own buffer where
/// [`unshared_f32`] allows, else over a copy, so a tensor something else holds is left alone.
pub fn overwrite_f32(
    mut x: burn::backend::flex::FlexTensor,
    f: impl FnOnce(&mut [f32]),
) -> burn::backend::flex::FlexTensor {
    use burn::backend::TensorMetadata;
    if let Some(values) = unshared_f32(&mut x) {
        f(values);
        return x;
    }
    let (shape, dtype) = (x.shape(), x.dtype());
    let mut values = flex_f32(&x).into_owned();
    f(&mut values);
    flex_from_f32(values, shape, dtype)
}

/// A piece of an output allocated without a fill (`Vec::with_capacity`, written through
/// `spare_capacity_mut`), zeroed and ready to write. The task that fills a piece zeroes it
/// in its own cache, in place of `vec![0.0; len]`'s serial pass over the whole output
/// before the tasks start (three 786 KB buffers in a default Mamba layer's gate backward,
/// while the other core waits).
pub fn zeroed(piece: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    piece.fill(MaybeUninit::new(0.0));
    // SAFETY: every element was initialised just above.
    unsafe { written(piece) }
}

/// A piece of an output as f32s, once a kernel has written every element of it (where
/// [`zeroed`]'s fill would be one more pass over memory).
///
/// # Safety
/// Every element of `piece` has been written.
pub unsafe fn written(piece: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: initialised, as the caller promises; MaybeUninit<f32> has f32's layout.
    unsafe { &mut *(piece as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// `f(x, other)` element by element over a flex tensor (and another of its shape, or 0s),
/// in parallel pieces: the body of the element-wise backend extensions. Without `other`,
/// in place where [`unshared_f32`] allows.
pub fn flex_map(
    x: burn::backend::flex::FlexTensor,
    other: Option<burn::backend::flex::FlexTensor>,
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> burn::backend::flex::FlexTensor {
    map_pieces(
        x,
        other,
        |values| map_piece_in_place(values, &f),
        |out, x, other| map_piece(out, x, other, &f),
    )
}

/// The plumbing of [`flex_map`] and its kin: `in_place` over the pieces of x's own values
/// where it owns them and there is no `other`, else `piece` writing each piece of a new
/// buffer from x's (and `other`'s) piece.
pub fn map_pieces(
    mut x: burn::backend::flex::FlexTensor,
    other: Option<burn::backend::flex::FlexTensor>,
    in_place: impl Fn(&mut [f32]) + Sync,
    piece: impl Fn(&mut [MaybeUninit<f32>], &[f32], Option<&[f32]>) + Sync,
) -> burn::backend::flex::FlexTensor {
    use burn::backend::TensorMetadata;
    use rayon::prelude::*;
    if other.is_none()
        && let Some(values) = unshared_f32(&mut x)
    {
        values.par_chunks_mut(MAP_PIECE).for_each(&in_place);
        return x;
    }
    let (shape, dtype) = (x.shape(), x.dtype());
    let x_values = flex_f32(&x);
    let other_values = other.as_ref().map(flex_f32);
    // Written in place of a zero fill: every element is written once below.
    let mut out = Vec::<f32>::with_capacity(x_values.len());
    out.spare_capacity_mut()
        .par_chunks_mut(MAP_PIECE)
        .zip(x_values.par_chunks(MAP_PIECE))
        .enumerate()
        .for_each(|(i, (out, x))| {
            let other = other_values
                .as_ref()
                .map(|o| &o[i * MAP_PIECE..i * MAP_PIECE + x.len()]);
            assert_eq!(out.len(), x.len(), "every output element is written");
            piece(out, x, other)
        });
    // SAFETY: each piece wrote its x.len() elements.
    unsafe { out.set_len(x_values.len()) };
    flex_from_f32(out, shape, dtype)
}

/// [`flex_map`]'s loop over one piece.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
fn map_piece(
    out: &mut [MaybeUninit<f32>],
    x: &[f32],
    other: Option<&[f32]>,
    f: &impl Fn(f32, f32) -> f32,
) {
    match other {
        Some(o) => {
            for ((y, &x), &o) in out.iter_mut().zip(x).zip(o) {
                y.write(f(x, o));
            }
        }
        None => {
            for (y, &x) in out.iter_mut().zip(x) {
                y.write(f(x, 0.0));
            }
        }
    }
}

/// [`flex_map`]'s loop over one piece of an unshared tensor (and the rounding of a
/// product's band, [`crate::matmul`]).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "x86_64+sse4.2",
    "aarch64+neon"
))]
pub(crate) fn map_piece_in_place(values: &mut [f32], f: &impl Fn(f32, f32) -> f32) {
    for v in values.iter_mut() {
        *v = f(*v, 0.0);
    }
}

/// A flex tensor of `values` with `shape`, stored as `dtype` (the inputs' dtype, which the
/// extensions computed in f32).
pub fn flex_from_f32(
    values: Vec<f32>,
    shape: impl Into<burn::tensor::Shape>,
    dtype: burn::tensor::DType,
) -> burn::backend::flex::FlexTensor {
    let shape: burn::tensor::Shape = shape.into();
    burn::backend::flex::FlexTensor::from_data(
        burn::tensor::TensorData::new(values, shape).convert_dtype(dtype),
    )
}

/// Whether `device` is libtorch (CPU or GPU), or its autodiff: where torch's own attention
/// and norm kernels are registered (`crate::torch_kernels`, with `--features tch`).
pub fn is_libtorch(device: &Device) -> bool {
    #[cfg(feature = "tch")]
    {
        let plain = device.clone().without_autodiff();
        matches!(
            plain.as_dispatch(),
            burn::backend::DispatchDevice::LibTorch(_)
        )
    }
    #[cfg(not(feature = "tch"))]
    {
        let _ = device;
        false
    }
}

/// Whether `device` is flex, the CPU backend, or its autodiff: where metamix's backend
/// extensions (FlashAttention, the scans) are registered.
pub fn is_flex(device: &Device) -> bool {
    let plain = if device.is_autodiff() {
        device.clone().without_autodiff()
    } else {
        device.clone()
    };
    plain == Device::flex()
}

/// The low-precision working dtype of `precision`, if any.
pub fn working_dtype(precision: Precision) -> Option<FloatDType> {
    match precision {
        Precision::F32 => None,
        Precision::Bf16 => Some(FloatDType::BF16),
        Precision::F16 => Some(FloatDType::F16),
    }
}

/// Fail at start, not mid-run, when the device cannot compute in the recipe's precision.
fn check_precision(
    device: &Device,
    backend: BackendKind,
    spec: &DeviceSpec,
    precision: Precision,
) -> anyhow::Result<()> {
    let Some(dtype) = working_dtype(precision) else {
        return Ok(());
    };
    if device.supports_dtype(dtype) {
        return Ok(());
    }
    let name = format!("{precision:?}").to_lowercase();
    let other = match precision {
        Precision::Bf16 if device.supports_dtype(FloatDType::F16) => {
            "precision = \"f16\" (with loss scaling) or \"f32\""
        }
        _ => "precision = \"f32\"",
    };
    bail!(
        "training.precision = \"{name}\": the {backend:?} device {spec} has no {name} arithmetic \
         (Vulkan adapters never do in Burn 0.22; Metal, CUDA and the cpu backend do); use {other}, \
         or another backend"
    )
}

#[cfg(feature = "wgpu")]
fn wgpu(spec: &DeviceSpec) -> anyhow::Result<Device> {
    use burn::tensor::DeviceKind;
    Ok(Device::wgpu(match spec {
        DeviceSpec::Default => DeviceKind::DefaultDevice,
        DeviceSpec::Cpu => DeviceKind::Cpu,
        DeviceSpec::Gpu(k) => DeviceKind::DiscreteGpu(*k),
        DeviceSpec::Remote(_) => unreachable!("remote devices are not wgpu's"),
    }))
}

#[cfg(not(feature = "wgpu"))]
fn wgpu(_spec: &DeviceSpec) -> anyhow::Result<Device> {
    bail!(
        "training.backend = \"wgpu\": this metamix was built without wgpu; rebuild with \
         `cargo build --release --features wgpu`, or use backend = \"cpu\""
    )
}

#[cfg(feature = "tch")]
#[allow(deprecated)] // burn-tch is deprecated upstream but still the libtorch route
fn libtorch(spec: &DeviceSpec) -> anyhow::Result<Device> {
    Ok(match spec {
        DeviceSpec::Default | DeviceSpec::Cpu => Device::libtorch(),
        DeviceSpec::Gpu(k) => Device::libtorch_cuda(*k),
        DeviceSpec::Remote(_) => unreachable!("remote devices are not libtorch's"),
    })
}

#[cfg(not(feature = "tch"))]
fn libtorch(_spec: &DeviceSpec) -> anyhow::Result<Device> {
    bail!(
        "training.backend = \"libtorch\": this metamix was built without libtorch; rebuild with \
         `cargo build --release --features tch` (see scripts/setup_libtorch.sh), or use backend = \"cpu\""
    )
}

/// The device a `metamix serve` process at `url` hosts.
#[cfg(feature = "remote")]
fn remote(url: &str) -> anyhow::Result<Device> {
    use anyhow::Context;
    Device::remote_options(&burn::remote::RemoteHost::websocket(url))
        .init()
        .map_err(|e| anyhow::anyhow!("{e:?}"))
        .with_context(|| format!("connecting to the metamix serve process at {url}"))
}

#[cfg(not(feature = "remote"))]
fn remote(url: &str) -> anyhow::Result<Device> {
    bail!(
        "device \"{url}\": this metamix was built without remote devices; rebuild with \
         `cargo build --release --features remote`"
    )
}

/// A device of the chosen backend: `"default"` (cpu: the CPU; wgpu: the default adapter;
/// libtorch: the CPU), `"cpu"` (the backend's CPU device: flex, wgpu's software adapter,
/// libtorch's CPU), an integer k, GPU k (CUDA device k; wgpu's k-th discrete GPU), or
/// `"ws://host:port"`, the device a `metamix serve` process hosts (built with `remote`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "DeviceName", into = "DeviceName")]
pub enum DeviceSpec {
    Default,
    Cpu,
    Gpu(usize),
    Remote(String),
}

/// How a device is written in a recipe.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DeviceName {
    Index(usize),
    Name(String),
}

impl TryFrom<DeviceName> for DeviceSpec {
    type Error = String;
    fn try_from(name: DeviceName) -> Result<Self, String> {
        match name {
            DeviceName::Index(k) => Ok(DeviceSpec::Gpu(k)),
            DeviceName::Name(s) => match s.as_str() {
                "default" => Ok(DeviceSpec::Default),
                "cpu" => Ok(DeviceSpec::Cpu),
                url if url.starts_with("ws://") => Ok(DeviceSpec::Remote(url.into())),
                other => Err(format!(
                    "unknown device \"{other}\": use \"default\", \"cpu\", a GPU index (0, 1, ...) \
                     or a metamix serve address \"ws://host:port\""
                )),
            },
        }
    }
}

impl From<DeviceSpec> for DeviceName {
    fn from(d: DeviceSpec) -> Self {
        match d {
            DeviceSpec::Default => DeviceName::Name("default".into()),
            DeviceSpec::Cpu => DeviceName::Name("cpu".into()),
            DeviceSpec::Gpu(k) => DeviceName::Index(k),
            DeviceSpec::Remote(url) => DeviceName::Name(url),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Default => write!(f, "\"default\""),
            DeviceSpec::Cpu => write!(f, "\"cpu\""),
            DeviceSpec::Gpu(k) => write!(f, "{k}"),
            DeviceSpec::Remote(url) => write!(f, "\"{url}\""),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// Burn's flex backend, pure Rust, always available.
    Cpu,
    Wgpu,
    Libtorch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    F32,
    Bf16,
    F16,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `f` runs on a pool thread, its parallel work completes while the other threads spin,
    /// and a panic in it comes back out (with the spinning threads released).
    #[test]
    fn compute_threads_run_work_and_return() {
        use rayon::prelude::*;
        let (on_pool, spinning, total) = on_compute_threads(|| {
            let busy = BusyPool::start();
            let total: u64 = (0..100_000u64).into_par_iter().map(|i| i % 7).sum();
            (
                rayon::current_thread_index().is_some(),
                busy.is_spinning(),
                total,
            )
        });
        assert!(on_pool, "f ran outside the pool");
        assert!(spinning, "the pool's other threads did not spin");
        assert_eq!(total, (0..100_000u64).map(|i| i % 7).sum::<u64>());
        assert!(!BusyPool::start().is_spinning(), "spinning off the pool");
        let panicked = std::panic::catch_unwind(|| {
            on_compute_threads(|| {
                let _busy = BusyPool::start();
                panic!("inside")
            })
        });
        assert!(panicked.is_err());
        // The pool still takes work after both.
        assert_eq!((0..1000u32).into_par_iter().sum::<u32>(), 499_500);
    }

    /// A pool thread that spins with nothing to run has its wait counted: what `bench`
    /// reports as cores waiting for work.
    #[test]
    fn spinning_without_work_is_counted_as_waiting() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let before = time_waiting_for_work();
        let start = std::time::Instant::now();
        pool.install(|| {
            let busy = BusyPool::start();
            assert!(busy.is_spinning());
            // The other thread has nothing to do meanwhile.
            std::thread::sleep(std::time::Duration::from_millis(50));
        });
        // The spinning thread records its wait as it stops, after the guard is dropped.
        let counted = loop {
            let counted = time_waiting_for_work() - before;
            if counted >= std::time::Duration::from_millis(10) || start.elapsed().as_secs() > 5 {
                break counted;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        assert!(
            counted >= std::time::Duration::from_millis(10),
            "50 ms without work counted as {counted:?} of waiting"
        );
    }
}
