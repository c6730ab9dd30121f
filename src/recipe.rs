//! The recipe: every option a run has, with its default, in one place.
//!
//! A recipe is a TOML file in sections, in the spirit of torchtitan's job config. Every
//! struct here denies unknown fields, so a typo fails before any work with the file, the
//! key path and what would be valid. `--set section.key=value` overrides any key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::mixers::MixerKind;
pub use crate::parallel::Sharding;

/// A whole recipe. Sections may be left out; every key has a default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Recipe {
    /// Run name: the run lives in `<checkpoint.folder>/<name>`. Default: the recipe's file stem.
    pub name: String,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub training: TrainingConfig,
    pub optimizer: OptimizerConfig,
    pub lr_scheduler: LrSchedulerConfig,
    pub checkpoint: CheckpointConfig,
    pub metrics: MetricsConfig,
    pub parallelism: ParallelismConfig,
}

/// `[model]`: the MetaFormer language model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Vocabulary size. 0 (the default) takes it from the data's tokenizer.
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// Hidden width of the channel MLP as a multiple of d_model.
    pub mlp_ratio: f64,
    pub activation: Activation,
    pub norm: NormKind,
    pub norm_eps: f64,
    /// Bias in the linear layers and norms (nanoGPT's `bias`).
    pub bias: bool,
    /// Initial value of MetaFormer's per-channel layer scale; absent = no layer scale.
    pub layer_scale_init: Option<f64>,
    pub dropout: f64,
    /// The token mixer of every layer...
    pub mixer: MixerKind,
    /// ...or one per layer (overrides `mixer`), so hybrids are one line.
    pub mixers: Option<Vec<MixerKind>>,
    /// Positional information added to the token embedding.
    pub position: PositionKind,
    /// Largest sequence a learned position table covers. 0 = `training.seq_len`.
    pub max_seq_len: usize,
    /// Share the token embedding with the LM head (nanoGPT, GPT-2).
    pub tie_embeddings: bool,
    /// Std of the normal initialisation of linear and embedding weights (GPT-2: 0.02).
    pub init_std: f64,
    /// Options of each mixer, used by the layers that pick it.
    pub softmax: SoftmaxOptions,
    pub linear: LinearAttentionOptions,
    pub ssm: SsmOptions,
    pub pool: PoolOptions,
    pub moh: MohOptions,
}

/// `[model.moh]`: mixture-of-head attention (uses `n_heads` heads in all).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MohOptions {
    /// Heads every token uses.
    pub shared_heads: usize,
    /// Routed heads each token picks (of n_heads − shared_heads).
    pub top_k: usize,
    /// Weight of the load-balance loss in the training loss.
    pub aux_loss_coef: f64,
}

impl Default for MohOptions {
    fn default() -> Self {
        Self {
            shared_heads: 2,
            top_k: 1,
            aux_loss_coef: 0.01,
        }
    }
}

/// `[model.softmax]`: causal softmax attention.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SoftmaxOptions {
    /// Compute attention tiled over key blocks with an online softmax (memory linear in
    /// sequence length) instead of materialising the full score matrix.
    pub tiled: bool,
    /// Key block size of the tiled form.
    pub block_size: usize,
    /// Key/value heads for grouped-query attention; 0 = n_heads (plain multi-head).
    pub n_kv_heads: usize,
    /// Rotary position embedding on queries and keys (pair with `model.position = "none"`).
    pub rotary: bool,
    pub rope_theta: f64,
    /// Sliding window: each query sees its last `window` keys, itself included; 0 = all.
    pub window: usize,
}

/// `[model.linear]`: kernelised linear attention.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinearAttentionOptions {
    pub feature_map: FeatureMap,
    /// Divide by φ(q)ᵀΣφ(k) (Katharopoulos et al.); off is RetNet/GLA style.
    pub normalize: bool,
    pub decay: DecayMode,
    /// Which form trains: `chunkwise` (fast), `recurrent` or `quadratic` (references).
    pub form: LinearForm,
    pub chunk_size: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureMap {
    /// elu(x) + 1 (Katharopoulos et al. 2020).
    EluPlusOne,
    Relu,
    Identity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecayMode {
    /// Plain cumulative sum: S_t = S_{t-1} + φ(k_t) v_tᵀ.
    None,
    /// RetNet's fixed per-head γ_h = 1 − 2^(−5−h).
    Retnet,
    /// A learned, data-dependent per-head gate, as in GLA: γ_t = sigmoid(w·x_t + b)^(1/16).
    Gated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinearForm {
    Chunkwise,
    Recurrent,
    Quadratic,
}

/// `[model.ssm]`: a Mamba (S6) block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SsmOptions {
    pub d_state: usize,
    pub d_conv: usize,
    /// d_inner = expand · d_model.
    pub expand: usize,
    /// Rank of Δ's projection; 0 = ⌈d_model / 16⌉.
    pub dt_rank: usize,
    pub dt_min: f64,
    pub dt_max: f64,
    /// Which scan trains: `sequential` (the faster on CPU) or `chunked` (parallel in chunks).
    pub scan: ScanForm,
    pub chunk_size: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScanForm {
    Chunked,
    Sequential,
}

/// `[model.pool]`: PoolFormer's pooling mixer, `avgpool(x) − x`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolOptions {
    pub pool_size: usize,
    /// Average a trailing window (language modelling) rather than a centred one.
    pub causal: bool,
}

impl Default for SoftmaxOptions {
    fn default() -> Self {
        Self {
            tiled: false,
            block_size: 64,
            n_kv_heads: 0,
            rotary: false,
            rope_theta: 10000.0,
            window: 0,
        }
    }
}

impl Default for LinearAttentionOptions {
    fn default() -> Self {
        Self {
            feature_map: FeatureMap::EluPlusOne,
            normalize: true,
            decay: DecayMode::None,
            form: LinearForm::Chunkwise,
            chunk_size: 16,
        }
    }
}

impl Default for SsmOptions {
    fn default() -> Self {
        Self {
            d_state: 16,
            d_conv: 4,
            expand: 2,
            dt_rank: 0,
            dt_min: 1e-3,
            dt_max: 0.1,
            scan: ScanForm::Sequential,
            chunk_size: 8,
        }
    }
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            pool_size: 3,
            causal: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Gelu,
    /// The tanh approximation GPT-2 used.
    GeluTanh,
    Relu,
    Silu,
    /// relu(x)², as in Primer and MetaFormer's StarReLU without its affine part.
    SquaredRelu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    LayerNorm,
    RmsNorm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PositionKind {
    /// A learned absolute position table (GPT-2, nanoGPT).
    Learned,
    /// No positional embedding: for mixers that are order-aware themselves (ssm, pool).
    None,
}

/// `[data]`: the corpus and how it is split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// A UTF-8 text file, relative to the working directory.
    pub path: PathBuf,
    pub tokenizer: TokenizerKind,
    /// Fraction of the text, taken from its end, held out for validation.
    pub val_fraction: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerKind {
    Char,
}

/// `[training]`: the loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingConfig {
    /// Fixes initialisation, data order, dropout and sampling.
    pub seed: u64,
    /// Sequences per optimizer step.
    pub batch_size: usize,
    /// Sequences per forward/backward; batch_size / micro_batch_size steps of gradient
    /// accumulation. 0 = batch_size (no accumulation).
    pub micro_batch_size: usize,
    pub seq_len: usize,
    /// Optimizer steps.
    pub steps: u64,
    /// Clip the global gradient norm to this; 0 disables.
    pub grad_clip: f64,
    /// Evaluate on the validation split every this many steps (and at the end); 0 = only at the end.
    pub eval_interval: u64,
    /// Batches averaged for each validation loss.
    pub eval_batches: usize,
    pub backend: BackendKind,
    /// Which of the backend's devices: `"default"`, `"cpu"` or a GPU index.
    pub device: DeviceSpec,
    /// `f32`, or mixed precision: `bf16` / `f16` working copies of f32 master weights.
    pub precision: Precision,
    /// Dynamic loss scaling, used with `precision = "f16"`.
    pub loss_scaler: LossScalerConfig,
}

/// `[training.loss_scaler]`: PyTorch `GradScaler`'s dynamic loss scaling for f16. The loss
/// is multiplied by `scale` before backward; a step whose gradients overflow is skipped and
/// the scale multiplied by `backoff_factor`; after `growth_interval` good steps in a row it
/// is multiplied by `growth_factor`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossScalerConfig {
    pub init_scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: u64,
}

impl Default for LossScalerConfig {
    fn default() -> Self {
        Self {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    Adamw,
}

/// `[lr_scheduler]`: linear warmup, then decay to `min_lr`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LrSchedulerConfig {
    pub warmup_steps: u64,
    pub decay: DecayKind,
    /// Step at which the decay reaches min_lr. 0 = training.steps.
    pub decay_steps: u64,
    pub min_lr: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecayKind {
    Cosine,
    Linear,
    Constant,
}

/// `[checkpoint]`: where and how often.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Runs live in `<folder>/<name>`.
    pub folder: PathBuf,
    /// Save every this many steps (and at the end); 0 = only at the end.
    pub interval: u64,
    /// Keep this many newest checkpoints; older ones are deleted.
    pub keep_latest_k: usize,
}

/// `[metrics]`: console and TensorBoard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Log training scalars every this many steps.
    pub log_interval: u64,
    pub tensorboard: bool,
}

/// `[parallelism]`: data and sequence parallelism. `data_parallel_degree ×
/// sequence_parallel_degree` ranks; rank `g · sequence_parallel_degree + s` holds shard s of
/// replica g's sequences.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelismConfig {
    /// Model replicas, each taking an equal slice of every micro-batch; gradients averaged.
    pub data_parallel_degree: usize,
    /// Ranks each sequence is split across (ring attention / state passing).
    pub sequence_parallel_degree: usize,
    /// `zigzag` (rank r holds chunks r and 2N−1−r: balanced causal work) or `contiguous`.
    pub sequence_sharding: Sharding,
    /// The device of each rank, written like `training.device`; empty = every rank on
    /// `training.device` (logical ranks: the same results, no extra hardware).
    pub devices: Vec<DeviceSpec>,
}

impl ParallelismConfig {
    pub fn ranks(&self) -> usize {
        self.data_parallel_degree * self.sequence_parallel_degree
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            vocab_size: 0,
            d_model: 128,
            n_layers: 4,
            n_heads: 4,
            mlp_ratio: 4.0,
            activation: Activation::Gelu,
            norm: NormKind::LayerNorm,
            norm_eps: 1e-5,
            bias: true,
            layer_scale_init: None,
            dropout: 0.0,
            mixer: MixerKind::Softmax,
            mixers: None,
            position: PositionKind::Learned,
            max_seq_len: 0,
            tie_embeddings: true,
            init_std: 0.02,
            softmax: SoftmaxOptions::default(),
            linear: LinearAttentionOptions::default(),
            ssm: SsmOptions::default(),
            pool: PoolOptions::default(),
            moh: MohOptions::default(),
        }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("data/shakespeare.txt"),
            tokenizer: TokenizerKind::Char,
            val_fraction: 0.1,
        }
    }
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            seed: 1337,
            batch_size: 12,
            micro_batch_size: 0,
            seq_len: 64,
            steps: 2000,
            grad_clip: 1.0,
            eval_interval: 250,
            eval_batches: 20,
            backend: BackendKind::Cpu,
            device: DeviceSpec::Default,
            precision: Precision::F32,
            loss_scaler: LossScalerConfig::default(),
        }
    }
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

impl Default for LrSchedulerConfig {
    fn default() -> Self {
        Self {
            warmup_steps: 100,
            decay: DecayKind::Cosine,
            decay_steps: 0,
            min_lr: 1e-4,
        }
    }
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            folder: PathBuf::from("runs"),
            interval: 500,
            keep_latest_k: 3,
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            log_interval: 10,
            tensorboard: true,
        }
    }
}

impl Default for ParallelismConfig {
    fn default() -> Self {
        Self {
            data_parallel_degree: 1,
            sequence_parallel_degree: 1,
            sequence_sharding: Sharding::Zigzag,
            devices: Vec::new(),
        }
    }
}

/// A recipe that cannot be used: which file, which key, what is wrong and what would do.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {message}")]
pub struct RecipeError {
    pub file: String,
    /// Dotted key path, e.g. `training.lr`; `(file)` or `(toml)` when no key applies.
    pub key: String,
    pub message: String,
}

impl Recipe {
    /// Read, override, type-check and validate a recipe file.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, RecipeError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| RecipeError {
            file: file.clone(),
            key: "(file)".into(),
            message: format!("cannot read the recipe: {e}"),
        })?;
        let default_name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "run".into());
        Self::from_toml_str(&text, &file, &default_name, overrides)
    }

    /// Parse recipe text; `file` names it in errors.
    pub fn from_toml_str(
        text: &str,
        file: &str,
        default_name: &str,
        overrides: &[String],
    ) -> Result<Self, RecipeError> {
        let err = |key: &str, message: String| RecipeError {
            file: file.to_string(),
            key: key.to_string(),
            message,
        };
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| err("(toml)", one_line(&e.to_string())))?;
        for ov in overrides {
            apply_override(&mut table, ov).map_err(|m| err(&format!("--set {ov}"), m))?;
        }
        let mut recipe: Recipe = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let key = e.path().to_string();
                err(
                    if key == "." { "(top level)" } else { &key },
                    one_line(&e.inner().to_string()),
                )
            })?;
        if recipe.name.is_empty() {
            recipe.name = default_name.to_string();
        }
        recipe
            .validate()
            .map_err(|(key, message)| err(&key, message))?;
        Ok(recipe)
    }

    /// The mixer of each layer.
    pub fn layer_mixers(&self) -> Vec<MixerKind> {
        match &self.model.mixers {
            Some(list) => list.clone(),
            None => vec![self.model.mixer; self.model.n_layers],
        }
    }

    /// Micro-batch size after defaulting.
    pub fn micro_batch_size(&self) -> usize {
        match self.training.micro_batch_size {
            0 => self.training.batch_size,
            m => m,
        }
    }

    /// Folder of this run.
    pub fn run_dir(&self) -> PathBuf {
        self.checkpoint.folder.join(&self.name)
    }

    /// The resolved recipe as TOML (what the run directory keeps).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a recipe always serialises")
    }

    /// Impossible values, as (key path, message naming what is valid).
    fn validate(&self) -> Result<(), (String, String)> {
        let m = &self.model;
        let t = &self.training;
        let o = &self.optimizer;
        let s = &self.lr_scheduler;
        let fail = |k: &str, msg: String| Err((k.to_string(), msg));

        if self.name.is_empty() || self.name.contains(['/', '\\']) || self.name.starts_with('.') {
            return fail(
                "name",
                format!(
                    "{:?} is not a usable run name: use letters, digits, '-' or '_'",
                    self.name
                ),
            );
        }
        if m.d_model == 0 {
            return fail("model.d_model", "must be at least 1".into());
        }
        if m.n_layers == 0 {
            return fail("model.n_layers", "must be at least 1".into());
        }
        if m.n_heads == 0 || !m.d_model.is_multiple_of(m.n_heads) {
            return fail(
                "model.n_heads",
                format!(
                    "{} heads do not divide d_model = {}: pick a divisor of {} (e.g. {})",
                    m.n_heads,
                    m.d_model,
                    m.d_model,
                    divisors(m.d_model)
                ),
            );
        }
        if !positive(m.mlp_ratio) || (m.mlp_ratio * m.d_model as f64).round() < 1.0 {
            return fail(
                "model.mlp_ratio",
                format!("must be > 0 (got {}); 4.0 is usual", m.mlp_ratio),
            );
        }
        if !positive(m.norm_eps) {
            return fail(
                "model.norm_eps",
                format!("must be > 0 (got {})", m.norm_eps),
            );
        }
        for (k, v) in [
            ("model.softmax.block_size", m.softmax.block_size),
            ("model.linear.chunk_size", m.linear.chunk_size),
            ("model.ssm.d_state", m.ssm.d_state),
            ("model.ssm.d_conv", m.ssm.d_conv),
            ("model.ssm.expand", m.ssm.expand),
            ("model.ssm.chunk_size", m.ssm.chunk_size),
            ("model.pool.pool_size", m.pool.pool_size),
        ] {
            if v == 0 {
                return fail(k, "must be at least 1".into());
            }
        }
        let kv = m.softmax.n_kv_heads;
        if kv != 0 && (kv > m.n_heads || !m.n_heads.is_multiple_of(kv)) {
            return fail(
                "model.softmax.n_kv_heads",
                format!(
                    "{kv} does not divide n_heads = {}: use a divisor of {} (e.g. {}), or 0 for one per head",
                    m.n_heads,
                    m.n_heads,
                    divisors(m.n_heads)
                ),
            );
        }
        if m.softmax.rotary && !(m.d_model / m.n_heads.max(1)).is_multiple_of(2) {
            return fail(
                "model.softmax.rotary",
                format!(
                    "needs an even head dimension; d_model / n_heads = {}",
                    m.d_model / m.n_heads.max(1)
                ),
            );
        }
        if !positive(m.softmax.rope_theta) {
            return fail(
                "model.softmax.rope_theta",
                "must be > 0 (10000 is usual)".into(),
            );
        }
        if !(positive(m.ssm.dt_min) && m.ssm.dt_min <= m.ssm.dt_max) {
            return fail(
                "model.ssm.dt_min",
                format!(
                    "must be in (0, dt_max = {}] (got {}); Mamba uses 1e-3",
                    m.ssm.dt_max, m.ssm.dt_min
                ),
            );
        }
        if !m.pool.causal && self.layer_mixers().contains(&MixerKind::Pool) {
            return fail(
                "model.pool.causal",
                "false (a centred window) sees future tokens, which a language model must not: use true".into(),
            );
        }
        if self.layer_mixers().contains(&MixerKind::Moh) {
            let routed = m.n_heads.saturating_sub(m.moh.shared_heads);
            if m.moh.shared_heads > m.n_heads {
                return fail(
                    "model.moh.shared_heads",
                    format!(
                        "{} is more than n_heads = {}",
                        m.moh.shared_heads, m.n_heads
                    ),
                );
            }
            if routed > 0 && !(1..=routed).contains(&m.moh.top_k) {
                return fail(
                    "model.moh.top_k",
                    format!(
                        "{} is not in 1..={routed} (the routed heads: n_heads {} − shared_heads {})",
                        m.moh.top_k, m.n_heads, m.moh.shared_heads
                    ),
                );
            }
            if !non_negative(m.moh.aux_loss_coef) {
                return fail("model.moh.aux_loss_coef", "must be >= 0".into());
            }
        }
        if !(0.0..1.0).contains(&m.dropout) {
            return fail(
                "model.dropout",
                format!("must be in [0, 1) (got {})", m.dropout),
            );
        }
        if let Some(ls) = m.layer_scale_init
            && !positive(ls)
        {
            return fail(
                "model.layer_scale_init",
                format!("must be > 0 (got {ls}); leave it out for no layer scale"),
            );
        }
        if !positive(m.init_std) {
            return fail(
                "model.init_std",
                format!("must be > 0 (got {})", m.init_std),
            );
        }
        if let Some(list) = &m.mixers
            && list.len() != m.n_layers
        {
            return fail(
                "model.mixers",
                format!(
                    "lists {} mixers for n_layers = {}: give exactly one per layer, or use `mixer` for all",
                    list.len(),
                    m.n_layers
                ),
            );
        }
        if m.max_seq_len != 0 && m.max_seq_len < t.seq_len {
            return fail(
                "model.max_seq_len",
                format!(
                    "{} is shorter than training.seq_len = {}: use 0 (= seq_len) or at least {}",
                    m.max_seq_len, t.seq_len, t.seq_len
                ),
            );
        }
        if !(self.data.val_fraction > 0.0 && self.data.val_fraction < 1.0) {
            return fail(
                "data.val_fraction",
                format!(
                    "must be in (0, 1) (got {}); 0.1 is usual",
                    self.data.val_fraction
                ),
            );
        }
        if t.batch_size == 0 {
            return fail("training.batch_size", "must be at least 1".into());
        }
        let micro = self.micro_batch_size();
        if micro > t.batch_size || !t.batch_size.is_multiple_of(micro) {
            return fail(
                "training.micro_batch_size",
                format!(
                    "{micro} does not divide batch_size = {}: use a divisor of {} (e.g. {}) or 0 for no accumulation",
                    t.batch_size,
                    t.batch_size,
                    divisors(t.batch_size)
                ),
            );
        }
        if t.seq_len < 2 {
            return fail(
                "training.seq_len",
                format!("must be at least 2 (got {})", t.seq_len),
            );
        }
        if t.steps == 0 {
            return fail("training.steps", "must be at least 1".into());
        }
        if !non_negative(t.grad_clip) {
            return fail(
                "training.grad_clip",
                format!("must be >= 0 (got {}); 0 disables clipping", t.grad_clip),
            );
        }
        if t.eval_batches == 0 {
            return fail("training.eval_batches", "must be at least 1".into());
        }
        if t.backend == BackendKind::Cpu
            && let DeviceSpec::Gpu(k) = &t.device
        {
            return fail(
                "training.device",
                format!("the cpu backend has one device (got {k}): use \"default\""),
            );
        }
        let ls = &t.loss_scaler;
        if !(ls.init_scale >= 1.0 && ls.init_scale.is_finite()) {
            return fail(
                "training.loss_scaler.init_scale",
                format!("must be a finite number >= 1 (got {})", ls.init_scale),
            );
        }
        if !(ls.growth_factor > 1.0 && ls.growth_factor.is_finite()) {
            return fail(
                "training.loss_scaler.growth_factor",
                format!("must be > 1 (got {})", ls.growth_factor),
            );
        }
        if !(ls.backoff_factor > 0.0 && ls.backoff_factor < 1.0) {
            return fail(
                "training.loss_scaler.backoff_factor",
                format!("must be in (0, 1) (got {})", ls.backoff_factor),
            );
        }
        if ls.growth_interval == 0 {
            return fail(
                "training.loss_scaler.growth_interval",
                "must be at least 1".into(),
            );
        }
        if !positive(o.lr) {
            return fail("optimizer.lr", format!("must be > 0 (got {})", o.lr));
        }
        for (k, b) in [("optimizer.beta1", o.beta1), ("optimizer.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return fail(k, format!("must be in [0, 1) (got {b})"));
            }
        }
        if !positive(o.eps) {
            return fail("optimizer.eps", format!("must be > 0 (got {})", o.eps));
        }
        if !non_negative(o.weight_decay) {
            return fail(
                "optimizer.weight_decay",
                format!("must be >= 0 (got {})", o.weight_decay),
            );
        }
        if s.warmup_steps > t.steps {
            return fail(
                "lr_scheduler.warmup_steps",
                format!(
                    "{} is more than training.steps = {}",
                    s.warmup_steps, t.steps
                ),
            );
        }
        if s.decay_steps != 0 && s.decay_steps < s.warmup_steps {
            return fail(
                "lr_scheduler.decay_steps",
                format!(
                    "{} ends before warmup_steps = {}: use 0 (= training.steps) or at least {}",
                    s.decay_steps, s.warmup_steps, s.warmup_steps
                ),
            );
        }
        if !(s.min_lr >= 0.0 && s.min_lr <= o.lr) {
            return fail(
                "lr_scheduler.min_lr",
                format!("must be in [0, optimizer.lr = {}] (got {})", o.lr, s.min_lr),
            );
        }
        if self.checkpoint.keep_latest_k == 0 {
            return fail(
                "checkpoint.keep_latest_k",
                "must be at least 1: resume needs a checkpoint".into(),
            );
        }
        if self.metrics.log_interval == 0 {
            return fail("metrics.log_interval", "must be at least 1".into());
        }
        let p = &self.parallelism;
        for (k, v) in [
            ("parallelism.data_parallel_degree", p.data_parallel_degree),
            (
                "parallelism.sequence_parallel_degree",
                p.sequence_parallel_degree,
            ),
        ] {
            if v == 0 {
                return fail(k, "must be at least 1 (1 = off)".into());
            }
        }
        let micro = self.micro_batch_size();
        if !micro.is_multiple_of(p.data_parallel_degree) {
            return fail(
                "parallelism.data_parallel_degree",
                format!(
                    "{} replicas cannot share micro-batches of {micro} sequences equally: \
                     use a divisor of training.micro_batch_size (or batch_size)",
                    p.data_parallel_degree
                ),
            );
        }
        let sp = p.sequence_parallel_degree;
        if sp > 1 {
            let layout_chunks = match p.sequence_sharding {
                Sharding::Zigzag => 2 * sp,
                Sharding::Contiguous => sp,
            };
            if !t.seq_len.is_multiple_of(layout_chunks) {
                return fail(
                    "training.seq_len",
                    format!(
                        "{} does not split into {layout_chunks} equal chunks \
                         ({:?} sharding over {sp} ranks): use a multiple of {layout_chunks}",
                        t.seq_len, p.sequence_sharding
                    )
                    .replace("Zigzag", "zigzag")
                    .replace("Contiguous", "contiguous"),
                );
            }
            let chunk = t.seq_len / layout_chunks;
            let uses_pool = self.layer_mixers().contains(&MixerKind::Pool);
            if uses_pool && self.model.pool.pool_size > chunk + 1 {
                return fail(
                    "model.pool.pool_size",
                    format!(
                        "{} reaches past a neighbouring chunk: sequence parallelism cuts \
                         seq_len {} into chunks of {chunk}; use pool_size <= {}",
                        self.model.pool.pool_size,
                        t.seq_len,
                        chunk + 1
                    ),
                );
            }
        }
        if !p.devices.is_empty() && p.devices.len() != p.ranks() {
            return fail(
                "parallelism.devices",
                format!(
                    "{} devices for {} ranks (data_parallel_degree {} x sequence_parallel_degree {}): \
                     give one per rank, or none to put every rank on training.device",
                    p.devices.len(),
                    p.ranks(),
                    p.data_parallel_degree,
                    sp
                ),
            );
        }
        if t.backend == BackendKind::Cpu
            && let Some(DeviceSpec::Gpu(k)) =
                p.devices.iter().find(|d| matches!(d, DeviceSpec::Gpu(_)))
        {
            return fail(
                "parallelism.devices",
                format!("the cpu backend has one device (got {k}): use \"default\""),
            );
        }
        Ok(())
    }
}

/// Apply `section.key=value` to a parsed recipe. The value is read as TOML (numbers,
/// booleans, arrays, quoted strings); anything else is taken as a bare string.
fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<(), String> {
    let (path, raw) = assignment
        .split_once('=')
        .ok_or_else(|| "expected KEY=VALUE, e.g. training.lr=3e-4".to_string())?;
    let path = path.trim();
    let raw = raw.trim();
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let keys: Vec<&str> = path.split('.').collect();
    if keys.iter().any(|k| k.is_empty()) {
        return Err(format!("{path:?} is not a key path like training.lr"));
    }
    let (last, sections) = keys.split_last().expect("split yields one key at least");
    let mut node = table;
    for section in sections {
        node = node
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| format!("{section} is a value, not a section"))?;
    }
    node.insert(last.to_string(), value);
    Ok(())
}

/// `x > 0`, false for NaN (so NaN in a recipe is rejected, not let through).
fn positive(x: f64) -> bool {
    x > 0.0
}

/// `x >= 0`, false for NaN.
fn non_negative(x: f64) -> bool {
    x >= 0.0
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn divisors(n: usize) -> String {
    let d: Vec<String> = (1..=n)
        .filter(|k| n.is_multiple_of(*k))
        .map(|k| k.to_string())
        .collect();
    if d.len() > 8 {
        format!("{}, ..., {}", d[..6].join(", "), d[d.len() - 1])
    } else {
        d.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_roundtrip() {
        let r = Recipe::from_toml_str("", "x.toml", "x", &[]).unwrap();
        assert_eq!(r.name, "x");
        let again = Recipe::from_toml_str(&r.to_toml(), "y.toml", "y", &[]).unwrap();
        assert_eq!(r, again);
    }

    #[test]
    fn overrides_reach_nested_keys() {
        let r = Recipe::from_toml_str(
            "[optimizer]\nlr = 1e-3\n",
            "x.toml",
            "x",
            &[
                "optimizer.lr=3e-4".into(),
                "model.mixers=[\"softmax\",\"softmax\"]".into(),
                "model.n_layers=2".into(),
                "name=other".into(),
            ],
        )
        .unwrap();
        assert_eq!(r.optimizer.lr, 3e-4);
        assert_eq!(r.model.n_layers, 2);
        assert_eq!(r.layer_mixers().len(), 2);
        assert_eq!(r.name, "other");
    }
}
